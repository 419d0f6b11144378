"""Image folders for training: ImageFolder reads Hugging Face's "imagefolder" layouts, plus masks.

    root/metadata.jsonl   one JSON object a line, paths relative to the metadata file's folder:
                          {"file_name": "mug.png", "text": "a red mug on sand", "mask_file_name": "mug_mask.png"}
                          ("mask" is accepted in place of "mask_file_name"; without either, a mask beside the
                          image named as in the .txt layout below)
    root/metadata.csv     the same as a CSV file with a header row: file_name,text[,mask_file_name]
    root/train/metadata.jsonl (or .csv): HF's split layout, read when root has no metadata file of its own (the
                          train split is what diffusers' scripts train on)
    otherwise, every image under root (recursively, sorted) with its caption in `<stem>.txt` (UTF-8, a BOM is
    fine) and its optional mask beside it as `<stem>.mask.<ext>` or `<stem>_mask.<ext>`, or in root/masks/ at the
    image's relative path; files named like masks, and root/masks/, are never training images. Hidden files and
    folders (a leading '.') are left out; symlinked folders are followed.
    Images: IMAGE_EXTS. A mask is an image of the same shape (its size, or a scale of it: a segmentation model's
    1024x768 mask of a 4000x3000 photo is resized with it), read as inference reads a product mask (white = product,
    a cut-out's alpha, a 0/1 PNG label map: diffusion/masks.py read_mask). Either every image has one or none does.
    Without random_crop, an image with a mask is cropped around its product. A folder whose captions are all empty
    is refused if a metadata file lies deeper in it.
Every file is read as inference reads it (diffusion/image_io.py load_image: EXIF rotation, 16-bit scaled to 8 bits,
CMYK as RGB); an image's alpha channel is not used (one warning names a few images with transparent pixels).
The scan reads headers only: unreadable images and masks of another shape are logged (with their paths) and left out.
A file that breaks after its header (a truncated body) stops a run with a DataFileError naming it at load time:
no other item stands in for it, since that would train another image twice and shift a latent cache's rows. A mask
with no product, all product, or white over most of its border (inverted?) is warned about once when first loaded.
"""
from __future__ import annotations

import collections
import csv
import io
import json
import logging
import os
import unicodedata
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image

from ..diffusion.image_io import load_image
from ..diffusion.masks import IMAGE_EXTS, MASK_SUFFIXES, border_share, has_transparency, read_mask, same_shape

__all__ = ["ImageFolder", "DataFileError", "find_metadata", "read_metadata", "folder_files", "IMAGE_EXTS",
           "image_tensor", "mask_tensor", "item_key"]

log = logging.getLogger(__name__)
METADATA_FILES = ("metadata.jsonl", "metadata.csv")  # the metadata files of HF's imagefolder
TRAIN_SPLITS = ("train", "training")  # folder names HF's imagefolder reads as the train split
_QUARTER_TURNS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
_FEW = 3  # how many files a warning names
_BAD_IMAGE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)  # what PIL raises on broken files


class DataFileError(OSError):
    """A data file that passed the scan failed to load (damaged after its header): the run stops and names it.
    An OSError, like the failed reads and writes a training run already reports in one line."""


def image_tensor(img: Image.Image) -> torch.Tensor:
    a = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())  # (H, W, 3)
    return a.permute(2, 0, 1).float() / 127.5 - 1  # (3, H, W) in [-1, 1]


def mask_tensor(mask: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None]  # (1, H, W)


def item_key(key) -> tuple[int, int]:
    """Items are addressed by an index or by (index, epoch) (what ShardedSampler yields)."""
    return (int(key[0]), int(key[1])) if isinstance(key, tuple) else (int(key), 0)


def _few(paths) -> str:
    """A few paths for a message: 'a, b, c, ...'."""
    paths = [str(p) for p in paths]
    return ", ".join(paths[:_FEW]) + (", ..." if len(paths) > _FEW else "")


# ---------------------------------------------------------------------- reading files

def _read_text(path: Path) -> str:
    """A UTF-8 text file, with or without the byte-order mark some Windows editors write."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); save it as "
                         "UTF-8") from None


def _open(path: Path) -> Image.Image:
    """A file decoded as inference reads it (load_image: upright, 16-bit scaled to 8 bits, CMYK as RGB, ...)."""
    try:
        return load_image(path)
    except _BAD_IMAGE as e:
        raise DataFileError(f"{path}: cannot decode it ({e}), though its header read when the folder was "
                            "scanned; replace the file, or remove it and start the run again") from e


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation from the header. PNG keeps a late eXIf chunk after the pixels, and PIL decodes the whole
    file to look for it, so a PNG counts as upright unless its header holds EXIF (the load-time check catches the
    rest)."""
    if im.format == "PNG" and "exif" not in im.info:
        return 1
    return im.getexif().get(ExifTags.Base.Orientation, 1)


def _header(path: Path) -> tuple[tuple[int, int], bool]:
    """(upright (width, height), whether it has an alpha channel or a transparent colour) from path's header."""
    with Image.open(path) as im:
        w, h = im.size
        alpha = "A" in im.getbands() or "transparency" in im.info
        return ((h, w) if _orientation(im) in _QUARTER_TURNS else (w, h)), alpha


def _logged_header(path: Path, what: str):
    """_header, or None with `what` (the file, named) logged as unreadable."""
    try:
        return _header(path)
    except _BAD_IMAGE as e:
        log.warning("skipping unreadable %s: %s", what, e)
        return None


def _has_transparent_pixels(path: Path) -> bool:
    try:
        im = _open(path)
    except DataFileError:
        return False  # reported when it is loaded
    return has_transparency(im)


# ---------------------------------------------------------------------- metadata files

def find_metadata(root: Path) -> Path | None:
    """The metadata file HF's imagefolder reads for root's train split: metadata.jsonl or metadata.csv at the top,
    else in a train/ split folder (its file_name paths are relative to that folder)."""
    for folder in (root, *(root / split for split in TRAIN_SPLITS)):
        found = [folder / name for name in METADATA_FILES if (folder / name).is_file()]
        if len(found) > 1:
            raise ValueError(f"{found[0]} and {found[1]}: two metadata files in one folder; keep one")
        if found:
            return found[0]
    return None


def _metadata_below(root: Path) -> Path | None:
    """A metadata file anywhere under root (ones find_metadata does not read)."""
    return next((p for p in sorted(root.rglob("metadata.*")) if p.name in METADATA_FILES), None)


def _jsonl_records(path: Path, text: str):
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None


def _csv_records(path: Path, text: str):
    reader = csv.DictReader(io.StringIO(text, newline=""))
    for column in ("file_name", "text"):
        if column not in (reader.fieldnames or ()):
            raise ValueError(f"{path}: no '{column}' column in its header row (columns: {reader.fieldnames})")
    for rec in reader:
        yield reader.line_num, rec


def _entry(rec, where: str, folder: Path) -> tuple:
    """One metadata record -> (image path, caption, mask path or None), paths relative to the metadata's folder."""
    if not isinstance(rec, dict) or not isinstance(rec.get("file_name"), str):
        raise ValueError(f"{where}: needs a string 'file_name' (the image's path relative to {folder})")
    if not isinstance(rec.get("text"), str):
        raise ValueError(f"{where}: needs a string 'text' (the caption of {rec['file_name']})")
    mask = rec.get("mask_file_name") or rec.get("mask")  # a CSV's empty cell is no mask
    if mask is not None and not isinstance(mask, str):
        raise ValueError(f"{where}: 'mask_file_name' must be a path relative to {folder}, got {mask!r}")
    return _named(folder, rec["file_name"]), rec["text"], _named(folder, mask) if mask else None


def _named(folder: Path, name: str) -> Path:
    """folder / name, or the file whose name differs from it only in Unicode normal form (macOS writes NFD names,
    editors and JSON tools NFC: "café.jpg" may be either)."""
    path = folder / name
    if not path.exists():
        for form in ("NFC", "NFD"):
            other = folder / unicodedata.normalize(form, name)
            if other.exists():
                return other
    return path


def read_metadata(path: Path) -> list:
    """The records' (image, caption, mask) entries; an image without a mask_file_name takes the mask beside it
    named as in the .txt layout (NAME_mask.png, NAME.mask.png), as a folder of both conventions holds them."""
    text = _read_text(path)
    records = _csv_records(path, text) if path.suffix.lower() == ".csv" else _jsonl_records(path, text)
    entries = [_entry(rec, f"{path}:{n}", path.parent) for n, rec in records]
    masks_in: dict[Path, dict] = {}  # folder -> its masks by image path without suffix, listed once
    out = []
    for image, caption, mask in entries:
        if mask is None and image.parent.is_dir():
            if image.parent not in masks_in:
                masks_in[image.parent] = _split_masks(sorted(p for p in image.parent.iterdir()
                                                             if p.suffix.lower() in IMAGE_EXTS))[1]
            mask = _mask_of(image, masks_in[image.parent])
        out.append((image, caption, mask))
    return out


# ---------------------------------------------------------------------- the .txt layout

def _mask_name(path: Path) -> str | None:
    """NAME for a file named like the mask of NAME.<ext> (NAME.mask.png, NAME_mask.jpg), else None."""
    for suffix in MASK_SUFFIXES:
        if path.stem.lower().endswith(suffix) and len(path.stem) > len(suffix):
            return path.stem[:-len(suffix)]
    return None


def _split_masks(files: list[Path]) -> tuple[list[Path], dict]:
    """Image files -> (the training images, {image path without its suffix: the masks named after it})."""
    images, masks = [], collections.defaultdict(list)
    for p in files:
        name = _mask_name(p)
        if name is None:
            images.append(p)
        else:
            masks[p.with_name(name)].append(p)
    return images, masks


def _mask_of(image: Path, masks: dict) -> Path | None:
    found = masks.get(image.with_suffix(""), [])
    if len(found) > 1:
        raise ValueError(f"{image} has {len(found)} masks ({_few(found)}); keep one")
    return found[0] if found else None


def _warn_strays(root: Path, images: list[Path], masks: dict, captions: dict) -> None:
    """Name masks and captions with no image beside them (an image in a format Backdrop does not read), and images
    that share a name (sku.jpg beside sku.png: one caption and one mask for both)."""
    stems = collections.Counter(p.with_suffix("") for p in images)
    for what, strays in (("file(s) named like masks", [m for k, ms in masks.items() if k not in stems for m in ms]),
                         ("caption file(s)", [t for k, t in sorted(captions.items()) if k not in stems])):
        if strays:
            log.warning("not using %d %s in %s with no image beside them (images are %s), e.g. %s",
                        len(strays), what, root, ", ".join(IMAGE_EXTS), _few(strays))
    if twins := sorted(p for p in images if stems[p.with_suffix("")] > 1):
        log.warning("%d images in %s share their name with another (e.g. %s): each such group trains with one "
                    "caption and one mask; rename them if they differ", len(twins), root, _few(twins))


def folder_files(root: Path) -> list[Path]:
    """Every file under root, sorted, following symlinked folders (each real folder once). Hidden files and
    folders (a leading '.': macOS's ._name and .DS_Store, .thumbnails/) are left out, and counted in one line."""
    found, hidden, seen = [], 0, set()
    for folder, dirs, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a symlink loop, or two links to one folder
            dirs[:] = []
            continue
        seen.add(real)
        hidden += sum(d.startswith(".") for d in dirs) + sum(n.startswith(".") for n in names)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(folder) / n for n in names if not n.startswith(".")]
    if hidden:
        log.info("left out %d hidden files and folders in %s (names starting with '.')", hidden, root)
    return sorted(found)


def _scan_folder(root: Path) -> list:
    """The .txt layout: every image under root with its `<stem>.txt` caption (any case of .txt) and its optional
    mask, beside it (NAME_mask.*, NAME.mask.*) or in root/masks/ at the image's relative path (masks/sub/NAME.*)."""
    files = folder_files(root)
    in_masks = [p for p in files if len(rel := p.relative_to(root).parts) > 1 and rel[0].lower() == "masks"]
    held = set(in_masks)
    captions = {p.with_suffix(""): p for p in files if p.suffix.lower() == ".txt" and p not in held}
    images, masks = _split_masks([p for p in files if p.suffix.lower() in IMAGE_EXTS and p not in held])
    for p in in_masks:
        if p.suffix.lower() in IMAGE_EXTS:
            rel = Path(*p.relative_to(root).parts[1:]).with_suffix("")
            masks[root / rel.with_name(_mask_name(rel) or rel.name)].append(p)
    _warn_strays(root, images, masks, captions)
    return [(p, _read_text(captions[p.with_suffix("")]).strip() if p.with_suffix("") in captions else "",
             _mask_of(p, masks)) for p in images]


def _centre(mask: Image.Image | None, resized: tuple[int, int], size: int) -> tuple[int, int]:
    """(left, top) of the size x size crop of an image resized to `resized`: centred on the product (its mask's
    bounding box; a centred crop of a wide photo could leave out a product at one end), else on the image."""
    nw, nh = resized
    box = mask.getbbox() if mask is not None else None  # of the non-zero (product) pixels, at the original size
    if box is None:
        return (nw - size) // 2, (nh - size) // 2
    cx, cy = (box[0] + box[2]) / 2 * nw / mask.width, (box[1] + box[3]) / 2 * nh / mask.height
    clamp = lambda c, n: int(min(max(round(c - size / 2), 0), n - size))  # noqa: E731
    return clamp(cx, nw), clamp(cy, nh)


# ---------------------------------------------------------------------- the dataset

class ImageFolder(torch.utils.data.Dataset):
    """Images with captions (and optional product masks) from a folder; see the module docstring for the layout.

    Each image is resized so its shorter side is `size`, then cropped to size x size (centred, or at a random
    offset with `random_crop`), and mirrored half the time with `flip`; the mask goes through the same resize,
    crop and flip. masks=False ignores the folder's masks (for a stage that reads none); with masks, every image
    needs one, of its own shape (an image whose mask has another aspect ratio is left out, with a warning).
    """

    def __init__(self, root, size: int, *, metadata=None, random_crop: bool = False, flip: bool = False,
                 seed: int = 0, masks: bool = True):
        self.root, self.size, self.random_crop, self.flip, self.seed = Path(root), size, random_crop, flip, seed
        self._checked: set[Path] = set()  # masks looked at by _doubt
        if not self.root.is_dir():
            raise ValueError(f"{self.root}: not a folder of images")
        meta = Path(metadata) if metadata is not None else find_metadata(self.root)
        entries = read_metadata(meta) if meta is not None else _scan_folder(self.root)
        if not masks:  # a stage that reads no masks: the folder's are neither checked nor loaded
            entries = [(image, caption, None) for image, caption, _ in entries]
        self.entries, with_alpha = self._usable(entries)  # (image path, caption, mask path or None)
        if not self.entries:
            raise ValueError(f"{self.root}: no usable images in this folder ({', '.join(IMAGE_EXTS)}; unreadable "
                             "ones and masks of another shape are logged above)")
        self._check_captions(meta)
        self._check_masks()
        self._warn_transparent(with_alpha)

    def _usable(self, entries) -> tuple[list, list]:
        """The entries whose image and mask headers read, with the mask the shape of its image; and the images of
        those with an alpha channel. What is left out is logged: unreadable files one by one, masks of another shape
        in one warning; masks at another scale, used, in one line."""
        usable, with_alpha, mismatched, scaled = [], [], [], []
        for image, caption, mask in entries:
            head = _logged_header(image, f"image {image}")
            mask_head = _logged_header(mask, f"mask {mask} (and its image)") if mask is not None and head else head
            if head is None or mask_head is None:
                continue
            (size, alpha), mask_size = head, mask_head[0]
            if mask_size != size:
                fits = same_shape(mask_size, size)
                (scaled if fits else mismatched).append(f"{mask} ({mask_size[0]}x{mask_size[1]}) for {image} "
                                                        f"({size[0]}x{size[1]})")
                if not fits:
                    continue
            usable.append((image, caption, mask))
            if alpha:
                with_alpha.append(image)
        if mismatched:
            log.warning("skipping %d of %d images in %s whose mask has another aspect ratio than the image: %s",
                        len(mismatched), len(entries), self.root, _few(mismatched))
        if scaled:
            log.info("%d masks in %s are at another scale than their image, resized with it: %s", len(scaled),
                     self.root, _few(scaled))
        return usable, with_alpha

    def _check_captions(self, meta: Path | None) -> None:
        """Warn about empty captions, naming a few; refuse a folder of uncaptioned images with metadata below."""
        empty = [e[0] for e in self.entries if not e[1]]
        source = f"its 'text' in {meta}" if meta is not None else "no <name>.txt beside it, or an empty one"
        if len(empty) == len(self.entries):
            below = None if meta is not None else _metadata_below(self.root)
            if below is not None:
                raise ValueError(f"{self.root}: none of its {len(empty)} images has a <name>.txt caption, but "
                                 f"{below} holds captions; Backdrop reads a metadata file at the top of the folder "
                                 f"or in {TRAIN_SPLITS[0]}/ only: give {below} as the data (its file_name paths are "
                                 "relative to its folder)")
            log.warning("every caption in %s is empty (%s): the model learns without text, unconditionally",
                        self.root, source)
        elif empty:
            log.warning("%d of %d images in %s have an empty caption (%s), e.g. %s; they train with an empty caption",
                        len(empty), len(self.entries), self.root, source, _few(empty))

    def _check_masks(self) -> None:
        with_mask = [e for e in self.entries if e[2] is not None]
        if with_mask and len(with_mask) != len(self.entries):
            missing = [str(e[0]) for e in self.entries if e[2] is None][:3]
            raise ValueError(f"ImageFolder: {len(with_mask)} of {len(self.entries)} images in {self.root} have a "
                             f"mask; give every image a mask or none (no mask for e.g. {missing})")
        self.has_masks = bool(with_mask)

    def _warn_transparent(self, with_alpha: list[Path]) -> None:
        """One warning naming a few images whose alpha has transparent pixels, decoding only until it has them.

        Training reads RGB only, as diffusers' scripts do: the transparent pixels train as the colour the file holds
        there. Compositing on grey is no better: it teaches a grey backdrop as surely as black teaches black, while
        the file's own colour is what its author saved and what inference reads from it."""
        found = []
        for path in with_alpha:
            if len(found) > _FEW:
                break
            if _has_transparent_pixels(path):
                found.append(path)
        if found:
            log.warning("images in %s have transparent pixels, e.g. %s: training reads their RGB only, so those "
                        "pixels train as whatever colour they hold (often black); flatten them onto a backdrop "
                        "first if the model should not learn that colour", self.root, _few(found))

    def _doubt(self, path: Path, mask: np.ndarray) -> None:
        """Warn once per file (per worker) about a product mask that trains something else than meant: one with no
        product (a full repaint), all product (nothing to repaint) or white over most of its border (white = the
        backdrop: an inverted mask trains the model to repaint the product and keep its surroundings)."""
        if path in self._checked:  # a file is looked at once, not at every epoch's load
            return
        self._checked.add(path)
        white, border = mask >= 128, border_share(mask)  # (H, W), the share of its outermost pixels white
        doubt = ("has no white (no product): its item trains as a full repaint" if not white.any() else
                 "is all white (all product): its item has nothing to repaint" if white.all() else
                 f"is white on {border:.0%} of its border: white is the product to keep; is the mask "
                 "inverted (white = backdrop)?" if border > 0.5 else None)
        if doubt:
            log.warning("product mask %s %s", path, doubt)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, key) -> dict:
        index, epoch = item_key(key)
        if not 0 <= index < len(self.entries):
            raise IndexError(f"ImageFolder: index {index} out of range for {len(self.entries)} images")
        return self._load(index, epoch)

    def _load(self, i: int, epoch: int) -> dict:
        path, caption, mask_path = self.entries[i]
        img = _open(path).convert("RGB")
        mask = None
        if mask_path is not None:
            mask = Image.fromarray(read_mask(_open(mask_path), "product_mask", str(mask_path)), "L")  # as inference
            self._doubt(mask_path, np.asarray(mask))
            if not same_shape(mask.size, img.size):  # checked at scan time from the headers; a late EXIF can differ
                raise DataFileError(f"mask {mask_path} is {mask.size[0]}x{mask.size[1]}, its image {path} "
                                    f"{img.size[0]}x{img.size[1]} (once upright): another aspect ratio")
        # Every random choice comes from (seed, epoch, index), drawn in a fixed order.
        rng = np.random.default_rng([self.seed, epoch, i])
        rx, ry, rflip = rng.random(3)
        w, h = img.size
        scale = self.size / min(w, h)
        nw, nh = max(self.size, round(w * scale)), max(self.size, round(h * scale))
        left, top = ((int(rx * (nw - self.size + 1)), int(ry * (nh - self.size + 1))) if self.random_crop
                     else _centre(mask, (nw, nh), self.size))
        box = (left, top, left + self.size, top + self.size)
        flip = self.flip and rflip < 0.5
        img = img.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=2.0).crop(box)
        item = {"image": image_tensor(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else img),
                "caption": caption, "index": i}
        if mask is not None:  # same size, same crop box, same flip; bilinear then threshold keeps edges smooth
            m = np.asarray(mask.resize((nw, nh), Image.Resampling.BILINEAR).crop(box)) >= 128  # (size, size)
            item["mask"] = mask_tensor(m[:, ::-1] if flip else m)
        return item
