"""The onnxruntime backend's own promises, on a tiny random model exported twice (fp32 with dynamic sizes; fp16 at a
fixed 64x128): a refit takes effect in an fp16 graph too; an export's precision and fixed size are refused, not
ignored, when a call asks for others, and a fixed-size export generates at its size by default (a server on it
serves that size); any image size runs as with torch, and an older export padding to 64 px says so.
"""
import copy

import numpy as np
import pytest
import torch
from PIL import Image

from backdrop.diffusion.pipeline import Pipeline
from backdrop.export import onnx as E
from backdrop.export.ort_backend import OnnxRuntimeBackend
from backdrop.nn.checkpoint import init_model

pytestmark = [pytest.mark.usefixtures("one_thread"),  # conftest.py
              pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                         "ignore::UserWarning")]

STATIC = (64, 128)  # (H, W) px of the fixed-size export


@pytest.fixture(scope="module")
def exports(tmp_path_factory, one_thread):
    """(model, {"fp32": dynamic fp32 folder, "fp16": fp16 folder fixed at STATIC})."""
    model, root = init_model("tiny", seed=1), tmp_path_factory.mktemp("exports")
    return model, {"fp32": E.export_onnx(model, root / "fp32", progress=False),
                   "fp16": E.export_onnx(model, root / "fp16", dtype="fp16", static_hw=STATIC, progress=False)}


def test_refit_takes_effect_in_an_fp16_graph(exports):
    """ONNX Runtime's ORT_ENABLE_ALL ignored the weight overrides of an fp16 graph on the CPU: the refit returned
    and the UNet kept its old weights."""
    model, folders = exports
    backend = OnnxRuntimeBackend(folders["fp16"])
    inputs = E.sample_inputs(backend.export.specs["unet"], model.config, 2, (8, 16), seed=5)
    before = backend.unet(*inputs.values())
    merged, g = copy.deepcopy(model.unet), torch.Generator().manual_seed(0)
    with torch.no_grad():  # W + B A, rank 4, on every attention projection: a merged LoRA
        for name, p in merged.named_parameters():
            if name.endswith(("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")):
                p += 0.1 * torch.randn(p.shape[0], 4, generator=g) @ torch.randn(4, p.shape[1], generator=g)
        want = merged(*inputs.values())
    effect = (want - before).abs().max().item()
    assert effect > 1e-2
    backend.refit("unet", merged.state_dict())
    # fp16 rounding of the merged model only: 0.11 x the LoRA's effect here (torch's own fp16 UNet: 0.16 x); with the
    # overrides ignored, the output stays the base's (1 x)
    assert (backend.unet(*inputs.values()) - want).abs().max().item() < 0.25 * effect
    backend.refit("unet")
    assert torch.equal(backend.unet(*inputs.values()), before)


def test_an_exports_precision_is_fixed_not_ignored(exports):
    folder = exports[1]["fp32"]
    assert OnnxRuntimeBackend(folder, dtype=torch.float32).dtype == torch.float32  # its own: fine
    with pytest.raises(ValueError, match="computes in fp32, not float16; .* --dtype"):
        OnnxRuntimeBackend(folder, dtype=torch.float16)
    with pytest.raises(ValueError, match="computes in fp16, not bfloat16"):
        Pipeline.from_pretrained(exports[1]["fp16"], backend="onnxruntime", dtype="bf16")


def test_a_fixed_size_export_runs_its_size_by_default_and_refuses_others_in_pixels(exports):
    pipe = Pipeline(OnnxRuntimeBackend(exports[1]["fp16"]))
    assert pipe.backend.static_hw == STATIC
    out = pipe.generate("a red mug", steps=1, seed=0, output_type="np", progress=False).images
    assert out.shape == (1, *STATIC, 3)  # not the model's native 64x64
    near = pipe.generate("a red mug", height=60, width=125, steps=1, seed=0, output_type="np", progress=False)
    assert near.images.shape == (1, 60, 125, 3)  # padded to the export's size, cropped back
    said = r"64x64 \(HxW\) px: this export runs 64x128 images only \(it was made with --size 64x128\)"
    with pytest.raises(ValueError, match=said):
        pipe.generate("a red mug", height=64, width=64, steps=1, progress=False)
    image, mask = Image.new("RGB", (64, 64), "gray"), Image.new("L", (64, 64), 255)
    with pytest.raises(ValueError, match=said):
        pipe.inpaint(image, mask=mask, prompt="a red mug", steps=1, progress=False)
    crop = pipe.inpaint(Image.new("RGB", (200, 90), "gray"), mask=Image.new("L", (200, 90), 255), prompt="a mug",
                        crop_padding=8, steps=1, seed=0, output_type="np", progress=False)
    assert crop.images.shape == (1, 90, 200, 3) and np.isfinite(crop.images).all()  # "only masked": its crop size


def test_a_server_on_a_fixed_size_export_serves_that_size_and_refuses_others_as_400(exports):
    import asyncio

    import httpx

    from backdrop.serve.engine import Engine, EngineConfig
    from backdrop.serve.server import ServerConfig, create_app
    from serve_helpers import JSON, inpaint_body, product

    engine = Engine(Pipeline(OnnxRuntimeBackend(exports[1]["fp16"])), EngineConfig(max_queue_delay_ms=0),
                    warmup=False)
    engine.start()
    try:
        transport = httpx.ASGITransport(app=create_app(engine, ServerConfig(steps=1)))

        async def post(path: str, **kw) -> httpx.Response:
            async with httpx.AsyncClient(transport=transport, base_url="http://backdrop") as c:
                return await c.post(path, timeout=120, **kw)
        auto = asyncio.run(post("/v1/images/generations", json={"prompt": "a mug"}))
        square = asyncio.run(post("/v1/images/generations", json={"prompt": "a mug", "size": "64x64"}))
        small = asyncio.run(post("/v1/inpaint", content=inpaint_body(product(1)), headers=JSON))
    finally:
        engine.close(60)
    assert auto.status_code == 200 and auto.json()["size"] == "128x64", auto.text  # W x H: the export's size
    assert square.status_code == 400 and "use auto or one of 128x64" in square.json()["error"]["message"]
    err = small.json()["error"]
    assert small.status_code == 400 and (err["param"], err["code"]) == ("image", "invalid_size"), small.text
    assert "64x64 (HxW) px: this export runs 64x128 images only" in err["message"]


def test_any_image_size_runs_as_with_torch_and_older_exports_pad_with_a_warning(exports, tmp_path, caplog):
    """72x72 px is a 9x9 latent: the exported UNet lands its up path on the odd skips as torch does, so the same
    seed gives the same image. An export made before that (its manifest's UNet `multiple` 8) runs 128x128 and crops,
    and says so once."""
    import json
    import shutil

    from backdrop.export.backends import TorchBackend

    model, folders = exports
    kw = dict(prompt="a red mug", height=72, width=72, steps=2, seed=3, output_type="np", progress=False)
    want = Pipeline(TorchBackend(model, device="cpu", dtype=torch.float32)).generate(**kw).images
    assert np.abs(Pipeline(OnnxRuntimeBackend(folders["fp32"])).generate(**kw).images - want).max() <= 2e-3
    older = shutil.copytree(folders["fp32"], tmp_path / "older")
    manifest = json.loads((older / "backdrop_export.json").read_text())
    manifest["components"]["unet"]["multiple"] = 8
    (older / "backdrop_export.json").write_text(json.dumps(manifest))
    pipe = Pipeline(OnnxRuntimeBackend(older))
    with caplog.at_level("WARNING", logger="backdrop.diffusion.pipeline"):
        for _ in range(2):
            assert pipe.generate(**kw).images.shape == (1, 72, 72, 3)
    [record] = caplog.records  # once per size
    assert "72x72 (HxW) px runs as 128x128 on this onnxruntime backend" in record.getMessage()


def test_from_pretrained_passes_an_export_backends_own_options(exports):
    """Optimum's ORT pipelines take provider= and session options at from_pretrained; ours take the backend's."""
    pipe = Pipeline.from_pretrained(exports[1]["fp32"], backend="onnxruntime", providers=("cpu",), threads=1)
    assert pipe.backend.threads == 1 and pipe.backend.providers == ["CPUExecutionProvider"]
    with pytest.raises(ValueError, match=r"providers \['cuda'\] need a CUDA device"):
        Pipeline.from_pretrained(exports[1]["fp32"], backend="onnxruntime", device="cpu", providers=("cuda",))
    with pytest.raises(TypeError, match=r"the torch backend takes no backend options, got \['threads'\]"):
        Pipeline.from_pretrained("backdrop-tiny", threads=1)
