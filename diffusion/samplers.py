"""Samplers: pure functions `sample_x(model, x, sigmas, ...)` over `denoised = model(x, sigma, **extra_args)`.

k-diffusion style (Crowson, k-diffusion/sampling.py): x lives in the VE parametrization x = x0 + sigma * eps, the
model wrapper (guidance.py) owns prediction type, input scaling and guidance, and each sampler is a short loop.
Every sampler reproduces one diffusers 0.42 scheduler run over the Schedule that schedule.build_schedule makes for
its name (tests/test_samplers.py runs both loops on the same model and noise):

  ddim         DDIMScheduler (eta 0 = deterministic; eta > 0 adds noise)     Song et al. 2020, arXiv:2010.02502
  ddpm         DDPMScheduler (fixed_small variance = ancestral, eta 1)       Ho et al. 2020, arXiv:2006.11239
  euler        EulerDiscreteScheduler                                       Karras et al. 2022, Alg. 2 w/o churn
  euler-a      EulerAncestralDiscreteScheduler
  heun         HeunDiscreteScheduler (Euler on the last step to sigma 0)     Karras et al. 2022, Alg. 1
  dpmpp-2m     DPMSolverMultistepScheduler dpmsolver++, order 2, midpoint    Lu et al. 2022, arXiv:2211.01095
  dpmpp-2m-sde DPMSolverMultistepScheduler sde-dpmsolver++, order 2, midpoint (the SDE variant, eta 1)
  unipc        UniPCMultistepScheduler bh2, order 2, with the UniC corrector  Zhao et al. 2023, arXiv:2302.04867
  ...-karras   the same with use_karras_sigmas (rho 7)
  lcm          LCMScheduler, for LCM-distilled weights (an LCM-LoRA)         Luo et al. 2023, arXiv:2310.04378
  pndm         PNDMScheduler with skip_prk_steps (PLMS; SD's own config)     Liu et al. 2022, arXiv:2202.09778

Randomness only comes from `noise_sampler(sigma, sigma_next) -> tensor like x`; latents.default_noise_sampler(x, gens)
draws each item from its own torch.Generator, as diffusers' randn_tensor does with a list of generators, so seed s
gives the same image alone or in any batch. `callback(i, x, sigma, sigma_next, denoised)` runs after each step and
may return a replacement x (4-channel inpainting blends the known region back; see latents.blend_known_region). Setting
`interrupt` (a threading.Event) stops the loop before the next step by raising SamplingInterrupted.

A pipeline on top, with latents.py for the noise and the latents in and out (tests/test_guidance.py checks this recipe
against diffusers' own pipelines):
    schedule = build_schedule("dpmpp-2m-karras", 25, model_config.scheduler)   # .img2img(strength) for img2img
    model = CFGDenoiser(backend.unet, schedule, model_config.prediction_type)
    noise = per_item_randn((B, 4, h, w), generators, device)                   # first draw from each generator
    x = initial_latents(noise, schedule)                     # img2img: noised_latents(x0 * scaling, noise, schedule)
    x = sample(model, x, schedule, noise_sampler=default_noise_sampler(x, generators),
               extra_args=dict(context=c, uncond_context=uc, guidance_scale=7.5))  # + c_concat for 9-ch inpaint
    image = vae_decode(output_latents(x, schedule) / scaling_factor)
Samplers take one sigma per step for the whole batch; items with different strengths need separate loops.
"""
from __future__ import annotations

import contextvars
import math
import threading
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from backdrop.diffusion.schedule import Schedule

__all__ = [
    "SAMPLERS", "SamplerSpec", "SamplingInterrupted", "sample", "sample_ddim", "sample_ddpm", "sample_euler",
    "sample_euler_ancestral", "sample_heun", "sample_dpmpp_2m", "sample_dpmpp_2m_sde", "sample_unipc", "sample_lcm",
    "sample_pndm",
    "check_eta", "stochastic_samplers",
]


class SamplingInterrupted(Exception):
    """Raised by a sampler when its `interrupt` event is set (or by a callback that wants to stop)."""

    def __init__(self, step: int, message: str | None = None):
        super().__init__(message or f"sampling interrupted before step {step}")
        self.step = step

    def __reduce__(self):  # pickle and copy (a worker pool sends it back so) call __init__(step, message) again
        return type(self), (self.step, str(self))


# --------------------------------------------------------------------------------------------------- shared parts

_BAR: contextvars.ContextVar[dict] = contextvars.ContextVar("bar", default={})  # sample(bar=): this call's


def _progress(n: int, disable: bool | None, interrupt: threading.Event | None):
    """range(n) with a tqdm bar (disable=None: hidden unless on a terminal; sample(bar=) options, e.g. file=)
    that checks `interrupt` before a step."""
    with tqdm(total=n, disable=disable, **{"leave": False, **_BAR.get()}) as bar:
        for i in range(n):
            if interrupt is not None and interrupt.is_set():
                raise SamplingInterrupted(i)
            yield i
            bar.update()


def _after_step(callback, i, x, sigma, sigma_next, denoised):
    if callback is None:
        return x
    new = callback(i, x, sigma, sigma_next, denoised)
    if new is None:
        return x
    if new.shape != x.shape:
        raise ValueError(f"callback returned x of shape {tuple(new.shape)}, expected {tuple(x.shape)}")
    return new


def _need_noise(noise_sampler, name: str):
    if noise_sampler is None:
        raise ValueError(f"{name} draws noise: pass noise_sampler=default_noise_sampler(x, generators)")


def _ancestral_step(sigma: float, sigma_next: float, eta: float, float32: bool = False) -> tuple[float, float]:
    """(sigma_down, sigma_up): step deterministically to sigma_down, then add sigma_up fresh noise, so the marginal
    is sigma_next. eta 1 is the DDPM posterior (Ho et al. eq. 7 in VE form), eta 0 is DDIM; k-diffusion's
    get_ancestral_step, written so sigma = inf (zero terminal SNR) gives the limit (sigma_up = eta * sigma_next).

    float32=True rounds as diffusers' EulerAncestral does (float32 tensors): with zero terminal SNR sigma_max is
    4096, and x + d * (sigma_down - sigma) loses ~1e-3 to float32 cancellation there, which we must reproduce."""
    if sigma_next == 0:
        return 0.0, 0.0
    if float32 and eta == 1.0:
        f, t = np.float32(sigma), np.float32(sigma_next)
        up = np.sqrt(t**2 * (f**2 - t**2) / f**2)
        return float(np.sqrt(t**2 - up**2)), float(up)
    ratio = 0.0 if math.isinf(sigma) else (sigma_next / sigma) ** 2
    up = min(sigma_next, eta * sigma_next * math.sqrt(max(1.0 - ratio, 0.0)))
    return math.sqrt(sigma_next**2 - up**2), up


def _eps(x: torch.Tensor, denoised: torch.Tensor, sigma: float) -> torch.Tensor:
    """The noise direction (x - x0) / sigma; at sigma = inf x holds the VP latents, whose limit it is."""
    return x if math.isinf(sigma) else (x - denoised) / sigma


def _relabel(x: torch.Tensor, sigma_from: float, sigma: float) -> torch.Tensor:
    """The same VP latents read at level `sigma`: diffusers' DDIM and PNDM land on t - T // N, which need not be the
    next step's timestep, and pass the VP sample on unchanged."""
    return x * (math.sqrt(1 + sigma**2) / math.sqrt(1 + sigma_from**2))


# --------------------------------------------------------------------------------------------------- samplers

@torch.no_grad()
def sample_ddim(model, x, sigmas, *, eta=0.0, sigmas_to=None, extra_args=None, callback=None, noise_sampler=None,
                disable=None, interrupt=None):
    """DDIM (eta 0) or its stochastic family. `sigmas_to` (N,) is where each step lands (Schedule.sigmas_to):
    diffusers' DDIM lands on t - T // N, which with linspace/trailing spacing can differ from the next step's
    timestep; the VP latents are then kept and read at the next sigma, exactly as diffusers does."""
    extra_args = extra_args or {}
    sig = sigmas.tolist()
    to = sig[1:] if sigmas_to is None else sigmas_to.tolist()
    if eta > 0:
        _need_noise(noise_sampler, "ddim with eta > 0")
    for i in _progress(len(sig) - 1, disable, interrupt):
        s, s_to, s_next = sig[i], to[i], sig[i + 1]
        denoised = model(x, s, **extra_args)
        down, up = _ancestral_step(s, s_to, eta)
        x = denoised + _eps(x, denoised, s) * down  # Song et al. eq. 12 in VE form
        if up > 0:
            x = x + noise_sampler(s, s_to) * up
        if s_to != s_next:
            x = _relabel(x, s_to, s_next)
        x = _after_step(callback, i, x, s, s_next, denoised)
    return x


@torch.no_grad()
def sample_ddpm(model, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, disable=None,
                interrupt=None):
    """DDPM ancestral sampling with the fixed_small posterior variance (diffusers' DDPMScheduler default)."""
    _need_noise(noise_sampler, "ddpm")
    return sample_ddim(model, x, sigmas, eta=1.0, extra_args=extra_args, callback=callback,
                       noise_sampler=noise_sampler, disable=disable, interrupt=interrupt)


@torch.no_grad()
def sample_euler(model, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, disable=None,
                 interrupt=None):
    """Euler's method on the probability-flow ODE dx/dsigma = (x - denoised) / sigma (Karras et al. eq. 3)."""
    extra_args = extra_args or {}
    sig = sigmas.tolist()
    for i in _progress(len(sig) - 1, disable, interrupt):
        s, s_next = sig[i], sig[i + 1]
        denoised = model(x, s, **extra_args)
        d = (x - denoised) / s
        x = x + d * (s_next - s)
        x = _after_step(callback, i, x, s, s_next, denoised)
    return x


@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, *, eta=1.0, extra_args=None, callback=None, noise_sampler=None,
                           disable=None, interrupt=None):
    """Euler step to sigma_down, then noise up to sigma_next (diffusers' EulerAncestral is eta = 1)."""
    extra_args = extra_args or {}
    _need_noise(noise_sampler, "euler-a")
    sig = sigmas.tolist()
    for i in _progress(len(sig) - 1, disable, interrupt):
        s, s_next = sig[i], sig[i + 1]
        denoised = model(x, s, **extra_args)
        down, up = _ancestral_step(s, s_next, eta, float32=True)
        d = (x - denoised) / s
        x = x + d * float(np.float32(down) - np.float32(s))
        if up > 0:
            x = x + noise_sampler(s, s_next) * up
        x = _after_step(callback, i, x, s, s_next, denoised)
    return x


@torch.no_grad()
def sample_heun(model, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, disable=None,
                interrupt=None, blend=None):
    """Heun's 2nd-order method (Karras et al. Algorithm 1, no churn); the last step to sigma 0 is Euler.
    2N - 1 model calls; the corrector's call uses sigma_next's own timestep, on the predictor's point passed
    through `blend(x, sigma)` if given (4-channel inpainting's known region, see sample())."""
    extra_args = extra_args or {}
    sig = sigmas.tolist()
    for i in _progress(len(sig) - 1, disable, interrupt):
        s, s_next = sig[i], sig[i + 1]
        denoised = model(x, s, **extra_args)
        d = (x - denoised) / s
        dt = s_next - s
        if s_next == 0:
            x_new = x + d * dt
        else:
            x_2 = x + d * dt
            if blend is not None:
                x_2 = blend(x_2, s_next)
            d_2 = (x_2 - model(x_2, s_next, **extra_args)) / s_next
            x_new = x + (d + d_2) / 2 * dt
        x = _after_step(callback, i, x_new, s, s_next, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, disable=None,
                    interrupt=None):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) in VE form, lambda = -log(sigma): first order on the first step
    and on the last (to sigma 0, where it returns x0), as diffusers' lower_order_final."""
    extra_args = extra_args or {}
    sig = sigmas.tolist()
    old, h_last = None, None
    for i in _progress(len(sig) - 1, disable, interrupt):
        s, s_next = sig[i], sig[i + 1]
        denoised = model(x, s, **extra_args)
        h = None
        if s_next == 0:
            x_new = denoised
        else:
            h = math.log(s) - math.log(s_next)
            d = denoised if old is None else denoised + (0.5 * h / h_last) * (denoised - old)  # D0 + D1 / 2
            x_new = (s_next / s) * x - math.expm1(-h) * d
        old, h_last = denoised, h
        x = _after_step(callback, i, x_new, s, s_next, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(model, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, disable=None,
                        interrupt=None):
    """DPM-Solver++(2M) SDE, midpoint (diffusers' sde-dpmsolver++; k-diffusion's dpmpp_2m_sde with eta 1):
    x' = (s'/s)² x + (1 - e^-2h)(D0 + D1 / 2) + s' sqrt(1 - e^-2h) z."""
    extra_args = extra_args or {}
    _need_noise(noise_sampler, "dpmpp-2m-sde")
    sig = sigmas.tolist()
    old, h_last = None, None
    for i in _progress(len(sig) - 1, disable, interrupt):
        s, s_next = sig[i], sig[i + 1]
        denoised = model(x, s, **extra_args)
        h = None
        if s_next == 0:
            x_new = denoised
        else:
            h = math.log(s) - math.log(s_next)
            d = denoised if old is None else denoised + (0.5 * h / h_last) * (denoised - old)
            gain = -math.expm1(-2 * h)  # 1 - e^-2h
            x_new = (s_next / s) ** 2 * x + gain * d
            x_new = x_new + noise_sampler(s, s_next) * (s_next * math.sqrt(gain))
        old, h_last = denoised, h
        x = _after_step(callback, i, x_new, s, s_next, denoised)
    return x


def _unipc_rhos(rks: list[float], hh: float, order: int) -> list[float]:
    """UniC's weights (Zhao et al. Alg. 2, B(h) = e^hh - 1 "bh2"): order 1 takes 1/2; else R rhos = b, R[i] = rks^i and
    b[i] = i! phi_{i+1}(hh) hh / B(h) (the phi recursion of diffusers' multistep_uni_c_bh_update)."""
    if order == 1:
        return [0.5]
    b_h, h_phi_k, fact = math.expm1(hh), math.expm1(hh) / hh - 1, 1
    rows, b = [], []
    for i in range(1, order + 1):
        rows.append([r ** (i - 1) for r in rks])
        b.append(h_phi_k * fact / b_h)
        fact *= i + 1
        h_phi_k = h_phi_k / hh - 1 / fact
    return np.linalg.solve(np.array(rows), np.array(b)).tolist()


@torch.no_grad()
def sample_unipc(model, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, disable=None,
                 interrupt=None):
    """UniPC (Zhao et al. 2023) as diffusers' UniPCMultistepScheduler defaults to (x0 prediction, bh2, order 2,
    first order on the first and last steps): the multistep predictor UniP, and before each step but the first the
    corrector UniC, which reuses that step's model output (no extra call). In VE form, lambda = -log(sigma), both
    are steps x' = (s'/s) x - expm1(-h) D with D a mix of x0 predictions. UniP-2 with bh2's rho = 1/2 is
    DPM-Solver++(2M)'s step, D = D0 + (D0 - D_prev) h / (2 h_prev); UniC then redoes the step that led to x_i
    from the x it started at, with D = D_{i-1} + rho_c-weighted differences that include the new D_i."""
    extra_args = extra_args or {}
    sig = sigmas.tolist()
    n = len(sig) - 1
    lam = [-math.log(s) if s > 0 else math.inf for s in sig]
    outs, last, last_order = [], None, 1  # x0 of the last two steps; the previous step's start and order
    for i in _progress(n, disable, interrupt):
        s, s_next = sig[i], sig[i + 1]
        denoised = model(x, s, **extra_args)
        if last is not None:  # UniC: correct x_i with the model's output there
            h = lam[i] - lam[i - 1]
            rks = [(lam[i - 2] - lam[i - 1]) / h, 1.0] if last_order == 2 else [1.0]
            rhos = _unipc_rhos(rks, -h, last_order)
            m0 = outs[-1]
            d = m0 + rhos[-1] * (denoised - m0)
            if last_order == 2:
                d = d + rhos[0] * (outs[-2] - m0) / rks[0]
            x = (s / sig[i - 1]) * last - math.expm1(-h) * d
        outs = (outs + [denoised])[-2:]
        order = min(2, n - i, i + 1)  # lower order on the first step and (lower_order_final) the last
        last, last_order = x, order
        if s_next == 0:
            x_new = denoised  # first order to sigma 0: x0
        else:
            h = lam[i + 1] - lam[i]
            d = denoised if order == 1 else denoised + (outs[-2] - denoised) * (0.5 * h / (lam[i - 1] - lam[i]))
            x_new = (s_next / s) * x - math.expm1(-h) * d
        x = _after_step(callback, i, x_new, s, s_next, denoised)
    return x


def _lcm_scalings(t: float) -> tuple[float, float]:
    """(c_skip, c_out) of the consistency model's boundary condition at timestep t (Luo et al. eq. 8, Song et al.
    2023's sigma_data 0.5, t scaled by 10), in float32 as diffusers computes them: c_skip -> 1 and c_out -> 0 as
    t -> 0, so the estimate is the sample itself at t = 0; from t ~ 20 on it is the model's x0."""
    scaled = np.float32(t) * np.float32(10.0)
    c_skip = np.float32(0.25) / (scaled**2 + np.float32(0.25))
    c_out = scaled / np.sqrt(scaled**2 + np.float32(0.25))
    return float(c_skip), float(c_out)


@torch.no_grad()
def sample_lcm(model, x, sigmas, *, timesteps, extra_args=None, callback=None, noise_sampler=None, disable=None,
               interrupt=None):
    """Latent Consistency Model multistep sampling (Luo et al. 2023, Alg. 1; diffusers' LCMScheduler): each step
    takes the consistency estimate c_skip x_vp + c_out x0 and, but after the last, noises it afresh to the next level.
    `timesteps` (N,): each step's UNet timestep (Schedule.timesteps), which the boundary condition reads. Made for
    LCM-distilled weights (an LCM-LoRA, guidance_scale 1 to 2); other models give blurred images in few steps."""
    extra_args = extra_args or {}
    _need_noise(noise_sampler, "lcm")
    sig, ts = sigmas.tolist(), timesteps.tolist()
    for i in _progress(len(sig) - 1, disable, interrupt):
        s, s_next = sig[i], sig[i + 1]
        c_skip, c_out = _lcm_scalings(ts[i])
        x_vp = x if math.isinf(s) else x / math.sqrt(1 + s * s)
        denoised = c_out * model(x, s, **extra_args) + c_skip * x_vp
        x = denoised if s_next == 0 else denoised + noise_sampler(s, s_next) * s_next
        x = _after_step(callback, i, x, s, s_next, denoised)
    return x


# Adams-Bashforth weights of the last 1-4 model outputs, newest first (Liu et al. 2022 eq. 12 and its lower orders)
_PLMS_WEIGHTS = ((1.0,), (3 / 2, -1 / 2), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


@torch.no_grad()
def sample_pndm(model, x, sigmas, *, sigmas_to, sigma_redo=None, prediction_type="epsilon", extra_args=None,
                callback=None, noise_sampler=None, disable=None, interrupt=None, blend=None):
    """PLMS, the pseudo linear multistep method of Liu et al. 2022 (arXiv:2202.09778) that SD samples with: diffusers'
    PNDMScheduler with skip_prk_steps=True. Each step is a DDIM step along an Adams-Bashforth mix of the model's
    last outputs (up to 4). The first step is second order instead: a DDIM step, a model call where it lands, then
    the step again from the start along the mean of the two outputs; so N steps make N + 1 model calls.

    The outputs are mixed as the UNet gives them, eps or v (`prediction_type`), as diffusers does: a mix of v's is
    not the mix of their eps's. Steps land on `sigmas_to` (t - T // N) as DDIM's do. `sigma_redo` is where the
    first step's second pass starts (diffusers: the second timestep + T // N, the first one with leading spacing).
    `blend(x, sigma)`, if given, is applied where the first pass lands, before the second model call (4-channel
    inpainting's known region, see sample())."""
    extra_args = extra_args or {}
    sig, to = sigmas.tolist(), sigmas_to.tolist()
    v = prediction_type == "v_prediction"

    def output(x, s, denoised):  # the UNet's own output at level s, from the denoiser's x0
        eps = _eps(x, denoised, s)
        return (eps - s * denoised) / math.sqrt(1 + s * s) if v else eps

    def step(x, s, s_to, out):  # DDIM from s to s_to along `out` (x0 + s_to * eps in VE)
        eps = out / math.sqrt(1 + s * s) + x * (s / (1 + s * s)) if v else out
        return x + (s_to - s) * eps

    outs = []
    for i in _progress(len(sig) - 1, disable, interrupt):
        s, s_to, s_next = sig[i], to[i], sig[i + 1]
        denoised = model(x, s, **extra_args)
        outs = [output(x, s, denoised)] + outs[:3]
        mixed = sum(w * o for w, o in zip(_PLMS_WEIGHTS[len(outs) - 1], outs))
        x_new = step(x, s, s_to, mixed)
        if i == 0 and len(sig) > 2:  # second pass: mean of both outputs, from the start again, to sigmas[1]
            x_new = _relabel(x_new, s_to, s_next)
            if blend is not None:
                x_new = blend(x_new, s_next)
            second = output(x_new, s_next, model(x_new, s_next, **extra_args))
            x_new = step(_relabel(x, s, sigma_redo), sigma_redo, s_next, (outs[0] + second) / 2)
        elif s_to != s_next:
            x_new = _relabel(x_new, s_to, s_next)
        x = _after_step(callback, i, x_new, s, s_next, denoised)
    return x


# --------------------------------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class SamplerSpec:
    name: str
    fn: Callable
    stochastic: bool          # needs a noise_sampler


SAMPLERS: dict[str, SamplerSpec] = {spec.name: spec for spec in (
    SamplerSpec("ddim", sample_ddim, False),
    SamplerSpec("ddpm", sample_ddpm, True),
    SamplerSpec("euler", sample_euler, False),
    SamplerSpec("euler-a", sample_euler_ancestral, True),
    SamplerSpec("heun", sample_heun, False),
    SamplerSpec("dpmpp-2m", sample_dpmpp_2m, False),
    SamplerSpec("dpmpp-2m-karras", sample_dpmpp_2m, False),
    SamplerSpec("dpmpp-2m-sde", sample_dpmpp_2m_sde, True),
    SamplerSpec("dpmpp-2m-sde-karras", sample_dpmpp_2m_sde, True),
    SamplerSpec("unipc", sample_unipc, False),
    SamplerSpec("unipc-karras", sample_unipc, False),
    SamplerSpec("lcm", sample_lcm, True),
    SamplerSpec("pndm", sample_pndm, False),
)}


def stochastic_samplers() -> str:
    """'ddpm, euler-a, ...': the samplers that draw fresh noise at every step (for messages)."""
    return ", ".join(name for name, spec in SAMPLERS.items() if spec.stochastic)


def check_eta(eta, sampler: str) -> None:
    """ValueError unless `eta` (DDIM's noise, diffusers' `eta`) is a number in [0, 1] (1 = DDPM's noise; past it
    DDIM's step has no real solution: diffusers returns NaN), and 0 for samplers other than ddim: diffusers ignores
    it there; we refuse rather than silently drop it."""
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 <= eta <= 1:
        raise ValueError(f"eta must be a number in [0, 1] (1: as much noise as DDPM), got {eta!r}")
    if eta and sampler != "ddim":
        raise ValueError(f"eta ({eta}) is DDIM's noise and applies to sampler='ddim' only, not {sampler!r}; the "
                         f"stochastic samplers are {stochastic_samplers()}")


def sample(model, x: torch.Tensor, schedule: Schedule, *, extra_args=None, callback=None, noise_sampler=None,
           disable=None, interrupt=None, blend=None, bar: dict | None = None, **options) -> torch.Tensor:
    """Run the sampler the schedule was built for. `options` go to the sampler (e.g. eta for ddim). blend(x, sigma):
    what 4-channel inpainting does to x at a level sigma (latents.known_region); the samplers with a model call
    between steps (heun, pndm) apply it there, as diffusers' pipeline blends after each scheduler step call; the
    end of each step is the callback's. bar: tqdm options for the progress bar (file=, desc=, ...)."""
    spec = SAMPLERS[schedule.sampler]
    if blend is not None and schedule.sampler in ("heun", "pndm"):
        options["blend"] = blend
    if spec.stochastic:
        _need_noise(noise_sampler, schedule.sampler)
    if schedule.sampler == "ddim":
        options["sigmas_to"] = schedule.sigmas_to
    if schedule.sampler == "lcm":
        options["timesteps"] = schedule.timesteps
    if schedule.sampler == "pndm":
        if getattr(model, "prediction_type", None) is None:
            raise ValueError("pndm mixes the UNet's own outputs, so the model must say its prediction_type (as "
                             "guidance.Denoiser does)")
        redo = (schedule.sigma_at(int(schedule.timesteps[1]) + schedule.stride) if schedule.num_steps > 1 else None)
        options.update(sigmas_to=schedule.sigmas_to, sigma_redo=redo, prediction_type=model.prediction_type)
    token = _BAR.set(dict(bar or {}))  # for _progress: this call's, whatever other threads' calls set
    try:
        return spec.fn(model, x, schedule.sigmas, extra_args=extra_args, callback=callback,
                       noise_sampler=noise_sampler, disable=disable, interrupt=interrupt, **options)
    finally:
        _BAR.reset(token)
