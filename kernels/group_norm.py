"""GroupNorm(+SiLU): the pure-torch reference. (The fused Triton kernel arrives with the kernels issue.)"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def group_norm_ref(x: torch.Tensor, num_groups: int, weight, bias, eps: float = 1e-5, silu: bool = False):
    """F.group_norm then optional SiLU.  x (B, C, *spatial)."""
    y = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(y) if silu else y
