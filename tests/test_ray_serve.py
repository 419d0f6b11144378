"""Scale-out: the server as a Ray Serve deployment with two replicas of a random tiny model, on a local Ray instance
started on this CPU (kept small: 2 CPUs, half a CPU per replica, one denoising step).

Proves the deployment path works end to end: both replicas come up and answer (their pids differ), and the
official openai client's edit and generate calls go through Ray's HTTP proxy to our batcher inside a replica.
"""
import base64
import io
import socket
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from backdrop.nn.checkpoint import init_model, save_model
from backdrop.nn.config import PRESETS
from backdrop.serve.engine import EngineConfig
from backdrop.serve.server import ServerConfig

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                        "ignore::UserWarning")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_url(tmp_path_factory):
    from backdrop.serve.ray_serve import build_app

    folder = save_model(init_model(PRESETS["tiny-inpaint"], seed=1), tmp_path_factory.mktemp("ray") / "model")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 2**20, log_to_driver=False,
             configure_logging=False)
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app(str(folder), EngineConfig(max_batch_size=4, max_queue_delay_ms=50, max_queue=16),
                        ServerConfig(steps=1), num_replicas=2, ray_actor_options={"num_cpus": 0.5},
                        device="cpu", dtype="fp32", torch_threads=1)
        serve.run(app, name="backdrop", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_two_replicas_serve_the_openai_endpoints(ray_url):
    end = time.monotonic() + 120
    while httpx.get(f"{ray_url}/readyz", timeout=30).status_code != 200:  # warm-up runs after the replica starts
        assert time.monotonic() < end, "no replica became ready"
        time.sleep(0.2)
    assert serve.status().applications["backdrop"].deployments["backdrop"].replica_states.get("RUNNING") == 2
    # Ray's router picks between two idle replicas at random: 40 tries all landing on one is ~1e-12
    pids = {httpx.get(f"{ray_url}/healthz", timeout=30).json()["pid"] for _ in range(40)}
    assert len(pids) == 2

    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., :3] = np.random.default_rng(0).integers(0, 256, (64, 64, 3))
    rgba[16:48, 16:48, 3] = 255  # the product: opaque square; alpha 0 elsewhere is repainted
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, "PNG")
    client = openai.OpenAI(base_url=f"{ray_url}/v1", api_key="x", max_retries=0, timeout=120)
    r = client.images.edit(image=("p.png", buf.getvalue(), "image/png"), prompt="a table", n=2,
                           extra_body={"seed": 3})
    assert [d.model_extra["seed"] for d in r.data] == [3, 4]
    out = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json))).convert("RGB"))
    np.testing.assert_array_equal(out[16:48, 16:48], rgba[16:48, 16:48, :3])  # kept pixels exact through Ray
    r = client.images.generate(prompt="a table", size="64x64")
    assert Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json))).size == (64, 64)
    # errors keep OpenAI's shape through the proxy
    with pytest.raises(openai.BadRequestError):
        client.images.generate(prompt="a table", size="100x100")
