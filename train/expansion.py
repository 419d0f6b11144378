"""Object expansion: does an inpainted product's silhouette grow into the backdrop? (One of the two judges of
train/evaluate.py.)

The ring is every pixel at Euclidean distance 1..`ring` px outside the product mask. A ring pixel "is product" when its
colour is closer to a product pixel near it (within ring + 2 px, inside the mask eroded by 1 px so the antialiased edge
does not count) than to a backdrop pixel near it (beyond 2 * ring px from the mask, within 2 * ring + 2 px of the
pixel): a nearest-neighbour classifier whose labelled pixels are the image's own, exactly masked. No fitted threshold,
so it stays sane on images unlike the renders (a noise backdrop matches the noise next to it, not the product). raw =
the mean over images of the fraction of ring pixels that are product. Real renders score above zero too (a white mug on
a white wall), so corrected = raw - the same rate on the true renders of the same scenes. The harness reports two rings,
3 and 6 px at 64x64: growth right at the edge, and a halo a little further out.

How far from 0 a model with no growth at all lands depends on its backdrops' texture (a noise backdrop scored +3
points, a flat grey one -6): the harness also scores each product pasted, unchanged, on another scene's true
backdrop ("texture reference"), the spread that texture alone gives; a figure within it shows no growth. Real
growth scores far above it (recall: the share of truly grown pixels flagged).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .synthetic import World

__all__ = ["ObjectExpansion", "CLASSIFIER_SEED"]

CLASSIFIER_SEED = 1_000_003  # the judges' world: neither the training seed (0 by default) nor the evaluation's


def _disk(r: int) -> list[tuple[int, int]]:
    """The offsets (dy, dx) with 0 < dy^2 + dx^2 <= r^2."""
    return [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1) if 0 < dy * dy + dx * dx <= r * r]


def _shift(d: int, n: int) -> tuple[slice, slice]:
    """Slices pairing index i (first) with i + d (second) along an axis of length n."""
    return slice(max(-d, 0), n - max(d, 0)), slice(max(d, 0), n + min(d, 0))


def _disk_dilate(masks: np.ndarray, r: int) -> np.ndarray:
    """Pixels within Euclidean distance r of a True pixel: (B, H, W) bool -> same (a union of shifted copies)."""
    out, (H, W) = masks.copy(), masks.shape[1:]
    for dy, dx in _disk(r):
        (py, qy), (px, qx) = _shift(dy, H), _shift(dx, W)
        out[:, py, px] |= masks[:, qy, qx]
    return out


def _erode(masks: np.ndarray, r: int) -> np.ndarray:
    return ~_disk_dilate(~masks, r)


def _check_batch(images, masks, size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    images, masks = np.asarray(images), np.asarray(masks)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (B, H, W, 3), got {images.dtype} {images.shape}")
    if masks.shape != images.shape[:3]:
        raise ValueError(f"product_masks must be (B, H, W) = {images.shape[:3]}, got {masks.shape}")
    if size is not None and images.shape[1:3] != (size, size):
        raise ValueError(f"the classifier was fitted at {size}x{size}, images are {images.shape[2]}x"
                         f"{images.shape[1]}; fit one at that size")
    return images, masks.astype(bool)


def _nearest_colour(x: np.ndarray, ref: np.ndarray, pixels: tuple, r: int) -> np.ndarray:
    """For each pixel (b, i, j) of `pixels`, the smallest colour distance to a `ref` pixel within r px of it:
    x (B, H, W, 3) in [0, 1], ref (B, H, W) bool -> (N,); 2 (more than any two colours differ) where none is."""
    H, W = ref.shape[1:]
    Hp, Wp = H + 2 * r, W + 2 * r
    xp = np.pad(x, ((0, 0), (r, r), (r, r), (0, 0))).reshape(-1, 3)  # (B * Hp * Wp, 3)
    refp = np.pad(ref, ((0, 0), (r, r), (r, r))).reshape(-1)  # False outside the image
    b, i, j = pixels
    centre = (b * Hp + i + r) * Wp + j + r  # (N,) flat index of each pixel in the padded images
    offsets = np.asarray([dy * Wp + dx for dy, dx in _disk(r)])  # (K,)
    out = np.empty(len(centre), np.float32)
    for s in range(0, len(centre), 4096):  # gathering around these few pixels beats shifting whole images
        c = centre[s:s + 4096]
        near = c[:, None] + offsets  # (n, K) flat indices of the neighbours
        d = ((xp[near] - xp[c][:, None]) ** 2).sum(-1)  # (n, K) squared colour distances
        out[s:s + 4096] = np.sqrt(np.where(refp[near], d, 4.0).min(1))
    return out


@dataclass(frozen=True)
class ObjectExpansion:
    """How far a product's silhouette grows into the backdrop (definition in the module docstring)."""
    ring: int = 3  # px: at 64x64 products are 22-35 px tall (products._place), and 3 px of growth shows

    def __post_init__(self):
        if not (isinstance(self.ring, int) and self.ring >= 1):
            raise ValueError(f"ObjectExpansion: ring must be an int >= 1 pixel, got {self.ring!r}")

    def rates(self, images, product_masks, truth=None) -> np.ndarray:
        """Per image, the fraction of the ring's pixels that look like product: (B,) float (0 with no ring).
        With `truth` masks, only ring pixels that truly are product count (the detector's recall)."""
        images, masks = _check_batch(images, product_masks)
        x = images.astype(np.float32) / 255  # (B, H, W, 3)
        rings = _disk_dilate(masks, self.ring) & ~masks  # (B, H, W)
        if truth is not None:
            rings &= truth
        pixels = np.nonzero(rings)
        d_product = _nearest_colour(x, _erode(masks, 1), pixels, self.ring + 2)  # (N,)
        d_backdrop = _nearest_colour(x, ~_disk_dilate(masks, 2 * self.ring), pixels, 2 * self.ring + 2)
        hits = np.bincount(pixels[0], weights=d_product < d_backdrop, minlength=len(images))
        return hits / np.maximum(rings.sum((1, 2)), 1)

    def calibrate(self, seed: int = CLASSIFIER_SEED, n: int = 100, size: int = 64) -> dict[str, float]:
        """The detector on n renders of World(seed): 'baseline', its rate on real renders (false positives), and
        'recall' on simulated growth (see recall)."""
        world = World(seed)
        samples = [world.sample(i, size) for i in range(n)]
        images, masks = np.stack([s.image for s in samples]), np.stack([s.mask for s in samples])
        return {"baseline": float(self.rates(images, masks).mean()),
                "recall": self.recall(images, masks, np.stack([s.coverage >= 0.5 for s in samples]))}

    def recall(self, images, product_masks, truth) -> float:
        """Simulated growth in real renders: with the mask eroded by `ring` as the kept product, the fraction of the
        ring's truly-product pixels (`truth` (B, H, W) bool, e.g. coverage >= 0.5) that are flagged."""
        images, masks = _check_batch(images, product_masks)
        shrunk, truth = _erode(masks, self.ring), np.asarray(truth, bool)
        keep = (shrunk.any((1, 2)) & (_disk_dilate(shrunk, self.ring) & ~shrunk & truth).any((1, 2)))  # (B,)
        # (products too thin to survive the erosion say nothing about recall)
        return float(self.rates(images[keep], shrunk[keep], truth=truth[keep]).mean())
