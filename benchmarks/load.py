"""Load time of a full-size SD 1.5 inpainting single file: Backdrop's load_model vs diffusers' from_single_file.

    .venv/bin/python benchmarks/load.py [--repeats 3] [--dir /tmp] [--dtypes float32,float16]

Writes a random-weight `sd15-inpaint` LDM file (fp16, ~2.1 GB, in the shape of the published
sd-v1-5-inpainting.safetensors) and a config-only diffusers folder into a temporary directory, loads it once with
each loader to warm the page cache and the imports, then alternates the two `--repeats` times per dtype. Peer:
`StableDiffusionInpaintPipeline.from_single_file(path, config=<config folder>, local_files_only=True,
torch_dtype=dtype)`, fully offline. Measures: `load` is the call alone; `load+touch` adds reading one value in
every 4 KB page of every weight, because a memory-mapped load can defer page reads to the first forward pass.
`cold process` times a fresh `python benchmarks/load.py --cold ...` doing one load: interpreter start, imports
and load, what a command-line user waits for. Median and best (min) seconds over the repeats: on a shared machine
the best is the least disturbed.
Results: printed, and benchmarks/results/load-cpu.csv.
"""
from __future__ import annotations

import argparse
import csv
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from backdrop.nn import ldm_keys
from backdrop.nn.checkpoint import _meta_modules, diffusers_configs, load_model
from backdrop.nn.config import PRESETS
from backdrop.nn.tokenizer import Tokenizer

from common import commit, machine

RESULTS = Path(__file__).resolve().parent / "results" / "load-cpu.csv"


def write_checkpoint(path: Path, seed: int = 0) -> int:
    """A random sd15-inpaint LDM file in fp16 (no Backdrop metadata: the loader reads the config from shapes)."""
    cfg = PRESETS["sd15-inpaint"]
    shapes = ldm_keys.to_ldm(cfg, {c: m.state_dict() for c, m in _meta_modules(cfg).items()})  # meta: shapes only
    g = torch.Generator().manual_seed(seed)
    tensors = {k: (0.02 * torch.randn(v.shape, generator=g)).half()
               for k, v in tqdm(shapes.items(), "random weights", mininterval=5)}
    # what a published LDM file carries besides the weights: the DDPM schedule buffers (skipped by both loaders)
    tensors |= {name: torch.rand(1000, generator=g) for name in ("betas", "alphas_cumprod", "alphas_cumprod_prev")}
    save_file(tensors, str(path))
    return sum(t.numel() for t in tensors.values())


def write_config_folder(folder: Path) -> None:
    """model_index.json, the component configs, scheduler and tokenizer: all from_single_file needs offline."""
    for name, obj in diffusers_configs(PRESETS["sd15-inpaint"]).items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(obj, indent=2))
    Tokenizer.from_assets(49407).save(folder / "tokenizer")


def touch(modules) -> None:
    """Read one value per 4 KB page of every weight: pages a loader mapped but has not read yet come in."""
    with torch.no_grad():
        for m in modules:
            for p in m.parameters():
                p.reshape(-1)[::4096 // p.element_size()].sum()


def ours(path: Path, config: Path, dtype: torch.dtype):
    model = load_model(path, dtype=dtype)
    return [model.unet, model.vae, model.text_encoder]


def peer(path: Path, config: Path, dtype: torch.dtype):
    from diffusers import StableDiffusionInpaintPipeline
    pipe = StableDiffusionInpaintPipeline.from_single_file(str(path), config=str(config), local_files_only=True,
                                                           torch_dtype=dtype)
    return [pipe.unet, pipe.vae, pipe.text_encoder]


def timed(loader, path: Path, config: Path, dtype: torch.dtype) -> tuple[float, float]:
    gc.collect()
    start = time.perf_counter()
    modules = loader(path, config, dtype)
    loaded = time.perf_counter()
    touch(modules)
    done = time.perf_counter()
    del modules
    gc.collect()
    return loaded - start, done - start


def cold(loader: str, path: Path, config: Path, dtype: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--cold", loader, str(path), str(config), dtype], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed loads per loader and dtype (default 5)")
    parser.add_argument("--dir", default=None, help="where to write the ~2 GB temporary file (default: $TMPDIR)")
    parser.add_argument("--dtypes", default="float32,float16", help="comma-separated torch dtypes to load into")
    parser.add_argument("--out", type=Path, default=RESULTS, help="CSV to write (default: %(default)s)")
    parser.add_argument("--cold", nargs=4, metavar=("LOADER", "FILE", "CONFIG", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cold:  # one load in this fresh process, timed by the parent
        loader, path, config, dtype = args.cold
        {"ours": ours, "peer": peer}[loader](Path(path), Path(config), getattr(torch, dtype))
        return
    import diffusers

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path, config = Path(tmp) / "sd15-inpaint-random.safetensors", Path(tmp) / "config"
        numel = write_checkpoint(path)
        write_config_folder(config)
        size_gb = path.stat().st_size / 1e9
        print(f"{path.name}: {numel / 1e9:.2f} B parameters, {size_gb:.2f} GB; {machine()}")
        rows, sha = [], commit()
        for name in args.dtypes.split(","):
            dtype = getattr(torch, name)
            for loader in (peer, ours):  # warm-up: page cache, lazy imports, allocator
                timed(loader, path, config, dtype)
            times = {"peer": [], "ours": []}
            for _ in tqdm(range(args.repeats), f"{name} repeats", mininterval=5):
                times["peer"].append(timed(peer, path, config, dtype))
                times["ours"].append(timed(ours, path, config, dtype))
            colds = {"peer": [], "ours": []}
            for _ in range(max(args.repeats // 2, 1)):  # fresh processes cost more: half as many
                for who, ts in colds.items():
                    ts.append(cold(who, path, config, name))
            measures = {"load": {w: [t[0] for t in ts] for w, ts in times.items()},
                        "load+touch": {w: [t[1] for t in ts] for w, ts in times.items()}, "cold process": colds}
            for measure, m in measures.items():
                peer_s, ours_s = m["peer"], m["ours"]
                rows.append({
                    "benchmark": "load sd15-inpaint single file (random fp16 weights)", "dtype": name,
                    "measure": measure,
                    "peer": f"diffusers {diffusers.__version__} StableDiffusionInpaintPipeline.from_single_file",
                    "peer_median_s": round(statistics.median(peer_s), 3),
                    "ours_median_s": round(statistics.median(ours_s), 3),
                    "speedup_median": round(statistics.median(peer_s) / statistics.median(ours_s), 2),
                    "peer_min_s": round(min(peer_s), 3), "ours_min_s": round(min(ours_s), 3),
                    "speedup_min": round(min(peer_s) / min(ours_s), 2),
                    "repeats": len(peer_s), "file_gb": round(size_gb, 2), "machine": machine(), "commit": sha,
                    "date": date.today().isoformat()})
    print(f"\n{'dtype':8} {'measure':12} {'peer median':>11} {'ours median':>11} {'ratio':>6}   {'peer min':>8} "
          f"{'ours min':>8} {'ratio':>6}")
    for r in rows:
        print(f"{r['dtype']:8} {r['measure']:12} {r['peer_median_s']:10.2f}s {r['ours_median_s']:10.2f}s "
              f"{r['speedup_median']:5.1f}x   {r['peer_min_s']:7.2f}s {r['ours_min_s']:7.2f}s {r['speedup_min']:5.1f}x")
    print(f"peer: {rows[0]['peer']}\nmachine: {rows[0]['machine']}; commit {rows[0]['commit']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
