"""IP-Adapter (Ye et al. 2023, arXiv:2308.06721): an image prompt beside the text one. A CLIP vision tower embeds the
image, a small projection turns the embedding into N extra context tokens, and every cross-attention of the UNet
attends to them with its own key/value projections, the result added to the text attention's times `scale`:

    attn2(x) = to_out(softmax(q k_text^T) v_text + scale * softmax(q k_ip^T) v_ip),  k_ip = to_k_ip(tokens), ...

The tokens travel at the end of the UNet's context (B, 77 + N, C), as the original implementation passes them: in a
call that set nn.unet.IP_LINKS (a context variable: per call and thread) each Transformer2D splits them off, so the
Backend contract `unet(latents, t, context)` is unchanged. The weights stay outside the UNet's modules (its state
dict, LoRA merges, saving and export never see them), and a call in another thread is never affected.

Files are the published ones, with the image encoder a transformers CLIPVisionModelWithProjection folder; each has
ip_adapter.<i>.to_{k,v}_ip.weight, i = 1, 3, 5, ... over the UNet's cross-attentions in diffusers' order (down
levels, up levels, mid block), and one of two projections:

- the base IP-Adapter (h94/IP-Adapter's `ip-adapter_sd15.safetensors` and its `_light` version): ImageProjection,
  image_proj.{proj,norm}.*, over the image encoder's projected image embedding;
- IP-Adapter Plus (`ip-adapter-plus_sd15.safetensors`, and `ip-adapter-plus-face_sd15.safetensors` of the same
  layout): Resampler, a perceiver (Alayrac et al. 2022, Flamingo) whose learned latents attend to the image encoder's
  penultimate hidden states, image_proj.{latents,proj_in,layers,proj_out,norm_out}.*; its sizes read off the file.

The Full-face and FaceID variants are refused by name.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..kernels import attention
from .checkpoint import _fill, _Problems
from .clip import VisionTower, clip_preprocess, vision_config_from_transformers
from .ldm_keys import CheckpointError, MissingFile, Src
from .unet import IP_LINKS, Transformer2D, UNet
from .weight_files import _Reader, _weight_files

__all__ = ["IPAdapter", "IPLink", "ImageProjection", "Resampler", "ResamplerConfig", "cross_attentions",
           "layer_scales", "read_ip_adapter", "read_image_encoder", "with_ip_links"]

# image_proj keys of the variants we do not run -> their name (checked in this order: FaceID Plus has proj.0 too)
_VARIANTS = {"proj.3.weight": "IP-Adapter Full Face", "perceiver_resampler.proj_in.weight": "IP-Adapter FaceID Plus",
             "proj.0.weight": "IP-Adapter FaceID"}
_SUPPORTED = ("only the base IP-Adapter (ip-adapter_sd15 and its _light version) and IP-Adapter Plus "
              "(ip-adapter-plus_sd15, ip-adapter-plus-face_sd15) are supported")
_DIM_HEAD = 64  # the Resampler's head width: every published file's, and what diffusers assumes to count heads


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


@dataclass(frozen=True)
class ResamplerConfig:
    num_tokens: int   # N: the learned latents, one per output token
    width: int        # D: the latents' width
    in_dim: int       # E: the image encoder's hidden size
    out_dim: int      # C: the UNet's cross_attention_dim
    depth: int        # (attention, feed-forward) layers
    heads: int        # of _DIM_HEAD channels each
    ff_mult: int = 4  # the feed-forward's hidden width, in D


class PerceiverAttention(nn.Module):
    """The latents attend to the image features and themselves: q from the latents, k and v from both, each
    LayerNorm'd first (norm1 the features', norm2 the latents'); no biases."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        inner = heads * _DIM_HEAD
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.to_q = nn.Linear(width, inner, bias=False)
        self.to_kv = nn.Linear(width, 2 * inner, bias=False)  # k rows, then v rows
        self.to_out = nn.Linear(inner, width, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """x (B, S, D) image features, latents (B, N, D) -> (B, N, D)."""
        b, n, _ = latents.shape
        x, latents = self.norm1(x), self.norm2(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)  # (B, S + N, H * d) each

        def split(t):  # (B, L, H * d) -> (B, H, L, d)
            return t.view(b, t.shape[1], self.heads, _DIM_HEAD).transpose(1, 2)
        out = attention(split(self.to_q(latents)), split(k), split(v))  # (B, H, N, d), scale d^-0.5
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class Resampler(nn.Module):
    """IP-Adapter Plus' projection: image hidden states (B, S, E) -> N context tokens (B, N, C). Learned latents,
    refined by `depth` layers of [PerceiverAttention, LayerNorm-Linear-GELU-Linear feed-forward], each added to them,
    then projected and LayerNorm'd (the original's Resampler, diffusers' IPAdapterPlusImageProjection; the file's
    names: layers.<i>.0 the attention, layers.<i>.1.{0,1,3} the feed-forward)."""

    def __init__(self, cfg: ResamplerConfig):
        super().__init__()
        d = cfg.width
        self.cfg, self.num_tokens = cfg, cfg.num_tokens
        self.latents = nn.Parameter(torch.randn(1, cfg.num_tokens, d) / d ** 0.5)
        self.proj_in = nn.Linear(cfg.in_dim, d)
        self.layers = nn.ModuleList(nn.ModuleList([PerceiverAttention(d, cfg.heads), nn.Sequential(
            nn.LayerNorm(d), nn.Linear(d, cfg.ff_mult * d, bias=False), nn.GELU(),
            nn.Linear(cfg.ff_mult * d, d, bias=False))]) for _ in range(cfg.depth))
        self.proj_out = nn.Linear(d, cfg.out_dim)
        self.norm_out = nn.LayerNorm(cfg.out_dim)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(hidden.to(self.proj_in.weight.dtype))  # (B, S, D)
        latents = self.latents.expand(x.shape[0], -1, -1)  # (B, N, D)
        for attn, ff in self.layers:
            latents = latents + attn(x, latents)
            latents = latents + ff(latents)
        return self.norm_out(self.proj_out(latents))  # (B, N, C)


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
    """The image encoder, the projection (ImageProjection or Resampler) and one IPAttention per cross-attention (in
    cross_attentions order)."""

    def __init__(self, image_encoder: VisionTower, image_proj: ImageProjection | Resampler,
                 layers: list[IPAttention]):
        super().__init__()
        self.image_encoder = image_encoder
        self.image_proj = image_proj
        self.layers = nn.ModuleList(layers)

    @torch.inference_mode()
    def tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, H, W) in [-1, 1] -> (tokens, unconditional tokens), each (B, N, C) float32, row i from
        image i alone: the image's and, for classifier-free guidance, diffusers' negative image embeds' (the base
        projection of a zero image embedding; Plus', of the hidden states of all-zero pixel_values)."""
        enc = self.image_encoder
        p = next(enc.parameters())
        pixels = clip_preprocess(images.float(), enc.cfg.image_size).to(p.device, p.dtype)  # (B, 3, S, S)
        if isinstance(self.image_proj, Resampler):  # the penultimate layer's hidden states (B, 1 + P, E)
            cond = self.image_proj(enc.vision_model.hidden_state(pixels, layer=-2))
            uncond = self.image_proj(enc.vision_model.hidden_state(torch.zeros_like(pixels[:1]), layer=-2))
            return cond.float(), uncond.float().repeat(len(pixels), 1, 1)
        embeds = enc(pixels)  # (B, projection_dim)
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


def _image_projection(path: Path, shapes: dict, image_encoder: VisionTower, cross: int) -> ImageProjection:
    """The base projection the file's image_proj.proj.weight (N C, projection_dim) asks for, on the meta device."""
    rows, embed_dim = shapes["image_proj.proj.weight"]
    if rows % cross or embed_dim != image_encoder.cfg.projection_dim:
        raise CheckpointError(f"{path}: image_proj.proj.weight is {rows}x{embed_dim}, which does not fit this model "
                              f"(N x {cross} text width by the image encoder's {image_encoder.cfg.projection_dim})")
    with torch.device("meta"):
        return ImageProjection(embed_dim, cross, rows // cross)


def _resampler(path: Path, shapes: dict, image_encoder: VisionTower, cross: int) -> Resampler:
    """The Resampler the file's shapes ask for, on the meta device: N and D from image_proj.latents (1, N, D), the
    depth from the highest layers.<i>, the heads from layers.0.0.to_q.weight (heads * 64, D), as diffusers infers
    them. What is missing or of another shape is left to the key-by-key check."""
    latents, width = shapes["image_proj.latents"], image_encoder.cfg.hidden_size
    if len(latents) != 3 or latents[0] != 1:
        raise CheckpointError(f"{path}: image_proj.latents is {latents}, not (1, N, width) as an IP-Adapter Plus "
                              "file's")
    proj_in = shapes.get("image_proj.proj_in.weight")
    if proj_in is not None and proj_in[1:] != (width,):
        raise CheckpointError(f"{path}: image_proj.proj_in.weight is {proj_in}, which does not fit this image encoder: "
                              f"IP-Adapter Plus reads its hidden states, {width} wide, so (D, {width}) was expected "
                              "(the file is for another image encoder)")
    layers = [k.split(".")[2] for k in shapes if k.startswith("image_proj.layers.")]
    depth = 1 + max((int(i) for i in layers if i.isdigit()), default=0)
    heads = max(1, shapes.get("image_proj.layers.0.0.to_q.weight", (_DIM_HEAD,))[0] // _DIM_HEAD)
    with torch.device("meta"):
        return Resampler(ResamplerConfig(latents[1], latents[2], width, cross, depth, heads))


def read_ip_adapter(path: Path, unet: UNet, image_encoder: VisionTower) -> IPAdapter:
    """The IP-Adapter file at `path` (base or Plus) for `unet` and `image_encoder`, in their device and dtype; every
    key and shape checked (CheckpointError naming the file and what is wrong)."""
    reader = _Reader([path])
    keys = set(reader.shapes)
    proj = {k.removeprefix("image_proj.") for k in keys if k.startswith("image_proj.")}
    if variant := next((name for key, name in _VARIANTS.items() if key in proj), None):
        raise CheckpointError(f"{path}: an {variant} file: {_SUPPORTED}")
    p, cross = next(unet.parameters()), unet.cfg.cross_attention_dim
    if "latents" in proj:
        image_proj = _resampler(path, reader.shapes, image_encoder, cross)
        what = f"an IP-Adapter Plus (a Resampler of {image_proj.cfg.depth} layers, {image_proj.cfg.heads} heads)"
    elif "proj.weight" in proj:
        image_proj, what = _image_projection(path, reader.shapes, image_encoder, cross), "an IP-Adapter"
    else:
        raise CheckpointError(f"{path}: not an IP-Adapter file (no image_proj.proj.weight nor image_proj.latents; "
                              f"keys: {', '.join(sorted(keys)[:5])})")
    with torch.device("meta"):  # filled from the file below
        layers = [IPAttention(cross, t2d.transformer_blocks[0].attn2.to_q.out_features)
                  for _, t2d in cross_attentions(unet)]
    # (module, {its key: the file's}); diffusers' key_id 1, 3, 5, ...: the even ids were the self-attentions'
    parts = [(image_proj, {k: Src(f"image_proj.{k}") for k in image_proj.state_dict()})]
    parts += [(lay, {k: Src(f"ip_adapter.{2 * i + 1}.{k}") for k in lay.state_dict()}) for i, lay in enumerate(layers)]
    problems = _Problems()
    for module, names in parts:
        problems.check(module, names, reader)
    problems.unexpected = sorted(keys - {src.key for _, names in parts for src in names.values()})
    problems.raise_if_any(str(path), f"{what} for this UNet ({len(layers)} cross-attentions)")
    for module, names in parts:
        _fill(module, names, reader, p.dtype, p.device)
    return IPAdapter(image_encoder, image_proj, layers).eval()
