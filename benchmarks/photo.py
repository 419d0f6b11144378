"""Inpainting a product photo at camera resolution: wall time and peak memory of one call, Backdrop vs diffusers'
padding_mask_crop, on identical weights, in one run.

    .venv/bin/python benchmarks/photo.py [--size 4096x3072] [--batches 1,4] [--repeats 2] [--cache DIR]

The job: a 4096x3072 photo with its product mask; the model repaints a crop around the backdrop at its own size
(512x512), and the result is put back into the full-size photo. The model is the tiny inpainting preset with random
weights, saved once with a 64-cell sample size (so both sides process at 512 px, as an SD1.5 inpainting model
does): it costs little, so the figures are what a call does at full resolution besides the model (reading the
masks, growing and cropping them, resizing the crop in and out, pasting back, converting the output), which is
what a 12-megapixel photo adds to a GPU run. One DPM-Solver++ 2M step, guidance 7.5, output_type "pil" (the only
one diffusers allows with padding_mask_crop).

ours         product_mask, crop_padding=32 (the mask grown by one latent cell, the product pasted back exactly)
ours:mask=   mask= (white = repaint), crop_padding=32, the 4 px one-sided feather of mask=
diffusers    StableDiffusionInpaintPipeline, mask_image (white = repaint), padding_mask_crop=32, height=width=512
             (its crop, Lanczos resizes and apply_overlay)
Batch n: one photo for n images (ours: a list of n of the same image; diffusers: num_images_per_prompt=n). Each
configuration runs in its own process (peak RSS is its own), warms up once, keeps the best of --repeats. Results:
printed, and written to benchmarks/results/photo-cpu.csv (this run's rows replacing earlier ones of the same
configuration)."""
from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from common import commit, machine, random_model

IMPLS = ("ours", "ours:mask=", "diffusers")
PROMPT = "a ceramic mug on a marble counter"


def prepare(cache: Path, size: tuple[int, int]) -> tuple[Path, Path, Path]:
    """The model (tiny-inpaint, sample size 64 -> 512 px), a synthetic photo (ramps + noise) and its product mask
    (an ellipse, white = product), built once under `cache`."""
    from PIL import Image

    folder = cache / "tiny-inpaint-512"
    if not (folder / "model_index.json").is_file():
        shutil.copytree(random_model("tiny-inpaint", cache), folder)
        config = folder / "unet" / "config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), "sample_size": 64}))
    w, h = size
    photo, mask = cache / f"photo-{w}x{h}.png", cache / f"photo-{w}x{h}-product.png"
    if not photo.is_file():
        rng = np.random.default_rng(0)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        img = np.stack([yy / h, xx / w, 1 - yy / h], -1) * 200 + rng.normal(0, 10, (h, w, 3))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(photo)
        product = ((yy - h * 0.55) / (h * 0.3)) ** 2 + ((xx - w / 2) / (w * 0.25)) ** 2 < 1
        Image.fromarray(product.astype(np.uint8) * 255).save(mask)
    return folder, photo, mask


def worker(spec: dict) -> dict:
    from PIL import Image, ImageOps

    torch.set_num_threads(spec["threads"])
    photo, product = Image.open(spec["photo"]), Image.open(spec["mask"])
    photo.load(), product.load()
    n, common = spec["batch"], dict(guidance_scale=7.5, output_type="pil")
    if spec["impl"] == "diffusers":
        import diffusers

        pipe = diffusers.StableDiffusionInpaintPipeline.from_pretrained(
            spec["folder"], safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        repaint = ImageOps.invert(product)

        def call():
            return pipe(prompt=PROMPT, image=photo, mask_image=repaint, padding_mask_crop=32, height=512, width=512,
                        num_inference_steps=1, num_images_per_prompt=n, strength=1.0,
                        generator=[torch.Generator().manual_seed(s) for s in range(n)], **common).images
    else:
        from backdrop.diffusion.pipeline import Pipeline

        pipe = Pipeline.from_pretrained(spec["folder"], device="cpu", dtype="fp32")
        masks = dict(mask=ImageOps.invert(product)) if spec["impl"] == "ours:mask=" else dict(product_mask=product)

        def call():
            return pipe.inpaint([photo] * n, **{k: [v] * n for k, v in masks.items()}, prompt=PROMPT, steps=1,
                                crop_padding=32, seed=list(range(n)), progress=False, **common).images
    call()  # warm-up
    best = None
    for _ in range(spec["repeats"]):
        t = time.perf_counter()
        images = call()
        best = min(best or 1e9, time.perf_counter() - t)
    assert np.asarray(images).shape == (n, photo.height, photo.width, 3)
    return dict(wall_s=best, peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="4096x3072", help="WxH of the photo")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/backdrop-bench"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "photo-cpu.csv")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    size = tuple(int(v) for v in args.size.split("x"))
    folder, photo, mask = prepare(args.cache, size)
    run, rows = f"{time.time():.0f}", []
    for batch in [int(b) for b in args.batches.split(",")]:
        for impl in IMPLS:
            spec = dict(impl=impl, batch=batch, folder=str(folder), photo=str(photo), mask=str(mask),
                        repeats=args.repeats, threads=args.threads)
            r = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True)
            if r.returncode != 0:
                print(f"{impl} batch {batch} FAILED\n{r.stderr[-2000:]}", flush=True)
                continue
            got = json.loads(r.stdout.strip().splitlines()[-1])
            rows.append(dict(benchmark=f"inpaint photo {args.size}", batch=batch, impl=impl,
                             wall_s=round(got["wall_s"], 3), peak_mb=round(got["peak_mb"]),
                             load_avg=round(os.getloadavg()[0], 1), machine=machine("cpu", args.threads),
                             commit=commit(), date=str(date.today()), run=run))
            print(f"batch {batch} {impl:11s} {got['wall_s']:7.2f} s  peak RSS {got['peak_mb']:6.0f} MB", flush=True)
    for r in rows:  # ratios to diffusers at the same batch, this invocation only
        peer = next((p for p in rows if p["impl"] == "diffusers" and p["batch"] == r["batch"]), None)
        r["time_vs_diffusers"] = round(r["wall_s"] / peer["wall_s"], 3) if peer else ""
        r["rss_vs_diffusers"] = round(r["peak_mb"] / peer["peak_mb"], 3) if peer else ""
        if r["impl"] != "diffusers" and peer:
            print(f"batch {r['batch']} {r['impl']:11s} / diffusers: time {r['time_vs_diffusers']:.2f}x, "
                  f"peak RSS {r['rss_vs_diffusers']:.2f}x")
    old = list(csv.DictReader(args.out.open())) if args.out.is_file() else []
    keep = [o for o in old if (o["benchmark"], o["batch"], o["impl"]) not in
            {(r["benchmark"], str(r["batch"]), r["impl"]) for r in rows}]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else list(old[0]))
        w.writeheader()
        w.writerows(keep + rows)


if __name__ == "__main__":
    main()
