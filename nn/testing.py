"""Helpers for parity checks against reference implementations (the tests, and anyone checking a port)."""
from __future__ import annotations

import math

import torch

__all__ = ["randomize_", "rel_err"]


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter random (zero-initialised ones such as conv_out would otherwise hide bugs), scaled by
    1/sqrt(fan_in) so activations stay O(1) through the whole depth and a relative error means something."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 1:  # norm weights near 1, biases near 0
            p.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, 0.1, generator=g)
        else:
            p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=g)


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute difference relative to the reference's largest magnitude."""
    return ((ours - ref).abs().max() / ref.abs().max()).item()
