"""The files of `backdrop generate | img2img | inpaint` (diffusion/cli.py): the inputs read and the outputs written.

Inputs: every IMAGE and mask is read and checked before any work, and every problem (an unreadable image, a missing,
ambiguous or unreadable mask, a mask of another shape) is named in one error, so a nightly catalogue job is mended in
one go rather than one failed run per bad file.

Outputs: one file per (image, seed), named up front (`<command>-<image stem>-<seed>.png`, `generate-<seed>.png`).
Existing files are never replaced silently: the run refuses before the model loads, unless --overwrite (replace
them) or --skip-existing (make only the missing ones) says what to do. Each PNG is written to a temporary name in
its folder and then renamed, so a killed run never leaves a truncated PNG under a final name (which
--skip-existing would then keep), and it records how it was made in A1111's `parameters` text chunk.
"""
from __future__ import annotations

import json
import os
import re
import stat
import sys
import tempfile
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from backdrop.cli import CLIError, one_line
from backdrop.fsio import fsync, usual_permissions
from backdrop.messages import some

__all__ = ["Job", "Task", "read_image", "read_jobs", "plan", "custom_schedule_text", "per_controlnet", "parameters",
           "write"]


@dataclass
class Job:
    """One input image (none for `generate`): the Pipeline's per-item arguments and what its files record."""
    name: str = ""  # the IMAGE's stem, part of its file names ("" for generate)
    source: str | None = None  # the IMAGE as given on the command line
    inputs: dict = field(default_factory=dict)  # the Pipeline's image=, and mask= or product_mask=, while checked
    mask_file: str | None = None  # the --mask / --product-mask file this image uses
    icc: bytes | None = None  # the input's RGB ICC profile, carried over to its outputs
    size: tuple[int, int] | None = None  # the image's (W, H) as read: one UNet batch holds one size
    stamps: tuple = ()  # (size, mtime, inode) of its files when checked: Job.load reads them again only if equal

    @property
    def files(self) -> list[str]:
        return [f for f in (self.source, self.mask_file) if f is not None]

    def release(self) -> None:
        """Let the checked pixels go (5000 photos of 1024² and their masks, all held, would take 20 GB): Job.load
        reads them again for their batch. Inputs that are no regular files (a pipe, /dev/stdin) are kept."""
        stats = [os.stat(f) for f in self.files]
        if all(stat.S_ISREG(st.st_mode) for st in stats):
            self.stamps, self.inputs = tuple(_stamp(st) for st in stats), {}

    def load(self, args) -> dict:
        """The Pipeline's inputs: as checked, or read again from their files if released, which must not have
        changed since (a photo replaced by another of its size was used silently)."""
        if self.source is None or self.inputs:
            return self.inputs
        try:
            same = tuple(_stamp(os.stat(f)) for f in self.files) == self.stamps
        except OSError:
            same = False
        if not same:
            raise CLIError(f"image {self.source}" + (f" or its mask {self.mask_file}" if self.mask_file else "") +
                           " changed while this run went on; run again (--skip-existing keeps what was made)")
        inputs, key = {"image": read_image(self.source, "image", quiet=True)}, _mask_option(args)
        if key is not None:
            inputs[key] = _fit(read_image(self.mask_file, key.replace("_", " "), quiet=True), inputs["image"].size)
        return inputs


def _fit(mask, size: tuple[int, int]):
    """A mask of its image's shape at another scale (masks.same_shape, checked), resized to the image's (W, H)."""
    from PIL import Image

    if mask.size == size:
        return mask
    out = mask.resize(size, Image.Resampling.BILINEAR)  # PIL keeps its info (orientation, transparency)
    out.format = mask.format  # a JPEG's compression noise is read as such (masks.py)
    return out


def _stamp(st: os.stat_result) -> tuple:
    return st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev


@dataclass(frozen=True)
class Task:
    """One image to make: a job, one seed, and the file it goes to."""
    job: Job
    seed: int
    path: Path


# ------------------------------------------------------------------------------------------------------ inputs

def read_image(path: str, what: str, quiet: bool = False):
    """The file as the Pipeline reads it (image_io.from_file: upright, 8 bits, RGB(A) or L, its RGB ICC profile
    kept), saying on stderr what the reading changed (16 bits to 8, CMYK to RGB, ...). Its EXIF orientation is kept
    in .info["orientation"] for the mask check. Images over Pillow's limit for untrusted files (89 Mpx) are refused,
    a decoder's warnings are notes."""
    import warnings

    from PIL import Image

    from backdrop.diffusion.image_io import from_file, notes, orientation

    try:
        with warnings.catch_warnings(record=True) as caught:  # a decoder's warnings, said below as notes
            warnings.simplefilter("always")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(path)
            im.load()
    except FileNotFoundError:
        raise CLIError(f"{what} {path}: no such file") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise CLIError(f"{what} {path}: too large to decode safely ({one_line(e)}); scale it down first") from None
    except Exception as e:  # whatever a decoder raises (OSError, ValueError, RuntimeError, SyntaxError, ...)
        raise CLIError(f"{what} {path}: cannot read it as an image ({type(e).__name__}: {one_line(e)})") from None
    for note in [] if quiet else [one_line(w.message) for w in caught] + notes(im):
        print(f"note: {what} {path}: {note}", file=sys.stderr)
    turned = orientation(im)
    try:
        im = from_file(im)
    except ValueError as e:
        raise CLIError(f"{what} {path}: {one_line(e)}") from None
    im.info["orientation"] = turned
    return im


def _mask_file(spec: str, flag: str, image_path: str, listings: dict) -> str:
    """--mask / --product-mask for one image: the file itself, or from a folder the one mask named after the image:
    NAME.*, NAME_mask.* or NAME.mask.* (the names `backdrop train --data` reads), never the image itself (masks
    kept beside their images), and never a guess between several (a stale sku000.jpg beside sku000.png)."""
    from backdrop.diffusion.masks import IMAGE_EXTS, MASK_SUFFIXES  # the names train --data reads too

    folder = Path(spec)
    if not folder.is_dir():
        return spec
    stem, image = Path(image_path).stem, Path(image_path).resolve()
    names = {_nfc(stem), *(_nfc(stem + s) for s in MASK_SUFFIXES)}
    if folder not in listings:  # listed once per run, not once per image (3000 images took 9 s of listing)
        by_stem: dict[str, list[Path]] = {}
        for p in folder.iterdir():
            if p.suffix.lower() in IMAGE_EXTS:
                by_stem.setdefault(_nfc(p.stem), []).append(p)  # macOS writes NFD names, Linux tools NFC
        listings[folder] = by_stem
    found = sorted(str(p) for n in names for p in listings[folder].get(n, []) if p.resolve() != image)
    if not found:
        raise CLIError(f"{flag} {spec}: no mask for {image_path} (looked there for {stem}, {stem}_mask or "
                       f"{stem}.mask with the extension {', '.join(e.lstrip('.') for e in IMAGE_EXTS)})")
    if len(found) > 1:
        raise CLIError(f"{flag} {spec}: {len(found)} masks for {image_path} ({some(found)}); keep one")
    return found[0]


def _nfc(name: str) -> str:
    """A name in Unicode's composed form: "café" typed, or copied from a Mac (NFD), finds its mask either way."""
    return unicodedata.normalize("NFC", name)


def _attempt(problems: list[str], fn, *args):
    """fn(*args), or None with its CLIError's message added to `problems`."""
    try:
        return fn(*args)
    except CLIError as e:
        problems.append(str(e))
        return None


def _mask_option(args) -> str | None:
    """"mask" or "product_mask": the mask option given (img2img has neither; inpaint without one uses alpha)."""
    return "mask" if getattr(args, "mask", None) else "product_mask" if getattr(args, "product_mask", None) else None


def _read_job(args, path: str, problems: list[str], listings: dict) -> Job | None:
    """One IMAGE and its mask, or None with what is wrong added to `problems` (the image and its mask both checked,
    so a run names an unreadable image and its missing mask at once)."""
    from backdrop.diffusion import masks as M
    from backdrop.diffusion.image_io import rgb_icc

    job, key, mask = Job(Path(path).stem, path), _mask_option(args), None
    image = _attempt(problems, read_image, path, "image", args.quiet)
    if key is not None:
        flag = f"--{key.replace('_', '-')}"
        job.mask_file = _attempt(problems, _mask_file, getattr(args, key), flag, path, listings)
        mask = job.mask_file and _attempt(problems, read_image, job.mask_file, key.replace("_", " "), args.quiet)
        if image is None or mask is None:
            return None
        turned = _turned(image, mask, path, job.mask_file)
        (w, h), (mw, mh) = image.size, mask.size
        if not M.same_shape(mask.size, image.size):  # most likely another photo's mask
            problems.append(f"{flag} {job.mask_file} is {mw}x{mh} but image {path} is {w}x{h} (WxH): a mask must "
                            f"have its image's size, or its shape at another scale{turned}")
            return None
        if mask.size != image.size:
            print(f"warning: {flag} {job.mask_file} is {mw}x{mh}, image {path} {w}x{h}: the mask is resized to the "
                  "image (bilinear), so the kept edge is only as exact as the mask's pixels", file=sys.stderr)
            mask = _fit(mask, image.size)
        if turned:
            print(f"warning: {flag} {job.mask_file}: {turned.lstrip('; ')}", file=sys.stderr)
        if mask.format == "JPEG" and args.mask_threshold is None and not args.quiet:
            print(f"note: {flag} {job.mask_file} is a JPEG: its compression noise makes some pixels grey, which are "
                  "then partly repainted; --mask-threshold 0.5 makes it black and white", file=sys.stderr)
    if image is None:
        return None
    if args.kind == "inpaint" and key is None and not M.has_transparency(image):
        problems.append(f"{path} has no transparent pixel" + (" (its alpha channel is opaque everywhere)" if
                        M.has_alpha(image) else "") + ": give --mask (white = repaint) or --product-mask (white = "
                        "the product to keep), or an image whose transparent pixels are to be repainted")
        return None
    job.inputs = dict(image=image) if key is None else {"image": image, key: mask}
    job.icc, job.size = rgb_icc(image), image.size
    return job


def _turned(image, mask, path: str, mask_path: str) -> str:
    """'; ...' naming the EXIF orientations when the image and its mask were stored turned differently (both are
    read upright, so a mask drawn on the other's stored pixels lands rotated), else ''."""
    a, b = image.info.get("orientation", 1), mask.info.get("orientation", 1)
    if a == b:
        return ""
    return (f"; {path} is stored turned (EXIF orientation {a}) and {mask_path} " +
            ("is not" if b == 1 else f"otherwise ({b})") + ": both are read upright, so a mask drawn on the "
            "stored pixels of the other would land rotated")


def _nothing_kept(args, job: Job) -> str | None:
    """A product mask or alpha channel that keeps no pixel repaints the product too: in a catalogue, a failed
    cut-out. The warning that says so (a mask with nothing to repaint gets its own note when the input is written
    unchanged), or None."""
    from backdrop.diffusion import masks as M

    kind = _mask_option(args) or "image"  # "image": its alpha channel
    if args.kind != "inpaint" or kind == "mask":
        return None
    try:
        repaint = M.to_repaint_mask(**{kind: job.inputs[kind]}, threshold=args.mask_threshold)
    except ValueError:  # nothing to repaint (M.EmptyMask), or a mask the Pipeline call will name
        return None
    if repaint.amin() < 1:
        return None
    what = f"--product-mask {job.mask_file}" if kind == "product_mask" else "the alpha channel"
    return f"warning: {what} keeps no pixel of {job.source}: the whole image is repainted, product and all"


def _image_paths(given: list[str]) -> list[str]:
    """IMAGE arguments as files: a folder gives its images (sorted; hidden files and files named like masks left
    out), `@LIST` the paths in file LIST one per line, `-` the paths on stdin (past the argument-list limit of a
    shell glob over a whole catalogue); anything else is a file name (`@x.png` and `-` as files: `./@x.png`)."""
    from backdrop.diffusion.masks import IMAGE_EXTS, MASK_SUFFIXES

    out: list[str] = []
    for arg in given:
        if arg == "-" or (arg.startswith("@") and Path(arg[1:]).is_file()):
            try:
                text = sys.stdin.read() if arg == "-" else Path(arg[1:]).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise CLIError(f"IMAGE {arg}: cannot read the list ({one_line(e)})") from None
            out += [line for line in text.splitlines() if line.strip()]
        elif Path(arg).is_dir():
            found = sorted(str(p) for p in Path(arg).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS
                           and not p.name.startswith(".") and not p.stem.lower().endswith(MASK_SUFFIXES))
            if not found:
                raise CLIError(f"IMAGE {arg} is a folder without images ({', '.join(IMAGE_EXTS)})")
            out += found
        else:
            out.append(arg)
    return out


def read_jobs(args) -> list[Job]:
    """One Job per IMAGE (one empty Job for generate), every input checked before any work; all the problems in one
    CLIError."""
    if args.kind == "generate":
        return [Job()]
    args.image = _image_paths(args.image)
    names = [Path(p).stem for p in args.image]
    if len(set(names)) < len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise CLIError(f"two IMAGEs are named {twice!r}: their output files would collide; rename one")
    problems: list[str] = []
    listings: dict = {}  # mask folder -> its files by stem
    jobs, warnings = [], []
    for path in args.image:
        jobs.append(job := _read_job(args, path, problems, listings))
        if job is not None:
            warnings.append(_nothing_kept(args, job))
            job.release()  # checked: its pixels are let go, and read again for its batch (Job.load)
    if problems:
        head = "" if len(problems) == 1 else f"{len(problems)} problems with the inputs: "
        raise CLIError(head + "; ".join(problems))
    for warning in filter(None, warnings):
        print(warning, file=sys.stderr)
    return jobs


# ----------------------------------------------------------------------------------------------------- outputs

def plan(args, jobs: list[Job], folder: Path, seed: int) -> list[Task]:
    """Every image to make, job by job with seeds SEED.., and its file: the names are known before any work, so
    existing files are refused here, before the model loads, unless --overwrite or --skip-existing."""
    tasks = [Task(job, seed + j, folder / f"{args.kind}-{job.name + '-' if job.name else ''}{seed + j}.png")
             for job in jobs for j in range(args.n)]
    todo = [t for t in tasks if not os.path.lexists(t.path)]
    if len(todo) == len(tasks) or args.overwrite:
        return tasks
    existing = [t.path.name for t in tasks if os.path.lexists(t.path)]
    if not args.skip_existing:
        raise CLIError(f"--out {folder}: {some(existing)} already exist{'s' if len(existing) == 1 else ''}: give "
                       "--overwrite to replace existing files or --skip-existing to make only the missing ones")
    if foreign := [t.path.name for t in tasks if os.path.lexists(t.path) and not _made_by(t, args)]:
        one = len(foreign) == 1
        raise CLIError(f"--skip-existing: {some(foreign)} exist{'s' * one} in {folder} but {'was' if one else 'were'} "
                       "not made by this command (another prompt, model, option or input path, or not a Backdrop "
                       f"image): give --overwrite to make {'it' if one else 'them'} again, or another --out")
    if not args.quiet:  # a nightly rerun's cron mail stays empty
        print(f"note: --skip-existing: {len(existing)} of {len(tasks)} files exist in {folder}"
              f"{'; nothing to do' if not todo else ', making the rest'}", file=sys.stderr)
    return todo


def _made_by(task: Task, args) -> bool:
    """Whether the existing file of `task` records the parameters this command would write (_as_made): --skip-existing
    keeps only what the same command made, not a file of another prompt or a damaged one."""
    from PIL import Image

    try:
        with Image.open(task.path) as im:
            said, size = getattr(im, "text", {}).get("parameters"), im.size
    except Exception:  # unreadable, truncated, not an image
        return False
    if said is None:
        return False
    return _as_made(said) == _as_made(_png_text(parameters(args, task, size)))


def _as_made(text: str) -> str:
    """`parameters` less what does not change the image beyond a level on a few pixels: Backdrop's version and the
    batch size (the out-of-memory error's advice is a rerun with a smaller one)."""
    return re.sub(r", Batch size: \d+|, Backdrop: [^,]*$", "", text)


def _png_text(text: str) -> str:
    """Text a PNG chunk can hold: a file name's undecodable bytes (surrogate escapes) as \\xNN."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _quote(value) -> str:
    """A value as A1111 writes it in `parameters` (modules/generation_parameters_copypaste.py quote()): in JSON
    quotes when it holds a comma, colon or newline, which would otherwise end it."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def _mask_fields(args, job: Job) -> dict:
    from backdrop.diffusion.masks import default_mask_blur

    kind = _mask_option(args) or "image"
    return {"Mask": job.mask_file if kind == "mask" else "alpha" if kind == "image" else None,
            "Product mask": job.mask_file if kind == "product_mask" else None,
            "Mask blur": default_mask_blur(kind) if args.mask_blur is None else args.mask_blur,
            "Mask dilate": args.mask_dilate, "Crop padding": args.crop_padding,
            "Mask threshold": args.mask_threshold, "Color match": args.color_match, "Paste back": args.paste_back}


def custom_schedule_text(args) -> str | None:
    """--timesteps / --sigmas as given ("timesteps ays", "sigmas 14.6,2.0,0.0"), or None."""
    for kind in ("timesteps", "sigmas"):
        if (given := getattr(args, kind)) is not None:
            return f"{kind} {given if isinstance(given, str) else ','.join(map(str, given))}"
    return None


def per_controlnet(args, name: str, default: float) -> list[float]:
    """A per-ControlNet option (controlnet_scale, control_guidance_start/end) for each --controlnet: as given, the
    one value given for all, or `default`."""
    given = getattr(args, name) or [default]
    return given * len(args.controlnet) if len(given) == 1 else list(given)


def _control_fields(args) -> dict:
    """--controlnet and its options: each ControlNet with the scale it ran at (the Pipeline's default for the
    command when not given), the control images, the guidance window when given, guess mode when on."""
    if not args.controlnet:
        return {}
    import inspect

    from backdrop.diffusion.pipeline import Pipeline

    default = inspect.signature(getattr(Pipeline, args.kind)).parameters["controlnet_conditioning_scale"].default
    scales = per_controlnet(args, "controlnet_scale", default)
    window = zip(per_controlnet(args, "control_guidance_start", 0.0), per_controlnet(args, "control_guidance_end", 1.0))
    given = args.control_guidance_start or args.control_guidance_end
    return {"ControlNet": ", ".join(f"{path}:{scale:g}" for path, scale in zip(args.controlnet, scales)),
            "Control image": ", ".join(args.control_image),
            "Control guidance": ", ".join(f"{s:g}-{e:g}" for s, e in window) if given else None,
            "Guess mode": args.guess_mode or None}


def _adapter_fields(args) -> dict:
    """--adapter and its options: each T2I-Adapter with the scale it ran at, and the adapter images."""
    if not getattr(args, "adapter", None):
        return {}
    scales = args.adapter_scale or [1.0]
    scales = scales * len(args.adapter) if len(scales) == 1 else scales
    return {"T2I-Adapter": ", ".join(f"{path}:{scale:g}" for path, scale in zip(args.adapter, scales)),
            "Adapter image": ", ".join(args.adapter_image)}


def parameters(args, task: Task, size: tuple[int, int]) -> str:
    """How one image was made, as A1111 records it (its PNG Info tab and image sites read this): the prompt, the
    negative prompt's line, then `Key: value` pairs, A1111's keys first, Backdrop's own after; options left unset
    are left out."""
    from backdrop import __version__

    fields = {"Steps": args.steps, "Sampler": args.sampler, "Schedule": custom_schedule_text(args),
              "CFG scale": args.guidance_scale, "Seed": task.seed,
              "Size": f"{size[0]}x{size[1]}", "Model": args.model,
              "Denoising strength": None if args.kind == "generate" else args.strength,
              "Clip skip": None if not args.clip_skip else args.clip_skip + 1,  # A1111 counts the last layer as 1
              "Guidance rescale": args.guidance_rescale, "Eta": args.eta, "Batch size": args.batch_size,
              "FreeU": args.freeu and ",".join(f"{v:g}" for v in args.freeu),
              "IP-Adapter": args.ip_adapter and f"{args.ip_adapter}:{args.ip_adapter_scale:g}",
              "IP-Adapter image": args.ip_adapter_image, **_control_fields(args), **_adapter_fields(args)}
    if args.kind == "inpaint":
        fields.update(_mask_fields(args, task.job))
    fields.update({"LoRA": ", ".join(f"{path}:{scale:g}" for path, scale in args.lora) or None,
                   "Textual inversion": ", ".join(p if t is None else f"{p}:{t}" for p, t in args.textual_inversion)
                   or None,
                   "Input": task.job.source, "Backdrop": __version__})
    negative = f"\nNegative prompt: {args.negative_prompt}" if args.negative_prompt else ""  # as A1111: if any
    return f"{args.prompt}{negative}\n" + ", ".join(f"{k}: {_quote(v)}" for k, v in fields.items() if v is not None)


def write(image, task: Task, text: str) -> None:
    """Save one PNG with its `parameters` text and the input's ICC profile: to a temporary name in the same folder,
    then renamed over the final one (os.replace is atomic), so a kill mid-save leaves at most a hidden .tmp file
    and a power cut the old file or the new one, whole."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", _png_text(text))  # tEXt, or iTXt for text Latin-1 cannot hold
    tmp = None
    try:  # mkstemp: a new file of an unguessable name (O_EXCL), so a symlink planted in a shared --out is not followed
        fd, name = tempfile.mkstemp(prefix=f".{task.path.name}.", suffix=".tmp", dir=task.path.parent)
        tmp = Path(name)
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info, **({"icc_profile": task.job.icc} if task.job.icc else {}))
        fsync(tmp)  # on the disk before the rename: a power cut leaves the old file or the new one
        usual_permissions(tmp)  # mkstemp makes it 0600
        os.replace(tmp, task.path)
        fsync(task.path.parent)  # the rename itself
    except OSError as e:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise CLIError(f"cannot write {task.path}: {one_line(e)}") from None
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise

