"""`backdrop generate`, `backdrop img2img` and `backdrop inpaint`: the Pipeline from the command line.

Options the three share are defined once, in parent parsers (`_common_options`, `_image_options`). Every user
error (unreadable file, bad option value, unknown model) is one line on stderr and exit status 2 (backdrop.cli.
CLIError); a mask whose size differs from the image is resized with a warning, and an all-black mask writes the
input unchanged with a note. Images are written to OUT/<kind>-<seed>.png and their paths printed, one per line, as
each batch of --batch-size images finishes (image i has seed SEED + i whatever the batch size).

img2img and inpaint take several IMAGEs (a catalogue: `backdrop inpaint products/*.png --product-mask masks/`):
a mask option may then name a folder holding one mask per image, by file name; images of one size share UNet
batches; every image gets the seeds SEED .. SEED + N - 1 (the same scene for every product) and its files are named
OUT/<kind>-<image name>-<seed>.png.

diffusers' argument names are aliases (--num-inference-steps, --num-images-per-prompt, --mask-image), also spelt
with underscores (--num_inference_steps: backdrop/cli.py).
"""
from __future__ import annotations

import argparse
import math
import os
import secrets
import sys
from pathlib import Path

from backdrop.cli import (CLIError, add_checkpoint_options, add_dtype_option, add_lora_option,
                          add_textual_inversion_option, apply_model_options, checkpoint_options, make_folder,
                          one_line, parse_device)
from backdrop.diffusion.schedule import RECIPES

__all__ = ["add_parser"]



def _common_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    model = p.add_argument_group("model")
    model.add_argument("--model", default="backdrop-tiny", metavar="PATH_OR_NAME",
                       help="a diffusers model folder, one .safetensors checkpoint, or a built-in model's name "
                            "(default: %(default)s)")
    model.add_argument("--backend", choices=("torch", "onnxruntime", "tensorrt"), default="torch",
                       help="torch runs --model directly; onnxruntime/tensorrt run an export folder written by "
                            "`backdrop export` (default: %(default)s)")
    model.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if present, else cpu)")
    add_dtype_option(model)
    add_checkpoint_options(model)
    add_lora_option(model)
    add_textual_inversion_option(model)
    s = p.add_argument_group("sampling")
    s.add_argument("--prompt", required=True, metavar="TEXT",
                   help="what the picture should show, e.g. 'a bottle on wet rocks'")
    s.add_argument("--negative-prompt", default="", metavar="TEXT",
                   help="what it should not show, e.g. 'blurry, text'")
    s.add_argument("--n", "--num-images-per-prompt", type=int, default=1, metavar="N",
                   help="how many images to make (default: 1)")
    s.add_argument("--batch-size", type=int, default=4, metavar="B",
                   help="images made at once: larger is faster on a GPU until memory runs out (default: "
                        "%(default)s)")
    s.add_argument("--seed", type=int, default=None,
                   help="random seed; image i uses SEED + i, so any image can be remade alone (default: random)")
    s.add_argument("--steps", "--num-inference-steps", type=int, default=30, metavar="N",
                   help="denoising steps: more is slower, often finer (default: %(default)s)")
    s.add_argument("--sampler", choices=list(RECIPES), default="dpmpp-2m", metavar="NAME",
                   help=f"one of: {', '.join(RECIPES)}; lcm is for LCM-distilled weights (an LCM-LoRA via "
                        "--lora), with --steps 4 --guidance-scale 1 (default: %(default)s)")
    s.add_argument("--guidance-scale", type=float, default=7.5, metavar="SCALE",
                   help="how strongly to follow the prompt; 1 turns guidance off (default: %(default)s)")
    s.add_argument("--guidance-rescale", type=float, default=0.0, metavar="PHI",
                   help="rescale the guided prediction toward the prompt-only one's spread (Lin et al. 2023), "
                        "0-1: counters washed-out or over-exposed images at high guidance (default: %(default)s)")
    s.add_argument("--clip-skip", type=int, default=None, metavar="N",
                   help="condition on the text encoder's output N layers before its last (diffusers' clip_skip; "
                        "A1111's 'CLIP skip' is N + 1): 1 for models trained that way, e.g. many anime SD1.5 "
                        "fine-tunes (default: 0, the last layer; --backend torch only)")
    s.add_argument("--eta", type=float, default=0.0,
                   help="with --sampler ddim: fresh noise each step, 0 = none (deterministic), 1 = as DDPM "
                        "(default: %(default)s)")
    out = p.add_argument_group("output")
    out.add_argument("--out", default="outputs", metavar="DIR",
                     help="folder for the PNG files <command>-<seed>.png (default: %(default)s)")
    out.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _image_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("image", metavar="IMAGE", nargs="+",
                   help="the input picture (PNG, JPEG, WebP, ...); several for a batch job, each written as "
                        "<command>-<name>-<seed>.png")
    # one parser per subcommand: a shared --strength action would carry the last set_defaults to both
    p.add_argument("--strength", type=float, metavar="S",
                   help="how much to change: 1 starts from pure noise, 0.3 keeps most of the input "
                        "(default: %(default)s)")
    return p


def add_parser(subparsers) -> None:
    common = _common_options()

    gen = subparsers.add_parser("generate", parents=[common],
                                help="make pictures from a text prompt",
                                description="Make pictures from a text prompt.")
    gen.add_argument("--height", type=int, default=None, metavar="PX",
                     help="pixels (default: the model's native size)")
    gen.add_argument("--width", type=int, default=None, metavar="PX",
                     help="pixels (default: the model's native size)")
    gen.set_defaults(func=_run, kind="generate")

    i2i = subparsers.add_parser("img2img", parents=[common, _image_options()],
                                help="redraw a picture to follow a prompt",
                                description="Redraw IMAGE to follow the prompt; the output has IMAGE's size.")
    i2i.set_defaults(func=_run, kind="img2img", strength=0.75)

    inp = subparsers.add_parser(
        "inpaint", parents=[common, _image_options()],
        help="paint a new scene around a product (or into a masked region)",
        description="Repaint part of IMAGE. Mark what to repaint with --mask (white = repaint), or what to keep "
                    "with --product-mask (white = the product); an RGBA IMAGE without either repaints its "
                    "transparent pixels. Pixels that are kept come out exactly as they went in.",
        epilog="example: backdrop inpaint bottle.png --product-mask bottle-mask.png "
               "--prompt 'on a marble table, soft light' --n 4 --seed 7")
    which = inp.add_argument_group("mask").add_mutually_exclusive_group()
    which.add_argument("--mask", "--mask-image", metavar="M",
                       help="mask image: white = repaint, black = keep; or a folder with one mask per IMAGE, of the "
                            "same name (any extension)")
    which.add_argument("--product-mask", metavar="M", help="mask image: white = the product to keep, black = "
                                                           "the background to repaint; or a folder as for --mask")
    opts = inp.add_argument_group("inpainting")
    opts.add_argument("--mask-blur", type=float, default=None, metavar="PX",
                      help="soften the seam by this many pixels, inside the repainted region only "
                           "(default: 4 with --mask; 0 with --product-mask and RGBA cutouts, whose edge is the "
                           "product's own)")
    opts.add_argument("--mask-dilate", type=int, default=1, metavar="CELLS",
                      help="let the model repaint this many 8-pixel cells past the mask edge, so halos around the "
                           "product get replaced (default: %(default)s)")
    opts.add_argument("--crop-padding", type=int, default=None, metavar="PX",
                      help="work only on the box around the mask grown by PX pixels, at the model's native "
                           "resolution: faster and more detailed for small regions (default: whole image)")
    opts.add_argument("--mask-threshold", type=float, default=None, metavar="T",
                      help="binarise the mask at T (0-1): pixels repainted at least T are repainted, the rest kept "
                           "exactly; cleans up noisy (e.g. JPEG) masks (default: grey levels repaint partly)")
    opts.add_argument("--color-match", action="store_true",
                      help="correct the colour cast of the new pixels to match the kept ones")
    opts.add_argument("--no-paste-back", dest="paste_back", action="store_false",
                      help="keep the model's own rendering of the kept region instead of the exact input pixels")
    inp.set_defaults(func=_run, kind="inpaint", strength=1.0)


# ------------------------------------------------------------------------------------------------------ running

MAX_N = 1000  # images per run (written as each batch of --batch-size finishes)


def _check(args) -> None:
    """Range checks argparse cannot express, as one-line errors."""
    rules = [("--n", args.n, 1 <= args.n <= MAX_N, f"in [1, {MAX_N}]"),
             ("--batch-size", args.batch_size, args.batch_size >= 1, "at least 1"),
             ("--steps", args.steps, args.steps >= 1, "at least 1"),
             ("--guidance-scale", args.guidance_scale, 0 <= args.guidance_scale < math.inf, "finite and >= 0"),
             ("--guidance-rescale", args.guidance_rescale, 0 <= args.guidance_rescale <= 1, "in [0, 1]"),
             ("--eta", args.eta, 0 <= args.eta < math.inf, "finite and >= 0"),
             ("--clip-skip", args.clip_skip, args.clip_skip is None or args.clip_skip >= 0, ">= 0")]
    if args.seed is not None:
        rules.append(("--seed", args.seed, 0 <= args.seed < 2**63 - args.n, "in [0, 2**63 - N)"))
    if args.kind == "generate":
        rules += [(f"--{k}", v, v is None or v >= 8, "at least 8") for k, v in
                  (("height", args.height), ("width", args.width))]
    else:
        rules.append(("--strength", args.strength, 0 < args.strength <= 1, "in (0, 1]"))
    if args.kind == "inpaint":
        rules += [("--mask-blur", args.mask_blur, args.mask_blur is None or args.mask_blur >= 0, ">= 0"),
                  ("--mask-dilate", args.mask_dilate, args.mask_dilate >= 0, ">= 0"),
                  ("--crop-padding", args.crop_padding, args.crop_padding is None or args.crop_padding >= 0,
                   ">= 0"),
                  ("--mask-threshold", args.mask_threshold,
                   args.mask_threshold is None or 0 < args.mask_threshold <= 1, "in (0, 1]")]
    for flag, value, ok, want in rules:
        if not ok:
            raise CLIError(f"{flag} {value} must be {want}")
    if args.eta and args.sampler != "ddim":
        from backdrop.diffusion.samplers import stochastic_samplers
        raise CLIError(f"--eta is DDIM's noise: it applies to --sampler ddim only, not {args.sampler} (the "
                       f"stochastic samplers are {stochastic_samplers()})")
    parse_device(args.device)


def _open(path: str, what: str):
    from PIL import Image, UnidentifiedImageError

    from backdrop.diffusion import masks as M

    try:
        im = Image.open(path)
        im.load()
    except FileNotFoundError:
        raise CLIError(f"{what} {path}: no such file") from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise CLIError(f"{what} {path}: cannot read it as an image ({one_line(e)})") from None
    return M.from_file(im)


def _fit_mask(mask, image, path: str):
    """Resize a mask to the image's size (with a warning): the API refuses mismatched sizes, the CLI helps."""
    from PIL import Image

    if mask.size == image.size:
        return mask
    print(f"warning: mask {path} is {mask.size[0]}x{mask.size[1]} but the image is {image.size[0]}x"
          f"{image.size[1]} (WxH); resizing the mask to match", file=sys.stderr)
    mask = mask.convert("LA" if mask.mode in ("RGBA", "LA") else "L")
    return mask.resize(image.size, Image.BILINEAR)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def _mask_file(spec: str, flag: str, image_path: str) -> str:
    """--mask / --product-mask for one image: the file itself, or from a folder the mask named as the image."""
    folder = Path(spec)
    if not folder.is_dir():
        return spec
    stem = Path(image_path).stem
    found = sorted(p for p in folder.iterdir() if p.stem == stem and p.suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        raise CLIError(f"{flag} {spec}: no mask for {image_path} (looked for {stem}.png, .jpg, ... there)")
    return str(found[0])


def _jobs(args) -> list[dict]:
    """One dict per input image: its Pipeline arguments and the name its files carry ("" for a single image)."""
    if args.kind == "generate":
        return [dict(name="")]
    paths = args.image
    names = [Path(p).stem if len(paths) > 1 else "" for p in paths]
    if len(set(names)) < len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise CLIError(f"two IMAGEs are named {twice!r}: their output files would collide; rename one")
    jobs = [dict(name=n, image=_open(p, "image")) for p, n in zip(paths, names)]
    if args.kind != "inpaint":
        return jobs
    key = "mask" if args.mask else "product_mask" if args.product_mask else None
    for path, job in zip(paths, jobs):
        image = job["image"]
        if key is not None:
            flag = f"--{key.replace('_', '-')}"
            file = _mask_file(getattr(args, key), flag, path)
            job[key] = _fit_mask(_open(file, key.replace("_", " ")), image, file)
        elif image.mode not in ("RGBA", "LA") and "transparency" not in image.info:
            raise CLIError(f"{path} has no transparency: give --mask (white = repaint) or --product-mask "
                           "(white = the product to keep)")
    return jobs


def _out_folder(path: str) -> Path:
    """The --out folder, created and checked before any work is done."""
    if not path.strip():  # an unset shell variable: Path("") would be the current folder
        raise CLIError("--out is empty: give a folder")
    folder = make_folder(path)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CLIError(f"--out {folder}: the folder is not writable")
    return folder


def _pipeline(args):
    from backdrop.diffusion.pipeline import Pipeline
    from backdrop.diffusion.schedule import build_schedule

    try:
        pipe = Pipeline.from_pretrained(args.model, device=args.device, dtype=args.dtype, backend=args.backend,
                                        **checkpoint_options(args))
    except (OSError, ValueError, RuntimeError, ImportError) as e:  # missing files, CheckpointError, OOM, no ORT/TRT
        raise CLIError(f"cannot load model {args.model}: {one_line(e)}") from None
    apply_model_options(pipe, args)
    try:  # the model's scheduler decides which steps/sampler/strength it can run: say so before any work
        schedule = build_schedule(args.sampler, args.steps, pipe.config.scheduler)
        if args.kind != "generate":
            schedule.img2img(args.strength)
    except ValueError as e:
        strength = "" if args.kind == "generate" else f" --strength {args.strength}"
        raise CLIError(f"--steps {args.steps} --sampler {args.sampler}{strength}: {one_line(e)}") from None
    return pipe


def _run(args) -> int:
    _check(args)
    common = dict(prompt=args.prompt, negative_prompt=args.negative_prompt, steps=args.steps,
                  sampler=args.sampler, guidance_scale=args.guidance_scale,
                  guidance_rescale=args.guidance_rescale, eta=args.eta, clip_skip=args.clip_skip,
                  progress=not args.quiet)
    if args.kind == "generate":
        common.update(height=args.height, width=args.width)
    elif args.kind == "img2img":
        common.update(strength=args.strength)
    else:
        common.update(strength=args.strength, mask_blur=args.mask_blur, mask_dilate=args.mask_dilate,
                      crop_padding=args.crop_padding, mask_threshold=args.mask_threshold,
                      color_match=args.color_match, paste_back=args.paste_back)
    jobs = _jobs(args)
    folder = _out_folder(args.out)
    pipe = _pipeline(args)
    seed = secrets.randbelow(2**31) if args.seed is None else args.seed
    unchanged = []
    for batch in _batches(jobs, args.n, args.batch_size):  # (job, copy j: seed + j), one image size per batch
        per_item = {k: [job[k] for job, _ in batch] for k in batch[0][0] if k != "name"}
        out = _call(getattr(pipe, args.kind), args, dict(common, **per_item, seed=[seed + j for _, j in batch]))
        unchanged += [batch[i][0]["name"] for i in out.unchanged]
        try:
            for im, s, (job, _) in zip(out.images, out.seeds, batch):
                path = folder / f"{args.kind}-{job['name'] + '-' if job['name'] else ''}{s}.png"
                im.save(path)
                print(path, flush=True)
        except OSError as e:
            raise CLIError(f"cannot write to {folder}: {e}") from None
    if unchanged:
        which = f" of {', '.join(sorted(set(unchanged)))}" if any(unchanged) else ""
        print(f"note: the mask{which} has nothing to repaint; wrote the input unchanged", file=sys.stderr)
    return 0


def _batches(jobs: list[dict], n: int, size: int) -> list[list[tuple[dict, int]]]:
    """Every (job, copy) pair in batches of at most `size`, a batch's images all of one size (one UNet batch)."""
    by_size: dict = {}
    for job in jobs:
        by_size.setdefault(getattr(job.get("image"), "size", None), []).extend((job, j) for j in range(n))
    return [items[i:i + size] for items in by_size.values() for i in range(0, len(items), size)]


def _call(method, args, kwargs: dict):
    """One Pipeline call, its refusals and running out of memory as one-line errors."""
    try:
        return method(**kwargs)
    except ValueError as e:  # a value the pipeline refuses
        raise CLIError(one_line(e)) from None
    except (MemoryError, RuntimeError) as e:  # torch's CPU allocator and CUDA's OutOfMemoryError are RuntimeErrors
        if not isinstance(e, MemoryError) and "allocate" not in str(e) and "out of memory" not in str(e):
            raise
        raise CLIError(f"out of memory making {len(kwargs['seed'])} image(s) at once at this size: "
                       f"lower --batch-size{'' if args.kind != 'generate' else ' or --height/--width'}") from None
