"""The denoising UNet of Stable Diffusion 1.x / 2.x: eps (or v) = UNet(noisy latents, timestep, text context).

Module paths mirror diffusers' UNet2DConditionModel (diffusers/models/unets/unet_2d_condition.py,
unet_2d_blocks.py, transformers/transformer_2d.py, attention.py), so a diffusers `unet/` folder loads with a
strict load_state_dict. The blocks are plain containers; UNet.forward walks them in one readable loop.
SD1 and SD2 differ only in config: per-level head counts, text width, and Linear vs 1x1-conv proj_in/proj_out.
"""
from __future__ import annotations

import math
import numbers
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import UNetConfig
from .layers import (Attention, Downsample2D, FeedForward, GroupNorm, LayerNorm, ResnetBlock2D, TimestepEmbedding,
                     Timesteps, Upsample2D, maybe_checkpoint)

__all__ = ["UNet", "FreeU", "fourier_filter", "IP_LINKS"]

# The IP-Adapter links of the call running in this thread (or task): {Transformer2D: IPLink}, set by the pipeline
# for one call (nn/ip_adapter.py). Per call, not a module attribute, so that loading or unloading an IP-Adapter
# while another thread's call runs cannot make that call read its text tokens as image tokens.
IP_LINKS: ContextVar[dict | None] = ContextVar("backdrop_ip_links", default=None)


def fourier_filter(x: torch.Tensor, scale: float, threshold: int = 1) -> torch.Tensor:
    """x (B, C, H, W) with its lowest spatial frequencies (the centred 2*threshold square of the shifted spectrum)
    scaled by `scale`; the FFT runs in float32 (fp16 FFTs are experimental, bf16 ones missing), as diffusers'."""
    freq = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=(-2, -1)), dim=(-2, -1))  # (B, C, H, W) complex
    H, W = x.shape[-2:]
    freq[..., H // 2 - threshold:H // 2 + threshold, W // 2 - threshold:W // 2 + threshold] *= scale
    return torch.fft.ifftn(torch.fft.ifftshift(freq, dim=(-2, -1)), dim=(-2, -1)).real.to(x.dtype)


@dataclass(frozen=True)
class FreeU:
    """FreeU (Si et al. 2023, arXiv:2309.11497), diffusers' enable_freeu: in the two coarsest up levels, the first
    half of the backbone's channels is scaled by b1 (b2) and the skip connection's lowest frequencies by s1 (s2),
    before they are concatenated. Training-free; the authors' values are s1=0.9, s2=0.2, b1=1.5 (SD2: 1.4), b2=1.6."""
    s1: float
    s2: float
    b1: float
    b2: float

    def __post_init__(self):
        for name in ("s1", "s2", "b1", "b2"):  # diffusers silently turns FreeU off for a 0 (or None)
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < math.inf:
                raise ValueError(f"FreeU {name} must be a finite number > 0, got {value!r}")

    def __call__(self, level: int, h: torch.Tensor, skip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Up level `level`'s backbone h (B, C, H, W) and skip (B, C_skip, H, W), FreeU'd (levels 0 and 1 only)."""
        if level > 1:
            return h, skip
        half = h.shape[1] // 2
        b, s = (self.b1, self.s1) if level == 0 else (self.b2, self.s2)
        return torch.cat([h[:, :half] * b, h[:, half:]], dim=1), fourier_filter(skip, s)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention to the text, GEGLU feed-forward; each residual."""

    def __init__(self, dim: int, heads: int, cross_attention_dim: int):
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn1 = Attention(dim, heads, dim // heads)
        self.norm2 = LayerNorm(dim)
        self.attn2 = Attention(dim, heads, dim // heads, cross_attention_dim=cross_attention_dim)
        self.norm3 = LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, ip=None) -> torch.Tensor:
        """ip: (image tokens (B, N, C), their IPAttention, scale) from an IP-Adapter (nn/ip_adapter.py), or None."""
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context, ip)
        return x + self.ff(self.norm3(x))


class Transformer2D(nn.Module):
    """Feature map -> tokens -> one BasicTransformerBlock -> feature map, plus the input (diffusers'
    Transformer2DModel for continuous inputs, LDM's SpatialTransformer).

    SD1 stores its projections as 1x1 convs, SD2 (use_linear_projection) as Linear layers. A 1x1 conv is a Linear on
    each pixel's channels, so both run as one on the tokens: the feature map is transposed once on the way in and is
    a free view on the way out (a conv there would copy the transposed tokens back first), and single-threaded CPU
    convs of 1x1 take torch's slow im2col path (10% of an SD1.5 training step at one thread).
    """

    def __init__(self, channels: int, heads: int, cross_attention_dim: int, groups: int, linear: bool):
        super().__init__()
        self.norm = GroupNorm(groups, channels, eps=1e-6)  # 1e-6: LDM's Normalize, not the resnets' norm_eps
        proj = (lambda: nn.Linear(channels, channels)) if linear else (lambda: nn.Conv2d(channels, channels, 1))
        self.proj_in = proj()
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(channels, heads, cross_attention_dim)])
        self.proj_out = proj()

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        ip, links = None, IP_LINKS.get()
        if links is not None and (link := links.get(self)) is not None:  # image tokens end the context
            n = link.num_tokens
            if context.shape[1] <= n:
                raise ValueError(f"UNet.forward: in an IP-Adapter call the context ends with its {n} image tokens; "
                                 f"got {context.shape[1]} tokens in all")
            context, ip = context[:, :-n], (context[:, -n:], link.layer, link.scale)
        B, C, H, W = x.shape
        h = self.norm(x).permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, HW, C): one copy of the transposed map
        h = F.linear(h, self.proj_in.weight.flatten(1), self.proj_in.bias)  # weight (C, C) or (C, C, 1, 1)
        for block in self.transformer_blocks:
            h = block(h, context, ip)
        h = F.linear(h, self.proj_out.weight.flatten(1), self.proj_out.bias)
        return x + h.reshape(B, H, W, C).permute(0, 3, 1, 2)  # x first: the sum takes its NCHW layout


class Level(nn.Module):
    """One UNet level on the down or up path: `resnets`, optional `attentions` (one per resnet), and optional
    `downsamplers.0` / `upsamplers.0` (diffusers' {CrossAttn,}{Down,Up}Block2D)."""

    def __init__(self, resnets: list[nn.Module], attentions: list[nn.Module] | None,
                 down: Downsample2D | None = None, up: Upsample2D | None = None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions) if attentions else None
        self.downsamplers = nn.ModuleList([down]) if down is not None else None
        self.upsamplers = nn.ModuleList([up]) if up is not None else None


class MidBlock(nn.Module):
    """resnets.0, attentions.0, resnets.1 at the lowest resolution (diffusers' UNetMidBlock2DCrossAttn)."""

    def __init__(self, resnets: list[nn.Module], attention: nn.Module):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList([attention])


class UNet(nn.Module):
    """UNet2DConditionModel for SD1/SD2: forward(sample (B, Cin, h, w), timestep, context (B, L, C)) -> (B, 4, h, w).

    Set `gradient_checkpointing = True` to recompute each resnet/attention block in backward when training, and
    `freeu` to a FreeU to apply it (None: off).
    """

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        ch, heads, n = cfg.block_out_channels, cfg.num_heads, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_proj, self.time_embedding, self.down_blocks, self.mid_block = encoder_modules(cfg)

        # Up level i mirrors down level n-1-i. Its resnet j takes the previous up level's output (j == 0) or its
        # own, concatenated with one skip; a level's last skip is the next finer down level's downsampled output
        # (or conv_in's), so it carries that level's channels, rev[i + 1] (diffusers' res_skip_channels).
        self.up_blocks = nn.ModuleList()
        rev, rev_heads, rev_attn = ch[::-1], heads[::-1], cfg.attention_levels[::-1]
        for i in range(n):
            c, c_prev, c_skip_last = rev[i], rev[max(i - 1, 0)], rev[min(i + 1, n - 1)]
            layers = cfg.layers_per_block + 1
            self.up_blocks.append(Level(
                [_resnet(cfg, (c_prev if j == 0 else c) + (c_skip_last if j == layers - 1 else c), c)
                 for j in range(layers)],
                [_attention(cfg, c, rev_heads[i]) for _ in range(layers)] if rev_attn[i] else None,
                up=Upsample2D(c) if i < n - 1 else None))

        self.conv_norm_out = GroupNorm(cfg.norm_num_groups, ch[0], cfg.norm_eps, silu=True)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)
        self.gradient_checkpointing = False
        self.freeu: FreeU | None = None

    def forward(self, sample: torch.Tensor, timestep, context: torch.Tensor,
                down_block_additional_residuals=None, mid_block_additional_residual=None,
                down_intrablock_additional_residuals=None) -> torch.Tensor:
        """The residuals (diffusers' names):
        - a ControlNet's (nn/controlnet.py): one per skip (B, C_skip, H, W) in the down path's order and one for the
          mid block's output, added to the skips and to the mid block's output;
        - a T2I-Adapter's (nn/t2i_adapter.py) down_intrablock_additional_residuals: a list of at most one tensor
          per down level, from the first, each of that level's output shape (B, C_i, H_i, W_i), added inside the
          down path (see encode);
        as diffusers' UNet2DConditionModel adds them; both kinds may be given together."""
        cfg = self.cfg
        if sample.dim() != 4 or sample.shape[1] != cfg.in_channels:
            raise ValueError(f"UNet.forward: sample must be (B, {cfg.in_channels}, h, w), got {tuple(sample.shape)}")
        check_context(cfg, context, sample.shape[0], "UNet.forward")
        intrablock = check_intrablock(down_intrablock_additional_residuals, len(self.down_blocks))
        ckpt = self.gradient_checkpointing and self.training
        emb = time_embedding(self, timestep, sample)  # (B, 4*C0)
        h, skips = encode(self.down_blocks, self.mid_block, self.conv_in(sample), emb, context, ckpt, intrablock)
        if down_block_additional_residuals is not None:
            if len(down_block_additional_residuals) != len(skips) or mid_block_additional_residual is None:
                raise ValueError(f"UNet.forward: {len(skips)} down residuals and a mid one, one per skip, got "
                                 f"{len(down_block_additional_residuals)} and "
                                 f"{'a' if mid_block_additional_residual is not None else 'no'} mid one")
            skips = [s + r for s, r in zip(skips, down_block_additional_residuals)]
        if mid_block_additional_residual is not None:
            h = h + mid_block_additional_residual

        for i, level in enumerate(self.up_blocks):
            for j, resnet in enumerate(level.resnets):
                skip = skips.pop()
                if self.freeu is not None:
                    h, skip = self.freeu(i, h, skip)
                h = torch.cat([h, skip], dim=1)  # (B, C + C_skip, H, W)
                h = maybe_checkpoint(ckpt, resnet, h, emb)
                if level.attentions is not None:
                    h = maybe_checkpoint(ckpt, level.attentions[j], h, context)
            if level.upsamplers is not None:
                # Land exactly on the next skip's size: latent sides that are not multiples of 2^(levels-1)
                # were rounded up by the stride-2 convs (diffusers' forward_upsample_size / upsample_size).
                h = level.upsamplers[0](h, skips[-1].shape[-2:])
        return self.conv_out(self.conv_norm_out(h))


# -------------------------------------------------------------------- the encoder UNet and ControlNet share

def _resnet(cfg: UNetConfig, c_in: int, c_out: int) -> ResnetBlock2D:
    return ResnetBlock2D(c_in, c_out, cfg.block_out_channels[0] * cfg.time_embed_dim_mult, cfg.norm_num_groups,
                         cfg.norm_eps)


def _attention(cfg: UNetConfig, c: int, heads: int) -> Transformer2D:
    return Transformer2D(c, heads, cfg.cross_attention_dim, cfg.norm_num_groups, cfg.use_linear_projection)


def encoder_modules(cfg: UNetConfig) -> tuple[Timesteps, TimestepEmbedding, nn.ModuleList, MidBlock]:
    """time_proj, time_embedding, down_blocks and mid_block (diffusers' names): what a UNet and a ControlNet
    have alike."""
    ch, heads, n = cfg.block_out_channels, cfg.num_heads, len(cfg.block_out_channels)
    down_blocks = nn.ModuleList()
    for i in range(n):
        c_in, c = ch[max(i - 1, 0)], ch[i]
        down_blocks.append(Level(
            [_resnet(cfg, c_in if j == 0 else c, c) for j in range(cfg.layers_per_block)],
            [_attention(cfg, c, heads[i]) for _ in range(cfg.layers_per_block)] if cfg.attention_levels[i] else None,
            down=Downsample2D(c, padding=1) if i < n - 1 else None))
    mid = MidBlock([_resnet(cfg, ch[-1], ch[-1]), _resnet(cfg, ch[-1], ch[-1])], _attention(cfg, ch[-1], heads[-1]))
    return Timesteps(ch[0]), TimestepEmbedding(ch[0], ch[0] * cfg.time_embed_dim_mult), down_blocks, mid


def check_context(cfg: UNetConfig, context: torch.Tensor, batch: int, where: str) -> None:
    if context.dim() != 3 or context.shape[0] != batch or context.shape[2] != cfg.cross_attention_dim:
        raise ValueError(f"{where}: context must be ({batch}, L, {cfg.cross_attention_dim}), "
                         f"got {tuple(context.shape)}")


def time_embedding(model: nn.Module, timestep, sample: torch.Tensor) -> torch.Tensor:
    """model.time_embedding(model.time_proj(timesteps)) (B, 4*C0) for a timestep given as an int / float / 0-dim /
    (1,) / (B,); fractional timesteps are kept (Euler, Karras)."""
    B = sample.shape[0]
    t = torch.as_tensor(timestep, device=sample.device)
    if t.dim() == 0:
        t = t[None]
    if t.dim() != 1 or t.shape[0] not in (1, B):
        raise ValueError(f"{type(model).__name__}.forward: timestep must be a scalar or shape (B,) with B={B}, "
                         f"got shape {tuple(t.shape)}")
    return model.time_embedding(model.time_proj(t.float().expand(B)).to(sample.dtype))


def check_intrablock(residuals, levels: int) -> list[torch.Tensor]:
    """down_intrablock_additional_residuals as a list ([] for None): a list or tuple of at most `levels` tensors."""
    if residuals is None:
        return []
    if not isinstance(residuals, (list, tuple)) or not all(isinstance(r, torch.Tensor) for r in residuals):
        got = type(residuals).__name__ if not isinstance(residuals, (list, tuple)) else \
            f"a {type(residuals).__name__} of {', '.join(sorted({type(r).__name__ for r in residuals}))}"
        raise ValueError("UNet.forward: down_intrablock_additional_residuals must be a list of tensors, one per down "
                         f"level from the first, got {got}")
    if len(residuals) > levels:
        raise ValueError(f"UNet.forward: down_intrablock_additional_residuals: at most one per down level ({levels}), "
                         f"got {len(residuals)}")
    return list(residuals)


def _add_intrablock(h: torch.Tensor, residual: torch.Tensor, level: int) -> torch.Tensor:
    if residual.shape != h.shape:
        raise ValueError(f"UNet.forward: down_intrablock_additional_residuals[{level}] must have down level {level}'s "
                         f"output shape {tuple(h.shape)}, got {tuple(residual.shape)}")
    return h + residual


def encode(down_blocks: nn.ModuleList, mid: MidBlock, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor,
           ckpt: bool, intrablock: list[torch.Tensor] = ()) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The down path from conv_in's output h, then the mid block: (the mid block's output, the skips: h and every
    down resnet/attention and downsampler output, in order).

    intrablock: a T2I-Adapter's features, for the first len(intrablock) down levels, placed as diffusers places its
    down_intrablock_additional_residuals: in a level with cross-attention, added to its last (resnet, attention)
    output, before that is kept as a skip and downsampled; in a level without, added to the level's output after
    its downsampler (if any), and (diffusers adds it in place) to the level's last skip, that same tensor."""
    skips = [h]
    for i, level in enumerate(down_blocks):
        extra = intrablock[i] if i < len(intrablock) else None
        for j, resnet in enumerate(level.resnets):
            h = maybe_checkpoint(ckpt, resnet, h, emb)
            if level.attentions is not None:
                h = maybe_checkpoint(ckpt, level.attentions[j], h, context)
                if extra is not None and j == len(level.resnets) - 1:
                    h = _add_intrablock(h, extra, i)
            skips.append(h)
        if level.downsamplers is not None:
            h = level.downsamplers[0](h)
            skips.append(h)
        if extra is not None and level.attentions is None:
            h = skips[-1] = _add_intrablock(h, extra, i)
    h = maybe_checkpoint(ckpt, mid.resnets[0], h, emb)
    h = maybe_checkpoint(ckpt, mid.attentions[0], h, context)
    return maybe_checkpoint(ckpt, mid.resnets[1], h, emb), skips
