"""The pure-torch references of our kernels: what `impl="torch"` runs, what the Triton kernels are tested against,
and all there is where Triton is not installed (it ships for Linux only)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["attention_ref", "attention_math", "group_norm_ref", "differentiable_grads"]


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False, scale: float | None = None):
    """softmax(q kᵀ · scale) v.  q (B, H, Sq, D), k/v (B, H, Sk, D) -> (B, H, Sq, D)."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)


def group_norm_ref(x: torch.Tensor, num_groups: int, weight=None, bias=None, eps: float = 1e-5, silu: bool = False):
    """F.group_norm then optional SiLU.  x (B, C, *spatial)."""
    y = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(y) if silu else y


def attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                   scale: float | None = None):
    """attention_ref written out (the (Sq, Sk) scores materialised), which autograd differentiates twice where
    SDPA's fused backwards are not differentiable."""
    s = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5 if scale is None else scale)  # (B, H, Sq, Sk)
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return s.softmax(-1) @ v


def differentiable_grads(ref, inputs: tuple, needs, grad: torch.Tensor) -> list:
    """The gradients of ref(*inputs) for the inputs `needs` marks (None for the others), computed by autograd with
    a graph, so that they can be differentiated again: a Triton kernel's backward under create_graph=True."""
    wanted = [t for t, n in zip(inputs, needs) if n]
    with torch.enable_grad():
        got = iter(torch.autograd.grad(ref(*inputs), wanted, grad, create_graph=True))
    return [next(got) if n else None for n in needs]
