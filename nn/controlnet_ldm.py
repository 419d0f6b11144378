"""Original ControlNet single files (lllyasviel's cldm.py: control_v11p_sd15_canny.pth / .safetensors, the full
control_sd15_*.pth, thibaud's controlnet-sd21) into nn/controlnet.ControlNet, whose paths are diffusers'.

cldm.py's ControlNet is stored bare or under `control_model.`; a full ControlLDM checkpoint also holds the SD
model it was trained beside (model.diffusion_model.*, first_stage_model.*, cond_stage_model.*), which is not read:
    time_embed.{0,2}, input_blocks.*, middle_block.*    the UNet's encoder, named as in a UNet (ldm_keys._unet_table)
    zero_convs.{i}.0                                    -> controlnet_down_blocks.{i} (a 1x1 conv per skip)
    middle_block_out.0                                  -> controlnet_mid_block
    input_hint_block.{0, 2, ..., 2m}                    -> controlnet_cond_embedding.conv_in, blocks.*, conv_out
                                                           (an nn.Sequential of convs and SiLUs: convs at even indices)
The same mapping as diffusers' loaders/single_file_utils.convert_controlnet_checkpoint (tests/test_controlnet_ldm.py
proves it). The file holds no config: it is read from the shapes, and what shapes cannot say from the family, as
ldm_keys.detect_config does for a UNet: 8 heads a level (SD1), or 64-wide heads where the cross-attention reads
OpenCLIP's 1024-wide text (SD2); 32 GroupNorm groups.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from .checkpoint import _fill, _Problems, _SkipInit
from .config import ModelConfig, UNetConfig
from .controlnet import ControlNet, ControlNetConfig
from .ldm_keys import (UNET, VAE, CheckpointError, Src, _blocks, _resolve, _unet_table, encoder_levels, known_extras,
                       what_file)
from .weight_files import _Reader

__all__ = ["read_ldm_controlnet"]

PREFIX = "control_model."
OTHERS = (UNET, VAE, "cond_stage_model.")  # the rest of a full ControlLDM checkpoint


def read_ldm_controlnet(path: Path, dtype: torch.dtype, device, allow_pickle: bool) -> ControlNet:
    """The ControlNet of an original file, strict as load_model: every missing, unexpected or mis-shaped tensor
    in one CheckpointError naming the file; a file that is no ControlNet is refused, saying what it holds."""
    reader = _Reader([path], allow_pickle)  # a pickle file: refused unless allow_pickle (PickleRefused)
    shapes, label = reader.shapes, reader.label
    p = PREFIX if any(k.startswith(PREFIX) for k in shapes) else ""
    if p + "input_hint_block.0.weight" not in shapes:
        raise CheckpointError(f"{label}: not a ControlNet: it has no {p}input_hint_block.0.weight (the control "
                              f"image encoder's first conv){_what(shapes)}")
    cfg = _config(shapes, p, label)
    with torch.device("meta"), _SkipInit():
        net = ControlNet(cfg)
    names = _names(net, p)
    problems = _Problems()
    problems.check(net, names, reader)
    used = {s.key for s in names.values()}
    extras = known_extras(ModelConfig())  # a training checkpoint's DDPM schedule buffers, EMA copy, ...
    problems.unexpected = [k for k in shapes if k not in used and not k.startswith(OTHERS) and not extras.fullmatch(k)]
    problems.raise_if_any(label, "the ControlNet its shapes describe")
    _fill(net, names, reader, dtype, device)
    return net


def _what(shapes: Mapping) -> str:
    if "controlnet_cond_embedding.conv_in.weight" in shapes:
        return "; it holds a diffusers ControlNetModel's weights: give their folder, with its config.json"
    what = what_file(shapes) or ("a Stable Diffusion model" if any(k.startswith(UNET) for k in shapes) else None)
    return f"; it holds {what}" if what else ""


def _names(net: ControlNet, p: str) -> dict[str, Src]:
    """{our key: where the file holds it}: the UNet's table for the encoder, moved under the ControlNet's prefix."""
    t = {k: Src(p + s.key.removeprefix(UNET)) for k, s in _unet_table(net.cfg.unet).items()
         if k.split(".")[0] in ("conv_in", "time_embedding", "down_blocks", "mid_block")}
    t["controlnet_mid_block"] = Src(p + "middle_block_out.0")
    t |= {f"controlnet_down_blocks.{i}": Src(f"{p}zero_convs.{i}.0") for i in range(len(net.controlnet_down_blocks))}
    hint = ["conv_in", *(f"blocks.{i}" for i in range(len(net.controlnet_cond_embedding.blocks))), "conv_out"]
    t |= {f"controlnet_cond_embedding.{m}": Src(f"{p}input_hint_block.{2 * i}") for i, m in enumerate(hint)}
    return {k: _resolve(t, k) for k in net.state_dict()}


def _config(shapes: Mapping, p: str, label: str) -> ControlNetConfig:
    """The config from the shapes: the encoder's as a UNet's (ldm_keys.encoder_levels), the family told by the
    cross-attention's width (a UNet file tells it by its text encoder)."""
    def shape(key: str) -> tuple[int, ...]:
        if p + key not in shapes:
            raise CheckpointError(f"{label}: key {p + key!r} is missing; the ControlNet's configuration is read "
                                  "from it")
        return tuple(shapes[p + key])

    cross = shape("middle_block.1.transformer_blocks.0.attn2.to_k.weight")[1]  # (C, context width)
    # 1024: OpenCLIP's text (SD2); 768, CLIP's (SD1), or any other width, as ldm_keys' SD1
    channels, attention, heads, layers = encoder_levels(shapes, p, lambda k: shape(k.removeprefix(p)), label,
                                                        sd2=cross == 1024)
    # input_hint_block: conv_in, then per step between widths a conv and a stride-2 conv, then conv_out: 2w convs
    hint = _blocks(shapes, p + "input_hint_block.")
    if len(hint) < 2 or len(hint) % 2 or hint != list(range(0, 2 * len(hint), 2)):
        raise CheckpointError(f"{label}: the ControlNet's input_hint_block convs {hint} are not cldm.py's layout "
                              "(convs at 0, 2, 4, ...: conv_in, pairs of convs, conv_out)")
    hint_in = shape("input_hint_block.0.weight")  # (w0, conditioning channels, 3, 3)
    widths = (hint_in[0], *(shape(f"input_hint_block.{4 * j + 4}.weight")[0] for j in range(len(hint) // 2 - 1)))
    latents = shape("input_blocks.0.0.weight")[1]  # conv_in (C0, 4, 3, 3)
    linear = len(shape("middle_block.1.proj_in.weight")) == 2  # Linear (C, C) or 1x1 conv (C, C, 1, 1)
    try:
        unet = UNetConfig(in_channels=latents, out_channels=latents, block_out_channels=channels,
                          attention_levels=attention, num_heads=heads, layers_per_block=layers,
                          cross_attention_dim=cross, use_linear_projection=linear)
        return ControlNetConfig(unet, conditioning_embedding_out_channels=widths, conditioning_channels=hint_in[1])
    except ValueError as e:  # a config's own validation (e.g. channels not divisible by 32 groups)
        raise CheckpointError(f"{label}: the tensor shapes do not give a valid ControlNet: {e}") from None
