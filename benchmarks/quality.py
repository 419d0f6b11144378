"""Inpainting quality of a model on held-out scenes of the synthetic world (train/evaluate.py): how often the
generated backdrop shows the prompted floor / backdrop / sky / wall colour, against the ceiling (true renders of
the prompted scenes), chance and an empty-prompt control; object expansion; product pixels kept.

    .venv/bin/python benchmarks/quality.py [--model backdrop-tiny] [--n 64] [--steps 20] [--guidance-scale 2]
                                          [--mask-dilate 1] [--mask-blur PX] [--out FILE]

Prints the model card's markdown tables and writes benchmarks/results/quality-<model name>.json (the settings,
the machine, the commit and every figure).
"""
from __future__ import annotations

import argparse
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
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sampler", default="dpmpp-2m")
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

    def inpaint_fn(images, product_masks, prompts, seeds):
        out = pipe.inpaint(image=images, product_mask=product_masks, prompt=prompts, seed=list(seeds),
                           steps=args.steps, sampler=args.sampler, guidance_scale=args.guidance_scale,
                           mask_dilate=args.mask_dilate, mask_blur=blur, output_type="np", progress=False)
        return (np.asarray(out.images) * 255).round().astype(np.uint8)

    start = time.perf_counter()
    report = evaluate_inpainting(inpaint_fn, n=args.n, size=pipe.config.image_size, control=args.control,
                                 batch_size=args.batch_size)
    seconds = time.perf_counter() - start
    print(format_report(report))
    report |= {"model": str(args.model), "steps": args.steps, "sampler": args.sampler,
               "guidance_scale": args.guidance_scale, "mask_dilate": args.mask_dilate,
               "mask_blur": blur, "seconds": round(seconds, 1),
               "date": str(date.today()), "commit": commit(), "machine": machine(str(pipe.backend.device)),
               "torch": torch.__version__, "dtype": str(pipe.backend.dtype)}
    name = Path(str(args.model)).name.removesuffix(".safetensors")
    path = Path(args.out) if args.out else RESULTS / f"quality-{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {path} ({seconds:.0f} s)")


if __name__ == "__main__":
    main()
