"""The single dispatch point for our kernels. Model code calls only `attention` and `group_norm`.

Triton on CUDA tensors, the torch reference elsewhere; override with `impl=` or BACKDROP_KERNELS=torch|triton.
This package imports nothing from backdrop.
"""
from __future__ import annotations

import os

import torch

from .attention import attention_ref
from .group_norm import group_norm_ref

__all__ = ["attention", "group_norm", "attention_ref", "group_norm_ref"]


def _impl(impl: str, x: torch.Tensor) -> str:
    if impl == "auto":
        impl = os.environ.get("BACKDROP_KERNELS", "auto")
    if impl == "auto":
        return "torch"  # Triton kernels not written yet
    if impl not in ("torch", "triton"):
        raise ValueError(f"kernel impl must be 'auto', 'torch' or 'triton', got {impl!r}")
    return impl


def attention(q, k, v, causal: bool = False, scale: float | None = None, impl: str = "auto"):
    """q (B, H, Sq, D), k/v (B, H, Sk, D) -> (B, H, Sq, D)."""
    if _impl(impl, q) == "triton":
        raise NotImplementedError("the Triton attention kernel is not written yet")
    return attention_ref(q, k, v, causal=causal, scale=scale)


def group_norm(x, num_groups: int, weight=None, bias=None, eps: float = 1e-5, silu: bool = False, impl: str = "auto"):
    """GroupNorm over x (B, C, *spatial), optionally followed by SiLU."""
    if _impl(impl, x) == "triton":
        raise NotImplementedError("the Triton GroupNorm kernel is not written yet")
    return group_norm_ref(x, num_groups, weight, bias, eps, silu=silu)
