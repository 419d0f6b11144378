"""What the server tests share: the tiny inpainting model, starting a server on 127.0.0.1, RGBA products, PNG and
base64 round trips, and reading /metrics. Imported by test_server.py and test_serve_engine.py."""
import base64
import io
import json
import socket
import time

import httpx
import numpy as np
import openai
from PIL import Image

from backdrop.nn.checkpoint import init_model, save_model
from backdrop.nn.config import PRESETS
from backdrop.serve.engine import Engine, EngineConfig
from backdrop.serve.running import ServerThread
from backdrop.serve.server import ServerConfig, create_app

STEPS = 2          # denoising steps of every served request: enough to exercise the sampler, cheap on a CPU
SIZE = 64          # the tiny model's native size
PROMPTS = ["a bottle on marble", "a bottle on wet rocks", "studio backdrop, soft light", "a wooden table",
           "a beach at dusk", "moss and ferns", "brushed concrete", "a kitchen counter"]


def save_tiny_inpaint_model(folder):
    """A random tiny 9-channel model saved as a diffusers folder; its path."""
    return save_model(init_model(PRESETS["tiny-inpaint"], seed=1), folder)


def start_server(pipe, engine_config: EngineConfig, server_config: ServerConfig) -> ServerThread:
    srv = ServerThread(create_app(Engine(pipe, engine_config), server_config)).start()
    wait(lambda: httpx.get(f"{srv.url}/readyz").status_code == 200, 60, "readyz")
    return srv


def wait(cond, timeout: float, what: str):
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def product(seed: int, size=(SIZE, SIZE)) -> np.ndarray:
    """An RGBA cut-out (H, W, 4): a noisy background at alpha 0, an opaque disc (the product) with a soft rim."""
    rng = np.random.default_rng(seed)
    h, w = size
    rgba = np.zeros((h, w, 4), np.uint8)
    rgba[..., :3] = rng.integers(0, 256, (h, w, 3))
    yy, xx = np.mgrid[:h, :w]
    r = np.hypot(yy - h * rng.uniform(0.35, 0.65), xx - w * rng.uniform(0.35, 0.65))
    rgba[..., 3] = np.clip((h * 0.3 - r) * 128, 0, 255).astype(np.uint8)  # 255 inside, a 2-px ramp, 0 outside
    return rgba


def png(array_or_image, mode=None) -> bytes:
    im = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image, mode)
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def metrics(srv) -> str:
    return httpx.get(f"{srv.url}/metrics").text


def scalar(text: str, series: str) -> float:
    """The value of one exposition line, e.g. 'backdrop_queue_depth' or 'backdrop_requests_total{...}'; 0 if absent."""
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def client(srv, retries=0):
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=retries, timeout=120)


def assert_kept_exact(out: np.ndarray, rgba: np.ndarray):
    kept = rgba[..., 3] == 255
    assert kept.sum() > 100
    np.testing.assert_array_equal(out[kept], rgba[..., :3][kept])


def raw_http(srv, head: bytes, body: bytes = b"", read=True) -> tuple[int, dict]:
    """Send bytes on a plain socket; return (status, JSON body) of the response."""
    with socket.create_connection((srv.host, srv.port), timeout=30) as s:
        s.sendall(head + body)
        if not read:
            return 0, {}
        data = b""
        while chunk := s.recv(65536):
            data += chunk
            if b"\r\n\r\n" in data and len(data.split(b"\r\n\r\n", 1)[1]) >= int(
                    dict(line.split(b": ", 1) for line in data.split(b"\r\n\r\n")[0].split(b"\r\n")[1:]).get(
                        b"content-length", b"0")):
                break
    status = int(data.split(b" ", 2)[1])
    return status, json.loads(data.split(b"\r\n\r\n", 1)[1])


JSON = {"content-type": "application/json"}  # the JSON endpoints require it


def inpaint_body(rgba, **fields) -> bytes:
    return json.dumps({"image": base64.b64encode(png(rgba)).decode(), "prompt": "a table", **fields}).encode()
