"""Samplers reproduce diffusers 0.42's scheduler loops (set_timesteps / scale_model_input / step) on the same model
and the same noise: final latents within 1e-4 (float32) and the identical UNet timestep at every call."""
import math
import threading

import pytest
import torch

from backdrop.diffusion.guidance import Denoiser
from backdrop.diffusion.latents import (default_noise_sampler, initial_latents, noised_latents, output_latents,
                                        per_item_randn)
from backdrop.diffusion.samplers import SAMPLERS, SamplingInterrupted, sample, sample_euler
from backdrop.diffusion.schedule import RECIPES, alphas_cumprod, build_schedule

from scheduler_refs import diffusers_scheduler, sched_config

pytestmark = [pytest.mark.usefixtures("one_thread"),  # conftest.py
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]  # diffusers' numpy-2 __array__ notices

SHAPE = (2, 4, 6, 5)  # batch of 2, odd latent sizes
SEEDS = (11, 12)
TOL = 1e-4


def make_unet(calls=None):
    """A deterministic analytic 'UNet' `unet(x_vp, t, context)`: close to the ideal eps of unit-variance data,
    sqrt(1 - abar(t)) x_vp, plus smooth nonlinear terms scaled by sqrt(abar(t)) so x0 stays O(1) at every level
    (eps or v alike). Fractional t interpolates abar. Logs (t, x_vp) of every call into `calls`."""
    ac = alphas_cumprod(sched_config()).double()

    def unet(x, t, context=None):
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
        if calls is not None:
            calls.append((t[0].item(), x.clone()))
        lo = t.floor().long().clamp(0, len(ac) - 2)
        w = t - lo
        a = ((1 - w) * ac[lo] + w * ac[lo + 1]).reshape(-1, 1, 1, 1).float()  # (B or 1, 1, 1, 1)
        tt = (t / 1000).reshape(-1, 1, 1, 1).float()
        return (1 - a).sqrt() * x + a.sqrt() * (0.3 * torch.tanh(1.3 * x - tt) + 0.2 * x * torch.tanh(x + tt))
    return unet


def generators():
    return [torch.Generator().manual_seed(s) for s in SEEDS]


def diffusers_loop(name, n, cfg, pred, eta=0.0, strength=None, x0=None, custom=None):
    """diffusers' own loop, as StableDiffusion(Img2Img)Pipeline drives it (no guidance). custom: set_timesteps'
    timesteps= or sigmas= (n must then be their number of steps)."""
    sch = diffusers_scheduler(name, cfg, pred)
    sch.set_timesteps(**(custom or {"num_inference_steps": n}))
    calls, unet, gens = [], None, generators()
    unet = make_unet(calls)
    noise = per_item_randn(SHAPE, gens)
    timesteps = sch.timesteps
    if strength is None:
        lat = noise * sch.init_noise_sigma
    else:  # StableDiffusionImg2ImgPipeline.get_timesteps + prepare_latents
        t_start = n - min(int(n * strength), n)
        if name == "pndm" and t_start > 0:
            # diffusers slices PNDM's list, whose second timestep is repeated for the first step's second model
            # call, as if it had one entry per step: the sub-run then labels every later step one step too low.
            # Ours starts at the strength's step, as a full run would: the oracle is PNDM stepping over that list.
            t = timesteps[t_start + 1:]
            timesteps = torch.cat([t[:2], t[1:]])
        else:
            timesteps = timesteps[t_start * sch.order:]
        if hasattr(sch, "set_begin_index"):
            sch.set_begin_index(t_start * sch.order)
        lat = sch.add_noise(x0, noise, timesteps[:1])
    kw = {"generator": gens} if SAMPLERS[name].stochastic or eta > 0 else {}
    if eta > 0:
        kw["eta"] = eta
    for t in timesteps:
        lat = sch.step(unet(sch.scale_model_input(lat, t), t), t, lat, **kw).prev_sample
    return lat, calls


def our_loop(name, n, cfg, pred, eta=0.0, strength=None, x0=None, custom=None):
    schedule = build_schedule(name, n, cfg, **(custom or {}))
    if strength is not None:
        schedule = schedule.img2img(strength)
    calls, gens = [], generators()
    noise = per_item_randn(SHAPE, gens)
    x = initial_latents(noise, schedule) if strength is None else noised_latents(x0, noise, schedule)
    opts = {"eta": eta} if eta > 0 else {}
    x = sample(Denoiser(make_unet(calls), schedule, pred), x, schedule, noise_sampler=default_noise_sampler(x, gens),
               disable=True, **opts)
    return output_latents(x, schedule), calls


def assert_same_run(ref, ours, where):
    (lat_ref, calls_ref), (lat, calls) = ref, ours
    assert [t for t, _ in calls] == [t for t, _ in calls_ref], f"{where}: UNet timesteps differ"
    for (_, a), (_, b) in zip(calls, calls_ref):
        assert (a - b).abs().max().item() <= TOL, f"{where}: UNet inputs differ"
    err = (lat - lat_ref).abs().max().item()
    assert err <= TOL, f"{where}: final latents differ by {err:.3g}"


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_matches_diffusers_loop(name):
    cases = [(sp, pred, False) for sp in ("leading", "trailing", "linspace") for pred in ("epsilon", "v_prediction")]
    if RECIPES[name].zero_snr and not RECIPES[name].karras:
        # zero terminal SNR needs v-prediction (Lin et al. 2023 §3.2); DDIM/DDPM start at sigma = inf there.
        # (diffusers' Karras + zero-SNR DPM repeats timestep 999 and overruns its own sigma list, so no oracle.)
        cases.append(("trailing", "v_prediction", True))
    for spacing, pred, zero_snr in cases:
        cfg = sched_config(timestep_spacing=spacing, rescale_betas_zero_snr=zero_snr)
        for n in (1, 2, 10, 25, 50):
            for eta in ((0.0, 0.6) if name == "ddim" else (0.0,)):
                where = f"{name} {spacing} {pred} zero_snr={zero_snr} steps={n} eta={eta}"
                assert_same_run(diffusers_loop(name, n, cfg, pred, eta), our_loop(name, n, cfg, pred, eta), where)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_img2img_matches_diffusers(name):
    x0 = -0.4 + 0.8 * torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    for pred in ("epsilon", "v_prediction"):
        cfg = sched_config()
        for strength in (0.3, 0.75, 1.0):
            where = f"{name} {pred} strength={strength}"
            assert_same_run(diffusers_loop(name, 10, cfg, pred, strength=strength, x0=x0),
                            our_loop(name, 10, cfg, pred, strength=strength, x0=x0), where)


@pytest.mark.parametrize("name", [n for n, s in SAMPLERS.items() if s.stochastic] + ["ddim"])
def test_seed_gives_the_same_item_alone_or_in_a_batch(name):
    schedule = build_schedule(name, 8)

    def run(seeds):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        x = initial_latents(per_item_randn((len(seeds), 4, 6, 5), gens), schedule)
        return sample(Denoiser(make_unet(), schedule), x, schedule, noise_sampler=default_noise_sampler(x, gens),
                      disable=True, **({"eta": 1.0} if name == "ddim" else {}))

    batch, alone = run([5, 6, 7]), run([6])
    assert torch.allclose(batch[1:2], alone, atol=1e-6)
    assert not torch.allclose(batch[0], batch[1], atol=1e-2)  # different seeds differ


def test_lcm_boundary_condition_equals_diffusers():
    """c_skip and c_out, which the loop tests barely see (c_skip < 1e-5 from LCM's timestep 19 up), at t = 0 (the
    sample itself), small t and LCM's first timestep."""
    from diffusers import LCMScheduler

    from backdrop.diffusion.samplers import _lcm_scalings

    sch = LCMScheduler()
    for t in (0, 1, 3, 19, 259, 999):
        want = [float(v) for v in sch.get_scalings_for_boundary_condition_discrete(torch.tensor(t))]
        assert _lcm_scalings(float(t)) == pytest.approx(want, rel=1e-6, abs=0), t
    assert _lcm_scalings(0.0) == (1.0, 0.0)


def test_per_item_noise_equals_diffusers_randn_tensor():
    from diffusers.utils.torch_utils import randn_tensor

    ours = per_item_randn(SHAPE, generators())
    assert torch.equal(ours, randn_tensor(SHAPE, generator=generators()))
    assert torch.equal(per_item_randn(SHAPE, torch.Generator().manual_seed(1)),
                       randn_tensor(SHAPE, generator=torch.Generator().manual_seed(1)))
    with pytest.raises(ValueError, match="3 generators for a batch of 2"):
        per_item_randn(SHAPE, generators() + generators()[:1])


def test_callback_sees_every_step_and_can_replace_x():
    schedule = build_schedule("euler", 6)
    model = Denoiser(make_unet(), schedule)
    x = initial_latents(per_item_randn(SHAPE, generators()), schedule)
    seen = []

    def callback(i, x_i, sigma, sigma_next, denoised):
        seen.append((i, sigma, sigma_next, denoised.shape))
        return x_i * 0.5 if i == 2 else None  # replace after step 2 only

    out = sample_euler(model, x, schedule.sigmas, callback=callback, disable=True)
    sig = schedule.sigmas.tolist()
    assert seen == [(i, sig[i], sig[i + 1], x.shape) for i in range(6)]
    # the same as stopping after step 2, halving, and continuing over the rest of the sigmas
    head = sample_euler(model, x, schedule.sigmas[:4], disable=True)
    assert torch.allclose(out, sample_euler(model, head * 0.5, schedule.sigmas[3:], disable=True), atol=1e-6)
    with pytest.raises(ValueError, match="callback returned x of shape"):
        sample_euler(model, x, schedule.sigmas, callback=lambda *a: torch.zeros(1), disable=True)


def test_interrupt_stops_before_the_next_step():
    schedule = build_schedule("dpmpp-2m", 10)
    calls = []
    model = Denoiser(make_unet(calls), schedule)
    x = initial_latents(per_item_randn(SHAPE, generators()), schedule)
    stop = threading.Event()
    with pytest.raises(SamplingInterrupted) as info:
        sample(model, x, schedule, interrupt=stop, disable=True,
               callback=lambda i, *a: stop.set() if i == 3 else None)
    assert info.value.step == 4 and len(calls) == 4
    with pytest.raises(SamplingInterrupted):  # already set: no model call at all
        sample(model, x, schedule, interrupt=stop, disable=True)
    assert len(calls) == 4
    import copy
    import pickle

    for given in (info.value, SamplingInterrupted(9, "interrupted after the last step, before decoding")):
        for back in (pickle.loads(pickle.dumps(given)), copy.copy(given)):  # as a process pool sends it back
            assert (type(back), str(back), back.step) == (SamplingInterrupted, str(given), given.step)


def test_stochastic_samplers_demand_a_noise_sampler():
    for name, spec in SAMPLERS.items():
        schedule = build_schedule(name, 4)
        x = torch.zeros(SHAPE)
        if spec.stochastic:
            with pytest.raises(ValueError, match="noise_sampler=default_noise_sampler"):
                sample(Denoiser(make_unet(), schedule), x, schedule, disable=True)
    schedule = build_schedule("ddim", 4)
    with pytest.raises(ValueError, match="eta > 0"):
        sample(Denoiser(make_unet(), schedule), torch.zeros(SHAPE), schedule, eta=0.5, disable=True)


def test_latent_helpers():
    noise = per_item_randn(SHAPE, generators())
    ddim = build_schedule("ddim", 10)  # ends at sigma(alphas_cumprod[0]): diffusers returns VP latents there
    s_end = ddim.sigmas[-1].item()
    assert s_end > 0 and torch.allclose(output_latents(noise, ddim), noise / math.sqrt(1 + s_end**2))
    euler = build_schedule("euler", 10)
    assert output_latents(noise, euler) is noise
    x0 = torch.ones(SHAPE)
    assert torch.allclose(noised_latents(x0, noise, euler), x0 + noise * euler.sigmas[0])
    zero_snr = build_schedule("ddim", 10, sched_config(rescale_betas_zero_snr=True, timestep_spacing="trailing"))
    assert math.isinf(zero_snr.sigmas[0].item())  # pure noise: the VP latents are held as they are
    assert torch.equal(initial_latents(noise, zero_snr), noise) and torch.equal(noised_latents(x0, noise, zero_snr),
                                                                                noise)
