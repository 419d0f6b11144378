"""IP-Adapter (Ye et al. 2023, arXiv:2308.06721): an image prompt beside the text one. A CLIP vision tower embeds the
image, a small projection turns the embedding into N extra context tokens, and every cross-attention of the UNet
attends to them with its own key/value projections, the result added to the text attention's times `scale`:

    attn2(x) = to_out(softmax(q k_text^T) v_text + scale * softmax(q k_ip^T) v_ip),  k_ip = to_k_ip(tokens), ...

The tokens travel at the end of the UNet's context (B, 77 + N, C), as the original implementation passes them: in a
call that set nn.unet.IP_LINKS (a context variable: per call and thread) each Transformer2D splits them off, so the
Backend contract `unet(latents, t, context)` is unchanged. The weights stay outside the UNet's modules (its state
dict, LoRA merges, saving and export never see them), and a call in another thread is never affected.

Files are the published ones (h94/IP-Adapter's `ip-adapter_sd15.safetensors` and its `_light` version): keys
image_proj.{proj,norm}.* and ip_adapter.<i>.to_{k,v}_ip.weight, i = 1, 3, 5, ... over the UNet's cross-attentions in
diffusers' order (down levels, up levels, mid block), with the image encoder a transformers
CLIPVisionModelWithProjection folder. The Plus, Full-face and FaceID variants are refused by name.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoint import _fill, _Problems
from .clip import VisionTower, clip_preprocess, vision_config_from_transformers
from .ldm_keys import CheckpointError, MissingFile, Src
from .unet import IP_LINKS, Transformer2D, UNet
from .weight_files import _Reader, _weight_files

__all__ = ["IPAdapter", "IPLink", "ImageProjection", "cross_attentions", "layer_scales", "read_ip_adapter",
           "read_image_encoder", "with_ip_links"]

# image_proj keys of the variants we do not run -> their name
_VARIANTS = {"latents": "IP-Adapter Plus (a Resampler over the image encoder's hidden states)",
             "proj.3.weight": "IP-Adapter Full Face", "perceiver_resampler.proj_in.weight": "IP-Adapter FaceID Plus",
             "proj.0.weight": "IP-Adapter FaceID"}


class ImageProjection(nn.Module):
    """CLIP image embeddings (B, D) -> N context tokens (B, N, C): one Linear, reshaped, LayerNorm'd (diffusers'
    ImageProjection; the file's names)."""

    def __init__(self, embed_dim: int, cross_attention_dim: int, num_tokens: int):
        super().__init__()
        self.num_tokens = num_tokens
        self.proj = nn.Linear(embed_dim, num_tokens * cross_attention_dim)
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(embeds.to(self.proj.weight.dtype)).view(embeds.shape[0], self.num_tokens, -1))


class IPAttention(nn.Module):
    """One cross-attention's key and value projections of the image tokens (diffusers' to_k_ip.0 / to_v_ip.0)."""

    def __init__(self, cross_attention_dim: int, inner: int):
        super().__init__()
        self.to_k_ip = nn.Linear(cross_attention_dim, inner, bias=False)
        self.to_v_ip = nn.Linear(cross_attention_dim, inner, bias=False)


@dataclass(frozen=True)
class IPLink:
    """What a Transformer2D needs to attend to the image tokens: the last `num_tokens` of its context."""
    layer: IPAttention
    num_tokens: int
    scale: float


def with_ip_links(unet_call, links: dict[Transformer2D, IPLink]):
    """`unet_call` (a Backend's unet) with nn.unet.IP_LINKS set to `links` around each call: the context it is
    given ends with the image tokens."""
    def call(*args, **kwargs):
        token = IP_LINKS.set(links)
        try:
            return unet_call(*args, **kwargs)
        finally:
            IP_LINKS.reset(token)
    return call


def cross_attentions(unet: UNet) -> list[tuple[str, Transformer2D]]:
    """The UNet's Transformer2D modules in diffusers' attn_processors order: down levels, up levels, mid block."""
    order = ("down_blocks", "up_blocks", "mid_block")
    found = [(n, m) for n, m in unet.named_modules() if isinstance(m, Transformer2D)]
    return sorted(found, key=lambda nm: order.index(nm[0].split(".")[0]))


def layer_scales(unet: UNet, scale, number=float) -> list[float]:
    """One scale per cross-attention (cross_attentions order) from diffusers' set_ip_adapter_scale forms: a number
    for all, or InstantStyle's dict, e.g. {"down": {"block_2": [0.0, 1.0]}, "up": {"block_1": [0.0, 1.0, 0.0]},
    "mid": 0.0}: per level (a number, or one per attention of the level), per side, and "mid"; what the dict leaves
    out is 0, as in diffusers. Unlike diffusers, a level without attention layers (SD1.5's up block_0, which SDXL
    recipes name) or a key that names nothing is an error, not silently ignored. `number` checks each value."""
    names = [name for name, _ in cross_attentions(unet)]
    if not isinstance(scale, dict):
        return [number(scale)] * len(names)
    if unknown := sorted(set(scale) - {"down", "mid", "up"}):
        raise ValueError(f"IP-Adapter scale: unknown key {unknown[0]!r}; the keys are down, mid and up")
    mid, out = scale.get("mid", 0.0), {}
    if isinstance(mid, (list, tuple)):
        if len(mid) != 1:
            raise ValueError(f"IP-Adapter scale: mid has one attention layer, got {len(mid)} scales")
        mid = mid[0]
    for side in ("down", "up"):
        levels = sorted({int(n.split(".")[1]) for n in names if n.startswith(f"{side}_blocks.")})
        per = unet.cfg.layers_per_block + (side == "up")
        given = scale.get(side, 0.0)
        given = given if isinstance(given, dict) else {f"block_{i}": given for i in levels}
        if unknown := sorted(set(given) - {f"block_{i}" for i in levels}):
            raise ValueError(f"IP-Adapter scale: {side} {unknown[0]} has no attention layers in this UNet; its "
                             f"{side} levels with attention are {', '.join(f'block_{i}' for i in levels)}")
        for i in levels:
            values = given.get(f"block_{i}", 0.0)
            values = [values] * per if not isinstance(values, (list, tuple)) else list(values) * (
                per if len(values) == 1 else 1)
            if len(values) != per:
                raise ValueError(f"IP-Adapter scale: {side} block_{i} has {per} attention layers, got "
                                 f"{len(values)} scales")
            out |= {f"{side}_blocks.{i}.attentions.{j}": v for j, v in enumerate(values)}
    return [number(mid if n.startswith("mid_block") else out[n]) for n in names]


class IPAdapter(nn.Module):
    """The image encoder, the projection and one IPAttention per cross-attention (in cross_attentions order)."""

    def __init__(self, image_encoder: VisionTower, image_proj: ImageProjection, layers: list[IPAttention]):
        super().__init__()
        self.image_encoder = image_encoder
        self.image_proj = image_proj
        self.layers = nn.ModuleList(layers)

    @torch.inference_mode()
    def tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, H, W) in [-1, 1] -> (tokens, unconditional tokens), each (B, N, C) float32: the image's
        and, for classifier-free guidance, a zero embedding's (diffusers' negative image embeds)."""
        enc = self.image_encoder
        p = next(enc.parameters())
        embeds = enc(clip_preprocess(images.float(), enc.cfg.image_size).to(p.device, p.dtype))  # (B, D)
        return self.image_proj(embeds).float(), self.image_proj(torch.zeros_like(embeds)).float()

    def links(self, unet: UNet, scales: list[float]) -> dict[Transformer2D, IPLink]:
        """Every cross-attention of `unet` with its IPAttention at its scale (layer_scales): what a call sets in
        nn.unet.IP_LINKS (no module of the UNet changes)."""
        n = self.image_proj.num_tokens
        return {t2d: IPLink(layer, n, scale)
                for (_, t2d), layer, scale in zip(cross_attentions(unet), self.layers, scales, strict=True)}


def read_image_encoder(folder: Path, dtype: torch.dtype, device) -> VisionTower:
    """A transformers CLIPVisionModelWithProjection folder (config.json + model.safetensors, sharded or fp16),
    loaded strictly into a VisionTower (a stored position_ids buffer, written by older transformers, is skipped)."""
    config = folder / "config.json"
    if not config.is_file():
        raise MissingFile(f"{folder}: not an image encoder folder (no config.json); the IP-Adapter's image encoder "
                          "is a transformers CLIPVisionModelWithProjection folder: give image_encoder_folder=")
    try:
        cfg = vision_config_from_transformers(json.loads(config.read_text()), str(config))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config}: not JSON ({e})") from None
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    reader = _Reader(_weight_files(folder, "model", allow_pickle=False))
    with torch.device("meta"):
        tower = VisionTower(cfg)
    names = {k: Src(k) for k in tower.state_dict()}
    problems = _Problems()
    problems.check(tower, names, reader)
    problems.unexpected = sorted(set(reader.shapes) - set(names) - {"vision_model.embeddings.position_ids"})
    problems.raise_if_any(reader.label, "a CLIPVisionModelWithProjection of its config.json")
    _fill(tower, names, reader, dtype, device)
    return tower


def read_ip_adapter(path: Path, unet: UNet, image_encoder: VisionTower) -> IPAdapter:
    """The IP-Adapter file at `path` for `unet` and `image_encoder`, in their device and dtype; every key and shape
    checked (CheckpointError naming the file and what is wrong)."""
    reader = _Reader([path])
    keys = set(reader.shapes)
    proj = {k.removeprefix("image_proj."): k for k in keys if k.startswith("image_proj.")}
    if variant := next((name for key, name in _VARIANTS.items() if key in proj), None):
        raise CheckpointError(f"{path}: an {variant} file: only the base IP-Adapter (ip-adapter_sd15 and its _light "
                              "version) is supported")
    if "proj.weight" not in proj:
        raise CheckpointError(f"{path}: not an IP-Adapter file (no image_proj.proj.weight; keys: "
                              f"{', '.join(sorted(keys)[:5])})")
    p = next(unet.parameters())
    cross = unet.cfg.cross_attention_dim
    rows, embed_dim = reader.shapes[proj["proj.weight"]]
    if rows % cross or embed_dim != image_encoder.cfg.projection_dim:
        raise CheckpointError(f"{path}: image_proj.proj.weight is {rows}x{embed_dim}, which does not fit this model "
                              f"(N x {cross} text width by the image encoder's {image_encoder.cfg.projection_dim})")
    with torch.device("meta"):  # filled from the file below
        image_proj = ImageProjection(embed_dim, cross, rows // cross)
        layers = [IPAttention(cross, t2d.transformer_blocks[0].attn2.to_q.out_features)
                  for _, t2d in cross_attentions(unet)]
    # (module, {its key: the file's}); diffusers' key_id 1, 3, 5, ...: the even ids were the self-attentions'
    parts = [(image_proj, {k: Src(f"image_proj.{k}") for k in image_proj.state_dict()})]
    parts += [(lay, {k: Src(f"ip_adapter.{2 * i + 1}.{k}") for k in lay.state_dict()}) for i, lay in enumerate(layers)]
    problems = _Problems()
    for module, names in parts:
        problems.check(module, names, reader)
    problems.unexpected = sorted(keys - {src.key for _, names in parts for src in names.values()})
    problems.raise_if_any(str(path), f"an IP-Adapter for this UNet ({len(layers)} cross-attentions)")
    for module, names in parts:
        _fill(module, names, reader, p.dtype, p.device)
    return IPAdapter(image_encoder, image_proj, layers).eval()
