"""Edges of diffusion/schedule.py and diffusion/latents.py that their tests leave open, found by mutation testing
(round 4), against diffusers 0.42 where it has the same function: sigma_to_t at the top of the training range,
num_inference_steps = num_train_timesteps, LCM's step limit, and the noise sampler's dtype."""
import numpy as np
import pytest
import torch

from backdrop.diffusion.latents import default_noise_sampler
from backdrop.diffusion.schedule import build_schedule, sigma_to_t

from scheduler_refs import diffusers_scheduler, sched_config

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers' numpy-2 __array__ notices


def test_sigma_to_t_clips_at_the_top_of_the_training_range_as_diffusers():
    # mutant S04: the upper index clipped at T - 1, so a sigma at or above the largest trained one indexed past the end
    ref = diffusers_scheduler("euler", sched_config())
    train = ((1 - ref.alphas_cumprod) / ref.alphas_cumprod).numpy() ** 0.5
    log_sigmas = np.log(train)
    sigmas = np.array([train[0] * 0.5, train[10], train[-1] * 0.999, train[-1], train[-1] * 2], dtype=np.float64)
    got = sigma_to_t(sigmas, log_sigmas)
    assert np.array_equal(got, ref._sigma_to_t(sigmas, log_sigmas)) and got[-1] == len(train) - 1


@pytest.mark.parametrize("name", ["euler", "ddim"])
def test_as_many_steps_as_training_timesteps_equal_diffusers(name):
    # mutant S09: steps = num_train_timesteps refused (diffusers runs it)
    cfg = sched_config(timestep_spacing="trailing")
    ours = build_schedule(name, 1000, cfg)
    ref = diffusers_scheduler(name, cfg)
    ref.set_timesteps(1000)
    assert torch.equal(ours.timesteps, ref.timesteps.float())


def test_lcm_takes_at_most_its_distillation_steps_as_diffusers():
    # mutants S25, S25b: lcm with more steps than its 50 distillation timesteps built a schedule repeating timesteps
    assert build_schedule("lcm", 50).num_steps == 50
    with pytest.raises(ValueError, match="lcm takes its steps from the 50 timesteps of consistency distillation, so "
                                         "at most 50, got 51"):
        build_schedule("lcm", 51)
    with pytest.raises(ValueError):  # diffusers' LCMScheduler refuses it too
        diffusers_scheduler("lcm", sched_config()).set_timesteps(51)


def test_the_noise_sampler_draws_in_the_latents_dtype():
    # mutant L09: noise drawn in float32 whatever the latents' dtype (a half-precision x became float32 after a step)
    x = torch.zeros(2, 4, 8, 8, dtype=torch.float16)
    noise = default_noise_sampler(x, [torch.Generator().manual_seed(s) for s in (1, 2)])(1.0, 0.5)
    assert noise.dtype == torch.float16 and noise.shape == x.shape
    want = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float16)
    assert torch.equal(noise[1:], want)
