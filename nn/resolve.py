"""Which model and precision to run: built-in models by name, and the default device and dtype.

Built-in models live in the package's assets/ (a diffusers folder with model_index.json, or one .safetensors file
per name); `resolve_model` accepts a path or such a name.

Default precision (`default_dtype`): fp16 on CUDA; on CPUs with native bf16 dot products (avx512_bf16 or AMX)
bf16 for full-size models, which we measured 2x faster than fp32 with images at 48 dB PSNR of fp32's (numbers in
`default_dtype`); fp32 for tiny models (overhead-bound) and on other CPUs.
"""
from __future__ import annotations

import json
import os
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .ldm_keys import MissingFile

__all__ = ["builtin_models", "resolve_model", "hub_snapshot", "default_device", "default_dtype", "unet_width",
           "parse_dtype", "DTYPES", "SMALL_UNET_WIDTH"]

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
SMALL_UNET_WIDTH = 320  # SD1/SD2 UNets are 320-1280 channels wide; narrower ones are overhead-bound on CPUs


def builtin_models() -> dict[str, Path]:
    """Built-in models shipped in the package's assets/: a diffusers folder or one .safetensors file per name."""
    root = Path(str(resources.files("backdrop.assets")))
    found = {p.name: p for p in root.iterdir() if p.is_dir() and (p / "model_index.json").is_file()}
    found |= {p.stem: p for p in root.glob("*.safetensors")}
    return dict(sorted(found.items()))


def resolve_model(path_or_name) -> Path:
    """A model folder or .safetensors file, or a built-in model's name ("backdrop-tiny" -> assets/backdrop-tiny/),
    or a model the Hugging Face hub client downloaded: its cache entry (models--org--name) or repo id (org/name,
    looked up in the local cache only: $HF_HUB_CACHE, $HF_HOME/hub or ~/.cache/huggingface/hub) means the
    snapshot its refs/main names."""
    path = Path(path_or_name).expanduser()
    if path.exists():
        return hub_snapshot(path)
    known = builtin_models()
    if str(path_or_name) in known:
        return known[str(path_or_name)]
    if (snapshot := cached_repo(path_or_name)) is not None:
        return snapshot
    listed = ", ".join(known) or "none installed (backdrop-tiny ships with the training issue)"
    raise MissingFile(f"model {str(path_or_name)!r}: no such file or folder, and not a built-in model "
                      f"(built-in: {listed}); pass a diffusers model folder or a .safetensors file")


def is_repo_id(name) -> bool:
    """Whether `name` is written as a hub repo id, org/name."""
    parts = str(name).split("/")
    return len(parts) == 2 and all(parts)


def cached_repo(name) -> Path | None:
    """The snapshot of repo id `name` (org/name) in the local Hugging Face cache, or None when `name` is no repo id
    or the cache does not hold it (nothing is downloaded)."""
    if not is_repo_id(name):
        return None
    org, repo = str(name).split("/")
    entry = _hub_cache() / f"models--{org}--{repo}"
    return hub_snapshot(entry) if entry.is_dir() else None


def _hub_cache() -> Path:
    """Where huggingface_hub keeps its downloads (its own order of variables)."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return _expanded(os.environ[name])
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "huggingface"
    return _expanded(home) / "hub"


def _expanded(path) -> Path:
    """~ and $VARS expanded, as huggingface_hub does (an env file that no shell read holds HF_HOME=$SCRATCH/hf)."""
    return Path(os.path.expandvars(os.path.expanduser(str(path))))


def hub_snapshot(path: Path) -> Path:
    """A hub cache entry's snapshot (refs/main names it); any other path as it is."""
    if not (path.is_dir() and (path / "snapshots").is_dir() and path.name.startswith("models--")):
        return path
    ref = (path / "refs" / "main").read_text().strip() if (path / "refs" / "main").is_file() else ""
    snapshots = sorted(p for p in (path / "snapshots").iterdir() if p.is_dir())
    named = ref and ref not in (".", "..") and "/" not in ref  # a commit hash, nothing that leads elsewhere
    chosen = (path / "snapshots" / ref) if named else (snapshots[0] if len(snapshots) == 1 else None)
    if chosen is None or not chosen.is_dir():
        raise MissingFile(f"{path}: a Hugging Face cache entry without a snapshot refs/main names "
                          f"({len(snapshots)} in snapshots/); give the snapshot folder itself")
    return chosen


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@lru_cache(maxsize=1)
def _cpu_has_native_bf16() -> bool:
    """avx512_bf16 (Zen 4, Cooper Lake) or AMX (Sapphire Rapids): oneDNN then runs bf16 matmuls/convs natively."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:  # not Linux: assume no native bf16
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_dtype(device, unet_width: int | None = None) -> torch.dtype:
    """Our default precision on `device`: fp16 on CUDA; bf16 on CPUs with native bf16 for full-size models, else
    fp32. `unet_width` (the UNet's widest level, see `unet_width`) None means full size.

    How bf16 was checked (benchmarks/pipeline.py on an AMD EPYC with avx512_bf16, 2 cores, torch 2.13): full SD1.5
    shapes with random weights, 256x256, 4 DPM++ 2M steps, guidance 7.5, the same seeds. bf16 vs fp32 images: PSNR
    48 dB (the bar was 30 dB). Speed, interleaved single-thread CPU time: UNet forward (batch 2) 2.6 s vs 5.0 s,
    VAE decode 3.4 s vs 6.7 s; a whole text-to-image call 2.1x faster in wall-clock time. The tiny preset (widest
    level 64 channels) is bound by per-op overhead, not arithmetic, and ran ~10% slower in bf16, so models narrower
    than SMALL_UNET_WIDTH stay fp32. Without avx512_bf16/AMX oneDNN has no bf16 dot-product instruction to use
    (unmeasured here), so fp32 stays the default there too.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.float16
    small = unet_width is not None and unet_width < SMALL_UNET_WIDTH
    if device.type == "cpu" and _cpu_has_native_bf16() and not small:
        return torch.bfloat16
    return torch.float32


def unet_width(path: Path) -> int | None:
    """The widest UNet level of a model on disk, read from its config without loading weights (None: unknown,
    e.g. an LDM file from elsewhere, which in practice is a full-size SD checkpoint)."""
    try:
        if path.is_dir():
            cfg = json.loads((path / "unet" / "config.json").read_text())
            return max(cfg["block_out_channels"])
        with safe_open(str(path), framework="pt") as f:  # save_model's LDM files carry their config
            meta = (f.metadata() or {}).get("backdrop_config")
        return max(json.loads(meta)["unet"]["block_out_channels"]) if meta else None
    except (OSError, ValueError, KeyError, TypeError, SafetensorError):
        return None  # unreadable: load_model will say why


def parse_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and not dtype.is_floating_point:
        raise ValueError(f"dtype {dtype} is not a floating-point type: give one of {', '.join(DTYPES)}")
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype) in DTYPES:
        return DTYPES[str(dtype)]
    raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
