"""Scale-out: the server as a Ray Serve deployment. Through Ray: two replicas of a random tiny model on a private local
Ray instance on this CPU (kept small: 2 CPUs, half a CPU per replica, one denoising step), deployed through
app_builder with strings, as `serve run ... key=value` does. Without Ray: app_builder's parsing, the deployment options
and the replica's health logic.

Proves the deployment path works end to end: both replicas come up warm and answer (their pids differ), the official
openai client's edit and generate calls go through Ray's HTTP proxy to our batcher inside a replica, our 429 with
Retry-After reaches the client (Ray does not hold the overflow in its router), "url" is refused behind two replicas,
X-Request-ID comes back once, and the access line reaches the replica's Ray log. A dead batch worker or a failed
warm-up fails the replica's health check, its start, and /readyz.
"""
import asyncio
import base64
import glob
import io
import logging
import os
import re
import socket
import time
from dataclasses import replace

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from backdrop.cli import CLIError
from backdrop.diffusion.pipeline import Pipeline
from backdrop.serve.engine import Engine, EngineConfig, Item, ServeKey
from backdrop.serve.ray_serve import (BackdropReplica, builder_args, replica_server_config, serve_options,
                                      wait_warm)
from backdrop.serve.running import ServerThread
from backdrop.serve.server import ServerConfig, create_app

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                        "ignore::UserWarning")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png(rgba: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, "PNG")
    return buf.getvalue()


def _product() -> np.ndarray:
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., :3] = np.random.default_rng(0).integers(0, 256, (64, 64, 3))
    rgba[16:48, 16:48, 3] = 255  # the product: opaque square; alpha 0 elsewhere is repainted
    return rgba


# ------------------------------------------------------------------------------------------------- through Ray

@pytest.fixture(scope="module")
def ray_app(serve_model_dir):
    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")
    from backdrop.serve.ray_serve import app_builder

    # address="local": a private instance, even where a Ray cluster already runs on this machine
    metrics_port = _free_port()
    context = ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=80 * 2**20,
                       log_to_driver=False, configure_logging=False, _metrics_export_port=metrics_port)
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = app_builder({"model": str(serve_model_dir), "num_replicas": "2", "num_cpus": "0.5", "device": "cpu",
                           "dtype": "fp32", "torch_threads": "1", "max_batch_size": "2", "max_queue": "4",
                           "max_queue_delay_ms": "50", "steps": "1", "max_steps": "400", "request_timeout": "20",
                           "body_timeout": "10"})
        serve.run(app, name="backdrop", route_prefix="/")
        yield f"http://127.0.0.1:{port}", serve, context.address_info["session_dir"], metrics_port
    finally:
        serve.shutdown()
        ray.shutdown()


def test_two_replicas_serve_the_openai_endpoints(ray_app):
    openai = pytest.importorskip("openai")
    url, serve, session, _ = ray_app
    assert serve.status().applications["backdrop"].deployments["backdrop"].replica_states.get("RUNNING") == 2
    # a replica is RUNNING only once warm; Ray's router picks between two idle replicas at random: 40 tries all
    # landing on one is ~1e-12
    assert {httpx.get(f"{url}/readyz", timeout=30).status_code for _ in range(20)} == {200}
    pids = {httpx.get(f"{url}/healthz", timeout=30).json()["pid"] for _ in range(40)}
    assert len(pids) == 2

    rgba = _product()
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)
    r = client.images.edit(image=("p.png", _png(rgba), "image/png"), prompt="a table", n=2, extra_body={"seed": 3})
    assert [d.model_extra["seed"] for d in r.data] == [3, 4]
    out = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json))).convert("RGB"))
    np.testing.assert_array_equal(out[16:48, 16:48], rgba[16:48, 16:48, :3])  # kept pixels exact through Ray
    r = client.images.generate(prompt="a table", size="64x64")
    assert Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json))).size == (64, 64)
    # errors keep OpenAI's shape through the proxy
    with pytest.raises(openai.BadRequestError):
        client.images.generate(prompt="a table", size="100x100")
    # behind two replicas a url file would live in one of them: refused, saying what to use
    with pytest.raises(openai.BadRequestError, match="b64_json"):
        client.images.generate(prompt="a table", size="64x64", response_format="url")

    # X-Request-ID once (Ray's proxy sets it; the app no longer adds it again), and logged in the replica's Ray log
    r = httpx.post(f"{url}/v1/images/generations", json={"prompt": "a shelf", "size": "64x64"},
                   headers={"x-request-id": "ray-test-7"}, timeout=60)
    assert r.status_code == 200 and r.headers.get_list("x-request-id") == ["ray-test-7"]
    def logged() -> bool:  # "ray-test-7 <client> POST /v1/images/generations 200 ..."
        for path in glob.glob(os.path.join(session, "logs", "serve", "replica_backdrop_backdrop_*.log")):
            with open(path, errors="replace") as f:
                if any("ray-test-7 " in ln and "POST /v1/images/generations 200" in ln for ln in f):
                    return True
        return False
    end = time.monotonic() + 10
    while not logged():
        assert time.monotonic() < end, "the access line is in no replica log"
        time.sleep(0.2)


def test_each_replicas_serving_metrics_reach_rays_metrics(ray_app):
    """Our /metrics through the proxy is one replica's; Ray's endpoint has every replica's, tagged with it."""
    url, metrics_port = ray_app[0], ray_app[3]
    for _ in range(4):
        assert httpx.post(f"{url}/v1/images/generations", json={"prompt": "a shelf", "size": "64x64"},
                          timeout=60).status_code == 200
    end, text = time.monotonic() + 60, ""

    def images(text: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("ray_backdrop_images_total"))

    # each replica exports on its own period: wait until the 4 images are counted, not only until series appear
    while "ray_backdrop_batch_size_count" not in text or "ray_backdrop_queue_depth" not in text or images(text) < 4:
        assert time.monotonic() < end, f"no ray_backdrop_* metrics (or not all 4 images) at Ray's endpoint: " \
                                       f"{text[-2000:]}"
        time.sleep(1)
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    ours = [line for line in text.splitlines() if line.startswith("ray_backdrop_")]
    requests = [line for line in ours if line.startswith("ray_backdrop_requests_total")]
    assert any('code="200"' in line and 'endpoint="generations"' in line and 'deployment="backdrop"' in line
               for line in requests), requests
    assert images(text) >= 4  # (the module's other tests' images count too)
    replicas = {m for line in ours if line.startswith("ray_backdrop_ready") for m in re.findall(r'replica="([^"]+)"',
                                                                                                     line)}
    assert len(replicas) == 2  # one series per replica


def test_the_replicas_429_passes_through_ray(ray_app):
    """Queues of 4 images, batches of 2. Two long requests of 4 images each fill both replicas' queues (2 running, 2
    queued), or the second meets a full queue; a third of 3 images then finds no room: some request gets our 429
    with Retry-After from a replica, none is held in Ray's router until it times out."""
    url = ray_app[0]
    body = {"image": base64.b64encode(_png(_product())).decode(), "prompt": "a table", "timeout": 15}

    async def go():
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            long = [asyncio.create_task(c.post("/v1/inpaint", json=dict(body, n=4, steps=400))) for _ in range(2)]
            await asyncio.sleep(1.0)  # both admitted; their first batches of 2 x 400 steps take several seconds
            t0 = time.monotonic()
            late = await c.post("/v1/inpaint", json=dict(body, n=3))
            seconds = time.monotonic() - t0
            answered = [t.result() for t in long if t.done()]
            for t in long:  # the client goes away: Ray cancels the handler, the engine drops the work
                t.cancel()
            await asyncio.gather(*long, return_exceptions=True)
        return answered + [late], seconds
    responses, seconds = asyncio.run(go())
    refused = [r for r in responses if r.status_code == 429]
    assert refused, [(r.status_code, r.text[:200]) for r in responses]
    for r in refused:
        assert r.json()["error"]["code"] == "queue_full" and int(r.headers["retry-after"]) >= 1
    assert seconds < 5  # answered at once, by a replica


# ------------------------------------------------------------------------------------------------- without Ray

class Breaks:
    """The module's Pipeline, except that its warm-up fails (as a CUDA OOM during graph capture would) or that a
    prompt "kill-worker" ends the batch worker thread (an exception outside a batch's handling)."""

    def __init__(self, pipe, warm_up_fails: bool = False):
        self.pipe, self.warm_up_fails = pipe, warm_up_fails

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def _check(self, prompt):
        if self.warm_up_fails:
            raise RuntimeError("CUDA out of memory (injected)")
        if "kill-worker" in prompt:
            raise SystemExit("the worker dies (injected)")

    def generate(self, prompt, **kwargs):
        self._check(prompt)
        return self.pipe.generate(prompt, **kwargs)

    def inpaint(self, image, prompt, **kwargs):
        self._check(prompt)
        return self.pipe.inpaint(image, prompt=prompt, **kwargs)


def test_a_dead_batch_worker_fails_check_health_and_readyz(serve_pipe):
    engine = Engine(Breaks(serve_pipe), EngineConfig(request_timeout=30), warmup=False)
    replica = object.__new__(BackdropReplica)  # its health logic, without loading a model in __init__
    replica.engine = engine
    srv = ServerThread(create_app(engine, ServerConfig(steps=1))).start()
    try:
        end = time.monotonic() + 30
        while httpx.get(f"{srv.url}/readyz").status_code != 200:  # the worker starts with the app's lifespan
            assert time.monotonic() < end, "not ready"
            time.sleep(0.05)
        replica.check_health()
        engine.submit(ServeKey("generate", 64, 64, 1, "dpmpp-2m", "backdrop"), [Item("kill-worker", 0)], lambda: None)
        end = time.monotonic() + 30
        while engine.problem() is None:
            assert time.monotonic() < end, "the worker did not stop"
            time.sleep(0.05)
        with pytest.raises(RuntimeError, match="batch worker thread has stopped"):
            replica.check_health()
        r = httpx.get(f"{srv.url}/readyz")
        assert r.status_code == 503 and r.json() == {"status": "error", "error": "the batch worker thread has stopped"}
    finally:
        srv.stop()
    assert engine.problem() is None  # closed on purpose: no longer a fault


def test_a_replica_starts_only_warm_and_a_failed_warm_up_fails_it(serve_pipe):
    engine = Engine(Breaks(serve_pipe, warm_up_fails=True), EngineConfig())
    with pytest.raises(RuntimeError, match="warm-up failed: CUDA out of memory"):
        wait_warm(engine, poll=0.05)
    replica = object.__new__(BackdropReplica)
    replica.engine = engine
    with pytest.raises(RuntimeError, match="warm-up failed"):
        replica.check_health()
    engine.close(10)
    engine = Engine(serve_pipe, EngineConfig())
    wait_warm(engine, poll=0.05)
    assert engine.ready.is_set() and engine.problem() is None
    engine.close(10)


def test_app_builder_arguments():
    """`serve run` passes strings, a config file YAML-typed values: both become build_app's arguments."""
    got = builder_args({"model": "/m", "num_replicas": "auto", "max_replicas": "4", "min_replicas": 1,
                        "num_gpus": "0.5", "max_batch_size": "4", "max_queue": 16, "steps": "20",
                        "adaptive_delay": "false", "url_responses": "yes", "max_queued_requests": "10",
                        "graceful_shutdown_timeout_s": "120", "torch_threads": "2", "dtype": "fp16",
                        "cuda_graphs": False})
    assert got == dict(model="/m", num_replicas="auto", ray_actor_options={"num_gpus": 0.5},
                       deployment_options={"max_queued_requests": 10, "graceful_shutdown_timeout_s": 120.0,
                                           "autoscaling_config": {"min_replicas": 1, "max_replicas": 4}},
                       engine_config=EngineConfig(max_batch_size=4, max_queue=16, adaptive_delay=False),
                       server_config=ServerConfig(steps=20), url_responses=True, torch_threads=2, dtype="fp16",
                       cuda_graphs=False)
    assert builder_args({"model": "m", "num_replicas": "3"})["num_replicas"] == 3
    fractional = builder_args({"model": "m", "max_queue_delay_ms": "12.5", "cpu_cache_mb": 0.5, "max_files": 8.0})
    assert fractional["engine_config"] == EngineConfig(max_queue_delay_ms=12.5, cpu_cache_mb=0.5)  # were int()-ed
    assert fractional["server_config"].max_files == 8
    for none in (None, "null", "None"):  # an `int | None` field's own None (YAML null) was "expected int | None"
        assert builder_args({"model": "m", "max_image_pixels": none})["server_config"].max_image_pixels is None
    for origins in ("https://a.example, https://b.example", ["https://a.example", "https://b.example"]):
        assert builder_args({"model": "m", "allowed_origins": origins})["server_config"].allowed_origins == (
            "https://a.example", "https://b.example")
    models = builder_args({"model": "m", "lora": "a.safetensors:0.5, b.safetensors", "vae": "v.safetensors",
                           "textual_inversion": ["t.safetensors:<cat>"], "allow_pickle": "no", "variant": "fp16",
                           "freeu": "sd1"})
    assert {k: models[k] for k in ("lora", "textual_inversion", "vae", "allow_pickle", "variant", "freeu")} == dict(
        lora=[("a.safetensors", 0.5), ("b.safetensors", 1.0)], textual_inversion=[("t.safetensors", "<cat>")],
        vae="v.safetensors", allow_pickle=False, variant="fp16", freeu=(0.9, 0.2, 1.5, 1.6))
    assert builder_args({"model": "m", "freeu": [0.8, 0.3, 1.2, 1.4]})["freeu"] == (0.8, 0.3, 1.2, 1.4)  # YAML
    assert builder_args({"model": "m", "controlnet": "a,b"})["controlnet"] == ["a", "b"]
    assert builder_args({"model": "m", "controlnet": ["c"]})["controlnet"] == ["c"]  # YAML
    given = builder_args({"model": "m", "ip_adapter": "ip.safetensors", "ip_adapter_scale": "0.6"})
    assert (given["ip_adapter"], given["ip_adapter_scale"]) == ("ip.safetensors", 0.6)
    for args, message in (({"num_replicas": "2"}, "give model=PATH"),
                          ({"model": "m", "loras": "x.safetensors"}, r"unknown arguments \['loras'\]"),
                          ({"model": "m", "adaptive_delay": "ture"}, "true or false"),
                          ({"model": "m", "max_batch_size": 8.5}, r"max_batch_size=8.5: expected int .not a whole"),
                          ({"model": "m", "steps": "many"}, r"steps='many': expected int"),
                          ({"model": "m", "max_queue": "0"}, "max_queue = 0 is out of range"),
                          ({"model": "m", "lora": "x.safetensors:inf"}, "finite"),
                          ({"model": "m", "freeu": "0.9,0.2"}, "not four comma-separated numbers")):
        with pytest.raises(ValueError, match=message):
            builder_args(args)


@pytest.fixture
def replica_logging():
    """A replica hands the `backdrop` logger's records to Ray's (log_to_ray); made in this process, that handler
    would re-emit every later test's log lines: put the logger back."""
    logger = logging.getLogger("backdrop")
    handlers, level = logger.handlers[:], logger.level
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)


@pytest.mark.usefixtures("replica_logging")
def test_a_replica_merges_its_loras_as_backdrop_serve_does(serve_model_dir, tmp_path):
    """build_app's lora (and the other model options) reach every replica's Pipeline; a bad file stops the replica
    with the option's one-line error."""
    from backdrop.nn.checkpoint import load_model
    from backdrop.nn.controlnet import load_controlnet
    from backdrop.nn.unet import FreeU
    from test_ip_adapter import WEIGHTS, ip_adapter_folder
    from test_lora import assert_same, peft_file, random_lora, state

    from pipeline_helpers import controlnet_folder

    base = load_model(serve_model_dir)
    path = peft_file(random_lora(base, seed=3), tmp_path / "style.safetensors")
    net = controlnet_folder(replace(base.config.unet, in_channels=4), tmp_path / "controlnet", seed=2)
    ip = ip_adapter_folder(tmp_path / "ip", base.unet) / "models" / WEIGHTS
    expected = Pipeline.from_pretrained(serve_model_dir, device="cpu", dtype=torch.float32)
    expected.load_lora_weights(path, lora_scale=0.5)
    replica = BackdropReplica(str(serve_model_dir), EngineConfig(max_batch_size=1), ServerConfig(steps=1),
                              device="cpu", dtype="fp32", cuda_graphs=False,
                              model_options=dict(lora=[(str(path), 0.5)], textual_inversion=[], vae=None,
                                                 freeu=(0.8, 0.3, 1.2, 1.4), controlnet=[net],
                                                 ip_adapter=str(ip), ip_adapter_scale=0.5))
    try:
        ours, theirs, base = state(replica.engine.pipe.backend.model), state(expected.backend.model), state(base)
        assert_same(ours, theirs)
        assert replica.engine.pipe.backend.model.unet.freeu == FreeU(0.8, 0.3, 1.2, 1.4)  # as `backdrop serve`'s
        assert replica.engine.pipe.controlnet.controlnet_mid_block.bias.tolist() == \
            load_controlnet(net).controlnet_mid_block.bias.tolist()  # warmed up with a control image
        assert {link.scale for link in replica.engine.pipe._ip[1].values()} == {0.5}  # and an image prompt
        assert sum(not torch.equal(ours[k], base[k]) for k in base) > 10  # the LoRA's modules changed
    finally:
        replica.__del__()
    with pytest.raises(CLIError, match=r"--ip-adapter-scale -1 must be finite and >= 0"):  # as `backdrop serve`
        BackdropReplica(str(serve_model_dir), EngineConfig(), ServerConfig(), device="cpu", dtype="fp32",
                        model_options=dict(ip_adapter=str(ip), ip_adapter_scale=-1.0))
    with pytest.raises(CLIError, match="--lora: .*missing.safetensors"):
        BackdropReplica(str(serve_model_dir), EngineConfig(), ServerConfig(), device="cpu", dtype="fp32",
                        model_options=dict(lora=[(str(tmp_path / "missing.safetensors"), 1.0)]))


def test_deployment_options_follow_the_engine():
    engine = EngineConfig(max_batch_size=8, max_queue=64, request_timeout=300)
    server = ServerConfig(body_timeout=60)
    one = serve_options(engine, server)
    assert one == dict(num_replicas=1, ray_actor_options={}, max_ongoing_requests=64 + 8 + 8, max_queued_requests=80,
                       graceful_shutdown_timeout_s=300 + 60 + 10)
    auto = serve_options(engine, server, "auto", {"num_gpus": 1}, {"autoscaling_config": {"max_replicas": 4},
                                                                   "max_queued_requests": 100})
    assert auto["autoscaling_config"] == {"target_ongoing_requests": 8, "max_replicas": 4}
    assert auto["num_replicas"] == "auto" and auto["max_queued_requests"] == 100
    implied = serve_options(engine, server, None, None, {"autoscaling_config": {"target_ongoing_requests": 3}})
    assert implied["num_replicas"] == "auto" and implied["autoscaling_config"] == {"target_ongoing_requests": 3}
    with pytest.raises(ValueError, match="give one of them"):
        serve_options(engine, server, 2, None, {"autoscaling_config": {"max_replicas": 4}})

    # url responses only where one replica serves them all; X-Request-ID left to Ray's proxy
    assert replica_server_config(server, one) == ServerConfig(body_timeout=60, echo_request_id=False)
    assert replica_server_config(server, serve_options(engine, server, 2)).max_files == 0
    assert replica_server_config(server, auto).max_files == 0
    assert replica_server_config(server, serve_options(engine, server, 2), url_responses=True).max_files == 256
    capped = serve_options(engine, server, "auto", None, {"autoscaling_config": {"max_replicas": 1}})
    assert replica_server_config(server, capped).max_files == 256
    assert replica_server_config(server, one, url_responses=False).max_files == 0
