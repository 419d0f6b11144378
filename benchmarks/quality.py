"""Inpainting quality of a model on held-out scenes of the synthetic world (train/evaluate.py): how often the
generated backdrop shows the prompted floor / backdrop / sky / wall colour, against the ceiling (true renders of
the prompted scenes), chance and an empty-prompt control; object expansion; product pixels kept.

    .venv/bin/python benchmarks/quality.py [--model backdrop-tiny] [--n 64] [--steps 20] [--guidance-scale 2]
                                          [--mask-dilate 1] [--mask-blur PX] [--out FILE]

Prints the model card's markdown tables and writes benchmarks/results/quality-<model name>.json (the settings,
the machine, the commit and every figure). Several --sampler and --steps (comma lists) sweep every pair on the same
scenes and seeds instead (no control run), print one summary table, and write a CSV row per pair to
benchmarks/results/quality-samplers-<model name>.csv (or --out): which sampler gets there in fewest steps.
"""
from __future__ import annotations

import argparse
import csv
import json
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from common import commit, machine

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="backdrop-tiny")
    ap.add_argument("--n", type=int, default=64, help="held-out scenes (default: %(default)s)")
    ap.add_argument("--steps", default="20", help="one, or a comma list to sweep (default: %(default)s)")
    ap.add_argument("--sampler", default="dpmpp-2m", help="one, or a comma list to sweep (default: %(default)s)")
    ap.add_argument("--guidance-scale", type=float, default=2.0, help="default: %(default)s, as make demo")
    ap.add_argument("--mask-dilate", type=int, default=1, help="Pipeline.inpaint's mask_dilate (default: 1)")
    ap.add_argument("--mask-blur", type=float, default=None,
                    help="Pipeline.inpaint's mask_blur, the paste-back feather in pixels (default: the Pipeline's, "
                         "0 for product masks)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--no-control", dest="control", action="store_false", help="skip the empty-prompt control run")
    ap.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/quality-<model>.json)")
    args = ap.parse_args()

    from backdrop.diffusion.masks import default_mask_blur
    from backdrop.diffusion.pipeline import Pipeline
    from backdrop.train.evaluate import evaluate_inpainting, format_report

    pipe = Pipeline.from_pretrained(args.model)
    blur = default_mask_blur("product_mask") if args.mask_blur is None else args.mask_blur  # recorded as used
    pairs = [(sampler, int(steps)) for sampler in args.sampler.split(",") for steps in args.steps.split(",")]
    model = Path(str(args.model))  # a training run's OUT/final (or a checkpoint) is named after its run
    name = (model.parent.name if model.name == "final" or model.name.startswith("step-") else model.name
            ).removesuffix(".safetensors")
    rows = []
    for sampler, steps in pairs:
        generating = [0.0]  # seconds inside the pipeline (the judging is not the sampler's)

        def inpaint_fn(images, product_masks, prompts, seeds):
            t0 = time.perf_counter()
            out = pipe.inpaint(image=images, product_mask=product_masks, prompt=prompts, seed=list(seeds),
                               steps=steps, sampler=sampler, guidance_scale=args.guidance_scale,
                               mask_dilate=args.mask_dilate, mask_blur=blur, output_type="np", progress=False)
            generating[0] += time.perf_counter() - t0
            return (np.asarray(out.images) * 255).round().astype(np.uint8)

        start = time.perf_counter()
        report = evaluate_inpainting(inpaint_fn, n=args.n, size=pipe.config.image_size,
                                     control=args.control and len(pairs) == 1, batch_size=args.batch_size)
        seconds = time.perf_counter() - start
        report |= {"model": str(args.model), "steps": steps, "sampler": sampler,
                   "guidance_scale": args.guidance_scale, "mask_dilate": args.mask_dilate,
                   "mask_blur": blur, "seconds": round(seconds, 1), "generating_seconds": round(generating[0], 2),
                   "date": str(date.today()), "commit": commit(), "machine": machine(str(pipe.backend.device)),
                   "torch": torch.__version__, "dtype": str(pipe.backend.dtype)}
        if len(pairs) == 1:
            print(format_report(report))
            path = Path(args.out) if args.out else RESULTS / f"quality-{name}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(report, indent=1) + "\n")
            print(f"wrote {path} ({seconds:.0f} s)")
            return
        rows.append(_summary(report))
        print(f"{sampler} {steps} steps: whole backdrop {rows[-1]['whole_backdrop']:.1%}, expansion (3 px, "
              f"corrected) {100 * rows[-1]['expansion_3px']:+.1f} pts ({seconds:.0f} s)", flush=True)
    path = Path(args.out) if args.out else RESULTS / f"quality-samplers-{name}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print("\n| sampler | steps | whole backdrop | floor | wall colour | expansion, 3 px | s per image |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['sampler']} | {r['steps']} | {r['whole_backdrop']:.1%} | {r['floor']:.1%} | "
              f"{r['wall_colour']:.1%} | {100 * r['expansion_3px']:+.1f} pts | {r['seconds_per_image']:.3f} |")
    print(f"wrote {path}")


def _summary(report: dict) -> dict:
    """One CSV row of a sweep: the settings, the headline figures, the machine and the commit."""
    attrs = report["attributes"]
    keys = ("model", "sampler", "steps", "guidance_scale", "mask_dilate", "mask_blur", "n")
    return {**{k: report[k] for k in keys},
            "whole_backdrop": round(report["scene"]["accuracy"], 4),
            **{k: round(attrs[k]["accuracy"], 4) for k in ("floor", "backdrop", "sky", "wall_colour")},
            "expansion_3px": round(next(e["corrected"] for e in report["expansion"] if e["ring"] == 3), 4),
            "product_preserved": report["product_preserved"],
            "seconds_per_image": round(report["generating_seconds"] / report["n"], 4),  # generation only
            **{k: report[k] for k in ("date", "commit", "machine", "torch", "dtype")}}


if __name__ == "__main__":
    main()
