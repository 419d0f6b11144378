"""Flash attention in Triton: the host side — `attention(q, k, v, causal, scale)` with its autograd Function, the
launchers that check their inputs (a ValueError naming the argument, shape and dtype for anything the kernels
cannot do), allocate the outputs and pick the kernels' compile-time parameters. The algorithm, the head-dim split
and the kernels themselves are in attention_kernels.py; the pure-torch reference `attention_ref` in reference.py.
"""
from __future__ import annotations

import math

import torch
import triton

from .attention_kernels import (
    LOG2E, MAX_HEAD_DIM, _attn_bwd_delta, _attn_bwd_dkdv, _attn_bwd_dq, _attn_fwd, _head_dim_split, _interpreting,
)
from .reference import attention_math, differentiable_grads


def _check_qkv(q, k, v, scale) -> None:
    """Everything the kernels cannot do is a ValueError naming the argument, its shape and dtype."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"attention: {name} must be 4-D (B, H, S, D), got shape {tuple(t.shape)}")
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"attention: {name} has dtype {t.dtype}; the kernel takes float16, bfloat16, float32")
        if t.stride(-1) != 1:
            raise ValueError(f"attention: {name} (shape {tuple(t.shape)}) has stride {t.stride(-1)} along D; the "
                             f"kernel needs unit stride there (any B/H/S strides are fine): pass {name}.contiguous()")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if not q.is_cuda and not _interpreting():
        raise ValueError(f"attention: q is on {q.device}; the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1)")
    (B, H, _, D), (Bk, Hk, Sk, Dk), (Bv, Hv, Sv, Dv) = q.shape, k.shape, v.shape
    if (Bk, Hk) != (B, H) or (Bv, Hv) != (B, H):
        raise ValueError(f"attention: batch and heads must match: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if Sv != Sk:
        raise ValueError(f"attention: k and v lengths differ: k {tuple(k.shape)}, v {tuple(v.shape)}")
    if Sk == 0:
        raise ValueError(f"attention: k has no keys (shape {tuple(k.shape)}); softmax over nothing is undefined")
    if Dk != D or Dv != D:
        raise ValueError(f"attention: head dims differ: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"attention: head dim D={D} (q shape {tuple(q.shape)}) is outside the kernel's "
                         f"1..{MAX_HEAD_DIM}; use impl='torch'")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"attention: scale must be a positive finite number or None, got {scale!r} (the kernels "
                         "mask and take each row's running maximum of the scores before scaling; use impl='torch')")
    if q.dtype == torch.bfloat16 and _interpreting():
        raise ValueError("attention: bfloat16 needs CUDA: Triton's interpreter computes bf16 dots wrongly "
                         "(triton-lang/triton#11584); use float16/float32 or impl='torch' on the CPU")


def _alloc_like(t: torch.Tensor, poison: bool) -> torch.Tensor:
    """empty_like keeps t's memory layout, so an output of a (B, S, H, D)-strided q reshapes back for free.
    poison=True fills with NaN so a test sees any element a kernel forgot to write."""
    out = torch.empty_like(t)
    return out.fill_(float("nan")) if poison else out


def _alloc(shape, device, poison: bool) -> torch.Tensor:
    """A contiguous fp32 buffer, NaN-filled when poison (see _alloc_like)."""
    out = torch.empty(shape, device=device, dtype=torch.float32)
    return out.fill_(float("nan")) if poison else out


def _row_align(*tensors) -> int:
    """Largest power of two (<= 16 elements) dividing every B/H/S stride: the ALIGN hint of the kernels."""
    g = 16
    for t in tensors:
        for s in t.stride()[:-1]:
            g = math.gcd(g, s)
    return g


def _common(q, k, causal, scale):
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    d0, dk1, dv1 = _head_dim_split(D)
    meta = dict(HEAD_DIM=D, BLOCK_D0=d0, BLOCK_DK1=dk1, CAUSAL=bool(causal),
                PRECISION="tf32x3" if q.dtype == torch.float32 else "tf32")  # tf32 is ignored for 16-bit inputs
    keys = (triton.next_power_of_2(Sq), triton.next_power_of_2(Sk))
    return B, H, Sq, Sk, scale, dv1, meta, keys


def _attention_fwd(q, k, v, causal: bool = False, scale: float | None = None, keep_fp32: bool = False,
                   poison: bool = False):
    """Launch the forward. Returns (o (B, H, Sq, D) in q's dtype and layout, lse (B, H, Sq) fp32 in base 2,
    o32: o before rounding, fp32 contiguous, when keep_fp32 else None)."""
    _check_qkv(q, k, v, scale)
    B, H, Sq, Sk, scale, dv1, meta, keys = _common(q, k, causal, scale)
    o = _alloc_like(q, poison)
    lse = _alloc((B, H, Sq), q.device, poison)
    o32 = _alloc(q.shape, q.device, poison) if keep_fp32 else None
    if Sq == 0 or B * H == 0:
        return o, lse, o32
    grid = lambda META: (triton.cdiv(Sq, META["BLOCK_M"]), B * H)  # noqa: E731
    _attn_fwd[grid](q, k, v, o, o32 if keep_fp32 else o, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
                    *o.stride()[:3], H, Sq, Sk, scale * LOG2E, *keys, BLOCK_DV1=dv1,
                    ALIGN=_row_align(q, k, v, o, *([o32] if keep_fp32 else [])), STORE_O32=keep_fp32, **meta)
    return o, lse, o32


def _attention_bwd(q, k, v, o, lse, do, causal: bool = False, scale: float | None = None, poison: bool = False):
    """Launch the backward; o is the forward output, ideally the fp32 one (see _FlashAttention). Returns
    (dq, dk, dv) in the layouts of q, k, v."""
    _check_qkv(q, k, v, scale)
    if do.shape != q.shape or o.shape != q.shape or do.dtype != q.dtype:
        raise ValueError(f"attention backward: grad {tuple(do.shape)} {do.dtype} and output {tuple(o.shape)} must "
                         f"match q {tuple(q.shape)} {q.dtype}")
    do = do if do.stride(-1) == 1 else do.contiguous()  # e.g. an expanded (stride 0) gradient from .sum()
    B, H, Sq, Sk, scale, _, meta, keys = _common(q, k, causal, scale)
    dq, dk, dv = _alloc_like(q, poison), _alloc_like(k, poison), _alloc_like(v, poison)
    if B * H == 0:
        return dq, dk, dv
    if Sq == 0:  # no query looks at any key
        return dq, dk.zero_(), dv.zero_()
    delta = _alloc(lse.shape, q.device, poison)
    d_all = triton.next_power_of_2(meta["HEAD_DIM"])
    _attn_bwd_delta[(triton.cdiv(Sq, 32), B * H)](o, do, delta, *o.stride()[:3], *do.stride()[:3], H, Sq,
                                                   HEAD_DIM=meta["HEAD_DIM"], BLOCK_M=32, BLOCK_D=d_all)
    args = (q, k, v, do, lse, delta)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3])
    grid_n = lambda META: (triton.cdiv(Sk, META["BLOCK_N"]), B * H)  # noqa: E731
    align = _row_align(q, k, v, do, dq, dk, dv)
    _attn_bwd_dkdv[grid_n](*args, dk, dv, *strides, *dk.stride()[:3], *dv.stride()[:3],
                           H, Sq, Sk, scale, scale * LOG2E, *keys, ALIGN=align, **meta)
    grid_m = lambda META: (triton.cdiv(Sq, META["BLOCK_M"]), B * H)  # noqa: E731
    _attn_bwd_dq[grid_m](*args, dq, *strides, *dq.stride()[:3], H, Sq, Sk, scale, scale * LOG2E, *keys,
                         ALIGN=align, **meta)
    return dq, dk, dv


class _FlashAttention(torch.autograd.Function):
    """Differentiable wrapper. When gradients are needed the forward also keeps O in fp32 for the backward's
    Δ = rowsum(dO ∘ O): dS = P ∘ (dP − Δ) subtracts two nearly equal numbers whenever v has a large common
    component, and Δ from O rounded to fp16/bf16 (as FlashAttention-2 does) then costs dq 4-10x its accuracy
    (a 1024-token bf16 self-attention on off-centre inputs: 46% error vs 5%). The price is 4 bytes per output
    element of saved activations."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale):
        o, lse, o32 = _attention_fwd(q, k, v, causal, scale, keep_fp32=any(ctx.needs_input_grad[:3]))
        ctx.save_for_backward(q, k, v, o32 if o32 is not None else o, lse)
        ctx.causal, ctx.scale = causal, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True (a gradient penalty): gradients autograd can differentiate
            grads = differentiable_grads(lambda q, k, v: attention_math(q, k, v, ctx.causal, ctx.scale), (q, k, v),
                                         ctx.needs_input_grad[:3], do)
            return (*grads, None, None)
        dq, dk, dv = _attention_bwd(q, k, v, o, lse, do, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              scale: float | None = None):
    """softmax(q kᵀ · scale) v with the Triton kernels, differentiable (twice: a backward under create_graph=True
    runs the torch reference's).  q (B, H, Sq, D), k/v (B, H, Sk, D).

    scale (> 0) defaults to 1/sqrt(D); causal is top-left aligned (query i sees keys j <= i), as in SDPA."""
    return _FlashAttention.apply(q, k, v, causal, scale)
