"""IP-Adapter in `backdrop serve` (serve/image_prompt.py), on the random tiny inpainting model with a random IP-Adapter,
on 127.0.0.1, CPU only: a /v1/inpaint request with ip_adapter_image equals Pipeline.inpaint with the same seed and
image prompt; concurrent requests with different image prompts share one batch, each with its own; every bad image
prompt gets a 400 naming the field (and the OpenAI endpoints, which cannot carry one, point to /v1/inpaint) while the
server keeps serving; a server without an IP-Adapter refuses the field; `backdrop serve --ip-adapter` loads it at
--ip-adapter-scale and refuses a missing file, another backend or a bad scale in one line."""
import base64
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from backdrop.cli import build_parser
from backdrop.cli import main as cli_main
from backdrop.diffusion.pipeline import Pipeline
from backdrop.serve.engine import EngineConfig
from backdrop.serve.metrics import parse_histogram
from backdrop.serve.server import ServerConfig

diffusers = pytest.importorskip("diffusers")
from serve_helpers import (JSON, PROMPTS, STEPS, assert_kept_exact, decode, inpaint_body, metrics, png,  # noqa: E402
                           product, start_server)
from test_ip_adapter import WEIGHTS, ip_adapter_folder, style_image  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"),  # conftest.py
              pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                         "ignore::UserWarning")]


@pytest.fixture(scope="module")
def weights(serve_model_dir, tmp_path_factory):
    """The path of a random IP-Adapter .safetensors for the served model (its image_encoder folder beside it)."""
    unet = Pipeline.from_pretrained(serve_model_dir, device="cpu", dtype=torch.float32).backend.model.unet
    return ip_adapter_folder(tmp_path_factory.mktemp("serve-ip"), unet, seed=3) / "models" / WEIGHTS


def serve(model_dir, weights=None, scale=1.0):
    pipe = Pipeline.from_pretrained(model_dir, device="cpu", dtype=torch.float32)
    if weights is not None:
        pipe.load_ip_adapter(str(weights.parent), subfolder="", weight_name=weights.name)
        pipe.set_ip_adapter_scale(scale)
    # a lone request's wait for company is learned down from 1 s: a new batch key waits the whole second
    srv = start_server(pipe, EngineConfig(max_batch_size=8, max_queue_delay_ms=1000, request_timeout=120),
                       ServerConfig(steps=STEPS))  # start_server waits for /readyz: the warm-up ran the image encoder
    return pipe, srv


@pytest.fixture(scope="module")
def served(serve_model_dir, weights):
    pipe, srv = serve(serve_model_dir, weights, scale=0.8)
    yield pipe, srv
    srv.stop()


def b64(image) -> str:
    return base64.b64encode(image if isinstance(image, bytes) else png(image)).decode()


def inpaint(srv, rgba, **fields) -> httpx.Response:
    return httpx.post(f"{srv.url}/v1/inpaint", content=inpaint_body(rgba, **fields), headers=JSON, timeout=120)


def image_of(r: httpx.Response) -> np.ndarray:
    assert r.status_code == 200, r.text[:300]
    return decode(r.json()["data"][0]["b64_json"])


def solo(pipe, rgba, prompt="a table", **options) -> np.ndarray:
    """The same request through the Python API."""
    return np.asarray(pipe.inpaint(Image.fromarray(rgba, "RGBA"), prompt=prompt, steps=STEPS, progress=False,
                                   **options).images[0])


def assert_close(out: np.ndarray, want: np.ndarray, rgba: np.ndarray):
    assert np.abs(out.astype(int) - want.astype(int)).max() <= 2
    assert_kept_exact(out, rgba)


def test_a_request_with_an_image_prompt_equals_the_pipeline(served):
    pipe, srv = served
    rgba, reference = product(0), style_image(9, size=(40, 56))  # any size: the image encoder resizes it
    out = image_of(inpaint(srv, rgba, seed=3, ip_adapter_image=b64(reference)))
    assert_close(out, solo(pipe, rgba, seed=3, ip_adapter_image=reference), rgba)
    other = image_of(inpaint(srv, rgba, seed=3, ip_adapter_image=b64(style_image(4))))
    assert np.abs(other.astype(int) - out.astype(int)).max() > 10  # the image prompt reached the Pipeline


def test_concurrent_requests_with_different_image_prompts_share_a_batch(served):
    pipe, srv = served
    rgbas, references = [product(10), product(11), product(12)], [style_image(10), style_image(11), style_image(12)]
    before = parse_histogram(metrics(srv), "backdrop_batch_size")

    def request(i):
        return image_of(inpaint(srv, rgbas[i], prompt=PROMPTS[i], seed=20 + i, ip_adapter_image=b64(references[i])))

    with ThreadPoolExecutor(3) as pool:
        outs = list(pool.map(request, range(3)))
    after = parse_histogram(metrics(srv), "backdrop_batch_size")
    assert (after["sum"] - before["sum"], after["count"] - before["count"]) == (3, 1), "not one batch of three"
    for i, out in enumerate(outs):
        assert_close(out, solo(pipe, rgbas[i], PROMPTS[i], seed=20 + i, ip_adapter_image=references[i]), rgbas[i])


def refused(r: httpx.Response, param: str, says: str = ""):
    assert r.status_code == 400, (param, r.text[:300])
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    assert says in error["message"], error["message"]


def test_bad_image_prompts_get_400_naming_them_and_the_server_keeps_serving(served, serve_model_dir):
    rgba, field = product(2), "ip_adapter_image"
    _, srv = served
    refused(inpaint(srv, rgba), field, "this server runs an IP-Adapter: give ip_adapter_image")
    refused(inpaint(srv, rgba, ip_adapter_image=b64(b"\x89PNG not really")), field, "not a readable")
    refused(inpaint(srv, rgba, ip_adapter_image="%%%"), field, "not valid base64")
    refused(inpaint(srv, rgba, ip_adapter_image=b64(np.zeros((8, 8, 3), np.uint8))), field, "at least 16")
    refused(inpaint(srv, rgba, ip_adapter_image=[b64(style_image())]), field, "base64 string")
    edit = httpx.post(f"{srv.url}/v1/images/edits", files={"image": ("p.png", png(rgba), "image/png")},
                      data={"prompt": "x"}, timeout=60)
    refused(edit, field, "use POST /v1/inpaint with ip_adapter_image")
    generate = httpx.post(f"{srv.url}/v1/images/generations", content=json.dumps({"prompt": "x"}), headers=JSON,
                          timeout=60)
    refused(generate, field, "use POST /v1/inpaint with ip_adapter_image")
    image_of(inpaint(srv, rgba, ip_adapter_image=b64(style_image())))  # still serving

    pipe, plain = serve(serve_model_dir)
    try:
        refused(inpaint(plain, rgba, ip_adapter_image=b64(style_image())), field, "this server runs no IP-Adapter")
        assert_close(image_of(inpaint(plain, rgba, seed=9)), solo(pipe, rgba, seed=9), rgba)
    finally:
        plain.stop()


def test_serve_cli_loads_the_ip_adapter_and_refuses_bad_options_in_one_line(capsys, tmp_path, serve_model_dir,
                                                                             weights):
    from backdrop.serve.cli import _load

    args = build_parser().parse_args(["serve", str(serve_model_dir), "--device", "cpu", "--dtype", "fp32",
                                      "--ip-adapter", str(weights), "--ip-adapter-scale", "0.25"])
    engine = _load(args, EngineConfig())
    assert engine.pipe.ip_adapter_loaded and {link.scale for link in engine.pipe._ip[1].values()} == {0.25}
    engine._warm_up()  # through the image encoder, with a black image prompt

    def fails(*options) -> str:
        assert cli_main(["serve", str(serve_model_dir), "--port", "0", *options]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "Traceback" not in err, err
        return err

    assert "--ip-adapter needs --backend torch, not onnxruntime" in fails("--backend", "onnxruntime",
                                                                          "--ip-adapter", str(weights))
    assert f"--ip-adapter {tmp_path / 'gone'}: no such file" in fails("--ip-adapter", str(tmp_path / "gone"))
    assert "--ip-adapter-scale -1 must be finite and >= 0" in fails("--ip-adapter", str(weights),
                                                                    "--ip-adapter-scale", "-1")
    lonely = tmp_path / "lonely.safetensors"  # no image_encoder folder beside it
    lonely.write_bytes(weights.read_bytes())
    assert f"--ip-adapter {lonely}: " in fails("--ip-adapter", str(lonely))
