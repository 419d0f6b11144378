"""Edges of diffusion/batching.py (a call's per-item lists, seeds and strengths, diffusers' argument names and
refusals) that the pipeline tests leave open, found by mutation testing (round 4). Pure bookkeeping, so most run
without a model; one checks a single generator against the noise it should draw."""
import numpy as np
import pytest
import torch

from backdrop.diffusion.batching import (MAX_SEED, Loop, MaskOptions, StepEnd, diffusers_names,
                                        item_strengths, items, requests, seeds)
from backdrop.diffusion.schedule import build_schedule
from backdrop.nn.config import SchedulerConfig

pytestmark = [pytest.mark.usefixtures("one_thread")]  # conftest.py


class Output:  # what a pipeline call returns: diffusers_names applies return_dict to such functions
    def to_tuple(self):
        return ("images", None)


@diffusers_names
def call(steps: int = 1, callback=None) -> "Output":  # as pipeline.py writes it
    return Output()


@diffusers_names
def loader(path=None) -> None:
    return None


def loop(**changes) -> Loop:
    return Loop(**{**dict(steps=2, sampler="euler", eta=0.0, guidance_scale=7.5, guidance_rescale=0.0,
                          progress=False, callback=None, interrupt=None, scheduler=SchedulerConfig()), **changes})


def test_tensor_inputs_without_the_callback_are_named():
    # mutant B07: callback_on_step_end_tensor_inputs= alone fell through to a bare "unexpected keyword" TypeError
    with pytest.raises(TypeError, match=r"call\(\) got callback_on_step_end_tensor_inputs= without "
                                        r"callback_on_step_end="):
        call(callback_on_step_end_tensor_inputs=["latents"])


def test_return_dict_is_refused_by_a_function_that_returns_no_output():
    # mutant B09: return_dict= reached a loader (no Output to turn into a tuple) as a bare "unexpected keyword"
    assert isinstance(call(num_inference_steps=2), Output) and call(return_dict=False) == ("images", None)
    with pytest.raises(TypeError, match=r"loader\(\) does not take diffusers' return_dict=: it returns no Output"):
        loader(return_dict=False)


def test_guidance_scale_zero_and_crop_padding_zero_are_taken():
    # mutants B12, B14: guidance_scale=0 (no guidance, as diffusers allows) and crop_padding=0 (the mask's own
    # box) were refused
    assert loop(guidance_scale=0).guidance_scale == 0.0
    opts = MaskOptions(blur=0, dilate=0, crop_padding=0, threshold=None, mode="max", paste_back=True,
                       color_match=False)
    assert opts.crop_padding == 0


def test_step_end_keeps_the_latents_unless_it_gets_new_ones_of_their_shape():
    # mutants B17, B18: a callback returning {} gave None instead of the latents (a 4-channel inpaint blend was then
    # dropped); latents of another shape were not named as the callback's
    schedule = build_schedule("euler", 3)
    x = torch.randn(2, 4, 8, 8)
    assert StepEnd(lambda pipe, i, t, kw: {}, None)(0, x, 1.0, schedule) is x
    bad = StepEnd(lambda pipe, i, t, kw: {"latents": kw["latents"][:1]}, None)
    with pytest.raises(ValueError, match=r"callback_on_step_end returned latents of shape \(1, 4, 8, 8\), expected "
                                         r"\(2, 4, 8, 8\)"):
        bad(0, x, 1.0, schedule)


def test_step_end_offers_only_the_latents():
    # mutant B43: callback_on_step_end_tensor_inputs=["prompt_embeds"] accepted, and the callback then got no such key
    with pytest.raises(ValueError, match=r"callback_on_step_end_tensor_inputs: \['prompt_embeds'\] are not offered "
                                         "here; only 'latents'"):
        StepEnd(lambda pipe, i, t, kw: {}, None, ("latents", "prompt_embeds"))


def test_an_rgba_mask_array_is_one_mask():
    # mutant B19: an (H, W, 4) RGBA mask array read as a batch of H masks
    rgba = np.zeros((64, 64, 4), np.uint8)
    assert len(items(rgba, "mask", mask=True)) == 1
    assert len(items(np.zeros((3, 64, 64), np.uint8), "mask", mask=True)) == 3  # (B, H, W): a batch


def test_each_request_repeats_k_times_in_a_row():
    # mutants B20, B28: the k images of a request interleaved with the other requests' (prompts, strengths)
    req = requests(["a", "b"], ["na", "nb"], 7, 2, "pil", width=16)
    assert req["prompts"] == ["a", "a", "b", "b"] and req["negatives"] == ["na", "na", "nb", "nb"]
    assert req["seeds"] == [7, 8, 9, 10]
    assert item_strengths([0.5, 1.0], 2, 2) == [0.5, 0.5, 1.0, 1.0]


def test_the_last_seed_of_a_request_stays_in_32_bits():
    # mutant B22: seed 2**32 - 1 with 2 images per prompt gave the second seed 2**32 (which draws as seed 0)
    assert seeds(MAX_SEED - 1, 1, 2) == [MAX_SEED - 1, MAX_SEED]
    with pytest.raises(ValueError, match=r"must be an int in \[0, 2\*\*32 - num_images_per_prompt\]"):
        seeds(MAX_SEED, 1, 2)


def test_seed_none_follows_torchs_global_rng():
    # mutant B26: seed=None always seed 0 (every call the same image); diffusers draws from torch's global RNG
    torch.manual_seed(0)
    first = seeds(None, 1, 1)
    torch.manual_seed(0)
    assert seeds(None, 1, 1) == first
    torch.manual_seed(1)
    assert seeds(None, 1, 1) != first


def test_strength_zero_is_refused_by_name():
    # mutant B27: strength 0 passed here and failed later as "leaves no step to run"
    with pytest.raises(ValueError, match=r"strength must be a number in \(0, 1\], got 0"):
        item_strengths(0, 1, 1)


def test_one_generator_reports_a_seed_per_image():
    # mutant B34: one generator for the batch gave Output.seeds one entry for all images
    g = torch.Generator().manual_seed(5)
    req = requests(["a", "b"], None, None, 2, "pil", width=16, generator=g)
    assert req["generators"] is g and req["seeds"] == [5, 5, 5, 5]


def test_an_empty_prompt_list_is_refused():
    # mutant B40: prompt=[] made a call of zero requests instead of a ValueError
    with pytest.raises(ValueError, match="prompt: empty list"):
        requests([], None, 0, 1, "pil", width=16)


def test_one_generator_draws_the_whole_batch_at_once(tmp_path):
    # mutant B42: one generator drew item by item, which at 9x9 latents (not a multiple of 16 numbers: torch's
    # CPU randn fills in blocks of 16) differs from diffusers' one draw for the batch
    from backdrop.diffusion.pipeline import Pipeline
    from backdrop.nn.checkpoint import init_model, save_model
    pipe = Pipeline.from_pretrained(save_model(init_model("tiny", seed=1), tmp_path / "m"), device="cpu",
                                    dtype=torch.float32)
    run = dict(steps=1, sampler="euler", height=72, width=72, output_type="latent", progress=False)
    got = pipe.generate(["a", "b"], generator=torch.Generator().manual_seed(3), **run).images
    noise = torch.randn(2, 4, 9, 9, generator=torch.Generator().manual_seed(3))
    assert torch.equal(got, pipe.generate(["a", "b"], latents=noise, **run).images)
