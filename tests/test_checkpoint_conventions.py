"""Checkpoint conventions that a round trip through our own code cannot check, each against an outside source: the
published LDM key names, diffusers' and transformers' loaders, and LDM's own defaults.

- The UNet upsampler of a level with cross-attention sits at `output_blocks.N.2.conv` in the published SD 1.x/2.x
  files (diffusers' LDM converter accepts both .1 and .2, so it cannot tell).
- An original .yaml without `parameterization:` (v1-inference.yaml, v2-inference.yaml) is an epsilon model.
- Only an SD2 file read as v_prediction is the 768-v model; an SD1 v-prediction fine-tune keeps SD1's 512 px.
- A saved inpainting folder opens in diffusers' DiffusionPipeline as StableDiffusionInpaintPipeline.
- A vae/config.json without scaling_factor (diffusers folders saved before it was a field) reads as diffusers reads it.
- A component folder holding both full-precision and .fp16 weights is read from the full ones, as diffusers'
  and transformers' from_pretrained do without variant=.
"""
import json
import logging
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from backdrop.diffusion.pipeline import Pipeline
from backdrop.nn import ldm_keys
from backdrop.nn.checkpoint import _meta_modules, init_model, load_model, save_model
from backdrop.nn.config import PRESETS, VAEConfig
from test_single_file_options import ldm_tensors, with_spread, write

pytestmark = [pytest.mark.usefixtures("one_thread"),  # conftest.py
              pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")]

# ------------------------------------------------------------------------------------------- LDM key names

# The UNet upsampler convs of the published SD 1.x/2.x files (sd-v1-5, 512-base-ema, 768-v-ema and their inpainting
# variants; model-type probes match SD1 files by these names, e.g. metastable's getModelDetails: output_blocks.2.1,
# 5.2 and 8.2 .conv.weight). openaimodel.py builds each output block as
# TimestepEmbedSequential(ResBlock, [SpatialTransformer], [Upsample]), so the upsampler's index is 2 on levels with
# attention (up levels 1 and 2) and 1 on the attention-free lowest level (up level 0).
UPSAMPLERS = {"output_blocks.2.1.conv.weight": (1280, 1280, 3, 3), "output_blocks.2.1.conv.bias": (1280,),
              "output_blocks.5.2.conv.weight": (1280, 1280, 3, 3), "output_blocks.5.2.conv.bias": (1280,),
              "output_blocks.8.2.conv.weight": (640, 640, 3, 3), "output_blocks.8.2.conv.bias": (640,)}


@pytest.mark.parametrize("name", ["sd15", "sd15-inpaint", "sd2-base", "sd21-v"])
def test_unet_upsamplers_have_the_published_ldm_names(name):
    """Every published file names them so: a wrong index refuses every real file (missing keys), and a file we
    save would leave the convs at random init in A1111/ComfyUI, which load without strict key checks."""
    cfg = PRESETS[name]
    modules = _meta_modules(cfg)  # meta tensors: shapes only, nothing allocated
    ldm = ldm_keys.to_ldm(cfg, {c: m.state_dict() for c, m in modules.items()})
    convs = {k.removeprefix(ldm_keys.UNET): tuple(v.shape) for k, v in ldm.items()
             if re.fullmatch(re.escape(ldm_keys.UNET) + r"output_blocks\.\d+\.\d+\.conv\.(weight|bias)", k)}
    assert convs == UPSAMPLERS


# ------------------------------------------------------------------------------------------- prediction type

# The head of Stability's v2-inference.yaml (512-base-ema) and of CompVis' v1-inference.yaml: no parameterization
# line, so LDM's default applies (ldm/models/diffusion/ddpm.py: parameterization="eps").
V2_INFERENCE = """model:
  base_learning_rate: 1.0e-4
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.00085
    linear_end: 0.0120
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: "jpg"
    cond_stage_key: "txt"
    image_size: 64
    channels: 4
    cond_stage_trainable: false
    conditioning_key: crossattn
    monitor: val/loss_simple_ema
    scale_factor: 0.18215
    use_ema: False
"""
V1_INFERENCE = V2_INFERENCE.replace('"jpg"', '"image"').replace('"txt"', '"caption"')


def test_an_original_yaml_without_parameterization_is_epsilon(tmp_path, caplog):
    """512-base-ema.safetensors with A1111's sidecar v2-inference.yaml is an epsilon model, even where its weights
    would make the guess say v (the yaml decides, so no warning either); likewise an SD1 file given
    v1-inference.yaml as diffusers' original_config=."""
    _, sd = ldm_tensors("sd2")
    path = write(tmp_path, "512-base-ema.safetensors", with_spread(sd, 0.2))  # weights that would guess v
    (tmp_path / "512-base-ema.yaml").write_text(V2_INFERENCE)
    with caplog.at_level(logging.WARNING, logger="backdrop.nn.checkpoint"):
        cfg = load_model(path).config
    assert (cfg.prediction_type, cfg.image_size, cfg.unet.sample_size) == ("epsilon", 512, 64)
    assert caplog.text == ""
    _, sd1 = ldm_tensors("sd1")
    (tmp_path / "v1-inference.yaml").write_text(V1_INFERENCE)
    pipe = Pipeline.from_single_file(write(tmp_path, "sd1.safetensors", sd1), device="cpu", dtype="fp32",
                                     original_config=tmp_path / "v1-inference.yaml")
    assert pipe.config.prediction_type == "epsilon"


def test_only_an_sd2_file_read_as_v_prediction_is_the_768_model(tmp_path):
    """prediction_type="v_prediction" on an SD1 file (a v-prediction fine-tune of SD 1.5) keeps SD1's native 512 px
    and 64-latent sample size; SD2's 768-v-ema is the one official v-model at 768 px."""
    for family, size in (("sd1", 512), ("sd2", 768)):
        _, sd = ldm_tensors(family)
        cfg = load_model(write(tmp_path, f"{family}.safetensors", sd), prediction_type="v_prediction").config
        assert cfg.family == family and cfg.prediction_type == "v_prediction"
        assert (cfg.image_size, cfg.unet.sample_size) == (size, size // 8), family


# ------------------------------------------------------------------------------------------ diffusers folders

@pytest.mark.parametrize("preset, pipeline", [("tiny-inpaint", "StableDiffusionInpaintPipeline"),
                                              ("tiny", "StableDiffusionPipeline")])
def test_diffusion_pipeline_opens_a_saved_folder_as_its_kind(tmp_path, preset, pipeline):
    """diffusers' DiffusionPipeline.from_pretrained picks the pipeline class from model_index.json: a 9-channel
    model opened as text-to-image fails at its first call (9 vs 4 channels)."""
    from diffusers import DiffusionPipeline
    folder = save_model(init_model(preset, seed=1), tmp_path / "m")
    pipe = DiffusionPipeline.from_pretrained(folder)
    assert type(pipe).__name__ == pipeline
    assert pipe.unet.config.in_channels == PRESETS[preset].unet.in_channels


def test_vae_config_without_scaling_factor_reads_as_diffusers_reads_it(tmp_path):
    """Folders saved before diffusers 0.10 (the first CompVis/stable-diffusion-v1-4 upload) have no scaling_factor
    in vae/config.json; AutoencoderKL then uses its default, and so must we: latents 5.5x off otherwise."""
    from diffusers import AsymmetricAutoencoderKL, AutoencoderKL
    folder = save_model(init_model("tiny", seed=1), tmp_path / "m")
    config = json.loads((folder / "vae" / "config.json").read_text())
    del config["scaling_factor"]
    (folder / "vae" / "config.json").write_text(json.dumps(config))
    expected = AutoencoderKL.from_pretrained(folder / "vae").config.scaling_factor
    assert load_model(folder).config.vae.scaling_factor == expected
    # the mask-conditioned VAE's config (AsymmetricAutoencoderKL) likewise
    asym = VAEConfig(block_out_channels=(32, 64), layers_per_block=1, mask_conditioned=True).to_diffusers()
    del asym["scaling_factor"]
    assert VAEConfig.from_diffusers(asym).scaling_factor == AsymmetricAutoencoderKL.from_config(
        asym).config.scaling_factor


def test_full_precision_weights_win_over_the_fp16_variant_beside_them(tmp_path):
    """Many hub folders hold both `diffusion_pytorch_model.safetensors` and `.fp16.safetensors` (model.safetensors
    and model.fp16.safetensors). Without variant=, diffusers and transformers read the full-precision file; so must
    we, or an fp32 pipeline runs fp16-rounded weights. The variants here hold other values, so any mix-up shows."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel
    model = init_model("tiny", seed=1)
    folder = save_model(model, tmp_path / "m")
    other_folder = save_model(init_model("tiny", seed=2), tmp_path / "other")
    for c, stem in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                    ("text_encoder", "model")):
        other = load_file(other_folder / c / f"{stem}.safetensors")
        save_file({k: v.half() for k, v in other.items()}, folder / c / f"{stem}.fp16.safetensors")
    loaded = load_model(folder)
    refs = {"unet": UNet2DConditionModel.from_pretrained(folder / "unet").state_dict(),
            "vae": AutoencoderKL.from_pretrained(folder / "vae").state_dict(),
            "text_encoder": CLIPTextModel.from_pretrained(folder / "text_encoder").state_dict()}
    for name, m in loaded.modules().items():
        ours, original = m.state_dict(), model.modules()[name].state_dict()
        ref = {ldm_keys.folder_key(name, k): v for k, v in refs[name].items()}
        assert ours.keys() <= ref.keys(), name
        for k, v in ours.items():
            assert v.dtype == torch.float32 and torch.equal(v, original[k]), f"{name}.{k}"
            assert torch.equal(v, ref[k]), f"{name}.{k}: diffusers/transformers read other values"


def test_variant_reads_the_variant_files_as_diffusers_does(tmp_path, caplog):
    """from_pretrained(variant="fp16"): each component's .fp16.safetensors (sharded too), as diffusers' pipeline
    reads them; a component without the variant is read from its other weights, with a warning."""
    from diffusers import StableDiffusionPipeline
    folder = save_model(init_model("tiny", seed=1), tmp_path / "m")
    half = load_model(save_model(init_model("tiny", seed=2), tmp_path / "other"), dtype=torch.float16)
    for c, stem in (("unet", "diffusion_pytorch_model"), ("text_encoder", "model")):  # vae: no variant
        saved = load_file(save_model(half, tmp_path / "half") / c / f"{stem}.safetensors")
        save_file(saved, folder / c / f"{stem}.fp16.safetensors")
    theirs = StableDiffusionPipeline.from_pretrained(folder, variant="fp16", torch_dtype=torch.float16,
                                                     safety_checker=None, feature_extractor=None,
                                                     requires_safety_checker=False)
    with caplog.at_level(logging.WARNING, logger="backdrop.nn.weight_files"):
        pipe = Pipeline.from_pretrained(folder, device="cpu", dtype="auto", variant="fp16")
    assert pipe.dtype == torch.float16 and f"{folder / 'vae'}: no fp16 variant" in caplog.text
    model, plain = pipe.backend.model, load_model(folder)
    for name in ("unet", "text_encoder", "vae"):
        ref = {ldm_keys.folder_key(name, k): v for k, v in getattr(theirs, name).state_dict().items()}
        source = plain if name == "vae" else half  # the vae's own weights, cast; the variants' values
        for k, v in getattr(model, name).state_dict().items():
            assert torch.equal(v, ref[k]) and torch.equal(v, getattr(source, name).state_dict()[k].half()), k
    with pytest.raises(ValueError, match="variant='fp16' picks a model folder's weight files; this is one file"):
        load_model(save_model(plain, tmp_path / "one.safetensors", layout="ldm"), variant="fp16")
    with pytest.raises(ValueError, match="variant must be a name"):
        load_model(folder, variant="../x")
    # the commands' --variant (generate here; serve and export share the option)
    from PIL import Image

    from backdrop.cli import main
    args = ["generate", "--model", folder, "--variant", "fp16", "--dtype", "fp32", "--steps", "2", "--seed", "1",
            "--prompt", "a cup", "--quiet", "--out", tmp_path / "out"]
    assert main([str(a) for a in args]) == 0
    want = Pipeline.from_pretrained(folder, device="cpu", dtype=torch.float32, variant="fp16")
    image = want.generate("a cup", steps=2, seed=1, progress=False).images[0]
    assert np.array_equal(np.asarray(Image.open(next((tmp_path / "out").glob("*.png")))), np.asarray(image))
