"""Schedules equal diffusers 0.42's: betas/alphas_cumprod (three beta schedules, zero-SNR rescaling), the sigmas and
UNet timesteps of every sampler's scheduler for every spacing, and img2img's get_timesteps sub-schedules."""
import dataclasses
import inspect
import math
import types

import numpy as np
import pytest
import torch

from backdrop.diffusion.schedule import RECIPES, alphas_cumprod, betas, build_schedule, karras_sigmas

from scheduler_refs import diffusers_scheduler, sched_config

STEPS = (1, 2, 3, 7, 10, 25, 50)  # 3 and 7 do not divide 1000: trailing/leading rounding and DDIM's t - T // N
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers' numpy-2 __array__ notices


def one_per_step(name, seq):
    """diffusers' Heun repeats every timestep/sigma after the first (predictor, corrector), its PNDM the second
    (the first step's second model call); ours has one per step."""
    if name == "pndm":
        return torch.cat([seq[:1], seq[2:]])
    return torch.cat([seq[:1], seq[1::2]]) if RECIPES[name].order == 2 else seq


@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_alphas_cumprod_equal_diffusers(beta_schedule, zero_snr):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    cfg = sched_config(beta_schedule=beta_schedule, rescale_betas_zero_snr=zero_snr)
    ref = DDIMScheduler.from_config(cfg.to_diffusers())
    assert torch.equal(betas(cfg), ref.betas)
    ac = alphas_cumprod(cfg)
    assert ac.dtype == torch.float32 and torch.equal(ac, ref.alphas_cumprod)
    # diffusers' Euler/DPM replace a terminal 0 by 2**-24 to keep sigma finite; we do the same for those samplers
    assert torch.equal(alphas_cumprod(cfg, patch_zero_snr=True), EulerDiscreteScheduler.from_config(
        cfg.to_diffusers()).alphas_cumprod)
    if zero_snr:  # Lin et al. 2023 Algorithm 1: terminal SNR exactly 0, the first alpha kept
        plain = alphas_cumprod(dataclasses.replace(cfg, rescale_betas_zero_snr=False))
        assert ac[-1].item() == 0.0
        assert ac[0].item() == pytest.approx(plain[0].item(), rel=1e-6)
        assert bool((ac[1:] < ac[:-1]).all())
    else:
        assert ac[-1].item() > 0


@pytest.mark.parametrize("name", list(RECIPES))
def test_defaults_are_the_diffusers_class_defaults(name):
    import diffusers

    cls = getattr(diffusers, RECIPES[name].scheduler)
    assert inspect.signature(cls.__init__).parameters["timestep_spacing"].default == RECIPES[name].spacing
    assert cls.order == RECIPES[name].order


@pytest.mark.parametrize("name", list(RECIPES))
def test_sigmas_and_timesteps_equal_diffusers(name):
    """Bit-identical timesteps (what the UNet sees) and sigmas, for every spacing, step count and zero-SNR."""
    cases = [(sp, False, "scaled_linear") for sp in (None, "leading", "trailing", "linspace")]
    if RECIPES[name].zero_snr:
        cases.append(("trailing", True, "scaled_linear"))
    cases.append((None, False, "squaredcos_cap_v2"))  # DPM's Karras timesteps are not rounded there; UniPC's are
    for spacing, zero_snr, beta_schedule in cases:
        cfg = sched_config(timestep_spacing=spacing, rescale_betas_zero_snr=zero_snr, beta_schedule=beta_schedule)
        for n in STEPS:
            ours = build_schedule(name, n, cfg)
            ref = diffusers_scheduler(name, cfg)
            ref.set_timesteps(n)
            where = f"{name} {beta_schedule} spacing={spacing} zero_snr={zero_snr} steps={n}"
            assert torch.equal(ours.timesteps, one_per_step(name, ref.timesteps).float()), where
            assert ours.num_steps == len(ours.timesteps) == len(ours.sigmas) - 1, where
            family = RECIPES[name].family
            if family in ("k", "dpm"):
                assert torch.equal(ours.sigmas, one_per_step(name, ref.sigmas).float()), where
                assert torch.equal(ours.sigmas_to, ours.sigmas[1:]), where
            else:  # DDIM/DDPM/PNDM keep alphas_cumprod: sigma = sqrt((1 - a) / a) at each timestep
                ac = ref.alphas_cumprod[one_per_step(name, ref.timesteps)]
                assert torch.equal(ours.sigmas[:-1], ((1 - ac) / ac) ** 0.5), where
            if family == "ddim":  # lands on t - T // N; below 0 on final_alpha_cumprod (alphas_cumprod[0] for SD)
                prev = one_per_step(name, ref.timesteps) - 1000 // n
                a_prev = torch.where(prev >= 0, ref.alphas_cumprod[prev.clamp(min=0)], ref.final_alpha_cumprod)
                assert torch.allclose(ours.sigmas_to, ((1 - a_prev) / a_prev) ** 0.5, rtol=1e-6), where
                assert ours.sigmas[-1] == ours.sigmas_to[-1] > 0, where
            else:
                assert ours.sigmas[-1] == 0, where
            # txt2img's initial noise scale: Euler/Heun's init_noise_sigma is already VE; the others start from
            # unit-variance VP latents, i.e. VE noise * sqrt(1 + sigma0²)
            s0 = ours.sigmas[0].item()
            if family == "k":
                assert ours.init_noise_sigma == float(ref.init_noise_sigma), where
            elif not math.isinf(s0):
                assert ref.init_noise_sigma == 1.0 and ours.init_noise_sigma == pytest.approx(
                    math.sqrt(1 + s0 * s0), rel=1e-7), where


def test_karras_sigmas_follow_eq5():
    s = karras_sigmas(0.03, 14.6, 5, rho=7.0)
    assert s[0] == pytest.approx(14.6) and s[-1] == pytest.approx(0.03)
    assert np.allclose(np.diff(s ** (1 / 7)), (0.03 ** (1 / 7) - 14.6 ** (1 / 7)) / 4)  # even in sigma^(1/rho)


def test_timestep_pairs_exact_and_falls_back_to_log_sigma_interpolation():
    from diffusers import EulerDiscreteScheduler

    cfg = sched_config()
    karras = build_schedule("dpmpp-2m-karras", 10, cfg)
    ref = EulerDiscreteScheduler.from_config(cfg.to_diffusers())
    log_sigmas = np.log(((1 - ref.alphas_cumprod) / ref.alphas_cumprod).numpy() ** 0.5)
    interpolated = [float(ref._sigma_to_t(np.float64(s), log_sigmas)) for s in karras.sigmas[:-1].tolist()]
    paired = [karras.timestep(s) for s in karras.sigmas[:-1].tolist()]
    assert paired == karras.timesteps.tolist()  # the rounded timesteps diffusers feeds, not the interpolated ones
    assert paired != interpolated
    for s in (0.05, 0.7, 3.3, 14.0):  # not in the schedule: diffusers' _sigma_to_t
        assert karras.timestep(s) == pytest.approx(float(ref._sigma_to_t(np.float64(s), log_sigmas)), abs=1e-9)


@pytest.mark.parametrize("name", list(RECIPES))
def test_img2img_sub_schedule_equals_get_timesteps(name):
    from diffusers import StableDiffusionImg2ImgPipeline

    cfg = sched_config()
    for n in (10, 25, 50):
        full = build_schedule(name, n, cfg)
        for strength in (0.3, 0.75, 1.0):
            ref = diffusers_scheduler(name, cfg)
            ref.set_timesteps(n)
            # the pipeline's own method; it only touches self.scheduler
            ts, steps = StableDiffusionImg2ImgPipeline.get_timesteps(types.SimpleNamespace(scheduler=ref), n,
                                                                    strength, "cpu")
            sub = full.img2img(strength)
            # diffusers slices PNDM's list, whose 2nd entry repeats, one step early (see test_samplers); ours
            # starts at the strength's step
            want = one_per_step(name, ref.timesteps)[n - steps:] if name == "pndm" else one_per_step(name, ts)
            assert sub.num_steps == steps and torch.equal(sub.timesteps, want.float())
            assert torch.equal(sub.sigmas, full.sigmas[sub.start:]) and sub.sigmas[-1] == full.sigmas[-1]
            if RECIPES[name].family in ("k", "dpm"):  # the sigma its add_noise/first step use (begin_index)
                assert sub.sigmas[0] == ref.sigmas[ref.begin_index]


def test_bad_input_is_named():
    cfg = sched_config()
    with pytest.raises(ValueError, match="unknown sampler 'plms'.*euler-a"):
        build_schedule("plms", 10, cfg)
    for steps in (0, 1001, 2.5):
        with pytest.raises(ValueError, match="steps must be an int"):
            build_schedule("euler", steps, cfg)
    with pytest.raises(ValueError, match="HeunDiscreteScheduler.*zero terminal SNR"):
        build_schedule("heun", 10, sched_config(rescale_betas_zero_snr=True))
    with pytest.raises(ValueError, match="clip_sample"):
        build_schedule("ddim", 10, sched_config(clip_sample=True))
    full = build_schedule("ddim", 10, cfg)
    with pytest.raises(ValueError, match="leaves no step"):
        full.img2img(0.05)
    with pytest.raises(ValueError, match=r"strength must be in \[0, 1\]"):
        full.img2img(1.5)
    with pytest.raises(ValueError, match="already a sub-schedule"):
        full.img2img(0.5).img2img(0.5)


@pytest.mark.parametrize("spacing", [None, "leading", "linspace", "trailing"])
def test_every_step_count_either_builds_a_runnable_schedule_or_says_why(spacing):
    """Up to num_train_timesteps steps: a ValueError (the server's 400, the CLI's one line) where a schedule cannot
    run, never an IndexError (DDPM at N = T used to index timestep 1000) nor a schedule whose multistep solver then
    divides by a zero log-sigma step (dpmpp-2m at N = T used to fail after running every step)."""
    from backdrop.nn.config import SchedulerConfig

    cfg = SchedulerConfig(timestep_spacing=spacing)
    for name in RECIPES:
        for steps in (1, 2, 999, 1000):
            try:
                s = build_schedule(name, steps, cfg)
            except ValueError as e:
                assert "steps" in str(e)
                continue
            levels = s.sigmas[s.sigmas > 0]
            assert RECIPES[name].family != "dpm" or bool((levels[1:] < levels[:-1]).all()), (name, steps)


def test_a_config_without_set_alpha_to_one_takes_each_classes_default_and_trained_betas_are_refused():
    """A scheduler_config.json saved by a class without set_alpha_to_one (Euler, DPM-Solver, ...): diffusers' DDIM
    then defaults it to true (its last step lands on x0, sigma 0), its PNDM to false; SD's own file says false."""
    from backdrop.nn.config import SchedulerConfig

    saved = {"_class_name": "EulerDiscreteScheduler", "beta_schedule": "scaled_linear", "steps_offset": 1}
    fresh = SchedulerConfig.from_diffusers(saved)
    assert fresh.set_alpha_to_one is None and "set_alpha_to_one" not in fresh.to_diffusers()
    for name, to_one in (("ddim", True), ("pndm", False)):
        assert (float(diffusers_scheduler(name, saved).final_alpha_cumprod) == 1.0) is to_one
        final = build_schedule(name, 10, fresh).sigmas[-1].item()
        assert (final == 0.0) is to_one, (name, final)
    said = SchedulerConfig.from_diffusers({"set_alpha_to_one": False})
    assert build_schedule("ddim", 10, said).sigmas[-1].item() > 0
    with pytest.raises(ValueError, match="trained_betas"):
        SchedulerConfig.from_diffusers({"trained_betas": [0.001] * 1000})
    assert SchedulerConfig.from_diffusers({"trained_betas": None}) == SchedulerConfig(set_alpha_to_one=None)
