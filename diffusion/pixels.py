"""Images as the pipelines take and give them: any input (PIL, numpy, torch; one or a list) read as uint8 pixels or as
the VAE's float32 (B, 3, H, W) in [-1, 1], and the VAE's output back as uint8 and PIL, rounded exactly as diffusers'
VaeImageProcessor. Masks are read by masks.py on the same readers (`_array`, `_pil`).

uint8 pixels stay exact wherever paste-back keeps them: `image_rows` gives one (H, W, 3) array per item, items given
as one image sharing it (a photo inpainted n times is one array, not n), `image_to_uint8` the stacked (B, H, W, 3).
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from backdrop.diffusion.batching import items
from backdrop.diffusion.image_io import from_file

__all__ = ["image_to_tensor", "image_to_uint8", "image_rows", "tensor_to_uint8", "to_pil"]


def _array(x, name: str, hint: str = " (a [-1, 1] image needs (x + 1) / 2 first)") -> np.ndarray:
    """One non-PIL item as (H, W, C) numpy, uint8 or float in [0, 1] (bool becomes uint8 0/255)."""
    if isinstance(x, torch.Tensor):
        if x.ndim == 3:
            x = x.permute(1, 2, 0)  # (C, H, W) -> (H, W, C)
        x = (x.float() if x.is_floating_point() else x).detach().cpu().numpy()
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name}: expected a PIL image, numpy array or torch tensor, got {type(x).__name__}")
    if x.ndim == 2:
        x = x[..., None]  # (H, W) -> (H, W, 1)
    if x.ndim != 3:
        raise ValueError(f"{name}: expected (H, W) or (H, W, C) arrays / (C, H, W) tensors, got shape {x.shape}")
    if not x.shape[0] or not x.shape[1]:
        raise ValueError(f"{name}: has no pixels (shape {x.shape})")
    if x.dtype == np.bool_:
        return x.astype(np.uint8) * 255
    if np.issubdtype(x.dtype, np.floating):
        lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
        if not (0.0 <= lo and hi <= 1.0):  # also catches NaN
            raise ValueError(f"{name}: float values must lie in [0, 1], got [{lo:.4g}, {hi:.4g}]{hint}")
        return x
    if x.dtype != np.uint8:
        raise ValueError(f"{name}: dtype {x.dtype} is not supported (use uint8 0..255, bool, or float in [0, 1])")
    return x


def _pil(x: Image.Image, name: str) -> Image.Image:
    """A PIL input as a file of it is read (image_io.from_file): upright by its EXIF orientation, 8 bits, RGB(A)."""
    try:
        return from_file(x)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


def _to_float(a: np.ndarray) -> torch.Tensor:
    # uint8 / 255 in float32, exactly diffusers' VaeImageProcessor.pil_to_numpy
    return torch.from_numpy(a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a.astype(np.float32))


def _same_size(sizes: list[tuple[int, int]], name: str, size: tuple[int, int] | None = None) -> None:
    for i, s in enumerate(sizes):
        if s != sizes[0]:
            raise ValueError(f"{name}: item {i} is {s[0]}x{s[1]} (HxW) but item 0 is {sizes[0][0]}x{sizes[0][1]}; "
                             "the items of one call share a size (one batch): make a call per size")
    if size is not None and tuple(sizes[0]) != tuple(size):
        raise ValueError(f"{name} is {sizes[0][0]}x{sizes[0][1]} (HxW) but the image is {size[0]}x{size[1]}")


def _image_arrays(images, name: str) -> list[np.ndarray]:
    out, seen = [], {}  # an image given for many items is read once, and its items share the array
    for i, x in enumerate(items(images, name)):
        if id(x) not in seen:
            seen[id(x)] = _image_array(x, f"{name}[{i}]")
        out.append(seen[id(x)])
    _same_size([a.shape[:2] for a in out], name)
    if len({a.dtype for a in out}) > 1:
        raise ValueError(f"{name}: items mix dtypes {sorted({str(a.dtype) for a in out})}")
    return out


def _image_array(x, name: str) -> np.ndarray:
    if isinstance(x, Image.Image):
        return np.asarray(_pil(x, name).convert("RGB"))  # alpha dropped, P/L expanded
    a = _array(x, name)
    if a.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{name}: an image needs 1, 3 or 4 channels, got shape {a.shape}")
    return np.repeat(a, 3, axis=-1) if a.shape[-1] == 1 else a[..., :3]


def image_to_tensor(images) -> torch.Tensor:
    """Images (PIL, uint8 or [0, 1] float arrays/tensors, or lists) -> float32 (B, 3, H, W) in [-1, 1].

    Bit-identical to diffusers' VaeImageProcessor.preprocess without resizing: float32 v / 255, then 2 x - 1.
    """
    x = torch.stack([_to_float(a) for a in _image_arrays(images, "image")])  # (B, H, W, 3) in [0, 1]
    return 2.0 * x.permute(0, 3, 1, 2).contiguous() - 1.0  # (B, 3, H, W)


def image_to_uint8(images) -> np.ndarray:
    """Images -> uint8 (B, H, W, 3): `image_rows`, stacked."""
    return np.stack(image_rows(images))


def image_rows(images) -> list[np.ndarray]:
    """Images -> a uint8 (H, W, 3) array per item, the exact pixels paste-back keeps (floats round like
    `tensor_to_uint8`). Items given as one image share one array (read-only): a photo inpainted n times is one."""
    arrays, done = _image_arrays(images, "image"), {}
    if arrays[0].dtype == np.uint8:
        return arrays
    for a in arrays:
        if id(a) not in done:
            done[id(a)] = (a.astype(np.float32) * 255).round().astype(np.uint8)
    return [done[id(a)] for a in arrays]


def tensor_to_uint8(x: torch.Tensor) -> np.ndarray:
    """VAE output (B, C, H, W) in [-1, 1] -> uint8 (B, H, W, C).

    Exactly diffusers' VaeImageProcessor.postprocess + numpy_to_pil: (x * 0.5 + 0.5).clamp(0, 1) in x's dtype,
    then float32 numpy, * 255, np.round (round half to even), astype uint8.
    """
    if not (isinstance(x, torch.Tensor) and x.ndim == 4 and x.is_floating_point()):
        raise ValueError(f"tensor_to_uint8: expected a float tensor (B, C, H, W), got {getattr(x, 'shape', type(x))}")
    x = (x * 0.5 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()  # (B, H, W, C)
    return (x * 255).round().astype(np.uint8)


def to_pil(x) -> list[Image.Image]:
    """A [-1, 1] tensor (B, C, H, W) or uint8 array (B, H, W, C) / (H, W, C) -> list of PIL images."""
    a = tensor_to_uint8(x) if isinstance(x, torch.Tensor) else np.asarray(x)
    if a.dtype != np.uint8 or a.ndim not in (3, 4):
        raise ValueError(f"to_pil: expected uint8 (B, H, W, C) or a [-1, 1] tensor, got {a.dtype} {a.shape}")
    a = a[None] if a.ndim == 3 else a
    return [Image.fromarray(i[..., 0] if i.shape[-1] == 1 else i) for i in a]
