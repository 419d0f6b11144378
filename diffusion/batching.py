"""One Pipeline call's arguments as per-item lists, and its sampling settings (pipeline.py's module docstring
says what the user sees: broadcasting, seeds, strengths, prompts or their embeddings).

A call holds n requests (the longest list among its per-request arguments), each repeated k =
num_images_per_prompt times: every list here has n * k items, request i's first. Pure bookkeeping, no model.
"""
from __future__ import annotations

import functools
import inspect
import math
import numbers
import threading
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from backdrop.diffusion.recipes import RECIPES, SAMPLING_DEFAULTS
from backdrop.diffusion.samplers import check_eta
from backdrop.diffusion.schedule import Schedule, build_schedule
from backdrop.nn.config import SchedulerConfig

__all__ = ["OUTPUT_TYPES", "MAX_SEED", "DIFFUSERS_NAMES", "DIFFUSERS_INSTEAD", "DIFFUSERS_OFF", "diffusers_names",
           "as_number", "Loop", "step_callback", "check_callback", "items", "image_items", "broadcast", "repeat",
           "seeds", "item_strengths", "groups", "prompts", "batch_size", "requests", "given_latents", "StepEnd"]

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
MAX_SEED = 2**32 - 1  # torch's CPU generator (mt19937) keeps a seed's low 32 bits: s and s + 2**32 draw alike
# diffusers' argument names -> ours, taken as aliases wherever the function has our name
DIFFUSERS_NAMES = {"num_inference_steps": "steps", "mask_image": "mask", "padding_mask_crop": "crop_padding",
                   "torch_dtype": "dtype"}
_SAME_SIZE = "the output has the input image's size: resize the image (and mask) first"
_NO_SAFETY_CHECKER = "there is no safety checker here (None / False, which ask for none, are taken)"
# diffusers' arguments we do not take -> what to do instead; a TypeError says it where the function lacks the name
DIFFUSERS_INSTEAD = {
    "callback_on_step_end": "it makes no images",
    "callback_on_step_end_tensor_inputs": "it makes no images",
    "callback_steps": "callback=fn(step, latents) runs after every step: skip steps inside it",
    "cross_attention_kwargs": "a LoRA's scale is set when it is merged: set_adapters(name, weight) or "
                              "fuse_lora(lora_scale=...); other attention arguments are not supported",
    "strength": "strength is img2img's and inpaint's (they start from an image); generate starts from pure noise",
    "height": _SAME_SIZE, "width": _SAME_SIZE,
    "masked_image_latents": "give image= and mask=; the masked image is encoded here",
    "ip_adapter_image": "it takes no image prompt",
    "ip_adapter_image_embeds": "give ip_adapter_image=: its embedding is made here",
    "safety_checker": _NO_SAFETY_CHECKER, "requires_safety_checker": _NO_SAFETY_CHECKER,
    "feature_extractor": _NO_SAFETY_CHECKER,
    "use_safetensors": "only .safetensors are read (True is taken)",
    # from_single_file's: the configuration is read from the file's tensor shapes
    "config": "a file's configuration is read from its tensor shapes; for a v-prediction file pass "
              "prediction_type=\"v_prediction\" (or original_config= its .yaml)",
    "text_encoder": "the text encoder is the checkpoint's own (vae= replaces the VAE)",
    "unet": "the UNet is the checkpoint's own (vae= replaces the VAE)",
    "tokenizer": "the tokenizer is CLIP's, from the checkpoint or the built-in vocabulary",
    "scheduler": "choose sampler= per call; the noise schedule is the model's",
    "extract_ema": "the UNet's regular weights are read (diffusers' default); convert the file to read its EMA ones",
    "upcast_attention": "attention always accumulates in fp32 here",
    "load_safety_checker": _NO_SAFETY_CHECKER,
    "local_files_only": "Backdrop reads local files only (True is taken)",
}


# diffusers' arguments whose "off" value asks for what Backdrop does anyway: taken with that value, refused with another
DIFFUSERS_OFF = {"safety_checker": None, "requires_safety_checker": False, "feature_extractor": None,
                 "load_safety_checker": False, "local_files_only": True, "use_safetensors": True}


def diffusers_names(fn: Callable) -> Callable:
    """Let `fn` also take diffusers' names for its arguments (num_inference_steps= for steps=, ...), so code written
    for a diffusers pipeline runs unchanged; giving both names is a TypeError, and so is a diffusers argument `fn`
    does not take (DIFFUSERS_INSTEAD: the error says what to do instead)."""
    signature = inspect.signature(fn)
    params = signature.parameters
    aliases = {theirs: ours for theirs, ours in DIFFUSERS_NAMES.items() if ours in params}
    instead = {theirs: hint for theirs, hint in DIFFUSERS_INSTEAD.items() if theirs not in params}
    outputs = signature.return_annotation in ("Output", "'Output'")  # a pipeline call: return_dict applies
    if "callback" in params:  # diffusers' callback_on_step_end is taken, through StepEnd
        instead.pop("callback_on_step_end", None)
        instead.pop("callback_on_step_end_tensor_inputs", None)
    if not outputs:
        instead["return_dict"] = "it returns no Output"

    @functools.wraps(fn)
    def call(*args, **kwargs):
        for name in DIFFUSERS_OFF.keys() & kwargs.keys() & instead.keys():
            if kwargs[name] is DIFFUSERS_OFF[name]:
                del kwargs[name]
        if refused := sorted(instead.keys() & kwargs.keys()):
            raise TypeError(f"{fn.__name__}() does not take diffusers' {refused[0]}=: {instead[refused[0]]}")
        for theirs in aliases.keys() & kwargs.keys():
            ours = aliases[theirs]
            if ours in kwargs:
                raise TypeError(f"{fn.__name__}() got {ours}= and {theirs}= (diffusers' name for it); give one")
            kwargs[ours] = kwargs.pop(theirs)
        if "callback_on_step_end" in kwargs and "callback" in params:
            if kwargs.get("callback") is not None:
                raise TypeError(f"{fn.__name__}() got callback= and callback_on_step_end=; give one")
            kwargs["callback"] = StepEnd(kwargs.pop("callback_on_step_end"), args[0],
                                         kwargs.pop("callback_on_step_end_tensor_inputs", ("latents",)))
        elif "callback_on_step_end_tensor_inputs" in kwargs and "callback" in params:
            raise TypeError(f"{fn.__name__}() got callback_on_step_end_tensor_inputs= without callback_on_step_end=")
        if outputs and kwargs.pop("return_dict", True) is False:
            return fn(*args, **kwargs).to_tuple()  # (images, None), as diffusers' (images, nsfw_content_detected)
        return fn(*args, **kwargs)
    return call


def as_number(value, name: str, want: str, ok: Callable = lambda v: True, integer: bool = False):
    """`value` as a Python int (integer=True) or float: numpy scalars are taken, bools, strings and non-finite
    numbers are not; ValueError naming `name` and `want` unless ok(value)."""
    good = isinstance(value, numbers.Integral if integer else numbers.Real) and \
        not isinstance(value, (bool, np.bool_)) and (integer or math.isfinite(value)) and ok(value)
    if not good:
        raise ValueError(f"{name} must be {want}, got {value!r}")
    return int(value) if integer else float(value)


@dataclass(frozen=True)
class Loop:
    """One call's sampling settings, as the public methods take them; passed through to Pipeline._run unchanged.
    `schedule` is the full Schedule of the model's `scheduler` config, built here so that a bad steps/sampler/custom
    schedule is refused before any work; with custom timesteps/sigmas, `steps` becomes their number of steps."""
    steps: int
    sampler: str
    eta: float
    guidance_scale: float
    guidance_rescale: float
    progress: bool | None  # None: shown on a terminal only (tqdm's disable=None)
    callback: Callable | None
    interrupt: threading.Event | None
    scheduler: SchedulerConfig
    timesteps: object = None  # diffusers' custom schedules (schedule.custom_schedule): a list, or a name ("ays")
    sigmas: object = None
    schedule: Schedule = field(init=False)

    def __post_init__(self):  # numbers checked and made Python ints/floats (numpy scalars welcome)
        for name, want, ok, integer in (("steps", "an int >= 1", lambda v: v >= 1, True),
                                        ("guidance_scale", "a finite number >= 0", lambda v: v >= 0, False),
                                        ("guidance_rescale", "a finite number in [0, 1]", lambda v: 0 <= v <= 1, False),
                                        ("eta", "a number in [0, 1]", lambda v: 0 <= v <= 1, False)):
            object.__setattr__(self, name, as_number(getattr(self, name), name, want, ok, integer))
        check_eta(self.eta, self.sampler)
        schedule = build_schedule(self.sampler, self.steps, self.scheduler, timesteps=self.timesteps,
                                  sigmas=self.sigmas)
        custom = "timesteps" if self.timesteps is not None else "sigmas" if self.sigmas is not None else None
        # a custom schedule sets the step count (steps= ignored, as diffusers), unless steps= was given and says
        # otherwise (without one, trailing spacing at some N runs N + 1 steps, as diffusers: steps= stays N)
        if custom and schedule.num_steps != self.steps:
            if self.steps != SAMPLING_DEFAULTS["steps"]:
                raise ValueError(f"steps={self.steps}, but {custom}= has {schedule.num_steps} steps: give one of "
                                 "them (a custom schedule sets the number of steps)")
            object.__setattr__(self, "steps", schedule.num_steps)
        object.__setattr__(self, "schedule", schedule)
        if self.callback is not None:
            check_callback(self.callback)
        if self.interrupt is not None and not callable(getattr(self.interrupt, "is_set", None)):
            raise TypeError(f"interrupt must be a threading.Event (set it from another thread to stop the call), got "
                            f"{type(self.interrupt).__name__}")


@dataclass(frozen=True)
class MaskOptions:
    """One inpaint call's mask handling, as Pipeline.inpaint takes it (its docstring says what each does)."""
    blur: float                   # paste-back feather sigma, px (None given: masks.default_mask_blur)
    dilate: int                   # latent cells the model's repaint region grows by
    crop_padding: int | None      # None: the whole image; N: the mask's box grown by N px
    threshold: float | None       # None: the mask as given; t: binarised, >= t repaints
    mode: str                     # "max" | "diffusers": how the mask shrinks to latent cells
    paste_back: bool
    color_match: bool

    def __post_init__(self):  # numbers checked and made Python ints/floats, as Loop's; named as inpaint's arguments
        for attr, name, want, ok, integer in (
                ("blur", "mask_blur", "a number >= 0 (pixels) or None", lambda v: v >= 0, False),
                ("dilate", "mask_dilate", "an int >= 0 (latent cells)", lambda v: v >= 0, True),
                ("crop_padding", "crop_padding", "an int >= 0 (pixels) or None", lambda v: v >= 0, True),
                ("threshold", "mask_threshold", "a number in (0, 1] or None", lambda v: 0 < v <= 1, False)):
            value = getattr(self, attr)
            if value is not None or attr == "dilate":  # blur is never None here: inpaint resolves its default
                object.__setattr__(self, attr, as_number(value, name, want, ok, integer))
        if self.mode not in ("max", "diffusers"):
            raise ValueError(f"mask_mode must be 'max' or 'diffusers', got {self.mode!r}")


class StepEnd:
    """diffusers' callback_on_step_end(pipe, step, timestep, callback_kwargs) -> dict, run after every step with the
    latents as diffusers' loop holds them: VP-scaled x / sqrt(1 + sigma^2) for its VP schedulers (DDIM, DPM-Solver,
    UniPC, LCM, PNDM, DDPM), x itself for Euler and Heun, whose latents live at sigma's scale. Latents it returns
    replace ours. Only "latents" is offered (diffusers' prompt_embeds and the guidance attributes its callbacks
    change are not); Heun and PNDM call it once per step, not at their intermediate model calls."""

    def __init__(self, fn, pipe, inputs=("latents",)):
        if not callable(fn):
            raise TypeError(f"callback_on_step_end must be callable as fn(pipe, step, timestep, callback_kwargs), "
                            f"got {fn!r:.80}")
        if unknown := sorted(set(inputs) - {"latents"}):
            raise ValueError(f"callback_on_step_end_tensor_inputs: {unknown} are not offered here; only 'latents'")
        self.fn, self.pipe = fn, pipe

    def __call__(self, i: int, x, sigma_next: float, schedule):
        scale = 1.0 if RECIPES[schedule.sampler].family == "k" else (1 + float(sigma_next) ** 2) ** -0.5
        out = self.fn(self.pipe, i, schedule.timesteps[i], {"latents": x * scale})
        new = out.get("latents") if isinstance(out, dict) else None
        if new is None:
            return x
        if tuple(new.shape) != tuple(x.shape):
            raise ValueError(f"callback_on_step_end returned latents of shape {tuple(new.shape)}, expected "
                             f"{tuple(x.shape)}")
        return new.to(x.device, x.dtype) / scale


def check_callback(callback) -> None:
    """A TypeError now, not after the first step, unless callback(step, latents) can be called."""
    if isinstance(callback, StepEnd):  # checked when made
        return
    want = "callback must be callable as callback(step, latents), run after every step"
    if not callable(callback):
        raise TypeError(f"{want}; got {callback!r:.80}")
    try:
        inspect.signature(callback).bind(0, None)
    except ValueError:  # no signature to read (some builtins): left to the call
        return
    except TypeError:
        raise TypeError(f"{want}; {callback!r:.80} does not take those two arguments (diffusers' deprecated callback "
                        "took (step, timestep, latents))") from None


def items(value, name: str, mask: bool = False) -> list:
    """One request's value or a list of them: a list/tuple, a 4-D array (B, H, W, C) / tensor (B, C, H, W), or
    one item (masks.py reads its batches the same way). A `mask` is a batch in 3-D too, as diffusers reads one:
    a tensor (B, H, W), or an array (B, H, W) whose last side is over 4 (else it is one (H, W, C) mask)."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"{name}: empty list")
        return list(value)
    if isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim == 4:
        return list(value)
    if mask and (isinstance(value, torch.Tensor) and value.ndim == 3 or
                 isinstance(value, np.ndarray) and value.ndim == 3 and value.shape[-1] > 4):
        return list(value)
    return [value]


def image_items(image, method: str) -> list:
    """items(image) of img2img / inpaint, which take the image first where diffusers' pipelines take the prompt
    first: a string in its place is named as that mix-up."""
    images = items(image, "image")
    if isinstance(images[0], str):
        raise TypeError(f"{method}() takes the image first, {method}(image, ...), and got the string "
                        f"{images[0]!r:.40} for it; diffusers' pipelines take the prompt first: pass prompt= and "
                        "image= by name")
    return images


def broadcast(values: list, n: int, name: str) -> list:
    if len(values) == n:
        return values
    if len(values) == 1:
        return values * n
    raise ValueError(f"{name}: {len(values)} values for {n} requests; give one, or one per request")


def repeat(values: list, k: int) -> list:
    return [v for v in values for _ in range(k)]


def seeds(seed, n: int, k: int) -> list[int]:
    """Per output item (n requests x k images): request i image j gets seeds[i] + j; an int s (numpy's too) is
    [s, s+k, ...]."""
    if seed is None:  # from torch's global RNG, as diffusers' generator=None: torch.manual_seed(0) repeats a call
        seed = int(torch.randint(0, 2**31, ()).item())
    one = isinstance(seed, numbers.Integral) and not isinstance(seed, (bool, np.bool_))
    base = [int(seed) + i * k for i in range(n)] if one else broadcast(items(seed, "seed"), n, "seed")
    for s in base:
        if not isinstance(s, numbers.Integral) or isinstance(s, (bool, np.bool_)) or not 0 <= s <= MAX_SEED + 1 - k:
            raise ValueError(f"seed {s!r} must be an int in [0, 2**32 - num_images_per_prompt] (torch's generator "
                             "keeps 32 bits of a seed)")
    starts = sorted({int(s) for s in base})  # requests may share a seed (one seed, several prompts), but ranges
    for a, b in zip(starts, starts[1:]):  # that partly overlap are a slip: seed=[10, 11], 2 images each: 10, 11, 11, 12
        if b - a < k:
            raise ValueError(f"seeds {a} and {b} with num_images_per_prompt={k} give two images the seed {b} (request "
                             f"i image j gets seed[i] + j): space the seeds at least {k} apart, or repeat one")
    return [int(s) + j for s in base for j in range(k)]


def item_strengths(strength, n: int, k: int) -> list[float]:
    """One strength or one per request -> one per output item, each a number in (0, 1]."""
    return repeat([as_number(s, "strength", "a number in (0, 1]", lambda v: 0 < v <= 1)
                   for s in broadcast(items(strength, "strength"), n, "strength")], k)


def groups(strengths: list[float]) -> dict[float, list[int]]:
    """Item indices per distinct strength, in order of first appearance."""
    out: dict[float, list[int]] = {}
    for i, s in enumerate(strengths):
        out.setdefault(s, []).append(i)
    return out


def prompts(text, embeds, name: str, width: int) -> list:
    """One request's prompt or a list: strings, or the rows (L, C) of `embeds` (n, L, C) / (L, C), C = `width`
    (the UNet's cross_attention_dim)."""
    if embeds is None:
        texts = items("" if text is None else text, name)
        if not all(isinstance(t, str) for t in texts):
            raise ValueError(f"{name} must be a string or a list of strings")
        return texts
    if text not in (None, ""):
        raise ValueError(f"give {name} or {name}_embeds, not both")
    if not (isinstance(embeds, torch.Tensor) and embeds.is_floating_point() and embeds.ndim in (2, 3)
            and embeds.shape[-1] == width and embeds.shape[-2] > 0):
        got = tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
        raise ValueError(f"{name}_embeds must be a float tensor (n, L, {width}) or (L, {width}) (this UNet's "
                         f"cross_attention_dim), got {got}")
    return list(embeds[None] if embeds.ndim == 2 else embeds)


def batch_size(lengths: dict[str, int]) -> int:
    """n requests, from the lengths of a call's lists by argument name: each must be 1 (broadcast) or n, else a
    ValueError naming two that disagree."""
    many = {name: m for name, m in lengths.items() if m != 1}
    if len(set(many.values())) > 1:
        longest = max(many, key=many.get)
        other = next(name for name, m in many.items() if m != many[longest])
        raise ValueError(f"{longest} has {many[longest]} values and {other} {many[other]}: the lists of one call "
                         "need one length (a value per request), or one value for all")
    return max(many.values(), default=1)


def requests(prompt, negative_prompt, seed, k, output_type, lengths: dict[str, int] | None = None,
             embeds=(None, None), *, width: int, generator=None) -> dict:
    """n requests (batch_size over prompt, negative prompt, seed and the caller's `lengths`: image, mask,
    strength) x k images each.
    A prompt is a string, or a row (L, C) of `embeds` (prompt_embeds, negative_prompt_embeds) given instead.
    `generator` (diffusers' argument, instead of `seed`): one torch.Generator for the whole batch or one per
    output item; "generators" is then it, and "seeds" their initial seeds."""
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type {output_type!r} is not one of {', '.join(OUTPUT_TYPES)}")
    k = as_number(k, "num_images_per_prompt", "an int >= 1", lambda v: v >= 1, integer=True)
    texts, negatives = (prompts(t, e, name, width) for t, e, name in
                        ((prompt, embeds[0], "prompt"), (negative_prompt, embeds[1], "negative_prompt")))
    n = batch_size({"prompt": len(texts), "negative_prompt": len(negatives),
                    "seed": len(items(seed, "seed")) if isinstance(seed, (list, tuple)) else 1, **(lengths or {})})
    gens = _generators(generator, seed, n * k)
    return dict(n=n, k=k, output_type=output_type, generators=gens,
                seeds=seeds(seed, n, k) if gens is None else
                [g.initial_seed() for g in (gens if isinstance(gens, list) else [gens] * (n * k))],
                prompts=repeat(broadcast(texts, n, "prompt"), k),
                negatives=repeat(broadcast(negatives, n, "negative_prompt"), k))


def _generators(generator, seed, b: int):
    """None, one torch.Generator (draws the whole batch, as in diffusers), or a list of b (one per item)."""
    if generator is None:
        return None
    if seed is not None:
        raise ValueError("give seed= or generator= (diffusers' argument), not both")
    gens = [generator] if isinstance(generator, torch.Generator) else items(generator, "generator")
    if not all(isinstance(g, torch.Generator) for g in gens):
        raise ValueError(f"generator must be a torch.Generator or a list of them, got {generator!r:.80}")
    if isinstance(generator, torch.Generator):
        return generator
    if len(gens) != b:
        raise ValueError(f"generator: {len(gens)} generators for {b} images (requests x num_images_per_prompt); "
                         "give one, or one per image")
    return gens


def given_latents(latents, shape: tuple, rows: list[int] | None = None) -> torch.Tensor:
    """The caller's `latents` (unit-variance initial noise: a float tensor or array) checked against `shape`
    (B, C, h, w), B every output item of the call; rows: the items sampled (inpaint skips those with nothing to
    repaint), None for all."""
    if isinstance(latents, np.ndarray):
        latents = torch.from_numpy(latents)
    if not isinstance(latents, torch.Tensor) or not latents.is_floating_point():
        raise ValueError(f"latents must be a float tensor or array (unit-variance noise), got "
                         f"{type(latents).__name__} {getattr(latents, 'dtype', '')}")
    if tuple(latents.shape) != tuple(shape):
        raise ValueError(f"latents must have shape {tuple(shape)} (batch, latent channels, height / 8, width / 8)"
                         f", got {tuple(latents.shape)}")
    return latents if rows is None else latents[rows]


def step_callback(blend, user, schedule) -> Callable | None:
    """The sampler's callback(i, x, sigma, sigma_next, denoised): the 4-channel blend, then the user's hook (ours,
    or diffusers' callback_on_step_end, which may replace the latents: batching.StepEnd)."""
    if blend is None and user is None:
        return None

    def step(i, x, sigma, sigma_next, denoised):
        if blend is not None:
            x = blend(i, x, sigma, sigma_next, denoised)
        if isinstance(user, StepEnd):
            x = user(i, x, sigma_next, schedule)
        elif user is not None:
            user(i, x)
        return x
    return step
