"""IP-Adapter in `backdrop serve` (serve/image_prompt.py and its lines in server.py, engine.py, cuda_graphs.py,
ray_serve.py), the edges test_serve_ip_adapter.py does not pin: the error codes of every refusal, the image prompt's
pixel limit, n > 1 images per request each with the image prompt, the CUDA-graph pipeline keeping the IP-Adapter,
and build_app handing ip_adapter / ip_adapter_scale to every replica."""
import base64

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from backdrop.diffusion.pipeline import Pipeline
from backdrop.serve import image_prompt
from backdrop.serve.engine import EngineConfig
from backdrop.serve.inputs import UNSUPPORTED, APIError
from backdrop.serve.server import ServerConfig

diffusers = pytest.importorskip("diffusers")
from serve_helpers import JSON, STEPS, assert_kept_exact, decode, inpaint_body, png, product, start_server  # noqa: E402
from test_ip_adapter import WEIGHTS, ip_adapter_folder, style_image  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"),  # conftest.py
              pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                         "ignore::UserWarning")]

LIMIT = 64 * 80  # the server's max_image_pixels: the 64x64 product passes, an 80x80 image prompt does not


def b64(image) -> str:
    return base64.b64encode(image if isinstance(image, bytes) else png(image)).decode()


def api_error(call) -> APIError:
    with pytest.raises(APIError) as raised:
        call()
    return raised.value


def test_image_prompt_fields_and_their_error_codes():
    field = image_prompt.IP_FIELD
    data = png(style_image(4))
    assert image_prompt.ip_field({field: b64(data)}, True) == data
    assert image_prompt.ip_field({}, False) is None and image_prompt.decode_ip_image(None, LIMIT) is None
    image_prompt.refuse_openai(False, "/v1/images/edits")  # no IP-Adapter: OpenAI's endpoints serve
    for call, code, says in [
            (lambda: image_prompt.refuse_openai(True, "/v1/images/edits"), UNSUPPORTED,
             "/v1/images/edits cannot carry one: use POST /v1/inpaint with ip_adapter_image"),
            (lambda: image_prompt.ip_field({field: b64(data)}, False), "invalid_value", "runs no IP-Adapter"),
            (lambda: image_prompt.ip_field({field: ""}, False), "invalid_value", "runs no IP-Adapter"),
            (lambda: image_prompt.ip_field({}, True), "invalid_image", "give ip_adapter_image"),
            (lambda: image_prompt.ip_field({field: "%%%"}, True), None, "not valid base64"),
            (lambda: image_prompt.decode_ip_image(png(style_image(4, size=(80, 80))), LIMIT), None, "")]:
        error = api_error(call)
        assert (error.status, error.param) == (400, field), error.message
        assert code is None or error.code == code, (error.code, error.message)
        assert says in error.message, error.message
    assert image_prompt.decode_ip_image(data, LIMIT).size == (32, 32)


@pytest.fixture(scope="module")
def served(serve_model_dir, tmp_path_factory):
    pipe = Pipeline.from_pretrained(serve_model_dir, device="cpu", dtype=torch.float32)
    folder = ip_adapter_folder(tmp_path_factory.mktemp("serve-ip-edges"), pipe.backend.model.unet, seed=5)
    pipe.load_ip_adapter(str(folder / "models"), subfolder="", weight_name=WEIGHTS)
    srv = start_server(pipe, EngineConfig(max_batch_size=4, max_queue_delay_ms=50, request_timeout=120),
                       ServerConfig(steps=STEPS, max_image_pixels=LIMIT))
    yield pipe, srv
    srv.stop()


def inpaint(srv, rgba, **fields) -> httpx.Response:
    return httpx.post(f"{srv.url}/v1/inpaint", content=inpaint_body(rgba, **fields), headers=JSON, timeout=120)


def test_every_image_of_a_request_gets_its_image_prompt(served):
    pipe, srv = served
    rgba, reference = product(3), style_image(6)
    r = inpaint(srv, rgba, n=2, seed=7, ip_adapter_image=b64(reference))
    assert r.status_code == 200, r.text[:300]
    outs = [decode(d["b64_json"]) for d in r.json()["data"]]
    want = pipe.inpaint(Image.fromarray(rgba, "RGBA"), prompt="a table", steps=STEPS, progress=False, seed=7,
                        num_images_per_prompt=2, ip_adapter_image=reference).images
    for out, w in zip(outs, want, strict=True):
        assert np.abs(out.astype(int) - np.asarray(w).astype(int)).max() <= 2
        assert_kept_exact(out, rgba)


def test_an_image_prompt_over_the_pixel_limit_gets_400(served):
    _, srv = served
    r = inpaint(srv, product(2), ip_adapter_image=b64(style_image(4, size=(80, 80))))
    assert r.status_code == 400 and r.json()["error"]["param"] == "ip_adapter_image", r.text[:300]


def test_the_cuda_graph_pipeline_keeps_the_ip_adapter(served):
    from backdrop.serve.cuda_graphs import with_cuda_graphs

    pipe = served[0]

    class OnCuda:  # the CPU backend, saying it runs on CUDA: with_cuda_graphs wraps it (nothing is captured here)
        name, device = "torch", "cuda"

        def __getattr__(self, attr):
            return getattr(pipe.backend, attr)

    fake = Pipeline(OnCuda())
    fake._ip = pipe._ip
    graphed = with_cuda_graphs(fake)
    assert graphed is not fake and graphed.ip_adapter_loaded and graphed._ip is pipe._ip


def test_build_app_hands_the_ip_adapter_to_every_replica(monkeypatch):
    serve = pytest.importorskip("ray.serve")
    from backdrop.serve.ray_serve import app_builder

    bound = {}

    class Deployment:
        def options(self, **options):
            return self

        def bind(self, *args):
            bound["args"] = args
            return args

    monkeypatch.setattr(serve, "deployment", lambda **kw: lambda cls: Deployment())
    monkeypatch.setattr(serve, "ingress", lambda *a: lambda cls: cls)
    app_builder({"model": "m", "ip_adapter": "ip.safetensors", "ip_adapter_scale": "0.6"})
    options = bound["args"][-1]
    assert (options["ip_adapter"], options["ip_adapter_scale"]) == ("ip.safetensors", 0.6)
    app_builder({"model": "m"})
    assert (bound["args"][-1]["ip_adapter"], bound["args"][-1]["ip_adapter_scale"]) == (None, 1.0)
