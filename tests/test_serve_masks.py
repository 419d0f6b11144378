"""The server reads a request's masks and schedule as the Python API does (a random tiny inpainting model on
127.0.0.1): the same kept pixels and the same "unchanged" answer for a mask at any level, and a sampler the model
cannot start refused with a 400 before it is queued, where it failed its whole batch."""
import base64
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from backdrop.diffusion.pipeline import Pipeline
from backdrop.serve.engine import EngineConfig
from backdrop.serve.server import ServerConfig

from serve_helpers import JSON, SIZE, STEPS, decode, png, save_tiny_inpaint_model, start_server


@pytest.fixture(scope="module")
def server(serve_pipe):
    srv = start_server(serve_pipe, EngineConfig(max_batch_size=2, max_queue_delay_ms=10, request_timeout=120),
                       ServerConfig(steps=STEPS))
    yield srv
    srv.stop()


def b64(array) -> str:
    return base64.b64encode(png(array)).decode()


def test_a_product_mask_at_any_level_keeps_what_the_python_api_keeps(server, serve_pipe):
    """A product mask of 254 and 255 (nearly all kept) became an 8-bit repaint mask of 1/255 and 0, which the
    Pipeline read again as a 0/1 label map: the server repainted the 254 half whole (205 levels off, 1 through the
    API), and with mask_threshold 0.5 it repainted while answering "unchanged": true."""
    image = np.random.default_rng(3).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    keep = np.full((SIZE, SIZE), 255, np.uint8)
    keep[:, :SIZE // 2] = 254
    for cut, unchanged in ((None, None), (0.5, True)):
        body = dict(image=b64(image), product_mask=b64(keep), prompt="a table", seed=1, mask_threshold=cut)
        r = httpx.post(f"{server.url}/v1/inpaint", headers=JSON, content=json.dumps(body), timeout=120)
        assert r.status_code == 200 and r.json()["data"][0].get("unchanged") is unchanged, (cut, r.text)
        got = decode(r.json()["data"][0]["b64_json"]).astype(int)
        want = serve_pipe.inpaint(image, product_mask=Image.fromarray(keep), prompt="a table", seed=1, steps=STEPS,
                                  mask_threshold=cut, progress=False)
        assert np.abs(got - np.asarray(want.images[0], int)).max() <= 2  # the README's server-vs-API tolerance
        assert np.abs(got - image).max() <= (1 if cut is None else 0), cut
        assert want.unchanged == ([0] if unchanged else [])


def test_an_sd_mask_without_options_and_at_the_threshold_is_read_as_the_python_api_reads_it(server, serve_pipe):
    """mask= (white = repaint) with no mask_blur takes the API's default feather (4 px); a white mask at
    mask_threshold 1.0 repaints (>= the threshold), and is not answered "unchanged"."""
    image = np.random.default_rng(4).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[8:40, 16:56] = 255
    for cut in (None, 1.0):
        body = dict(image=b64(image), mask=b64(mask), prompt="a shelf", seed=2, mask_threshold=cut)
        r = httpx.post(f"{server.url}/v1/inpaint", headers=JSON, content=json.dumps(body), timeout=120)
        assert r.status_code == 200 and "unchanged" not in r.json()["data"][0], (cut, r.text)
        want = serve_pipe.inpaint(image, mask=Image.fromarray(mask), prompt="a shelf", seed=2, steps=STEPS,
                                  mask_threshold=cut, progress=False).images[0]
        got = decode(r.json()["data"][0]["b64_json"]).astype(int)
        assert np.abs(got - np.asarray(want, int)).max() <= 2 and np.abs(got - image).max() > 10, cut


def test_a_sampler_the_model_cannot_start_is_a_400(tmp_path_factory):
    """An epsilon model with zero terminal SNR cannot start DDIM, DDPM or LCM (sigma = inf): the request passed the
    handler's checks and failed inside its batch, a 500 model_error (and every request beside it was run again)."""
    folder = save_tiny_inpaint_model(tmp_path_factory.mktemp("zero-snr") / "model")
    config = folder / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "rescale_betas_zero_snr": True,
                                  "timestep_spacing": "trailing"}))
    pipe = Pipeline.from_pretrained(folder, device="cpu", dtype="fp32")
    srv = start_server(pipe, EngineConfig(max_batch_size=1), ServerConfig(steps=STEPS))
    try:
        image, mask = np.zeros((SIZE, SIZE, 3), np.uint8), np.zeros((SIZE, SIZE), np.uint8)
        mask[:, :SIZE // 2] = 255
        for sampler, status in (("ddim", 400), ("lcm", 400), ("euler", 200)):
            body = dict(image=b64(image), mask=b64(mask), prompt="x", sampler=sampler)
            r = httpx.post(f"{srv.url}/v1/inpaint", headers=JSON, content=json.dumps(body), timeout=120)
            assert r.status_code == status, (sampler, r.text)
            if status == 400:
                error = r.json()["error"]
                assert error["param"] == "sampler" and "zero terminal SNR" in error["message"]
    finally:
        srv.stop()


def test_a_custom_schedule_is_the_python_apis(server, serve_pipe):
    """timesteps / sigmas (a list or "ays") run the Pipeline's custom schedule; a bad one is a 400 naming it."""
    image = np.random.default_rng(5).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[8:40, 16:56] = 255
    for custom in (dict(timesteps=[999, 600, 200]), dict(sigmas=[14.6, 2.0, 0.3, 0.0], sampler="euler"),
                   dict(timesteps="ays", strength=0.5)):
        body = dict(image=b64(image), mask=b64(mask), prompt="a shelf", seed=3, **custom)
        r = httpx.post(f"{server.url}/v1/inpaint", headers=JSON, content=json.dumps(body), timeout=120)
        assert r.status_code == 200, (custom, r.text)
        want = serve_pipe.inpaint(image, mask=Image.fromarray(mask), prompt="a shelf", seed=3, progress=False,
                                  **custom).images[0]
        got = decode(r.json()["data"][0]["b64_json"]).astype(int)
        assert np.abs(got - np.asarray(want, int)).max() <= 2, custom
    plain = serve_pipe.inpaint(image, mask=Image.fromarray(mask), prompt="a shelf", seed=3, steps=3,
                               progress=False).images[0]
    assert np.abs(got - np.asarray(plain, int)).max() > 10  # the schedule did something
    for custom, param, said in [
            (dict(timesteps=[200, 600]), "timesteps", "timesteps= must be strictly descending"),
            (dict(sigmas="ays"), "sigmas", "dpmpp-2m takes no custom sigmas="),
            (dict(timesteps=[999, 500, 1], steps=5), "steps", "steps 5, but timesteps has 3 steps: give one of them"),
            (dict(timesteps=999), "timesteps", "timesteps must be a list of at most 150 steps (--max-steps) or a "
                                               "schedule name (ays), got 999"),
            (dict(timesteps=list(range(999, 0, -5))), "timesteps", "a list of at most 150 steps"),
            (dict(timesteps=list(range(999, 848, -1))), "timesteps", "a list of at most 150 steps"),  # 151
            (dict(sigmas=[10.0 - i / 20 for i in range(152)]), "sigmas", "a list of at most 150 steps"),  # N + 1
            (dict(timesteps=[999, 2], strength=0.2), "strength", "leaves no step to run")]:
        body = dict(image=b64(image), mask=b64(mask), prompt="a shelf", **custom)
        r = httpx.post(f"{server.url}/v1/inpaint", headers=JSON, content=json.dumps(body), timeout=120)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (custom, r.text)
        assert said in r.json()["error"]["message"], r.text
    assert httpx.get(f"{server.url}/healthz").status_code == 200
