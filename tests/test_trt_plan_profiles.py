"""TensorRT optimization profiles at the edges test_tensorrt_logic.py leaves open (no TensorRT needed):

- a bucket whose batch starts above 1 still builds a text encoder that takes one text, because the pipeline's text
  path encodes a batch's distinct prompts and negative prompts only (diffusion/text.py);
- a static (CUDA-graph) profile is chosen over an equally tight dynamic one listed before it;
- a bucket without @OPT is tuned for single-image requests, as the default buckets are.
"""
import itertools

import pytest
import torch

from backdrop.diffusion.text import contexts
from backdrop.export import onnx as E
from backdrop.export.tensorrt import (Range, ShapeBucket, TensorRTBackend, default_buckets, parse_bucket,
                                      profiles_for, select_profile)
from backdrop.nn.config import PRESETS
from backdrop.nn.tokenizer import Tokenizer

SD15 = PRESETS["sd15"]
SPECS = E.graph_specs(SD15)


def stand_in_backend(component: str, profiles, calls: list) -> TensorRTBackend:
    """A TensorRTBackend whose `component` engine only does what Engine.__call__ does before TensorRT runs: pick the
    profile for the input shapes (refusing what fits none). Its output is zeros of the graph's output shape."""
    def engine(inputs):
        shapes = {k: tuple(v.shape) for k, v in inputs.items()}
        calls.append((shapes, select_profile(component, profiles, shapes)))
        (ids,) = inputs.values()
        return torch.zeros(ids.shape[0], 77, SD15.text.hidden_size)

    backend = object.__new__(TensorRTBackend)
    backend.specs, backend.engines = {component: SPECS[component]}, {component: engine}
    backend.tokenizer, backend.device = Tokenizer.from_assets(SD15.text.pad_token_id), torch.device("cpu")
    return backend


def test_text_encoder_takes_any_distinct_text_count_of_a_bucket_starting_above_one():
    """--bucket 512:2-4 serves batches of 2 to 4 images. Repeated prompts (one product under one prompt, n=4) and
    guidance <= 1 (no negative prompts) leave a single distinct text: the text encoder must take a batch of 1, and
    up to 2 x 4 (distinct prompts and negatives, guided). Every such request's text encoder call fits a profile."""
    bucket = parse_bucket("512:2-4")
    profiles = profiles_for(SPECS["text_encoder"], SD15, [bucket])
    calls = []
    backend = stand_in_backend("text_encoder", profiles, calls)
    for b, guided, distinct in itertools.product(range(bucket.batch.min, bucket.batch.max + 1), (False, True),
                                                 (False, True)):
        prompts = [f"a mug, take {i}" if distinct else "a mug on marble" for i in range(b)]
        negatives = [f"blurry {i}" if distinct else "blurry" for i in range(b)]
        context, uncond = contexts(backend, prompts, negatives, guided)
        assert context.shape == (b, 77, SD15.text.hidden_size) and (uncond is not None) == guided
        texts = len(set(prompts + (negatives if guided else [])))
        assert calls[-1] == ({"input_ids": (texts, 77)}, 0), (b, guided, distinct)
    assert min(shapes["input_ids"][0] for shapes, _ in calls) == 1  # the case a batch-min text profile refused
    assert [p.shapes for p in profiles] == [(("input_ids", (1, 77), (4, 77), (8, 77)),)]  # opt: 2 x opt images


@pytest.mark.parametrize("component, shapes", [
    ("unet", {"sample": (4, 4, 64, 64), "timestep": (4,), "encoder_hidden_states": (4, 77, 768)}),  # 2 guided
    ("vae_decoder", {"latent_sample": (2, 4, 64, 64)})])
def test_static_profile_wins_over_an_equally_tight_dynamic_one_listed_first(component, shapes):
    """Buckets 512:1-2 and 512:2: a batch of 2 images fits both profiles, whose largest shapes are equal. The static
    one replays its captured CUDA graph, so it is chosen whatever the order the buckets were given in."""
    for buckets, static_index in (([parse_bucket("512:1-2"), parse_bucket("512:2")], 1),
                                  ([parse_bucket("512:2"), parse_bucket("512:1-2")], 0)):
        profiles = profiles_for(SPECS[component], SD15, buckets)
        assert [p.static for p in profiles] == [i == static_index for i in range(2)]
        assert profiles[0].volume() == profiles[1].volume()  # tightness cannot decide
        assert select_profile(component, profiles, shapes) == static_index


def test_a_bucket_without_opt_is_tuned_for_one_image():
    """'HxW:MIN-MAX' sets opt = MIN (only '@OPT' says otherwise), as the default buckets (batch 1-4, opt 1): TensorRT
    tunes its kernels for single-image requests, the common case, not for the largest batch."""
    assert parse_bucket("512x768:1-8").batch == Range(1, 1, 8)
    assert parse_bucket("512x768:2-8").batch == Range(2, 2, 8)
    assert parse_bucket("512:1-4") == default_buckets(SD15)[0] == ShapeBucket(512, 512)
    assert parse_bucket("512x768:1-4") == default_buckets(SD15)[1]
    (unet,) = profiles_for(SPECS["unet"], SD15, [parse_bucket("512x768:1-8")])
    assert unet.shapes[0] == ("sample", (1, 4, 64, 96), (2, 4, 64, 96), (16, 4, 64, 96))  # opt: 1 image, guided
