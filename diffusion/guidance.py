"""Denoiser wrappers: turn a UNet `unet(x_vp, t, context) -> eps or v` into k-diffusion's `denoised = model(x, sigma)`.

Samplers (samplers.py) only ever see `denoised = model(x, sigma, **extra_args)` in the VE parametrization
x = x0 + sigma * eps. The wrappers here own everything model-specific:
  * input scaling c_in = 1 / sqrt(sigma² + 1): the UNet was trained on VP latents x_vp = x / sqrt(1 + sigma²);
  * the UNet timestep for a sigma, taken from the Schedule's own (sigma, timestep) pairs so it is exactly the one
    diffusers feeds (Karras sigmas have rounded timesteps, which interpolation would not reproduce);
  * eps vs v prediction (Salimans & Ho 2022, "Progressive Distillation", arXiv:2202.00512, for v);
  * classifier-free guidance (Ho & Salimans 2022, arXiv:2207.12598) with negative prompts in one batched UNet call,
    per-item guidance scales, guidance_rescale (Lin et al. 2023, arXiv:2305.08891 §3.4), and the extra mask +
    masked-image channels of 9-channel inpainting UNets.
Scalings follow k-diffusion's DiscreteEpsDDPMDenoiser / DiscreteVDDPMDenoiser, with float32 coefficients computed as
diffusers' Euler schedulers compute them, so the two agree to the last bit where the arithmetic allows.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from backdrop.diffusion.schedule import Schedule
from backdrop.nn.config import PREDICTION_TYPES

__all__ = ["Denoiser", "CFGDenoiser", "rescale_noise_cfg", "check_start"]



def rescale_noise_cfg(guided: torch.Tensor, cond: torch.Tensor, guidance_rescale) -> torch.Tensor:
    """Lin et al. 2023 §3.4 (their eq. 15-16): rescale the guided prediction to the per-item std of the conditional
    one (fixes over-exposure at high guidance), then mix back by `guidance_rescale` (float or (B,) tensor)."""
    dims = list(range(1, cond.ndim))
    std_cond = cond.std(dim=dims, keepdim=True)  # (B, 1, 1, 1); unbiased, as diffusers' rescale_noise_cfg
    std_guided = guided.std(dim=dims, keepdim=True)
    rescaled = guided * (std_cond / std_guided)
    phi = _column(guidance_rescale, guided)
    return phi * rescaled + (1 - phi) * guided


def _column(value, like: torch.Tensor):
    """A float stays a float; a (B,) tensor becomes (B, 1, 1, 1) in like's dtype/device for broadcasting."""
    if isinstance(value, torch.Tensor):
        return value.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))
    return value


def check_start(schedule: Schedule, prediction_type: str) -> None:
    """Refuse a schedule that starts at sigma = inf (zero terminal SNR with DDIM/DDPM/LCM) for an epsilon model,
    which cannot predict x0 there (the server checks it before queueing: in a batch it would fail its neighbours)."""
    if prediction_type == "epsilon" and math.isinf(float(schedule.sigmas[0])):
        raise ValueError(f"zero terminal SNR (rescale_betas_zero_snr) with {schedule.sampler} starts at sigma = "
                         "inf, where an epsilon-prediction model cannot predict x0; use a v_prediction model, or "
                         "a sampler that starts below it (euler, dpmpp-2m, ...)")


class Denoiser:
    """`denoised = Denoiser(unet, schedule, prediction_type)(x, sigma, context=None, c_concat=None)`.

    sigma is a float (every item at the same level: what the samplers pass) or a (B,) tensor (per-item levels).
    At sigma = inf (zero terminal SNR with DDIM/DDPM/LCM) x holds the VP latents themselves (x / sqrt(1 + sigma²)
    in the limit), so c_in = 1; only v-prediction is defined there (x0 = -v), as in diffusers.
    """

    def __init__(self, unet: Callable, schedule: Schedule, prediction_type: str = "epsilon"):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        check_start(schedule, prediction_type)
        self.unet, self.schedule, self.prediction_type = unet, schedule, prediction_type

    # ------------------------------------------------------------------------------------------------ scalings
    # x_vp = x / sqrt(sigma² + 1); denoised = x - sigma * eps, or x / (sigma² + 1) - v * sigma / sqrt(sigma² + 1).
    # Computed in float32 in diffusers' order (`sample / ((sigma**2 + 1) ** 0.5)`, `model_output * (-sigma / ...)`)
    # so our results match its Euler schedulers to the last bit where they do the same operations.

    def _sigma_column(self, sigma, like: torch.Tensor) -> torch.Tensor:
        """Per-item sigmas (B,) -> (B, 1, 1, 1) float32 on like's device."""
        s = sigma.to(device=like.device, dtype=torch.float32).reshape(-1)
        if s.shape[0] != like.shape[0]:
            raise ValueError(f"per-item sigma {tuple(sigma.shape)} does not match the batch {like.shape[0]}")
        if self.prediction_type == "epsilon" and bool(torch.isinf(s).any()):
            raise ValueError("sigma = inf needs a v_prediction model (epsilon cannot predict x0 there)")
        return s.reshape(-1, 1, 1, 1)  # (B, 1, 1, 1)

    @staticmethod
    def _per_item(sigma) -> bool:
        return isinstance(sigma, torch.Tensor) and sigma.ndim > 0

    def _timesteps(self, sigma, batch: int, device) -> torch.Tensor:
        if self._per_item(sigma):
            return torch.tensor([self.schedule.timestep(s) for s in sigma.tolist()], dtype=torch.float32,
                                device=device)
        return torch.full((batch,), self.schedule.timestep(float(sigma)), dtype=torch.float32, device=device)

    def scale_input(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """x_vp = x / sqrt(sigma² + 1), the UNet's input latents (x itself at sigma = inf: already VP)."""
        if self._per_item(sigma):
            s = self._sigma_column(sigma, x)
            root = torch.where(torch.isinf(s), torch.ones_like(s), (s * s + 1).sqrt())
            return x / root.to(x.dtype)
        s = float(sigma)
        if math.isinf(s):
            return x
        return x / float(np.sqrt(np.float32(s) * np.float32(s) + np.float32(1)))

    def to_denoised(self, x: torch.Tensor, sigma, out: torch.Tensor) -> torch.Tensor:
        """x0 from the UNet output (eps or v) at level sigma."""
        out = out.to(x.dtype)
        if self._per_item(sigma):
            s = self._sigma_column(sigma, x)
            if self.prediction_type == "epsilon":
                return x - s.to(x.dtype) * out
            inf = torch.isinf(s)
            norm = s * s + 1
            c_out = torch.where(inf, -torch.ones_like(s), -s / norm.sqrt())
            c_skip = torch.where(inf, torch.zeros_like(s), 1 / norm)
            return out * c_out.to(x.dtype) + x * c_skip.to(x.dtype)
        s = float(sigma)
        if self.prediction_type == "epsilon":
            return x - s * out
        if math.isinf(s):  # x0 = sqrt(a) x_vp - sqrt(1 - a) v with a = 0
            return -out
        s32 = np.float32(s)
        norm = s32 * s32 + np.float32(1)
        return out * float(-s32 / np.sqrt(norm)) + x / float(norm)

    def _unet_input(self, x_vp: torch.Tensor, c_concat: torch.Tensor | None) -> torch.Tensor:
        if c_concat is None:
            return x_vp
        if c_concat.shape[0] != x_vp.shape[0] or c_concat.shape[2:] != x_vp.shape[2:]:
            raise ValueError(f"c_concat {tuple(c_concat.shape)} must be (B, C, h, w) matching the latents "
                             f"{tuple(x_vp.shape)} (9-channel inpainting: mask (1) + masked-image latents (4))")
        # diffusers' inpaint pipeline: cat([scaled latents, mask, masked_image_latents], dim=1)
        return torch.cat([x_vp, c_concat.to(x_vp.dtype)], dim=1)  # (B, 4 + 5, h, w)

    def __call__(self, x: torch.Tensor, sigma, context=None, c_concat: torch.Tensor | None = None) -> torch.Tensor:
        x_vp = self.scale_input(x, sigma)
        out = self.unet(self._unet_input(x_vp, c_concat), self._timesteps(sigma, x.shape[0], x.device), context)
        return self.to_denoised(x, sigma, out)


class CFGDenoiser(Denoiser):
    """Classifier-free guidance: out = uncond + s * (cond - uncond) on the UNet output (eps or v), as diffusers does.

    Items with guidance scale <= 1 skip the unconditional pass (diffusers' do_classifier_free_guidance is
    guidance_scale > 1) and use the conditional output alone. The others' unconditional inputs go first in the
    same UNet batch: [uncond (k items), cond (B items)], diffusers' torch.cat([negative, positive]) order.
    guidance_rescale (float or (B,)) is applied to the guided prediction as diffusers' rescale_noise_cfg.
    """

    def __call__(self, x: torch.Tensor, sigma, context=None, uncond_context=None, guidance_scale=7.5,
                 guidance_rescale=0.0, c_concat: torch.Tensor | None = None) -> torch.Tensor:
        b = x.shape[0]
        scale = guidance_scale
        if isinstance(scale, torch.Tensor):
            if scale.shape not in ((b,), ()):
                raise ValueError(f"guidance_scale tensor {tuple(scale.shape)} must be (B,) = ({b},) or a scalar")
            scale = scale.expand(b).to(torch.float32).cpu()
            guided_items = [i for i, g in enumerate(scale.tolist()) if g > 1]
        else:
            guided_items = list(range(b)) if scale > 1 else []
        if not guided_items:
            return super().__call__(x, sigma, context=context, c_concat=c_concat)
        if uncond_context is None:
            raise ValueError("guidance_scale > 1 needs uncond_context (the negative-prompt embeddings)")
        if context is None or uncond_context.shape != context.shape:
            raise ValueError(f"uncond_context {tuple(uncond_context.shape)} must have the shape of context "
                             f"{None if context is None else tuple(context.shape)}")
        every = len(guided_items) == b
        pick = (lambda v: v) if every else (lambda v: v[guided_items])  # the items that need an uncond pass

        x_vp = self._unet_input(self.scale_input(x, sigma), c_concat)  # (B, C_in, h, w)
        t = self._timesteps(sigma, b, x.device)  # (B,)
        out = self.unet(torch.cat([pick(x_vp), x_vp]), torch.cat([pick(t), t]),
                        torch.cat([pick(uncond_context), context]))  # (k + B, 4, h, w)
        out = out.to(x.dtype)
        k = len(guided_items)
        uncond, cond = out[:k], out[k:]  # (k, 4, h, w), (B, 4, h, w)
        s = pick(scale) if isinstance(scale, torch.Tensor) else scale
        cond_k = pick(cond)
        guided = uncond + _column(s, uncond) * (cond_k - uncond)
        rescale = guidance_rescale
        if isinstance(rescale, torch.Tensor):
            rescale = pick(rescale.expand(b))
            if bool((rescale > 0).any()):
                guided = rescale_noise_cfg(guided, cond_k, rescale)
        elif rescale > 0:
            guided = rescale_noise_cfg(guided, cond_k, rescale)
        if not every:
            merged = cond.clone()
            merged[guided_items] = guided
            guided = merged
        return self.to_denoised(x, sigma, guided)
