"""Checkpoint layouts other than our module paths: the original (LDM / CompVis / Stability) single file (key names,
and its configuration read from shapes), and the diffusers folder's file names and config.json files.

Our module paths are diffusers' (UNet2DConditionModel, AutoencoderKL) and transformers' (CLIPTextModel,
`text_model.*`). An LDM file stores the same tensors as
    model.diffusion_model.*            the UNet (ldm/modules/diffusionmodules/openaimodel.py)
    first_stage_model.*                the VAE (ldm/modules/diffusionmodules/model.py)
    cond_stage_model.transformer.*     SD1: a transformers CLIPTextModel (older files lack the `text_model.` level)
    cond_stage_model.model.*           SD2: OpenCLIP ViT-H/14, q/k/v fused into `attn.in_proj_{weight,bias}`
The tables below give, for each of our keys, where that tensor lives in the LDM file. They are the same mapping as
diffusers' loaders/single_file_utils.py (`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`,
`convert_ldm_clip_checkpoint`, `convert_open_clip_checkpoint`); tests/test_checkpoint.py proves it on both families.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from .config import ModelConfig, SchedulerConfig, TextConfig, UNetConfig, VAEConfig

DIFFUSERS_VERSION = "0.30.0"     # the oldest diffusers whose folder layout and config fields we write
TRANSFORMERS_VERSION = "4.40.0"  # likewise for transformers' CLIPTextModel config

__all__ = ["CheckpointError", "MissingFile", "Src", "UNET", "VAE", "CLIP", "OPENCLIP", "ldm_names", "ldm_shape",
           "to_ldm", "from_ldm", "known_extras", "clip_prefix", "detect_config", "vae_config", "vae_names", "what_file",
           "prediction_type_of_ldm_config", "folder_key", "FOLDER_EXTRAS", "diffusers_configs"]

UNET, VAE = "model.diffusion_model.", "first_stage_model."
CLIP, OPENCLIP = "cond_stage_model.transformer.", "cond_stage_model.model."


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message names the file and the key/shape at fault.
    (Defined here, the lower module, and re-exported by nn/checkpoint.py.)"""


class MissingFile(CheckpointError, FileNotFoundError):
    """A weight file or folder that is not there: a CheckpointError and, as a missing model or image is, a
    FileNotFoundError (an app's `except FileNotFoundError` catches a missing LoRA too)."""


@dataclass(frozen=True)
class Src:
    """Where one of our tensors lives in an LDM file."""
    key: str
    part: int | None = None  # q/k/v third (0/1/2) of OpenCLIP's fused attn.in_proj_{weight,bias} (3C, ...)
    conv: bool = False       # LDM stores this Linear weight (C, C) as a 1x1 conv (C, C, 1, 1) (VAE mid attention)


# ---------------------------------------------------------------------------------------------------------- tables
# Each table maps one of our module paths (or a full key) to its LDM path; the longest matching prefix wins.

_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _unet_table(cfg: UNetConfig) -> dict[str, Src]:
    """openaimodel.py numbers its blocks flat: input_blocks.0 is conv_in, then per level `layers_per_block`
    (resnet, attention) pairs and a downsampler; output_blocks are the mirror with one more pair a level."""
    t = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
         "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
         "mid_block.attentions.0": "middle_block.1"}
    resnets = {"mid_block.resnets.0": "middle_block.0", "mid_block.resnets.1": "middle_block.2"}
    n, per = len(cfg.block_out_channels), cfg.layers_per_block + 1
    for i in range(n):
        for j in range(cfg.layers_per_block):
            resnets[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{1 + i * per + j}.0"
            if cfg.attention_levels[i]:
                t[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{1 + i * per + j}.1"
        if i < n - 1:
            t[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{1 + i * per + per - 1}.0.op"
    for i in range(n):  # up level i mirrors down level n-1-i
        attn = cfg.attention_levels[n - 1 - i]
        for j in range(per):
            resnets[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{i * per + j}.0"
            if attn:
                t[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{i * per + j}.1"
        if i < n - 1:  # the upsampler follows the level's last resnet (and its attention, when there is one)
            t[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{i * per + per - 1}.{2 if attn else 1}.conv"
    for ours, ldm in resnets.items():
        t[ours] = ldm
        t.update({f"{ours}.{a}": f"{ldm}.{b}" for a, b in _UNET_RESNET.items()})
    return {k: Src(UNET + v) for k, v in t.items()}


def _vae_table(cfg: VAEConfig, prefix: str = VAE) -> dict[str, Src]:
    """taming-transformers' Encoder/Decoder: `down.i.block.j`, `mid.block_1/attn_1/block_2`; the decoder's
    `up` list is indexed from the lowest resolution upwards in LDM but from the top in diffusers. prefix: the
    VAE's in this file (a VAE-only file, e.g. vae-ft-mse-840000-ema-pruned.safetensors, has none)."""
    same = ("encoder.conv_in", "encoder.conv_out", "decoder.conv_in", "decoder.conv_out", "quant_conv",
            "post_quant_conv")
    t = {k: k for k in same} | {f"{p}.conv_norm_out": f"{p}.norm_out" for p in ("encoder", "decoder")}
    resnets = {}
    n = len(cfg.block_out_channels)
    for p in ("encoder", "decoder"):
        resnets |= {f"{p}.mid_block.resnets.0": f"{p}.mid.block_1", f"{p}.mid_block.resnets.1": f"{p}.mid.block_2"}
        attn = f"{p}.mid_block.attentions.0"
        t[attn] = f"{p}.mid.attn_1"
        t |= {f"{attn}.group_norm": f"{p}.mid.attn_1.norm", f"{attn}.to_q.bias": f"{p}.mid.attn_1.q.bias",
              f"{attn}.to_k.bias": f"{p}.mid.attn_1.k.bias", f"{attn}.to_v.bias": f"{p}.mid.attn_1.v.bias",
              f"{attn}.to_out.0.bias": f"{p}.mid.attn_1.proj_out.bias"}
    for i in range(n):
        for j in range(cfg.layers_per_block):
            resnets[f"encoder.down_blocks.{i}.resnets.{j}"] = f"encoder.down.{i}.block.{j}"
        if i < n - 1:
            t[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = f"encoder.down.{i}.downsample.conv"
        for j in range(cfg.layers_per_block + 1):
            resnets[f"decoder.up_blocks.{i}.resnets.{j}"] = f"decoder.up.{n - 1 - i}.block.{j}"
        if i < n - 1:
            t[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = f"decoder.up.{n - 1 - i}.upsample.conv"
    for ours, ldm in resnets.items():
        t[ours] = ldm
        t[f"{ours}.conv_shortcut"] = f"{ldm}.nin_shortcut"
    table = {k: Src(prefix + v) for k, v in t.items()}
    for p in ("encoder", "decoder"):  # LDM's AttnBlock projects with 1x1 convs; diffusers' Attention with Linear
        for ours, ldm in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
            table[f"{p}.mid_block.attentions.0.{ours}.weight"] = Src(f"{prefix}{p}.mid.attn_1.{ldm}.weight",
                                                                     conv=True)
    return table


def vae_names(cfg: VAEConfig, keys: Iterable[str], prefix: str = VAE) -> dict[str, Src]:
    """{our VAE key: Src} for a VAE stored under `prefix` ("" in a VAE-only file)."""
    table = _vae_table(cfg, prefix)
    return {k: _resolve(table, k) for k in keys}



def clip_prefix(keys: Iterable[str]) -> str:
    """SD1's text-encoder prefix in this file: transformers < 4.31 saved CLIPTextModel without `text_model.`."""
    keys = set(keys)
    return CLIP + "text_model." if CLIP + "text_model.embeddings.token_embedding.weight" in keys else CLIP


def _clip_table(prefix: str) -> dict[str, Src]:
    return {"text_model": Src(prefix.removesuffix("."))}


def _openclip_table(cfg: TextConfig) -> dict[str, Src]:
    """OpenCLIP's TextTransformer (open_clip/transformer.py): resblocks with nn.MultiheadAttention."""
    t = {"text_model.embeddings.token_embedding": Src(OPENCLIP + "token_embedding"),
         "text_model.embeddings.position_embedding.weight": Src(OPENCLIP + "positional_embedding"),
         "text_model.final_layer_norm": Src(OPENCLIP + "ln_final")}
    for i in range(cfg.num_layers):
        ours, ldm = f"text_model.encoder.layers.{i}", f"{OPENCLIP}transformer.resblocks.{i}"
        t |= {f"{ours}.layer_norm1": Src(f"{ldm}.ln_1"), f"{ours}.layer_norm2": Src(f"{ldm}.ln_2"),
              f"{ours}.mlp.fc1": Src(f"{ldm}.mlp.c_fc"), f"{ours}.mlp.fc2": Src(f"{ldm}.mlp.c_proj"),
              f"{ours}.self_attn.out_proj": Src(f"{ldm}.attn.out_proj")}
        for part, proj in enumerate(("q_proj", "k_proj", "v_proj")):  # in_proj = cat([q, k, v]) on dim 0
            for p in ("weight", "bias"):
                t[f"{ours}.self_attn.{proj}.{p}"] = Src(f"{ldm}.attn.in_proj_{p}", part=part)
    return t


def _resolve(table: Mapping[str, Src], key: str) -> Src:
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        src = table.get(".".join(parts[:n]))
        if src is not None:
            return src if n == len(parts) else Src(".".join([src.key, *parts[n:]]))
    raise KeyError(f"no LDM name for {key!r}")  # a model key the tables do not know: a bug, not bad input


def ldm_names(cfg: ModelConfig, keys: Mapping[str, Iterable[str]], clip: str = CLIP + "text_model.",
              ) -> dict[str, dict[str, Src]]:
    """{component: {our key: Src}} for keys = {"unet": ..., "vae": ..., "text_encoder": ...}.
    SD1 (CLIP) or SD2 (OpenCLIP) text layout follows cfg.family; `clip` is SD1's prefix in this file."""
    text = _openclip_table(cfg.text) if cfg.family == "sd2" else _clip_table(clip)
    tables = {"unet": _unet_table(cfg.unet), "vae": _vae_table(cfg.vae), "text_encoder": text}
    return {c: {k: _resolve(tables[c], k) for k in keys[c]} for c in tables}


def ldm_shape(shape: Iterable[int], src: Src) -> tuple[int, ...]:
    """The shape the LDM file holds for one of our tensors of `shape`."""
    shape = tuple(shape)
    if src.part is not None:
        return (3 * shape[0], *shape[1:])
    return (*shape, 1, 1) if src.conv else shape


def from_ldm(t: torch.Tensor, src: Src) -> torch.Tensor:
    """The LDM tensor at src.key -> ours (a view; q/k/v thirds are contiguous because they split dim 0)."""
    if src.part is not None:
        return t.chunk(3, dim=0)[src.part]
    return t.flatten(1) if src.conv else t  # (C, C, 1, 1) -> (C, C)


def to_ldm(cfg: ModelConfig, tensors: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """{component: our state dict} -> one LDM state dict (SD1 text keys with the `text_model.` level)."""
    if cfg.vae.mask_conditioned:
        raise CheckpointError("a mask-conditioned VAE (AsymmetricAutoencoderKL) has no layout in LDM single files; "
                              "save the model as a diffusers folder")
    names = ldm_names(cfg, {c: sd.keys() for c, sd in tensors.items()})
    out, fused = {}, {}
    for c, sd in tensors.items():
        for k, t in sd.items():
            src = names[c][k]
            if src.part is not None:
                fused.setdefault(src.key, [None] * 3)[src.part] = t
            else:
                out[src.key] = t[:, :, None, None] if src.conv else t
    for key, parts in fused.items():
        out[key] = torch.cat(parts, dim=0)  # (3C, ...) = [q; k; v]
    if cfg.family == "sd2":
        # SD2 reads OpenCLIP's penultimate block (FrozenOpenCLIPEmbedder, layer="penultimate"), so its files hold
        # one block more than the model runs. We write that block as zeros: a pre-LN residual block with zero
        # weights is the identity, so tools that run all blocks and tools that skip the last agree.
        last, n = f"{OPENCLIP}transformer.resblocks.{cfg.text.num_layers - 1}.", cfg.text.num_layers
        for key in [k for k in out if k.startswith(last)]:
            out[f"{OPENCLIP}transformer.resblocks.{n}.{key[len(last):]}"] = torch.zeros_like(out[key])
    return out


def known_extras(cfg: ModelConfig) -> re.Pattern:
    """Tensors an LDM file may hold that the model does not use; loading skips exactly these, and any other key
    the model does not consume is an error."""
    return re.compile("|".join((
        r"model_ema\..*",  # LitEma's copy of the UNet (flattened names) and model_ema.decay / num_updates
        # DDPM schedule buffers (ldm/models/diffusion/ddpm.py register_schedule); ours come from SchedulerConfig
        r"betas|alphas_cumprod|alphas_cumprod_prev|sqrt_.*|log_one_minus_alphas_cumprod|posterior_.*",
        re.escape(CLIP) + r"(text_model\.)?embeddings\.position_ids",  # transformers' old persistent buffer
        # SD2's unused last OpenCLIP block (see to_ldm), CLIP's contrastive head, OpenCLIP's image tower
        re.escape(OPENCLIP) + rf"transformer\.resblocks\.{cfg.text.num_layers}\..*",
        re.escape(OPENCLIP) + r"(text_projection|logit_scale|visual\..*)",
    )))


# ------------------------------------------------------------------------------------------ config from shapes

def _blocks(shapes: Mapping, prefix: str) -> list[int]:
    """Sorted distinct integers i among keys `prefix{i}.*`."""
    return sorted({int(m.group(1)) for k in shapes if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))})


def what_file(shapes: Mapping) -> str | None:
    """What a file that is not an SD 1.x/2.x checkpoint holds, said so that its user knows where it goes (None: it
    looks like one)."""
    keys = list(shapes)
    if any(k.startswith("conditioner.embedders.") for k in keys):
        return "an SDXL checkpoint; Backdrop runs Stable Diffusion 1.x/2.x"
    if any(k.startswith(("lora_unet_", "lora_te")) or ".lora_down." in k or ".lora_A." in k for k in keys):
        return "a LoRA, not a model: load a model and merge it with --lora / pipe.load_lora_weights"
    if keys and all(k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", VAE)) for k in keys):
        return "a VAE alone, not a model: give it beside a model with --vae / vae="
    if "conv_in.weight" in shapes and any(k.startswith(("down_blocks.", "mid_block.")) for k in keys):
        return "a diffusers UNet's weights (unet/ of a model folder), not a model: give the model folder"
    if keys and all(k.startswith("text_model.") for k in keys):
        return "a text encoder alone (text_encoder/ of a model folder), not a model: give the model folder"
    has = {what: any(k.startswith(p) for k in keys) for what, p in (("UNet", UNET), ("VAE", VAE))}
    if has["UNet"] and not any(k.startswith(("cond_stage_model.", CLIP, OPENCLIP)) for k in keys):
        return "a UNet" + (" and VAE" if has["VAE"] else "") + " without the text encoder a model needs"
    return None


def prediction_type_of_ldm_config(text: str, source: str) -> str:
    """The prediction type an original LDM .yaml config (v2-inference-v.yaml, ...) gives its model: its
    model.params.parameterization, "eps" (LDM's default when absent) or "v". Read without a YAML parser: it is
    one `parameterization: "v"` line."""
    m = re.search(r"^\s*parameterization:\s*[\"']?(\w+)", text, re.MULTILINE)
    value = m[1] if m else "eps"
    if value not in ("eps", "v"):
        raise CheckpointError(f"{source}: parameterization {value!r}; Backdrop runs \"eps\" and \"v\" models")
    return "v_prediction" if value == "v" else "epsilon"


def vae_config(shapes: Mapping, source: str, prefix: str = VAE) -> VAEConfig:
    """An LDM VAE's config from the shapes of its tensors under `prefix`."""
    def shape(key: str) -> tuple[int, ...]:
        if prefix + key not in shapes:
            raise CheckpointError(f"{source}: has no VAE ({prefix + key!r} is missing): pass one with --vae / "
                                  "vae= (e.g. vae-ft-mse-840000-ema-pruned.safetensors, or a model folder's vae/)")
        return tuple(shapes[prefix + key])
    levels = _blocks(shapes, prefix + "encoder.down.")
    try:
        return VAEConfig(in_channels=shape("encoder.conv_in.weight")[1],
                         out_channels=shape("decoder.conv_out.weight")[0],
                         latent_channels=shape("post_quant_conv.weight")[0],
                         block_out_channels=tuple(shape(f"encoder.down.{i}.block.0.conv1.weight")[0] for i in levels),
                         layers_per_block=len(_blocks(shapes, prefix + "encoder.down.0.block.")))
    except ValueError as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{source}: the VAE's tensor shapes do not give a valid VAE: {e}") from None


def detect_config(shapes: Mapping[str, tuple[int, ...]], source: str,
                  prediction_type: str | None = None, vae: VAEConfig | None = None) -> ModelConfig:
    """The ModelConfig of an LDM file, from tensor shapes alone.

    What shapes cannot say comes from the family, told by the text encoder: SD1 (CLIP ViT-L/14) uses 8 heads at
    every UNet level, SD2 (OpenCLIP ViT-H/14) 64-wide heads; CLIP text heads are 64 wide in both; GroupNorm uses
    32 groups; SD's VAE scaling factor and scheduler. `prediction_type` defaults to epsilon; SD2 with
    v_prediction is the 768-v model (768 px, 96-latent sample size), the only official SD2 v-model. vae: the
    config of a VAE given beside the file (its own, if any, is then not read).
    """
    def shape(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise CheckpointError(f"{source}: key {key!r} is missing; the model's configuration is read from it")
        return tuple(shapes[key])

    try:
        return _detect(shapes, shape, source, prediction_type, vae)
    except CheckpointError:
        raise
    except ValueError as e:  # a config's own validation (e.g. channels not divisible by 32 groups)
        raise CheckpointError(f"{source}: the tensor shapes do not give a valid model: {e}") from None


def _detect(shapes: Mapping, shape, source: str, prediction_type: str | None, vae: VAEConfig | None) -> ModelConfig:
    if any(k.startswith(OPENCLIP) for k in shapes):
        family, p = "sd2", OPENCLIP
        vocab, width = shape(p + "token_embedding.weight")
        blocks = _blocks(shapes, p + "transformer.resblocks.")
        if len(blocks) < 2:
            raise CheckpointError(f"{source}: {p}transformer.resblocks has {len(blocks)} blocks; SD2 runs the "
                                  "penultimate one, so it needs at least 2")
        text = TextConfig(vocab_size=vocab, hidden_size=width,
                          max_position_embeddings=shape(p + "positional_embedding")[0],
                          intermediate_size=shape(p + "transformer.resblocks.0.mlp.c_fc.weight")[0],
                          num_layers=len(blocks) - 1,  # the penultimate block's output (see to_ldm)
                          num_heads=width // 64, hidden_act="gelu", pad_token_id=0,
                          projection_dim=shapes.get(p + "text_projection", (width, width))[1])
    elif any(k.startswith(CLIP) for k in shapes):
        family, p = "sd1", clip_prefix(shapes)
        vocab, width = shape(p + "embeddings.token_embedding.weight")
        text = TextConfig(vocab_size=vocab, hidden_size=width,
                          max_position_embeddings=shape(p + "embeddings.position_embedding.weight")[0],
                          intermediate_size=shape(p + "encoder.layers.0.mlp.fc1.weight")[0],
                          num_layers=len(_blocks(shapes, p + "encoder.layers.")), num_heads=width // 64,
                          hidden_act="quick_gelu", projection_dim=width, pad_token_id=49407)
    elif (what := what_file(shapes)) is not None:
        raise CheckpointError(f"{source}: {what}")
    else:
        raise CheckpointError(f"{source}: no text encoder found: expected keys under {CLIP!r} (SD1) or "
                              f"{OPENCLIP!r} (SD2); is this a Stable Diffusion 1.x/2.x checkpoint?")

    conv_in = shape(UNET + "input_blocks.0.0.weight")  # (C0, in_channels, 3, 3)
    channels, attention, heads, layers = encoder_levels(shapes, UNET, shape, source, family == "sd2")
    v = prediction_type == "v_prediction" and family == "sd2"
    linear = len(shape(UNET + "middle_block.1.proj_in.weight")) == 2  # Linear (C, C) or 1x1 conv (C, C, 1, 1)
    unet = UNetConfig(in_channels=conv_in[1], out_channels=shape(UNET + "out.2.weight")[0],
                      block_out_channels=channels, attention_levels=attention, num_heads=heads,
                      layers_per_block=layers, use_linear_projection=linear,
                      cross_attention_dim=shape(UNET + "middle_block.1.transformer_blocks.0.attn2.to_k.weight")[1],
                      sample_size=96 if v else 64)
    vae = vae or vae_config(shapes, source)
    return ModelConfig(unet=unet, vae=vae, text=text, scheduler=SchedulerConfig(),
                       prediction_type=prediction_type or "epsilon", image_size=768 if v else 512)


def encoder_levels(shapes: Mapping, p: str, shape, source: str, sd2: bool) -> tuple[tuple, tuple, tuple, int]:
    """(block_out_channels, attention_levels, num_heads, layers_per_block) of the UNet encoder (input_blocks)
    under prefix p: a UNet's, or a ControlNet's. shape(key) gives a full key's shape or names it missing."""
    inputs = _blocks(shapes, p + "input_blocks.")
    downs = [i for i in inputs if p + f"input_blocks.{i}.0.op.weight" in shapes]
    n = len(downs) + 1
    layers = (len(inputs) - 1 - len(downs)) // n  # input_blocks = conv_in + n * layers resnets + (n - 1) downs
    if inputs != list(range(len(inputs))) or layers < 1 or 1 + n * layers + len(downs) != len(inputs):
        raise CheckpointError(f"{source}: the input_blocks {inputs} (downsamplers at {downs}) are not an SD 1.x/2.x "
                              "layout")
    first = [1 + i * (layers + 1) for i in range(n)]  # the first resnet of each level
    channels = tuple(shape(p + f"input_blocks.{i}.0.out_layers.3.weight")[0] for i in first)
    attention = tuple(p + f"input_blocks.{i}.1.proj_in.weight" in shapes for i in first)
    if not sd2:
        return channels, attention, (8,) * n, layers
    if any(c % 64 for c, a in zip(channels, attention) if a) or channels[-1] % 64:
        raise CheckpointError(f"{source}: SD2 attention uses 64-wide heads, but the channels are {channels}")
    return channels, attention, tuple(max(c // 64, 1) for c in channels), layers


# ------------------------------------------------------------------------------------------- diffusers folders

_VAE_LEGACY = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
FOLDER_EXTRAS = re.compile(r"(text_model\.)?embeddings\.position_ids")  # transformers' old persistent buffer


def folder_key(component: str, key: str) -> str:
    """A diffusers/transformers file key -> ours: transformers >= 5 saves CLIPTextModel without `text_model.`;
    VAEs saved before diffusers 0.14 use AttentionBlock names (diffusers' _convert_deprecated_attention_blocks)."""
    if component == "text_encoder" and not key.startswith("text_model."):
        return "text_model." + key
    if component == "vae":
        return re.sub(r"(mid_block\.attentions\.0)\.(query|key|value|proj_attn)\.",
                      lambda m: f"{m[1]}.{_VAE_LEGACY[m[2]]}.", key)
    return key


# The config fields diffusers writes that our configs fix to one value (nn/config.py refuses any other), so that
# our config.json files read exactly like the ones diffusers' save_pretrained writes.
_UNET_FIXED = {
    "addition_embed_type": None, "addition_embed_type_num_heads": 64, "addition_time_embed_dim": None,
    "attention_type": "default", "class_embed_type": None, "class_embeddings_concat": False, "conv_in_kernel": 3,
    "conv_out_kernel": 3, "cross_attention_norm": None, "dropout": 0.0, "dual_cross_attention": False,
    "encoder_hid_dim": None, "encoder_hid_dim_type": None, "mid_block_only_cross_attention": None,
    "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False,
    "projection_class_embeddings_input_dim": None, "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default", "reverse_transformer_layers_per_block": None, "time_cond_proj_dim": None,
    "time_embedding_act_fn": None, "time_embedding_dim": None, "time_embedding_type": "positional",
    "timestep_post_act": None, "transformer_layers_per_block": 1, "upcast_attention": False,  # SD2: True below
}
_VAE_FIXED = {"force_upcast": True, "latents_mean": None, "latents_std": None, "mid_block_add_attention": True,
              "shift_factor": None, "use_post_quant_conv": True, "use_quant_conv": True}


def diffusers_configs(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, dict]:
    """{relative path: JSON} of every config file of a diffusers folder (weights and tokenizer not included)."""
    dtype = str(dtype).removeprefix("torch.")
    version = {"_diffusers_version": DIFFUSERS_VERSION}
    pipeline = "StableDiffusionInpaintPipeline" if cfg.unet.is_inpaint else "StableDiffusionPipeline"
    vae = cfg.vae.to_diffusers()  # AutoencoderKL, or AsymmetricAutoencoderKL when mask-conditioned
    return {
        "model_index.json": {
            "_class_name": pipeline, **version, "feature_extractor": [None, None], "image_encoder": [None, None],
            "requires_safety_checker": False, "safety_checker": [None, None],
            "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", vae["_class_name"]]},
        # upcast_attention: SD 2.1's own folder sets it (diffusers' fp16 attention overflows without); ours always
        # accumulates in fp32, so it only tells diffusers
        "unet/config.json": {**version, **_UNET_FIXED, **cfg.unet.to_diffusers(),
                             "upcast_attention": cfg.family == "sd2"},
        "vae/config.json": {**version, **({} if cfg.vae.mask_conditioned else _VAE_FIXED), **vae},
        "text_encoder/config.json": {**cfg.text.to_transformers(), "dtype": dtype,
                                     "transformers_version": TRANSFORMERS_VERSION},
        # SD's PNDM setup as published (skip_prk_steps: the PLMS variant SD samples with)
        "scheduler/scheduler_config.json": {**version, **cfg.scheduler.to_diffusers(cfg.prediction_type),
                                            "skip_prk_steps": True, "trained_betas": None},
    }
