"""Whole models in and out: a diffusers folder or an original (LDM) single .safetensors file, or random weights.

Loading builds every component on the meta device (no memory, no random init), checks every key and shape of the
file against it before reading a single tensor, then hands the memory-mapped safetensors tensors to
`load_state_dict(strict=True, assign=True)`: the only copy is the dtype cast (and SD2's fused q/k/v, split in
three), none at all when the file already holds the requested dtype. LDM names go through nn/ldm_keys.py.
Pickle checkpoints (.ckpt/.bin/.pt/.pth) can run code when unpickled, so they are refused unless asked for.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.overrides import TorchFunctionMode

from ..fsio import fsync, usual_permissions
from ..messages import some
from .clip import TextEncoder
from .config import (PREDICTION_TYPES, ModelConfig, SchedulerConfig, TextConfig, UNetConfig, VAEConfig,
                     get_preset)
from .ldm_keys import VAE as VAE_PREFIX
from .ldm_keys import (DIFFUSERS_VERSION, FOLDER_EXTRAS, UNET, CheckpointError, MissingFile, Src, clip_prefix,
                       detect_config, diffusers_configs, folder_key, from_ldm, known_extras, ldm_names, ldm_shape,
                       prediction_type_of_ldm_config, to_ldm, vae_config, vae_names)
from .resolve import resolve_model
from .tokenizer import Tokenizer
from .weight_files import PickleRefused, _json, _Reader, _weight_files
from .unet import UNet
from .vae import VAE

__all__ = ["Model", "CheckpointError", "MissingFile", "load_model", "load_vae", "save_model", "init_model",
           "config_to_dict", "config_from_dict", "diffusers_configs"]

log = logging.getLogger(__name__)

METADATA_KEY = "backdrop_config"  # our LDM files carry their ModelConfig here, for what shapes cannot tell


@dataclass
class Model:
    """The four components of a Stable Diffusion model and its ModelConfig."""
    unet: UNet
    vae: VAE
    text_encoder: TextEncoder
    tokenizer: Tokenizer
    config: ModelConfig

    def modules(self) -> dict[str, nn.Module]:
        return {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder}

    def to(self, device=None, dtype: torch.dtype | None = None) -> "Model":
        for m in self.modules().values():
            m.to(device=device, dtype=dtype)
        return self

    def eval(self) -> "Model":
        for m in self.modules().values():
            m.eval()
        return self

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype


# ------------------------------------------------------------------------------------------------- configs

def config_to_dict(cfg: ModelConfig) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(d: dict) -> ModelConfig:
    """Inverse of config_to_dict (JSON turns tuples into lists; unknown fields are an error)."""
    def make(cls, sub: dict):
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in sub.items()})
    return ModelConfig(unet=make(UNetConfig, d["unet"]), vae=make(VAEConfig, d["vae"]),
                       text=make(TextConfig, d["text"]), scheduler=make(SchedulerConfig, d["scheduler"]),
                       prediction_type=d["prediction_type"], image_size=d["image_size"])


# ------------------------------------------------------------------------------------------------- loading

class _Problems:
    """Every mismatch between a file and the model, reported together in one CheckpointError."""

    def __init__(self):
        self.missing, self.unexpected, self.shapes = [], [], []

    def check(self, module: nn.Module, names: dict[str, Src], reader: _Reader) -> None:
        for key, t in module.state_dict().items():
            src = names[key]
            if src.key not in reader.shapes:
                self.missing.append(src.key)
            elif (want := ldm_shape(t.shape, src)) != (got := reader.shapes[src.key]) and not (
                    src.conv and got == tuple(t.shape)):  # some converters already wrote the 1x1 convs as Linear
                self.shapes.append(f"{src.key}: file {got} vs model {want}")

    def raise_if_any(self, label: str, what: str) -> None:
        found = ((self.missing, "missing"), (self.unexpected, "unexpected"), (self.shapes, "with the wrong shape"))
        parts = [f"{len(items)} {kind}: {some(items)}" for items, kind in found if items]
        if parts:
            raise CheckpointError(f"{label}: does not match {what}: " + "; ".join(parts))


def _fill(module: nn.Module, names: dict[str, Src], reader: _Reader, dtype: torch.dtype, device) -> None:
    """Give the meta-device `module` its tensors from `reader`, cast as they are read: a tensor used as stored is
    mapped from the file, one cast or moved is read into the reader's staging memory and converted from there."""
    tensors, on_cpu = {}, torch.device(device).type == "cpu"
    for key in module.state_dict():
        src = names[key]
        stored = reader.dtype(src.key)
        converted = not on_cpu or (stored is not None and stored.is_floating_point and stored != dtype)
        t = from_ldm(reader.get(src.key, staged=converted), src)
        # a staged tensor is overwritten by the next read, and q/k/v thirds of one fused tensor would share its
        # storage (safetensors refuses to save that): copy both
        tensors[key] = t.to(device=device, dtype=dtype if t.is_floating_point() else None,
                            copy=converted or src.part is not None)
    module.load_state_dict(tensors, strict=True, assign=True)
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:  # a non-persistent buffer the loader cannot know how to fill: a modelling bug, not bad input
        raise RuntimeError(f"{type(module).__name__}: {left[:5]} were not loaded and are still on the meta device")
    module.eval()


class _SkipInit(TorchFunctionMode):
    """Skips torch.nn.init calls while the modules are built for loading: their values would be overwritten,
    and on the meta device they cost time all the same (the first meta normal_() imports torch's decompositions,
    ~4 s). A function mode scoped to one `with`, like torch.device() itself; nothing global is patched."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init":
            return kwargs["tensor"] if "tensor" in kwargs else args[0]
        return func(*args, **kwargs)


def _meta_modules(cfg: ModelConfig) -> dict[str, nn.Module]:
    with torch.device("meta"), _SkipInit():
        return {"unet": UNet(cfg.unet), "vae": VAE(cfg.vae), "text_encoder": TextEncoder(cfg.text)}


def _load_single_file(path: Path, dtype, device, prediction_type, allow_pickle, vae: VAE | None) -> Model:
    reader = _Reader([path], allow_pickle)
    if METADATA_KEY in reader.metadata:  # written by save_model: the exact config, heads and groups included
        try:
            cfg = config_from_dict(json.loads(reader.metadata[METADATA_KEY]))
        except (ValueError, TypeError, KeyError) as e:
            raise CheckpointError(f"{path}: unreadable {METADATA_KEY} metadata: {e!r}") from None
        cfg = dataclasses.replace(cfg, prediction_type=prediction_type or cfg.prediction_type,
                                  vae=vae.cfg if vae is not None else cfg.vae)
    else:
        given, said = vae.cfg if vae is not None else None, prediction_type or _sidecar_prediction_type(path)
        cfg = detect_config(reader.shapes, str(path), said, given)
        if said is None and (guess := _guess_prediction_type(path, reader, cfg)) != cfg.prediction_type:
            cfg = detect_config(reader.shapes, str(path), guess, given)
    modules = _meta_modules(cfg)
    names = ldm_names(cfg, {c: m.state_dict().keys() for c, m in modules.items()}, clip=clip_prefix(reader.shapes))
    if vae is not None:  # the file's own VAE, if any, is not read
        del modules["vae"], names["vae"]
    problems = _Problems()
    for c, m in modules.items():
        problems.check(m, names[c], reader)
    used, extras = {s.key for n in names.values() for s in n.values()}, known_extras(cfg)
    problems.unexpected = [k for k in reader.shapes if k not in used and not extras.fullmatch(k)
                           and not (vae is not None and k.startswith(VAE_PREFIX))]
    problems.raise_if_any(reader.label, f"the {cfg.family.upper()} model it describes")
    for c, m in modules.items():
        _fill(m, names[c], reader, dtype, device)
    if vae is not None:
        modules["vae"] = vae
    tokenizer = Tokenizer.from_assets(cfg.text.pad_token_id)
    if cfg.text.vocab_size > tokenizer.vocab_size:
        log.warning("%s: its text encoder has %d token rows, CLIP's vocabulary %d ids: the rows beyond (textual "
                    "inversion tokens?) are out of a prompt's reach, since a single file holds no tokenizer; load "
                    "the diffusers folder it was made from, or the tokens as embeddings (load_textual_inversion)",
                    path, cfg.text.vocab_size, tokenizer.vocab_size)
    return Model(**modules, tokenizer=tokenizer, config=cfg)


def _sidecar_prediction_type(path: Path) -> str | None:
    """A1111's convention: `<file stem>.yaml` beside a checkpoint is its original LDM config, whose
    model.params.parameterization is "v" for a v-prediction model."""
    yaml = path.with_suffix(".yaml")
    return prediction_type_of_ldm_config(yaml.read_text(errors="replace"), str(yaml)) if yaml.is_file() else None


def _guess_prediction_type(path: Path, reader: _Reader, cfg: ModelConfig) -> str:
    """What an SD 2.x text-to-image file's UNet predicts, which the file does not say: the 768-v models
    (v_prediction) and the 512-base ones (epsilon) have the same shapes. ComfyUI's test (its SD20 model_type):
    the spread of the last attention block's first LayerNorm bias, above 0.09 in the v models. Said in a warning
    naming the option, because a wrong guess makes noise. Other files: epsilon (SD1, SD2 inpainting)."""
    if cfg.family != "sd2" or cfg.unet.in_channels != 4 or cfg.prediction_type != "epsilon":
        return cfg.prediction_type
    blocks = [int(m[1]) for k in reader.shapes if (m := re.fullmatch(
        re.escape(UNET) + r"output_blocks\.(\d+)\.1\.transformer_blocks\.0\.norm1\.bias", k))]
    if not blocks:
        return cfg.prediction_type
    spread = reader.get(f"{UNET}output_blocks.{max(blocks)}.1.transformer_blocks.0.norm1.bias").float().std(
        unbiased=False).item()
    guess = "v_prediction" if spread > 0.09 else "epsilon"
    log.warning("%s: an SD 2.x file does not say what its UNet predicts; guessed %s (%s) from its weights, as "
                "ComfyUI does. If images come out as noise, pass prediction_type= / --prediction-type, or put "
                "its original .yaml config beside it", path, guess,
                "a 768-v model" if guess == "v_prediction" else "a 512-base model")
    return guess


def _component_plan(folder: Path, c: str, m: nn.Module, allow_pickle: bool, variant: str | None = None,
                    what: str | None = None) -> tuple:
    """(module, names, reader) of one diffusers component folder, checked strictly (CheckpointError naming it and
    saying it does not match `what`, by default the component its config.json describes)."""
    stem = "model" if c == "text_encoder" else "diffusion_pytorch_model"
    reader = _Reader(_weight_files(folder, stem, allow_pickle, variant), allow_pickle)
    ours = {folder_key(c, k): k for k in reader.shapes}  # our key -> file key
    names = {k: Src(ours.get(k, k)) for k in m.state_dict()}
    problems = _Problems()
    problems.check(m, names, reader)
    problems.unexpected = [f for k, f in ours.items() if k not in names and not FOLDER_EXTRAS.fullmatch(f)]
    problems.raise_if_any(reader.label, what or f"the {c} its {folder.name}/config.json describes")
    return m, names, reader


# model_index.json's _class_name prefixes of the diffusers pipelines whose models are not SD 1.x/2.x: named in
# the refusal, where the first unsupported config key or missing folder would have read like a damaged download
OTHER_FAMILIES = {"StableDiffusionXL": "an SDXL model", "StableDiffusion3": "a Stable Diffusion 3 model",
                  "StableDiffusionUpscale": "an upscaler", "StableDiffusionLatentUpscale": "an upscaler",
                  "StableUnCLIP": "an unCLIP model", "Kandinsky": "a Kandinsky model", "IF": "a DeepFloyd IF model",
                  "StableCascade": "a Stable Cascade model", "Wuerstchen": "a Wuerstchen model",
                  "PixArt": "a PixArt model", "Flux": "a FLUX model", "StableVideoDiffusion": "a video model"}
# controlnet: Pipeline.from_pretrained loads it (nn/controlnet.saved_controlnets)
_USED = ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "safety_checker", "feature_extractor", "controlnet")


def _check_model_index(root: Path, scheduler: dict) -> None:
    """Refuse another model family by name; warn of the parts of the folder that are not used (a ControlNet, an
    IP-adapter's image encoder) and of an LCM scheduler, whose model wants sampler "lcm"."""
    index = _json(root / "model_index.json")
    name = str(index.get("_class_name", ""))
    family = next((what for prefix, what in OTHER_FAMILIES.items() if name.startswith(prefix)), None)
    if family is not None:
        raise CheckpointError(f"{root}: {family} ({name}, model_index.json); Backdrop runs Stable Diffusion 1.x/2.x")
    unused = [k for k, v in index.items() if not k.startswith("_") and k not in _USED and isinstance(v, list)
              and any(v)]
    if unused:
        log.warning("%s: %s not used (Backdrop runs the UNet, VAE and text encoder of %s)", root,
                    ", ".join(f"{k}/" for k in unused), name or "the folder")
    if scheduler.get("_class_name") == "LCMScheduler":
        log.warning("%s: its scheduler is LCMScheduler: an LCM model wants sampler=\"lcm\" (--sampler lcm), about "
                    "4 steps and guidance_scale 1; other samplers give poor images", root)


def _load_folder(root: Path, dtype, device, prediction_type, allow_pickle, vae: VAE | None,
                 variant: str | None) -> Model:
    if not (root / "model_index.json").is_file():
        if (root / "final" / "model_index.json").is_file():  # `backdrop train`'s --out
            raise CheckpointError(f"{root}: a training run's folder, not a model; its model is {root / 'final'}")
        if (root / "backdrop_export.json").is_file():
            raise CheckpointError(f"{root}: an ONNX export, not a model folder; run it with --backend onnxruntime "
                                  "(Python: backend=\"onnxruntime\")")
        raise CheckpointError(f"{root}: not a model folder: expected a diffusers Stable Diffusion folder "
                              "(model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/) or an LDM "
                              "single .safetensors file")
    scheduler_file = root / "scheduler" / "scheduler_config.json"
    _check_model_index(root, _json(scheduler_file) if scheduler_file.is_file() else {})
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if not (root / sub).is_dir() and not (sub == "vae" and vae is not None):
            raise CheckpointError(f"{root}: model folder has no {sub}/ (a diffusers Stable Diffusion folder has "
                                  "unet/, vae/, text_encoder/, tokenizer/ and scheduler/)")
    try:
        tokenizer = Tokenizer.from_folder(root / "tokenizer")
    except (OSError, ValueError) as e:  # named once: the tokenizer's own messages may begin with its folder
        raise CheckpointError(str(e) if str(e).startswith(str(root / "tokenizer")) else
                              f"{root / 'tokenizer'}: {e}") from None
    sched = _json(scheduler_file)
    try:
        unet = UNetConfig.from_diffusers(_json(root / "unet" / "config.json"), str(root / "unet" / "config.json"))
        vae_cfg = vae.cfg if vae is not None else VAEConfig.from_diffusers(_json(root / "vae" / "config.json"),
                                                                           str(root / "vae" / "config.json"))
        text = TextConfig.from_transformers(_json(root / "text_encoder" / "config.json"),
                                            str(root / "text_encoder" / "config.json"), tokenizer.pad_token_id)
        cfg = ModelConfig(unet=unet, vae=vae_cfg, text=text, scheduler=SchedulerConfig.from_diffusers(sched),
                          prediction_type=prediction_type or sched.get("prediction_type", "epsilon"),
                          image_size=unet.sample_size * vae_cfg.downsample_factor)
        if text.vocab_size != tokenizer.vocab_size:  # rows no token reaches, or tokens without a row
            hint = ("an added token's file missing?" if text.vocab_size > tokenizer.vocab_size else
                    "tokens added to the tokenizer without their embedding rows?")
            raise CheckpointError(f"{root / 'text_encoder' / 'config.json'}: vocab_size {text.vocab_size}, but the "
                                  f"tokenizer has {tokenizer.vocab_size} tokens ({hint})")
    except CheckpointError:
        raise
    except (ValueError, TypeError) as e:  # a config file's own message names the file already
        raise CheckpointError(str(e) if str(e).startswith(str(root)) else f"{root}: {e}") from None
    modules = _meta_modules(cfg)
    if vae is not None:
        modules["vae"] = vae
    plans, refused = [], []
    for c, m in modules.items():
        try:
            plans += [_component_plan(root / c, c, m, allow_pickle, variant)] if m is not vae else []
        except PickleRefused as e:  # every component's pickle files named in one error, converted by one command
            refused += e.files
    if refused:
        raise PickleRefused(refused)
    for m, names, reader in plans:
        _fill(m, names, reader, dtype, device)
    return Model(**modules, tokenizer=tokenizer, config=cfg)


def load_vae(path, dtype: torch.dtype = torch.float32, device="cpu", allow_pickle: bool = False) -> VAE:
    """A VAE on its own, to run in place of a model's (A1111's "SD VAE", diffusers' vae=): a diffusers VAE folder
    (config.json + weights), a model folder (its vae/), or an LDM file: a VAE-only one such as
    vae-ft-mse-840000-ema-pruned.safetensors (keys encoder.*, decoder.*, ...) or a whole checkpoint's
    first_stage_model.*. Strict, as load_model. `path` may also be a built-in model's name or a model the Hugging
    Face hub client downloaded (a repo id such as stabilityai/sd-vae-ft-mse, or its cache entry), as in
    resolve_model."""
    try:
        path = resolve_model(path)
    except FileNotFoundError as e:
        raise MissingFile(f"the VAE: {e}") from None
    if path.is_dir():
        folder = path / "vae" if (path / "model_index.json").is_file() else path
        if not (folder / "config.json").is_file():
            raise CheckpointError(f"{path}: not a VAE: expected a diffusers VAE folder (config.json and "
                                  "diffusion_pytorch_model.safetensors), a model folder, or a .safetensors file")
        try:
            cfg = VAEConfig.from_diffusers(_json(folder / "config.json"), str(folder / "config.json"))
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{folder / 'config.json'}: {e}") from None
        with torch.device("meta"), _SkipInit():
            vae = VAE(cfg)
        _fill(*_component_plan(folder, "vae", vae, allow_pickle), dtype, device)
        return vae
    reader = _Reader([path], allow_pickle)
    prefix = VAE_PREFIX if any(k.startswith(VAE_PREFIX) for k in reader.shapes) else ""
    cfg = vae_config(reader.shapes, reader.label, prefix)
    with torch.device("meta"), _SkipInit():
        vae = VAE(cfg)
    names = vae_names(cfg, vae.state_dict().keys(), prefix)
    problems = _Problems()
    problems.check(vae, names, reader)
    used = {s.key for s in names.values()}
    problems.unexpected = [k for k in reader.shapes if k.startswith(prefix) and k not in used
                           and not (prefix == "" and k.startswith(("loss.", "model_ema.")))]  # training leftovers
    problems.raise_if_any(reader.label, "the VAE it describes")
    _fill(vae, names, reader, dtype, device)
    return vae


def load_model(path, dtype: torch.dtype = torch.float32, device="cpu", prediction_type: str | None = None,
               allow_pickle: bool = False, vae=None, variant: str | None = None) -> Model:
    """Load a Stable Diffusion 1.x/2.x model (eval mode) from a diffusers folder or an LDM single file.

    path: a diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/), or one
        original `.safetensors` file; the LDM file's configuration is read from its tensor shapes.
    prediction_type: "epsilon" or "v_prediction"; overrides the folder's scheduler config. A single file does not
        say what its UNet predicts: its A1111-style `<name>.yaml` beside it is read if present (parameterization);
        else SD 1.x and inpainting files are epsilon, and for an SD 2.x text-to-image file (768-v or 512-base,
        alike in shape) it is guessed from the weights with a logged warning; pass it when the guess is wrong.
    allow_pickle: read .ckpt/.bin/.pt/.pth with torch.load(weights_only=True); only for files you trust.
    vae: a VAE to run instead of the model's own (a file or folder, see load_vae), e.g. for a checkpoint
        shipped without one.
    variant: diffusers' variant= for a folder: read each component's `<weights>.<variant>.safetensors` (e.g.
        "fp16": the half-size files of a Hub snapshot that holds both), falling back to its other weights.
    Any missing, unexpected or mis-shaped tensor raises CheckpointError naming the file and the keys.
    """
    if prediction_type not in (None, *PREDICTION_TYPES):
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    path = resolve_model(path)  # a built-in model's name, or a Hugging Face cache entry's snapshot, as Pipeline's
    if variant is not None and (not isinstance(variant, str) or not re.fullmatch(r"[\w-]+", variant)):
        raise ValueError(f"variant must be a name such as 'fp16', got {variant!r}")
    if variant is not None and not path.is_dir():
        raise ValueError(f"{path}: variant={variant!r} picks a model folder's weight files; this is one file")
    given = load_vae(vae, dtype, device, allow_pickle) if vae is not None else None
    if path.is_dir():
        return _load_folder(path, dtype, device, prediction_type, allow_pickle, given, variant)
    return _load_single_file(path, dtype, device, prediction_type, allow_pickle, given)


def init_model(preset_or_config: str | ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32,
               device="cpu") -> Model:
    """A model with random weights, the same for the same seed (drawn in float32 on the CPU, then moved)."""
    cfg = get_preset(preset_or_config) if isinstance(preset_or_config, str) else preset_or_config
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG untouched
        torch.manual_seed(seed)
        model = Model(unet=UNet(cfg.unet), vae=VAE(cfg.vae), text_encoder=TextEncoder(cfg.text),
                      tokenizer=Tokenizer.from_assets(cfg.text.pad_token_id), config=cfg)
    return model.to(device=device, dtype=dtype).eval()


# -------------------------------------------------------------------------------------------------- saving

def _safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """save_file wants contiguous CPU tensors that share no storage; clone the rare ones that do."""
    seen, out = set(), {}
    for k, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        out[k] = t.clone() if t.untyped_storage().data_ptr() in seen else t
        seen.add(t.untyped_storage().data_ptr())
    save_file(out, str(path), metadata={"format": "pt", **(metadata or {})})
    fsync(path)


def _write_folder(model: Model, folder: Path, controlnets: tuple = ()) -> None:
    configs = diffusers_configs(model.config, model.dtype)
    subs = ["controlnet" + (f"_{i}" if i else "") for i in range(len(controlnets))]  # diffusers' ControlNet layout
    configs |= {f"{sub}/config.json": {"_diffusers_version": DIFFUSERS_VERSION, **net.cfg.to_diffusers()}
                for sub, net in zip(subs, controlnets)}
    if controlnets:
        index = configs["model_index.json"]
        index["_class_name"] = index["_class_name"].replace("StableDiffusion", "StableDiffusionControlNet", 1)
        index["controlnet"] = ["diffusers", "ControlNetModel" if len(controlnets) == 1 else "MultiControlNetModel"]
    for name, obj in configs.items():
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
        fsync(folder / name)
    for sub, net in zip(subs, controlnets):
        _safetensors(net.state_dict(), folder / sub / "diffusion_pytorch_model.safetensors")
    _safetensors(model.unet.state_dict(), folder / "unet" / "diffusion_pytorch_model.safetensors")
    _safetensors(model.vae.state_dict(), folder / "vae" / "diffusion_pytorch_model.safetensors")
    _safetensors(model.text_encoder.state_dict(), folder / "text_encoder" / "model.safetensors")
    model.tokenizer.save(folder / "tokenizer")
    for f in [*(folder / "tokenizer").iterdir(), *folder.iterdir()]:
        fsync(f)


def torch_model(backend, feature: str, instead: str) -> Model:
    """The torch Model `backend` runs (a TorchBackend, or a wrapper of one such as serve's CUDA graphs), or a
    ValueError saying that `feature` needs one, naming the backend, and what to do `instead`."""
    model = getattr(backend, "model", None)
    if not isinstance(model, Model):
        name = getattr(backend, "name", type(backend).__name__)
        raise ValueError(f"{feature} needs the torch backend, not {name}: {instead}")
    return model


def save_model(model: Model, path, layout: str = "diffusers", controlnets: tuple = ()) -> Path:
    """Write `model` as a diffusers folder (layout="diffusers"; diffusers' from_pretrained opens it) or as one LDM
    .safetensors file (layout="ldm", with the ModelConfig in its metadata). controlnets (nn.controlnet.ControlNet):
    written beside it as a diffusers ControlNet pipeline folder does (diffusers layout only).

    Atomic: the new version is written next to `path` (a temporary name in the same folder), flushed to disk,
    then renamed over it, so a crash leaves the old version or the new one, never half of one (an old folder sits
    under a hidden name for the instant between its two renames)."""
    path = Path(path)
    if layout not in ("diffusers", "ldm"):
        raise ValueError(f"layout must be 'diffusers' or 'ldm', got {layout!r}")
    if layout == "ldm" and path.suffix != ".safetensors":
        raise ValueError(f"{path}: an LDM single file is saved as .safetensors")
    if layout == "ldm" and controlnets:
        raise ValueError(f"{path}: an LDM single file holds no ControlNet; save it as a diffusers folder")
    if layout == "diffusers" and path.exists() and not (
            path.is_dir() and ((path / "model_index.json").is_file() or not any(path.iterdir()))):
        raise ValueError(f"{path}: exists and is not a model folder; refusing to replace it")
    rows = model.text_encoder.text_model.embeddings.token_embedding.num_embeddings
    if rows != model.config.text.vocab_size:  # the saved config and weights would disagree
        extra = rows - model.config.text.vocab_size
        raise ValueError(f"{path}: the model has textual inversion embeddings loaded ({extra} added tokens), which "
                         "a model folder cannot record; unload_textual_inversion() first")
    # an LDM file's tokenizer is always CLIP's own (the asset vocabulary is built only for that layout)
    if layout == "ldm" and model.tokenizer.vocab_size > (clip := Tokenizer.from_assets().vocab_size):
        raise ValueError(f"{path}: the model's tokenizer has {model.tokenizer.vocab_size - clip} tokens beyond "
                         f"CLIP's {clip} (textual inversion saved into its folder), which an LDM single file cannot "
                         "record (it has no tokenizer: they would load as plain words); save it as a diffusers "
                         "folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    try:
        if layout == "ldm":
            tensors = to_ldm(model.config, {c: m.state_dict() for c, m in model.modules().items()})
            _safetensors(tensors, tmp / path.name, {METADATA_KEY: json.dumps(config_to_dict(model.config))})
            usual_permissions(tmp / path.name)
            os.replace(tmp / path.name, path)
        else:  # a folder cannot be renamed over a folder: move the old one aside for the instant of the swap
            _write_folder(model, tmp, tuple(controlnets))
            usual_permissions(tmp)
            if path.exists():
                os.replace(path, old)
            os.replace(tmp, path)
        fsync(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return path
