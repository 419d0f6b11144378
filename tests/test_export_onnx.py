"""ONNX export and the onnxruntime backend, on tiny random models in SD1 (inpainting) and SD2 shapes (the SD2 one
with a mask-conditioned, asymmetric VAE: its decoder graph takes the inpainting image and mask too).

Parity: each exported graph equals its torch module on fresh random inputs (batches and sizes other than the
traced ones); the onnxruntime Pipeline equals the torch Pipeline (same seeds) at batch 1 and 3 from one export
folder copied elsewhere (so the folder is self-contained); refit through the export's weight map gives a LoRA-merged
UNet's outputs and then the base's again, exactly. Refusals: a graph checked against a different module, a
tolerance no graph meets, and an op ONNX cannot express raise ExportError and write nothing; shapes the graphs
cannot run are ValueErrors naming the graph and the dim. Also: an fp16 graph runs in ONNX Runtime on the CPU;
the >2 GB path (weights held out of onnxslim, external data) works at tiny size; BACKDROP_KERNELS=triton in the
environment does not reach the trace; the CLI writes a folder and reports errors in one line. The mask-conditioned
decoder equals torch's with a condition and without one (a zero image under an all-ones mask), and a condition for
a plain VAE's export is refused as VAE.decode refuses it.
"""
import copy
import dataclasses
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from backdrop.diffusion.pipeline import Pipeline
from backdrop.export import onnx as E
from backdrop.export.backends import TorchBackend, make_backend
from backdrop.export.ort_backend import OnnxRuntimeBackend
from backdrop.export.tensorrt import RefitError
from backdrop.nn.checkpoint import init_model, save_model
from backdrop.nn.config import PRESETS

pytestmark = [pytest.mark.usefixtures("one_thread"),  # conftest.py
              pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                         "ignore::UserWarning")]

TOL_NP = 2e-3  # max abs on [0, 1] "np" images: float32 reordering between runtimes, well under 1/255


def _sd2_tiny():
    """SD2's shapes at tiny size: OpenCLIP-style text (gelu, pad "!" = 0), Linear proj_in/out, per-level head
    counts, v-prediction, and a plain 4-channel UNet (the SD1 model is the 9-channel inpainting one); its VAE is a
    mask-conditioned one (AsymmetricAutoencoderKL) with a wider, deeper decoder than its encoder."""
    t = PRESETS["tiny"]
    vae = dataclasses.replace(t.vae, mask_conditioned=True, decoder_block_out_channels=(32, 64, 64, 64),
                              decoder_layers_per_block=2)
    return dataclasses.replace(t, text=dataclasses.replace(t.text, hidden_act="gelu", pad_token_id=0),
                               unet=dataclasses.replace(t.unet, use_linear_projection=True, num_heads=(1, 2, 4, 4)),
                               vae=vae, prediction_type="v_prediction")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, one_thread):
    """{"sd1": (model, export folder), "sd2": ...}: each exported once, every graph checked on the spot."""
    out = {}
    for name, cfg in {"sd1": PRESETS["tiny-inpaint"], "sd2": _sd2_tiny()}.items():
        model = init_model(cfg, seed=1)
        out[name] = (model, E.export_onnx(model, tmp_path_factory.mktemp(name) / "onnx", progress=False))
    return out


def _errors(got: np.ndarray, want: torch.Tensor) -> tuple[float, float]:
    return E.measure(got, want.detach().numpy())


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_every_graph_equals_torch(exported, name):
    model, folder = exported[name]
    export = E.load_export(folder)
    assert export.config == model.config and export.dtype == "fp32"
    modules = E.graph_modules(model)
    for c in E.COMPONENTS:
        proto = onnx.load(str(export.files[c]))
        assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
        batch = proto.graph.input[0].type.tensor_type.shape.dim[0]
        assert batch.dim_param == "batch", f"{c}: the batch axis must be dynamic"
        sess = E._session(export.files[c])
        # batch 2 at 16x8 latents: neither the traced size nor the checked ones
        inputs = E.sample_inputs(export.specs[c], model.config, 2, (16, 8), seed=11)
        with torch.no_grad():
            want = modules[c](*inputs.values())
        got = sess.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
        rel, psnr = _errors(got, want)
        assert rel <= 1e-3 and psnr >= 40, f"{name} {c}: rel {rel:.2e}, PSNR {psnr:.1f} dB"
        check = export.manifest["components"][c]["check"]
        assert check["max_rel_err"] <= 1e-3 and check["psnr_db"] >= 40


def test_folder_is_self_contained_and_pipelines_agree(exported, tmp_path):
    """The export folder alone (copied away from everything) runs the inpainting Pipeline; its images equal the
    torch Pipeline's at batch 1 and 3, same seeds, float output (paste_back=False: no uint8 rounding)."""
    model, folder = exported["sd1"]
    moved = shutil.copytree(folder, tmp_path / "moved")
    ort_pipe = Pipeline.from_pretrained(moved, device="cpu", backend="onnxruntime")
    assert isinstance(ort_pipe.backend, OnnxRuntimeBackend)
    torch_pipe = Pipeline(TorchBackend(model, device="cpu", dtype=torch.float32))
    rng = np.random.default_rng(0)
    image = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[12:52, 20:44] = 255
    for batch in (1, 3):
        kw = dict(image=image, mask=mask, prompt=["a red bottle", "a cat", "wet rocks"][:batch], steps=4, seed=7,
                  output_type="np", paste_back=False, progress=False)
        a, b = torch_pipe.inpaint(**kw).images, ort_pipe.inpaint(**kw).images
        assert a.shape == (batch, 64, 64, 3) and np.abs(a - b).max() <= TOL_NP
    ids = model.tokenizer(["a red bottle"])
    assert torch.equal(ort_pipe.backend.tokenizer(["a red bottle"]), ids)


def test_sd2_pipeline_agrees(exported):
    """v-prediction text-to-image through the SD2-shaped export, batch 1 and 3."""
    model, folder = exported["sd2"]
    ort_pipe = Pipeline(make_backend("onnxruntime", folder, device="cpu"))
    torch_pipe = Pipeline(TorchBackend(model, device="cpu", dtype=torch.float32))
    for batch in (1, 3):
        kw = dict(prompt="a bottle", negative_prompt="blurry", steps=3, seed=3, num_images_per_prompt=batch,
                  output_type="np", progress=False)
        a, b = torch_pipe.generate(**kw).images, ort_pipe.generate(**kw).images
        assert a.shape == (batch, 64, 64, 3) and np.abs(a - b).max() <= TOL_NP
    # inpainting: this VAE is mask-conditioned, so the decoder graph gets the image and mask as torch's does
    rng = np.random.default_rng(4)
    image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = np.zeros((64, 64), np.uint8)
    mask[8:40, 16:56] = 255
    kw = dict(prompt="a bottle", steps=3, seed=5, output_type="np", paste_back=False, progress=False)
    a = torch_pipe.inpaint(image, Image.fromarray(mask), **kw).images
    b = ort_pipe.inpaint(image, Image.fromarray(mask), **kw).images
    assert np.abs(a - b).max() <= TOL_NP


def test_backend_contract_and_shape_errors(exported):
    model, folder = exported["sd1"]
    ort_b, ref = OnnxRuntimeBackend(folder), TorchBackend(model, device="cpu", dtype=torch.float32)
    assert ort_b.latent_multiple == 1  # any latent size, as torch's UNet (see test_ort_backend for older exports)
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 9, 8, 8, generator=g), torch.randn(2, 77, 64, generator=g)
    for t in (torch.tensor([10.0, 900.0]), torch.tensor(500.0)):  # per-item and one scalar timestep
        out = ort_b.unet(x, t, ctx)
        assert out.dtype == torch.float32 and torch.allclose(out, ref.unet(x, t, ctx), atol=1e-5)
    images = torch.rand(1, 3, 64, 72, generator=g) * 2 - 1
    assert torch.allclose(ort_b.vae_encode(images), ref.vae_encode(images), atol=1e-5)
    with pytest.raises(ValueError, match=r"unet: input sample must be \(batch, 9,"):
        ort_b.unet(torch.randn(2, 4, 8, 8), torch.tensor(1.0), ctx)
    odd = torch.randn(2, 9, 9, 5, generator=g)  # odd latent sides: skips of odd size, which the up path lands on
    assert torch.allclose(ort_b.unet(odd, torch.tensor(1.0), ctx), ref.unet(odd, torch.tensor(1.0), ctx), atol=1e-5)
    with pytest.raises(ValueError, match="batch is 3 in another input"):
        ort_b.unet(torch.randn(3, 9, 8, 8), torch.tensor([1.0, 2.0, 3.0]), ctx)
    with pytest.raises(TypeError, match="runs an export folder"):
        make_backend("onnxruntime", model)


def _condition(batch: int, latent_hw: tuple[int, int], seed: int) -> tuple[torch.Tensor, ...]:
    """Latents (B, 4, h, w), an image (B, 3, 8h, 8w) in [-1, 1] and a rectangular repaint mask (B, 1, 8h, 8w)."""
    g, (h, w) = torch.Generator().manual_seed(seed), latent_hw
    z, image = torch.randn(batch, 4, h, w, generator=g), torch.rand(batch, 3, 8 * h, 8 * w, generator=g) * 2 - 1
    mask = torch.zeros(batch, 1, 8 * h, 8 * w)
    mask[..., 8 * h // 4: 8 * h * 3 // 4 + 3, 8 * w // 3 + 5:] = 1  # edges off the 8-px grid: mixed cells too
    return z, image, mask


def test_mask_conditioned_decoder_equals_torch(exported):
    """The mask-conditioned export's decoder takes (latent_sample, image, mask); the onnxruntime backend's
    vae_decode equals the torch backend's with a condition, and without one, where it feeds a zero image under
    an all-ones mask: the plain decoding. Plain VAEs' decoder graphs keep their one input."""
    model, folder = exported["sd2"]
    ort_b, ref = OnnxRuntimeBackend(folder), TorchBackend(model, device="cpu", dtype=torch.float32)
    spec = ort_b.export.specs["vae_decoder"]
    assert spec.inputs == (("latent_sample", ("batch", 4, "latent_height", "latent_width")),
                           ("image", ("batch", 3, "height", "width")), ("mask", ("batch", 1, "height", "width")))
    assert [i.name for i in onnx.load(str(ort_b.export.files["vae_decoder"])).graph.input] == \
        ["latent_sample", "image", "mask"]
    assert E.load_export(exported["sd1"][1]).specs["vae_decoder"].inputs == \
        (("latent_sample", ("batch", 4, "latent_height", "latent_width")),)
    z, image, mask = _condition(2, (8, 12), seed=8)
    cond, plain = ort_b.vae_decode(z, image, mask), ort_b.vae_decode(z)
    assert cond.dtype == torch.float32 and cond.shape == (2, 3, 64, 96)
    for got, want in ((cond, ref.vae_decode(z, image, mask)), (plain, ref.vae_decode(z))):
        rel, psnr = _errors(got.numpy(), want)
        assert rel <= 1e-3 and psnr >= 40, f"rel {rel:.2e}, PSNR {psnr:.1f} dB"
    assert (cond - plain).abs().max() > 1e-2  # the condition matters
    z, image = z.half(), image.half()  # other dtypes (a bool mask too) are converted as the latents are
    half = ort_b.vae_decode(z, image, mask.bool())
    assert half.dtype == torch.float32 and _errors(half.numpy(), ref.vae_decode(z, image, mask))[0] <= 1e-3
    with pytest.raises(ValueError, match="vae_decoder: give both image and mask"):
        ort_b.vae_decode(z, image)
    with pytest.raises(ValueError, match=r"vae_decoder: input mask must be \(batch, 1, height, width\)"):
        ort_b.vae_decode(z, image, mask[:, :, :32])
    with pytest.raises(ValueError, match="height must be 8 x latent_height = 64, got 32"):  # image and mask agree
        ort_b.vae_decode(z, image[:, :, :32], mask[:, :, :32])


def test_a_condition_for_a_plain_vae_export_is_refused(exported):
    """image/mask passed to a plain VAE's export: the ValueError VAE.decode (the torch backend) raises."""
    model, folder = exported["sd1"]
    z, image, mask = _condition(1, (8, 8), seed=9)
    why = "image/mask condition only a mask-conditioned VAE"
    for backend in (OnnxRuntimeBackend(folder), TorchBackend(model, device="cpu", dtype=torch.float32)):
        with pytest.raises(ValueError, match=why):
            backend.vae_decode(z, image, mask)
        assert backend.vae_decode(z).shape == (1, 3, 64, 64)


def test_refit_loads_a_lora_and_restores_the_base_exactly(exported):
    """SD1's proj_in/proj_out are 1x1 convs (C, C, 1, 1) the graph holds as a transposed (C, C) MatMul weight: a
    kohya-style LoRA patches them too."""
    model, folder = exported["sd1"]
    assert model.unet.state_dict()["down_blocks.0.attentions.0.proj_in.weight"].ndim == 4  # conv projections
    backend = OnnxRuntimeBackend(folder)
    inputs = E.sample_inputs(backend.export.specs["unet"], model.config, 2, (8, 8), seed=5)
    before = backend.unet(*inputs.values())
    lora, g = copy.deepcopy(model.unet), torch.Generator().manual_seed(0)
    targets = ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight", "proj_in.weight", "proj_out.weight")
    with torch.no_grad():  # W + B A, rank 4: a merged LoRA on every attention projection
        for name, p in lora.named_parameters():
            if name.endswith(targets):
                delta = torch.randn(p.shape[0], 4, generator=g) @ torch.randn(4, p.shape[1], generator=g)
                p += 0.1 * delta.reshape(p.shape)
        want = lora(*inputs.values())
    assert (want - before).abs().max() > 1e-2  # the LoRA matters
    backend.refit("unet", {k: v for k, v in lora.state_dict().items() if k.endswith(targets)})
    rel, _ = _errors(backend.unet(*inputs.values()).numpy(), want)
    assert rel <= 1e-4  # float32 reordering; the LoRA itself moves outputs by > 1e-2
    backend.refit("unet", lora.state_dict())  # the full merged state_dict works too
    assert _errors(backend.unet(*inputs.values()).numpy(), want)[0] <= 1e-4
    backend.refit("unet")
    assert torch.equal(backend.unet(*inputs.values()), before)
    bad = {k: v for k, v in lora.state_dict().items() if k.endswith("norm1.bias")}
    bad = {k: v + 1 for k, v in bad.items()}
    with pytest.raises(RefitError):  # zero biases of the random init were folded away at export
        backend.refit("unet", bad)


def _changed(module: torch.nn.Module, suffix: str) -> torch.nn.Module:
    """A copy of `module` with every weight whose key ends with `suffix` scaled by 1.5."""
    module = copy.deepcopy(module)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(suffix):
                p.mul_(1.5)
    return module


def _prefixed(folder: Path, component: str, prefix: str) -> None:
    """Rewrite a graph's weights.json with keys as exports before component-relative keys wrote them."""
    path = folder / component / "weights.json"
    wmap = json.loads(path.read_text())
    for e in wmap["initializers"].values():
        e["keys"] = [prefix + k for k in e["keys"]]
    wmap["folded"] = {prefix + k: d for k, d in wmap["folded"].items()}
    path.write_text(json.dumps(wmap))


@pytest.mark.parametrize("layout", ["current", "prefixed"])
def test_refit_takes_each_components_own_state_dict(exported, tmp_path, layout):
    """refit("text_encoder", text_encoder.state_dict()) and refit("vae_decoder", vae.state_dict()) as refit("unet",
    unet.state_dict()): the component's own keys, also for an export whose weights.json still holds the keys of
    export_onnx's graph wrappers (text_encoder.*, vae.*)."""
    model, folder = exported["sd1"]
    folder = shutil.copytree(folder, tmp_path / "onnx")
    for component, module in (("text_encoder", model.text_encoder), ("vae_decoder", model.vae)):
        raw = json.loads((folder / component / "weights.json").read_text())
        assert set(raw["folded"]) | {k for e in raw["initializers"].values() for k in e["keys"]} == \
            {k for k, v in module.state_dict().items() if v.is_floating_point()}  # written component-relative
    if layout == "prefixed":
        for component, prefix in (("text_encoder", "text_encoder."), ("vae_decoder", "vae.")):
            _prefixed(folder, component, prefix)
    backend = OnnxRuntimeBackend(folder)
    text = _changed(model.text_encoder, "q_proj.weight")
    # a Conv weight: ONNX Runtime's CPU provider ignored Conv overrides above ORT_ENABLE_EXTENDED
    vae = _changed(model.vae, "decoder.conv_out.weight")
    ids = torch.randint(0, model.config.text.vocab_size, (2, model.config.text.max_position_embeddings))
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        want_text, want_image = text(ids), vae.decode(z)
        assert (want_text - model.text_encoder(ids)).abs().max() > 1e-2  # the changes matter
        assert (want_image - model.vae.decode(z)).abs().max() > 1e-2
    backend.refit("text_encoder", text.state_dict())
    backend.refit("vae_decoder", vae.state_dict())  # the encoder's keys too: unchanged, so accepted
    assert _errors(backend.encode_text(ids).numpy(), want_text)[0] <= 1e-4
    assert _errors(backend.vae_decode(z).numpy(), want_image)[0] <= 1e-4


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(),
                    reason="this onnxruntime can attach the CUDA provider")
def test_a_provider_that_does_not_attach_is_an_error(exported):
    """Asked for a provider it cannot load, onnxruntime does not raise: it warns and builds a CPU-only session (a
    CPU build asked for CUDAExecutionProvider does exactly that, as does a CUDA 12 onnxruntime-gpu on a CUDA 13
    machine), and a CUDA backend would fail at its first run. The backend checks every session it makes."""
    backend = OnnxRuntimeBackend(exported["sd1"][1])
    assert backend.sessions["unet"].get_providers() == ["CPUExecutionProvider"]
    # the list session_providers makes for CUDA, past its check that this build lists the provider
    backend.providers = [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
    with pytest.raises(RuntimeError, match=r"did not attach CUDAExecutionProvider to the unet session "
                                           r"\(it has \['CPUExecutionProvider'\]\)"):
        backend.refit("unet")


def test_torch_backend_defaults_to_the_models_device_and_dtype():
    backend = make_backend("torch", init_model("tiny", seed=0))
    assert backend.device == torch.device("cpu") and backend.dtype == torch.float32


def test_reference_computes_without_tf32():
    """The export's torch reference on a GPU: no TF32 in cuDNN convolutions or matmuls, the settings restored."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        with pytest.raises(KeyError), E.full_fp32():
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
            raise KeyError  # restored on the way out of a failed check too
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_refuses_a_graph_that_disagrees(tmp_path):
    model = init_model("tiny", seed=2)
    spec, module = E.graph_specs(model.config)["vae_encoder"], E.graph_modules(model)["vae_encoder"]
    wrong = copy.deepcopy(module)
    with torch.no_grad():
        wrong.vae.encoder.conv_in.weight.mul_(1.01)  # a 1% error in one layer
    path = tmp_path / "vae_encoder" / "model.onnx"
    with pytest.raises(E.ExportError, match=r"vae_encoder: the ONNX graph disagrees with torch .* max rel err"):
        E.export_component(spec, module, model.config, path, reference=wrong)
    with pytest.raises(E.ExportError, match="vae_encoder: .*limit 0e"):
        E.export_component(spec, module, model.config, path, tolerance=E.Tolerance(0.0, math.inf))
    assert not path.exists() and not list(path.parent.iterdir())


class _Eig(torch.nn.Module):
    """An op ONNX has no operator for (a symmetric eigendecomposition)."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, latent_sample):
        x = self.proj(latent_sample.mean(dim=(2, 3)))  # (B, 4)
        return torch.linalg.eigvalsh(x[:, :, None] * x[:, None, :])[:, :, None, None].expand_as(latent_sample)


def test_refuses_an_unsupported_op(tmp_path):
    cfg = PRESETS["tiny"]
    spec = E.graph_specs(cfg)["vae_decoder"]
    spec = dataclasses.replace(spec, outputs=(("sample", spec.inputs[0][1]),))
    with pytest.raises(E.ExportError, match="vae_decoder: torch.onnx.export failed: .*linalg_eigvalsh"):
        E.export_component(spec, _Eig(), cfg, tmp_path / "x" / "model.onnx")
    assert not (tmp_path / "x" / "model.onnx").exists()


def test_fp16_graph_runs_in_onnxruntime(tmp_path):
    model = init_model("tiny", seed=3)
    spec, module = E.graph_specs(model.config)["vae_decoder"], E.graph_modules(model)["vae_decoder"]
    path = tmp_path / "vae_decoder" / "model.onnx"
    try:
        entry = E.export_component(spec, module, model.config, path, dtype="fp16")
    except E.ExportError as e:
        if "cannot load" in str(e) or "failed to run" in str(e):
            pytest.skip(f"this onnxruntime cannot run float16 graphs on the CPU: {e}")
        raise
    proto = onnx.load(str(path))
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    kinds = {t.data_type for t in proto.graph.initializer if len(t.dims) > 1 and t.data_type in floats}
    assert kinds == {onnx.TensorProto.FLOAT16}  # every conv/linear weight is half
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # interface stays fp32
    inputs = E.sample_inputs(spec, model.config, 2, (8, 12), seed=4)
    got = E._session(path).run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    rel, psnr = _errors(got, module(*inputs.values()))
    assert 0 < rel <= E.TOLERANCES["fp16"].max_rel_err and psnr >= 30 and entry["dtype"] == "fp16"


def test_external_data_and_held_out_weights(tmp_path, monkeypatch):
    """The >2 GB path at tiny size: weights held out of onnxslim give the same graph outputs, and weights in
    model.onnx.data load and run. BACKDROP_KERNELS=triton (as a CUDA machine may set) must not reach the trace:
    the export runs the torch reference kernels whatever the environment says, and restores it after."""
    monkeypatch.setenv("BACKDROP_KERNELS", "triton")  # Triton on a CPU tensor would raise inside the trace
    model = init_model("tiny", seed=4)
    spec, module = E.graph_specs(model.config)["text_encoder"], E.graph_modules(model)["text_encoder"]
    path = tmp_path / "text_encoder" / "model.onnx"
    entry = E.export_component(spec, module, model.config, path, external_data=True)
    assert os.environ["BACKDROP_KERNELS"] == "triton"
    monkeypatch.delenv("BACKDROP_KERNELS")  # the torch reference below: this test's module runs on the CPU
    assert entry["external_data"] and (path.parent / "model.onnx.data").stat().st_size > 10**6
    held = E._slim(onnx.load(str(path)), hold_out_weights=True)
    assert {t.name for t in held.graph.initializer} == {t.name for t in onnx.load(str(path)).graph.initializer}
    onnx.save(held, str(tmp_path / "held.onnx"))
    inputs = E.sample_inputs(spec, model.config, 3, (8, 8), seed=6)
    feed = {k: v.numpy() for k, v in inputs.items()}
    a = E._session(path).run(None, feed)[0]
    b = E._session(tmp_path / "held.onnx").run(None, feed)[0]
    assert np.array_equal(a, b) and _errors(a, module(*inputs.values()))[0] <= 1e-3


def test_cli_exports_and_reports_errors(exported, tmp_path, capsys, monkeypatch):
    """`--out .` from an empty working folder fills that folder in place (a shell standing in it sees the export);
    exporting there again replaces the first export whole, model.onnx.data included."""
    from backdrop.cli import main

    folder = save_model(init_model("tiny", seed=5), tmp_path / "model")
    (tmp_path / "onnx").mkdir()
    monkeypatch.chdir(tmp_path / "onnx")
    command = ["export", "onnx", str(folder), "--components", "text_encoder", "--quiet"]
    assert main(command + ["--out", ".", "--external-data"]) == 0
    assert Path(capsys.readouterr().out.strip()) == tmp_path / "onnx"
    assert Path(E.MANIFEST).is_file() and Path("text_encoder/model.onnx.data").is_file()
    assert main(command + ["--out", str(tmp_path / "onnx"), "--opset", "20"]) == 0
    assert Path(capsys.readouterr().out.strip()) == tmp_path / "onnx"
    assert not (tmp_path / "onnx" / "text_encoder" / "model.onnx.data").exists()
    export = E.load_export(tmp_path / "onnx", require=("text_encoder",))
    assert list(export.files) == ["text_encoder"] and export.manifest["opset"] == 20
    proto = onnx.load(str(export.files["text_encoder"]))
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == 20
    assert main(["export", "onnx", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert "cannot load model" in capsys.readouterr().err
    trt = ["export", "tensorrt", "--out", str(tmp_path / "trt")]
    assert main(trt + [str(tmp_path / "onnx")]) == 2
    err = capsys.readouterr().err
    assert "the export has no unet, vae_encoder, vae_decoder graph (it holds text_encoder: made with " \
           "--components); export all four components again, without --components" in err
    # refused before TensorRT is needed: 70 px is not a multiple of the VAE's 8
    assert main(trt + [str(exported["sd1"][1]), "--bucket", "64x70"]) == 2
    assert "sides must be multiples of 8 px" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="no unet, vae_encoder, vae_decoder graph"):
        OnnxRuntimeBackend(tmp_path / "onnx")


def test_inpaint_cli_runs_an_onnx_export(exported, tmp_path, capsys):
    """`backdrop inpaint --backend onnxruntime --model EXPORT` writes the same PNG as the torch backend."""
    from backdrop.cli import main

    model, folder = exported["sd1"]
    rng = np.random.default_rng(3)
    Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(tmp_path / "img.png")
    product = np.zeros((64, 64), np.uint8)
    product[16:48, 24:40] = 255
    Image.fromarray(product).save(tmp_path / "product.png")
    torch_folder = save_model(model, tmp_path / "model")
    args = ["inpaint", str(tmp_path / "img.png"), "--product-mask", str(tmp_path / "product.png"), "--prompt",
            "a red bottle", "--steps", "3", "--seed", "4", "--quiet", "--dtype", "fp32"]
    assert main(args + ["--model", str(folder), "--backend", "onnxruntime", "--out", str(tmp_path / "ort")]) == 0
    assert main(args + ["--model", str(torch_folder), "--out", str(tmp_path / "torch")]) == 0
    a, b = (np.asarray(Image.open(tmp_path / d / "inpaint-img-4.png"), np.int16) for d in ("ort", "torch"))
    assert np.abs(a - b).max() <= 2  # uint8 rounding of float outputs that agree to ~1e-4
    assert (a[16:48, 24:40] == np.asarray(Image.open(tmp_path / "img.png"))[16:48, 24:40]).all()  # product kept
    assert main(args + ["--model", str(tmp_path / "nope"), "--backend", "onnxruntime"]) == 2
    assert "cannot load model" in capsys.readouterr().err
    capsys.readouterr()
    assert main(args + ["--model", str(folder), "--backend", "onnxruntime", "--clip-skip", "1"]) == 2
    err = capsys.readouterr().err  # a CLI user can follow it: no Python arguments
    assert "--clip-skip 1: clip_skip=1 needs the torch backend, not onnxruntime: " in err
    assert "run the model folder with --backend torch, or leave out --clip-skip" in err and "prompt_embeds" not in err


def test_a_server_on_an_export_words_clip_skip_for_its_users(exported):
    """An exported text encoder ends at its last layer: `serve --clip-skip` on an export is refused at startup
    with a serve option to change, and a request's clip_skip gets a 400 saying what an HTTP client can send (not
    the Python arguments a Pipeline caller would use)."""
    import asyncio

    import httpx
    from serve_helpers import JSON, inpaint_body, product

    from backdrop.serve.engine import Engine
    from backdrop.serve.server import ServerConfig, create_app

    pipe = Pipeline(make_backend("onnxruntime", exported["sd1"][1], device="cpu"))
    with pytest.raises(ValueError, match="needs the torch backend, not onnxruntime: .*serve with --backend torch, "
                                         "or without --clip-skip"):
        create_app(Engine(pipe, warmup=False), ServerConfig(clip_skip=1))
    app = create_app(Engine(pipe, warmup=False))

    async def post(body: bytes) -> httpx.Response:  # refused before the queue: the engine need not run
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://backdrop") as c:
            return await c.post("/v1/inpaint", headers=JSON, content=body)

    r = asyncio.run(post(inpaint_body(product(1), clip_skip=1)))
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "clip_skip", r.text
    assert "send clip_skip 0 or none, or use a server started with --backend torch" in error["message"]
    assert "prompt_embeds" not in error["message"]
