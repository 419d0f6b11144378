"""How Pipeline (pipeline.py) fits images to its models: the processing size of an image (the next multiple of 8,
or what an export needs), padding to it, and the VAE latents of images, each distinct image encoded once."""
from __future__ import annotations

import logging

import torch

from backdrop.diffusion import masks as M

__all__ = ["Processing"]

log = logging.getLogger("backdrop.diffusion.pipeline")  # its warnings are the pipeline's


class Processing:
    """Mixed into Pipeline: needs self.backend, self.config, self._multiple (px the sides are padded to),
    self.fixed_size ((H, W) of an export made with --size, or None) and self._warned (a set)."""

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) padded right/bottom to the processing multiple: reflect (continues texture), or replicate
        where the pad is wider than the image (reflection cannot reach that far)."""
        H, W = x.shape[-2:]
        Hp, Wp = self.processing_size(H, W)
        mode = "reflect" if Hp - H < H and Wp - W < W else "replicate"
        return M.pad_to_multiple(x, self._multiple, mode=mode)

    def processing_size(self, H: int, W: int) -> tuple[int, int]:
        """(H', W') px the models run for an H x W image: the next multiples of the processing multiple (8; an
        export whose UNet needs more says so: older exports, 64). ValueError for a size this backend cannot run (an
        export made with a fixed --size runs that size only)."""
        size = M.fit_size(H, W, self._multiple)
        if self.fixed_size and size != tuple(self.fixed_size):
            sh, sw = self.fixed_size
            raise ValueError(f"{H}x{W} (HxW) px: this export runs {sh}x{sw} images only (it was made with --size "
                             f"{sh}x{sw}); give images of that size, or export again without --size for any size")
        f = self.config.vae.downsample_factor
        if size != M.fit_size(H, W, f) and size not in self._warned:
            self._warned.add(size)
            log.warning("%dx%d (HxW) px runs as %dx%d on this %s backend, whose UNet takes sides in multiples of %d "
                        "px, and is cropped back: the image differs from the torch backend's for the same seed "
                        "(an export made since takes any multiple of %d)", H, W, *size,
                        getattr(self.backend, "name", ""), self._multiple, f)
        return size

    def _encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> scaled latents (B, 4, h, w): the posterior mean times the scaling
        factor. Each distinct image is encoded once (a request repeated k times, one product under many prompts)."""
        uniq, inverse = torch.unique(x.flatten(1), dim=0, return_inverse=True)  # (U, 3*H*W), (B,)
        lat = self.backend.vae_encode(uniq.view(-1, *x.shape[1:]).to(self.backend.device)).float()  # (U, 4, h, w)
        return lat[inverse.to(lat.device)] * self.config.scaling_factor

    def _empty_concat(self, b: int, h: int, w: int) -> torch.Tensor | None:
        """A 9-channel inpainting UNet used for generate/img2img repaints everything: mask 1, masked image all
        grey (0 in [-1, 1]), as its own inpaint path would build for a full mask. None for plain UNets."""
        if self.config.unet.in_channels != 9:
            return None
        f = self.config.vae.downsample_factor
        grey = self._encode_image(torch.zeros(1, 3, h * f, w * f, dtype=torch.float32)).expand(b, -1, -1, -1)
        return torch.cat([torch.ones(b, 1, h, w, device=grey.device, dtype=grey.dtype), grey], 1)  # (B, 5, h, w)
