"""Building blocks shared by the UNet and the VAE.

Attribute names equal diffusers' (diffusers/models/{resnet,attention_processor,attention,embeddings,
downsampling,upsampling}.py), so a diffusers state_dict loads with strict=True. Normalisation and attention go
through `backdrop.kernels` only, which picks the fused Triton kernel on CUDA and the torch reference elsewhere.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .. import kernels

__all__ = [
    "GroupNorm", "LayerNorm", "ResnetBlock2D", "Downsample2D", "Upsample2D", "upsample_conv_subpixel", "Attention",
    "GEGLU", "FeedForward", "Timesteps", "TimestepEmbedding", "timestep_embedding", "maybe_checkpoint",
]


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm (same parameters and init) that runs through `kernels.group_norm`.

    `silu=True` applies SiLU in the same call: every GroupNorm in SD except the attention blocks' is followed by
    SiLU, and the fused Triton kernel then reads and writes the activation once instead of twice.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, silu: bool = False):
        super().__init__(num_groups, num_channels, eps=eps, affine=True)
        self.silu = silu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, silu=self.silu)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", silu=True" if self.silu else "")


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same parameters) that keeps a 16-bit input 16-bit under autocast, as MosaicML's low-precision
    LayerNorm does. CUDA's autocast runs layer_norm in fp32, so each of a transformer block's three norms wrote
    fp32 for the next Linear to cast straight back to 16 bits: twice the bytes and one more kernel. The kernel
    accumulates in fp32 either way, and every consumer here is a Linear that would round to 16 bits anyway."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 or not torch.is_autocast_enabled(x.device.type):
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv, + time embedding, GroupNorm-SiLU-dropout-conv, + (1x1-projected) input.

    diffusers' ResnetBlock2D with time_embedding_norm="default", output_scale_factor=1 (DDPM / LDM).
    `temb_channels=None` drops time_emb_proj (the VAE's blocks).
    """

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int | None, groups: int = 32,
                 eps: float = 1e-5, dropout: float = 0.0):
        super().__init__()
        self.norm1 = GroupNorm(groups, in_channels, eps, silu=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels is not None else None
        self.norm2 = GroupNorm(groups, out_channels, eps, silu=True)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(self.norm1(x))
        if self.time_emb_proj is not None:
            if temb is None:
                raise ValueError("ResnetBlock2D: this block has time_emb_proj, so it needs a time embedding")
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]  # (B, C, 1, 1) broadcast over H, W
        h = self.conv2(self.dropout(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Downsample2D(nn.Module):
    """3x3 conv with stride 2.

    padding=1 in the UNet. The VAE encoder uses padding=0 after an asymmetric pad of one zero row/column at the
    bottom/right (LDM's Downsample, kept by diffusers as `downsample_padding=0`), so odd sizes round down there.
    """

    def __init__(self, channels: int, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))  # (left, right, top, bottom)
        return self.conv(x)


def _fold_taps(k: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split 3 taps along `dim` into the 2 taps each output phase of a nearest-2x upsample sees.

    Upsampled row 2i reads input rows (i-1, i, i) through taps (0, 1, 2), so its 2-tap kernel is (k0, k1 + k2)
    over rows (i-1, i); row 2i+1 reads (i, i, i+1): (k0 + k1, k2) over rows (i, i+1).
    """
    k0, k1, k2 = k.unbind(dim)
    return torch.stack([k0, k1 + k2], dim), torch.stack([k0 + k1, k2], dim)


def upsample_conv_subpixel(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """conv3x3(nearest_upsample_2x(x)) computed at the input resolution: (B, I, H, W) -> (B, O, 2H, 2W).

    Each of the four output phases (row parity a, column parity c) is a 2x2 conv of the input, so the work is
    4 phases x 4 taps = 16 instead of 4 pixels x 9 taps = 36 multiply-adds per input pixel and channel pair,
    and the 4x upsampled input is never materialised (the sub-pixel convolution of Shi et al. 2016, read
    backwards). The result equals the reference up to float rounding of the folded weights.
    """
    B, _, H, W = x.shape
    O = weight.shape[0]
    rows = _fold_taps(weight, 2)  # (O, I, 2, 3) for a = 0, 1
    taps = torch.cat([k for r in rows for k in _fold_taps(r, 3)])  # (4*O, I, 2, 2), phases 00, 01, 10, 11
    # With padding 1 a 2x2 conv gives (H+1, W+1) outputs; phase (a, c) is the window starting at (a, c).
    y = F.conv2d(x, taps, None if bias is None else bias.repeat(4), padding=1)  # (B, 4*O, H+1, W+1)
    out = y.new_empty(B, O, H, 2, W, 2)  # (B, O, H, a, W, c) -> pixel (2i + a, 2j + c)
    for p in range(4):
        a, c = divmod(p, 2)
        out[:, :, :, a, :, c] = y[:, p * O:(p + 1) * O, a:a + H, c:c + W]
    return out.view(B, O, 2 * H, 2 * W)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x, then a 3x3 conv.

    `output_size` overrides the 2x: a UNet whose latent side is not a multiple of 2^(levels-1) has skip
    connections of odd size, and the up path must land exactly on them (diffusers' `upsample_size`). Traced for
    ONNX, the size is always the skip's, read from the graph, so one export runs every latent size as torch does
    (a traced 2x would be baked in, and land on the skips only at multiples of 2^(levels-1)).
    Exact 2x on CPU maps of at least `subpixel_min_pixels` runs as `upsample_conv_subpixel` (about 2x faster
    there; on smaller maps folding and re-laying the 16/9 larger weight costs more than the conv saves).
    """

    subpixel_min_pixels = 32 * 32  # measured on CPU, fp32 and bf16: 640ch @ 32x32 gains 1.6x, 1280ch @ 16x16 loses

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, output_size: tuple[int, int] | None = None) -> torch.Tensor:
        H, W = x.shape[-2:]
        exact_2x = output_size is None or (tuple(output_size) == (2 * H, 2 * W) and not torch.jit.is_tracing())
        # CPU eager only: that is where it was measured; ONNX/TorchScript tracing keeps the plain graph.
        if exact_2x and H * W >= self.subpixel_min_pixels and x.device.type == "cpu" and not torch.jit.is_tracing():
            return upsample_conv_subpixel(x, self.conv.weight, self.conv.bias)
        if exact_2x:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=output_size, mode="nearest")
        return self.conv(x)


class Attention(nn.Module):
    """Multi-head attention over (B, S, C) tokens: self-attention, or cross-attention when `context` is given.

    diffusers' Attention with AttnProcessor2_0: to_q/to_k/to_v (bias off in the UNet, on in the VAE) and to_out.0.
    Three Linear layers (not one fused qkv) because the checkpoint stores three; the heads are split by a view +
    transpose that `kernels.attention` (SDPA / the Triton kernel) reads in place, without a copy.
    """

    def __init__(self, query_dim: int, heads: int, dim_head: int, cross_attention_dim: int | None = None,
                 bias: bool = False, dropout: float = 0.0):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(cross_attention_dim or query_dim, inner, bias=bias)
        self.to_v = nn.Linear(cross_attention_dim or query_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim), nn.Dropout(dropout)])  # key: to_out.0

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, ip=None) -> torch.Tensor:
        """ip: (image tokens (B, N, C), an IPAttention, scale): the IP-Adapter's attention to the image tokens,
        added to the text attention's before to_out (nn/ip_adapter.py)."""
        context = x if context is None else context
        B, S, _ = x.shape
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)  # (B, S, H*D), (B, L, H*D) x2
        D = q.shape[-1] // self.heads

        def heads(t: torch.Tensor) -> torch.Tensor:  # (B, L, H*D) -> (B, H, L, D), a view
            return t.view(B, -1, self.heads, D).transpose(1, 2)

        q = heads(q)  # (B, H, S, D)
        out = kernels.attention(q, heads(k), heads(v))  # (B, H, S, D)
        if ip is not None:
            tokens, layer, scale = ip
            out = out + scale * kernels.attention(q, heads(layer.to_k_ip(tokens)), heads(layer.to_v_ip(tokens)))
        out = out.transpose(1, 2).reshape(B, S, self.heads * D)  # (B, S, H*D)
        return self.to_out[1](self.to_out[0](out))


class GEGLU(nn.Module):
    """proj to 2*inner, then value * GELU(gate) (Shazeer 2020, "GLU Variants Improve Transformer")."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)  # (B, S, inner) each; value first, as diffusers
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU (dim -> 4*dim), dropout, Linear (4*dim -> dim). Keys ff.net.0.proj, ff.net.2 as diffusers."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (B,) timesteps -> (B, dim) float32, [cos | sin] halves.

    The transformer position encoding (Vaswani et al. 2017) as DDPM/LDM use it: frequencies
    exp(-ln(max_period) * i / half) for i < half (diffusers' freq_shift=0), cosines first (flip_sin_to_cos=True).
    Timesteps may be fractional (Euler/Karras samplers interpolate the schedule).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) / half * torch.arange(half, dtype=torch.float32,
                                                                  device=timesteps.device))
    args = timesteps.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2*half)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class Timesteps(nn.Module):
    """Parameter-free module form of `timestep_embedding` (diffusers' `time_proj`; holds no state)."""

    def __init__(self, num_channels: int):
        super().__init__()
        self.num_channels = num_channels

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        return timestep_embedding(timesteps, self.num_channels)


class TimestepEmbedding(nn.Module):
    """linear_1, SiLU, linear_2: the sinusoid (C) -> the time embedding every resnet adds (4C)."""

    def __init__(self, in_channels: int, time_embed_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


def maybe_checkpoint(enabled: bool, module: nn.Module, *args):
    """module(*args), recomputed in the backward pass instead of keeping activations when `enabled` and grads
    are on. Non-reentrant checkpointing (the one PyTorch recommends) works with keyword-free calls and DDP."""
    if enabled and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(module, *args, use_reentrant=False)
    return module(*args)
