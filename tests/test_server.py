"""The HTTP server end to end on a random tiny inpainting model, on 127.0.0.1, CPU only.

The official `openai` client runs images.edit / images.generate / models against it, with every OpenAI field this
server accepts; concurrent edits share batches (read back from /metrics) and each equals the same request run alone
through the Pipeline with the same seed, with the product's pixels returned bit-identical; /v1/inpaint passes every
option through; bad input of every kind, and OpenAI values this server cannot honour, get their 4xx naming the field
and the server keeps serving; refusals made before any endpoint are counted in /metrics; 504s tell the openai client
not to retry, 429s let it. The engine under
failure and load, the serve CLI and the CUDA-graph wrapper: test_serve_engine.py.
"""
import asyncio
import base64
import io
import json
import os
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from backdrop.serve.cli import model_id
from backdrop.serve.engine import Engine, EngineConfig, Item, ServeKey
from backdrop.serve.metrics import parse_histogram
from backdrop.serve.server import ServerConfig, create_app

openai = pytest.importorskip("openai")
from serve_helpers import (JSON, PROMPTS, SIZE, STEPS, assert_kept_exact, client, decode,  # noqa: E402
                           inpaint_body, metrics, png, product, raw_http, scalar, start_server)

pytestmark = [pytest.mark.usefixtures("one_thread"),  # conftest.py
              pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                         "ignore::UserWarning", "ignore::PIL.Image.DecompressionBombWarning")]


@pytest.fixture(scope="module")
def server(serve_pipe):
    srv = start_server(serve_pipe, EngineConfig(max_batch_size=8, max_queue_delay_ms=500, max_queue=32,
                                          request_timeout=120), ServerConfig(steps=STEPS, max_body_bytes=2**20))
    yield srv
    srv.stop()


# ------------------------------------------------------------------------------------------------- tests

# every field the openai client may send that this server accepts without an effect, at values it allows
EDIT_NO_EFFECT = dict(stream=False, partial_images=0, output_compression=100, output_format="png", background="opaque",
                      quality="high", input_fidelity="low", complexity="low", model="gpt-image-1", user="u",
                      safety_identifier="s")
GENERATE_NO_EFFECT = dict(stream=False, partial_images=0, output_compression=100, output_format="png",
                          background="auto", quality="hd", style="natural", moderation="low", complexity="high",
                          model="dall-e-3", user="u", safety_identifier="s")


def test_openai_client_edit_and_generate(server, serve_pipe):
    rgba = product(0)
    c = client(server)
    r = c.images.edit(image=("product.png", png(rgba), "image/png"), prompt=PROMPTS[0], n=2, size="64x64",
                      extra_body={"seed": 7}, **EDIT_NO_EFFECT)  # multipart: stream=false, partial_images=0, ...
    assert [d.model_extra["seed"] for d in r.data] == [7, 8]
    assert (r.size, r.background, r.output_format, r.usage) == ("64x64", "opaque", "png", None)
    outs = [decode(d.b64_json) for d in r.data]
    assert outs[0].shape == (SIZE, SIZE, 3) and not np.array_equal(outs[0], outs[1])  # two seeds, two backdrops
    for out in outs:
        assert_kept_exact(out, rgba)
    odd = product(4, size=(48, 80))  # any image size is served; `size` may repeat it even when not a preset
    r = c.images.edit(image=("odd.png", png(odd), "image/png"), prompt=PROMPTS[0], size="80x48")
    assert_kept_exact(decode(r.data[0].b64_json), odd)
    assert r.size == "80x48"  # W x H

    r = c.images.generate(prompt=PROMPTS[1], size="128x64", response_format="url", extra_body={"seed": 3},
                          **GENERATE_NO_EFFECT)
    assert r.data[0].url.startswith(server.url + "/v1/files/")
    assert (r.size, r.background, r.output_format, r.data[0].revised_prompt) == ("128x64", "opaque", "png", None)
    got = np.asarray(Image.open(io.BytesIO(httpx.get(r.data[0].url).content)).convert("RGB")).astype(int)
    want = np.asarray(serve_pipe.generate(PROMPTS[1], height=64, width=128, seed=3, steps=STEPS,
                                          progress=False).images[0])
    assert got.shape == (64, 128, 3)
    assert np.abs(got - want).max() <= 2
    # a prompt over CLIP's 77 tokens: revised_prompt says what the model read
    r = c.images.generate(prompt="A glass bottle " * 40 + "on a red velvet sofa", n=2)
    assert [d.revised_prompt for d in r.data] == [" ".join(["a glass bottle"] * 25)] * 2

    models = c.models.list().data
    assert [m.id for m in models] == ["backdrop"] and models[0].object == "model"
    assert abs(models[0].created - time.time()) < 3600 and models[0].owned_by == "backdrop"
    assert c.models.retrieve("backdrop") == models[0]
    with pytest.raises(openai.NotFoundError) as e:
        c.models.retrieve("gpt-image-1")
    assert (e.value.code, e.value.param) == ("model_not_found", "model") and "gpt-image-1" in e.value.message


def test_model_id_is_a_name_not_the_servers_path(tmp_path, monkeypatch, serve_model_dir):
    assert model_id(str(serve_model_dir)) == serve_model_dir.name
    monkeypatch.chdir(serve_model_dir)
    assert model_id(".") == model_id("./") == serve_model_dir.name
    (tmp_path / "sd15-inpaint.safetensors").write_bytes(b"")
    assert model_id(str(tmp_path / "sd15-inpaint.safetensors")) == "sd15-inpaint"
    assert model_id("backdrop-tiny") == "backdrop-tiny"  # a built-in model's name: no such path here


def test_concurrent_edits_are_batched_and_each_matches_a_solo_run(server, serve_pipe):
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
        solo = serve_pipe.inpaint(Image.fromarray(products[i], "RGBA"), prompt=PROMPTS[i], seed=100 + i, steps=STEPS,
                            progress=False).images[0]
        assert np.abs(out.astype(int) - np.asarray(solo).astype(int)).max() <= 2, f"request {i}"
        assert_kept_exact(out, products[i])


def test_inpaint_endpoint_passes_every_option_to_the_pipeline(server, serve_pipe):
    """/v1/inpaint with a product mask and non-default options equals Pipeline.inpaint with the same arguments."""
    rgba = product(20, size=(48, 80))  # not the native size: exercises the crop and the paste
    image, mask = Image.fromarray(rgba[..., :3]), Image.fromarray(rgba[..., 3])  # product_mask: white = keep
    options = dict(seed=5, strength=0.9, steps=3, sampler="ddim", eta=0.5, guidance_scale=3.0, guidance_rescale=0.3,
                   mask_dilate=0, mask_blur=1.0, crop_padding=4, color_match=True, negative_prompt="blurry",
                   mask_threshold=0.5, clip_skip=1)
    r = httpx.post(f"{server.url}/v1/inpaint", timeout=120, headers=JSON, content=json.dumps(dict(
        options, image=base64.b64encode(png(image)).decode(), product_mask=base64.b64encode(png(mask)).decode(),
        prompt=PROMPTS[3], n=2)))
    assert r.status_code == 200, r.text[:300]
    outs = [decode(d["b64_json"]) for d in r.json()["data"]]
    solo = serve_pipe.inpaint(image, product_mask=mask, prompt=PROMPTS[3], num_images_per_prompt=2, progress=False,
                        **options).images
    for out, want in zip(outs, solo):
        assert out.shape == (48, 80, 3)
        assert np.abs(out.astype(int) - np.asarray(want).astype(int)).max() <= 2
    plain = serve_pipe.inpaint(image, product_mask=mask, prompt=PROMPTS[3], seed=5, steps=3, progress=False).images[0]
    assert np.abs(outs[0].astype(int) - np.asarray(plain).astype(int)).max() > 10  # the options did something
    r = httpx.post(f"{server.url}/v1/inpaint", timeout=120, headers=JSON, content=inpaint_body(rgba, eta=0.5))
    assert r.status_code == 400 and r.json()["error"]["param"] == "eta"  # eta with the server's sampler (dpmpp-2m)
    assert "sampler='ddim' only" in r.json()["error"]["message"]
    for bad in (99, "1", True):
        r = httpx.post(f"{server.url}/v1/inpaint", timeout=120, headers=JSON, content=inpaint_body(rgba, clip_skip=bad))
        assert r.status_code == 400 and r.json()["error"]["param"] == "clip_skip", r.text
        assert "None" not in r.json()["error"]["message"]  # JSON's null, not Python's None


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
        ("mask half transparent", edit(mask=png(np.full((64, 64, 4), 128, np.uint8))), 400, "mask"),  # none alpha 0
        ("n = 0", edit(n="0"), 400, "n"),
        ("n = 11", edit(n="11"), 400, "n"),
        ("n not a number", edit(n="two"), 400, "n"),
        ("n = '1_0'", edit(n="1_0"), 400, "n"),  # form fields: digits only, though int() takes "1_0", " 2 ", "+2"
        ("n = ' 2 '", edit(n=" 2 "), 400, "n"),
        ("seed = '+2'", edit(seed="+2"), 400, "seed"),
        ("seed sent as a file", httpx.post(f"{url}/v1/images/edits", data={"prompt": "x"}, timeout=60, files={
            "image": ("i.png", good, "image/png"), "seed": ("s.txt", b"12", "text/plain")}), 400, "seed"),
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
        assert "UploadFile" not in err["message"], (what, err)  # a file where a value belongs: said so, no repr

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


def test_openai_values_this_server_cannot_honour_are_refused_naming_the_field(server):
    """Streaming, non-PNG output, transparency and values the openai client would not send: 400s naming the field,
    with their code and a message that says why; edits with nothing transparent; a mask's errors call it mask."""
    url, good = server.url, png(product(1))
    opaque = product(1)
    opaque[..., 3] = 255  # RGBA, but no pixel transparent: nothing marks what to edit

    def edit(files=None, **data):
        files = files if files is not None else [("image", ("i.png", good, "image/png"))]
        return httpx.post(f"{url}/v1/images/edits", files=files, data={"prompt": "x", **data}, timeout=60)

    def with_mask(mask):
        return edit([("image", ("i.png", good, "image/png")), ("mask", ("m.png", mask, "image/png"))])
    only_mask = [("mask", ("m.png", good, "image/png"))]  # a file part, so that httpx sends multipart

    def generate(**fields):
        return httpx.post(f"{url}/v1/images/generations", headers=JSON, timeout=60,
                          content=json.dumps({"prompt": "x", **fields}))

    cases = [  # (what, response, param, code, words in the message)
        ("edits: stream=true", edit(stream="true"), "stream", "unsupported_value", "streaming is not supported"),
        ("edits: stream=TRUE", edit(stream="TRUE"), "stream", "unsupported_value", "streaming is not supported"),
        ("edits: stream=yes", edit(stream="yes"), "stream", "invalid_value", "true or false"),
        ("generations: stream", generate(stream=True), "stream", "unsupported_value", "streaming is not supported"),
        ("generations: stream 'false'", generate(stream="false"), "stream", "invalid_value", "true or false"),
        ("edits: partial_images=1", edit(partial_images="1"), "partial_images", "unsupported_value",
         "streaming (partial_images) is not supported"),
        ("generations: partial_images 3", generate(partial_images=3), "partial_images", "unsupported_value",
         "streaming (partial_images) is not supported"),
        ("generations: partial_images 0.5", generate(partial_images=0.5), "partial_images", "invalid_value",
         "an integer"),
        ("edits: output_compression=50", edit(output_compression="50"), "output_compression", "unsupported_value",
         "applies to jpeg and webp"),
        ("generations: output_compression 0", generate(output_compression=0), "output_compression",
         "unsupported_value", "returns PNG"),
        ("generations: output_compression 99.5", generate(output_compression=99.5), "output_compression",
         "invalid_value", "an integer"),
        ("generations: output_compression 101", generate(output_compression=101), "output_compression",
         "invalid_value", "[0, 100]"),
        ("edits: output_format=jpeg", edit(output_format="jpeg"), "output_format", "unsupported_value", "PNG"),
        ("generations: output_format bmp", generate(output_format="bmp"), "output_format", "invalid_value", "PNG"),
        ("generations: transparent background", generate(background="transparent"), "background",
         "unsupported_value", "opaque"),
        ("generations: quality bogus", generate(quality="bogus"), "quality", "invalid_value", "low, medium, high"),
        ("edits: quality=hd (generations only)", edit(quality="hd"), "quality", "invalid_value", "standard"),
        ("generations: style", generate(style="weird"), "style", "invalid_value", "vivid, natural"),
        ("edits: style (generations only)", edit(style="vivid"), "style", "unknown_parameter", "unknown"),
        ("generations: moderation", generate(moderation="none"), "moderation", "invalid_value", "low, auto"),
        ("edits: input_fidelity", edit(input_fidelity="medium"), "input_fidelity", "invalid_value", "high, low"),
        ("generations: input_fidelity (edits only)", generate(input_fidelity="high"), "input_fidelity",
         "unknown_parameter", "unknown"),
        ("edits: complexity", edit(complexity="extreme"), "complexity", "invalid_value", "low, medium, high"),
        ("generations: model 123", generate(model=123), "model", "invalid_value", "must be a string"),
        ("generations: user []", generate(user=[]), "user", "invalid_value", "must be a string"),
        ("inpaint: quality (use steps)", httpx.post(f"{url}/v1/inpaint", headers=JSON, timeout=60, content=inpaint_body(
            product(1), quality="high")), "quality", "unknown_parameter", "unknown"),
        ("inpaint: output_format webp", httpx.post(f"{url}/v1/inpaint", headers=JSON, timeout=60, content=inpaint_body(
            product(1), output_format="webp")), "output_format", "unsupported_value", "PNG"),
        ("edits: RGBA image, nothing transparent", edit([("image", ("i.png", png(opaque), "image/png"))]), "image",
         "invalid_image", "nothing marks what to edit"),
        ("edits: mask, nothing transparent", with_mask(png(opaque)), "mask", "invalid_mask",
         "nothing marks what to edit"),
        ("edits: mask of another size", with_mask(png(np.zeros((32, 32, 4), np.uint8))), "mask", "invalid_mask",
         "mask is 32x32 (HxW) but the image is 64x64"),
        ("edits: mask without alpha", with_mask(png(np.zeros((64, 64, 3), np.uint8))), "mask", "invalid_mask",
         "mask[0]: PIL mode 'RGB' has no alpha channel"),
        ("edits: image as a text field", edit(only_mask, image="abc"), "image", "invalid_image",
         "image must be a file part, got a text field"),
        ("edits: no image", edit(only_mask), "image", "invalid_image", "image is required"),
        ("edits: 5 images", edit([("image[]", (f"{i}.png", good, "image/png")) for i in range(5)]), "image",
         "invalid_image", "one image file is accepted per edit, got 5"),
    ]
    for what, r, param, code, words in cases:
        assert r.status_code == 400, f"{what}: {r.status_code} {r.text[:300]}"
        err = r.json()["error"]
        assert (err["param"], err["code"]) == (param, code) and words in err["message"], (what, err)
        assert "image[0]" not in err["message"] and "mask: image" not in err["message"], (what, err)


def test_timeouts_say_do_not_retry_and_full_queues_let_the_client_retry(serve_pipe):
    """A 504 carries x-should-retry: false, or the openai client would queue the same work twice more; a 429 does
    not: its Retry-After is the point. No worker is started, so what is queued stays queued until abandoned."""
    engine = Engine(serve_pipe, EngineConfig(max_queue=1), warmup=False)
    app = create_app(engine, ServerConfig(steps=STEPS))

    async def post(body: bytes) -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://backdrop") as c:
            return await c.post("/v1/inpaint", content=body, headers=JSON, timeout=60)
    held = engine.submit(ServeKey("generate", SIZE, SIZE, STEPS, "dpmpp-2m", "backdrop"), [Item("x", 0)],
                         lambda: None)  # the queue's one place
    full = asyncio.run(post(inpaint_body(product(1))))
    assert full.status_code == 429 and int(full.headers["retry-after"]) >= 1, full.text
    assert full.json()["error"]["type"] == "rate_limit_error"  # OpenAI's type for it
    assert "x-should-retry" not in full.headers
    engine.abandon(held)
    late = asyncio.run(post(inpaint_body(product(1), timeout=0.05)))
    assert late.status_code == 504 and late.json()["error"]["code"] == "timeout", late.text
    assert late.headers["x-should-retry"] == "false"


def test_wrapped_base64_opaque_background_and_short_error_echoes(server):
    rgba = product(7)
    wrapped = base64.encodebytes(png(rgba)).decode()  # 76-column lines, as the `base64` tool and MIME write them
    assert "\n" in wrapped
    r = httpx.post(f"{server.url}/v1/inpaint", headers=JSON, timeout=120, content=json.dumps(
        {"image": wrapped, "prompt": "a table", "background": "opaque", "output_format": "png", "seed": 1}))
    assert r.status_code == 200, r.text[:300]
    assert_kept_exact(decode(r.json()["data"][0]["b64_json"]), rgba)
    huge = "x" * 100_000  # an error quotes the first few dozen characters of a value, not the value
    for body in ({"prompt": "x", "size": huge}, {"prompt": "x", "response_format": huge}, {"prompt": "x", "n": huge},
                 {"prompt": "x", huge: 1}):
        r = httpx.post(f"{server.url}/v1/images/generations", headers=JSON, content=json.dumps(body))
        err = r.json()["error"]
        assert r.status_code == 400 and len(r.text) < 400 and "xxx…" in err["message"], r.text[:500]
    assert err["param"] == "x" * 59 + "…"  # the unknown parameter's name, cut the same way


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


def test_refusals_before_any_endpoint_are_counted_in_metrics(server, serve_pipe):
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
    engine = Engine(serve_pipe, EngineConfig(), warmup=False)
    app = create_app(engine, ServerConfig(steps=STEPS))
    assert asgi_status(app, "POST", "/v1/inpaint", [(b"content-length", b"12a")]) == 400
    assert engine.metrics.requests.value(endpoint="inpaint", code="400") == 1


def test_a_stalled_body_gets_408_and_steps_have_an_operators_cap(server, serve_pipe):
    """A client that sends its headers and then nothing (a stalled upload, slowloris) held its connection and file
    descriptor forever: after --body-timeout it gets 408. A /v1/inpaint request may not ask more than --max-steps
    (one request's cost holds back every client batched with it)."""
    engine = Engine(serve_pipe, EngineConfig(), warmup=False)
    app = create_app(engine, ServerConfig(steps=STEPS, body_timeout=0.2))
    sent = []

    async def stalled():
        await asyncio.Event().wait()  # never a byte

    async def send(message):
        sent.append(message)
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/inpaint", "raw_path": b"/v1/inpaint", "root_path": "", "query_string": b"",
             "headers": [(b"content-type", b"application/json"), (b"content-length", b"100000")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    asyncio.run(asyncio.wait_for(app(scope, stalled, send), 10))
    assert sent[0]["status"] == 408 and b"--body-timeout" in sent[1]["body"]
    r = httpx.post(f"{server.url}/v1/inpaint", content=inpaint_body(np.zeros((SIZE, SIZE, 4), np.uint8), steps=151),
                   headers=JSON)
    assert r.status_code == 400 and r.json()["error"]["param"] == "steps", r.text
    with pytest.raises(ValueError, match="ServerConfig.steps"):
        ServerConfig(steps=200)  # above the default max_steps



def test_inpaint_says_when_nothing_was_repainted_and_answers_carry_the_inputs_profile(server):
    """An opaque RGBA image without a mask marks nothing (400, as edits answer); a mask with nothing to repaint
    returns the input flagged "unchanged"; an input's RGB ICC profile comes back in every PNG, so the kept product
    looks the same in a colour-managed viewer, not only its bytes."""
    from PIL import ImageCms

    rgba = product(31)
    opaque = rgba.copy()
    opaque[..., 3] = 255
    r = httpx.post(f"{server.url}/v1/inpaint", timeout=120, headers=JSON, content=inpaint_body(opaque))
    assert r.status_code == 400 and r.json()["error"]["param"] == "image"
    assert "no transparent pixel" in r.json()["error"]["message"]
    black = base64.b64encode(png(np.zeros(rgba.shape[:2], np.uint8))).decode()
    r = httpx.post(f"{server.url}/v1/inpaint", timeout=120, headers=JSON, content=json.dumps(dict(
        image=base64.b64encode(png(rgba[..., :3])).decode(), mask=black, prompt=PROMPTS[0], n=2)))
    assert r.status_code == 200 and [d["unchanged"] for d in r.json()["data"]] == [True, True]
    assert np.array_equal(decode(r.json()["data"][0]["b64_json"]), rgba[..., :3])
    faint = base64.b64encode(png(np.full(rgba.shape[:2], 100, np.uint8))).decode()  # nothing, once binarised
    for cut, flagged in ((0.5, True), (0.3, None)):
        r = httpx.post(f"{server.url}/v1/inpaint", timeout=120, headers=JSON, content=json.dumps(dict(
            image=base64.b64encode(png(rgba[..., :3])).decode(), mask=faint, prompt=PROMPTS[0], mask_threshold=cut)))
        assert r.status_code == 200 and r.json()["data"][0].get("unchanged") is flagged, cut
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    tagged = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(tagged, "PNG", icc_profile=srgb)
    r = httpx.post(f"{server.url}/v1/inpaint", timeout=120, headers=JSON, content=json.dumps(dict(
        image=base64.b64encode(tagged.getvalue()).decode(), prompt=PROMPTS[0], seed=1)))
    assert r.status_code == 200 and "unchanged" not in r.json()["data"][0]
    assert Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))).info["icc_profile"] == srgb
    c = client(server)
    edit = c.images.edit(image=("p.png", tagged.getvalue(), "image/png"), prompt=PROMPTS[0])
    assert Image.open(io.BytesIO(base64.b64decode(edit.data[0].b64_json))).info["icc_profile"] == srgb
