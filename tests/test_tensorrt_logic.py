"""The TensorRT path's plain-Python logic, on any machine: shape buckets -> optimization profiles, picking a
profile per request and refusing what fits none, the precision rules of TensorRT 10 vs 11, and the refit arrays
built from an export's weight map; a mask-conditioned VAE's decoder (image and mask inputs at the pixel size) in
the profiles and in the inputs the backend binds. The engine build and run themselves need an NVIDIA GPU and
TensorRT and are not exercised here.
"""
import dataclasses

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from backdrop.export import onnx as E
from backdrop.export.onnx_folder import component_keys, vae_decoder_inputs
from backdrop.export.tensorrt import (TRT_MANIFEST, Profile, Range, RefitError, ShapeBucket, ShapeError,
                                      TensorRTBackend, build_engines, default_buckets, parse_bucket, precision_plan,
                                      profiles_for, refit_arrays, select_profile)
from backdrop.nn.config import PRESETS

SD15 = PRESETS["sd15-inpaint"]
SD15_ASYM = dataclasses.replace(SD15, vae=dataclasses.replace(SD15.vae, mask_conditioned=True))


def test_ranges_and_buckets():
    assert 3 in Range(1, 2, 4) and 5 not in Range(1, 2, 4)
    with pytest.raises(ValueError, match="min <= opt <= max"):
        Range(2, 1, 4)
    with pytest.raises(ValueError, match="min <= opt <= max"):
        Range(0, 1, 1)
    assert parse_bucket("512") == ShapeBucket(512, 512, Range(1, 1, 4))
    assert parse_bucket("512x768:1-8@2") == ShapeBucket(512, 768, Range(1, 2, 8))
    assert parse_bucket("768:2").static and not parse_bucket("768:1-2").static
    for bad in ("512x", "big", "512:4-2", "512x768:0"):
        with pytest.raises(ValueError):
            parse_bucket(bad)
    assert [(b.height, b.width) for b in default_buckets(SD15)] == [(512, 512), (512, 768), (768, 512)]
    assert [(b.height, b.width) for b in default_buckets(PRESETS["tiny"])] == [(64, 64)]


def test_profiles_derive_each_graphs_batch_and_sizes():
    specs = E.graph_specs(SD15)
    buckets = [parse_bucket("512:1-4@2"), parse_bucket("512x768:2")]
    unet = profiles_for(specs["unet"], SD15, buckets)
    # guidance doubles the UNet's batch: images 1-4 -> up to 8 (down to 1: guidance_scale <= 1 runs B items)
    assert unet[0].shapes[0] == ("sample", (1, 9, 64, 64), (4, 9, 64, 64), (8, 9, 64, 64))
    assert unet[0].shapes[2] == ("encoder_hidden_states", (1, 77, 768), (4, 77, 768), (8, 77, 768))
    assert unet[1].shapes[0] == ("sample", (4, 9, 64, 96), (4, 9, 64, 96), (4, 9, 64, 96))  # static: 2 guided
    assert unet[1].static
    vae_enc = profiles_for(specs["vae_encoder"], SD15, buckets)
    assert vae_enc[1].shapes == (("sample", (2, 3, 512, 768), (2, 3, 512, 768), (2, 3, 512, 768)),)
    assert vae_enc[1].static and not vae_enc[0].static
    text = profiles_for(specs["text_encoder"], SD15, [parse_bucket("512"), parse_bucket("768")])
    assert len(text) == 1 and text[0].shapes == (("input_ids", (1, 77), (2, 77), (8, 77)),)  # merged: no h/w
    assert Profile.from_json(unet[1].to_json()) == unet[1]
    assert profiles_for(specs["unet"], SD15, [parse_bucket("520")])[0].shapes[0][1] == (1, 9, 65, 65)  # any size
    older = dataclasses.replace(specs["unet"], multiple=8)  # an export whose UNet baked in a 2x upsampling
    with pytest.raises(ValueError, match="multiples of 64 px"):
        profiles_for(older, SD15, [parse_bucket("520")])
    with pytest.raises(ValueError, match="multiples of 8 px"):
        profiles_for(specs["vae_decoder"], SD15, [parse_bucket("516")])
    static = E.graph_specs(SD15, static_hw=(512, 512))
    assert profiles_for(static["unet"], SD15, [parse_bucket("512")])[0].shapes[0][3] == (8, 9, 64, 64)
    with pytest.raises(ValueError, match="static size"):
        profiles_for(static["vae_decoder"], SD15, [parse_bucket("768")])


def test_select_profile_prefers_static_then_tightest_and_refuses_the_rest():
    spec = E.graph_specs(SD15)["unet"]
    profiles = profiles_for(spec, SD15, [parse_bucket("512:1-8"), parse_bucket("512:2"), parse_bucket("512:1-2"),
                                         parse_bucket("768:1-4")])

    def shapes(b, h, w):
        return {"sample": (b, 9, h, w), "timestep": (b,), "encoder_hidden_states": (b, 77, 768)}
    assert select_profile("unet", profiles, shapes(4, 64, 64)) == 1  # static 2 images x guidance: CUDA graph
    assert select_profile("unet", profiles, shapes(3, 64, 64)) == 2  # 1-2 images (2-4) is tighter than 1-8
    assert select_profile("unet", profiles, shapes(16, 64, 64)) == 0
    assert select_profile("unet", profiles, shapes(8, 96, 96)) == 3
    for bad, why in ((shapes(17, 64, 64), "batch"), (shapes(2, 64, 96), "size"), (shapes(2, 80, 80), "size")):
        with pytest.raises(ShapeError, match=r"unet: sample \(\d+, 9, \d+, \d+\).* fits none .* built for: "
                                             r"512x512 batch 1-8; 512x512 batch 2-2; 512x512 batch 1-2; "
                                             r"768x768 batch 1-4. The request is refused"):
            select_profile("unet", profiles, bad)
    with pytest.raises(ShapeError):  # a missing input is no fit either
        select_profile("unet", profiles, {"sample": (2, 9, 64, 64)})


def test_profiles_of_a_mask_conditioned_decoder():
    """The decoder's image and mask get the bucket's pixel size (static exports too), its latents the latent size."""
    buckets = [parse_bucket("512:1-4@2"), parse_bucket("512x768:2")]
    dec = profiles_for(E.graph_specs(SD15_ASYM)["vae_decoder"], SD15_ASYM, buckets)
    assert dec[0].shapes == (("latent_sample", (1, 4, 64, 64), (2, 4, 64, 64), (4, 4, 64, 64)),
                             ("image", (1, 3, 512, 512), (2, 3, 512, 512), (4, 3, 512, 512)),
                             ("mask", (1, 1, 512, 512), (2, 1, 512, 512), (4, 1, 512, 512)))
    assert dec[1].static and dec[1].shapes[2] == ("mask", (2, 1, 512, 768), (2, 1, 512, 768), (2, 1, 512, 768))
    assert [n for n, *_ in profiles_for(E.graph_specs(SD15)["vae_decoder"], SD15, buckets)[0].shapes] == \
        ["latent_sample"]  # a plain VAE's decoder: as before
    static = E.graph_specs(SD15_ASYM, static_hw=(512, 768))["vae_decoder"]
    assert static.inputs[1] == ("image", ("batch", 3, 512, 768))
    (p,) = profiles_for(static, SD15_ASYM, [parse_bucket("512x768:1-2")])
    assert [s[3] for s in p.shapes] == [(2, 4, 64, 96), (2, 3, 512, 768), (2, 1, 512, 768)]
    with pytest.raises(ValueError, match="bucket 512x512 batch 1-4: vae_decoder was exported at a static size"):
        profiles_for(static, SD15_ASYM, [parse_bucket("512x768:1-2"), parse_bucket("512")])
    # a request binds all three inputs, with or without a condition; the latents alone are no fit
    z = torch.zeros(2, 4, 64, 96)
    for feed in (vae_decoder_inputs(static, z), vae_decoder_inputs(static, z, torch.zeros(2, 3, 512, 768),
                                                                     torch.ones(2, 1, 512, 768))):
        assert select_profile("vae_decoder", [p], {k: tuple(v.shape) for k, v in feed.items()}) == 0
    with pytest.raises(ShapeError, match=r"vae_decoder: latent_sample \(2, 4, 64, 96\) fits none"):
        select_profile("vae_decoder", [p], {"latent_sample": (2, 4, 64, 96)})


def test_decoder_inputs_fill_in_or_refuse_the_condition():
    """What both backends feed the decoder graph: float32 inputs; a zero image under an all-ones mask when a
    mask-conditioned decoder gets no condition (the plain decoding); a condition for a plain one is refused."""
    asym, plain = (E.graph_specs(c)["vae_decoder"] for c in (SD15_ASYM, SD15))
    z = torch.randn(2, 4, 8, 12, dtype=torch.float16)
    filled = vae_decoder_inputs(asym, z)
    assert list(filled) == ["latent_sample", "image", "mask"] and all(v.dtype == torch.float32 for v in filled.values())
    assert torch.equal(filled["latent_sample"], z.float())
    assert torch.equal(filled["image"], torch.zeros(2, 3, 64, 96))
    assert torch.equal(filled["mask"], torch.ones(2, 1, 64, 96))
    image, mask = torch.rand(2, 3, 64, 96, dtype=torch.float16), torch.rand(2, 1, 64, 96) > 0.5
    given = vae_decoder_inputs(asym, z, image, mask)
    assert torch.equal(given["image"], image.float()) and torch.equal(given["mask"], mask.float())
    assert given["mask"].dtype == torch.float32
    assert list(vae_decoder_inputs(plain, z)) == ["latent_sample"]
    with pytest.raises(ValueError, match="vae_decoder: image/mask condition only a mask-conditioned VAE"):
        vae_decoder_inputs(plain, z, image, mask)
    with pytest.raises(ValueError, match="give both image and mask"):
        vae_decoder_inputs(asym, z, mask=mask)


def test_tensorrt_backend_binds_the_decoder_condition():
    """TensorRTBackend.vae_decode on a stand-in engine (TensorRT cannot run here): every call hands the engine the
    three inputs its profiles name, and a shape no profile holds is refused before the engine runs."""
    spec = E.graph_specs(SD15_ASYM)["vae_decoder"]
    profiles = profiles_for(spec, SD15_ASYM, [parse_bucket("64:1-2")])
    calls = []

    def engine(inputs):  # as Engine.__call__: pick the profile, then run
        select_profile("vae_decoder", profiles, {k: tuple(v.shape) for k, v in inputs.items()})
        calls.append(inputs)
        return torch.zeros(1)

    backend = object.__new__(TensorRTBackend)
    backend.specs, backend.engines = {"vae_decoder": spec}, {"vae_decoder": engine}
    z, mask = torch.randn(1, 4, 8, 8), torch.zeros(1, 1, 64, 64)
    backend.vae_decode(z)
    backend.vae_decode(z, torch.rand(1, 3, 64, 64).half(), mask)
    assert [{k: (tuple(v.shape), v.dtype) for k, v in c.items()} for c in calls] == 2 * [
        {"latent_sample": ((1, 4, 8, 8), torch.float32), "image": ((1, 3, 64, 64), torch.float32),
         "mask": ((1, 1, 64, 64), torch.float32)}]
    assert torch.equal(calls[0]["mask"], torch.ones(1, 1, 64, 64)) and torch.equal(calls[1]["mask"], mask)
    with pytest.raises(ShapeError, match="fits none"):
        backend.vae_decode(torch.randn(3, 4, 8, 8))
    backend.specs = {"vae_decoder": E.graph_specs(SD15)["vae_decoder"]}
    with pytest.raises(ValueError, match="image/mask condition only a mask-conditioned VAE"):
        backend.vae_decode(z, torch.rand(1, 3, 64, 64), mask)


def test_precision_rules_of_tensorrt_10_and_11():
    assert precision_plan("fp16", "fp32", 10) == (False, ("FP16",))
    assert precision_plan("bf16", "fp32", 10) == (False, ("BF16",))
    assert precision_plan("fp32", "fp32", 10) == (False, ())
    assert precision_plan("fp16", "fp16", 10, strongly_typed=True) == (True, ())
    assert precision_plan("fp16", "fp16", 11) == (True, ())
    with pytest.raises(ValueError, match="Ampere"):
        precision_plan("bf16", "fp32", 10, bf16_supported=False)
    with pytest.raises(ValueError, match="TensorRT 11 builds strongly typed .* --dtype fp16"):
        precision_plan("fp16", "fp32", 11)
    with pytest.raises(ValueError, match="strongly typed: a fp16 engine needs a fp16 ONNX export"):
        precision_plan("fp16", "fp32", 10, strongly_typed=True)
    with pytest.raises(ValueError, match="bf16 needs TensorRT 10"):
        precision_plan("bf16", "fp32", 11)
    with pytest.raises(ValueError, match="choose fp32, fp16 or bf16"):
        precision_plan("int8", "fp32", 10)


class _Block(nn.Module):
    """A Linear (exported transposed), a GroupNorm (weight folded to (C, 1, 1)), two equal 1x1 convs (stored
    once)."""

    def __init__(self):
        super().__init__()
        self.norm = nn.GroupNorm(2, 8)
        self.a, self.b = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)
        self.proj = nn.Linear(8, 8, bias=False)
        with torch.no_grad():
            self.b.load_state_dict(self.a.state_dict())
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.uniform_(-1, 1)

    def forward(self, x):  # (B, 8, H, W)
        h = self.a(self.norm(x)) + self.b(x)
        return self.proj(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # Linear over channels


@pytest.fixture(scope="module")
def exported_block(tmp_path_factory):
    torch.manual_seed(0)
    block = _Block().eval()
    spec = E.GraphSpec("block", (("x", ("batch", 8, "h", "w")),), (("y", ("batch", 8, "h", "w")),))
    path = tmp_path_factory.mktemp("block") / "raw.onnx"
    E._trace("block", block, spec, {"x": torch.randn(2, 8, 4, 4)}, path, E.OPSET)
    proto = E._slim(onnx.load(str(path)))
    return block, proto, E.weight_map(proto, block)


def test_refit_arrays_reproduce_the_exported_weights_bit_for_bit(exported_block):
    block, proto, wmap = exported_block
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    entries = wmap["initializers"]
    assert any(e["transpose"] and e["keys"] == ["proj.weight"] for e in entries.values())
    assert any(e["keys"] == ["a.weight", "b.weight"] for e in entries.values())  # equal convs: one initializer
    arrays = refit_arrays(wmap, block.state_dict())
    held = {k for e in entries.values() for k in e["keys"]}
    assert held | set(wmap["folded"]) == set(block.state_dict())
    assert arrays and all(np.array_equal(a, inits[n]) and a.dtype == inits[n].dtype for n, a in arrays.items())


def test_refit_arrays_follow_new_weights_and_refuse_what_cannot_fit(exported_block):
    block, _, wmap = exported_block
    sd = {k: v.clone() for k, v in block.state_dict().items()}
    new = torch.randn(8, 8)
    (name, arr), = refit_arrays(wmap, {"proj.weight": new}).items()
    assert np.array_equal(arr, new.numpy().T) and wmap["initializers"][name]["transpose"]
    with pytest.raises(RefitError, match="decoder.weight: are not weights of this component"):
        refit_arrays(wmap, {"decoder.weight": new})
    with pytest.raises(RefitError, match=r"proj.weight: shape \(8, 9\) does not fit"):
        refit_arrays(wmap, {"proj.weight": torch.randn(8, 9)})
    with pytest.raises(RefitError, match="a.weight, b.weight were equal at export and are one weight"):
        refit_arrays(wmap, {"a.weight": sd["a.weight"] + 1, "b.weight": sd["b.weight"]})
    with pytest.raises(RefitError, match="give them all"):
        refit_arrays(wmap, {"a.weight": sd["a.weight"]})
    same = {"a.weight": sd["a.weight"] * 2, "b.weight": sd["a.weight"] * 2}  # the shared pair moved together
    (arr,) = refit_arrays(wmap, same).values()
    assert np.array_equal(arr, (sd["a.weight"] * 2).numpy())
    for key in wmap["folded"]:  # folded weights: unchanged passes, changed is refused
        assert refit_arrays(wmap, {key: sd[key]}) == {}
        with pytest.raises(RefitError, match="folded into constants at export"):
            refit_arrays(wmap, {key: sd[key] + 1})


def test_folders_that_are_not_exports_are_named(tmp_path):
    """The hints name a folder the command accepts: engines never go into the ONNX export (refused)."""
    with pytest.raises(FileNotFoundError, match="not a Backdrop TensorRT folder"):
        TensorRTBackend(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a Backdrop ONNX export"):
        build_engines(tmp_path, tmp_path / "trt")
    onnx_dir = tmp_path / "sd-onnx"
    onnx_dir.mkdir()
    (onnx_dir / E.MANIFEST).write_text("{}")
    with pytest.raises(FileNotFoundError) as e:
        TensorRTBackend(onnx_dir)
    assert str(e.value).endswith(f"it is an ONNX export: run it with --backend onnxruntime, or build engines from it "
                                 f"with `backdrop export tensorrt {onnx_dir} --out {onnx_dir}-trt`")


@pytest.mark.parametrize("component, prefix", [("text_encoder", "text_encoder."), ("vae_decoder", "vae."),
                                               ("vae_encoder", "vae.")])
def test_weight_maps_of_older_exports_take_the_components_own_keys(exported_block, component, prefix):
    """Exports made before weights.json held a component's own keys prefixed them with the graph wrapper's
    attribute; reading one (the ONNX Runtime and TensorRT refits) strips it, so refit_arrays takes the keys of
    text_encoder.state_dict() / vae.state_dict() either way. Current maps and the UNet's are read as they are."""
    block, _, wmap = exported_block
    old = {"initializers": {n: e | {"keys": [prefix + k for k in e["keys"]]} for n, e in wmap["initializers"].items()},
           "folded": {prefix + k: d for k, d in wmap["folded"].items()}}
    assert component_keys(component, old) == wmap
    assert component_keys(component, wmap) == wmap and component_keys("unet", old) == old
    assert refit_arrays(component_keys(component, old), block.state_dict())


def test_build_never_replaces_a_folder_that_is_not_an_engine_folder(tmp_path, capsys):
    """`--out` used to be deleted whatever it was (rmtree after the build): the ONNX export itself, the working
    folder. Refused before TensorRT is needed, so this runs on any machine."""
    from backdrop.cli import main
    from backdrop.nn.checkpoint import init_model

    onnx_dir = E.export_onnx(init_model("tiny", seed=0), tmp_path / "onnx", components=("text_encoder",),
                             progress=False)
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "notes.txt").write_text("keep me")
    before = sorted(p.name for p in onnx_dir.rglob("*"))
    for out in (onnx_dir, tmp_path / "work"):
        with pytest.raises(ValueError, match="not a Backdrop TensorRT folder; refusing to replace it"):
            build_engines(onnx_dir, out, components=("text_encoder",))
        assert main(["export", "tensorrt", str(onnx_dir), "--out", str(out)]) == 2
        assert f"--out {out}: exists and is not a Backdrop TensorRT folder" in capsys.readouterr().err
    assert sorted(p.name for p in onnx_dir.rglob("*")) == before
    assert (tmp_path / "work" / "notes.txt").read_text() == "keep me"
    # an earlier engine folder is replaced, but not with files in it the build did not write
    trt = tmp_path / "trt"
    (trt / "unet").mkdir(parents=True)
    for name in (TRT_MANIFEST, "unet.plan", "unet/weights.json", "timing.cache", "notes.txt"):
        (trt / name).write_text("{}")
    assert main(["export", "tensorrt", str(onnx_dir), "--out", str(trt)]) == 2
    assert f"--out {trt}: holds notes.txt besides a Backdrop TensorRT folder" in capsys.readouterr().err
    assert (trt / "notes.txt").is_file()
