"""ControlNet in `backdrop serve` (serve/control.py), on the random tiny inpainting model with random ControlNets, on
127.0.0.1, CPU only: a /v1/inpaint request with control_image equals Pipeline.inpaint with the same seed, control image
and options (one ControlNet, or two with a list); concurrent requests with different control images and the same
options share a batch, other options do not; every bad control field gets a 400 naming it (and the OpenAI endpoints,
which cannot carry a control image, point to /v1/inpaint) while the server keeps serving; `backdrop serve
--controlnet` sets the ControlNets before the warm-up and refuses a non-torch backend or a missing path in one line."""
import base64
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from backdrop.cli import build_parser
from backdrop.cli import main as cli_main
from backdrop.diffusion.pipeline import Pipeline
from backdrop.nn.config import PRESETS
from backdrop.serve.engine import EngineConfig, controlnet_count
from backdrop.serve.metrics import parse_histogram
from backdrop.serve.server import ServerConfig

diffusers = pytest.importorskip("diffusers")
from pipeline_helpers import controlnet_folder, edges  # noqa: E402
from serve_helpers import (JSON, PROMPTS, STEPS, assert_kept_exact, decode, inpaint_body, metrics, png,  # noqa: E402
                           product, start_server)

pytestmark = [pytest.mark.usefixtures("one_thread"),  # conftest.py
              pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                         "ignore::UserWarning")]

def tuned(ref) -> None:
    """randomize_'s weights, tuned so that the image, the scale and the window each show: the embedding gave out its
    biases, hardly the control image, and residuals so large that the UNet's norms made any scale above 0.3 look
    the same."""
    for name, p in ref.controlnet_cond_embedding.named_parameters():
        p.mul_(3) if name.endswith("weight") else p.zero_()
    for p in [*ref.controlnet_down_blocks.parameters(), *ref.controlnet_mid_block.parameters()]:
        p.mul_(0.02)


def net_folder(folder, seed: int, **unet_changes) -> str:
    """A random ControlNet folder for the tiny inpainting model: its UNet's shape with the 4 latent channels."""
    return controlnet_folder(replace(PRESETS["tiny-inpaint"].unet, in_channels=4, **unet_changes), folder, seed, tuned)


def b64(image) -> str:
    return base64.b64encode(image if isinstance(image, bytes) else png(image)).decode()


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-controlnet")
    return {"a": net_folder(root / "a", 5), "b": net_folder(root / "b", 6),
            "wrong": net_folder(root / "wrong", 7, cross_attention_dim=48)}


def serve(model_dir, controlnet):
    pipe = Pipeline.from_pretrained(model_dir, device="cpu", dtype=torch.float32, controlnet=controlnet)
    # a lone request's wait for company is learned down from 1 s: a new batch key waits the whole second
    srv = start_server(pipe, EngineConfig(max_batch_size=8, max_queue_delay_ms=1000, request_timeout=120),
                       ServerConfig(steps=STEPS))  # start_server waits for /readyz: the warm-up ran the ControlNets
    return pipe, srv


@pytest.fixture(scope="module")
def one(serve_model_dir, nets):
    """(Pipeline, server) with ControlNet a."""
    pipe, srv = serve(serve_model_dir, nets["a"])
    yield pipe, srv
    srv.stop()


@pytest.fixture(scope="module")
def two(serve_model_dir, nets):
    """(Pipeline, server) with ControlNets a and b."""
    pipe, srv = serve(serve_model_dir, [nets["a"], nets["b"]])
    yield pipe, srv
    srv.stop()


def inpaint(srv, rgba, **fields) -> httpx.Response:
    return httpx.post(f"{srv.url}/v1/inpaint", content=inpaint_body(rgba, **fields), headers=JSON, timeout=120)


def image_of(r: httpx.Response) -> np.ndarray:
    assert r.status_code == 200, r.text[:300]
    return decode(r.json()["data"][0]["b64_json"])


def solo(pipe, rgba, **options) -> np.ndarray:
    """The same request through the Python API."""
    return np.asarray(pipe.inpaint(Image.fromarray(rgba, "RGBA"), prompt="a table", steps=STEPS, progress=False,
                                   **options).images[0])


def assert_close(out: np.ndarray, want: np.ndarray, rgba: np.ndarray):
    assert np.abs(out.astype(int) - want.astype(int)).max() <= 2
    assert_kept_exact(out, rgba)


def test_a_request_with_control_image_equals_the_pipeline(one):
    pipe, srv = one
    rgba, control = product(0), edges(1, 40, 56)  # the control image need not have the image's size
    out = image_of(inpaint(srv, rgba, seed=3, control_image=b64(control)))
    assert_close(out, solo(pipe, rgba, seed=3, control_image=control), rgba)  # the default scale: inpaint's 0.5
    for options in (dict(controlnet_conditioning_scale=1.0), dict(control_guidance_start=0.5),  # not the 1st step
                    dict(control_guidance_end=0.4), dict(guess_mode=True)):  # end: no step (the last one shows little)
        got = image_of(inpaint(srv, rgba, seed=3, control_image=b64(control), **options))
        assert_close(got, solo(pipe, rgba, seed=3, control_image=control, **options), rgba)
        assert np.abs(got.astype(int) - out.astype(int)).max() > 10, options  # it reached the Pipeline
    other = image_of(inpaint(srv, rgba, seed=3, control_image=b64(edges(2))))
    assert np.abs(other.astype(int) - out.astype(int)).max() > 10  # and so did the control image


def test_two_controlnets_take_a_list_in_their_order(two):
    pipe, srv = two
    rgba, controls = product(1), [edges(3), edges(4, 48, 48)]
    options = dict(controlnet_conditioning_scale=[0.7, 1.2], control_guidance_end=[1.0, 0.5])
    out = image_of(inpaint(srv, rgba, seed=4, control_image=[b64(c) for c in controls], **options))
    assert_close(out, solo(pipe, rgba, seed=4, control_image=controls, **options), rgba)
    swapped = image_of(inpaint(srv, rgba, seed=4, control_image=[b64(c) for c in controls[::-1]], **options))
    assert np.abs(swapped.astype(int) - out.astype(int)).max() > 10


def test_concurrent_requests_with_different_control_images_share_a_batch(one):
    pipe, srv = one
    rgbas, controls = [product(10), product(11), product(12)], [edges(10), edges(11), edges(12)]
    scales = [0.7, 0.7, 0.9]  # the first two agree (one batch), the third has its own key (its own batch)
    before = parse_histogram(metrics(srv), "backdrop_batch_size")

    def request(i):
        return image_of(inpaint(srv, rgbas[i], prompt=PROMPTS[i], seed=20 + i, control_image=b64(controls[i]),
                                controlnet_conditioning_scale=scales[i]))

    with ThreadPoolExecutor(3) as pool:
        outs = list(pool.map(request, range(3)))
    after = parse_histogram(metrics(srv), "backdrop_batch_size")
    assert after["sum"] - before["sum"] == 3
    assert after["count"] - before["count"] == 2, "the two requests that agree were not batched, or the third joined"
    for i, out in enumerate(outs):
        want = np.asarray(pipe.inpaint(Image.fromarray(rgbas[i], "RGBA"), prompt=PROMPTS[i], seed=20 + i,
                                       steps=STEPS, control_image=controls[i], controlnet_conditioning_scale=scales[i],
                                       progress=False).images[0])
        assert_close(out, want, rgbas[i])


def refused(r: httpx.Response, param: str, says: str = ""):
    assert r.status_code == 400, (param, r.text[:300])
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    assert says in error["message"], error["message"]


def test_bad_control_fields_get_400_naming_them_and_the_server_keeps_serving(one, two, serve_model_dir):
    rgba, good = product(2), b64(edges(5))
    _, srv = one
    refused(inpaint(srv, rgba), "control_image", "this server runs a ControlNet: give control_image")
    refused(inpaint(srv, rgba, control_image=b64(b"\x89PNG not really")), "control_image", "not a readable")
    refused(inpaint(srv, rgba, control_image="%%%"), "control_image", "not valid base64")
    refused(inpaint(srv, rgba, control_image=b64(np.zeros((8, 8, 3), np.uint8))), "control_image", "at least 16")
    refused(inpaint(srv, rgba, control_image=[good, good]), "control_image", "give one base64 image, got a list of 2")
    refused(inpaint(srv, rgba, control_image=3), "control_image", "base64 string")
    for name, value in (("controlnet_conditioning_scale", "1"), ("controlnet_conditioning_scale", 1e9),
                        ("controlnet_conditioning_scale", [0.5, 0.5]), ("controlnet_conditioning_scale", [None]),
                        ("control_guidance_start", 1.5), ("control_guidance_end", -0.1), ("guess_mode", "yes")):
        refused(inpaint(srv, rgba, control_image=good, **{name: value}), name)
    refused(inpaint(srv, rgba, control_image=good, control_guidance_start=0.6, control_guidance_end=0.4),
            "control_guidance_start", "must be below control_guidance_end")
    edit = httpx.post(f"{srv.url}/v1/images/edits", files={"image": ("p.png", png(rgba), "image/png")},
                      data={"prompt": "x"}, timeout=60)
    refused(edit, "control_image", "use POST /v1/inpaint with control_image")
    generate = httpx.post(f"{srv.url}/v1/images/generations", content=json.dumps({"prompt": "x"}), headers=JSON,
                          timeout=60)
    refused(generate, "control_image", "use POST /v1/inpaint with control_image")
    image_of(inpaint(srv, rgba, control_image=good))  # still serving

    _, srv = two
    refused(inpaint(srv, rgba, control_image=good), "control_image", "give a list of 2 base64 images")
    refused(inpaint(srv, rgba, control_image=[good] * 3), "control_image", "got a list of 3")
    refused(inpaint(srv, rgba, control_image=[good, b64(b"nope")]), "control_image", "control_image[1] is not")
    refused(inpaint(srv, rgba, control_image=[good, good], control_guidance_start=[0.0, 0.1, 0.2]),
            "control_guidance_start", "3 values for this server's 2 ControlNets")
    image_of(inpaint(srv, rgba, control_image=[good, good]))


def test_a_server_without_controlnet_refuses_control_fields(serve_model_dir):
    pipe, srv = serve(serve_model_dir, None)
    try:
        rgba = product(3)
        refused(inpaint(srv, rgba, control_image=b64(edges(6))), "control_image", "this server runs no ControlNet")
        refused(inpaint(srv, rgba, guess_mode=False), "guess_mode", "this server runs no ControlNet")
        assert_close(image_of(inpaint(srv, rgba, seed=9)), solo(pipe, rgba, seed=9), rgba)
        edit = httpx.post(f"{srv.url}/v1/images/edits", files={"image": ("p.png", png(rgba), "image/png")},
                          data={"prompt": "x"}, timeout=60)
        assert edit.status_code == 200, edit.text[:300]
    finally:
        srv.stop()


def test_serve_cli_sets_the_controlnets_and_refuses_bad_ones_in_one_line(capsys, tmp_path, serve_model_dir, nets):
    from backdrop.serve.cli import _load

    args = build_parser().parse_args(["serve", str(serve_model_dir), "--device", "cpu", "--dtype", "fp32",
                                      "--controlnet", nets["a"], "--controlnet", nets["b"]])
    engine = _load(args, EngineConfig())
    assert controlnet_count(engine.pipe) == 2 and engine.pipe.controlnet[1].cfg.unet.cross_attention_dim == 64
    engine._warm_up()  # a black control image per ControlNet

    def fails(*options) -> str:
        assert cli_main(["serve", str(serve_model_dir), "--port", "0", *options]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "Traceback" not in err, err
        return err

    assert "--controlnet needs --backend torch, not onnxruntime" in fails("--backend", "onnxruntime",
                                                                          "--controlnet", nets["a"])
    assert f"--controlnet {tmp_path / 'gone'}: no such file or folder" in fails("--controlnet", str(tmp_path / "gone"))
    assert f"--controlnet {nets['wrong']}: " in fails("--controlnet", nets["a"], "--controlnet", nets["wrong"])
    assert "does not fit this model" in fails("--controlnet", nets["wrong"])
