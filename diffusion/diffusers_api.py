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
  Pipeline.from_single_file(path)
      from_pretrained of one original (LDM) .safetensors file
  pipe.scheduler = ...
      refused: the sampler is chosen per call (sampler="unipc", ...); see DIFFUSERS_ATTRIBUTES for the rest
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path

from backdrop.diffusion.batching import diffusers_names
from backdrop.diffusion.schedule import RECIPES

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
_LORA = ("a LoRA is merged when it is loaded: load_lora_weights(path, lora_scale=...) (call it again to stack "
         "several), unload_lora_weights() undoes them all")
_MODEL = ("the torch modules are pipe.backend.model.unet, .vae, .text_encoder and .tokenizer (torch backend; an "
          "export has no torch modules)")
_ONE_DEVICE = "not supported: the whole model lives on one device (pipe.to(device), or from_pretrained(device=))"
# diffusers pipeline attributes Backdrop does not have -> what to do instead (an AttributeError says it)
DIFFUSERS_ATTRIBUTES = {
    "scheduler": _SAMPLER,
    "unet": _MODEL, "vae": _MODEL, "text_encoder": _MODEL, "tokenizer": _MODEL,
    "fuse_lora": _LORA, "unfuse_lora": _LORA, "set_adapters": _LORA, "delete_adapters": _LORA,
    "enable_lora": _LORA, "disable_lora": _LORA,
    "enable_model_cpu_offload": _ONE_DEVICE, "enable_sequential_cpu_offload": _ONE_DEVICE,
    "enable_vae_tiling": "not supported: images are made at their own size; for a large product photo use "
                         "inpaint(crop_padding=N), which works at the model's native size and pastes back",
    "enable_vae_slicing": "not supported: the VAE decodes a call's images together; for less memory make fewer "
                          "images per call",
    "enable_freeu": "FreeU is not supported",
    "progress_bar": "set_progress_bar_config(disable=True), or progress=False in a call",
    "components": _MODEL,
    "save_pretrained": "save the torch model with backdrop.nn.checkpoint.save_model(pipe.backend.model, folder) (a "
                       "diffusers folder that diffusers opens too)",
}


class DiffusersAPI:
    """Mixed into Pipeline: needs self.backend, self._loras (a list) and self._progress (bool, or None: on a
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

    # ---------------------------------------------------------------------------------------- adapters
    @diffusers_names
    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, lora_scale: float = 1.0) -> None:
        """Merge a LoRA into the torch backend's UNet and text encoder now, at lora_scale: diffusers'
        load_lora_weights + fuse_lora(lora_scale). The LoRA is a .safetensors file (diffusers/PEFT or kohya-ss; see
        nn/lora.py), diffusers' LoRA folder, a hub repo id (org/name) in the local Hugging Face cache, or a state
        dict of tensors. Several stack; the stack keeps one CPU copy of each weight a LoRA changed (its original)."""
        from backdrop.nn.checkpoint import torch_model
        from backdrop.nn.lora import LORA_INSTEAD, fuse_lora
        with WEIGHT_CHANGES:
            model = torch_model(self.backend, "a LoRA", LORA_INSTEAD)
            fused = fuse_lora(model, pretrained_model_name_or_path_or_dict, lora_scale, after=self._loras)
            if fused.path is not None and (twice := next(
                    (f for f in self._loras if f.path is not None and f.path.resolve() == fused.path.resolve()), None)):
                log.warning("%s was already loaded (at lora_scale %g): loaded again, its effect is doubled; "
                            "unload_lora_weights() and load it once to change its scale", fused.path, twice.scale)
            self._loras.append(fused)

    def unload_lora_weights(self) -> None:
        """Undo every load_lora_weights: the weights are bit-identical to the ones before the first."""
        from backdrop.nn.lora import unfuse_lora
        with WEIGHT_CHANGES:
            unfuse_lora(self._loras)  # together: a later LoRA holds no copy of weights an earlier one saved
            self._loras.clear()

    def get_active_adapters(self) -> list[str]:
        """The loaded LoRAs, oldest first, named as diffusers names adapters loaded without adapter_name
        (default_0, default_1, ...); every loaded LoRA is active, as it is merged."""
        return [f"default_{i}" for i in range(len(self._loras))]

    def get_list_adapters(self) -> dict[str, list[str]]:
        """{component: the loaded LoRAs that change it}, as diffusers' get_list_adapters."""
        out: dict[str, list[str]] = {}
        for name, fused in zip(self.get_active_adapters(), self._loras):
            for component in dict.fromkeys(t.partition(".")[0] for t in fused.targets):
                out.setdefault(component, []).append(name)
        return out

    def load_textual_inversion(self, pretrained_model_name_or_path, token=None) -> list[str]:
        """Add textual inversion embeddings to the torch backend's tokenizer and text encoder, as diffusers'
        load_textual_inversion: a .safetensors file in diffusers' or A1111's format, a folder holding diffusers'
        learned_embeds.safetensors, a state dict or a tensor, or a list of them; `token` (or one per embedding)
        names the word prompts use. Several loads stack. Returns the words prompts use, one per embedding.
        Formats and errors: nn/textual_inversion.py."""
        from backdrop.nn.checkpoint import torch_model
        from backdrop.nn.textual_inversion import load_textual_inversion
        with WEIGHT_CHANGES:
            return load_textual_inversion(torch_model(self.backend, "textual inversion", _TI_INSTEAD),
                                          pretrained_model_name_or_path, token)

    def unload_textual_inversion(self) -> None:
        """Remove every loaded embedding: the tokenizer and the text encoder are bit-identical to before the first."""
        from backdrop.nn.checkpoint import torch_model
        from backdrop.nn.textual_inversion import unload_textual_inversion
        with WEIGHT_CHANGES:
            unload_textual_inversion(torch_model(self.backend, "textual inversion", _TI_INSTEAD))

    # ---------------------------------------------------------------------------------------- switches
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
