"""Latents in and out of a sampler: per-item noise from per-item generators (so seed s gives the same image alone or
in any batch), the start point of txt2img and img2img, the latents handed to the VAE, and 4-channel inpainting's
blend of the known region; all in the VE parametrization of samplers.py (x = x0 + sigma * eps)."""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from backdrop.diffusion.schedule import Schedule

__all__ = ["host_to_device", "per_item_randn", "default_noise_sampler", "initial_latents", "noised_latents",
           "output_latents", "blend_known_region", "known_region"]


# --------------------------------------------------------------------------------------------------- noise

def host_to_device(x: torch.Tensor, device: torch.device | str | None) -> torch.Tensor:
    """A host tensor (noise from a CPU generator, a mask made on the host) on `device`, without waiting for the GPU.
    torch follows a blocking host->CUDA copy with a stream synchronize, which drains every queued kernel first; a
    copy from pinned memory with non_blocking=True is ordered on the stream instead (the pinned block is not reused
    before the copy is done). Elsewhere a plain .to(device)."""
    device = torch.device(device) if device is not None else x.device
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def per_item_randn(shape: Sequence[int], generators: Sequence[torch.Generator] | torch.Generator,
                   device=None, dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise of `shape`, item i drawn from generators[i] (diffusers' randn_tensor with a list of
    generators: each item (1, ...) on its generator's device, then moved to `device`). One generator draws the
    whole batch at once, as diffusers does with a single generator."""
    if isinstance(generators, torch.Generator):
        return host_to_device(torch.randn(tuple(shape), generator=generators, device=generators.device,
                                          dtype=dtype), device)
    if len(generators) != shape[0]:
        raise ValueError(f"{len(generators)} generators for a batch of {shape[0]}: pass one per item")
    item = (1, *shape[1:])
    return host_to_device(torch.cat([torch.randn(item, generator=g, device=g.device, dtype=dtype)
                                     for g in generators]), device)


def default_noise_sampler(x: torch.Tensor, generators: Sequence[torch.Generator] | torch.Generator) -> Callable:
    """noise_sampler(sigma, sigma_next) drawing noise shaped like x from per-item generators."""
    def noise_sampler(sigma, sigma_next):
        return per_item_randn(x.shape, generators, device=x.device, dtype=x.dtype)
    return noise_sampler


# --------------------------------------------------------------------------------------------------- latents in/out

def initial_latents(noise: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """txt2img start: the VE x diffusers starts from, given unit noise (its `latents * init_noise_sigma`).

    DDIM/DDPM/DPM start from VP latents = noise (x = noise * sqrt(1 + sigma0²)); Euler/Heun from
    noise * sigma_max, or noise * sqrt(sigma_max² + 1) with leading spacing. At sigma0 = inf the state is the VP
    latents themselves (see Denoiser)."""
    if math.isinf(float(schedule.sigmas[0])):
        return noise.clone()
    return noise * schedule.init_noise_sigma


def noised_latents(x0: torch.Tensor, noise: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """img2img start: x0 + noise * sigmas[0] (diffusers' scheduler.add_noise at the sub-schedule's first timestep;
    the VP form sqrt(a) x0 + sqrt(1 - a) noise of DDIM/DDPM/DPM is the same point). x0: unscaled-by-sigma latents,
    i.e. vae posterior mean * scaling_factor."""
    s = float(schedule.sigmas[0])
    if math.isinf(s):
        return noise.clone()
    return x0 + noise * s


def output_latents(x: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """The latents diffusers hands to the VAE (before / scaling_factor): x_vp at the final level. That is x itself
    for samplers ending at sigma 0; DDIM with set_alpha_to_one=False ends at sigma(alphas_cumprod[0]) and
    diffusers decodes those (slightly noisy) VP latents, not x0. Euler's schedulers hold VE latents, which they hand
    over as they are at a final level above 0 (a custom sigmas= list may end there)."""
    s = float(schedule.sigmas[-1])
    return x if s == 0 or schedule.ve else x / math.sqrt(1 + s * s)


def known_region(x0: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor) -> Callable:
    """blend(x, sigma): x where mask = 1 (repaint), the known latents x0 noised to level sigma with the initial
    `noise` elsewhere (VE: x0 + sigma * noise). mask: (B, 1, h, w) at latent size, 1 = repaint. Heun and PNDM call
    it at their intermediate point too (before the extra model call), as diffusers blends after every scheduler
    step call, those included."""
    def blend(x, sigma):
        return (1 - mask) * (x0 + noise * sigma) + mask * x
    return blend


def blend_known_region(x0: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor, schedule: Schedule) -> Callable:
    """Callback for 4-channel-UNet inpainting, as diffusers' StableDiffusionInpaintPipeline: after each step keep
    x where mask = 1 (repaint) and put back the known latents x0 noised to the new level with the initial `noise`
    (clean x0 after the last step). mask: (B, 1, h, w) at latent size, 1 = repaint."""
    n, blend = schedule.num_steps, known_region(x0, noise, mask)

    def callback(i, x, sigma, sigma_next, denoised):
        if i == n - 1:  # x0 at the final level (sigma 0 except DDIM's sigma(alphas_cumprod[0]), or a custom
            # sigmas= list's last): as the VE latents of the VP x0 diffusers puts back, or x0 itself for Euler's
            return (1 - mask) * x0 * (1 if schedule.ve else math.sqrt(1 + sigma_next**2)) + mask * x
        return blend(x, sigma_next)
    return callback
