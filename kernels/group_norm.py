"""GroupNorm (+ fused SiLU) in Triton, forward and backward (the torch reference `group_norm_ref` is in reference.py).

Layout. x (B, C, *spatial) is read as (B, C, L) with L = prod(spatial) through three strides, so NCHW
(stride_l = 1), channels-last (stride_c = 1) and 3-D (B, C, L) inputs run the same kernels. A program owns BLOCK_G
consecutive groups of one batch item and walks L in (BLOCK_L, BLOCK_G, BLOCK_CPG) tiles: channel c = g * CPG + j
with j < CPG (CPG = C / G channels per group, padded to a power of two in registers only; masked lanes never touch
memory). NCHW takes one group per program (contiguous along L, 16-byte vector loads); channels-last takes a
power-of-two number of groups, up to 128 contiguous bytes of each pixel (its loads are scalar when C/G is not a
power of two: coalesced across a warp, but more instructions).

Schedules, chosen by the launcher from the size of a group:
  single  a group fits in one tile: one launch, x read once. Statistics come from registers in two passes (mean,
          then the sum of squared deviations from it), then the same registers are normalized.
  split   a group is cut into chunks along L so that every SM has work. _gn_stats writes each chunk's (mean, M2),
          two-pass per tile and merged across tiles with Chan et al.'s parallel update (1979); _gn_fwd merges the
          chunks of its groups the same way and normalizes its own chunk. x is read twice (the second read mostly
          hits L2 at SD sizes) and written once.
Never E[x²] − E[x]², which cancels catastrophically on off-centre inputs. Statistics are fp32 whatever x's dtype.

Backward (x̂ = (x − μ)·rstd, y = x̂·w + b, out = y or silu(y); dy = dL/dy):
  dx = rstd · (dy·w − mean_g(dy·w) − x̂ · mean_g(dy·w·x̂)),  dw = Σ dy·x̂,  db = Σ dy,
with the same two schedules; per-chunk group sums and per-channel (dw, db) partials are reduced in fp32.
"""
from __future__ import annotations

import functools
import math
import operator

import torch
import triton
import triton.language as tl

from .autotune import autotune
from .autotune import interpreting as _interpreting
from .reference import differentiable_grads, group_norm_ref

# Elements per tile held in registers (fp32): 4096 across 4-16 warps is 8-32 registers a thread.
TILE = 4096
SINGLE_MAX = 4 * TILE  # a group up to this many (padded) elements is normalized from registers, x read once
MAX_CHUNKS = 64  # chunks per group in the split schedule; each _gn_fwd program merges all of its group's chunks


def _prune(configs, named_args, **kwargs):
    # Under TRITON_INTERPRET=1 nothing can be timed, and num_warps means nothing.
    return configs[:1] if _interpreting() else configs


# Memory-bound: the only knob worth tuning on H100 is how many warps share a tile (latency hiding vs registers).
_CONFIGS = [triton.Config({}, num_warps=w) for w in (4, 8, 16)]
_KEY = ["L", "G", "CPG", "stride_xl", "BLOCK_L", "BLOCK_G"]
_autotune = functools.partial(autotune, _CONFIGS, _KEY, _prune)


@triton.jit
def _tile(base, l0, g0, L, G, CPG, stride_c, stride_l,
          BLOCK_L: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_CPG: tl.constexpr):
    """Offsets and mask of the (BLOCK_L, BLOCK_G, BLOCK_CPG) tile at spatial row l0, group g0."""
    offs_l = l0 + tl.arange(0, BLOCK_L)
    offs_g = g0 + tl.arange(0, BLOCK_G)
    offs_j = tl.arange(0, BLOCK_CPG)
    chan = offs_g[:, None] * CPG + offs_j[None, :]  # (BLOCK_G, BLOCK_CPG)
    cmask = (offs_g[:, None] < G) & (offs_j[None, :] < CPG)
    offs = base + chan[None, :, :] * stride_c + offs_l[:, None, None] * stride_l  # (BLOCK_L, BLOCK_G, BLOCK_CPG)
    return offs, cmask[None, :, :] & (offs_l[:, None, None] < L)


@triton.jit
def _affine(W, Bias, g0, G, CPG, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
            BLOCK_G: tl.constexpr, BLOCK_CPG: tl.constexpr):
    """Per-channel weight and bias of the program's groups, (BLOCK_G, BLOCK_CPG) fp32 (1 and 0 when absent)."""
    offs_g = g0 + tl.arange(0, BLOCK_G)
    offs_j = tl.arange(0, BLOCK_CPG)
    chan = offs_g[:, None] * CPG + offs_j[None, :]
    cmask = (offs_g[:, None] < G) & (offs_j[None, :] < CPG)
    w = tl.full([BLOCK_G, BLOCK_CPG], 1.0, tl.float32)
    b = tl.zeros([BLOCK_G, BLOCK_CPG], tl.float32)
    if HAS_W:
        w = tl.load(W + chan, mask=cmask, other=0.0).to(tl.float32)
    if HAS_B:
        b = tl.load(Bias + chan, mask=cmask, other=0.0).to(tl.float32)
    return w, b


@triton.jit
def _tile_stats(x, mask, n):
    """Two-pass (mean, M2) per group of a tile; x is fp32 and 0 where masked, n = valid elements per group."""
    mean = tl.sum(tl.sum(x, 2), 0) / n  # (BLOCK_G,)
    d = tl.where(mask, x - mean[None, :, None], 0.0)
    return mean, tl.sum(tl.sum(d * d, 2), 0)


@triton.jit
def _chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Merge two (count, mean, M2) summaries (Chan, Golub & LeVeque 1979); exact for n_a == 0."""
    n = n_a + n_b
    w_b = n_b / n
    delta = mean_b - mean_a
    return n, mean_a + delta * w_b, m2_a + m2_b + delta * delta * n_a * w_b


@triton.jit
def _normalize(x, mask, mean, rstd, w, b, SILU: tl.constexpr):
    # (x - mean) * (rstd * w) rather than x * a + c: no cancellation between two large terms off-centre.
    # Masked lanes are zeroed so that no garbage (e.g. exp overflow in sigmoid) is ever computed.
    xhat = tl.where(mask, (x - mean[None, :, None]) * rstd[None, :, None], 0.0)
    y = xhat * w[None, :, :] + b[None, :, :]
    if SILU:
        y = y * tl.sigmoid(y)
    return y


@_autotune()
@triton.jit
def _gn_stats(
    X,            # (B, C, L) input through strides
    PMEAN, PM2,   # (B, G, NCH) fp32 out: mean and M2 of each chunk of each group
    stride_xb, stride_xc, stride_xl, L, G, CPG, n_gblocks, NCH, TILES,
    BLOCK_L: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_CPG: tl.constexpr,
):
    b = (tl.program_id(0) // n_gblocks).to(tl.int64)
    g0 = (tl.program_id(0) % n_gblocks) * BLOCK_G
    chunk = tl.program_id(1)
    lo = chunk * TILES * BLOCK_L
    hi = tl.minimum(lo + TILES * BLOCK_L, L)
    n = 0.0
    mean = tl.zeros([BLOCK_G], tl.float32)
    m2 = tl.zeros([BLOCK_G], tl.float32)
    for l0 in range(lo, hi, BLOCK_L):
        offs, mask = _tile(b * stride_xb, l0, g0, L, G, CPG, stride_xc, stride_xl, BLOCK_L, BLOCK_G, BLOCK_CPG)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        n_t = (tl.minimum(L - l0, BLOCK_L) * CPG).to(tl.float32)
        mean_t, m2_t = _tile_stats(x, mask, n_t)
        n, mean, m2 = _chan_merge(n, mean, m2, n_t, mean_t, m2_t)
    offs_g = g0 + tl.arange(0, BLOCK_G)
    idx = (b * G + offs_g) * NCH + chunk
    tl.store(PMEAN + idx, mean, mask=offs_g < G)
    tl.store(PM2 + idx, m2, mask=offs_g < G)


@triton.jit
def _merge_chunks(PA, PB, b, g0, G, L, CPG, NCH, TILES, BLOCK_L: tl.constexpr, BLOCK_G: tl.constexpr,
                  BLOCK_NCH: tl.constexpr):
    """Load the (BLOCK_G, NCH) per-chunk partials of the program's groups and each chunk's element count."""
    offs_g = g0 + tl.arange(0, BLOCK_G)
    offs_k = tl.arange(0, BLOCK_NCH)
    kmask = offs_k < NCH
    rows = TILES * BLOCK_L
    n_k = tl.where(kmask, tl.minimum(L - offs_k * rows, rows) * CPG, 0).to(tl.float32)  # (BLOCK_NCH,)
    idx = (b * G + offs_g)[:, None] * NCH + offs_k[None, :]
    pmask = (offs_g[:, None] < G) & kmask[None, :]
    return n_k, tl.load(PA + idx, mask=pmask, other=0.0), tl.load(PB + idx, mask=pmask, other=0.0)


@_autotune()
@triton.jit
def _gn_fwd(
    X, Y,          # (B, C, L) input and output through their own strides; Y is written everywhere
    W, Bias,       # (C,) affine parameters (ignored unless HAS_W / HAS_B)
    PMEAN, PM2,    # (B, G, NCH) fp32 chunk partials from _gn_stats (split schedule only)
    MEAN, RSTD,    # (B, G) fp32 out, for the backward
    stride_xb, stride_xc, stride_xl, stride_yb, stride_yc, stride_yl,
    L, G, CPG, n_gblocks, NCH, TILES, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr, SINGLE: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_CPG: tl.constexpr, BLOCK_NCH: tl.constexpr,
):
    b = (tl.program_id(0) // n_gblocks).to(tl.int64)
    g0 = (tl.program_id(0) % n_gblocks) * BLOCK_G
    chunk = tl.program_id(1)
    offs_g = g0 + tl.arange(0, BLOCK_G)
    w, bias = _affine(W, Bias, g0, G, CPG, HAS_W, HAS_B, BLOCK_G, BLOCK_CPG)
    n = L * CPG * 1.0  # (a float even when Triton specializes L == CPG == 1 to constants)
    if SINGLE:  # the tile is the whole group: statistics and output from the same registers
        offs, mask = _tile(b * stride_xb, 0, g0, L, G, CPG, stride_xc, stride_xl, BLOCK_L, BLOCK_G, BLOCK_CPG)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        mean, m2 = _tile_stats(x, mask, n)
        rstd = tl.math.rsqrt(m2 / n + eps)
        offs, mask = _tile(b * stride_yb, 0, g0, L, G, CPG, stride_yc, stride_yl, BLOCK_L, BLOCK_G, BLOCK_CPG)
        tl.store(Y + offs, _normalize(x, mask, mean, rstd, w, bias, SILU).to(Y.dtype.element_ty), mask=mask)
    else:
        n_k, mean_k, m2_k = _merge_chunks(PMEAN, PM2, b, g0, G, L, CPG, NCH, TILES, BLOCK_L, BLOCK_G, BLOCK_NCH)
        mean = tl.sum(mean_k * n_k[None, :], 1) / n  # Chan's update for many parts at once
        d = mean_k - mean[:, None]
        m2 = tl.sum(m2_k + n_k[None, :] * d * d, 1)
        rstd = tl.math.rsqrt(m2 / n + eps)
        lo = chunk * TILES * BLOCK_L
        for l0 in range(lo, tl.minimum(lo + TILES * BLOCK_L, L), BLOCK_L):
            offs, mask = _tile(b * stride_xb, l0, g0, L, G, CPG, stride_xc, stride_xl, BLOCK_L, BLOCK_G, BLOCK_CPG)
            x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
            offs, mask = _tile(b * stride_yb, l0, g0, L, G, CPG, stride_yc, stride_yl, BLOCK_L, BLOCK_G, BLOCK_CPG)
            tl.store(Y + offs, _normalize(x, mask, mean, rstd, w, bias, SILU).to(Y.dtype.element_ty), mask=mask)
    if chunk == 0:  # one writer per group
        tl.store(MEAN + b * G + offs_g, mean, mask=offs_g < G)
        tl.store(RSTD + b * G + offs_g, rstd, mask=offs_g < G)


@triton.jit
def _bwd_tile(X, DY, b, l0, g0, mean, rstd, w, bias, stride_xb, stride_xc, stride_xl, stride_db, stride_dc,
              stride_dl, L, G, CPG, SILU: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_G: tl.constexpr,
              BLOCK_CPG: tl.constexpr):
    """x̂ and dL/dy of a tile (dL/dy is 0 on masked lanes, so they drop out of every sum)."""
    offs, mask = _tile(b * stride_xb, l0, g0, L, G, CPG, stride_xc, stride_xl, BLOCK_L, BLOCK_G, BLOCK_CPG)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    offs, mask = _tile(b * stride_db, l0, g0, L, G, CPG, stride_dc, stride_dl, BLOCK_L, BLOCK_G, BLOCK_CPG)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    xhat = tl.where(mask, (x - mean[None, :, None]) * rstd[None, :, None], 0.0)
    if SILU:  # d/dy [y·σ(y)] = σ(y)·(1 + y·(1 − σ(y)))
        y = xhat * w[None, :, :] + bias[None, :, :]
        s = tl.sigmoid(y)
        dy = dy * s * (1.0 + y * (1.0 - s))
    return xhat, dy


@_autotune()
@triton.jit
def _gn_bwd_stats(
    X, DY,         # (B, C, L) forward input and dL/d(out) through their strides
    W, Bias,       # (C,) affine parameters
    MEAN, RSTD,    # (B, G) fp32 from the forward
    PS1, PS2,      # (B, G, NCH) fp32 out: per-chunk Σ dŷ·x̂ and Σ dŷ (dŷ = dy·w)
    PDW, PDB,      # (B, NCH, C) fp32 out: per-chunk Σ dy·x̂ and Σ dy of each channel
    stride_xb, stride_xc, stride_xl, stride_db, stride_dc, stride_dl,
    L, G, CPG, n_gblocks, NCH, TILES,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_CPG: tl.constexpr,
):
    b = (tl.program_id(0) // n_gblocks).to(tl.int64)
    g0 = (tl.program_id(0) % n_gblocks) * BLOCK_G
    chunk = tl.program_id(1)
    offs_g = g0 + tl.arange(0, BLOCK_G)
    mean = tl.load(MEAN + b * G + offs_g, mask=offs_g < G, other=0.0)
    rstd = tl.load(RSTD + b * G + offs_g, mask=offs_g < G, other=0.0)
    w, bias = _affine(W, Bias, g0, G, CPG, HAS_W, HAS_B, BLOCK_G, BLOCK_CPG)
    s1 = tl.zeros([BLOCK_G], tl.float32)
    s2 = tl.zeros([BLOCK_G], tl.float32)
    dw = tl.zeros([BLOCK_G, BLOCK_CPG], tl.float32)
    db = tl.zeros([BLOCK_G, BLOCK_CPG], tl.float32)
    lo = chunk * TILES * BLOCK_L
    for l0 in range(lo, tl.minimum(lo + TILES * BLOCK_L, L), BLOCK_L):
        xhat, dy = _bwd_tile(X, DY, b, l0, g0, mean, rstd, w, bias, stride_xb, stride_xc, stride_xl, stride_db,
                             stride_dc, stride_dl, L, G, CPG, SILU, BLOCK_L, BLOCK_G, BLOCK_CPG)
        dxhat = dy * w[None, :, :]
        s1 += tl.sum(tl.sum(dxhat * xhat, 2), 0)
        s2 += tl.sum(tl.sum(dxhat, 2), 0)
        dw += tl.sum(dy * xhat, 0)
        db += tl.sum(dy, 0)
    idx = (b * G + offs_g) * NCH + chunk
    tl.store(PS1 + idx, s1, mask=offs_g < G)
    tl.store(PS2 + idx, s2, mask=offs_g < G)
    chan = offs_g[:, None] * CPG + tl.arange(0, BLOCK_CPG)[None, :]
    cmask = (offs_g[:, None] < G) & (tl.arange(0, BLOCK_CPG)[None, :] < CPG)
    tl.store(PDW + (b * NCH + chunk) * G * CPG + chan, dw, mask=cmask)
    tl.store(PDB + (b * NCH + chunk) * G * CPG + chan, db, mask=cmask)


@_autotune()
@triton.jit
def _gn_bwd(
    X, DY, DX,     # (B, C, L) forward input, dL/d(out), and dL/dx out (written everywhere), own strides each
    W, Bias,       # (C,) affine parameters
    MEAN, RSTD,    # (B, G) fp32 from the forward
    PS1, PS2,      # (B, G, NCH) fp32 partials from _gn_bwd_stats (split schedule only)
    PDW, PDB,      # (B, 1, C) fp32 out in the single schedule: Σ dy·x̂ and Σ dy of each channel
    stride_xb, stride_xc, stride_xl, stride_db, stride_dc, stride_dl, stride_gb, stride_gc, stride_gl,
    L, G, CPG, n_gblocks, NCH, TILES,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr, SINGLE: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_CPG: tl.constexpr, BLOCK_NCH: tl.constexpr,
):
    b = (tl.program_id(0) // n_gblocks).to(tl.int64)
    g0 = (tl.program_id(0) % n_gblocks) * BLOCK_G
    chunk = tl.program_id(1)
    offs_g = g0 + tl.arange(0, BLOCK_G)
    mean = tl.load(MEAN + b * G + offs_g, mask=offs_g < G, other=0.0)
    rstd = tl.load(RSTD + b * G + offs_g, mask=offs_g < G, other=0.0)
    w, bias = _affine(W, Bias, g0, G, CPG, HAS_W, HAS_B, BLOCK_G, BLOCK_CPG)
    n = L * CPG * 1.0  # (a float even when Triton specializes L == CPG == 1 to constants)
    if SINGLE:
        xhat, dy = _bwd_tile(X, DY, b, 0, g0, mean, rstd, w, bias, stride_xb, stride_xc, stride_xl, stride_db,
                             stride_dc, stride_dl, L, G, CPG, SILU, BLOCK_L, BLOCK_G, BLOCK_CPG)
        dxhat = dy * w[None, :, :]
        c1 = tl.sum(tl.sum(dxhat * xhat, 2), 0) / n
        c2 = tl.sum(tl.sum(dxhat, 2), 0) / n
        dx = (dxhat - c2[None, :, None] - xhat * c1[None, :, None]) * rstd[None, :, None]
        offs, mask = _tile(b * stride_gb, 0, g0, L, G, CPG, stride_gc, stride_gl, BLOCK_L, BLOCK_G, BLOCK_CPG)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        chan = offs_g[:, None] * CPG + tl.arange(0, BLOCK_CPG)[None, :]
        cmask = (offs_g[:, None] < G) & (tl.arange(0, BLOCK_CPG)[None, :] < CPG)
        tl.store(PDW + b * G * CPG + chan, tl.sum(dy * xhat, 0), mask=cmask)
        tl.store(PDB + b * G * CPG + chan, tl.sum(dy, 0), mask=cmask)
    else:
        _, s1_k, s2_k = _merge_chunks(PS1, PS2, b, g0, G, L, CPG, NCH, TILES, BLOCK_L, BLOCK_G, BLOCK_NCH)
        c1 = tl.sum(s1_k, 1) / n
        c2 = tl.sum(s2_k, 1) / n
        lo = chunk * TILES * BLOCK_L
        for l0 in range(lo, tl.minimum(lo + TILES * BLOCK_L, L), BLOCK_L):
            xhat, dy = _bwd_tile(X, DY, b, l0, g0, mean, rstd, w, bias, stride_xb, stride_xc, stride_xl, stride_db,
                                 stride_dc, stride_dl, L, G, CPG, SILU, BLOCK_L, BLOCK_G, BLOCK_CPG)
            dx = (dy * w[None, :, :] - c2[None, :, None] - xhat * c1[None, :, None]) * rstd[None, :, None]
            offs, mask = _tile(b * stride_gb, l0, g0, L, G, CPG, stride_gc, stride_gl, BLOCK_L, BLOCK_G, BLOCK_CPG)
            tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


def _strides_bcl(t: torch.Tensor):
    """(stride_b, stride_c, stride_l) of t read as (B, C, L), or None when its spatial dims do not collapse into
    one (e.g. a crop x[..., 1:-1, 1:-1]). NCHW, channels_last, (B, C, L) and expanded tensors all collapse."""
    stride_l, expected = 1, None
    for size, stride in reversed(list(zip(t.shape[2:], t.stride()[2:]))):
        if size == 1:
            continue
        if expected is not None and stride != expected:
            return None
        if expected is None:
            stride_l = stride
        expected = stride * size
    return t.stride(0), t.stride(1), stride_l


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 2  # the interpreter: a couple of chunks per group so the CPU tests exercise the split schedule
    return torch.cuda.get_device_properties(device).multi_processor_count


def _plan(x: torch.Tensor, G: int, tile: int, single_max: int) -> dict:
    """Tile shape and schedule for x viewed as (B, C, L)."""
    B, C = x.shape[:2]
    L = math.prod(x.shape[2:])
    cpg = C // G
    block_cpg = triton.next_power_of_2(cpg)
    block_g = 1
    if x.stride(1) == 1:  # channels contiguous: take groups until a pixel's slice is >= 128 bytes
        want = max(1, 128 // (cpg * x.element_size()))
        block_g = min(triton.next_power_of_2(G), 1 << (want.bit_length() - 1))
    lanes = block_g * block_cpg
    n_gblocks = triton.cdiv(G, block_g)
    if triton.next_power_of_2(L) * lanes <= single_max:
        return dict(single=True, BLOCK_L=triton.next_power_of_2(L), BLOCK_G=block_g, BLOCK_CPG=block_cpg,
                    n_gblocks=n_gblocks, nch=1, tiles=1)
    block_l = min(triton.next_power_of_2(L), max(1, 1 << ((tile // lanes).bit_length() - 1)))
    n_tiles = triton.cdiv(L, block_l)
    # About four programs per SM in total, at most MAX_CHUNKS chunks per group.
    nch = min(n_tiles, MAX_CHUNKS, max(1, triton.cdiv(4 * _num_sms(x.device), B * n_gblocks)))
    tiles = triton.cdiv(n_tiles, nch)
    return dict(single=False, BLOCK_L=block_l, BLOCK_G=block_g, BLOCK_CPG=block_cpg, n_gblocks=n_gblocks,
                nch=triton.cdiv(n_tiles, tiles), tiles=tiles)


def _check(x, num_groups, weight, bias, eps) -> None:
    """Everything the kernels cannot do is a ValueError naming the argument, its shape and dtype."""
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError(f"group_norm: x must be a (B, C, *spatial) tensor, got {getattr(x, 'shape', type(x))}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"group_norm: x has dtype {x.dtype}; the kernel takes float16, bfloat16, float32")
    if not x.is_cuda and not _interpreting():
        raise ValueError(f"group_norm: x is on {x.device}; the Triton kernels need CUDA tensors "
                         f"(or TRITON_INTERPRET=1)")
    C = x.shape[1]
    if not isinstance(num_groups, int) or num_groups < 1 or C % num_groups:
        raise ValueError(f"group_norm: num_groups={num_groups!r} must be a positive divisor of the C={C} channels "
                         f"of x {tuple(x.shape)}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        if not isinstance(p, torch.Tensor) or tuple(p.shape) != (C,):
            raise ValueError(f"group_norm: {name} has shape {tuple(getattr(p, 'shape', ()))}, expected ({C},) "
                             f"for x {tuple(x.shape)}")
        if p.device != x.device or not p.is_floating_point():
            raise ValueError(f"group_norm: {name} is {p.dtype} on {p.device}; expected a float tensor on {x.device}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"group_norm: eps must be a finite number >= 0, got {eps!r}")
    if _strides_bcl(x) is None:
        raise ValueError(f"group_norm: x of shape {tuple(x.shape)} has strides {x.stride()} whose spatial dims do "
                         f"not collapse into one (NCHW, channels_last and (B, C, L) do); pass x.contiguous()")


def _alloc(shape_or_like, poison: bool, **kw) -> torch.Tensor:
    """torch.empty(_like) that keeps x's memory format; poison=True fills NaN so a test sees unwritten elements."""
    if isinstance(shape_or_like, torch.Tensor):
        out = torch.empty_like(shape_or_like, **kw)
    else:
        out = torch.empty(shape_or_like, **kw)
    return out.fill_(float("nan")) if poison else out


def _group_norm_fwd(x, num_groups: int, weight=None, bias=None, eps: float = 1e-5, silu: bool = False,
                    poison: bool = False, tile: int = TILE, single_max: int = SINGLE_MAX):
    """Launch the forward. Returns (y like x, mean (B, G) fp32, rstd (B, G) fp32)."""
    _check(x, num_groups, weight, bias, eps)
    B, C, G = x.shape[0], x.shape[1], num_groups
    L = math.prod(x.shape[2:])
    y = _alloc(x, poison)
    mean = _alloc((B, G), poison, device=x.device, dtype=torch.float32)
    rstd = _alloc((B, G), poison, device=x.device, dtype=torch.float32)
    if x.numel() == 0:
        return y, mean, rstd
    p = _plan(x, G, tile, single_max)
    part = _alloc((2, B, G, p["nch"]), poison, device=x.device, dtype=torch.float32)
    blocks = dict(BLOCK_L=p["BLOCK_L"], BLOCK_G=p["BLOCK_G"], BLOCK_CPG=p["BLOCK_CPG"])
    grid = (B * p["n_gblocks"], p["nch"])
    common = (L, G, C // G, p["n_gblocks"], p["nch"], p["tiles"])
    if not p["single"]:
        _gn_stats[grid](x, part[0], part[1], *_strides_bcl(x), *common, **blocks)
    _gn_fwd[grid](x, y, weight if weight is not None else x, bias if bias is not None else x, part[0], part[1],
                  mean, rstd, *_strides_bcl(x), *_strides_bcl(y), *common, float(eps),
                  HAS_W=weight is not None, HAS_B=bias is not None, SILU=bool(silu), SINGLE=p["single"],
                  BLOCK_NCH=triton.next_power_of_2(p["nch"]), **blocks)
    return y, mean, rstd


def _group_norm_bwd(x, dy, weight, bias, mean, rstd, num_groups: int, silu: bool = False, poison: bool = False,
                    tile: int = TILE, single_max: int = SINGLE_MAX):
    """Launch the backward. Returns (dx like x, dweight or None, dbias or None)."""
    _check(x, num_groups, weight, bias, 0.0)
    if dy.shape != x.shape:
        raise ValueError(f"group_norm backward: grad shape {tuple(dy.shape)} != x shape {tuple(x.shape)}")
    if _strides_bcl(dy) is None:
        dy = dy.contiguous()
    B, C, G = x.shape[0], x.shape[1], num_groups
    L = math.prod(x.shape[2:])
    dx = _alloc(x, poison)
    p = _plan(x, G, tile, single_max)
    pdw = _alloc((2, B, p["nch"], C), poison, device=x.device, dtype=torch.float32)  # Σ dy·x̂, Σ dy per channel
    if x.numel() > 0:
        ps = _alloc((2, B, G, p["nch"]), poison, device=x.device, dtype=torch.float32)
        blocks = dict(BLOCK_L=p["BLOCK_L"], BLOCK_G=p["BLOCK_G"], BLOCK_CPG=p["BLOCK_CPG"])
        grid = (B * p["n_gblocks"], p["nch"])
        common = (L, G, C // G, p["n_gblocks"], p["nch"], p["tiles"])
        flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, SILU=bool(silu))
        w, b = weight if weight is not None else x, bias if bias is not None else x
        if not p["single"]:
            _gn_bwd_stats[grid](x, dy, w, b, mean, rstd, ps[0], ps[1], pdw[0], pdw[1], *_strides_bcl(x),
                                *_strides_bcl(dy), *common, **flags, **blocks)
        _gn_bwd[grid](x, dy, dx, w, b, mean, rstd, ps[0], ps[1], pdw[0], pdw[1], *_strides_bcl(x), *_strides_bcl(dy),
                      *_strides_bcl(dx), *common, SINGLE=p["single"], BLOCK_NCH=triton.next_power_of_2(p["nch"]),
                      **flags, **blocks)
    else:
        pdw.zero_()
    dw = pdw[0].sum((0, 1)).to(weight.dtype) if weight is not None else None
    db = pdw[1].sum((0, 1)).to(bias.dtype) if bias is not None else None
    return dx, dw, db


class _GroupNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, num_groups, weight, bias, eps, silu):
        y, mean, rstd = _group_norm_fwd(x, num_groups, weight, bias, eps, silu)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.num_groups, ctx.eps, ctx.silu = num_groups, eps, silu
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True (a gradient penalty): gradients autograd can differentiate
            needs = (ctx.needs_input_grad[0], *ctx.needs_input_grad[2:4])
            dx, dw, db = differentiable_grads(
                lambda x, w, b: group_norm_ref(x, ctx.num_groups, w, b, ctx.eps, ctx.silu), (x, weight, bias),
                needs, dy)
            return dx, None, dw, db, None, None
        dx, dw, db = _group_norm_bwd(x, dy, weight, bias, mean, rstd, ctx.num_groups, ctx.silu)
        return dx, None, dw, db, None, None


def group_norm(x: torch.Tensor, num_groups: int, weight=None, bias=None, eps: float = 1e-5, silu: bool = False):
    """GroupNorm over x (B, C, *spatial), optionally followed by SiLU, with the Triton kernels; differentiable
    (twice: a backward under create_graph=True runs the torch reference's).

    The output keeps x's memory format (channels_last in, channels_last out)."""
    if hasattr(type(num_groups), "__index__") and not isinstance(num_groups, bool):  # numpy / 0-d tensor ints
        num_groups = operator.index(num_groups)
    return _GroupNorm.apply(x, num_groups, weight, bias, eps, silu)
