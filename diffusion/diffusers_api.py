"""What Pipeline offers diffusers' users besides sampling: LoRA and textual-inversion loading, and diffusers'
pipeline switches.

diffusers code calls a handful of switches on every pipeline it builds. Here each one does what it says, is a
documented no-op where Backdrop already does it, or is an AttributeError that says what to do instead, rather than
a bare "no attribute":

  enable_xformers_memory_efficient_attention, enable_attention_slicing (and their disable_)
      no-ops: the UNet's attention is always memory-efficient (kernels/: our Triton flash attention on CUDA, torch's
      scaled_dot_product_attention elsewhere), so it never holds a whole (Sq, Sk) score matrix to slice
  set_progress_bar_config(disable=True)
      the default of every call's `progress` (a call's own progress= still wins)
  pipe.device, pipe.dtype
      the backend's
  pipe(prompt, image=, mask_image=, ...), pipe.to(device or dtype)
      diffusers' call (inpaint, img2img or generate, by the arguments given) and its in-place move / cast
  Pipeline.from_single_file(path)
      from_pretrained of one original (LDM) .safetensors file
  pipe.scheduler = ...
      refused: the sampler is chosen per call (sampler="unipc", ...); see DIFFUSERS_ATTRIBUTES for the rest
"""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from backdrop.diffusion.batching import diffusers_names
from backdrop.diffusion.schedule import RECIPES

if TYPE_CHECKING:
    from backdrop.diffusion.output import Output

__all__ = ["DiffusersAPI", "DIFFUSERS_ATTRIBUTES"]

log = logging.getLogger(__name__)

# Held while a LoRA or an embedding is merged into the weights or taken out, and while to() moves them (every
# Pipeline: such changes are rare): two threads loading and unloading LoRAs on one Pipeline each saved weights the
# other had changed as the "originals", and the base model was lost for good.
WEIGHT_CHANGES = threading.RLock()

_TI_INSTEAD = ("an exported text encoder's vocabulary is fixed. Encode the prompts with a torch pipeline that "
               "loaded the embedding (encode_prompt) and pass prompt_embeds= and negative_prompt_embeds=")
_SAMPLER = ("the sampler is chosen per call: sampler= one of " + ", ".join(RECIPES) + " (each equal to the "
            "diffusers scheduler of that name, e.g. unipc = UniPCMultistepScheduler; see diffusion/samplers.py)")
_MODEL = ("the torch modules are pipe.backend.model.unet, .vae, .text_encoder and .tokenizer (torch backend; an "
          "export has no torch modules)")
_ONE_DEVICE = "not supported: the whole model lives on one device (pipe.to(device), or from_pretrained(device=))"
# diffusers pipeline attributes Backdrop does not have -> what to do instead (an AttributeError says it)
DIFFUSERS_ATTRIBUTES = {
    "scheduler": _SAMPLER,
    "unet": _MODEL, "vae": _MODEL, "text_encoder": _MODEL, "tokenizer": _MODEL,
    "enable_model_cpu_offload": _ONE_DEVICE, "enable_sequential_cpu_offload": _ONE_DEVICE,
    "progress_bar": "set_progress_bar_config(disable=True), or progress=False in a call",
    "components": _MODEL,
}


class DiffusersAPI:
    """Mixed into Pipeline: needs self.backend, self._adapters (an Adapters) and self._progress (bool, or None: on a
    terminal only)."""

    @classmethod
    def from_single_file(cls, pretrained_model_link_or_path, original_config=None, **kwargs):
        """diffusers' from_single_file: one original (LDM) .safetensors checkpoint, opened by from_pretrained with
        the same keyword arguments (device=, dtype= or torch_dtype=, prediction_type=, vae=, allow_pickle=).
        original_config: the file's original LDM .yaml (v2-inference-v.yaml, ...), read for its parameterization
        (its prediction type); a `<name>.yaml` beside the file is read without asking, as A1111 does."""
        if original_config is not None:
            from backdrop.nn.ldm_keys import prediction_type_of_ldm_config
            if "://" in str(original_config):
                raise ValueError(f"from_single_file: original_config={original_config} is a link; Backdrop does "
                                 "not download: give the .yaml file's path")
            try:
                text = Path(original_config).read_text(errors="replace")
            except OSError as e:
                raise FileNotFoundError(f"from_single_file: original_config={original_config}: {e.strerror}") from None
            found = prediction_type_of_ldm_config(text, str(original_config))
            if kwargs.setdefault("prediction_type", found) != found:
                raise ValueError(f"from_single_file: prediction_type={kwargs['prediction_type']!r}, but "
                                 f"original_config={original_config} says {found!r}; give one")
        given = str(pretrained_model_link_or_path)
        if "://" in given:
            raise ValueError(f"from_single_file: {given} is a link; Backdrop does not download: fetch the "
                             ".safetensors file and give its path")
        if not Path(given).is_file():
            raise FileNotFoundError(f"from_single_file: {given} is not a file (a model folder or a built-in model's "
                                    "name opens with from_pretrained)")
        return cls.from_pretrained(Path(given), **kwargs)

    def __call__(self, prompt=None, image=None, mask_image=None, **kwargs) -> "Output":
        """diffusers' pipe(prompt, image=, mask_image=, ...): inpaint when a mask is given (mask_image=, mask= or
        product_mask=), img2img when only an image is, generate otherwise; other arguments as that method takes
        them. An RGBA cut-out alone is img2img here, as in diffusers: call inpaint for OpenAI's alpha convention.
        With a ControlNet (a T2I-Adapter), an image without control_image= (adapter_image=) is the control (adapter)
        image of generate (diffusers'
        StableDiffusionControlNetPipeline)."""
        if image is None and prompt is not None and not isinstance(prompt, (str, list, tuple)):
            raise TypeError(f"pipe() takes the prompt first, as diffusers' pipelines; got a {type(prompt).__name__} "
                            "there: pass the image as image=")
        masks = {k: v for k, v in (("mask_image", mask_image), ("mask", kwargs.pop("mask", None)),
                                   ("product_mask", kwargs.pop("product_mask", None))) if v is not None}
        if masks:
            if image is None:
                raise TypeError("a mask without image=: inpainting needs the image the mask belongs to")
            return self.inpaint(image, prompt=prompt, **masks, **kwargs)
        if image is not None and self._controlnets and kwargs.get("control_image") is None:
            return self.generate(prompt, control_image=image, **kwargs)  # diffusers' ControlNet pipeline's image=
        if image is not None and self._t2i and kwargs.get("adapter_image") is None:
            return self.generate(prompt, adapter_image=image, **kwargs)  # diffusers' T2I-Adapter pipeline's image=
        if image is not None:
            return self.img2img(image, prompt=prompt, **kwargs)
        return self.generate(prompt, **kwargs)

    def to(self, device=None, dtype=None) -> "DiffusersAPI":
        """Move the weights to `device` and/or cast them to `dtype` (torch.dtype or "fp16", ...), in place, as
        diffusers' pipe.to("cuda") / pipe.to(torch.float16); returns the pipeline. Torch backend only."""
        import torch

        from backdrop.export.backends import TorchBackend
        from backdrop.nn.resolve import DTYPES, parse_dtype
        if isinstance(device, torch.dtype) or (dtype is None and str(device) in DTYPES):  # pipe.to(torch.float16)
            device, dtype = None, device
        if type(self.backend) is not TorchBackend:  # an export, or a wrapper (CUDA graphs) built for one device
            raise ValueError(f"to() moves the torch backend's weights; this {getattr(self.backend, 'name', '')} "
                             "backend was built for its device and precision: open it with from_pretrained(device=) "
                             "for another device; an export's precision is fixed when it is made")
        with WEIGHT_CHANGES:
            self.backend = self.backend.to(device, parse_dtype(dtype))
            if self._ip is not None:
                self._ip[0].to(self.backend.device, self.backend.dtype)
            self._controlnets = tuple(n.to(self.backend.device, self.backend.dtype) for n in self._controlnets)
            self._t2i = tuple(a.to(self.backend.device, self.backend.dtype) for a in self._t2i)
        return self

    # ---------------------------------------------------------------------------------------- adapters
    # LoRAs as diffusers' named adapters, always merged into the weights: diffusion/adapters.py says how.
    @diffusers_names
    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name: str | None = None,
                          weight_name: str | None = None, lora_scale: float = 1.0) -> None:
        """Load a LoRA into the torch backend's UNet and text encoder as the adapter `adapter_name` (default
        default_0, default_1, ...) and make it the only active one, as diffusers' load_lora_weights does;
        set_adapters combines several. It is merged into the weights now, at lora_scale (ours: diffusers would need
        set_adapters(name, lora_scale) for it). The LoRA is a .safetensors file (diffusers/PEFT or kohya-ss; see
        nn/lora.py), diffusers' LoRA folder or a hub repo id (org/name) in the local Hugging Face cache (weight_name=:
        the file in it), or a state dict of tensors. The merged LoRAs keep one CPU copy of each weight they change."""
        from backdrop.nn.weight_files import _pickle_refusal
        source = _weight_file(pretrained_model_name_or_path_or_dict, weight_name, "LoRA",
                              lambda p: _pickle_refusal(p, option=False))  # no allow_pickle for LoRAs
        with WEIGHT_CHANGES:
            self._adapters.load(self._lora_model(), source, adapter_name, lora_scale)

    def set_adapters(self, adapter_names: str | list[str], adapter_weights: float | list[float] | None = None):
        """Make these adapters the active ones, each at its weight (default 1), as diffusers' set_adapters."""
        with WEIGHT_CHANGES:
            self._adapters.set_active(self._lora_model(), adapter_names, adapter_weights)

    def delete_adapters(self, adapter_names: str | list[str]) -> None:
        with WEIGHT_CHANGES:
            self._adapters.delete(self._lora_model(), adapter_names)

    def disable_lora(self) -> None:
        """The base weights, the adapters kept (enable_lora() merges the active ones again)."""
        with WEIGHT_CHANGES:
            self._adapters.enable(self._lora_model(), False)

    def enable_lora(self) -> None:
        with WEIGHT_CHANGES:
            self._adapters.enable(self._lora_model(), True)

    def fuse_lora(self, components: Sequence[str] = ("unet", "text_encoder"), lora_scale: float = 1.0,
                  safe_fusing: bool = False, adapter_names: list[str] | None = None) -> None:
        """diffusers' fuse_lora: the active adapters (or adapter_names) now count lora_scale times in `components`
        until unfuse_lora(); then unload_lora_weights() keeps them merged and frees the copies. A merge that
        would put inf/NaN in a weight is always refused (safe_fusing=True's check, whatever it says)."""
        with WEIGHT_CHANGES:
            self._adapters.fuse(self._lora_model(), list(components), lora_scale, adapter_names)

    def unfuse_lora(self, components: Sequence[str] = ("unet", "text_encoder")) -> None:
        with WEIGHT_CHANGES:
            self._adapters.unfuse(self._lora_model(), list(components))

    def unload_lora_weights(self) -> None:
        """Forget every adapter: the weights are bit-identical to the ones before the first load, except for what
        fuse_lora fused (kept, as diffusers keeps it)."""
        with WEIGHT_CHANGES:
            self._adapters.unload(self._lora_model())

    def get_active_adapters(self) -> list[str]:
        return self._adapters.active()

    def get_list_adapters(self) -> dict[str, list[str]]:
        """{component: the loaded adapters that change it}, as diffusers' get_list_adapters."""
        return self._adapters.by_component()

    def _lora_model(self):
        from backdrop.nn.checkpoint import torch_model
        from backdrop.nn.lora import LORA_INSTEAD
        return torch_model(self.backend, "a LoRA", LORA_INSTEAD)

    @diffusers_names
    def load_textual_inversion(self, pretrained_model_name_or_path, token=None,
                               weight_name: str | None = None) -> list[str]:
        """Add textual inversion embeddings to the torch backend's tokenizer and text encoder, as diffusers'
        load_textual_inversion: a .safetensors file in diffusers' or A1111's format, a folder holding diffusers'
        learned_embeds.safetensors (weight_name=: another file in it), a state dict or a tensor, or a list of them;
        `token` (or one per embedding) names the word prompts use. Several loads stack. Returns the words prompts
        use, one per embedding. Formats and errors: nn/textual_inversion.py."""
        from backdrop.nn.checkpoint import torch_model
        from backdrop.nn.textual_inversion import _pickle_refusal, load_textual_inversion
        # A1111's .pt nests its vector: the conversion that unpacks it, as for the file given by path
        source = _weight_file(pretrained_model_name_or_path, weight_name, "embedding", _pickle_refusal)
        with WEIGHT_CHANGES:
            return load_textual_inversion(torch_model(self.backend, "textual inversion", _TI_INSTEAD), source, token)

    def unload_textual_inversion(self) -> None:
        """Remove every loaded embedding: the tokenizer and the text encoder are bit-identical to before the first."""
        from backdrop.nn.checkpoint import torch_model
        from backdrop.nn.textual_inversion import unload_textual_inversion
        with WEIGHT_CHANGES:
            unload_textual_inversion(torch_model(self.backend, "textual inversion", _TI_INSTEAD))

    # ---------------------------------------------------------------------------------------- switches
    def save_pretrained(self, save_directory, safe_serialization: bool = True, variant: str | None = None) -> Path:
        """diffusers' save_pretrained: the torch backend's model as a diffusers folder, in its dtype
        (nn.checkpoint.save_model: safetensors, written atomically; diffusers and Backdrop open it), with its
        ControlNets in diffusers' ControlNet pipeline layout (controlnet/, controlnet_1/, ...). Refused while
        LoRA adapters are loaded (their weights are merged here): unload_lora_weights() first, or fuse_lora() and
        then unload_lora_weights() to save the LoRAs merged, as in diffusers."""
        from backdrop.nn.checkpoint import save_model, torch_model
        if safe_serialization is not True:
            raise ValueError("save_pretrained: only .safetensors files are written (safe_serialization=True)")
        if variant is not None:
            raise ValueError(f"save_pretrained: variant={variant!r}: the weights are saved under their plain names "
                             "in the pipeline's dtype (pipe.to(torch.float16) first for a half-size folder)")
        if self._t2i:
            raise ValueError("save_pretrained: a T2I-Adapter is set (pipe.adapter), which is not written here: save "
                             "without it (pipe.adapter = None) and keep the adapter's own folder beside")
        with WEIGHT_CHANGES:
            if loaded := self.get_list_adapters():
                names = sorted({n for found in loaded.values() for n in found})
                raise ValueError(f"save_pretrained: LoRA adapters {', '.join(names)} are loaded, merged into the "
                                 "weights: unload_lora_weights() first, or fuse_lora() then unload_lora_weights() to "
                                 "save them merged")
            return save_model(torch_model(self.backend, "save_pretrained", _MODEL), save_directory,
                              controlnets=self._controlnets)

    def set_progress_bar_config(self, disable: bool | None = False, **tqdm_options) -> None:
        """disable=True hides the tqdm bar of every later call, False shows it, None shows it on a terminal only
        (tqdm's meaning): the default of each call's progress=. Other options go to tqdm, as in diffusers (file= to
        write the bars into a log of the app's own, desc=, mininterval=, ascii=, leave=, ...)."""
        import inspect

        from tqdm.std import tqdm  # tqdm.auto's (a notebook's) takes **kwargs: the plain one names them

        if disable is not None and not isinstance(disable, bool):
            raise TypeError(f"set_progress_bar_config(disable=) must be True, False or None, got {disable!r}")
        known = set(inspect.signature(tqdm.__init__).parameters) - {"self", "iterable", "total", "disable",
                                                                    "gui", "kwargs"}
        if unknown := sorted(set(tqdm_options) - known):
            raise TypeError(f"set_progress_bar_config: tqdm takes no {', '.join(unknown)} (it takes "
                            f"{', '.join(sorted(known))})")
        self._progress, self._bar = None if disable is None else not disable, dict(tqdm_options)

    def enable_vae_tiling(self) -> None:
        """diffusers' enable_vae_tiling: images larger than the VAE's sample_size are encoded and decoded in
        overlapping tiles (memory of one tile; results differ slightly from untiled ones, as diffusers'; see
        nn/vae.py). Torch backend only. For a large product photo, inpaint(crop_padding=N) is the better tool: it
        works at the model's native size and pastes back."""
        self._vae("enable_vae_tiling").enable_tiling()

    def disable_vae_tiling(self) -> None:
        self._vae("disable_vae_tiling").disable_tiling()

    def enable_vae_slicing(self) -> None:
        """diffusers' enable_vae_slicing: the VAE takes a call's images one at a time (less memory, same images)."""
        self._vae("enable_vae_slicing").enable_slicing()

    def disable_vae_slicing(self) -> None:
        self._vae("disable_vae_slicing").disable_slicing()

    @property
    def controlnet(self):
        """diffusers' pipe.controlnet: the ControlNet every call runs (then control_image= is required), a list of
        them (residuals summed, as diffusers' MultiControlNetModel), or None."""
        nets = self._controlnets
        return None if not nets else nets[0] if len(nets) == 1 else list(nets)

    @controlnet.setter
    def controlnet(self, value) -> None:
        """A ControlNet (nn/controlnet.py), the path of one (a diffusers folder or an original single file), a list
        of those, or None; moved to the pipeline's device and dtype in place (as diffusers' pipe.to moves its
        ControlNet: share one between pipelines of one device and dtype only). Torch backend only."""
        from backdrop.nn.checkpoint import torch_model
        from backdrop.nn.controlnet import ControlNet, load_controlnet
        given = [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]
        nets = []
        if given:
            unet = torch_model(self.backend, "ControlNet", "an export's UNet takes no ControlNet residuals").unet
        for i, net in enumerate(given):
            if isinstance(net, (str, os.PathLike)):
                net = load_controlnet(net, self.backend.dtype, self.backend.device)
            if not isinstance(net, ControlNet):
                raise TypeError(f"controlnet[{i}]: a backdrop.nn.controlnet.ControlNet or the path of one, got a "
                                f"{type(net).__name__}")
            ours, theirs = net.cfg.unet, unet.cfg
            for name in ("block_out_channels", "layers_per_block", "attention_levels", "cross_attention_dim"):
                if getattr(ours, name) != getattr(theirs, name):
                    raise ValueError(f"controlnet[{i}] does not fit this model: its {name} is {getattr(ours, name)}, "
                                     f"the UNet's {getattr(theirs, name)} (a ControlNet for another base model?)")
            if net.cfg.downsample_factor != self.config.vae.downsample_factor:
                raise ValueError(f"controlnet[{i}] reads control images at 1/{net.cfg.downsample_factor} of the "
                                 f"pixels, this model's latents are 1/{self.config.vae.downsample_factor}")
            nets.append(net)
        with WEIGHT_CHANGES:  # not while to() moves the model
            self._controlnets = tuple(net.to(self.backend.device, self.backend.dtype).eval() for net in nets)

    def _control(self, control_image, scale, start, end, guess_mode, req, adapter_image, adapter_scale,
                 adapter_factor):
        """The call's diffusion.control.Controls from its arguments (None without a ControlNet or T2I-Adapter)."""
        from backdrop.diffusion.control import Controls, control_request
        from backdrop.diffusion.t2i import adapter_request
        nets = control_request(self._controlnets, control_image, scale, start, end, guess_mode, req["n"], req["k"])
        adapters = adapter_request(self._t2i, adapter_image, adapter_scale, adapter_factor, req["n"], req["k"])
        return None if nets is None and adapters is None else Controls(nets, adapters)

    @property
    def adapter(self):
        """diffusers' pipe.adapter (StableDiffusionAdapterPipeline): the T2I-Adapter every call runs (then
        adapter_image= is required), a list of them (features summed, as diffusers' MultiAdapter), or None."""
        adapters = self._t2i
        return None if not adapters else adapters[0] if len(adapters) == 1 else list(adapters)

    @adapter.setter
    def adapter(self, value) -> None:
        """A T2IAdapter (nn/t2i_adapter.py), its diffusers folder, a list of them, or None; moved and cast to the
        pipeline's device and dtype (in place, as diffusers' pipe.to). Torch backend only."""
        from backdrop.nn.checkpoint import torch_model
        from backdrop.nn.t2i_adapter import T2IAdapter, load_t2i_adapter
        given = [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]
        if given:
            torch_model(self.backend, "a T2I-Adapter", "an export's UNet takes no adapter features")
        dev, dtype = self.backend.device, self.backend.dtype
        adapters = [load_t2i_adapter(a, dtype, dev) if isinstance(a, (str, os.PathLike)) else a for a in given]
        if bad := [type(a).__name__ for a in adapters if not isinstance(a, T2IAdapter)]:
            raise TypeError(f"pipe.adapter takes T2IAdapters (nn/t2i_adapter.py) or their folders, got {bad[0]}")
        unet = self.backend.model.unet.cfg if adapters else None
        for i, a in enumerate(adapters):
            features = list(a.cfg.feature_channels)
            if features != list(unet.block_out_channels[:len(features)]):
                raise ValueError(f"T2I-Adapter {i}: features of {list(a.cfg.feature_channels)} channels do not fit "
                                 f"this UNet's down levels ({list(unet.block_out_channels)}): an adapter for another "
                                 "base model")
        with WEIGHT_CHANGES:
            self._t2i = tuple(a.to(dev, dtype).eval() for a in adapters)

    def enable_freeu(self, s1: float, s2: float, b1: float, b2: float) -> None:
        """diffusers' enable_freeu (nn/unet.py's FreeU): the UNet's two coarsest up levels weigh their backbone
        features up (b1, b2) and their skips' lowest frequencies down (s1, s2) in every later call. Training-free;
        the authors' values for SD1.x are s1=0.9, s2=0.2, b1=1.5, b2=1.6 (SD2.x: b1=1.4). Torch backend only."""
        from backdrop.nn.unet import FreeU

        freeu = FreeU(s1, s2, b1, b2)
        self._unet("enable_freeu").freeu = freeu

    def disable_freeu(self) -> None:
        self._unet("disable_freeu").freeu = None

    def _unet(self, feature: str):
        from backdrop.nn.checkpoint import torch_model
        return torch_model(self.backend, feature, "an export's UNet is fixed").unet

    def _vae(self, feature: str):
        from backdrop.nn.checkpoint import torch_model
        return torch_model(self.backend, feature, "an export's VAE runs whole").vae

    def enable_xformers_memory_efficient_attention(self, attention_op=None) -> None:
        """A no-op: attention is always memory-efficient here (see the module docstring)."""

    def disable_xformers_memory_efficient_attention(self) -> None:
        """A no-op, as enable_xformers_memory_efficient_attention."""

    def enable_attention_slicing(self, slice_size="auto") -> None:
        """A no-op: flash attention never holds the score matrix that slicing would cut up."""

    def disable_attention_slicing(self) -> None:
        """A no-op, as enable_attention_slicing."""

    @property
    def device(self):
        """The device the pipeline runs on (diffusers' pipe.device, e.g. for torch.Generator(pipe.device))."""
        return self.backend.device

    @property
    def dtype(self):
        """The precision the model computes in (diffusers' pipe.dtype)."""
        return self.backend.dtype

    @property
    def scheduler(self):  # a property for its setter; reading it is refused as the other DIFFUSERS_ATTRIBUTES
        raise AttributeError(_lacking_message("scheduler"))

    @scheduler.setter
    def scheduler(self, value):
        raise AttributeError(f"Pipeline has no scheduler to replace (diffusers' pipelines do): {_SAMPLER}")


def _weight_file(source, weight_name: str | None, what: str, refusal):
    """diffusers' weight_name=: the file of that name in the folder, hub cache entry or repo id `source` names;
    refusal(path): the CheckpointError for a pickle file, with the conversion that fits the file's kind."""
    if weight_name is None:
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"weight_name={weight_name!r} names a file in a folder or hub repo; the {what} given is a "
                        f"{type(source).__name__}")
    from backdrop.nn.weight_files import adapter_file
    return adapter_file(Path(source), weight_name, what, refusal)


def _lacking_message(name: str) -> str:
    return f"Pipeline has no {name} (diffusers' pipelines do): {DIFFUSERS_ATTRIBUTES[name]}"


def _lacking(name: str) -> property:
    """A property that refuses with what to do instead. Properties, not a __getattr__ hook: that would also answer
    for an AttributeError raised inside any other property, hiding where it came from."""
    def refuse(self):
        raise AttributeError(_lacking_message(name))
    return property(refuse, doc=f"diffusers' {name}: not here; {DIFFUSERS_ATTRIBUTES[name]}")


for _name in DIFFUSERS_ATTRIBUTES.keys() - {"scheduler"}:
    setattr(DiffusersAPI, _name, _lacking(_name))
del _name
