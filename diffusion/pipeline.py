"""Pipeline: text-to-image, image-to-image and inpainting over any Backend (export/backends.py).

Thin on purpose: the math lives in schedule.py / samplers.py / latents.py / guidance.py, every image and mask
operation in masks.py and crop_paste.py (crop around the mask, paste-back), how one call's arguments become
per-item lists in batching.py, and how prompts become the UNet's context in text.py; this file only follows their
recipes (the module docstrings of samplers.py and masks.py) and runs the models. One call may hold different
prompts, images (of one size), masks, seeds and strengths:

  * Broadcasting. `prompt`, `negative_prompt`, `image`, `mask`/`product_mask`, `seed` and `strength` may each be
    one value or a list of n (the n requests); a single value applies to all. num_images_per_prompt = k then
    repeats each request k times: the output holds n * k items, request i's first.
  * Seeds. Output item m of request i is drawn from its own torch.Generator seeded with seeds[i] + j (j < k), so
    seed s gives the same image alone or in any batch (up to batched-matmul rounding, ~1/255). An int seed s means
    seeds [s, s + k, s + 2k, ...], i.e. output item m gets s + m; None draws the base from torch's global RNG (so
    torch.manual_seed repeats a call, as diffusers' generator=None does). Output.seeds reports
    every item's seed, so any image can be reproduced alone. The first draw of each generator is the initial
    noise (unless `latents` gives it), the later draws feed stochastic samplers, as diffusers with a list of
    generators. `generator` (diffusers' argument, instead of seed) takes the caller's torch.Generator(s): one for
    the whole batch or one per output item. generate draws from them exactly what diffusers' StableDiffusionPipeline
    draws; img2img and inpaint draw the initial noise first, where diffusers' pipelines first draw a VAE posterior
    sample (we encode with the posterior mean), so their images differ from diffusers' for the same generator.
  * pipe(prompt, image=, mask_image=, ...) is diffusers' call: inpaint with a mask, img2img with an image alone,
    generate otherwise.
  * diffusers' names work too: num_inference_steps (steps), mask_image (mask), padding_mask_crop (crop_padding),
    torch_dtype (from_pretrained's dtype), output_type "pt"; see batching.DIFFUSERS_NAMES. diffusers' arguments
    we lack are a TypeError that says what to use instead (batching.DIFFUSERS_INSTEAD). img2img and inpaint take
    the image first (diffusers' pipelines: the prompt): pass diffusers' arguments by name.
  * `latents` (B, 4, h, w) is unit-variance initial noise, as in diffusers (it is scaled by the schedule); below
    strength 1 it is the noise added to the image (diffusers' inpaint then starts from the noise alone).
  * `timesteps` / `sigmas` (diffusers' arguments) give a custom schedule, e.g. Align Your Steps' 10 steps for SD1.5
    (timesteps="ays" or sigmas="ays" name them: recipes.NAMED_SCHEDULES): descending timesteps for ddpm, euler,
    heun, dpmpp-2m(-sde) and lcm, descending sigmas (the last one the final level, usually 0) for euler, as
    diffusers' schedulers take them. The number of steps is then the list's (a steps= other than the default that
    disagrees is an error); img2img and inpaint with strength s run its last int(N * s) steps.
  * `ip_adapter_image` (diffusers' argument): the image prompt of an IP-Adapter loaded with load_ip_adapter; one
    image for the whole call, or one per request (nn/ip_adapter.py, image_prompt.py).
  * `control_image` with pipe.controlnet set (diffusers' ControlNet pipelines' arguments): diffusion/control.py;
    `adapter_image` with pipe.adapter set (diffusers' T2I-Adapter pipeline's image=): diffusion/t2i.py.
  * `eta` is DDIM's noise (0 = deterministic, 1 = as DDPM), diffusers' `eta`: for sampler "ddim" only (diffusers
    ignores it elsewhere; we refuse it there rather than silently drop it).
  * Strengths. Samplers take one sigma per step for the whole batch, so items with different strengths run as
    separate sampler loops (one per distinct strength) in one call; outputs keep the input order.
  * Text is encoded once per distinct prompt and negative prompt, in one text encoder call. A text over CLIP's 77
    tokens is cut there (as diffusers does), with a logged warning that names the dropped words. Instead of text,
    `prompt_embeds` / `negative_prompt_embeds` (n, L, C) give the embeddings (diffusers' arguments; encode_prompt
    makes them from text, to encode once and reuse). With neither, the prompt is "" (unconditional).
  * clip_skip (diffusers' argument; None or 0 = the last layer): the context from the text encoder's output that
    many layers before the last, for the prompts and, unlike diffusers, the negative prompts too (text.py says
    why). Torch backend only: an exported text encoder ends at its last layer, so the others refuse it by name.
  * load_textual_inversion adds learned words (diffusers' or A1111's .safetensors; nn/textual_inversion.py) to
    the torch backend's tokenizer and text encoder, as diffusers' method; unload_textual_inversion removes them.
  * Sizes need not be multiples of 8: images are reflect-padded (masks.pad_to_multiple) and outputs cropped back,
    so the output has the input's size. generate's height/width default to the model's native image_size, the
    resolution it was trained at (512 for SD1.5, 768 for SD2-v, 64 for the tiny model): anything else is slower
    (bigger) or worse (smaller) by default.
  * callback(step, latents) runs after every sampler step with the current latents (B, 4, h, w) in the sampler's
    variance-exploding form x0 + sigma * noise (4-channel inpainting: after the known region is blended back);
    with mixed strengths it runs per strength group, with that group's items. Its return value is ignored.
    progress=False hides the tqdm bar over the steps (set_progress_bar_config(disable=True): every call's default).
  * interrupt (threading.Event): set it from another thread and the call raises samplers.SamplingInterrupted
    before the next step (nothing half-done is returned; partial latents are not worth decoding).

Inpainting follows masks.py's walk-through. 9-channel (inpainting) UNets get the latent mask and the VAE latents
of the masked image as extra input channels; plain 4-channel UNets get the known region blended back after every
step (latents.blend_known_region), as diffusers' StableDiffusionInpaintPipeline does for both. The VAE encodes with
the posterior mean (deterministic; diffusers draws a posterior sample from the generator instead, so the parity
tests hand diffusers our latents). A mask-conditioned VAE (AsymmetricAutoencoderKL) decodes with the image and the
user's binarized repaint mask as its condition, as diffusers' pipeline passes them. With paste_back every kept pixel
of the output is bit-identical to the input.

Output and output_type ("pil", "np", "pt", "latent"): output.py.

Which model, device and precision `from_pretrained` picks by default: nn/resolve.py.
"""
from __future__ import annotations

import logging
import os
import threading
from typing import Callable

import numpy as np
import torch

from backdrop.diffusion import crop_paste as C
from backdrop.diffusion import masks as M
from backdrop.diffusion import pixels as P
from backdrop.diffusion.adapters import Adapters
from backdrop.diffusion.batching import (OUTPUT_TYPES, Loop, MaskOptions, as_number, broadcast, step_callback,
                                        diffusers_names, given_latents, groups, image_items, item_strengths, items,
                                        prompts, repeat, requests)
from backdrop.diffusion.control import controlled_unet
from backdrop.diffusion.diffusers_api import DiffusersAPI
from backdrop.diffusion.guidance import CFGDenoiser
from backdrop.diffusion.image_prompt import IPAdapterMixin, image_prompt
from backdrop.diffusion.inpaint_items import PerDistinct, distinct, repaint_masks
from backdrop.diffusion.latents import (blend_known_region, default_noise_sampler, initial_latents, known_region,
                                        noised_latents, output_latents, per_item_randn)
from backdrop.diffusion.output import Output, as_hwc, decoded, format_output, item_numbers, with_profiles
from backdrop.diffusion.processing import Processing
from backdrop.diffusion.samplers import SamplingInterrupted, sample
from backdrop.diffusion.text import check_clip_skip, contexts, embed
from backdrop.nn.ip_adapter import with_ip_links
from backdrop.nn.resolve import default_device, default_dtype, parse_dtype, resolve_model, unet_width

__all__ = ["Pipeline", "Output", "SamplingInterrupted", "OUTPUT_TYPES"]

log = logging.getLogger(__name__)

def _hidden(progress: bool | None) -> bool | None:
    """tqdm's disable= for a call's progress (None stays None: shown on a terminal only)."""
    return None if progress is None else not progress


# ----------------------------------------------------------------------------------------------------- pipeline

class Pipeline(DiffusersAPI, IPAdapterMixin, Processing):
    """generate / img2img / inpaint over a Backend (encode_text, unet, vae_encode, vae_decode); LoRA / textual
    inversion loading, ControlNets, T2I-Adapters and diffusers' switches (set_progress_bar_config, ...) come from
    diffusers_api.py, the IP-Adapter methods from image_prompt.py, image sizes, padding and VAE encoding from
    processing.py."""

    def __init__(self, backend):
        for attr in ("config", "tokenizer", "device", "encode_text", "unet", "vae_encode", "vae_decode"):
            if not hasattr(backend, attr):
                raise TypeError(f"Pipeline: {type(backend).__name__} is not a Backend (no {attr!r}); see "
                                "export/backends.py")
        self.backend = backend
        self.config = backend.config
        # Image sides are padded to this: the VAE's 8x, times the latent multiple a backend may need (exported
        # ONNX/TensorRT UNets: 2^(levels-1) latent cells; our torch UNet takes any latent size).
        self._multiple = backend.config.vae.downsample_factor * getattr(backend, "latent_multiple", 1)
        self.fixed_size = getattr(backend, "static_hw", None)  # (H, W) px of an export made with --size, else None
        self._warned: set = set()  # processing sizes already warned about (processing_size)
        self._width = backend.config.unet.cross_attention_dim  # of the text context: prompt_embeds' last dim
        self._adapters = Adapters()  # the LoRAs loaded (load_lora_weights), the active ones, what is merged
        self._ip = None  # (IPAdapter, its links) loaded by load_ip_adapter: nn/ip_adapter.py
        self._controlnets = ()  # the ControlNets every call runs (pipe.controlnet): nn/controlnet.py
        self._t2i = ()  # the T2I-Adapters every call runs (pipe.adapter): nn/t2i_adapter.py
        self._progress, self._bar = True, {}  # the default of each call's progress=, and tqdm options

    @classmethod
    @diffusers_names
    def from_pretrained(cls, path_or_name, device=None, dtype=None, backend: str = "torch",
                        prediction_type: str | None = None, vae=None, allow_pickle: bool = False,
                        variant: str | None = None, controlnet=None, adapter=None, **backend_options) -> "Pipeline":
        """A model folder, one .safetensors file, or a built-in model's name (backend "torch"), or an export
        folder (backend "onnxruntime" / "tensorrt", see export/). device: default CUDA if present; dtype
        (torch.dtype or "fp32"/"bf16"/"fp16", or "auto": as the UNet's weights are stored, diffusers'
        torch_dtype="auto"): default `default_dtype(device, unet_width(path))` for torch.
        prediction_type ("epsilon" / "v_prediction": what a single file's UNet predicts, which the file does not
        say), vae (a VAE file or folder to run instead of the model's), allow_pickle and variant (diffusers':
        "fp16" reads a folder's .fp16.safetensors files): load_model's. controlnet: a ControlNet, its path, or a
        list of them (pipe.controlnet); a saved diffusers ControlNet pipeline folder brings its own. adapter: a
        T2I-Adapter's diffusers folder, or a list of them (pipe.adapter).
        backend_options: an export backend's own (onnxruntime: providers=("tensorrt", "cuda"), threads=,
        trt_cache=; tensorrt: cuda_graphs=), as Optimum's ORT pipelines take provider= and session options."""
        from backdrop.export.backends import make_backend
        from backdrop.nn.checkpoint import load_model
        from backdrop.nn.controlnet import load_controlnet, saved_controlnets
        from backdrop.nn.weight_files import stored_dtype

        path = resolve_model(path_or_name)
        device = torch.device(device) if device is not None else default_device()
        if dtype == "auto":  # an export's backend runs in its own precision: None takes it
            dtype = stored_dtype(path, variant) if backend == "torch" else None
        if backend != "torch" and adapter is not None:
            raise ValueError(f"adapter= needs the torch backend, not {backend}: an export's UNet takes no adapter "
                             "features")
        if backend != "torch" and controlnet is not None:
            raise ValueError(f"controlnet= needs the torch backend, not {backend}: an export's UNet takes no "
                             "ControlNet residuals")
        if backend != "torch":  # an export folder runs in its own precision; the backend refuses another
            loading = [n for n, v in (("prediction_type", prediction_type), ("vae", vae),
                                      ("allow_pickle", allow_pickle), ("variant", variant)) if v]
            if loading:
                raise ValueError(f"from_pretrained: {loading[0]}= is for loading a model; an export holds the model "
                                "as it was exported (give it to `backdrop export` instead)")
            return cls(make_backend(backend, path, device=device, dtype=parse_dtype(dtype), **backend_options))
        if backend_options:
            raise TypeError(f"from_pretrained: the torch backend takes no backend options, got "
                            f"{sorted(backend_options)} (they are the onnxruntime and tensorrt backends')")
        dtype = parse_dtype(dtype) or default_dtype(device, unet_width(path))
        if vae is not None and not isinstance(vae, (str, os.PathLike)):
            raise TypeError(f"from_pretrained: vae= takes the path of a VAE (.safetensors file or folder), got a "
                            f"{type(vae).__name__}")
        model = load_model(path, dtype=dtype, device=device, prediction_type=prediction_type, vae=vae,
                           allow_pickle=allow_pickle, variant=variant)
        pipe = cls(make_backend("torch", model, device=device, dtype=dtype))
        nets = controlnet if isinstance(controlnet, (list, tuple)) else [controlnet] * (controlnet is not None)
        nets = [load_controlnet(n, dtype, device, allow_pickle, variant) if isinstance(n, (str, os.PathLike)) else n
                for n in nets or saved_controlnets(path)]  # a saved ControlNet pipeline's own, as diffusers'
        pipe.controlnet = nets if isinstance(controlnet, (list, tuple)) or len(nets) > 1 else (nets or [None])[0]
        pipe.adapter = adapter
        return pipe

    # -------------------------------------------------------------------------------------------- public API

    def _shows(self, progress: bool | None) -> bool | None:
        """Whether a call shows its tqdm bar (None: on a terminal only): its own progress=, else the
        set_progress_bar_config default."""
        return self._progress if progress is None else bool(progress)

    @diffusers_names
    def generate(self, prompt=None, negative_prompt="", height: int | None = None, width: int | None = None,
                 steps: int = 30, guidance_scale: float = 7.5, sampler: str = "dpmpp-2m", seed=None, latents=None,
                 num_images_per_prompt: int = 1, output_type: str = "pil", guidance_rescale: float = 0.0,
                 eta: float = 0.0, prompt_embeds=None, negative_prompt_embeds=None, generator=None,
                 clip_skip: int | None = None, timesteps=None, sigmas=None, ip_adapter_image=None,
                 control_image=None, controlnet_conditioning_scale=1.0, control_guidance_start=0.0,
                 control_guidance_end=1.0, guess_mode: bool = False, adapter_image=None,
                 adapter_conditioning_scale=1.0, adapter_conditioning_factor=1.0, progress: bool | None = None,
                 callback: Callable | None = None, interrupt: threading.Event | None = None) -> Output:
        """Text to image. height/width: default the model's native config.image_size (an export made with a fixed
        --size: that size; with a ControlNet or a T2I-Adapter, the control / adapter image's size); any positive
        size works (sampled at the next multiple of 8, then cropped). `callback(step, latents)` runs after every
        step."""
        loop = Loop(steps, sampler, eta, guidance_scale, guidance_rescale, self._shows(progress), callback,
                    interrupt, self.config.scheduler, timesteps, sigmas)
        ip = image_prompt(self._ip, ip_adapter_image)  # the IP-Adapter loaded now: the call keeps it
        req = requests(prompt, negative_prompt, seed, num_images_per_prompt, output_type, ip.lengths,
                       embeds=(prompt_embeds, negative_prompt_embeds), width=self._width, generator=generator)
        req["clip_skip"], req["ip"] = check_clip_skip(clip_skip, self.backend), ip.tokens(req["n"], req["k"])
        control = self._control(control_image, controlnet_conditioning_scale, control_guidance_start,
                                control_guidance_end, guess_mode, req, adapter_image, adapter_conditioning_scale,
                                adapter_conditioning_factor)
        native = self.fixed_size or (control.size if control else (self.config.image_size,) * 2)
        H, W = (default if v is None else as_number(v, name, "an int >= 1 (pixels) or None", lambda v: v >= 1,
                                                    integer=True)
                for v, name, default in ((height, "height", native[0]), (width, "width", native[1])))
        B, f = len(req["prompts"]), self.config.vae.downsample_factor
        h, w = (d // f for d in self.processing_size(H, W))
        job = dict(req, strengths=[1.0] * B, x0=None, size=(H, W), c_concat=self._empty_concat(B, h, w),
                   control=control and control.at((H, W), self._pad))
        return self._run(job, (h, w), loop, latents, start="noise")

    @diffusers_names
    def img2img(self, image, prompt=None, strength=0.75, negative_prompt="", steps: int = 30,
                guidance_scale: float = 7.5, sampler: str = "dpmpp-2m", seed=None, latents=None,
                num_images_per_prompt: int = 1, output_type: str = "pil", guidance_rescale: float = 0.0,
                eta: float = 0.0, prompt_embeds=None, negative_prompt_embeds=None, generator=None,
                clip_skip: int | None = None, timesteps=None, sigmas=None, ip_adapter_image=None,
                control_image=None, controlnet_conditioning_scale=0.8, control_guidance_start=0.0,
                control_guidance_end=1.0, guess_mode: bool = False, adapter_image=None,
                adapter_conditioning_scale=1.0, adapter_conditioning_factor=1.0, progress: bool | None = None,
                callback: Callable | None = None, interrupt: threading.Event | None = None) -> Output:
        """Image to image: the image's latents noised to `strength` (1 = all noise), then int(steps * strength)
        steps, as diffusers' StableDiffusionImg2ImgPipeline. Output has the input's size."""
        loop = Loop(steps, sampler, eta, guidance_scale, guidance_rescale, self._shows(progress), callback,
                    interrupt, self.config.scheduler, timesteps, sigmas)
        images = image_items(image, "img2img")
        n_strengths = len(strength) if isinstance(strength, (list, tuple)) else 1
        ip = image_prompt(self._ip, ip_adapter_image)
        req = requests(prompt, negative_prompt, seed, num_images_per_prompt, output_type,
                       {"image": len(images), "strength": n_strengths, **ip.lengths},
                       embeds=(prompt_embeds, negative_prompt_embeds), width=self._width, generator=generator)
        req["clip_skip"], req["ip"] = check_clip_skip(clip_skip, self.backend), ip.tokens(req["n"], req["k"])
        control = self._control(control_image, controlnet_conditioning_scale, control_guidance_start,
                                control_guidance_end, guess_mode, req, adapter_image, adapter_conditioning_scale,
                                adapter_conditioning_factor)
        n, k = req["n"], req["k"]
        images = broadcast(images, n, "image")
        img = P.image_to_uint8(repeat(images, k))  # (B, H, W, 3)
        strengths = item_strengths(strength, n, k)
        H, W = img.shape[1:3]
        x0 = self._encode_image(self._pad(P.image_to_tensor(img)))  # (B, 4, h, w)
        job = dict(req, strengths=strengths, x0=x0, size=(H, W), control=control and control.at((H, W), self._pad),
                   c_concat=self._empty_concat(len(img), *x0.shape[-2:]))
        return with_profiles(self._run(job, tuple(x0.shape[-2:]), loop, latents, start="image"), images, k)

    @diffusers_names
    def inpaint(self, image, mask=None, prompt=None, product_mask=None, strength=1.0, mask_blur: float | None = None,
                mask_dilate: int = 1, crop_padding: int | None = None, paste_back: bool = True,
                color_match: bool = False, negative_prompt="", steps: int = 30, guidance_scale: float = 7.5,
                sampler: str = "dpmpp-2m", seed=None, latents=None, num_images_per_prompt: int = 1,
                output_type: str = "pil", guidance_rescale: float = 0.0, eta: float = 0.0, mask_mode: str = "max",
                mask_threshold: float | None = None, prompt_embeds=None, negative_prompt_embeds=None,
                generator=None, clip_skip: int | None = None, timesteps=None, sigmas=None,
                ip_adapter_image=None, control_image=None, controlnet_conditioning_scale=0.5,
                control_guidance_start=0.0, control_guidance_end=1.0, guess_mode: bool = False,
                adapter_image=None, adapter_conditioning_scale=1.0, adapter_conditioning_factor=1.0,
                progress: bool | None = None, callback: Callable | None = None,
                interrupt: threading.Event | None = None) -> Output:
        """Repaint the masked region. Give `mask` (white = repaint), `product_mask` (white = keep the product), or
        neither with RGBA images (OpenAI's convention: alpha 0 = repaint).

        mask_blur    feather sigma in pixels for paste-back; None: 4 with `mask`, 0 with `product_mask` or an RGBA
                     image, whose edge is the product's own (a feather there blends in the old backdrop; see
                     masks.default_mask_blur).
        mask_dilate  grow the region the model repaints by this many latent cells (8 px); paste-back still uses
                     the original mask, so the product stays exact while its halo gets repainted.
        crop_padding None: process the whole image; N: process only the box around the mask grown by N px, at
                     the model's native resolution (longer side = config.image_size), then paste it back.
        paste_back   put the input's pixels back wherever the mask keeps them (bit-identical).
        color_match  remove the generated image's colour cast, measured on the kept region, before pasting.
        mask_mode    "max" (ours: a latent cell is repainted if any of its pixels is) or "diffusers"
                     (binarise at 0.5, nearest resize, a crop's mask Lanczos-resized; with mask_dilate=0 and
                     paste_back=False, reproduces StableDiffusionInpaintPipeline).
        mask_threshold  None: the mask as given (grey = partly repainted); t in (0, 1]: binarised, >= t repaints
                     (for noisy masks, e.g. a JPEG product mask whose compression noise would otherwise mark
                     stray pixels for repainting; 0.5 is diffusers' binarisation).
        An item whose mask has nothing to repaint is returned as the input (listed in Output.unchanged).
        """
        loop = Loop(steps, sampler, eta, guidance_scale, guidance_rescale, self._shows(progress), callback,
                    interrupt, self.config.scheduler, timesteps, sigmas)
        images = image_items(image, "inpaint")
        kind, given = M.convention(mask, product_mask, images[0])
        masks = items(given, kind, mask=True) if kind != "image" else images
        n_strengths = len(strength) if isinstance(strength, (list, tuple)) else 1
        ip = image_prompt(self._ip, ip_adapter_image)
        req = requests(prompt, negative_prompt, seed, num_images_per_prompt, output_type,
                       {"image": len(images), kind: len(masks), "strength": n_strengths, **ip.lengths},
                       embeds=(prompt_embeds, negative_prompt_embeds), width=self._width, generator=generator)
        req["clip_skip"], req["ip"] = check_clip_skip(clip_skip, self.backend), ip.tokens(req["n"], req["k"])
        control = self._control(control_image, controlnet_conditioning_scale, control_guidance_start,
                                control_guidance_end, guess_mode, req, adapter_image, adapter_conditioning_scale,
                                adapter_conditioning_factor)
        n, k = req["n"], req["k"]
        images, masks = broadcast(images, n, "image"), broadcast(masks, n, kind)
        strengths = item_strengths(strength, n, k)
        opts = MaskOptions(M.default_mask_blur(kind) if mask_blur is None else mask_blur, mask_dilate, crop_padding,
                           mask_threshold, mask_mode, paste_back, color_match)
        img = P.image_rows(repeat(images, k))  # (H, W, 3) uint8 per item, the pixels paste-back keeps; one per photo
        H, W = img[0].shape[:2]
        per_item = repaint_masks(kind, masks, (H, W), opts.threshold)  # (1, 1, H, W) each, None: nothing to do
        todo = [i for i in range(n * k) if per_item[i // k] is not None]
        unchanged = [i for i in range(n * k) if per_item[i // k] is None]
        if unchanged and output_type == "latent":
            raise ValueError(f"inpaint items {unchanged} have nothing to repaint; output_type='latent' has no "
                             "latents to return for them")
        if not todo:
            return with_profiles(format_output(np.stack(img), req["seeds"], output_type, unchanged), images, k)
        pick = lambda v: [v[i] for i in todo]  # noqa: E731 - the items that have something to repaint
        gens = req["generators"]
        out = self._inpaint(pick(img), [per_item[i // k] for i in todo], dict(  # masks shared like the photos
            req, prompts=pick(req["prompts"]), negatives=pick(req["negatives"]), seeds=pick(req["seeds"]),
            strengths=pick(strengths), rows=todo, control=control and control.pick(todo),
            ip=req["ip"] and (req["ip"][0][todo], req["ip"][1][todo], req["ip"][2]),
            generators=gens if gens is None or isinstance(gens, torch.Generator) else pick(gens)), opts, loop, latents)
        if unchanged:
            full = np.stack(img).astype(np.float32) / 255  # (B, H, W, 3)
            full[todo] = as_hwc(out.images)
            out = format_output(full, req["seeds"], output_type, unchanged)
        return with_profiles(out, images, k)

    # ---------------------------------------------------------------------------------------------- inpainting

    def _inpaint(self, img: list, mask: list, req, opts: MaskOptions, loop: Loop, latents) -> Output:
        """img: a uint8 (H, W, 3) per item, mask: a (1, 1, H, W) repaint mask per item, shared between items of
        one photo and mask (a photo inpainted n times is one array, its full-size mask work done once)."""
        cfg, f = self.config, self.config.vae.downsample_factor
        H, W = img[0].shape[:2]
        one = PerDistinct(distinct([(id(a), id(m)) for a, m in zip(img, mask)]))
        given = torch.cat(one.pick(mask))  # (U, 1, H, W) per distinct item
        model_mask = M.dilate(given, f * opts.dilate)  # (U, 1, H, W) the model's; paste-back uses `mask`
        boxes, conditioned = None, cfg.vae.mask_conditioned
        if opts.crop_padding is None:
            x = self._pad(P.image_to_tensor(img))  # (B, 3, H', W')
            m = self._pad(one.spread(model_mask))  # (B, 1, H', W')
            dec_mask = self._pad(one.spread(given)) if conditioned else None
            control = req["control"] and req["control"].at((H, W), self._pad)
        else:
            size = self.fixed_size or M.fit_size(H, W, self._multiple, side=cfg.image_size)
            box = C.crop_box(model_mask, size, opts.crop_padding)  # per distinct item
            x = P.image_to_tensor(one.spread(C.crop_images(one.pick(img), box, size)))  # (B, 3, h*f, w*f)
            how = "diffusers" if opts.mode == "diffusers" else "max"  # diffusers: Lanczos, then binarised
            m, boxes = one.spread(C.crop_masks(model_mask, box, size, mode=how)), one.spread(box)  # (B, 1, h*f, w*f)
            dec_mask = one.spread(C.crop_masks(given, box, size, mode=how)) if conditioned else None
            control = req["control"] and req["control"].at((H, W), crop=(boxes, size))
        lat_mask = M.latent_mask(m, mode=opts.mode, factor=f).to(self.backend.device)  # (B, 1, h, w)
        nine = cfg.unet.in_channels == 9
        if not nine and cfg.unet.in_channels != cfg.vae.latent_channels:
            raise ValueError(f"inpaint needs a 9-channel inpainting UNet or a plain {cfg.vae.latent_channels}-channel"
                             f" one; this UNet takes {cfg.unet.in_channels} input channels")
        x0 = self._encode_image(x) if not nine or min(req["strengths"]) < 1 else None
        c_concat = torch.cat([lat_mask, self._encode_image(M.masked_image(x, m))], 1) if nine else None
        job = dict(req, x0=x0, size=(H, W), c_concat=c_concat, mask=None if nine else lat_mask, control=control)
        out = self._run(job, tuple(lat_mask.shape[-2:]), loop, latents, start="inpaint", decode=False)
        if req["output_type"] == "latent":
            return out
        # A mask-conditioned VAE decodes with the known pixels too: the user's mask, not the one grown for the UNet
        # (the pixels the paste-back keeps are exactly the ones the decoder is told about)
        cond = dict(image=x, mask=M.binarize(dec_mask)) if conditioned else {}
        y = decoded(self.backend, out.images, cfg.scaling_factor, rows=req["rows"], **cond)  # (B, 3, h*f, w*f)
        if boxes is None:
            y = M.crop_to(y, (H, W))
            if not (opts.paste_back or opts.color_match):  # the VAE's own float output, as diffusers' "np"
                return format_output(y, out.seeds, req["output_type"])
        gen = P.tensor_to_uint8(y)  # (B, H, W, 3), or the crops (B, h*f, w*f, 3)
        if opts.paste_back:
            done = C.composite(img, gen, mask, boxes=boxes, mask_blur=opts.blur, match_color=opts.color_match)
        else:
            done = gen if boxes is None else C.uncrop(img, gen, boxes)  # (B, H, W, 3)
            if opts.color_match:
                done = C.color_match(done, img, mask, boxes)
        return format_output(done, out.seeds, req["output_type"])  # uint8 (B, H, W, 3)

    # -------------------------------------------------------------------------------------------- shared core

    def encode_prompt(self, prompt, clip_skip: int | None = None) -> torch.Tensor:
        """Text embeddings (n, 77, C) float32 on the pipeline's device, for `prompt_embeds` /
        `negative_prompt_embeds`: encode a prompt once and reuse it across calls, or pass embeddings made otherwise
        (prompt weighting, longer contexts), as diffusers' prompt_embeds. clip_skip: as generate's. An ordinary
        tensor (the encoder runs in inference mode, whose tensors refuse in-place edits and autograd)."""
        return embed(self.backend, prompts(prompt, None, "prompt", self._width),
                     check_clip_skip(clip_skip, self.backend)).clone()

    def _run(self, job: dict, hw, loop: Loop, latents, start: str, decode: bool = True) -> Output:
        """Noise, one sampler loop per distinct strength, then decode. start: "noise" (txt2img), "image"
        (img2img: x0 noised to the strength) or "inpaint" (pure noise at strength 1, else as img2img)."""
        full = loop.schedule
        B, C, dev = len(job["prompts"]), self.config.vae.latent_channels, self.backend.device
        gens = job.get("generators") or [torch.Generator().manual_seed(s) for s in job["seeds"]]  # CPU: same noise
        # on any device; one generator given by the caller draws for the whole batch (diffusers' single generator)
        shape = (B, C, *hw)
        if latents is None:
            noise = per_item_randn(shape, gens, device=dev)  # the first draw of every item's generator
        else:  # checked against every item of the call; "rows": the ones sampled (inpaint: with a mask)
            noise = given_latents(latents, (job["n"] * job["k"], C, *hw), job.get("rows")).to(dev, torch.float32)
        guided, interrupt = loop.guidance_scale > 1, loop.interrupt
        ctx, uctx = contexts(self.backend, job["prompts"], job["negatives"], guided, job["clip_skip"])
        text_tokens = ctx.shape[1]
        if job["ip"] is not None:  # an IP-Adapter's image tokens follow the text's (nn/ip_adapter.py)
            ctx, uctx = (None if c is None else torch.cat([c, t.to(c)], 1)  # (B, 77 + N, C)
                         for c, t in zip((ctx, uctx), job["ip"][:2]))
        result = torch.empty(shape, device=dev, dtype=torch.float32)
        for strength, idx in groups(job["strengths"]).items():
            if interrupt is not None and interrupt.is_set():
                raise SamplingInterrupted(0)
            sched = full if start == "noise" else full.img2img(strength)
            x0, eps = (None if job["x0"] is None else job["x0"][idx]), noise[idx]
            unet = self.backend.unet
            if (control := job.get("control")) is not None:  # with ControlNet residuals, T2I-Adapter features
                unet = controlled_unet(self.backend.model.unet, control.nets, idx, sched, text_tokens, dev,
                                       self.backend.dtype, control.adapters)
            if job["ip"] is not None:
                unet = with_ip_links(unet, job["ip"][2])
            if start == "noise" or (start == "inpaint" and strength == 1.0):
                x = initial_latents(eps, sched)
            else:
                x = noised_latents(x0, eps, sched)
            mask = job.get("mask")
            blend = None if mask is None else blend_known_region(x0, eps, mask[idx], sched)
            args = dict(context=ctx[idx], uncond_context=None if uctx is None else uctx[idx],
                        guidance_scale=loop.guidance_scale, guidance_rescale=loop.guidance_rescale)
            if job["c_concat"] is not None:
                args["c_concat"] = job["c_concat"][idx]
            x = sample(CFGDenoiser(unet, sched, self.config.prediction_type), x, sched,
                       extra_args=args, callback=step_callback(blend, loop.callback, sched),
                       noise_sampler=default_noise_sampler(x, gens if isinstance(gens, torch.Generator)
                                                           else [gens[i] for i in idx]), disable=_hidden(loop.progress),
                       bar=self._bar, interrupt=interrupt,
                       blend=None if mask is None else known_region(x0, eps, mask[idx]),
                       **({"eta": loop.eta} if loop.eta else {}))
            result[idx] = output_latents(x, sched)
        if interrupt is not None and interrupt.is_set():
            raise SamplingInterrupted(loop.steps, "interrupted after the last step, before decoding")
        if bad := (~torch.isfinite(result.flatten(1))).any(1).nonzero().flatten().tolist():  # they decode to black
            log.warning("items %s have non-finite latents (float overflow: guidance_scale %g too large, or fp16 "
                        "out of range?); their images are black", item_numbers(job.get("rows"), bad),
                        loop.guidance_scale)
        if not decode or job["output_type"] == "latent":
            return Output(result, job["seeds"])
        y = decoded(self.backend, result, self.config.scaling_factor)  # (B, 3, h*f, w*f) in [-1, 1]
        return format_output(M.crop_to(y, job["size"]), job["seeds"], job["output_type"])

