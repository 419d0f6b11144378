"""Every random number generator a training run draws from (torch's CPU and CUDA ones, the run's own generator,
numpy's and Python's), as a checkpoint saves and restores them per rank, or seeded anew when a run goes on with
another number of processes (train/core.py Trainer._take_over)."""
from __future__ import annotations

import random

import numpy as np
import torch

__all__ = ["state", "set_state", "seed_all"]


def state(generator: torch.Generator) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, JSON-able meta) of every generator, for a checkpoint (no pickle: Python's and numpy's as lists)."""
    tensors = {"torch": torch.get_rng_state(), "generator": generator.get_state()}
    if torch.cuda.is_available():
        tensors |= {f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    np_state = np.random.get_state()
    meta = {"python": _lists(random.getstate()),
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    return tensors, meta


def set_state(tensors: dict[str, torch.Tensor], meta: dict, generator: torch.Generator) -> None:
    """Every generator back to what state() saved."""
    torch.set_rng_state(tensors["torch"])
    generator.set_state(tensors["generator"])
    if torch.cuda.is_available():
        cuda = [tensors[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in tensors]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    random.setstate(_tuples(meta["python"]))
    n = meta["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), *n[2:]))


def _lists(x):
    return [_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


def seed_all(key: tuple[int, ...], generator: torch.Generator) -> None:
    """Seed every generator from `key` (e.g. (seed, step, rank)): numpy's SeedSequence mixes it into one seed."""
    seed = int(np.random.SeedSequence(list(key)).generate_state(1)[0])
    torch.manual_seed(seed)  # (and every CUDA device's)
    generator.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
