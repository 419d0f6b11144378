"""One inpainting request through each backend: torch, onnxruntime and (with an NVIDIA GPU and TensorRT) tensorrt.

    .venv/bin/python benchmarks/backends.py [--preset sd15-inpaint] [--size 256] [--steps 4] [--batches 1,4]
                                            [--threads N] [--dir /tmp/backdrop-bench] [--backends torch,onnxruntime]
                                            [--out CSV]

A random-weight model in the shapes of --preset (full-size SD1.5 inpainting by default, fp32) is exported once to
ONNX into --dir (reused on later runs; only when onnxruntime or tensorrt is to run) and, where TensorRT can run,
built into engines. A backend this machine cannot run (tensorrt without a GPU or the tensorrt package, onnxruntime
on CUDA without onnxruntime-gpu or with a provider that fails to load) prints "NAME: skipped (reason)" and the run
goes on without it. Every backend then serves the same request: an inpaint of a size x size image with a centred
mask, prompt + negative prompt, guidance 7.5, DPM++ 2M, the same seed, at each batch size. Each (backend, batch)
runs once with one step to warm up (first-run allocations, oneDNN / ORT kernel selection), then once measured; the
backends take turns for --rounds rounds (the load of a shared machine drifts) and the medians are reported. The
backend is wrapped in a timer, so the stages are measured inside the real request: text = encode_text per
request, UNet = one call at the guided batch (2B) per sampler step (mean), VAE encode / decode = their calls per
request; images/s = B / wall time of the request.

Baseline (speedup_vs_torch, max_abs_diff_vs_torch, named in the "baseline" column): the torch backend in the
Pipeline's default precision for the preset on this device: on CPUs with native bf16 "torch-bf16" for full-size
models, else "torch" (fp32 eager). On CUDA "torch-fp16", the Pipeline's default there and the precision of the
TensorRT engines (fp32 torch, which nobody deploys on a GPU, is still measured); the CUDA default backends are
torch-fp16,torch,onnxruntime,tensorrt. Where the baseline was not run, fp32 torch is the base if it was.
Results: printed with the machine, and --out (default benchmarks/results/backends-<device>.csv), rewritten after
every measured row with the medians so far, so a run cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import csv
import gc
import importlib.util
import os
import statistics
import time
from collections import defaultdict
from datetime import date
from pathlib import Path

import numpy as np
import torch

from backdrop.diffusion.pipeline import Pipeline
from backdrop.export.backends import make_backend
from backdrop.export.onnx import MANIFEST, export_onnx, load_export
from backdrop.nn.checkpoint import init_model
from backdrop.nn.config import get_preset
from backdrop.nn.resolve import default_dtype

from common import commit, machine

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"torch": torch.float32, "torch-bf16": torch.bfloat16, "torch-fp16": torch.float16,
          "onnxruntime": torch.float32, "tensorrt": torch.float16}
NEEDS_ONNX = ("onnxruntime", "tensorrt")  # the backends that run the ONNX export in --dir


class Timed:
    """A Backend that forwards to another and records the wall time of every call, per method (synchronising
    CUDA so that asynchronous launches are not mistaken for finished work)."""

    def __init__(self, backend):
        self.backend, self.times = backend, defaultdict(list)
        self.config, self.tokenizer, self.device = backend.config, backend.tokenizer, backend.device

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def _timed(self, name, *args):
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        out = getattr(self.backend, name)(*args)
        sync()
        self.times[name].append(time.perf_counter() - start)
        return out

    def encode_text(self, ids):
        return self._timed("encode_text", ids)

    def unet(self, x, t, ctx):
        return self._timed("unet", x, t, ctx)

    def vae_encode(self, x):
        return self._timed("vae_encode", x)

    def vae_decode(self, z, image=None, mask=None):  # image, mask: a mask-conditioned VAE's inpainting condition
        return self._timed("vae_decode", z, image, mask)


def request(size: int, batch: int, steps: int) -> dict:
    """The inpainting request every backend serves: a product-ish picture, a centred product mask."""
    rng = np.random.default_rng(0)
    image = (rng.random((size, size, 3)) * 255).astype(np.uint8)
    product = np.zeros((size, size), np.uint8)
    product[size // 4: 3 * size // 4, size // 3: 2 * size // 3] = 255
    return dict(image=image, product_mask=product, prompt=["a perfume bottle on wet rocks, soft light"] * batch,
                negative_prompt="blurry, text", steps=steps, guidance_scale=7.5, sampler="dpmpp-2m", seed=1234,
                output_type="np", progress=False)


def run(backend, size: int, batch: int, steps: int) -> tuple[dict, np.ndarray]:
    timed = Timed(backend)
    pipe = Pipeline(timed)
    pipe.inpaint(**request(size, batch, 1))  # warm-up
    timed.times.clear()
    start = time.perf_counter()
    images = pipe.inpaint(**request(size, batch, steps)).images
    wall = time.perf_counter() - start
    t = timed.times
    row = {"text_ms": 1000 * sum(t["encode_text"]), "unet_step_ms": 1000 * statistics.mean(t["unet"]),
           "vae_encode_ms": 1000 * sum(t["vae_encode"]), "vae_decode_ms": 1000 * sum(t["vae_decode"]),
           "request_s": wall, "images_per_s": batch / wall}
    return {k: round(v, 3 if k != "images_per_s" else 4) for k, v in row.items()}, images


def unavailable(name: str, args) -> str | None:
    """Why the backend `name` cannot run on this machine, found before anything is exported for it; else None."""
    if name == "onnxruntime":
        from backdrop.export.ort_backend import session_providers
        try:
            session_providers(args.device)
        except ValueError as e:  # e.g. the CPU-only onnxruntime on a CUDA machine
            return str(e)
    if name == "tensorrt" and (args.device.type != "cuda" or importlib.util.find_spec("tensorrt") is None):
        return "needs an NVIDIA GPU and the tensorrt package"
    return None


def build(name: str, args, model, onnx_dir: Path, trt_dir: Path):
    """The backend `name`, or None (with the reason printed) where it cannot be built here."""
    if name.startswith("torch"):  # torch-bf16: the Pipeline's default on CPUs with native bf16; -fp16 on CUDA
        return make_backend("torch", model, device=args.device, dtype=DTYPES[name])
    try:
        if name == "onnxruntime":
            return make_backend("onnxruntime", onnx_dir, device=args.device, threads=args.threads)
        from backdrop.export.tensorrt import Range, ShapeBucket, build_engines
        if not (trt_dir / "backdrop_tensorrt.json").is_file():
            build_engines(onnx_dir, trt_dir, buckets=[ShapeBucket(args.size, args.size, Range(1, b, b))
                                                      for b in args.batch_list])
        return make_backend("tensorrt", trt_dir, device=args.device)
    except (ImportError, RuntimeError, ValueError) as e:  # e.g. an execution provider listed but failing to load
        print(f"{name}: skipped ({type(e).__name__}: {e})")
        return None


def default_torch(device: torch.device, preset: str) -> str:
    """The torch backend in the Pipeline's default precision for the preset here (nn/resolve.default_dtype)."""
    dtype = default_dtype(device, max(get_preset(preset).unet.block_out_channels))
    return next(name for name in ("torch-fp16", "torch-bf16", "torch") if DTYPES[name] == dtype)


def baseline(runs: dict, device: torch.device, preset: str) -> str:
    """The backend the others are compared with (see the module docstring), "" if none of them ran."""
    measured = {name for name, _ in runs}
    return next((b for b in (default_torch(device, preset), "torch") if b in measured), "")


def summary(runs: dict, images: dict, args, meta: dict) -> list[dict]:
    """One row per (backend, batch) measured so far: the medians of its rounds, against the baseline's."""
    base_name, rows = baseline(runs, args.device, args.preset), []
    for (name, batch), done in runs.items():
        row = {k: round(statistics.median(r[k] for r in done), 4) for k in done[0]}
        base = runs.get((base_name, batch))
        speedup = row["images_per_s"] / statistics.median(r["images_per_s"] for r in base) if base else ""
        diff = float(np.abs(images[name, batch] - images[base_name, batch]).max()) if base else ""
        rows.append({"backend": name, "device": args.device.type, "dtype": str(DTYPES[name]).removeprefix("torch."),
                     "threads": args.threads, "size": args.size, "steps": args.steps, "batch": batch,
                     "rounds": len(done), **row, "baseline": base_name if base else "",
                     "speedup_vs_torch": round(speedup, 2) if base else "", "max_abs_diff_vs_torch": diff,
                     **meta})
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)  # whole or not at all, should the run be killed mid-write


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="sd15-inpaint")
    p.add_argument("--size", type=int, default=256, help="image side in pixels (default: %(default)s)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batches", default="1,4")
    p.add_argument("--backends", default=None,
                   help="comma-separated: torch (fp32), onnxruntime (the fp32 export), tensorrt (fp16 engines), "
                        "torch-bf16, torch-fp16 (default: torch, the default precision's torch backend, onnxruntime, "
                        "tensorrt)")
    p.add_argument("--rounds", type=int, default=3,
                   help="times each backend is measured, the backends taking turns: on a shared machine the load "
                        "drifts, and alternating spreads it over all of them (medians reported)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads for torch and ORT alike")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dir", default="/tmp/backdrop-bench", help="where the ONNX export (and engines) are kept")
    p.add_argument("--out", type=Path, default=None,
                   help="CSV to write (default: benchmarks/results/backends-<device>.csv)")
    args = p.parse_args()
    args.device, args.batch_list = torch.device(args.device), [int(b) for b in args.batches.split(",")]
    default = [default_torch(args.device, args.preset), "torch", "onnxruntime", "tensorrt"]
    names = args.backends.split(",") if args.backends else list(dict.fromkeys(default))
    if unknown := [n for n in names if n not in DTYPES]:
        raise SystemExit(f"unknown backend {', '.join(map(repr, unknown))}; choose from {', '.join(DTYPES)}")
    out = args.out or RESULTS / f"backends-{args.device.type}.csv"
    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    cfg = get_preset(args.preset)
    onnx_dir, trt_dir = Path(args.dir) / f"{args.preset}-onnx", Path(args.dir) / f"{args.preset}-trt"
    print(f"random {args.preset} (fp32), {args.size}x{args.size}, {args.steps} steps; "
          f"{machine(str(args.device), args.threads)}")
    skipped = {n: reason for n in names if (reason := unavailable(n, args))}
    for name, reason in skipped.items():
        print(f"{name}: skipped ({reason})")
    names = [n for n in names if n not in skipped]
    if any(n in NEEDS_ONNX for n in names) and (not (onnx_dir / MANIFEST).is_file()
                                                or load_export(onnx_dir).config != cfg):
        start = time.perf_counter()
        export_onnx(init_model(cfg, seed=0), onnx_dir)
        print(f"exported to {onnx_dir} in {time.perf_counter() - start:.0f} s")
    runs, images, rows = defaultdict(list), {}, []
    meta = {"machine": machine(str(args.device), args.threads), "commit": commit(), "date": date.today().isoformat()}
    for _ in range(args.rounds):
        for name in list(names):
            # one backend in memory at a time (the fp32 SD1.5 weights are 4.3 GB per copy); the torch model is
            # rebuilt each round from the same seed, so it is the exported model every time
            model = init_model(cfg, seed=0) if name.startswith("torch") else None
            backend = build(name, args, model, onnx_dir, trt_dir)
            if backend is None:
                names.remove(name)  # said why once; not tried again next round
            for batch in args.batch_list if backend is not None else []:
                load = os.getloadavg()[0]
                row, images[name, batch] = run(backend, args.size, batch, args.steps)
                runs[name, batch].append(row | {"load_average": round(load, 1)})
                print(f"{name} batch {batch}: " + " ".join(f"{k}={v}" for k, v in runs[name, batch][-1].items()),
                      flush=True)
                rows = summary(runs, images, args, meta)
                write_csv(out, rows)  # after every row: a run cut short keeps what it measured
            del backend, model
            gc.collect()
    if not rows:
        raise SystemExit("no backend could run here; nothing written")
    print(f"\nmedians of {args.rounds} rounds\n{'backend':12} {'batch':>5} {'text ms':>8} {'UNet/step ms':>12} "
          f"{'VAE enc ms':>10} {'VAE dec ms':>10} {'images/s':>9} {'vs base':>8} {'load':>5}  (base: "
          f"{baseline(runs, args.device, args.preset) or 'none'})")
    for r in rows:
        print(f"{r['backend']:12} {r['batch']:5} {r['text_ms']:8.0f} {r['unet_step_ms']:12.0f} "
              f"{r['vae_encode_ms']:10.0f} {r['vae_decode_ms']:10.0f} {r['images_per_s']:9.4f} "
              f"{str(r['speedup_vs_torch']):>8} {r['load_average']:5.1f}")
    print(f"machine: {meta['machine']}; commit {meta['commit']}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
