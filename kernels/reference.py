"""The pure-torch references of our kernels: what `impl="torch"` runs, what the Triton kernels are tested against,
and all there is where Triton is not installed (it ships for Linux only)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["attention_ref", "group_norm_ref"]


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False, scale: float | None = None):
    """softmax(q kᵀ · scale) v.  q (B, H, Sq, D), k/v (B, H, Sk, D) -> (B, H, Sq, D)."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)


def group_norm_ref(x: torch.Tensor, num_groups: int, weight=None, bias=None, eps: float = 1e-5, silu: bool = False):
    """F.group_norm then optional SiLU.  x (B, C, *spatial)."""
    y = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(y) if silu else y
