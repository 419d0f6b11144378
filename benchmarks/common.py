"""What every benchmark writes beside its figures (the machine it ran on, the commit it measured), and the
random-weight models they share.

Imported by the scripts in this folder (run as `python benchmarks/NAME.py`, which puts the folder on sys.path).
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

__all__ = ["machine", "commit", "random_model"]


def machine(device: str = "cpu", threads: int | None = None) -> str:
    """The GPU's name on CUDA; on the CPU its model, cores, bf16 support, threads in use and the load average
    (a shared machine's figures are only as good as its quiet)."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return f"{torch.cuda.get_device_name(dev)}, torch {torch.__version__}"
    info = {}  # the first "model name" and "flags" of /proc/cpuinfo
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = info.get("model name") or platform.processor() or platform.machine()
    flags = set(info.get("flags", "").split())
    bf16 = " (avx512_bf16)" if flags & {"avx512_bf16", "amx_bf16"} else ""
    threads = torch.get_num_threads() if threads is None else threads
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return f"{name}, {os.cpu_count()} cores{bf16}, torch {torch.__version__}, {threads} threads{load}"


def commit() -> str:
    """The short hash of HEAD, with -dirty when the working tree has changes; BACKDROP_COMMIT where there is no
    git (the device machine gets a copy of the working tree without .git: set it from the checkout the copy was
    made of); 'unknown' otherwise."""
    if os.environ.get("BACKDROP_COMMIT"):
        return os.environ["BACKDROP_COMMIT"]
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True).stdout
        if dirty.strip():
            print(f"warning: uncommitted changes: these results are labelled {sha}-dirty (commit first, results "
                  "files included, for rows that name their code)", file=sys.stderr)
        return sha + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def random_model(preset: str, cache: Path) -> Path:
    """The diffusers folder of a random-weight model of `preset` (seed 0) under `cache`, built on first use."""
    from backdrop.nn.checkpoint import init_model, save_model

    folder = cache / preset
    if not (folder / "model_index.json").is_file():
        print(f"building random {preset} in {folder} ...", flush=True)
        save_model(init_model(preset, seed=0), folder)
    return folder
