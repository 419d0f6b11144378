"""The sampler names and, for each, the diffusers scheduler class whose steps it reproduces (diffusion/schedule.py
builds them). Plain data without torch, so that the command line lists the samplers without importing it."""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Recipe", "RECIPES", "LCM_ORIGINAL_STEPS", "SAMPLING_DEFAULTS"]


@dataclass(frozen=True)
class Recipe:
    """How one diffusers scheduler class lays out its inference steps."""
    scheduler: str            # the diffusers class reproduced (tests compare against it)
    spacing: str              # that class's default timestep_spacing in diffusers 0.42
    order: int                # its `order`: img2img's get_timesteps slices timesteps[t_start * order:]
    family: str               # "ddim" (DDIM, PNDM) | "ddpm" | "k" (Euler/Heun: fractional timesteps) | "dpm" | "lcm"
    karras: bool = False      # use_karras_sigmas (rho = 7)
    zero_snr: bool = True     # whether the class supports rescale_betas_zero_snr
    clip_sample: bool = False  # whether the class has a clip_sample option (which we refuse: see build_schedule)


RECIPES: dict[str, Recipe] = {
    "ddim": Recipe("DDIMScheduler", "leading", 1, "ddim", clip_sample=True),
    "ddpm": Recipe("DDPMScheduler", "leading", 1, "ddpm", clip_sample=True),
    "euler": Recipe("EulerDiscreteScheduler", "linspace", 1, "k"),
    "euler-a": Recipe("EulerAncestralDiscreteScheduler", "linspace", 1, "k"),
    "heun": Recipe("HeunDiscreteScheduler", "linspace", 2, "k", zero_snr=False, clip_sample=True),
    "dpmpp-2m": Recipe("DPMSolverMultistepScheduler", "linspace", 1, "dpm"),
    "dpmpp-2m-karras": Recipe("DPMSolverMultistepScheduler", "linspace", 1, "dpm", karras=True),
    "dpmpp-2m-sde": Recipe("DPMSolverMultistepScheduler", "linspace", 1, "dpm"),
    "dpmpp-2m-sde-karras": Recipe("DPMSolverMultistepScheduler", "linspace", 1, "dpm", karras=True),
    "unipc": Recipe("UniPCMultistepScheduler", "linspace", 1, "dpm"),
    "unipc-karras": Recipe("UniPCMultistepScheduler", "linspace", 1, "dpm", karras=True),
    "lcm": Recipe("LCMScheduler", "leading", 1, "lcm", clip_sample=True),  # ignores timestep_spacing
    # skip_prk_steps=True, as SD's own scheduler_config.json; the scheduler's list repeats its second timestep (the
    # first step's second model call), our Schedule lists it once: the pndm sampler makes that call itself
    "pndm": Recipe("PNDMScheduler", "leading", 1, "ddim", zero_snr=False),
}
# LCMScheduler's original_inference_steps: consistency distillation (Luo et al. 2023) trains on 50 evenly spaced
# timesteps, 19, 39, ..., 999; LCM sampling takes its steps from among them, so it runs at most 50.
LCM_ORIGINAL_STEPS = 50

# The Pipeline's defaults (its signatures spell them out; a test holds them equal), which `backdrop generate /
# img2img / inpaint` and `backdrop serve` take from here without importing torch to build their help.
SAMPLING_DEFAULTS = {"steps": 30, "guidance_scale": 7.5, "sampler": "dpmpp-2m"}
