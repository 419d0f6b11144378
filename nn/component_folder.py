"""One diffusers component folder read strictly into our module: a ControlNetModel (nn/controlnet.py) or a
T2IAdapter (nn/t2i_adapter.py). The folder holds config.json and diffusion_pytorch_model[.variant].safetensors, or is
a model folder with the component in its `sub`/ subfolder; the config is read by the module's config class, the
weights checked key by key (checkpoint._component_plan: CheckpointError naming the file and the keys)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .ldm_keys import CheckpointError, MissingFile

__all__ = ["read_component"]


def read_component(path, sub: str, kind: str, class_name: str, from_diffusers: Callable, build: Callable,
                   dtype: torch.dtype, device, allow_pickle: bool = False, variant: str | None = None,
                   pickle_option: bool = True) -> nn.Module:
    """build(from_diffusers(config dict, config path)) filled from the folder `path` (or `path`/`sub`/). kind: how
    errors name it ("ControlNet"); class_name: diffusers' ("ControlNetModel"); pickle_option: whether a refused pickle
    file's message may mention allow_pickle (False for loaders that never read pickles)."""
    from .checkpoint import _component_plan, _fill, _SkipInit
    from .weight_files import PickleRefused, _json

    folder = Path(path)
    if not folder.exists():
        raise MissingFile(f"{folder}: no such {kind} folder")
    if not (folder / "config.json").is_file() and (folder / sub).is_dir():
        folder = folder / sub
    config = folder / "config.json"
    if not config.is_file():
        raise MissingFile(f"{folder}: not a {kind} folder (no config.json); a {kind} is a diffusers {class_name} "
                          "folder (config.json + diffusion_pytorch_model.safetensors)")
    try:
        cfg = from_diffusers(_json(config), str(config))
    except (ValueError, TypeError) as e:  # a CheckpointError (not JSON) names the file already
        raise CheckpointError(f"{config}: {e}" if str(config) not in str(e) else str(e)) from None
    with torch.device("meta"), _SkipInit():
        module = build(cfg)
    try:
        plan = _component_plan(folder, sub, module, allow_pickle, variant, f"a {class_name} of its config.json")
    except PickleRefused as e:
        if pickle_option:
            raise
        raise PickleRefused(e.files, option=False) from None
    _fill(*plan, dtype, device)
    return module
