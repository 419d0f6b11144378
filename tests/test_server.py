"""The HTTP server end to end on a random tiny inpainting model, on 127.0.0.1, CPU only.

The official `openai` client runs images.edit / images.generate against it; concurrent edits share batches (read
back from /metrics) and each equals the same request run alone through the Pipeline with the same seed, with the
product's pixels returned bit-identical; a full queue gives 429 and the client's own retry succeeds; deadlines
give 504; a client that disconnects leaves the queue; bad input of every kind gets its 4xx and the server keeps
serving; `backdrop serve` drains in-flight work on SIGTERM, then exits. The CUDA-graph wrapper's bucketing runs
eagerly on the CPU here; its capture test needs a GPU.
"""
import asyncio
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from backdrop.cli import main as cli_main
from backdrop.diffusion.pipeline import Pipeline
from backdrop.nn.checkpoint import init_model, save_model
from backdrop.nn.config import PRESETS
from backdrop.serve.cuda_graphs import CUDAGraphUNet
from backdrop.serve.engine import Engine, EngineConfig, Item, ServeKey
from backdrop.serve.metrics import Histogram, parse_histogram
from backdrop.serve.running import ServerThread
from backdrop.serve.server import ServerConfig, create_app

openai = pytest.importorskip("openai")
pytestmark = [pytest.mark.usefixtures("one_thread"),  # conftest.py
              pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                         "ignore::UserWarning", "ignore::PIL.Image.DecompressionBombWarning")]

STEPS = 2          # denoising steps of every served request: enough to exercise the sampler, cheap on a CPU
SIZE = 64          # the tiny model's native size
PROMPTS = ["a bottle on marble", "a bottle on wet rocks", "studio backdrop, soft light", "a wooden table",
           "a beach at dusk", "moss and ferns", "brushed concrete", "a kitchen counter"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model(init_model(PRESETS["tiny-inpaint"], seed=1), tmp_path_factory.mktemp("serve") / "model")


@pytest.fixture(scope="module")
def pipe(model_dir):
    return Pipeline.from_pretrained(model_dir, device="cpu", dtype=torch.float32)


def _start(pipe, engine_config: EngineConfig, server_config: ServerConfig) -> ServerThread:
    srv = ServerThread(create_app(Engine(pipe, engine_config), server_config)).start()
    _wait(lambda: httpx.get(f"{srv.url}/readyz").status_code == 200, 60, "readyz")
    return srv


@pytest.fixture(scope="module")
def server(pipe):
    srv = _start(pipe, EngineConfig(max_batch_size=8, max_queue_delay_ms=500, max_queue=32, request_timeout=120),
                 ServerConfig(steps=STEPS, max_body_bytes=2**20))
    yield srv
    srv.stop()


# ------------------------------------------------------------------------------------------------- helpers

def _wait(cond, timeout: float, what: str):
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


# ------------------------------------------------------------------------------------------------- tests

def test_openai_client_edit_and_generate(server, pipe):
    rgba = product(0)
    c = client(server)
    r = c.images.edit(image=("product.png", png(rgba), "image/png"), prompt=PROMPTS[0], n=2, size="64x64",
                      extra_body={"seed": 7})
    assert [d.model_extra["seed"] for d in r.data] == [7, 8]
    outs = [decode(d.b64_json) for d in r.data]
    assert outs[0].shape == (SIZE, SIZE, 3) and not np.array_equal(outs[0], outs[1])  # two seeds, two backdrops
    for out in outs:
        assert_kept_exact(out, rgba)
    odd = product(4, size=(48, 80))  # any image size is served; `size` may repeat it even when not a preset
    r = c.images.edit(image=("odd.png", png(odd), "image/png"), prompt=PROMPTS[0], size="80x48")
    assert_kept_exact(decode(r.data[0].b64_json), odd)

    r = c.images.generate(prompt=PROMPTS[1], size="128x64", response_format="url", extra_body={"seed": 3})
    assert r.data[0].url.startswith(server.url + "/v1/files/")
    got = np.asarray(Image.open(io.BytesIO(httpx.get(r.data[0].url).content)).convert("RGB")).astype(int)
    want = np.asarray(pipe.generate(PROMPTS[1], height=64, width=128, seed=3, steps=STEPS, progress=False).images[0])
    assert got.shape == (64, 128, 3)
    assert np.abs(got - want).max() <= 2
    assert [m.id for m in c.models.list().data] == ["backdrop"]


def test_concurrent_edits_are_batched_and_each_matches_a_solo_run(server, pipe):
    before = parse_histogram(metrics(server), "backdrop_batch_size")
    products = [product(10 + i) for i in range(8)]  # a different product and prompt per request

    def edit(i):
        r = client(server).images.edit(image=("p.png", png(products[i]), "image/png"), prompt=PROMPTS[i],
                                       extra_body={"seed": 100 + i})
        return decode(r.data[0].b64_json)

    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(edit, range(8)))
    after = parse_histogram(metrics(server), "backdrop_batch_size")
    assert after["sum"] - before["sum"] == 8  # every image went through one batch
    assert after["count"] - before["count"] < 8, "8 concurrent edits were not batched"
    assert 0 < scalar(metrics(server), "backdrop_batch_wait_seconds") <= 0.5  # learned, capped by the 500 ms
    for i, out in enumerate(outs):
        solo = pipe.inpaint(Image.fromarray(products[i], "RGBA"), prompt=PROMPTS[i], seed=100 + i, steps=STEPS,
                            progress=False).images[0]
        assert np.abs(out.astype(int) - np.asarray(solo).astype(int)).max() <= 2, f"request {i}"
        assert_kept_exact(out, products[i])


def test_inpaint_endpoint_passes_every_option_to_the_pipeline(server, pipe):
    """/v1/inpaint with a product mask and non-default options equals Pipeline.inpaint with the same arguments."""
    rgba = product(20, size=(48, 80))  # not the native size: exercises the crop and the paste
    image, mask = Image.fromarray(rgba[..., :3]), Image.fromarray(rgba[..., 3])  # product_mask: white = keep
    options = dict(seed=5, strength=0.9, steps=3, sampler="ddim", eta=0.5, guidance_scale=3.0, guidance_rescale=0.3,
                   mask_dilate=0, mask_blur=1.0, crop_padding=4, color_match=True, negative_prompt="blurry",
                   mask_threshold=0.5)
    r = httpx.post(f"{server.url}/v1/inpaint", timeout=120, headers=JSON, content=json.dumps(dict(
        options, image=base64.b64encode(png(image)).decode(), product_mask=base64.b64encode(png(mask)).decode(),
        prompt=PROMPTS[3], n=2)))
    assert r.status_code == 200, r.text[:300]
    outs = [decode(d["b64_json"]) for d in r.json()["data"]]
    solo = pipe.inpaint(image, product_mask=mask, prompt=PROMPTS[3], num_images_per_prompt=2, progress=False,
                        **options).images
    for out, want in zip(outs, solo):
        assert out.shape == (48, 80, 3)
        assert np.abs(out.astype(int) - np.asarray(want).astype(int)).max() <= 2
    plain = pipe.inpaint(image, product_mask=mask, prompt=PROMPTS[3], seed=5, steps=3, progress=False).images[0]
    assert np.abs(outs[0].astype(int) - np.asarray(plain).astype(int)).max() > 10  # the options did something
    r = httpx.post(f"{server.url}/v1/inpaint", timeout=120, headers=JSON, content=inpaint_body(rgba, eta=0.5))
    assert r.status_code == 400 and r.json()["error"]["param"] == "eta"  # eta with the server's sampler (dpmpp-2m)
    assert "sampler='ddim' only" in r.json()["error"]["message"]


def _png_claiming(width: int, height: int) -> bytes:
    """A valid 16x16 PNG whose IHDR is rewritten (CRC fixed) to claim width x height."""
    data = bytearray(png(np.zeros((16, 16, 3), np.uint8)))
    ihdr = 8  # after the PNG signature: length (4), b"IHDR", width, height, ...
    data[ihdr + 8:ihdr + 16] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    data[ihdr + 21:ihdr + 25] = zlib.crc32(bytes(data[ihdr + 4:ihdr + 21])).to_bytes(4, "big")
    return bytes(data)


def test_bad_inputs_get_4xx_and_the_server_keeps_serving(server):
    good = png(product(1))
    url = server.url

    def edit(image=good, mask=None, **data):
        files = {"image": ("i.png", image, "image/png")} | ({"mask": ("m.png", mask, "image/png")} if mask else {})
        return httpx.post(f"{url}/v1/images/edits", files=files, data={"prompt": "x", **data}, timeout=60)

    def post(path, body):
        return httpx.post(f"{url}{path}", content=body if isinstance(body, bytes) else json.dumps(body).encode(),
                          headers=JSON, timeout=60)

    truncated = png(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))[:300]
    cases = [  # (what, response, status, param)
        ("garbage bytes", edit(image=os.urandom(2000)), 400, "image"),
        ("1x1 image", edit(image=png(np.zeros((1, 1, 4), np.uint8))), 400, "image"),
        ("10000x10000 header", edit(image=_png_claiming(10000, 10000)), 400, "image"),
        ("truncated PNG", edit(image=truncated), 400, "image"),
        ("no alpha, no mask", edit(image=png(product(1)[..., :3])), 400, "image"),
        ("wrong mask size", edit(mask=png(np.zeros((32, 32, 4), np.uint8))), 400, "mask"),
        ("mask without alpha", edit(mask=png(np.zeros((64, 64), np.uint8))), 400, "mask"),
        ("n = 0", edit(n="0"), 400, "n"),
        ("n = 11", edit(n="11"), 400, "n"),
        ("n not a number", edit(n="two"), 400, "n"),
        ("n = '1_0'", edit(n="1_0"), 400, "n"),  # form fields: digits only, though int() takes "1_0", " 2 ", "+2"
        ("n = ' 2 '", edit(n=" 2 "), 400, "n"),
        ("seed = '+2'", edit(seed="+2"), 400, "seed"),
        ("unknown size", edit(size="100x100"), 400, "size"),
        ("size not the image's", edit(size="128x128"), 400, "size"),
        ("empty prompt", edit(prompt=""), 400, "prompt"),
        ("blank prompt", edit(prompt="   "), 400, "prompt"),
        ("unknown field", edit(colour="red"), 400, "colour"),
        ("bad response_format", edit(response_format="jpeg"), 400, "response_format"),
        ("edits as JSON", post("/v1/images/edits", {"prompt": "x"}), 400, None),
        ("generations: not JSON", post("/v1/images/generations", b"{nope"), 400, None),
        ("generations: text/plain", httpx.post(f"{url}/v1/images/generations", content=b'{"prompt": "x"}',
                                               headers={"content-type": "text/plain"}), 400, None),
        ("generations: unknown size", post("/v1/images/generations", {"prompt": "x", "size": "64x65"}), 400, "size"),
        ("generations: size not a string", post("/v1/images/generations", {"prompt": "x", "size": [64, 64]}), 400,
         "size"),
        ("generations: nested too deep", post("/v1/images/generations", b"[" * 100000 + b"]" * 100000), 400, None),
        ("generations: lone surrogate", post("/v1/images/generations", b'{"prompt": "a \\ud800"}'), 400, "prompt"),
        ("generations: n = 11", post("/v1/images/generations", {"prompt": "x", "n": 11}), 400, "n"),
        ("generations: no prompt", post("/v1/images/generations", {"n": 1}), 400, "prompt"),
        ("generations: stream", post("/v1/images/generations", {"prompt": "x", "stream": True}), 400, "stream"),
        ("generations: seed 10**400", post("/v1/images/generations", {"prompt": "x", "seed": 10**400}), 400,
         "seed"),  # was a 500: math.isfinite(10**400) overflows
        ("generations: n as a string", post("/v1/images/generations", {"prompt": "x", "n": "2"}), 400, "n"),
        ("generations: transparent background", post("/v1/images/generations", {
            "prompt": "x", "background": "transparent"}), 400, "background"),
        ("inpaint: bad base64", post("/v1/inpaint", {"image": "***", "prompt": "x"}), 400, "image"),
        ("inpaint: base64 with a tab and a *", post("/v1/inpaint", {"image": "iVBO\tRw0*", "prompt": "x"}), 400,
         "image"),
        ("inpaint: steps '1_0'", post("/v1/inpaint", inpaint_body(product(1), steps="1_0")), 400, "steps"),
        ("inpaint: strength as a string", post("/v1/inpaint", inpaint_body(product(1), strength="0.5")), 400,
         "strength"),
        ("inpaint: seed true", post("/v1/inpaint", inpaint_body(product(1), seed=True)), 400, "seed"),
        ("inpaint: paste_back 'false'", post("/v1/inpaint", inpaint_body(product(1), paste_back="false")), 400,
         "paste_back"),
        ("inpaint: timeout 0", post("/v1/inpaint", inpaint_body(product(1), timeout=0)), 400, "timeout"),
        ("inpaint: mask_threshold 0", post("/v1/inpaint", inpaint_body(product(1), mask_threshold=0)), 400,
         "mask_threshold"),
        ("inpaint: timeout -1", post("/v1/inpaint", inpaint_body(product(1), timeout=-1)), 400, "timeout"),
        ("inpaint: mask and product_mask", post("/v1/inpaint", json.loads(inpaint_body(
            product(1), mask="AAAA", product_mask="AAAA"))), 400, "product_mask"),
        ("inpaint: steps 0", post("/v1/inpaint", inpaint_body(product(1), steps=0)), 400, "steps"),
        ("inpaint: strength x steps < 1", post("/v1/inpaint", inpaint_body(product(1), steps=4, strength=0.2)),
         400, "strength"),
        ("inpaint: ddim at 1000 steps", post("/v1/inpaint", inpaint_body(product(1), sampler="ddim", steps=1000)),
         400, "steps"),
        ("inpaint: strength 1.5", post("/v1/inpaint", inpaint_body(product(1), strength=1.5)), 400, "strength"),
        ("inpaint: NaN guidance", post("/v1/inpaint", inpaint_body(product(1)).replace(
            b'"prompt"', b'"guidance_scale": NaN, "prompt"')), 400, "guidance_scale"),
        ("inpaint: unknown sampler", post("/v1/inpaint", inpaint_body(product(1), sampler="plms")), 400, "sampler"),
        ("inpaint: float mask_dilate", post("/v1/inpaint", inpaint_body(product(1), mask_dilate=1.5)), 400,
         "mask_dilate"),
        ("inpaint: wrong product_mask size", post("/v1/inpaint", inpaint_body(
            product(1), product_mask=base64.b64encode(png(np.zeros((48, 64), np.uint8))).decode())), 400,
         "product_mask"),
        ("unknown route", httpx.get(f"{url}/v1/nope"), 404, None),
    ]
    for what, r, status, param in cases:
        assert r.status_code == status, f"{what}: {r.status_code} {r.text[:300]}"
        err = r.json()["error"]
        assert err["message"] and err["type"] == "invalid_request_error" and err["param"] == param, (what, err)

    # 2 GB declared: refused from the header alone, before a byte of the body is read
    status, body = raw_http(server, b"POST /v1/images/edits HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-"
                            b"data; boundary=b\r\nContent-Length: 2147483648\r\n\r\n", b"--b\r\n" * 100)
    assert status == 413 and body["error"]["code"] == "request_too_large"
    # no Content-Length (chunked): counted while read, cut past the 1 MiB limit
    chunk = b"x" * 65536
    status, body = raw_http(server, b"POST /v1/inpaint HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            b"Transfer-Encoding: chunked\r\n\r\n", (b"10000\r\n" + chunk + b"\r\n") * 24)
    assert status == 413 and body["error"]["code"] == "request_too_large"
    # clients that hang up while still sending their body: 499, not a 500 (JSON) or a 400 (multipart)
    for route, kind, start in (("inpaint", b"application/json", b'{"prompt": "'),
                               ("images/edits", b"multipart/form-data; boundary=b",
                                b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\n')):
        raw_http(server, b"POST /v1/" + route.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: " + kind +
                 b"\r\nContent-Length: 100000\r\n\r\n", start + b"x" * 1000, read=False)
    deadline = time.time() + 10
    while metrics(server).count('code="499"') < 2 and time.time() < deadline:
        time.sleep(0.1)
    assert metrics(server).count('code="499"') == 2

    assert httpx.get(f"{url}/healthz").status_code == 200
    text = metrics(server)
    assert 'code="5' not in text, "bad input produced a 5xx"
    r = post("/v1/images/generations", {"prompt": "still serving", "seed": 1})
    assert r.status_code == 200 and decode(r.json()["data"][0]["b64_json"]).shape == (SIZE, SIZE, 3)


def test_wrapped_base64_opaque_background_and_short_error_echoes(server):
    rgba = product(7)
    wrapped = base64.encodebytes(png(rgba)).decode()  # 76-column lines, as the `base64` tool and MIME write them
    assert "\n" in wrapped
    r = httpx.post(f"{server.url}/v1/inpaint", headers=JSON, timeout=120, content=json.dumps(
        {"image": wrapped, "prompt": "a table", "background": "opaque", "seed": 1}))
    assert r.status_code == 200, r.text[:300]
    assert_kept_exact(decode(r.json()["data"][0]["b64_json"]), rgba)
    huge = "x" * 100_000  # an error quotes the first few dozen characters of a value, not the value
    for body in ({"prompt": "x", "size": huge}, {"prompt": "x", "response_format": huge}, {"prompt": "x", "n": huge},
                 {"prompt": "x", huge: 1}):
        r = httpx.post(f"{server.url}/v1/images/generations", headers=JSON, content=json.dumps(body))
        err = r.json()["error"]
        assert r.status_code == 400 and len(r.text) < 400 and "xxx…" in err["message"], r.text[:500]
    assert err["param"] == "x" * 59 + "…"  # the unknown parameter's name, cut the same way


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


def test_a_request_that_fails_the_model_fails_alone_not_its_batch(pipe, caplog):
    failing = FailsOn(pipe, "bad")
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
    solo = pipe.generate(["good c"], seed=[0], steps=1, progress=False).images[0]
    np.testing.assert_array_equal(np.asarray(reqs[2].results[0]), np.asarray(solo))
    assert "running each request alone" in caplog.text


def asgi_status(app, method: str, path: str, headers: list[tuple[bytes, bytes]]) -> int:
    """Call an ASGI app in this process, with no HTTP server in front of it; the response's status."""
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"", "headers": headers,
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    asyncio.run(app(scope, receive, send))
    return sent[0]["status"]


def test_refusals_before_any_endpoint_are_counted_in_metrics(server, pipe):
    """The 413 for a declared Content-Length and routing's 404 and 405 never reach an endpoint's handler; /metrics
    counts them all the same, labelled by the route their path names, or "other" (never the raw path)."""
    series = [("inpaint", "413"), ("other", "404"), ("inpaint", "405")]

    def counts():
        text = metrics(server)
        return [scalar(text, f'backdrop_requests_total{{endpoint="{e}",code="{c}"}}') for e, c in series]
    before = counts()
    status, body = raw_http(server, b"POST /v1/inpaint HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            b"Content-Length: 2147483648\r\n\r\n")
    assert status == 413 and body["error"]["code"] == "request_too_large"
    assert httpx.get(f"{server.url}/v1/nope/1234").status_code == 404
    r = httpx.get(f"{server.url}/v1/inpaint")
    assert r.status_code == 405 and r.headers["allow"] == "POST", r.headers  # as Starlette's own 405
    assert r.json()["error"]["code"] == "method_not_allowed"
    assert [b - a for a, b in zip(before, counts())] == [1, 1, 1]
    assert "nope" not in metrics(server)
    # an unreadable Content-Length: uvicorn answers it itself (400, plain text) before the app sees the request;
    # other ASGI servers may pass it on, so the app's own 400 is checked by calling the app directly
    engine = Engine(pipe, EngineConfig(), warmup=False)
    app = create_app(engine, ServerConfig(steps=STEPS))
    assert asgi_status(app, "POST", "/v1/inpaint", [(b"content-length", b"12a")]) == 400
    assert engine.metrics.requests.value(endpoint="inpaint", code="400") == 1


def test_queue_full_429_retry_deadline_504_and_disconnect(pipe):
    """One image at a time, one queued at most. A 1000-step request with a short `timeout` holds the worker."""
    srv = _start(pipe, EngineConfig(max_batch_size=1, max_queue_delay_ms=0, max_queue=1, request_timeout=60),
                 ServerConfig(steps=1))
    try:
        url = f"{srv.url}/v1/inpaint"
        results = {}

        def background(name, body):
            results[name] = httpx.post(url, content=body, headers=JSON, timeout=60)
            return results[name]

        def hold_worker(timeout):
            t = threading.Thread(target=background, args=("blocker", inpaint_body(product(2), steps=1000,
                                                                                  timeout=timeout)))
            t.start()
            _wait(lambda: scalar(m := metrics(srv), "backdrop_requests_in_flight") == 1
                  and scalar(m, "backdrop_queue_depth") == 0, 30, "the worker to take the blocker")
            return t

        # a client that disconnects while queued is dropped from the queue (and never run)
        blocker = hold_worker(timeout=4)
        body = inpaint_body(product(3))
        with socket.create_connection((srv.host, srv.port)) as s:
            s.sendall(b"POST /v1/inpaint HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
                      + str(len(body)).encode() + b"\r\n\r\n" + body)
            _wait(lambda: scalar(metrics(srv), "backdrop_queue_depth") == 1, 30, "the request to be queued")
        _wait(lambda: scalar(m := metrics(srv), "backdrop_queue_depth") == 0 and scalar(
            m, 'backdrop_requests_total{endpoint="inpaint",code="499"}') == 1, 10, "the disconnect to be noticed")
        assert blocker.is_alive(), "the blocker finished before the cancelled request left the queue"
        blocker.join()
        r = results["blocker"]  # past its deadline while running: 504, and the batch is interrupted
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout", r.text

        # a full queue answers 429 + Retry-After; the openai client waits that long and its retry succeeds
        blocker = hold_worker(timeout=2)
        queued = threading.Thread(target=background, args=("queued", inpaint_body(product(4))))
        queued.start()
        _wait(lambda: scalar(metrics(srv), "backdrop_queue_depth") == 1, 30, "the queue to fill")
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


def test_cli_serve_drains_in_flight_work_on_sigterm(model_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "backdrop", "serve", str(model_dir), "--port", str(port),
                             "--steps", "2", "--device", "cpu", "--dtype", "fp32", "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def ready():
            assert proc.poll() is None, proc.stdout.read()
            try:
                return httpx.get(f"{url}/readyz").status_code == 200
            except httpx.TransportError:
                return False
        _wait(ready, 120, "the server to be ready")
        result = {}
        t = threading.Thread(target=lambda: result.update(r=httpx.post(
            f"{url}/v1/inpaint", content=inpaint_body(product(6), steps=40, seed=1), headers=JSON, timeout=120)))
        t.start()
        _wait(lambda: scalar(httpx.get(f"{url}/metrics").text, "backdrop_requests_in_flight") == 1, 30, "in flight")
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(httpx.TransportError):  # no new connections while draining
            httpx.get(f"{url}/healthz")
        t.join(120)
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


def test_cli_errors_are_one_line(capsys, tmp_path, model_dir):
    assert cli_main(["serve", str(model_dir), "--sampler", "ddim", "--steps", "1000"]) == 2  # refused before serving
    assert "--steps 1000" in capsys.readouterr().err
    assert cli_main(["serve", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    assert cli_main(["serve", str(tmp_path), "--max-queue", "0"]) == 2
    assert "--max-queue" in capsys.readouterr().err
    assert cli_main(["serve", str(tmp_path), "--port", "70000"]) == 2
    assert cli_main(["serve", str(model_dir), "--device", "gpu"]) == 2
    assert "--device 'gpu' is not a device name" in capsys.readouterr().err


def test_warm_up_covers_every_graph_bucket_on_cuda_only():
    from backdrop.serve.engine import warm_up_batches

    assert warm_up_batches("cpu", 8) == [1]
    assert warm_up_batches("cuda", 8) == [1, 2, 4, 8]
    assert warm_up_batches("cuda", 6) == [1, 2, 4, 6]   # 6 images pad to the 8-image graph, captured by its own call
    assert warm_up_batches("cuda", 1) == [1]


def test_cuda_graph_unet_buckets_pad_and_slice(pipe):
    """On the CPU the wrapper pads to its batch bucket and runs eagerly: rows must equal the direct call's,
    whatever stale rows the static buffers hold from earlier calls."""
    unet = pipe.backend.unet
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
def test_cuda_graph_replay_matches_eager(model_dir):
    gpu = Pipeline.from_pretrained(model_dir, device="cuda", dtype=torch.float16)
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
