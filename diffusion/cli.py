"""`backdrop generate`, `backdrop img2img` and `backdrop inpaint`: the Pipeline from the command line.

Options the three share are defined once, in parent parsers (`_common_options`, `_image_options`). Every user
error (unreadable file, bad option value, unknown model, a mask of another shape than its image) is one line on
stderr and exit status 2 (backdrop.cli.CLIError); an all-black mask writes the input unchanged with a note. Images
are written to OUT/<kind>-<image name>-<seed>.png (generate: OUT/generate-<seed>.png) and their paths printed, one
per line, as each batch of --batch-size images finishes (image i has seed SEED + i whatever the batch size). The
files are named before any work, so existing ones are refused up front unless --overwrite or --skip-existing
(cli_files.py, which also reads and checks the inputs and writes each PNG atomically with its `parameters`).

img2img and inpaint take several IMAGEs (a catalogue: `backdrop inpaint products/*.png --product-mask masks/`):
a mask option may then name a folder holding one mask per image, by file name; images of one size share UNet
batches; every image gets the seeds SEED .. SEED + N - 1 (the same scene for every product).

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

from backdrop.cli import (CLIError, add_checkpoint_options, add_dtype_option, add_freeu_option,
                          add_ip_adapter_options, add_lora_option, add_textual_inversion_option, apply_model_options,
                          check_ip_adapter_options, checkpoint_options, make_folder, one_line, parse_device)
from backdrop.diffusion.cli_files import (Task, custom_schedule_text, parameters, per_controlnet, plan, read_image,
                                          read_jobs, write)
from backdrop.diffusion.recipes import NAMED_SCHEDULES, RECIPES, SAMPLING_DEFAULTS
from backdrop.fsio import FolderInUse, FolderLock
from backdrop.messages import some

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
                   help="random seed; image i uses SEED + i, so any image can be remade alone: bit-exactly if it "
                        "was made with --batch-size 1, else to within 1 level on a few pixels (the same command on "
                        "the same machine is always bit-exact) (default: random)")
    s.add_argument("--steps", "--num-inference-steps", type=int, default=SAMPLING_DEFAULTS["steps"], metavar="N",
                   help="denoising steps: more is slower, often finer (default: %(default)s)")
    s.add_argument("--sampler", choices=list(RECIPES), default=SAMPLING_DEFAULTS["sampler"], metavar="NAME",
                   help=f"one of: {', '.join(RECIPES)}; lcm is for LCM-distilled weights (an LCM-LoRA via "
                        "--lora), with --steps 4 --guidance-scale 1 (default: %(default)s)")
    custom = s.add_mutually_exclusive_group()
    custom.add_argument("--timesteps", type=_custom_list(int), default=None, metavar="T1,T2,...",
                        help="a custom schedule instead of --steps: descending UNet timesteps, or 'ays' (Align Your "
                             "Steps' 10 for SD1.5), for --sampler ddpm, euler, heun, dpmpp-2m(-sde) or lcm")
    custom.add_argument("--sigmas", type=_custom_list(float), default=None, metavar="S1,S2,...",
                        help="a custom schedule instead of --steps: descending noise levels ending with the final "
                             "one (usually 0), or 'ays', for --sampler euler")
    s.add_argument("--guidance-scale", type=float, default=SAMPLING_DEFAULTS["guidance_scale"], metavar="SCALE",
                   help="how strongly to follow the prompt; 1 turns guidance off (default: %(default)s)")
    s.add_argument("--guidance-rescale", type=float, default=0.0, metavar="PHI",
                   help="rescale the guided prediction toward the prompt-only one's spread (Lin et al. 2023), "
                        "0-1: counters washed-out or over-exposed images at high guidance (default: %(default)s)")
    s.add_argument("--clip-skip", type=int, default=None, metavar="N",
                   help="condition on the text encoder's output N layers before its last (diffusers' clip_skip; "
                        "A1111's 'CLIP skip' is N + 1): 1 for models trained that way, e.g. many anime SD1.5 "
                        "fine-tunes (default: 0, the last layer; --backend torch only)")
    add_freeu_option(s)
    s.add_argument("--eta", type=float, default=0.0,
                   help="with --sampler ddim: fresh noise each step, 0 = none (deterministic), 1 = as DDPM "
                        "(default: %(default)s)")
    ip = p.add_argument_group("image prompt")
    add_ip_adapter_options(ip, "with --ip-adapter-image")
    ip.add_argument("--ip-adapter-image", metavar="IMAGE",
                    help="with --ip-adapter: a photo of the scene or style wanted, to guide the image beside the "
                         "prompt")
    _control_options(p.add_argument_group("ControlNet", "make the picture follow the edges, depth, pose, ... of a "
                                          "control image (--backend torch only)"))
    _adapter_options(p.add_argument_group("T2I-Adapter", "the same with a T2I-Adapter: lighter than a ControlNet, it "
                                          "reads its image once, not at every step (--backend torch only)"))
    out = p.add_argument_group("output")
    out.add_argument("--out", default="outputs", metavar="DIR",
                     help="folder for the PNG files: <command>-<image name>-<seed>.png, generate-<seed>.png "
                          "without an IMAGE; each records how it was made in A1111's 'parameters' text "
                          "(default: %(default)s)")
    existing = out.add_mutually_exclusive_group()
    existing.add_argument("--overwrite", action="store_true",
                          help="replace output files that exist already (without this or --skip-existing, the run "
                               "stops before any work if one does)")
    existing.add_argument("--skip-existing", action="store_true",
                          help="make only the images whose files do not exist yet: rerun a job after a crash, or "
                               "after adding products, without redoing the rest")
    out.add_argument("--quiet", action="store_true",
                     help="no progress bar (it is shown only when stderr is a terminal) and no notes; warnings "
                          "and errors still show")
    return p


def _control_options(c) -> None:
    """--controlnet and its options: repeated, one per ControlNet in the same order (a scale or guidance
    fraction given once is every ControlNet's)."""
    c.add_argument("--controlnet", action="append", metavar="PATH",
                   help="a ControlNet made for the model's base (SD1.5 or SD2): a diffusers ControlNetModel folder "
                        "(e.g. a download of lllyasviel/control_v11p_sd15_canny) or an original single .safetensors "
                        "file; repeat for several (their effects add up), each with its own --control-image")
    c.add_argument("--control-image", action="append", metavar="IMAGE",
                   help="the control image of the --controlnet in the same position: the map it was trained on "
                        "(white edges on black for canny, a depth map for depth, ...), not a photo; resized to the "
                        "output's size")
    c.add_argument("--controlnet-scale", action="append", type=float, metavar="S",
                   help="how strongly the control image counts: 0 not at all, 1 as trained; once for every "
                        "ControlNet or once each (default, as diffusers: 1 for generate, 0.8 for img2img, 0.5 for "
                        "inpaint)")
    c.add_argument("--control-guidance-start", action="append", type=float, metavar="F",
                   help="the ControlNets act from this fraction of the steps on (0-1): later leaves the rough "
                        "layout to the prompt; once for all or once each (default: 0)")
    c.add_argument("--control-guidance-end", action="append", type=float, metavar="F",
                   help="the ControlNets act up to this fraction of the steps (0-1): earlier leaves the fine "
                        "details to the prompt; once for all or once each (default: 1)")
    c.add_argument("--guess-mode", action="store_true",
                   help="the ControlNets recognise the control image's content even without a prompt (diffusers' "
                        "guess_mode: they steer the prompt's side of the guidance only); try --guidance-scale 3-5")


def _image_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("image", metavar="IMAGE", nargs="+",
                   help="the input picture (PNG, JPEG, WebP, ...), written as <command>-<name>-<seed>.png; "
                        "several for a batch job, a folder for its images, @LIST for the paths in file LIST (one "
                        "a line), - for paths on stdin")
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
                    "transparent pixels. Pixels that are kept come out exactly as they went in: the decoded "
                    "8-bit pixels after EXIF rotation (16-bit inputs are reduced to 8 bits, CMYK is converted "
                    "to RGB through its ICC profile; an RGB ICC profile is carried over).",
        epilog="example: backdrop inpaint bottle.png --product-mask bottle-mask.png "
               "--prompt 'on a marble table, soft light' --n 4 --seed 7")
    which = inp.add_argument_group("mask").add_mutually_exclusive_group()
    which.add_argument("--mask", "--mask-image", metavar="M",
                       help="mask image of IMAGE's size: white = repaint, black = keep; or a folder with one mask "
                            "per IMAGE, named NAME.* or NAME_mask.* (any image extension)")
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

def _custom_flag(args) -> str | None:
    """The --timesteps / --sigmas option given, as written, or None."""
    return (text := custom_schedule_text(args)) and f"--{text}"


def _custom_list(kind: type):
    """argparse type of --timesteps / --sigmas: a name (recipes.NAMED_SCHEDULES) or comma-separated numbers."""
    def parse(text: str):
        if text.strip().isidentifier():
            return text.strip()
        try:
            return tuple(kind(v) for v in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of "
                                             f"{'ints' if kind is int else 'numbers'} or a name (ays)") from None
    return parse


MAX_N = 1000  # images per run (written as each batch of --batch-size finishes)


def _check(args) -> None:
    """Range checks argparse cannot express, as one-line errors."""
    rules = [("--n", args.n, 1 <= args.n <= MAX_N, f"in [1, {MAX_N}]"),
             ("--batch-size", args.batch_size, args.batch_size >= 1, "at least 1"),
             ("--steps", args.steps, args.steps >= 1, "at least 1"),
             ("--guidance-scale", args.guidance_scale, 0 <= args.guidance_scale < math.inf, "finite and >= 0"),
             ("--guidance-rescale", args.guidance_rescale, 0 <= args.guidance_rescale <= 1, "in [0, 1]"),
             ("--eta", args.eta, 0 <= args.eta <= 1, "in [0, 1]"),
             ("--clip-skip", args.clip_skip, args.clip_skip is None or args.clip_skip >= 0, ">= 0")]
    if (args.ip_adapter is None) != (args.ip_adapter_image is None):
        given, lacking = ("--ip-adapter", "--ip-adapter-image") if args.ip_adapter_image is None else \
            ("--ip-adapter-image", "--ip-adapter")
        raise CLIError(f"{given} needs {lacking}: the image prompt is an IP-Adapter and an image")
    check_ip_adapter_options(args)
    rules += _control_rules(args) + _adapter_rules(args)
    if args.seed is not None:
        rules.append(("--seed", args.seed, 0 <= args.seed <= 2**32 - args.n, "in [0, 2**32 - N]"))
    elif args.skip_existing:  # a new random seed names new files: every image would be made again
        raise CLIError("--skip-existing needs the --seed of the run to complete: without one, a new random seed "
                       "names new files and every image is made again")
    if args.kind == "generate":
        rules += [(f"--{k}", v, v is None or v >= 8, "at least 8") for k, v in
                  (("height", args.height), ("width", args.width))]
    else:
        rules.append(("--strength", args.strength, 0 < args.strength <= 1, "in (0, 1]"))
    if args.kind == "inpaint":
        rules += [("--mask-blur", args.mask_blur, args.mask_blur is None or 0 <= args.mask_blur < math.inf,
                   "finite and >= 0"),
                  ("--mask-dilate", args.mask_dilate, args.mask_dilate >= 0, ">= 0"),
                  ("--crop-padding", args.crop_padding, args.crop_padding is None or args.crop_padding >= 0,
                   ">= 0"),
                  ("--mask-threshold", args.mask_threshold,
                   args.mask_threshold is None or 0 < args.mask_threshold <= 1, "in (0, 1]")]
    for flag, value, ok, want in rules:
        if not ok:
            raise CLIError(f"{flag} {value} must be {want}")
    if custom := _custom_flag(args):  # the list sets the number of steps (what the images' parameters record)
        given = args.timesteps if args.timesteps is not None else args.sigmas
        named = NAMED_SCHEDULES["timesteps" if args.timesteps is not None else "sigmas"]
        steps = len(named.get(given, ()) if isinstance(given, str) else given) - (args.timesteps is None)
        if steps >= 1 and args.steps not in (SAMPLING_DEFAULTS["steps"], steps):
            raise CLIError(f"--steps {args.steps} and {custom} ({steps} steps): give one of them")
        args.steps = max(steps, 1)  # an unknown name or too short a list: build_schedule names it
    if args.eta and args.sampler != "ddim":
        from backdrop.diffusion.samplers import stochastic_samplers
        raise CLIError(f"--eta is DDIM's noise: it applies to --sampler ddim only, not {args.sampler} (the "
                       f"stochastic samplers are {stochastic_samplers()})")
    parse_device(args.device)


def _adapter_options(a) -> None:
    """--adapter and its options: repeated, one per T2I-Adapter in the same order."""
    a.add_argument("--adapter", action="append", metavar="DIR",
                   help="a T2I-Adapter made for the model's base: a diffusers T2IAdapter folder (e.g. a download of "
                        "TencentARC/t2iadapter_canny_sd15v2); repeat for several (their effects add up), each with "
                        "its own --adapter-image")
    a.add_argument("--adapter-image", action="append", metavar="IMAGE",
                   help="the image of the --adapter in the same position: the map it was trained on (edges, depth, "
                        "a sketch, ...), resized to the output's size")
    a.add_argument("--adapter-scale", action="append", type=float, metavar="S",
                   help="how strongly the adapter image counts: 0 not at all, 1 as trained; once for every adapter "
                        "or once each (default: 1)")


def _adapter_rules(args) -> list:
    """--adapter's options checked against each other; their value rules as _check's."""
    adapters, images, scales = args.adapter or [], args.adapter_image or [], args.adapter_scale or []
    if len(adapters) != len(images):
        raise CLIError(f"{len(adapters)} --adapter and {len(images)} --adapter-image: give one adapter image for "
                       "each T2I-Adapter, in the same order")
    if scales and not adapters:
        raise CLIError("--adapter-scale is an option of --adapter, which is not given")
    if len(scales) not in (0, 1, len(adapters)):
        raise CLIError(f"--adapter-scale is given {len(scales)} times for {len(adapters)} --adapter: give it once "
                       "for all of them, or once for each")
    return [("--adapter-scale", v, math.isfinite(v), "finite") for v in scales]


def _control_rules(args) -> list:
    """--controlnet's options checked against each other; their value rules as _check's."""
    nets, per_net = args.controlnet or [], ("controlnet_scale", "control_guidance_start", "control_guidance_end")
    if bool(nets) != bool(args.control_image):
        given, lacking = ("--controlnet", "--control-image") if nets else ("--control-image", "--controlnet")
        raise CLIError(f"{given} needs {lacking}: a ControlNet follows a control image, one for each --controlnet")
    if not nets:
        used = [n for n in per_net if getattr(args, n) is not None] + ["guess_mode"] * args.guess_mode
        if used:
            raise CLIError(f"--{used[0].replace('_', '-')} is an option of --controlnet, which is not given")
        return []
    if len(args.control_image) != len(nets):
        raise CLIError(f"{len(nets)} --controlnet and {len(args.control_image)} --control-image: give one control "
                       "image for each ControlNet, in the same order")
    for name in per_net:
        if len(getattr(args, name) or [1]) not in (1, len(nets)):
            raise CLIError(f"--{name.replace('_', '-')} is given {len(getattr(args, name))} times for "
                           f"{len(nets)} --controlnet: give it once for all of them, or once for each")
    starts = per_controlnet(args, "control_guidance_start", 0.0)
    ends = per_controlnet(args, "control_guidance_end", 1.0)
    rules = [("--controlnet-scale", s, math.isfinite(s), "finite") for s in args.controlnet_scale or []]
    rules += [(f"--control-guidance-{k}", v, 0 <= v <= 1, "in [0, 1]") for k in ("start", "end")
              for v in getattr(args, f"control_guidance_{k}") or []]
    rules += [("--control-guidance-start", s, s < e, f"below --control-guidance-end {e}") for s, e in zip(starts, ends)]
    return rules


def _out_folder(path: str) -> Path:
    """The --out folder, created and checked before any work is done."""
    from backdrop.diffusion.masks import IMAGE_EXTS

    if not path.strip():  # an unset shell variable: Path("") would be the current folder
        raise CLIError("--out is empty: give a folder")
    if Path(path).exists() and not Path(path).is_dir():
        raise CLIError(f"--out {path} is a file: give a folder, where the PNGs are named after their inputs and seeds")
    if not Path(path).exists() and Path(path).suffix.lower() in IMAGE_EXTS:
        raise CLIError(f"--out {path} looks like a file name: --out is a folder, where the PNGs are named after "
                       "their inputs and seeds (always PNG: a lossy format would change the product's pixels)")
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
    # a call's progress=None falls back to this default, which is True (a bar even in a cron log) until set
    pipe.set_progress_bar_config(disable=None)
    try:  # the model's scheduler decides which steps/sampler/strength it can run: say so before any work
        schedule = build_schedule(args.sampler, args.steps, pipe.config.scheduler, timesteps=args.timesteps,
                                  sigmas=args.sigmas)
        if args.kind != "generate":
            schedule.img2img(args.strength)
    except ValueError as e:
        strength = "" if args.kind == "generate" else f" --strength {args.strength}"
        raise CLIError(f"{_custom_flag(args) or f'--steps {args.steps}'} --sampler {args.sampler}{strength}: "
                       f"{one_line(e)}") from None
    return pipe


def _sampling(args) -> dict:
    """The Pipeline arguments every image of the run shares."""
    common = dict(prompt=args.prompt, negative_prompt=args.negative_prompt, steps=args.steps,
                  ip_adapter_image=args.ip_image,
                  sampler=args.sampler, timesteps=args.timesteps, sigmas=args.sigmas,
                  guidance_scale=args.guidance_scale,
                  guidance_rescale=args.guidance_rescale, eta=args.eta, clip_skip=args.clip_skip,
                  progress=False if args.quiet else None)  # None: tqdm's disable=None, a bar on a terminal only
    if args.controlnet:  # a scale not given: the Pipeline's default for the command (diffusers')
        given = dict(controlnet_conditioning_scale=args.controlnet_scale, control_guidance_start=
                     args.control_guidance_start, control_guidance_end=args.control_guidance_end)
        common.update({k: v[0] if len(v) == 1 else v for k, v in given.items() if v is not None},
                      control_image=args.control[0] if len(args.control) == 1 else args.control,
                      guess_mode=args.guess_mode)
    if args.adapter:
        common.update(adapter_image=args.adapted[0] if len(args.adapted) == 1 else args.adapted,
                      adapter_conditioning_scale=(args.adapter_scale or [1.0])[0] if len(args.adapter_scale or []) < 2
                      else args.adapter_scale)
    if args.kind == "generate":
        common.update(height=args.height, width=args.width)
    elif args.kind == "img2img":
        common.update(strength=args.strength)
    else:
        common.update(strength=args.strength, mask_blur=args.mask_blur, mask_dilate=args.mask_dilate,
                      crop_padding=args.crop_padding, mask_threshold=args.mask_threshold,
                      color_match=args.color_match, paste_back=args.paste_back)
    return common


def _run(args) -> int:
    _check(args)
    jobs = read_jobs(args)
    args.ip_image = None if args.ip_adapter_image is None else read_image(args.ip_adapter_image, "--ip-adapter-image")
    args.control = [read_image(path, "--control-image") for path in args.control_image or []]
    args.adapted = [read_image(path, "--adapter-image") for path in args.adapter_image or []]
    for path in args.controlnet or []:  # before any work, as the images
        if not os.path.exists(path):
            raise CLIError(f"--controlnet {path}: no such file or folder (a diffusers ControlNetModel folder or "
                           "a ControlNet .safetensors file)")
    for path in args.adapter or []:
        if not os.path.isdir(path):
            raise CLIError(f"--adapter {path}: no such folder (a diffusers T2IAdapter folder)")
    folder = _out_folder(args.out)
    try:  # one run writes a folder at a time; temporary files of killed runs are removed once the lock is held
        lock = FolderLock(folder, stale=(".*.png.*.tmp",))
    except FolderInUse as e:
        raise CLIError(f"--out {folder} is in use by another backdrop run ({e.holder}); wait for it to end, or "
                       "write elsewhere") from None
    except OSError as e:
        raise CLIError(f"--out {folder}: {one_line(e)}") from None
    try:
        return _make(args, jobs, folder)
    finally:
        lock.release()


def _make(args, jobs, folder: Path) -> int:
    seed = secrets.randbelow(2**31) if args.seed is None else args.seed  # drawn up front: it names the files
    tasks = plan(args, jobs, folder, seed)
    if not tasks:  # --skip-existing and every file is there
        return 0
    pipe = _pipeline(args)
    common = _sampling(args)
    unchanged = []
    for batch in _batches(tasks, args.batch_size):
        inputs = {}  # a job's n images share its files, read once
        for t in batch:
            if id(t.job) not in inputs:
                inputs[id(t.job)] = t.job.load(args)
        per_item = {k: [inputs[id(t.job)][k] for t in batch] for k in inputs[id(batch[0].job)]}
        out = _call(getattr(pipe, args.kind), args, dict(common, **per_item, seed=[t.seed for t in batch]))
        unchanged += [batch[i].job.name for i in out.unchanged]
        for im, task in zip(out.images, batch):
            write(im, task, parameters(args, task, im.size))
            _say(task.path)
    if unchanged:  # inpaint only, where every job has a name
        print(f"note: the mask of {some(sorted(set(unchanged)))} has nothing to repaint; wrote the input unchanged",
              file=sys.stderr)
    return 0


def _say(path: Path) -> None:
    """One output path on stdout (a line: what `| while read` takes). A name with bytes that are not UTF-8 goes
    out as it came in from a process of our own (cli.main sets stdout's surrogateescape), else backslash-escaped."""
    try:
        print(path, flush=True)
    except UnicodeEncodeError:
        print(str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace"), flush=True)


def _batches(tasks: list[Task], size: int) -> list[list[Task]]:
    """The tasks in batches of at most `size`, a batch's images all of one size (one UNet batch)."""
    by_size: dict = {}
    for task in tasks:
        by_size.setdefault(task.job.size, []).append(task)
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
        n = len(kwargs["seed"])
        smaller = {"generate": "--height/--width", "img2img": "a smaller image",
                   "inpaint": "--crop-padding N (only the mask's surroundings, at the model's size)"}[args.kind]
        raise CLIError(f"out of memory making {n} image(s) at once at this size: " +
                       (f"lower --batch-size or use {smaller}" if n > 1 else f"use {smaller}")) from None
