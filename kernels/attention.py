"""Attention: the pure-torch reference. (The Triton flash-attention kernel arrives with the kernels issue.)"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False, scale: float | None = None):
    """softmax(q kᵀ · scale) v.  q (B, H, Sq, D), k/v (B, H, Sk, D) -> (B, H, Sq, D)."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
