"""The inpaint path's pixel-space ends: the "only masked" crop (process the mask's box at the model's size, like
diffusers' `padding_mask_crop`) and the paste-back that keeps a product's pixels exact, optionally colour-matched.
Masks and images follow masks.py's conventions: (B, 1, H, W) float, 1 = repaint; uint8 (B, H, W, 3) pixels. The
functions that take full-size originals (crop_images, uncrop, color_match, composite) also take them as lists of
items, where items that share a photo or a mask share one object (pixels.image_rows; (1, 1, H, W) masks): a product
photo inpainted n times is not copied n times.
    out[mask == 0] is bit-identical to img[mask == 0] after `composite`, whatever the options.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .masks import _check_mask, feather
from .pixels import _to_float, image_rows, image_to_uint8

__all__ = ["Box", "crop_box", "crop_images", "crop_masks", "uncrop", "color_match", "paste_back", "composite"]

Box = tuple[int, int, int, int]  # (x1, y1, x2, y2), x2/y2 exclusive: PIL's and diffusers' order


# ----------------------------------------------------------------------------------------------- "only masked"

def crop_box(mask: torch.Tensor, size: tuple[int, int], pad: int = 0) -> list[Box]:
    """Per item, the box around the repaint pixels (mask > 0), grown by `pad` and then to the aspect ratio of the
    processing size (h, w), clipped to the image. Equal to diffusers' VaeImageProcessor.get_crop_region(mask,
    width=w, height=h, pad=pad); its arithmetic (int() truncation, shift-then-clip) is kept so boxes match exactly.
    Pass the dilated mask, so the crop holds everything the model repaints.
    """
    m = _check_mask(mask)
    if pad < 0 or int(pad) != pad:
        raise ValueError(f"crop_box: pad must be a non-negative integer, got {pad!r}")
    pad = int(pad)
    h, w = size
    H, W = m.shape[-2:]
    boxes = []
    for i, item in enumerate(m[:, 0] > 0):  # (H, W) bool
        rows, cols = torch.nonzero(item.any(1)).flatten(), torch.nonzero(item.any(0)).flatten()
        if rows.numel() == 0:
            raise ValueError(f"crop_box: mask item {i} is empty, there is nothing to crop around")
        x1, y1 = max(int(cols[0]) - pad, 0), max(int(rows[0]) - pad, 0)
        x2, y2 = min(int(cols[-1]) + 1 + pad, W), min(int(rows[-1]) + 1 + pad, H)
        if (x2 - x1) / (y2 - y1) > w / h:
            y1, y2 = _grow(y1, y2, (x2 - x1) / (w / h), H)
        else:
            x1, x2 = _grow(x1, x2, (y2 - y1) * (w / h), W)
        boxes.append((x1, y1, x2, y2))
    return boxes


def _grow(a: int, b: int, want: float, limit: int) -> tuple[int, int]:
    """Grow [a, b) to length `want` around its centre, shifted back inside [0, limit) (get_crop_region step 3)."""
    diff = int(want - (b - a))
    a, b = a - diff // 2, b + diff - diff // 2
    if b >= limit:
        a, b = a - (b - limit), limit
    if a < 0:
        a, b = 0, b - a
    return a, min(b, limit)


def crop_images(images: np.ndarray, boxes: list[Box], size: tuple[int, int]) -> np.ndarray:
    """uint8 (B, H, W, 3) -> each box resized to (h, w) with Lanczos (diffusers' default resample) -> (B, h, w, 3).

    diffusers uses resize_mode="fill" (aspect-preserving, edges stretched into any gap); that equals this plain
    resize whenever the box has the processing aspect ratio, which crop_box aims for. A plain resize is the exact
    geometric inverse of `uncrop`'s, also when the box was clipped at the image border.
    """
    h, w = size
    return np.stack([np.asarray(Image.fromarray(img).crop(box).resize((w, h), Image.LANCZOS))
                     for img, box in zip(image_rows(images), boxes, strict=True)])


def crop_masks(mask: torch.Tensor, boxes: list[Box], size: tuple[int, int], mode: str = "max") -> torch.Tensor:
    """(B, 1, H, W) -> each box resized to (h, w) -> (B, 1, h, w).

    "max": adaptive max pooling, a covering resize (every output pixel is the max over the input pixels it spans)
        so, as with latent_mask, shrinking never loses a repaint pixel.
    "diffusers": the mask quantised to uint8 and Lanczos-resized by PIL, what VaeImageProcessor.preprocess does
        before binarising (equal to its "fill" mode when the box has the processing aspect ratio).
    """
    m = _check_mask(mask)
    h, w = size
    out = []
    for item, (x1, y1, x2, y2) in zip(m, boxes, strict=True):
        c = item[:, y1:y2, x1:x2]  # (1, bh, bw)
        if mode == "max":
            out.append(F.adaptive_max_pool2d(c, (h, w)))
        elif mode == "diffusers":
            u8 = (c[0] * 255).round().to(torch.uint8).numpy()
            out.append(_to_float(np.asarray(Image.fromarray(u8).resize((w, h), Image.LANCZOS)))[None])
        else:
            raise ValueError(f"crop_masks: mode must be 'max' or 'diffusers', got {mode!r}")
    return torch.stack(out).to(m.dtype)  # (B, 1, h, w)


def uncrop(image: np.ndarray, generated: np.ndarray, boxes: list[Box]) -> np.ndarray:
    """Full-size generated images: a copy of `image` (B, H, W, 3) with each generated crop (B, h, w, 3) resized back
    to its box (Lanczos) and pasted in. Pixels outside the boxes are the input's, so paste-back keeps them anyway."""
    out = image_to_uint8(image)  # a new array
    for o, g, (x1, y1, x2, y2) in zip(out, _pixels(generated), boxes, strict=True):
        o[y1:y2, x1:x2] = np.asarray(Image.fromarray(g).resize((x2 - x1, y2 - y1), Image.LANCZOS))
    return out


# ----------------------------------------------------------------------------------------------- paste-back

def color_match(generated: np.ndarray, image: np.ndarray, mask: torch.Tensor, boxes: list[Box] | None = None,
                min_pixels: int = 64) -> np.ndarray:
    """Remove the colour cast the VAE/sampler put on `generated` (B, H, W, 3) uint8, per item and channel.

    Where mask == 0 the generated image should reproduce the input (the model was told to keep those pixels; a
    4-channel inpaint even re-decodes the encoded input there), so the affine map that moves its mean/std there
    onto the input's is this sample's colour drift; we apply it to the whole generated image. The statistics use
    only kept pixels inside the item's box (outside it `uncrop` copied the input, which would bias them to
    identity). The std ratio is 1 for near-flat regions (std < 1 level, e.g. a white product) and clamped to
    [0.5, 2]; fewer than `min_pixels` kept pixels leave the item as is. Kept pixels are then restored exactly by
    paste_back, so this never changes them in the output.
    """
    out, img, m = image_to_uint8(generated), image_rows(image), _mask_rows(mask)  # out: a new array
    if len(img) != len(out) or len(m) != len(out) or img[0].shape != out.shape[1:] or m[0].shape[-2:] != out.shape[1:3]:
        raise ValueError(f"color_match: generated {out.shape}, {len(img)} images {img[0].shape} and {len(m)} masks "
                         f"{tuple(m[0].shape)} differ")
    levels = np.arange(256, dtype=np.float64)
    for i in range(len(out)):
        x1, y1, x2, y2 = boxes[i] if boxes is not None else (0, 0, out.shape[2], out.shape[1])
        keep = (m[i][0, 0, y1:y2, x1:x2] == 0).numpy()  # (h, w) of the box
        n = int(keep.sum())
        if n < min_pixels:
            continue
        g, t = out[i, y1:y2, x1:x2][keep], img[i][y1:y2, x1:x2][keep]  # (N, 3) uint8
        for c in range(3):  # mean and std from the 256-bin histograms; the map as a lookup table of the 256 levels
            stats = []
            for a in (g[:, c], t[:, c]):
                hist = np.bincount(a, minlength=256)
                mean = hist @ levels / n
                stats.append((mean, math.sqrt(hist @ (levels - mean) ** 2 / n)))
            (mg, sg), (mt, st) = stats
            scale = 1.0 if sg < 1.0 else min(max(st / max(sg, 1e-12), 0.5), 2.0)
            lut = np.clip(np.rint((levels - mg) * scale + mt), 0, 255).astype(np.uint8)
            out[i, ..., c] = lut[out[i, ..., c]]  # g was read before: each channel is mapped once
    return out


def paste_back(image: np.ndarray, generated: np.ndarray, blend: torch.Tensor) -> np.ndarray:
    """uint8 (B, H, W, 3) images, blend (B, 1, H, W) = weight of the generated image -> uint8 (B, H, W, 3).

    out = image where blend == 0 (bit-identical), generated where blend >= 1, round(image + blend (gen - image))
    in between. Working on uint8 makes "the product's pixels are kept" a bit-exact statement.
    """
    img, gen, b = _pixels(image), _pixels(generated), _check_mask(blend, "blend")
    if img.shape != gen.shape:
        raise ValueError(f"paste_back: image is {img.shape[1]}x{img.shape[2]} (HxW, batch {img.shape[0]}) but"
                         f" generated is {gen.shape[1]}x{gen.shape[2]} (batch {gen.shape[0]})")
    if (b.shape[0], *b.shape[-2:]) != img.shape[:3]:
        raise ValueError(f"paste_back: blend is {b.shape[-2]}x{b.shape[-1]} (HxW, batch {b.shape[0]}) but the"
                         f" image is {img.shape[1]}x{img.shape[2]} (batch {img.shape[0]})")
    w = b[:, 0].detach().cpu().float().numpy()  # (B, H, W)
    out = np.where((w >= 1)[..., None], gen, img)  # (B, H, W, 3) uint8: a 0/1 blend needs no arithmetic
    soft = (w > 0) & (w < 1)  # the feathered edge only: float arithmetic there, not over the whole image
    if soft.any():
        f_img, f_gen = img[soft].astype(np.float32), gen[soft].astype(np.float32)  # (N, 3)
        out[soft] = np.clip(np.rint(f_img + w[soft][:, None] * (f_gen - f_img)), 0, 255).astype(np.uint8)
    return out


def composite(image, generated, mask, *, boxes: list[Box] | None = None, mask_blur: float = 0.0,
              match_color: bool = False) -> np.ndarray:
    """The back half of inpainting: uint8 (B, H, W, 3) output with every kept pixel bit-identical to `image`.

    image      the original images (B, H, W, 3) (anything image_rows reads).
    generated  the decoded images: full size (B, H, W, 3), or with `boxes` the processed crops (B, h, w, 3).
    mask       the *original* repaint mask (B, 1, H, W), or a list of (1, 1, H, W) (not the dilated one the model saw).
    mask_blur  feather sigma in pixels (see `feather`); 0 keeps the mask as is, right for RGBA cutouts whose
               transparent pixels hold no real colour.
    match_color  apply `color_match` before pasting.
    Item by item: a photo's full-size temporaries (the uncropped image, the blend's arithmetic) exist for one item
    at a time, not the batch's; a mask given as one object for several items is feathered once.
    """
    img, m, generated = image_rows(image), _mask_rows(mask), _pixels(generated)  # (B, h, w, 3) generated
    if len(generated) != len(img) or len(m) != len(img) or boxes is not None and len(boxes) != len(img):
        raise ValueError(f"composite: {len(img)} images, {len(generated)} generated, {len(m)} masks"
                         f"{'' if boxes is None else f', {len(boxes)} boxes'}: give one of each per item")
    out, blends = np.empty((len(img), *img[0].shape), np.uint8), {}
    for i in range(len(img)):
        one, im = slice(i, i + 1), img[i][None]  # (1, H, W, 3), a view
        gen = uncrop(im, generated[one], boxes[one]) if boxes is not None else generated[one]
        if match_color:
            gen = color_match(gen, im, m[i], boxes[one] if boxes is not None else None)
        if id(m[i]) not in blends:
            blends[id(m[i])] = feather(m[i], mask_blur)  # (1, 1, H, W)
        out[i] = paste_back(im, gen, blends[id(m[i])])[0]
    return out


def _pixels(images) -> np.ndarray:
    """uint8 (B, H, W, 3) to read: such an array as it is (the pipeline's; a 12-megapixel photo is not copied to be
    read), anything else through image_to_uint8."""
    ready = isinstance(images, np.ndarray) and images.ndim == 4 and images.dtype == np.uint8 and images.shape[-1] == 3
    return images if ready else image_to_uint8(images)


def _mask_rows(mask) -> list[torch.Tensor]:
    """A (B, 1, H, W) mask or a list of (1, 1, H, W) ones -> a (1, 1, H, W) tensor per item."""
    if not isinstance(mask, (list, tuple)):
        return list(_check_mask(mask).split(1))
    rows = [_check_mask(m, f"mask[{i}]") for i, m in enumerate(mask)]
    if not rows or any(len(r) != 1 or r.shape[-2:] != rows[0].shape[-2:] for r in rows):
        raise ValueError(f"mask: a list of masks needs (1, 1, H, W) tensors of one size, got "
                         f"{[tuple(r.shape) for r in rows]}")
    return rows
