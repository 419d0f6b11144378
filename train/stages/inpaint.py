"""`backdrop train inpaint`: turn a text-to-image UNet into a 9-channel inpainting UNet and fine-tune it.

The recipe of runwayml/stable-diffusion-inpainting (model card) and Canvas: the UNet gets 5 extra input channels,
zero-initialised so that before training it computes exactly what the text-to-image UNet did, then fine-tunes on
  --masks random   synthetic masks (boxes, ellipses, brush strokes, and 25% of the time the whole image;
                   train/data.py random_mask, after LaMa), then
  --masks product  the inverted product masks (keep the product, repaint the backdrop: the job Backdrop ships for),
                   mixed with random masks at --product-prob.
Inputs are exactly what diffusers' StableDiffusionInpaintPipeline feeds the UNet at inference:
  cat[noisy latents (4), mask at latent size (1), latents of image * (mask < 0.5) (4)]   (B, 9, h, w)
with the mask taken to latent size by our pipeline's rule ("max", the default: a cell is repainted if any of its pixels
is) or diffusers' (--latent-mask diffusers: binarise at 0.5, nearest resize), and the masked image encoded to its
posterior mean scaled by the scaling factor, as our Pipeline does (diffusers samples the posterior there; the VAE's std
is ~1e-3).
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ...diffusion import masks as M
from ...diffusion.latents import host_to_device
from ...nn.checkpoint import Model
from ...nn.unet import UNet
from ..data import inpaint_mask_with_kind, random_mask
from .common import DiffusionOptions, DiffusionStage

__all__ = ["InpaintStage", "to_inpaint_unet", "to_inpaint_model", "MASK_MODES"]

MASK_MODES = ("random", "product")
INPAINT_CHANNELS = 9  # 4 noisy latents + 1 mask + 4 masked-image latents


def to_inpaint_unet(unet: UNet) -> UNet:
    """A 9-channel copy of a 4-channel UNet: conv_in's weights for the 5 new input channels are zero, so the
    output is the old UNet's whatever the mask and masked-image latents hold. A 9-channel UNet is returned as is."""
    cfg = unet.cfg
    if cfg.in_channels == INPAINT_CHANNELS:
        return unet
    if cfg.in_channels != cfg.out_channels:
        raise ValueError(f"to_inpaint_unet: expected a text-to-image UNet ({cfg.out_channels} input channels) or "
                         f"an inpainting one ({INPAINT_CHANNELS}); this one takes {cfg.in_channels}")
    state = unet.state_dict()
    w = state["conv_in.weight"]  # (C0, 4, 3, 3)
    extra = INPAINT_CHANNELS - cfg.in_channels
    state["conv_in.weight"] = torch.cat([w, w.new_zeros(w.shape[0], extra, *w.shape[2:])], dim=1)  # (C0, 9, 3, 3)
    with torch.device("meta"):  # no random init of weights that are overwritten next
        new = UNet(dataclasses.replace(cfg, in_channels=INPAINT_CHANNELS))
    new.load_state_dict({k: v.clone() for k, v in state.items()}, strict=True, assign=True)
    new.gradient_checkpointing = unet.gradient_checkpointing
    return new.train(unet.training)


def to_inpaint_model(model: Model) -> Model:
    """The model with its UNet converted by to_inpaint_unet and its config saying so."""
    unet = to_inpaint_unet(model.unet)
    cfg = dataclasses.replace(model.config, unet=unet.cfg)
    return dataclasses.replace(model, unet=unet, config=cfg)


class InpaintStage(DiffusionStage):
    """Fine-tunes a 9-channel UNet on (image, caption[, product mask]) with repaint masks drawn per item."""

    def __init__(self, model: Model, options: DiffusionOptions = DiffusionOptions(), device="cpu", init=None,
                 masks: str = "random", product_prob: float = 1.0, latent_mask: str = "max"):
        if masks not in MASK_MODES:
            raise ValueError(f"InpaintStage: masks must be one of {MASK_MODES}, got {masks!r}")
        if not 0.0 <= product_prob <= 1.0:
            raise ValueError(f"InpaintStage: product_prob must be in [0, 1], got {product_prob}")
        if latent_mask not in ("diffusers", "max"):
            raise ValueError(f"InpaintStage: latent_mask must be 'diffusers' or 'max', got {latent_mask!r}")
        super().__init__(to_inpaint_model(model), options, device, init)
        self.masks, self.product_prob, self.latent_mask_mode = masks, product_prob, latent_mask
        self._grey: dict[tuple, torch.Tensor] = {}  # latents of the all-grey image, per (H, W, device)

    def _repaint_masks(self, batch: dict, generator: torch.Generator,
                       hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 1, H, W) float in {0, 1}, 1 = repaint, one per item from the generator; and (B,) bool on the host:
        which items keep their product (their mask is the inverted product mask)."""
        n = len(batch["index"])
        if self.masks == "random":
            return torch.stack([random_mask(*hw, generator) for _ in range(n)]), torch.zeros(n, dtype=torch.bool)
        if "mask" not in batch:
            raise ValueError("inpaint --masks product needs product masks, and this data has none (give every "
                             "image a mask: see train/data.py for the folder layout)")
        product = batch["mask"].cpu()  # (B, 1, H, W), 1 = product
        drawn = [inpaint_mask_with_kind(*hw, generator, product[i], self.product_prob) for i in range(n)]
        return torch.stack([m for m, _ in drawn]), torch.tensor([kind == "product" for _, kind in drawn])

    def _masked_latents(self, image: torch.Tensor | None, mask: torch.Tensor, full: torch.Tensor,
                        known: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Scaled posterior means of image * (mask < 0.5), (B, 4, h, w), encoded here except for two kinds of item:
        a fully masked item's masked image is all grey (zeros), the same every time, so its latents are encoded
        once and reused (the 25% "full" random masks); and the items `known` = (rows (B,) bool, unscaled latents
        (B, 4, h, w)) names take those (the product kept: the latent cache's product_latents). `full` and the rows
        are on the host: reading them from the device would wait for the GPU. `image` may be None when no item
        needs encoding."""
        vae, sf = self.model.vae, self.config.scaling_factor
        rows, latents = known if known is not None else (torch.zeros_like(full), None)
        encode = ~full & ~rows  # (B,)
        if bool(encode.all()):
            return vae.encode(M.masked_image(image, mask)).float() * sf
        if bool(encode.any()) and image is None:
            raise ValueError("inpaint needs the pixels to encode the masked image of items with random masks, and "
                             "this latent cache was built with --no-images; rebuild it without --no-images, or "
                             "train with --masks product --product-prob 1 (the product latents are cached)")
        out = None
        for which, make in ((full, lambda idx: self._grey_latents(mask).expand(len(idx), -1, -1, -1)),
                            (rows, lambda idx: latents[idx].float() * sf),
                            (encode, lambda idx: vae.encode(M.masked_image(image[idx], mask[idx])).float() * sf)):
            if bool(which.any()):
                idx = host_to_device(which.nonzero().squeeze(1), mask.device)  # host indices: no device nonzero
                part = make(idx)  # (k, 4, h, w)
                out = part.new_empty(mask.shape[0], *part.shape[1:]) if out is None else out  # (B, 4, h, w)
                out[idx] = part
        return out

    def _grey_latents(self, mask: torch.Tensor) -> torch.Tensor:
        """(1, 4, h, w): the scaled latents of the all-grey image at the mask's size, encoded once per size."""
        key = (*mask.shape[-2:], mask.device)
        if key not in self._grey:
            grey = torch.zeros(1, 3, *mask.shape[-2:], device=mask.device)  # (1, 3, H, W)
            self._grey[key] = self.model.vae.encode(grey).float() * self.config.scaling_factor
        return self._grey[key]

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        image = batch.get("image")  # (B, 3, H, W) in [-1, 1]; a latent cache built with --no-images has none
        if image is None and not (self.masks == "product" and "product_latents" in batch):
            raise ValueError("inpaint needs the pixels to encode the masked image, and this latent cache was "
                             "built with --no-images; rebuild it without --no-images or pass the images")
        x0, context = self.condition(batch, generator)  # (B, 4, h, w), (B, 77, C)
        hw = tuple((image if image is not None else batch["mask"]).shape[-2:])
        mask, kept = self._repaint_masks(batch, generator, hw)  # (B, 1, H, W), (B,) on the host
        full = (mask >= 0.5).flatten(1).all(dim=1)  # (B,) items repainted entirely
        mask = host_to_device(mask, x0.device)
        known = (kept & ~full, batch["product_latents"]) if "product_latents" in batch else None
        with torch.no_grad():
            masked_latents = self._masked_latents(image, mask, full, known)  # (B, 4, h, w)
            lat_mask = M.latent_mask(mask, size=tuple(x0.shape[-2:]), mode=self.latent_mask_mode)  # (B, 1, h, w)
        concat = torch.cat([lat_mask.to(x0.dtype), masked_latents], dim=1)  # (B, 5, h, w)
        loss, metrics = self.diffusion_loss(model, x0, context, generator, concat)
        metrics["repaint_fraction"] = mask.mean().detach()
        return loss, metrics
