"""Edges of diffusion/guidance.py that test_guidance.py leaves open, found by mutation testing (round 4): per-item
guidance_rescale where only some items are guided, and per-item sigmas at infinity or of the wrong length."""
import pytest
import torch

from backdrop.diffusion.guidance import CFGDenoiser, Denoiser
from backdrop.diffusion.schedule import build_schedule
from backdrop.nn.config import SchedulerConfig
from test_guidance import context_unet

pytestmark = [pytest.mark.usefixtures("one_thread")]  # conftest.py


def batch(b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 4, 6, 5, generator=g) * 3, torch.randn(b, 7, 16, generator=g),
            torch.randn(b, 7, 16, generator=g) - 0.5)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_per_item_rescale_where_only_some_items_are_guided(pred):
    # mutants G10, G18: with some items unguided, the rescale took every item's cond (or every item's phi)
    x, ctx, neg = batch()
    schedule = build_schedule("euler", 10)
    sigma = schedule.sigmas[2].item()
    scales, rescales = torch.tensor([1.0, 7.5, 4.0]), torch.tensor([0.9, 0.7, 0.3])
    out = CFGDenoiser(context_unet(), schedule, pred)(x, sigma, context=ctx, uncond_context=neg,
                                                      guidance_scale=scales, guidance_rescale=rescales)
    for i in range(3):  # each item as if alone, with its own float scale and rescale
        alone = CFGDenoiser(context_unet(), schedule, pred)(x[i:i + 1], sigma, context=ctx[i:i + 1],
                                                            uncond_context=neg[i:i + 1],
                                                            guidance_scale=scales[i].item(),
                                                            guidance_rescale=rescales[i].item())
        assert torch.allclose(out[i:i + 1], alone, atol=1e-5)


def test_a_per_item_sigma_at_infinity_equals_the_scalar_call():
    # mutant G14: per-item scaling divided the latents by sqrt(inf² + 1) (zeros) where the scalar path keeps them
    schedule = build_schedule("ddim", 10, SchedulerConfig(rescale_betas_zero_snr=True, timestep_spacing="trailing"))
    assert torch.isinf(schedule.sigmas[0])
    x, ctx, _ = batch(2)
    model = Denoiser(context_unet(), schedule, "v_prediction")
    levels = schedule.sigmas[[0, 4]]
    out = model(x, levels, context=ctx)
    for i, s in enumerate(levels.tolist()):
        assert torch.allclose(out[i:i + 1], model(x[i:i + 1], s, context=ctx[i:i + 1]), atol=1e-5)


def test_per_item_sigmas_are_checked():
    # mutants G17, G21: per-item sigmas of the wrong length were broadcast; inf for an epsilon model gave inf/NaN
    x, ctx, _ = batch(2)
    model = Denoiser(context_unet(), build_schedule("euler", 10), "epsilon")
    with pytest.raises(ValueError, match=r"per-item sigma \(1,\) does not match the batch 2"):
        model(x, torch.tensor([1.0]), context=ctx)
    with pytest.raises(ValueError, match="sigma = inf needs a v_prediction model"):
        model(x, torch.tensor([float("inf"), 1.0]), context=ctx)
