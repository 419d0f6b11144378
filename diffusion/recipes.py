"""The sampler names and, for each, the diffusers scheduler class whose steps it reproduces (diffusion/schedule.py
builds them). Plain data without torch, so that the command line lists the samplers without importing it."""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Recipe", "RECIPES", "LCM_ORIGINAL_STEPS", "NAMED_SCHEDULES", "SAMPLING_DEFAULTS"]


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
    custom: tuple[str, ...] = ()  # which custom schedules its set_timesteps takes under SD's config: "timesteps",
    # "sigmas" (build_schedule's timesteps= / sigmas=; Karras variants take none, UniPC's sigmas are flow models')


RECIPES: dict[str, Recipe] = {
    "ddim": Recipe("DDIMScheduler", "leading", 1, "ddim", clip_sample=True),
    "ddpm": Recipe("DDPMScheduler", "leading", 1, "ddpm", clip_sample=True, custom=("timesteps",)),
    "euler": Recipe("EulerDiscreteScheduler", "linspace", 1, "k", custom=("timesteps", "sigmas")),
    "euler-a": Recipe("EulerAncestralDiscreteScheduler", "linspace", 1, "k"),
    "heun": Recipe("HeunDiscreteScheduler", "linspace", 2, "k", zero_snr=False, clip_sample=True,
                   custom=("timesteps",)),
    "dpmpp-2m": Recipe("DPMSolverMultistepScheduler", "linspace", 1, "dpm", custom=("timesteps",)),
    "dpmpp-2m-karras": Recipe("DPMSolverMultistepScheduler", "linspace", 1, "dpm", karras=True),
    "dpmpp-2m-sde": Recipe("DPMSolverMultistepScheduler", "linspace", 1, "dpm", custom=("timesteps",)),
    "dpmpp-2m-sde-karras": Recipe("DPMSolverMultistepScheduler", "linspace", 1, "dpm", karras=True),
    "unipc": Recipe("UniPCMultistepScheduler", "linspace", 1, "dpm"),
    "unipc-karras": Recipe("UniPCMultistepScheduler", "linspace", 1, "dpm", karras=True),
    "lcm": Recipe("LCMScheduler", "leading", 1, "lcm", clip_sample=True, custom=("timesteps",)),  # ignores spacing
    # skip_prk_steps=True, as SD's own scheduler_config.json; the scheduler's list repeats its second timestep (the
    # first step's second model call), our Schedule lists it once: the pndm sampler makes that call itself
    "pndm": Recipe("PNDMScheduler", "leading", 1, "ddim", zero_snr=False),
}
# LCMScheduler's original_inference_steps: consistency distillation (Luo et al. 2023) trains on 50 evenly spaced
# timesteps, 19, 39, ..., 999; LCM sampling takes its steps from among them, so it runs at most 50.
LCM_ORIGINAL_STEPS = 50

# Named custom schedules (timesteps= / sigmas= by name, and the CLI's --timesteps / --sigmas): Align Your Steps
# (Sabour et al. 2024, arXiv:2404.14507), 10 steps optimised for SD1.5, as diffusers' AysSchedules lists them.
NAMED_SCHEDULES = {"timesteps": {"ays": (999, 850, 736, 645, 545, 455, 343, 233, 124, 24)},
                   "sigmas": {"ays": (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.0)}}

# The Pipeline's defaults (its signatures spell them out; a test holds them equal), which `backdrop generate /
# img2img / inpaint` and `backdrop serve` take from here without importing torch to build their help.
SAMPLING_DEFAULTS = {"steps": 30, "guidance_scale": 7.5, "sampler": "dpmpp-2m"}
