"""One Pipeline call's arguments as per-item lists, and its sampling settings (pipeline.py's module docstring
says what the user sees: broadcasting, seeds, strengths, prompts or their embeddings).

A call holds n requests (the longest list among its per-request arguments), each repeated k =
num_images_per_prompt times: every list here has n * k items, request i's first. Pure bookkeeping, no model.
"""
from __future__ import annotations

import math
import secrets
import threading
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from backdrop.diffusion.samplers import check_eta

__all__ = ["OUTPUT_TYPES", "MAX_SEED", "Loop", "items", "broadcast", "repeat", "seeds", "item_strengths", "groups",
           "prompts", "requests"]

OUTPUT_TYPES = ("pil", "np", "latent")
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes up to 2**64 - 1; we keep seed + item inside int64


@dataclass(frozen=True)
class Loop:
    """One call's sampling settings, as the public methods take them; passed through to Pipeline._run unchanged."""
    steps: int
    sampler: str
    eta: float
    guidance_scale: float
    guidance_rescale: float
    progress: bool
    callback: Callable | None
    interrupt: threading.Event | None

    def __post_init__(self):
        for name, hi, want in (("guidance_scale", math.inf, ">= 0"), ("guidance_rescale", 1.0, "in [0, 1]")):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= hi or math.isinf(v):
                raise ValueError(f"{name} must be a finite number {want}, got {v!r}")
        check_eta(self.eta, self.sampler)


def items(value, name: str) -> list:
    """One request's value or a list of them: a list/tuple, a 4-D array (B, H, W, C) / tensor (B, C, H, W), or
    one item (masks.py reads its batches the same way)."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"{name}: empty list")
        return list(value)
    if isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim == 4:
        return list(value)
    return [value]


def broadcast(values: list, n: int, name: str) -> list:
    if len(values) == n:
        return values
    if len(values) == 1:
        return values * n
    raise ValueError(f"{name}: {len(values)} values for {n} requests; give one, or one per request")


def repeat(values: list, k: int) -> list:
    return [v for v in values for _ in range(k)]


def seeds(seed, n: int, k: int) -> list[int]:
    """Per output item (n requests x k images): request i image j gets seeds[i] + j; an int s is [s, s+k, ...]."""
    if seed is None:
        seed = secrets.randbelow(2**31)
    base = [seed + i * k for i in range(n)] if isinstance(seed, int) else broadcast(items(seed, "seed"), n, "seed")
    for s in base:
        if not isinstance(s, (int, np.integer)) or isinstance(s, bool) or not 0 <= s <= MAX_SEED - k:
            raise ValueError(f"seed {s!r} must be an int in [0, 2**63 - 1 - num_images_per_prompt]")
    return [int(s) + j for s in base for j in range(k)]


def item_strengths(strength, n: int, k: int) -> list[float]:
    """One strength or one per request -> one per output item, each a number in (0, 1]."""
    out = []
    for s in broadcast(items(strength, "strength"), n, "strength"):
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 < s <= 1.0:
            raise ValueError(f"strength {s!r} must be a number in (0, 1]")
        out.append(float(s))
    return repeat(out, k)


def groups(strengths: list[float]) -> dict[float, list[int]]:
    """Item indices per distinct strength, in order of first appearance."""
    out: dict[float, list[int]] = {}
    for i, s in enumerate(strengths):
        out.setdefault(s, []).append(i)
    return out


def prompts(text, embeds, name: str, width: int) -> list:
    """One request's prompt or a list: strings, or the rows (L, C) of `embeds` (n, L, C) / (L, C), C = `width`
    (the UNet's cross_attention_dim)."""
    if embeds is None:
        texts = items("" if text is None else text, name)
        if not all(isinstance(t, str) for t in texts):
            raise ValueError(f"{name} must be a string or a list of strings")
        return texts
    if text not in (None, ""):
        raise ValueError(f"give {name} or {name}_embeds, not both")
    if not (isinstance(embeds, torch.Tensor) and embeds.is_floating_point() and embeds.ndim in (2, 3)
            and embeds.shape[-1] == width and embeds.shape[-2] > 0):
        got = tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
        raise ValueError(f"{name}_embeds must be a float tensor (n, L, {width}) or (L, {width}) (this UNet's "
                         f"cross_attention_dim), got {got}")
    return list(embeds[None] if embeds.ndim == 2 else embeds)


def requests(prompt, negative_prompt, seed, k, output_type, n: int = 1, embeds=(None, None), *,
             width: int) -> dict:
    """n requests (the longest list among prompt, negative prompt, seed and the images) x k images each.
    A prompt is a string, or a row (L, C) of `embeds` (prompt_embeds, negative_prompt_embeds) given instead."""
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type {output_type!r} is not one of {', '.join(OUTPUT_TYPES)}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"num_images_per_prompt must be an int >= 1, got {k!r}")
    texts, negatives = (prompts(t, e, name, width) for t, e, name in
                        ((prompt, embeds[0], "prompt"), (negative_prompt, embeds[1], "negative_prompt")))
    n = max(n, len(texts), len(negatives), len(items(seed, "seed")) if isinstance(seed, (list, tuple)) else 1)
    return dict(n=n, k=k, output_type=output_type, seeds=seeds(seed, n, k),
                prompts=repeat(broadcast(texts, n, "prompt"), k),
                negatives=repeat(broadcast(negatives, n, "negative_prompt"), k))
