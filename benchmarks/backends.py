"""One inpainting request through each backend: torch, onnxruntime and (with an NVIDIA GPU and TensorRT) tensorrt.

    .venv/bin/python benchmarks/backends.py [--preset sd15-inpaint] [--size 256] [--steps 4] [--batches 1,4]
                                            [--threads N] [--dir /tmp/backdrop-bench] [--backends torch,onnxruntime]

A random-weight model in the shapes of --preset (full-size SD1.5 inpainting by default, fp32) is exported once to
ONNX into --dir (reused on later runs) and, where TensorRT can run, built into engines. Every backend then serves
the same request: an inpaint of a size x size image with a centred mask, prompt + negative prompt, guidance 7.5,
DPM++ 2M, the same seed, at each batch size. Each (backend, batch) runs once with one step to warm up (first-run
allocations, oneDNN / ORT kernel selection), then once measured; the backends take turns for --rounds rounds
(the load of a shared machine drifts) and the medians are reported. The backend is wrapped in a timer, so the stages
are measured inside the real request: text = encode_text per request, UNet = one call at the guided batch (2B)
per sampler step (mean), VAE encode / decode = their calls per request; images/s = B / wall time of the request.
Results: printed with the machine, and benchmarks/results/backends-<device>.csv.
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

from common import commit, machine

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"torch": torch.float32, "torch-bf16": torch.bfloat16, "onnxruntime": torch.float32,
          "tensorrt": torch.float16}


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

    def vae_decode(self, z):
        return self._timed("vae_decode", z)


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


def build(name: str, args, model, onnx_dir: Path, trt_dir: Path):
    """The backend `name`, or None (with the reason printed) where it cannot run here."""
    if name in ("torch", "torch-bf16"):  # torch-bf16: the Pipeline's default on CPUs with native bf16
        return make_backend("torch", model, device=args.device, dtype=DTYPES[name])
    if name == "onnxruntime":
        return make_backend("onnxruntime", onnx_dir, device=args.device, threads=args.threads)
    if name == "tensorrt":
        if args.device.type != "cuda" or importlib.util.find_spec("tensorrt") is None:
            print("tensorrt: skipped (needs an NVIDIA GPU and the tensorrt package)")
            return None
        from backdrop.export.tensorrt import Range, ShapeBucket, build_engines
        if not (trt_dir / "backdrop_tensorrt.json").is_file():
            build_engines(onnx_dir, trt_dir, buckets=[ShapeBucket(args.size, args.size, Range(1, b, b))
                                                      for b in args.batch_list])
        return make_backend("tensorrt", trt_dir, device=args.device)
    raise SystemExit(f"unknown backend {name!r}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="sd15-inpaint")
    p.add_argument("--size", type=int, default=256, help="image side in pixels (default: %(default)s)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batches", default="1,4")
    p.add_argument("--backends", default="torch,onnxruntime,tensorrt",
                   help="comma-separated: torch (fp32), onnxruntime (the fp32 export), tensorrt (fp16 engines), "
                        "torch-bf16")
    p.add_argument("--rounds", type=int, default=2,
                   help="times each backend is measured, the backends taking turns: on a shared machine the load "
                        "drifts, and alternating spreads it over all of them (medians reported)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads for torch and ORT alike")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dir", default="/tmp/backdrop-bench", help="where the ONNX export (and engines) are kept")
    args = p.parse_args()
    args.device, args.batch_list = torch.device(args.device), [int(b) for b in args.batches.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    cfg = get_preset(args.preset)
    onnx_dir, trt_dir = Path(args.dir) / f"{args.preset}-onnx", Path(args.dir) / f"{args.preset}-trt"
    print(f"random {args.preset} (fp32), {args.size}x{args.size}, {args.steps} steps; "
          f"{machine(str(args.device), args.threads)}")
    if not (onnx_dir / MANIFEST).is_file() or load_export(onnx_dir).config != cfg:
        start = time.perf_counter()
        export_onnx(init_model(cfg, seed=0), onnx_dir)
        print(f"exported to {onnx_dir} in {time.perf_counter() - start:.0f} s")
    runs, images = defaultdict(list), {}
    for _ in range(args.rounds):
        for name in args.backends.split(","):
            # one backend in memory at a time (the fp32 SD1.5 weights are 4.3 GB per copy); the torch model is
            # rebuilt each round from the same seed, so it is the exported model every time
            model = init_model(cfg, seed=0) if name.startswith("torch") else None
            backend = build(name, args, model, onnx_dir, trt_dir)
            for batch in args.batch_list if backend is not None else []:
                load = os.getloadavg()[0]
                row, images[name, batch] = run(backend, args.size, batch, args.steps)
                runs[name, batch].append(row | {"load_average": round(load, 1)})
                print(f"{name} batch {batch}: " + " ".join(f"{k}={v}" for k, v in runs[name, batch][-1].items()),
                      flush=True)
            del backend, model
            gc.collect()
    rows, meta = [], {"machine": machine(str(args.device), args.threads), "commit": commit(),
                      "date": date.today().isoformat()}
    for (name, batch), measured in runs.items():
        row = {k: round(statistics.median(r[k] for r in measured), 4) for k in measured[0]}
        base = runs.get(("torch", batch))
        speedup = row["images_per_s"] / statistics.median(r["images_per_s"] for r in base) if base else ""
        diff = float(np.abs(images[name, batch] - images["torch", batch]).max()) if base else ""
        rows.append({"backend": name, "device": args.device.type, "dtype": str(DTYPES[name]).removeprefix("torch."),
                     "threads": args.threads, "size": args.size, "steps": args.steps, "batch": batch,
                     "rounds": len(measured), **row,
                     "speedup_vs_torch": round(speedup, 2) if base else "", "max_abs_diff_vs_torch": diff,
                     **meta})
    print(f"\nmedians of {args.rounds} rounds\n{'backend':12} {'batch':>5} {'text ms':>8} {'UNet/step ms':>12} "
          f"{'VAE enc ms':>10} {'VAE dec ms':>10} {'images/s':>9} {'vs torch':>8} {'load':>5}")
    for r in rows:
        print(f"{r['backend']:12} {r['batch']:5} {r['text_ms']:8.0f} {r['unet_step_ms']:12.0f} "
              f"{r['vae_encode_ms']:10.0f} {r['vae_decode_ms']:10.0f} {r['images_per_s']:9.4f} "
              f"{str(r['speedup_vs_torch']):>8} {r['load_average']:5.1f}")
    print(f"machine: {meta['machine']}; commit {meta['commit']}")
    out = RESULTS / f"backends-{args.device.type}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
