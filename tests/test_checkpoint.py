"""Checkpoint loading and saving against diffusers/transformers with the same random weights.

- The LDM rename tables are the same mapping as diffusers' own single-file converters (SD1 and SD2 shapes).
- A model loaded from a folder written by diffusers' save_pretrained, or from an LDM single file, computes what
  diffusers/transformers compute; a folder we write opens in diffusers' from_pretrained.
- The configuration of an LDM file is read from its shapes, for tiny models and the full-size presets.
- Bad input raises one CheckpointError naming the file and the key/shape; round trips are exact.
"""
import dataclasses
import json
import os
import re
import shlex
import shutil
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from backdrop.nn import ldm_keys
from backdrop.nn.checkpoint import CheckpointError, Model, _meta_modules, init_model, load_model, save_model
from backdrop.nn.config import PRESETS, ModelConfig, TextConfig, UNetConfig, VAEConfig
from backdrop.nn.testing import rel_err
from backdrop.nn.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

# Tiny, but in the real layouts: 4 UNet levels, 2 resnets a level, attention on 3 levels; SD1 = 8 heads a level
# and 1x1-conv proj_in, SD2 = 64-wide heads and Linear proj_in. 32 GroupNorm groups and 64-wide text heads, as SD
# (both are read from the family, not from shapes).
CASES = [("sd1", 4), ("sd1", 9), ("sd2", 4), ("sd2", 9)]


def tiny_config(family: str, in_channels: int) -> ModelConfig:
    sd2 = family == "sd2"
    text = TextConfig(hidden_size=128, intermediate_size=256, num_layers=2, num_heads=2, projection_dim=128,
                      hidden_act="gelu" if sd2 else "quick_gelu", pad_token_id=0 if sd2 else 49407)
    unet = UNetConfig(in_channels=in_channels, block_out_channels=(64, 128, 128, 128) if sd2 else (32, 64, 64, 64),
                      num_heads=(1, 2, 2, 2) if sd2 else (8, 8, 8, 8), layers_per_block=2,
                      cross_attention_dim=128, use_linear_projection=sd2)
    vae = VAEConfig(block_out_channels=(32, 64, 64, 64), layers_per_block=2)
    return ModelConfig(unet=unet, vae=vae, text=text)


def reference(cfg: ModelConfig, seed: int = 0):
    """diffusers UNet/VAE and transformers CLIPTextModel with random weights (every tensor perturbed, so that no
    zero-initialised or all-ones tensor can hide a swapped key)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(cfg.unet.to_diffusers())
    vae = AutoencoderKL.from_config(cfg.vae.to_diffusers())
    text = CLIPTextModel(CLIPTextConfig(**cfg.text.to_transformers()))
    with torch.no_grad():
        for m in (unet, vae, text):
            for p in m.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return unet.eval(), vae.eval(), text.eval()


def text_state_dict(text) -> dict:
    """transformers >= 5 names CLIPTextModel's tensors without the `text_model.` level that SD files (and our
    TextEncoder) use."""
    return {k if k.startswith("text_model.") else "text_model." + k: v for k, v in text.state_dict().items()}


def ldm_state_dict(cfg: ModelConfig, ref) -> dict:
    unet, vae, text = ref
    return ldm_keys.to_ldm(cfg, {"unet": unet.state_dict(), "vae": vae.state_dict(),
                                 "text_encoder": text_state_dict(text)})


def assert_same_tensors(a: Model, b: Model) -> None:
    for name, m in a.modules().items():
        sa, sb = m.state_dict(), b.modules()[name].state_dict()
        assert sa.keys() == sb.keys(), name
        for k in sa:
            assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), f"{name}.{k}"


@torch.no_grad()
def assert_matches_reference(model: Model, ref, cfg: ModelConfig) -> None:
    """UNet output, VAE encode/decode and text context equal the reference's within 1e-4 relative (fp32)."""
    unet, vae, text = ref
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.text.vocab_size, (2, 77), generator=g)
    ids[:, 0], ids[:, 20:] = cfg.text.bos_token_id, cfg.text.eos_token_id
    context = model.text_encoder(ids)
    assert rel_err(context, text(ids).last_hidden_state) < 1e-4
    sample = -0.3 + torch.randn(2, cfg.unet.in_channels, 8, 8, generator=g)
    t = torch.tensor([17.0, 803.0])
    assert rel_err(model.unet(sample, t, context), unet(sample, t, encoder_hidden_states=context).sample) < 1e-4
    images = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    assert rel_err(model.vae.encode(images), vae.encode(images).latent_dist.mean) < 1e-4
    latents = torch.randn(2, 4, 4, 4, generator=g)
    assert rel_err(model.vae.decode(latents), vae.decode(latents).sample) < 1e-4


@pytest.fixture(scope="module", params=CASES, ids=[f"{f}-{c}ch" for f, c in CASES])
def case(request):
    cfg = tiny_config(*request.param)
    return cfg, reference(cfg)


# ------------------------------------------------------------------------------------------ rename tables

def test_rename_tables_are_diffusers_converters(case):
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)
    cfg, (unet, vae, text) = case
    ldm = ldm_state_dict(cfg, (unet, vae, text))
    back = {"unet": convert_ldm_unet_checkpoint(ldm, cfg.unet.to_diffusers()),
            "vae": convert_ldm_vae_checkpoint(ldm, cfg.vae.to_diffusers())}
    if cfg.family == "sd2":
        back["text"] = convert_open_clip_checkpoint(text, ldm)
        # diffusers converts every block it finds; the one past the model's layers is our all-zero identity block
        extra = {k: v for k, v in back["text"].items() if f"layers.{cfg.text.num_layers}." in k}
        assert extra and all(not v.any() for v in extra.values())
        back["text"] = {k: v for k, v in back["text"].items() if k not in extra}
    else:
        back["text"] = convert_ldm_clip_checkpoint(ldm)
    for name, original in (("unet", unet.state_dict()), ("vae", vae.state_dict()), ("text", text_state_dict(text))):
        assert back[name].keys() == original.keys(), name
        for k, v in original.items():
            assert torch.equal(back[name][k], v), f"{name}: {k}"
    # and our load direction inverts our save direction
    names = ldm_keys.ldm_names(cfg, {"unet": unet.state_dict(), "vae": vae.state_dict(),
                                     "text_encoder": text_state_dict(text)})
    for k, v in text_state_dict(text).items():
        assert torch.equal(ldm_keys.from_ldm(ldm[names["text_encoder"][k].key], names["text_encoder"][k]), v), k
    for c, sd in (("unet", unet.state_dict()), ("vae", vae.state_dict())):
        for k, v in sd.items():
            assert torch.equal(ldm_keys.from_ldm(ldm[names[c][k].key], names[c][k]), v), k
    # the whole configuration comes back from the shapes
    assert ldm_keys.detect_config({k: v.shape for k, v in ldm.items()}, "x.safetensors") == cfg


# Keys and shapes of the published files (sd-v1-5-inpainting, 512-base-ema / 768-v-ema / 512-inpainting-ema),
# as diffusers' single_file_utils.CHECKPOINT_KEY_NAMES and infer_diffusers_model_type read them.
KNOWN = {
    "sd1": {"model.diffusion_model.output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
            "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
            "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
            "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
            "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 768),
            "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc1.weight": (3072, 768)},
    "sd2": {"model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
            "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320),
            "model.diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q.weight": (1280, 1280),
            "cond_stage_model.model.token_embedding.weight": (49408, 1024),
            "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight": (3072, 1024)},
}


@pytest.mark.parametrize("name", ["sd15", "sd15-inpaint", "sd2-base", "sd2-inpaint", "sd21-v"])
def test_full_size_config_detected_from_shapes(name):
    cfg = PRESETS[name]
    modules = _meta_modules(cfg)  # meta tensors: shapes only, nothing allocated
    ldm = ldm_keys.to_ldm(cfg, {c: m.state_dict() for c, m in modules.items()})
    shapes = {k: tuple(v.shape) for k, v in ldm.items()}
    for key, shape in KNOWN[cfg.family].items():
        assert shapes[key] == shape, key
    assert shapes["model.diffusion_model.input_blocks.0.0.weight"] == (320, cfg.unet.in_channels, 3, 3)
    if cfg.family == "sd2":  # the published files also hold OpenCLIP's contrastive head
        shapes |= {ldm_keys.OPENCLIP + "text_projection": (1024, 1024), ldm_keys.OPENCLIP + "logit_scale": ()}
    assert ldm_keys.detect_config(shapes, name, prediction_type=cfg.prediction_type) == cfg


# -------------------------------------------------------------------------------------------------- parity

def _tokenizer_folder(cfg, path):
    from transformers import CLIPTokenizer
    Tokenizer.from_assets(cfg.text.pad_token_id).save(path)
    return CLIPTokenizer.from_pretrained(path)


def test_diffusers_folder_parity_and_round_trip(case, tmp_path):
    """(a) a folder written by diffusers' own save_pretrained; then load -> save (LDM) -> load is exact."""
    from diffusers import PNDMScheduler, StableDiffusionInpaintPipeline, StableDiffusionPipeline
    cfg, (unet, vae, text) = case
    cls = StableDiffusionInpaintPipeline if cfg.unet.is_inpaint else StableDiffusionPipeline
    pipe = cls(vae=vae, text_encoder=text, tokenizer=_tokenizer_folder(cfg, tmp_path / "tok"), unet=unet,
               scheduler=PNDMScheduler.from_config(cfg.scheduler.to_diffusers("v_prediction")),
               safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(tmp_path / "diffusers")
    # transformers 5 saves the tokenizer as tokenizer.json alone; nn/tokenizer.py reads the vocab.json +
    # merges.txt pair that the published SD folders ship, so add it (the tokenizer's own tests cover the ids)
    Tokenizer.from_assets(cfg.text.pad_token_id).save(tmp_path / "diffusers" / "tokenizer")
    model = load_model(tmp_path / "diffusers")
    assert model.config.prediction_type == "v_prediction"
    assert model.config == dataclasses.replace(cfg, prediction_type="v_prediction",
                                               scheduler=model.config.scheduler)
    assert model.config.scheduler.beta_schedule == "scaled_linear" and model.config.scheduler.steps_offset == 1
    assert model.tokenizer.pad_token_id == cfg.text.pad_token_id
    assert not model.unet.training and next(model.unet.parameters()).dtype == torch.float32
    assert_matches_reference(model, (unet, vae, text), cfg)
    again = load_model(save_model(model, tmp_path / "m.safetensors", layout="ldm"))  # round trip, LDM layout
    assert again.config == model.config
    assert_same_tensors(again, model)


def test_ldm_single_file_parity_and_round_trip(case, tmp_path):
    """(b) an LDM file as published: EMA copies, schedule buffers, position_ids, SD2's real 24th-style block and
    contrastive head; no config metadata, so the configuration comes from the shapes. Then load -> save
    (diffusers) -> load is exact."""
    cfg, ref = case
    ldm = ldm_state_dict(cfg, ref)
    ldm |= {"betas": torch.rand(1000), "alphas_cumprod": torch.rand(1000), "model_ema.decay": torch.tensor(0.9999),
            "model_ema.num_updates": torch.tensor(7), "model_ema.diffusion_modelconv_inweight": torch.rand(3)}
    if cfg.family == "sd2":
        last = f"{ldm_keys.OPENCLIP}transformer.resblocks.{cfg.text.num_layers}."
        ldm |= {k: torch.randn_like(v) for k, v in ldm.items() if k.startswith(last)}  # unused, not zeros
        ldm |= {ldm_keys.OPENCLIP + "text_projection": torch.randn(128, 128),
                ldm_keys.OPENCLIP + "logit_scale": torch.tensor(4.6)}
    else:
        ldm[ldm_keys.CLIP + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file(ldm, tmp_path / "sd.safetensors")
    model = load_model(tmp_path / "sd.safetensors")
    assert model.config == cfg
    assert_matches_reference(model, ref, cfg)
    again = load_model(save_model(model, tmp_path / "folder"))  # round trip, diffusers layout
    assert again.config == model.config
    assert_same_tensors(again, model)


def test_saved_folder_opens_in_diffusers(tmp_path):
    """save_model(layout="diffusers") writes configs exactly as diffusers/transformers do, and from_pretrained
    loads our weights into the same numbers."""
    from diffusers import AutoencoderKL, StableDiffusionInpaintPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig

    cfg = tiny_config("sd2", 9)
    model = init_model(cfg, seed=3)
    save_model(model, tmp_path / "ours")
    pipe = StableDiffusionInpaintPipeline.from_pretrained(tmp_path / "ours")
    assert pipe.scheduler.config.prediction_type == "epsilon"
    assert_matches_reference(model, (pipe.unet, pipe.vae, pipe.text_encoder), cfg)
    assert pipe.tokenizer(["a red chair"], padding="max_length", max_length=77, return_tensors="pt").input_ids.equal(
        model.tokenizer(["a red chair"]))
    # SD2: upcast_attention, as SD 2.1's own folder (diffusers' fp16 attention needs it; ours accumulates in fp32)
    UNet2DConditionModel.from_config({**cfg.unet.to_diffusers(), "upcast_attention": True}).save_config(
        tmp_path / "ref_unet")
    AutoencoderKL.from_config(cfg.vae.to_diffusers()).save_config(tmp_path / "ref_vae")
    CLIPTextConfig(**cfg.text.to_transformers()).save_pretrained(tmp_path / "ref_text")
    version = {"_diffusers_version", "transformers_version"}
    for ours, ref in (("unet", "ref_unet"), ("vae", "ref_vae"), ("text_encoder", "ref_text")):
        a, b = json.loads((tmp_path / "ours" / ours / "config.json").read_text()), json.loads(
            (tmp_path / ref / "config.json").read_text())
        if ours == "text_encoder":  # a config saved alone has no dtype; transformers adds the model's
            b.setdefault("dtype", "float32")
        assert {k: v for k, v in a.items() if k not in version} == {k: v for k, v in b.items() if k not in version}


# ------------------------------------------------------------------------------------- variants and dtypes

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny SD1 inpainting model saved in both layouts."""
    root = tmp_path_factory.mktemp("saved")
    model = init_model(tiny_config("sd1", 9), seed=5)
    save_model(model, root / "folder")
    save_model(model, root / "sd.safetensors", layout="ldm")
    return model, root


def assert_state_equal(model: Model, expected: dict) -> None:
    for name, m in model.modules().items():
        sd = m.state_dict()
        assert sd.keys() == expected[name].keys(), name
        for k, v in sd.items():
            assert v.dtype == expected[name][k].dtype and torch.equal(v, expected[name][k]), f"{name}.{k}"


def test_dtype_cast_while_loading(saved, tmp_path):
    model, root = saved
    state = {c: m.state_dict() for c, m in model.modules().items()}

    def cast(*dtypes):
        def chain(v):
            for d in dtypes:
                v = v.to(d)
            return v
        return {c: {k: chain(v) for k, v in sd.items()} for c, sd in state.items()}

    low = {}
    for dtype, path in ((torch.float16, root / "sd.safetensors"), (torch.bfloat16, root / "folder")):
        low[dtype] = load_model(path, dtype=dtype)
        assert low[dtype].dtype == dtype
        assert_state_equal(low[dtype], cast(dtype))
    half = save_model(low[torch.float16], tmp_path / "half.safetensors", layout="ldm")
    assert_state_equal(load_model(half), cast(torch.float16, torch.float32))  # fp16 file -> fp32: exact upcast


def test_folder_variants_sharded_fp16_legacy_names(saved, tmp_path):
    model, root = saved
    folder = tmp_path / "variants"
    shutil.copytree(root / "folder", folder)
    # unet: two shards + index; text_encoder: only the .fp16 variant; vae: pre-0.14 attention names
    unet = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    keys = sorted(unet)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[::2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[1::2]}
    for name, ks in shards.items():
        save_file({k: unet[k] for k in ks}, folder / "unet" / name)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: name for name, ks in shards.items() for k in ks}}))
    (folder / "text_encoder" / "model.safetensors").rename(folder / "text_encoder" / "model.fp16.safetensors")
    vae = load_file(folder / "vae" / "diffusion_pytorch_model.safetensors")
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    save_file({re.sub(r"attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.", lambda m: f"attentions.0.{legacy[m[1]]}.", k): v
               for k, v in vae.items()}, folder / "vae" / "diffusion_pytorch_model.safetensors")
    assert_same_tensors(load_model(folder), model)
    index = folder / "unet" / "diffusion_pytorch_model.safetensors.index.json"
    for outside in ("../../outside.safetensors", str(tmp_path / "outside.safetensors"), 7):
        index.write_text(json.dumps({"weight_map": {keys[0]: outside}}))  # a third-party index may point anywhere
        with pytest.raises(CheckpointError, match="not a file name beside the index"):
            load_model(folder)


def test_sd1_file_without_text_model_level(saved, tmp_path):
    model, root = saved
    sd = load_file(root / "sd.safetensors")
    old = {k.replace(ldm_keys.CLIP + "text_model.", ldm_keys.CLIP): v for k, v in sd.items()}
    save_file(old, tmp_path / "old.safetensors")  # no metadata either: detected from shapes
    loaded = load_model(tmp_path / "old.safetensors")
    assert loaded.config == model.config
    assert_same_tensors(loaded, model)


def test_pickle_refused_with_a_working_recipe_and_allowed_on_request(saved, tmp_path):
    model, root = saved
    ckpt = tmp_path / "Bob's $HOME" / "model.ckpt"  # the command is for a shell: quoted, these stay as they are
    ckpt.parent.mkdir()
    torch.save({"state_dict": load_file(root / "sd.safetensors"), "global_step": 12}, ckpt)
    with pytest.raises(CheckpointError, match=re.escape(str(ckpt))) as err:
        load_model(ckpt)
    assert "allow_pickle=True" in str(err.value)
    assert_same_tensors(load_model(ckpt, allow_pickle=True), model)
    recipe = str(err.value).split("\n  python ", 1)[1].split("\n")[0]  # the conversion one-liner the message gives
    subprocess.run(f"{shlex.quote(sys.executable)} {recipe}", shell=True, check=True, timeout=120)
    assert_same_tensors(load_model(ckpt.with_suffix(".safetensors")), model)


def test_init_model_is_deterministic_in_seed():
    state = torch.random.get_rng_state()
    a, b, c = init_model("tiny", seed=1), init_model("tiny", seed=1), init_model("tiny", seed=2)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is left alone
    assert_same_tensors(a, b)
    assert not torch.equal(a.unet.conv_in.weight, c.unet.conv_in.weight)
    assert a.config == PRESETS["tiny"] and a.tokenizer.pad_token_id == 49407 and not a.unet.training


def test_save_replaces_atomically(saved, tmp_path):
    model, _ = saved
    target = tmp_path / "out"
    save_model(init_model("tiny", seed=0), target)
    save_model(model, target)  # replaces the folder as a whole
    save_model(model, tmp_path / "m.safetensors", layout="ldm")
    save_model(model, tmp_path / "m.safetensors", layout="ldm")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors", "out"]  # no temporaries left
    assert_same_tensors(load_model(target), model)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a model folder"):
        save_model(model, tmp_path / "notes")


# --------------------------------------------------------------------------------------------- bad input

def _error(path, **kwargs) -> str:
    with pytest.raises(CheckpointError) as err:
        load_model(path, **kwargs)
    assert str(path) in str(err.value)
    return str(err.value)


def test_bad_single_files_name_file_key_and_shapes(saved, tmp_path):
    _, root = saved
    sd = load_file(root / "sd.safetensors")
    key = ldm_keys.UNET + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"

    def write(name, tensors):
        save_file(tensors, tmp_path / name)
        return tmp_path / name

    msg = _error(write("missing.safetensors", {k: v for k, v in sd.items() if k != key}))
    assert f"1 missing: {key}" in msg
    msg = _error(write("shape.safetensors", {**sd, key: torch.zeros(7, 32)}))
    assert f"{key}: file (7, 32) vs model (32, 32)" in msg
    msg = _error(write("extra.safetensors", {**sd, "model.diffusion_model.lora_up.weight": torch.zeros(1)}))
    assert "1 unexpected: model.diffusion_model.lora_up.weight" in msg
    many = {k: v for k, v in sd.items() if not k.endswith("attn1.to_q.weight")}  # 16 attention blocks
    assert re.search(r"\d+ missing: .*[^,] and \d+ more", _error(write("many.safetensors", many)))
    msg = _error(write("notsd.safetensors", {"weight": torch.zeros(2)}))
    assert "no text encoder found" in msg

    truncated = tmp_path / "truncated.safetensors"
    data = (root / "sd.safetensors").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    assert "truncated" in _error(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(struct.pack("<Q", 16) + b"{not json at all")
    assert "corrupt safetensors header" in _error(garbage)
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"\x01\x02")
    assert "not a safetensors file: 2 bytes, too short" in _error(tiny)  # not "the None-byte header"
    assert "no such file" in _error(tmp_path / "absent.safetensors")


def test_bad_folders_say_what_was_expected(saved, tmp_path):
    _, root = saved
    (tmp_path / "empty").mkdir()
    assert "not a model folder: expected a diffusers" in _error(tmp_path / "empty")
    run = tmp_path / "run"  # `backdrop train`'s --out, given where its final/ is meant
    shutil.copytree(root / "folder", run / "final")
    assert f"a training run's folder, not a model; its model is {run / 'final'}" in _error(run)
    (tmp_path / "onnx").mkdir()
    (tmp_path / "onnx" / "backdrop_export.json").write_text("{}")
    assert "an ONNX export, not a model folder; run it with --backend onnxruntime" in _error(tmp_path / "onnx")
    no_unet = tmp_path / "no_unet"
    shutil.copytree(root / "folder", no_unet)
    shutil.rmtree(no_unet / "unet")
    assert "has no unet/" in _error(no_unet)

    broken = tmp_path / "broken"
    shutil.copytree(root / "folder", broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    sd = load_file(weights)
    del sd["conv_in.weight"]
    save_file(sd, weights)
    msg = _error(broken)
    assert str(weights) in msg and "1 missing: conv_in.weight" in msg

    pickled = tmp_path / "pickled"  # an old Hub folder: every component a pickle
    shutil.copytree(root / "folder", pickled)
    for part, stem, name in (("unet", "diffusion_pytorch_model", "diffusion_pytorch_model.bin"),
                             ("vae", "diffusion_pytorch_model", "diffusion_pytorch_model.bin"),
                             ("text_encoder", "model", "pytorch_model.bin")):  # transformers' pickle name
        torch.save(load_file(pickled / part / f"{stem}.safetensors"), pickled / part / name)
        (pickled / part / f"{stem}.safetensors").unlink()
    msg = _error(pickled)  # all three in one error, and one command that converts them to the names read
    assert msg.startswith(f"3 pickle weight files ({pickled / 'unet'}") and "can run arbitrary code" in msg
    assert_same_tensors(load_model(pickled, allow_pickle=True), saved[0])
    subprocess.run([sys.executable, "-c", shlex.split(msg.split("python -c ", 1)[1])[0]], check=True, timeout=120)
    assert_same_tensors(load_model(pickled), saved[0])  # it converted text_encoder/pytorch_model.bin to model.*
    for part in ("unet", "vae", "text_encoder"):
        for f in (pickled / part).glob("*.safetensors"):
            f.unlink()
    sd = load_file(root / "folder" / "unet" / "diffusion_pytorch_model.safetensors")  # diffusers' sharded pickle
    half = sorted(sd)[:len(sd) // 2]
    for i, keys in ((1, half), (2, [k for k in sd if k not in half])):
        torch.save({k: sd[k] for k in keys}, pickled / "unet" / f"diffusion_pytorch_model-0000{i}-of-00002.bin")
    (pickled / "unet" / "diffusion_pytorch_model.bin").unlink()
    (pickled / "unet" / "diffusion_pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {
        k: f"diffusion_pytorch_model-0000{1 if k in half else 2}-of-00002.bin" for k in sd}}))
    assert "diffusion_pytorch_model.bin.index.json: sharded pickle weights" in _error(pickled)
    assert_same_tensors(load_model(pickled, allow_pickle=True), saved[0])
    (pickled / "text_encoder" / "pytorch_model.bin").unlink()
    assert "no weights: expected model.safetensors" in _error(pickled, allow_pickle=True)


def test_mask_conditioned_vae_folder(tmp_path):
    """A mask-conditioned VAE saves as diffusers' AsymmetricAutoencoderKL (class in model_index.json and
    vae/config.json), which diffusers opens with the same weights and we load back strictly; LDM single files have
    no layout for it, so saving one is refused with a clear error."""
    diffusers = pytest.importorskip("diffusers")
    cfg = PRESETS["tiny-inpaint"]
    cfg = dataclasses.replace(cfg, vae=dataclasses.replace(cfg.vae, mask_conditioned=True))
    model = init_model(cfg, seed=2)
    folder = save_model(model, tmp_path / "m")
    assert json.loads((folder / "model_index.json").read_text())["vae"] == ["diffusers", "AsymmetricAutoencoderKL"]
    loaded = load_model(folder)
    assert loaded.config == model.config
    ref = diffusers.AsymmetricAutoencoderKL.from_pretrained(folder / "vae").eval()
    sd = model.vae.state_dict()
    assert set(ref.state_dict()) == set(sd) and any(k.startswith("decoder.condition_encoder.") for k in sd)
    for k, v in loaded.vae.state_dict().items():
        assert torch.equal(v, sd[k]) and torch.equal(ref.state_dict()[k], sd[k]), k
    with pytest.raises(CheckpointError, match="diffusers folder"):
        save_model(model, tmp_path / "m.safetensors", layout="ldm")


def test_saved_models_and_checkpoints_have_the_usual_permissions(saved, tmp_path):
    """safetensors writes 0600 files and mkdtemp makes 0700 folders: a model, an LDM file or a training checkpoint
    a colleague on the machine could not read. They get 0666 / 0777 less the umask, as open / mkdir give."""
    from backdrop.train.checkpointing import save_checkpoint

    model, _ = saved
    umask = os.umask(0)
    os.umask(umask)
    made = [save_model(model, tmp_path / "folder"), save_model(model, tmp_path / "m.safetensors", layout="ldm"),
            save_checkpoint(tmp_path / "ckpt", 3, {"w": torch.zeros(2)}, {"step": 3})]
    for root in made:
        for p in [root, *root.rglob("*")] if root.is_dir() else [root]:
            assert p.stat().st_mode & 0o777 == (0o777 if p.is_dir() else 0o666) & ~umask, p
