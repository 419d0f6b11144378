"""Noise schedules: training betas -> alphas_cumprod -> the sigmas a sampler walks and the UNet timestep at each.

We sample in the variance-exploding (VE) parametrization of k-diffusion (Karras et al. 2022, "Elucidating the
Design Space", arXiv:2206.00364): x = x0 + sigma * eps, with sigma = sqrt((1 - a) / a) for a = alphas_cumprod[t].
SD's UNet sees the variance-preserving latents x_vp = x / sqrt(1 + sigma²) = sqrt(a) x0 + sqrt(1 - a) eps.

Each sampler name has a `Recipe`: the diffusers scheduler class whose `set_timesteps` we reproduce (diffusers 0.42,
checked against the installed source), its default `timestep_spacing` (used when SchedulerConfig.timestep_spacing is
None) and its `order`. `build_schedule` gives the exact float32 sigmas and timesteps that class would use, so a
sampler over our `Schedule` feeds the UNet the same inputs as diffusers' scheduler loop (tests/test_samplers.py).
Timestep arithmetic is numpy and beta arithmetic torch float32, exactly as diffusers does it, so results match
bit for bit rather than to a tolerance.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from backdrop.diffusion.recipes import LCM_ORIGINAL_STEPS, NAMED_SCHEDULES, RECIPES, Recipe
from backdrop.nn.config import SchedulerConfig

__all__ = ["Recipe", "RECIPES", "LCM_ORIGINAL_STEPS", "Schedule", "build_schedule", "custom_schedule", "betas",
           "alphas_cumprod", "rescale_zero_terminal_snr", "karras_sigmas", "sigma_to_t"]

# diffusers' EulerDiscrete/EulerAncestral/DPMSolverMultistep/UniPC schedulers replace a zero terminal alphas_cumprod
# by 2**-24 (sigma_max ~ 4096) so that the VE sigma stays finite; DDIM, DDPM and LCM keep the exact 0 (sigma = inf).
ZERO_SNR_PATCH = 2.0**-24


# ---------------------------------------------------------------------------------------------- training schedule

def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023 ("Common Diffusion Noise Schedules and Sample Steps are Flawed", arXiv:2305.08891),
    Algorithm 1: shift and scale sqrt(alphas_cumprod) so the last one is exactly 0 and the first is unchanged."""
    abar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar_sqrt = (abar_sqrt - last) * (first / (first - last))
    abar = abar_sqrt**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])  # undo the cumprod
    return 1.0 - alphas


def _cosine_betas(n: int, max_beta: float = 0.999) -> torch.Tensor:
    """squaredcos_cap_v2: Nichol & Dhariwal 2021 (arXiv:2102.09672) eq. 17, alpha_bar(t) = cos²((t + s)/(1 + s) π/2)
    with s = 0.008, betas capped at 0.999 (their §3.2). Python floats, then float32, as diffusers does."""
    def abar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return torch.tensor([min(1 - abar((i + 1) / n) / abar(i / n), max_beta) for i in range(n)], dtype=torch.float32)


def betas(config: SchedulerConfig) -> torch.Tensor:
    """The training betas (T,) float32, zero-SNR rescaled if the config says so."""
    n = config.num_train_timesteps
    if config.beta_schedule == "scaled_linear":  # SD: linear in sqrt(beta), then squared (LDM's "linear")
        b = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, n, dtype=torch.float32) ** 2
    elif config.beta_schedule == "linear":  # DDPM (Ho et al. 2020)
        b = torch.linspace(config.beta_start, config.beta_end, n, dtype=torch.float32)
    elif config.beta_schedule == "squaredcos_cap_v2":
        b = _cosine_betas(n)
    else:  # SchedulerConfig validates, but a hand-built object could still get here
        raise ValueError(f"SchedulerConfig.beta_schedule {config.beta_schedule!r} is not supported")
    return rescale_zero_terminal_snr(b) if config.rescale_betas_zero_snr else b


def alphas_cumprod(config: SchedulerConfig, *, patch_zero_snr: bool = False) -> torch.Tensor:
    """(T,) float32. `patch_zero_snr` replaces an exact terminal 0 by 2**-24 as diffusers' Euler/DPM schedulers do."""
    ac = torch.cumprod(1.0 - betas(config), dim=0)
    if patch_zero_snr and config.rescale_betas_zero_snr:
        ac[-1] = ZERO_SNR_PATCH
    return ac


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 eq. 5: n sigmas evenly spaced in sigma^(1/rho), from sigma_max down to sigma_min."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """The (fractional) training timestep of each sigma: linear interpolation in log(sigma) between the two
    neighbouring training sigmas, clipped to [0, T-1] (diffusers' `_sigma_to_t`, which k-diffusion also uses)."""
    sigma = np.asarray(sigma)
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]  # (T, n)
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)  # (n,)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return ((1 - w) * low + w * (low + 1)).reshape(sigma.shape)


# ---------------------------------------------------------------------------------------------- inference schedule

@dataclass(frozen=True, eq=False)
class Schedule:
    """What one sampler walks for one request: N steps over N+1 sigmas (float32, CPU, descending).

    Step i calls the model at sigmas[i] with the UNet timestep timesteps[i] and lands on sigmas_to[i]. sigmas_to is
    sigmas[1:] for every sampler but DDIM and PNDM (family "ddim"), whose diffusers step lands on t - T // N whatever
    the spacing (with linspace or trailing spacing that can differ from the next step's timestep; the DDIM sampler then
    keeps the VP latents and re-reads them at the next sigma, as diffusers does). sigmas[N] is the level the final
    latents sit at: 0, or sigma(alphas_cumprod[0]) ~ 0.029 for DDIM with set_alpha_to_one=False.

    sigmas[0] may be inf (DDIM/DDPM with zero terminal SNR); the state at sigma = inf is held as VP latents (see
    latents.initial_latents). `init_noise_sigma` is the VE scale diffusers' txt2img gives unit noise.
    """
    sampler: str
    sigmas: torch.Tensor           # (N+1,) float32
    timesteps: torch.Tensor        # (N,) float32, integral except Euler/Heun with linspace spacing or Karras sigmas
    sigmas_to: torch.Tensor        # (N,) float32
    init_noise_sigma: float        # txt2img: x = noise * init_noise_sigma (VE)
    alphas_cumprod: torch.Tensor   # (T,) float32 the timestep fallback interpolates over (patched as the class does)
    order: int                     # diffusers' scheduler.order (Heun: 2)
    stride: int                    # T // N: how far diffusers' DDIM and PNDM steps go back (t -> t - stride)
    start: int = 0                 # index of sigmas[0] in the full schedule (img2img sub-schedules start later)

    def __post_init__(self):
        n = self.timesteps.shape[0]
        if self.sigmas.shape != (n + 1,) or self.sigmas_to.shape != (n,):
            raise ValueError(f"Schedule: sigmas {tuple(self.sigmas.shape)}, sigmas_to {tuple(self.sigmas_to.shape)}"
                             f" and timesteps {tuple(self.timesteps.shape)} must be (N+1,), (N,), (N,)")

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]

    @property
    def ve(self) -> bool:
        """Whether diffusers' scheduler holds VE latents (Euler's and Heun's) rather than VP ones: what its final
        latents and an inpainting blend's x0 are when the last level is above 0."""
        return RECIPES[self.sampler].family == "k"

    @cached_property
    def _pairs(self) -> dict[float, float]:
        return dict(zip(self.sigmas[:-1].tolist(), self.timesteps.tolist()))

    @cached_property
    def _log_sigmas(self) -> np.ndarray:
        return np.log(((1 - self.alphas_cumprod) / self.alphas_cumprod).numpy() ** 0.5)

    def sigma_at(self, t: int) -> float:
        """The sigma of integral training timestep t, float32 as build_schedule computes them."""
        a = self.alphas_cumprod[t]
        return float(((1 - a) / a) ** 0.5)

    def timestep(self, sigma: float) -> float:
        """The UNet timestep for a sigma: the one diffusers pairs with it when the sigma is one of ours (exact,
        e.g. Karras sigmas have rounded timesteps), else log-sigma interpolation over the training schedule."""
        t = self._pairs.get(float(sigma))
        return t if t is not None else float(sigma_to_t(np.float64(sigma), self._log_sigmas))

    def img2img(self, strength: float) -> "Schedule":
        """The tail diffusers' StableDiffusionImg2ImgPipeline.get_timesteps runs for `strength` in [0, 1]:
        int(N * strength) steps (the scheduler's own list is sliced at t_start * order; in ours, with one entry per
        step, that is index t_start whatever the order)."""
        if self.start != 0:
            raise ValueError("Schedule.img2img: already a sub-schedule; call it on the full schedule")
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        n = self.num_steps
        t_start = max(n - min(int(n * strength), n), 0)
        if n - t_start < 1:
            raise ValueError(f"strength {strength} with {n} steps leaves no step to run "
                             f"(int({n} * {strength}) = 0); raise the strength or the step count")
        return Schedule(self.sampler, self.sigmas[t_start:], self.timesteps[t_start:], self.sigmas_to[t_start:],
                        self.init_noise_sigma, self.alphas_cumprod, self.order, self.stride, start=t_start)


def _spaced(spacing: str, n: int, cfg: SchedulerConfig, family: str) -> np.ndarray:
    """The timesteps of `set_timesteps(n)` in diffusers' DDIM/PNDM/DDPM ("ddim"/"ddpm"), Euler/Heun ("k"),
    DPMSolverMultistep ("dpm") and LCM ("lcm") schedulers. Table 2 of Lin et al. 2023 compares the three spacings."""
    big_t = cfg.num_train_timesteps
    if family == "lcm":  # n of the distillation's timesteps, evenly spaced by index (spacing does not apply)
        origin = (np.arange(1, LCM_ORIGINAL_STEPS + 1) * (big_t // LCM_ORIGINAL_STEPS) - 1)[::-1]
        return origin[np.floor(np.linspace(0, LCM_ORIGINAL_STEPS, n, endpoint=False)).astype(np.int64)]
    if family == "dpm":  # DPMSolverMultistep and UniPC lay out n + 1 points and drop the last
        # (DPM's lambda_min_clipped = -inf: last_timestep = T)
        if spacing == "linspace":
            return np.linspace(0, big_t - 1, n + 1).round()[::-1][:-1].astype(np.int64)
        if spacing == "leading":
            ratio = big_t // (n + 1)
            return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + cfg.steps_offset
        return np.arange(big_t, 0, -big_t / n).round().astype(np.int64) - 1
    if spacing == "linspace":
        if family == "k":  # not rounded: Euler/Heun interpolate sigmas at fractional timesteps
            return np.linspace(0, big_t - 1, n, dtype=np.float32)[::-1].copy()
        return np.linspace(0, big_t - 1, n).round()[::-1].astype(np.int64)
    if spacing == "leading":
        ratio = big_t // n
        return (np.arange(0, n) * ratio).round()[::-1].astype(np.int64) + cfg.steps_offset
    return np.round(np.arange(big_t, 0, -big_t / n)).astype(np.int64) - 1  # trailing


def custom_schedule(sampler: str, timesteps=None, sigmas=None, num_train_timesteps: int = 1000):
    """diffusers' timesteps= / sigmas= checked for `sampler`: (timesteps int64 or None, sigmas float32 or None).
    Either may be a name in NAMED_SCHEDULES ("ays"). Timesteps are ints in [0, T), sigmas numbers >= 0 (the last
    one the final level: 0 for a clean image), each list strictly descending; only the samplers whose diffusers
    class takes such a list (Recipe.custom) accept one."""
    if timesteps is not None and sigmas is not None:
        raise ValueError("give timesteps= or sigmas=, not both")
    kind, given = ("timesteps", timesteps) if timesteps is not None else ("sigmas", sigmas)
    if given is None:
        return None, None
    able = [n for n, r in RECIPES.items() if kind in r.custom]
    if kind not in RECIPES[sampler].custom:
        why = "refuses them with Karras sigmas" if RECIPES[sampler].karras else "takes none with SD's config"
        raise ValueError(f"{sampler} takes no custom {kind}= (diffusers' {RECIPES[sampler].scheduler} {why}); "
                         f"samplers that do: {', '.join(able)}")
    if isinstance(given, str):
        if given not in NAMED_SCHEDULES[kind]:
            raise ValueError(f"{kind}={given!r}: not a named schedule; give a list, or one of "
                             f"{', '.join(NAMED_SCHEDULES[kind])}")
        given = NAMED_SCHEDULES[kind][given]
    values = given.tolist() if hasattr(given, "tolist") else given
    if not isinstance(values, (list, tuple)) or len(values) < (1 if kind == "timesteps" else 2):
        want = "a list of at least one timestep" if kind == "timesteps" else "a list of at least two sigmas"
        raise ValueError(f"{kind}= must be {want} (descending), got {given!r}")
    if kind == "timesteps":
        bad = [v for v in values if not isinstance(v, numbers.Integral) or isinstance(v, bool)
               or not 0 <= v < num_train_timesteps]
        want = f"ints in [0, num_train_timesteps={num_train_timesteps})"
    else:
        bad = [v for v in values if not isinstance(v, numbers.Real) or isinstance(v, bool) or not math.isfinite(v)
               or v < 0]
        want = "finite numbers >= 0"
    if bad:
        raise ValueError(f"{kind}= must be {want}; {bad[0]!r} is not")
    if any(b >= a for a, b in zip(values, values[1:])):
        raise ValueError(f"{kind}= must be strictly descending, got {list(values)}")
    if kind == "timesteps":
        return np.asarray(values, dtype=np.int64), None
    return None, np.asarray(values, dtype=np.float64).astype(np.float32)


def build_schedule(sampler: str, steps: int | None, config: SchedulerConfig | None = None, *, timesteps=None,
                   sigmas=None) -> Schedule:
    """The Schedule diffusers' scheduler for `sampler` (see RECIPES) would run for `steps` under `config`, or over
    the custom `timesteps` / `sigmas` (see custom_schedule; `steps` is then ignored, as in diffusers)."""
    cfg = config or SchedulerConfig()
    if sampler not in RECIPES:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of: {', '.join(RECIPES)}")
    r = RECIPES[sampler]
    big_t = cfg.num_train_timesteps
    custom_ts, custom_sig = custom_schedule(sampler, timesteps, sigmas, big_t)
    if custom_ts is not None or custom_sig is not None:
        steps = len(custom_ts) if custom_ts is not None else len(custom_sig) - 1
    if not isinstance(steps, int) or not 1 <= steps <= big_t:
        raise ValueError(f"steps must be an int in [1, num_train_timesteps={big_t}], got {steps!r}")
    if cfg.rescale_betas_zero_snr and not r.zero_snr:
        able = ", ".join(n for n, o in RECIPES.items() if o.zero_snr)
        raise ValueError(f"SchedulerConfig.rescale_betas_zero_snr: diffusers' {r.scheduler} ({sampler!r}) does not "
                         f"support zero terminal SNR; use one of {able}")
    if cfg.clip_sample and r.clip_sample:
        raise ValueError(f"SchedulerConfig.clip_sample=True is not supported ({sampler!r}): latent diffusion does "
                         "not clip x0 to [-1, 1]; set clip_sample to false")
    if r.family == "lcm" and steps > LCM_ORIGINAL_STEPS and custom_ts is None:  # a list: diffusers only warns
        raise ValueError(f"lcm takes its steps from the {LCM_ORIGINAL_STEPS} timesteps of consistency distillation, "
                         f"so at most {LCM_ORIGINAL_STEPS}, got {steps} (LCM-LoRAs are made for 2 to 8)")
    spacing = cfg.timestep_spacing or r.spacing
    if r.family == "ddim" and spacing == "leading" and (steps - 1) * (big_t // steps) + cfg.steps_offset >= big_t:
        raise ValueError(f"{sampler} with leading spacing, steps_offset {cfg.steps_offset} and {steps} steps would use "
                         f"timestep >= num_train_timesteps {big_t}; use fewer steps")

    ac = alphas_cumprod(cfg, patch_zero_snr=r.family in ("k", "dpm"))
    train_sigmas = (((1 - ac) / ac) ** 0.5).numpy()  # (T,) float32, ascending in t; inf at a zero terminal SNR
    # len(ts) may exceed steps by one: trailing spacing with a step count that does not divide T (as diffusers)
    ts = _spaced(spacing, steps, cfg, r.family) if custom_ts is None else custom_ts
    if r.family in ("ddpm", "lcm") and int(np.max(ts)) >= big_t:  # leading spacing, steps_offset, N = T
        raise ValueError(f"{sampler} with {spacing} spacing and {steps} steps would use timestep {int(np.max(ts))} >= "
                         f"num_train_timesteps {big_t}; use fewer steps")

    if r.family in ("ddim", "ddpm", "lcm"):
        sig = train_sigmas[ts].astype(np.float64)
        if r.family == "ddim":  # DDIM's and PNDM's step: prev_timestep = t - T // N; below 0 -> final_alpha_cumprod
            to_one = sampler == "ddim" if cfg.set_alpha_to_one is None else cfg.set_alpha_to_one  # diffusers' defaults
            final = 0.0 if to_one else float(train_sigmas[0])
            prev = ts - big_t // steps
            to = np.where(prev >= 0, train_sigmas[np.maximum(prev, 0)], final)
            sig = np.append(sig, to[-1])
        else:  # DDPM's previous_timestep: the next timestep in the list, then alpha_prod = 1 (sigma 0); LCM's
            # last step returns its estimate of x0 (sigma 0)
            sig = np.append(sig, 0.0)
            to = sig[1:]
        init = float(np.sqrt(1.0 + sig[0] ** 2))  # diffusers starts from unit-variance VP latents
    else:
        if r.karras:  # DPMSolverMultistep, UniPC: Karras over the whole training range, timesteps rounded
            sig = karras_sigmas(float(train_sigmas[0]), float(train_sigmas[-1]), steps)
            ts = sigma_to_t(sig, np.log(train_sigmas))
            if cfg.beta_schedule != "squaredcos_cap_v2" or r.scheduler != "DPMSolverMultistepScheduler":
                ts = ts.round()  # DPM leaves cosine's fractional ones unrounded, and int64 truncates them
            ts = ts.astype(np.int64)
        elif custom_sig is not None:  # Euler's sigmas=: taken as given, the last one included
            ts = sigma_to_t(custom_sig[:-1], np.log(train_sigmas))
        else:
            sig = np.interp(ts, np.arange(0, big_t), train_sigmas)
        sig = custom_sig if custom_sig is not None else np.concatenate([sig, [0.0]]).astype(np.float32)
        to = sig[1:]
        s_max = torch.from_numpy(sig).max()
        if r.family == "dpm":
            init = float(np.sqrt(1.0 + np.float64(sig[0]) ** 2))  # init_noise_sigma = 1 in VP
        elif spacing in ("linspace", "trailing"):  # Euler/Heun's init_noise_sigma: sigma_max ...
            init = float(s_max)
        else:  # ... or, with leading spacing, sqrt(sigma_max² + 1) (diffusers' choice, float32 as there)
            init = float((s_max**2 + 1) ** 0.5)
    levels = np.asarray(sig, dtype=np.float32)
    if r.family == "dpm" and (np.diff(levels[levels > 0]) >= 0).any():  # the multistep solvers divide by the
        # log-sigma step, 0 where linspace spacing at N = T rounds two timesteps to one
        raise ValueError(f"{sampler} with {spacing} spacing and {steps} steps lands two steps on one noise level; "
                         "try another number of steps (fewer, or another sampler)")
    return Schedule(
        sampler=sampler,
        sigmas=torch.tensor(levels),
        timesteps=torch.tensor(np.asarray(ts, dtype=np.float32)),
        sigmas_to=torch.tensor(np.asarray(to, dtype=np.float32)),
        init_noise_sigma=init,
        alphas_cumprod=ac,
        order=r.order,
        stride=big_t // steps,
    )
