"""An inpaint call's masks item by item: each mask given read once into the repaint convention, and the full-size
mask work (dilate, crop, feather) done once per distinct (image, mask) item. A product photo inpainted n times (the
CLI's --n, num_images_per_prompt) is the same image and mask n times: at 4096x3072 that work is most of a call's
time outside the model, and the n copies only differ after sampling."""
from __future__ import annotations

import torch

from backdrop.diffusion import masks as M

__all__ = ["repaint_masks", "distinct", "PerDistinct"]


def repaint_masks(kind: str, masks: list, size: tuple[int, int], threshold: float | None) -> list:
    """Each item's (1, 1, H, W) float repaint mask, or None when it has nothing to repaint; a mask object given for
    several items is read once."""
    read: dict[int, torch.Tensor | None] = {}
    for i, m in enumerate(masks):
        if id(m) not in read:
            read[id(m)] = _repaint_mask(kind, m, i, size, threshold)
    return [read[id(m)] for m in masks]


def _repaint_mask(kind: str, value, i: int, size, threshold: float | None) -> torch.Tensor | None:
    try:  # one item of the request: named as its i-th in messages and warnings
        return M.to_repaint_mask(**{kind: value}, size=size, threshold=threshold, first=i)
    except M.EmptyMask:
        if kind == "image":  # an exporter's RGBA, opaque everywhere: refused, as the CLI and the server do
            raise ValueError(f"image[{i}] has no transparent pixel (its alpha channel is opaque everywhere), so "
                             "nothing marks what to repaint: give mask= or product_mask=") from None
        return None
    except ValueError as e:  # a message about the whole value (its size) gets the item's name
        msg = str(e)
        raise ValueError(msg if msg.startswith(f"{kind}[{i}]") or i == 0 else f"{kind}[{i}]: {msg}") from None


def distinct(keys: list) -> list[int]:
    """For each item, the index of the first item with its key (keys: the ids of its image and mask objects)."""
    first: dict = {}
    return [first.setdefault(key, i) for i, key in enumerate(keys)]


class PerDistinct:
    """pick(x): the distinct items' rows of a tensor or array, or entries of a list; spread(y): a result made for
    those, given back to every item."""

    def __init__(self, first: list[int]):
        self.u = sorted(set(first))
        self.at = None if len(self.u) == len(first) else [self.u.index(j) for j in first]  # None: all distinct

    def pick(self, x):
        return x if self.at is None else [x[i] for i in self.u] if isinstance(x, list) else x[self.u]

    def spread(self, y):
        return y if self.at is None else [y[j] for j in self.at] if isinstance(y, list) else y[self.at]
