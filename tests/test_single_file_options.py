"""What an original single-file checkpoint does not say, and what users give beside it: the prediction type of an
SD 2.x file (argument, A1111's sidecar .yaml, diffusers' original_config=, else ComfyUI's weight test with a
warning), a VAE of its own (vae= / --vae: A1111's "SD VAE"), and files that are not SD 1.x/2.x models at all."""
import logging

import pytest
import torch
from safetensors.torch import save_file

from backdrop.diffusion.pipeline import Pipeline
from backdrop.nn import ldm_keys
from backdrop.nn.checkpoint import CheckpointError, init_model, load_model, load_vae, save_model
from test_checkpoint import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py
PROBE = ldm_keys.UNET + "output_blocks.11.1.transformer_blocks.0.norm1.bias"  # SD2's last attention block


def ldm_tensors(family: str, in_channels: int = 4, seed: int = 0) -> tuple:
    """(model, its LDM state dict as published: no backdrop config metadata, so shapes decide)."""
    model = init_model(tiny_config(family, in_channels), seed=seed)
    return model, ldm_keys.to_ldm(model.config, {c: m.state_dict() for c, m in model.modules().items()})


def write(tmp_path, name: str, tensors: dict):
    save_file(tensors, tmp_path / name)
    return tmp_path / name


def with_spread(sd: dict, spread: float) -> dict:
    """The probe bias with this standard deviation (the 768-v models' is above 0.09, the 512-base ones' below)."""
    g = torch.Generator().manual_seed(0)
    bias = torch.randn(sd[PROBE].shape, generator=g)
    return {**sd, PROBE: bias / bias.std(unbiased=False) * spread}


@pytest.mark.parametrize("spread, expected", [(0.2, "v_prediction"), (0.02, "epsilon")])
def test_sd2_file_prediction_type_guessed_from_weights_with_a_warning(tmp_path, caplog, spread, expected):
    _, sd = ldm_tensors("sd2")
    path = write(tmp_path, "v2-1.safetensors", with_spread(sd, spread))
    with caplog.at_level(logging.WARNING, logger="backdrop.nn.checkpoint"):
        model = load_model(path)
    assert model.config.prediction_type == expected
    assert model.config.image_size == (768 if expected == "v_prediction" else 512)
    assert f"guessed {expected}" in caplog.text and "--prediction-type" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="backdrop.nn.checkpoint"):  # said: no guess, no warning
        other = "epsilon" if expected == "v_prediction" else "v_prediction"
        assert load_model(path, prediction_type=other).config.prediction_type == other
    assert caplog.text == ""


def test_sd1_and_inpainting_files_are_epsilon_without_a_guess(tmp_path, caplog):
    for family, channels in (("sd1", 4), ("sd2", 9)):
        _, sd = ldm_tensors(family, channels)
        if PROBE in sd:
            sd = with_spread(sd, 0.2)  # an inpainting UNet is epsilon whatever its weights
        with caplog.at_level(logging.WARNING, logger="backdrop.nn.checkpoint"):
            assert load_model(write(tmp_path, f"{family}.safetensors", sd)).config.prediction_type == "epsilon"
    assert caplog.text == ""


def test_original_config_yaml_beside_the_file_or_given(tmp_path, caplog):
    """A1111 reads `<name>.yaml` beside the checkpoint; diffusers' from_single_file takes original_config=."""
    _, sd = ldm_tensors("sd2")
    path = write(tmp_path, "768-v-ema.safetensors", with_spread(sd, 0.02))  # weights that would guess epsilon
    v_yaml = "model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n  params:\n    parameterization: \"v\"\n"
    (tmp_path / "768-v-ema.yaml").write_text(v_yaml)
    with caplog.at_level(logging.WARNING, logger="backdrop.nn.checkpoint"):
        assert load_model(path).config.prediction_type == "v_prediction"
    assert caplog.text == ""
    v_path = write(tmp_path, "v-weights.safetensors", with_spread(sd, 0.2))  # weights that would guess v
    (tmp_path / "v-weights.yaml").write_text("model:\n  params:\n    parameterization: eps\n")
    with caplog.at_level(logging.WARNING, logger="backdrop.nn.checkpoint"):  # the yaml decides, not the guess
        assert load_model(v_path).config.prediction_type == "epsilon"
    assert caplog.text == ""
    (tmp_path / "768-v-ema.yaml").unlink()
    (tmp_path / "elsewhere.yaml").write_text(v_yaml)
    pipe = Pipeline.from_single_file(path, device="cpu", dtype="fp32", original_config=tmp_path / "elsewhere.yaml")
    assert pipe.config.prediction_type == "v_prediction"
    with pytest.raises(ValueError, match="says 'v_prediction'; give one"):
        Pipeline.from_single_file(path, original_config=tmp_path / "elsewhere.yaml", prediction_type="epsilon")
    (tmp_path / "x0.yaml").write_text("    parameterization: x0\n")
    with pytest.raises(CheckpointError, match="x0.yaml: parameterization 'x0'"):
        Pipeline.from_single_file(path, original_config=tmp_path / "x0.yaml")
    with pytest.raises(TypeError, match="does not take diffusers' config=: .*prediction_type="):
        Pipeline.from_single_file(path, config="stabilityai/stable-diffusion-2-1")


def test_pipeline_and_cli_take_the_prediction_type(tmp_path):
    from backdrop.cli import main
    _, sd = ldm_tensors("sd2")
    path = write(tmp_path, "v.safetensors", with_spread(sd, 0.02))
    pipe = Pipeline.from_pretrained(path, device="cpu", dtype="fp32", prediction_type="v_prediction")
    assert pipe.config.prediction_type == "v_prediction"
    assert main(["generate", "--model", str(path), "--prediction-type", "v_prediction", "--prompt", "x",
                 "--steps", "1", "--height", "64", "--width", "64", "--out", str(tmp_path / "out"), "--quiet"]) == 0


def test_a_vae_given_beside_the_model(tmp_path):
    """vae= (--vae): a VAE-only LDM file (keys without first_stage_model., as vae-ft-mse-840000-ema-pruned), a
    diffusers VAE folder or a model folder; it replaces the model's VAE, and a checkpoint shipped without one loads
    with it. Without it, that checkpoint's error says to give one."""
    model, sd = ldm_tensors("sd1", seed=1)
    donor, donor_sd = ldm_tensors("sd1", seed=2)
    vae_only = {k.removeprefix(ldm_keys.VAE): v for k, v in donor_sd.items() if k.startswith(ldm_keys.VAE)}
    no_vae = write(tmp_path, "pruned-novae.safetensors", {k: v for k, v in sd.items()
                                                          if not k.startswith(ldm_keys.VAE)})
    with pytest.raises(CheckpointError, match="has no VAE .*--vae"):
        load_model(no_vae)
    folder = save_model(donor, tmp_path / "donor")
    for vae in (write(tmp_path, "vae-ft-mse.safetensors", vae_only), folder, folder / "vae",
                write(tmp_path, "whole.safetensors", donor_sd)):
        loaded = load_model(no_vae, vae=vae)
        for a, b in zip(loaded.vae.state_dict().values(), donor.vae.state_dict().values()):
            assert torch.equal(a, b), vae
        assert torch.equal(next(iter(loaded.unet.state_dict().values())), next(iter(model.unet.state_dict().values())))
    replaced = load_model(save_model(model, tmp_path / "model"), vae=folder / "vae")  # a folder's own VAE replaced
    assert all(torch.equal(a, b) for a, b in zip(replaced.vae.state_dict().values(), donor.vae.state_dict().values()))
    assert load_vae(folder, dtype=torch.float16).cfg == donor.config.vae
    pipe = Pipeline.from_pretrained(no_vae, device="cpu", dtype="fp32", vae=str(tmp_path / "vae-ft-mse.safetensors"))
    assert pipe.generate("x", steps=1, height=64, width=64, progress=False, output_type="np").images.shape[0] == 1
    with pytest.raises(TypeError, match="vae= takes the path"):
        Pipeline.from_pretrained(no_vae, vae=donor.vae)
    with pytest.raises(CheckpointError, match="1 unexpected: encoder.extra"):
        load_vae(write(tmp_path, "bad-vae.safetensors", {**vae_only, "encoder.extra": torch.zeros(1)}))


@pytest.mark.parametrize("keys, says", [
    ({"conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (8, 4),
      ldm_keys.UNET + "label_emb.0.0.weight": (4, 4)}, "an SDXL checkpoint"),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 8)}, "a LoRA, not a model: .*--lora"),
    ({"encoder.conv_in.weight": (8, 3, 3, 3), "decoder.conv_out.weight": (3, 8, 3, 3)}, "a VAE alone, .*--vae"),
    ({ldm_keys.UNET + "input_blocks.0.0.weight": (8, 4, 3, 3)}, "a UNet without the text encoder"),
    ({"conv_in.weight": (8, 4, 3, 3), "down_blocks.0.resnets.0.conv1.weight": (8, 8, 3, 3)},  # unet/ of a folder
     "a diffusers UNet's weights .unet/ of a model folder., not a model: give the model folder"),
    ({"text_model.embeddings.token_embedding.weight": (49408, 8)}, "a text encoder alone"),
])
def test_files_that_are_not_models_say_what_they_are(tmp_path, keys, says):
    path = write(tmp_path, "file.safetensors", {k: torch.zeros(s) for k, s in keys.items()})
    with pytest.raises(CheckpointError, match=says):
        load_model(path)
