"""The serving engine under failure and load, `backdrop serve` as a process, the CUDA-graph wrapper and the metrics
exposition, on a random tiny inpainting model, CPU only.

A request that makes the model fail fails alone (its batch is rerun request by request); a full queue gives 429 and
the openai client's own retry succeeds; deadlines give 504; a client that disconnects leaves the queue; `backdrop
serve` drains in-flight work on SIGTERM, then exits, and its bad options are one line. The CUDA-graph wrapper's
bucketing runs eagerly on the CPU here; its capture test needs a GPU.
"""
import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
import torch

from backdrop.cli import main as cli_main
from backdrop.diffusion.pipeline import Pipeline
from backdrop.serve.cuda_graphs import CUDAGraphUNet
from backdrop.serve.engine import Engine, EngineConfig, Item, ServeKey
from backdrop.serve.metrics import Histogram, parse_histogram
from backdrop.serve.server import ServerConfig, create_app

openai = pytest.importorskip("openai")
from serve_helpers import (JSON, SIZE, assert_kept_exact, client, decode, inpaint_body, metrics,  # noqa: E402
                           png, product, scalar, start_server, wait)

pytestmark = [pytest.mark.usefixtures("one_thread"),  # conftest.py
              pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                         "ignore::UserWarning")]


class FailsOn:
    """The module's Pipeline, except that a call whose prompts include `bad` raises: the failure injection (an
    input that trips a bug in the model), the real Pipeline otherwise."""

    def __init__(self, pipe, bad: str):
        self.pipe, self.bad, self.calls = pipe, bad, []

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def generate(self, prompt, **kwargs):
        self.calls.append(list(prompt))
        if self.bad in prompt:
            raise RuntimeError("injected failure")
        return self.pipe.generate(prompt, **kwargs)


def test_a_request_that_fails_the_model_fails_alone_not_its_batch(serve_pipe, caplog):
    failing = FailsOn(serve_pipe, "bad")
    engine = Engine(failing, EngineConfig(max_batch_size=4, max_queue_delay_ms=0), warmup=False)
    key = ServeKey("generate", SIZE, SIZE, 1, "dpmpp-2m", "backdrop")
    prompts = [["good a", "good b"], ["bad"], ["good c"]]
    reqs = [engine.submit(key, [Item(p, seed) for seed, p in enumerate(ps)], lambda: None) for ps in prompts]
    engine.start()  # after the submissions, so that all four images make one batch
    try:
        assert all(r.wait(60) for r in reqs)
    finally:
        engine.close(60)
    assert failing.calls == [["good a", "good b", "bad", "good c"], ["good a", "good b"], ["bad"], ["good c"]]
    assert [r.status for r in reqs] == ["done", "failed", "done"] and str(reqs[1].error) == "injected failure"
    assert [len(r.results) for r in reqs] == [2, 1, 1]
    solo = serve_pipe.generate(["good c"], seed=[0], steps=1, progress=False).images[0]
    np.testing.assert_array_equal(np.asarray(reqs[2].results[0]), np.asarray(solo))
    assert "running each request alone" in caplog.text


def test_a_model_failure_is_a_500_the_openai_client_does_not_retry(serve_pipe):
    """500 model_error comes only from a request that failed run alone: running it again fails again, so it says
    x-should-retry: false (the client would otherwise send the same work twice more)."""
    failing = FailsOn(serve_pipe, "bad")
    engine = Engine(failing, EngineConfig(max_queue_delay_ms=0), warmup=False)
    engine.start()
    try:
        transport = httpx.ASGITransport(app=create_app(engine, ServerConfig(steps=1)))

        async def post() -> httpx.Response:
            async with httpx.AsyncClient(transport=transport, base_url="http://backdrop") as c:
                return await c.post("/v1/images/generations", json={"prompt": "bad", "size": f"{SIZE}x{SIZE}"},
                                    timeout=60)
        r = asyncio.run(post())
    finally:
        engine.close(60)
    assert r.status_code == 500 and r.json()["error"]["code"] == "model_error", r.text
    assert "injected failure" in r.json()["error"]["message"] and r.headers["x-should-retry"] == "false"
    assert failing.calls == [["bad"]]  # one call: it was alone in its batch


def test_queue_full_429_retry_deadline_504_and_disconnect(serve_pipe):
    """One image at a time, one queued at most. A 999-step request with a short `timeout` holds the worker (dpmpp-2m
    at 1000 steps would land two steps on one noise level, a 400)."""
    srv = start_server(serve_pipe,
                       EngineConfig(max_batch_size=1, max_queue_delay_ms=0, max_queue=1, request_timeout=60),
                       ServerConfig(steps=1, max_steps=1000))
    try:
        url = f"{srv.url}/v1/inpaint"
        results = {}

        def background(name, body):
            results[name] = httpx.post(url, content=body, headers=JSON, timeout=60)
            return results[name]

        def hold_worker(timeout):
            t = threading.Thread(target=background, args=("blocker", inpaint_body(product(2), steps=999,
                                                                                  timeout=timeout)))
            t.start()
            wait(lambda: scalar(m := metrics(srv), "backdrop_requests_in_flight") == 1
                  and scalar(m, "backdrop_queue_depth") == 0, 30, "the worker to take the blocker")
            return t

        # a client that disconnects while queued is dropped from the queue (and never run)
        blocker = hold_worker(timeout=4)
        body = inpaint_body(product(3))
        with socket.create_connection((srv.host, srv.port)) as s:
            s.sendall(b"POST /v1/inpaint HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
                      + str(len(body)).encode() + b"\r\n\r\n" + body)
            wait(lambda: scalar(metrics(srv), "backdrop_queue_depth") == 1, 30, "the request to be queued")
        wait(lambda: scalar(m := metrics(srv), "backdrop_queue_depth") == 0 and scalar(
            m, 'backdrop_requests_total{endpoint="inpaint",code="499"}') == 1, 10, "the disconnect to be noticed")
        assert blocker.is_alive(), "the blocker finished before the cancelled request left the queue"
        # its time in the queue is in the histogram too (the blocker's and its own), not only the runs' queue times
        assert parse_histogram(metrics(srv), "backdrop_request_queue_duration_seconds")["count"] == 2
        blocker.join()
        r = results["blocker"]  # past its deadline while running: 504, and the batch is interrupted
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout", r.text

        # a full queue answers 429 + Retry-After; the openai client waits that long and its retry succeeds
        blocker = hold_worker(timeout=2)
        queued = threading.Thread(target=background, args=("queued", inpaint_body(product(4))))
        queued.start()
        wait(lambda: scalar(metrics(srv), "backdrop_queue_depth") == 1, 30, "the queue to fill")
        edit = {"image": ("p.png", png(product(5)), "image/png")}
        r = httpx.post(f"{srv.url}/v1/images/edits", files=edit, data={"prompt": "x"})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1, r.text
        assert r.json()["error"]["type"] == "rate_limit_error"
        out = client(srv, retries=3).images.edit(image=edit["image"], prompt="x", extra_body={"seed": 5})
        assert_kept_exact(decode(out.data[0].b64_json), product(5))
        text = metrics(srv)
        assert scalar(text, 'backdrop_requests_total{endpoint="edits",code="429"}') >= 2  # ours and the client's
        assert scalar(text, 'backdrop_requests_total{endpoint="edits",code="200"}') == 1
        blocker.join()
        queued.join()
        assert results["blocker"].status_code == 504 and results["queued"].status_code == 200
        assert httpx.get(f"{srv.url}/healthz").status_code == 200
    finally:
        srv.stop()


@pytest.mark.parametrize("drain", [None, 0.5])
def test_cli_serve_drains_in_flight_work_on_sigterm(serve_model_dir, drain):
    """SIGTERM: in-flight work finishes; with --drain-timeout past, it is cancelled with OpenAI's 503 (was uvicorn's
    bare 500, which an openai client read as a server fault), counted and logged, without a traceback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "backdrop", "serve", str(serve_model_dir), "--port", str(port),
                             "--steps", "2", "--device", "cpu", "--dtype", "fp32", "--log-level", "warning",
                             *(["--drain-timeout", str(drain), "--max-steps", "400"] if drain else [])],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def ready():
            assert proc.poll() is None, proc.stdout.read()
            try:
                return httpx.get(f"{url}/readyz").status_code == 200
            except httpx.TransportError:
                return False
        wait(ready, 120, "the server to be ready")
        result = {}
        steps = 400 if drain else 40
        t = threading.Thread(target=lambda: result.update(r=httpx.post(
            f"{url}/v1/inpaint", content=inpaint_body(product(6), steps=steps, seed=1), headers=JSON, timeout=120)))
        t.start()
        wait(lambda: scalar(httpx.get(f"{url}/metrics").text, "backdrop_requests_in_flight") == 1, 30, "in flight")
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(httpx.TransportError):  # no new connections while draining
            httpx.get(f"{url}/healthz")
        t.join(120)
        if drain:
            r = result["r"]
            assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down", r.text
        else:
            assert result["r"].status_code == 200, result["r"].text
            assert_kept_exact(decode(result["r"].json()["data"][0]["b64_json"]), product(6))
        # uvicorn re-raises the signal once the drain is done, so the exit status is SIGTERM's (143 in a shell),
        # not a crash (1) or a kill after a timeout
        assert proc.wait(60) == -signal.SIGTERM
        assert "Traceback" not in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_errors_are_one_line(capsys, tmp_path, serve_model_dir):
    # refused before serving
    assert cli_main(["serve", str(serve_model_dir), "--sampler", "ddim", "--steps", "1000", "--max-steps", "1000",
                     "--port", "0"]) == 2
    assert "--steps 1000" in capsys.readouterr().err
    assert cli_main(["serve", str(tmp_path / "missing"), "--port", "0"]) == 2
    assert "missing" in capsys.readouterr().err
    assert cli_main(["serve", str(tmp_path), "--max-queue", "0"]) == 2
    assert "--max-queue" in capsys.readouterr().err
    assert cli_main(["serve", str(tmp_path), "--port", "70000"]) == 2
    assert cli_main(["serve", str(serve_model_dir), "--device", "gpu", "--port", "0"]) == 2
    assert "--device 'gpu' is not a device name" in capsys.readouterr().err
    assert cli_main(["serve", str(serve_model_dir), "--clip-skip", "9", "--port", "0"]) == 2  # 2 text layers
    assert "--clip-skip 9: give 0 to 2 (this model's text encoder has 2 layers)" in capsys.readouterr().err
    assert cli_main(["serve", str(serve_model_dir), "--port", "0", "--textual-inversion",
                     str(tmp_path / "none.safetensors")]) == 2
    assert "--textual-inversion: " in capsys.readouterr().err


def test_warm_up_covers_every_graph_bucket_on_cuda_only():
    from backdrop.serve.engine import warm_up_batches

    assert warm_up_batches("cpu", 8) == [1]
    assert warm_up_batches("cuda", 8) == [1, 2, 4, 8]
    assert warm_up_batches("cuda", 6) == [1, 2, 4, 6]   # 6 images pad to the 8-image graph, captured by its own call
    assert warm_up_batches("cuda", 1) == [1]


def test_cuda_graph_unet_buckets_pad_and_slice(serve_pipe):
    """On the CPU the wrapper pads to its batch bucket and runs eagerly: rows must equal the direct call's,
    whatever stale rows the static buffers hold from earlier calls."""
    unet = serve_pipe.backend.unet
    wrapped = CUDAGraphUNet(unet, "cpu")
    assert not wrapped.graphs and wrapped.bucket(3) == 4 and wrapped.bucket(65) is None
    g = torch.Generator().manual_seed(0)
    for b in (3, 2, 3, 1):
        x = torch.randn(b, 9, 8, 8, generator=g)
        t = torch.randint(0, 1000, (b,), generator=g).float()
        ctx = torch.randn(b, 77, 64, generator=g)
        torch.testing.assert_close(wrapped(x, t, ctx), unet(x, t, ctx), atol=1e-5, rtol=1e-4)
    assert sorted(k[0] for k in wrapped.captured) == [1, 2, 4]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_replay_matches_eager(serve_model_dir):
    gpu = Pipeline.from_pretrained(serve_model_dir, device="cuda", dtype=torch.float16)
    unet = gpu.backend.unet
    wrapped = CUDAGraphUNet(unet, "cuda")
    g = torch.Generator().manual_seed(0)
    for b in (3, 2, 3, 8):
        x = torch.randn(b, 9, 8, 8, generator=g).cuda()
        t = torch.randint(0, 1000, (b,), generator=g).float().cuda()
        ctx = torch.randn(b, 77, 64, generator=g).cuda()
        torch.testing.assert_close(wrapped(x, t, ctx), unet(x, t, ctx), atol=2e-3, rtol=2e-3)
    assert all(v.graph is not None for v in wrapped._cache.values())


def test_metrics_histogram_round_trip():
    h = Histogram("x_seconds", "help", (1, 2, 4), labelnames=("endpoint",))
    for v in (0.5, 1, 3, 9):
        h.observe(v, endpoint='a"b')
    parsed = parse_histogram("\n".join(h.render()), "x_seconds", endpoint='a\\"b')
    assert parsed == {"buckets": {1.0: 2, 2.0: 2, 4.0: 3, float("inf"): 4}, "sum": 13.5, "count": 4}
    with pytest.raises(ValueError):
        h.observe(1.0, other="x")


def test_a_port_in_use_is_said_before_the_model_loads(capsys, serve_model_dir, monkeypatch):
    from backdrop.diffusion.pipeline import Pipeline

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(Pipeline, "from_pretrained", load)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli_main(["serve", str(serve_model_dir), "--port", str(port)]) == 2
    assert f"--port {port}: cannot listen there" in capsys.readouterr().err


def test_shutdown_first_turns_unready_then_exits_after_the_delay(serve_pipe):
    """SIGTERM on Kubernetes races the pod's removal from the Service: with --shutdown-delay the first signal makes
    /readyz and new work answer 503 (retryable) while the listener stays up, and the exit starts after the delay;
    work admitted before still finishes. A second signal goes uvicorn's way at once."""
    from backdrop.serve.running import DelayedExit, ServerThread

    engine = Engine(serve_pipe, EngineConfig(max_batch_size=1))
    srv = ServerThread(create_app(engine, ServerConfig(steps=1))).start()
    try:
        wait(lambda: httpx.get(f"{srv.url}/readyz").status_code == 200, 60, "readyz")
        exiting = DelayedExit(srv.server.config, delay=0.3, on_shutdown=engine.begin_shutdown)
        exiting.handle_exit(signal.SIGTERM, None)
        assert not exiting.should_exit  # still serving during the delay
        r = httpx.get(f"{srv.url}/readyz")
        assert r.status_code == 503 and r.json()["status"] == "shutting down"
        r = httpx.post(f"{srv.url}/v1/inpaint", content=inpaint_body(product(2)), headers=JSON)
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
        wait(lambda: exiting.should_exit, 5, "the exit after the delay")
        now = DelayedExit(srv.server.config, delay=30, on_shutdown=lambda: None)
        now.handle_exit(signal.SIGTERM, None)
        now.handle_exit(signal.SIGTERM, None)
        assert now.should_exit  # the second signal does not wait
    finally:
        srv.stop()
