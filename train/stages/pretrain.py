"""`backdrop train pretrain`: text-to-image latent diffusion (Rombach et al. 2022), the UNet trained on the frozen
text encoder and VAE.

Data: (image, caption) pairs, or their cached latents and text embeddings (train/cache.py), which skip both
frozen encoders on every step. The loss and its options (eps/v, min-SNR-γ, offset noise, input perturbation,
zero terminal SNR, caption dropout) live in stages/common.py, shared with the inpaint stage.
"""
from __future__ import annotations

import torch
from torch import nn

from .common import DiffusionOptions, DiffusionStage

__all__ = ["PretrainStage", "DiffusionOptions"]


class PretrainStage(DiffusionStage):
    """A 4-channel UNet learns to denoise latents of the data's images, conditioned on their captions."""

    def __init__(self, model, options: DiffusionOptions = DiffusionOptions(), device="cpu", init=None):
        if model.config.unet.in_channels != model.config.vae.latent_channels:
            raise ValueError(f"pretrain trains a text-to-image UNet with {model.config.vae.latent_channels} input "
                             f"channels; this one takes {model.config.unet.in_channels} (an inpainting UNet? "
                             "fine-tune it with `backdrop train inpaint`)")
        super().__init__(model, options, device, init)

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        x0, context = self.condition(batch, generator)  # (B, 4, h, w), (B, 77, C)
        return self.diffusion_loss(model, x0, context, generator)
