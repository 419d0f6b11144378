"""Configs: presets are valid, and they survive the trip through diffusers'/transformers' own config classes."""
import dataclasses

import pytest

from backdrop.nn.config import PRESETS, ModelConfig, TextConfig, UNetConfig, VAEConfig, get_preset


def test_import_does_no_work():
    import subprocess
    import sys

    code = "import sys, backdrop; print(sorted(m for m in sys.modules if m.startswith(('backdrop.', 'torch'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"  # `import backdrop` imports neither torch nor any submodule


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_round_trips_through_diffusers(name):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    cfg = PRESETS[name]
    assert UNetConfig.from_diffusers(cfg.unet.to_diffusers()) == cfg.unet
    assert VAEConfig.from_diffusers(cfg.vae.to_diffusers()) == cfg.vae
    tcfg = CLIPTextConfig(**cfg.text.to_transformers())
    assert TextConfig.from_transformers(tcfg.to_dict(), pad_token_id=cfg.text.pad_token_id) == cfg.text
    if name.startswith("tiny"):  # diffusers' own config machinery accepts our dicts and gives back the same config
        unet = UNet2DConditionModel.from_config(cfg.unet.to_diffusers())
        assert UNetConfig.from_diffusers(dict(unet.config)) == cfg.unet
        vae = AutoencoderKL.from_config(cfg.vae.to_diffusers())
        assert VAEConfig.from_diffusers(dict(vae.config)) == cfg.vae


def test_known_facts_about_presets():
    assert PRESETS["sd15"].unet.head_dims == (40, 80, 160, 160)
    assert PRESETS["sd2-base"].unet.head_dims == (64, 64, 64, 64)
    assert PRESETS["sd15-inpaint"].unet.in_channels == 9 and PRESETS["sd2-inpaint"].unet.is_inpaint
    assert PRESETS["sd21-v"].prediction_type == "v_prediction" and PRESETS["sd21-v"].image_size == 768
    assert PRESETS["sd2-base"].text.num_layers == 23 and PRESETS["sd2-base"].text.pad_token_id == 0
    assert PRESETS["sd15"].family == "sd1" and PRESETS["sd2-base"].family == "sd2"


def test_bad_configs_name_the_field():
    with pytest.raises(ValueError, match="num_heads"):
        UNetConfig(num_heads=(8, 8))
    with pytest.raises(ValueError, match="prediction_type"):
        ModelConfig(prediction_type="x0")
    with pytest.raises(ValueError, match="cross_attention_dim"):
        dataclasses.replace(PRESETS["sd15"], text=PRESETS["sd2-base"].text)
    with pytest.raises(ValueError, match="unknown preset 'sd3'"):
        get_preset("sd3")
    with pytest.raises(ValueError, match="class_embed_type"):
        UNetConfig.from_diffusers({**PRESETS["sd15"].unet.to_diffusers(), "class_embed_type": "timestep"})
    for inputs in (8, 5):  # InstructPix2Pix, depth-to-image: loaded, then every call failed inside the UNet
        with pytest.raises(ValueError, match=rf"in_channels {inputs}: not a text-to-image \(4\) or inpainting \(9\)"):
            UNetConfig.from_diffusers({**PRESETS["sd15"].unet.to_diffusers(), "in_channels": inputs})
    uniform = {**PRESETS["sd15"].unet.to_diffusers(), "layers_per_block": [2] * 4, "sample_size": [64, 64]}
    assert UNetConfig.from_diffusers(uniform) == PRESETS["sd15"].unet  # lists of one value, as diffusers takes
    with pytest.raises(ValueError, match=r"layers_per_block \[1, 2, 2, 2\]: different values per level"):
        UNetConfig.from_diffusers({**uniform, "layers_per_block": [1, 2, 2, 2]})
    with pytest.raises(ValueError, match="time_cond_proj_dim=256 is not supported .*an LCM-distilled UNet .*LCM-LoRA"):
        UNetConfig.from_diffusers({**PRESETS["sd15"].unet.to_diffusers(), "time_cond_proj_dim": 256})
