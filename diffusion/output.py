"""What a Pipeline call returns: Output, and the conversion of its images to the asked output_type.

output_type "pil" (list of PIL images), "np" (float32 (B, H, W, 3) in [0, 1]: the VAE's output itself, as diffusers'
"np", or uint8 / 255 when paste-back made it), "pt" (the same as a torch (B, 3, H, W)) or "latent" (the final latents
(B, 4, h, w) diffusers would decode after dividing by the scaling factor, at the padded or cropped processing size).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from backdrop.diffusion import pixels as P
from backdrop.diffusion.image_io import rgb_icc

__all__ = ["Output", "decoded", "format_output", "as_hwc", "with_profiles", "item_numbers"]

log = logging.getLogger(__name__)


@dataclass
class Output:
    """images: list of PIL images, a float32 array (B, H, W, 3) or tensor (B, 3, H, W) in [0, 1], or latents
    (B, 4, h, w).
    seeds: each item's seed (pass it back alone to reproduce that image); with `generator`, the initial_seed() of
    the generator that drew the item (one generator for a batch: the same seed for every item, reproducing them
    only as that batch).
    unchanged: indices of inpaint items returned as the input because their mask had nothing to repaint."""
    images: list | np.ndarray | torch.Tensor
    seeds: list[int]
    unchanged: list[int] = field(default_factory=list)

    def to_tuple(self) -> tuple:
        """(images, None): diffusers' (images, nsfw_content_detected) of return_dict=False; there is no checker."""
        return self.images, None

    def __getitem__(self, key):
        """out[0] (the images) or out["images"], as diffusers' outputs index."""
        return getattr(self, key) if isinstance(key, str) else (self.images,)[key]


def decoded(backend, latents: torch.Tensor, scaling_factor: float, rows: list[int] | None = None,
            **cond) -> torch.Tensor:
    """(B, C, h, w) latents -> (B, 3, h*f, w*f) images in [-1, 1] on the CPU. An item whose latents are not finite
    (float overflow, which the pipeline logs) or whose decoded image is not (the VAE overflowed, logged here) is
    black in every output type: NaN pixels were NaN in "np" and "pt", and a numpy warning (an error under -W error)
    on the way to PIL. rows: the call's item number of each latent (for the log), when they are not 0..B-1."""
    y = backend.vae_decode(latents / scaling_factor, **cond).cpu()
    bad = ~torch.isfinite(latents.flatten(1)).all(1).cpu()  # (B,)
    if overflowed := (~torch.isfinite(y.flatten(1)).all(1) & ~bad).nonzero().flatten().tolist():
        dtype = getattr(backend, "dtype", None)
        fix = ("run it in float32: dtype=torch.float32 / --dtype fp32" if dtype in (torch.float16, torch.bfloat16)
               else "its weights or these latents are out of range")
        log.warning("items %s: the VAE's output is not finite, though their latents are (%s); their images are "
                    "black", item_numbers(rows, overflowed), fix)
        bad[overflowed] = True
    return y.masked_fill(bad.view(-1, 1, 1, 1), -1.0) if bad.any() else y


def item_numbers(rows: list[int] | None, positions: list[int]) -> list[int]:
    """The call's item numbers of positions in a batch that holds only some of its items (rows: the number of each;
    None: all of them, in order), for messages."""
    return positions if rows is None else [rows[p] for p in positions]


def format_output(images, seeds: list[int], output_type: str, unchanged: list[int] | None = None) -> Output:
    """VAE output (B, 3, H, W) in [-1, 1], uint8 (B, H, W, 3) (what paste-back made: to PIL as it is, no float round
    trip of the whole image) or float (B, H, W, 3) in [0, 1] -> the asked type ("np": float32 (B, H, W, 3), "pt":
    float32 (B, 3, H, W), in [0, 1] as diffusers')."""
    if isinstance(images, torch.Tensor):  # diffusers' postprocess: (x / 2 + 0.5).clamp(0, 1), float32
        if output_type == "pil":
            return Output(P.to_pil(images), seeds, unchanged or [])
        images = (images.float() * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()  # (B, H, W, 3)
    if images.dtype == np.uint8:
        if output_type == "pil":
            return Output(P.to_pil(images), seeds, unchanged or [])
        images = images.astype(np.float32) / 255
    if output_type == "pil":
        return Output(P.to_pil((images * 255).round().astype(np.uint8)), seeds, unchanged or [])
    images = images.astype(np.float32)
    return Output(torch.from_numpy(images).permute(0, 3, 1, 2) if output_type == "pt" else images, seeds,
                  unchanged or [])


def as_hwc(images) -> np.ndarray:
    """An Output's images (PIL list, float (B, H, W, 3) or "pt" (B, 3, H, W)) as float32 (B, H, W, 3) in [0, 1]."""
    if isinstance(images, torch.Tensor):
        return images.permute(0, 2, 3, 1).numpy()
    if isinstance(images, np.ndarray):
        return images
    return np.stack([np.asarray(p) for p in images]).astype(np.float32) / 255


def with_profiles(out: Output, sources: list, k: int) -> Output:
    """PIL outputs tagged with the RGB ICC profile of the input image each was made from (`sources`: the call's
    inputs, k outputs each), as the CLI's files are: the kept product pixels are exact, and with their profile they
    also look the same in a colour-managed viewer (`save` writes .info's profile)."""
    if isinstance(out.images, list):
        for j, im in enumerate(out.images):
            if icc := rgb_icc(sources[j // k]):
                im.info["icc_profile"] = icc
    return out
