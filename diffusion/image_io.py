"""Image files as every part of Backdrop reads them (the CLI, the server, `backdrop train --data`, and the Python
API's PIL inputs): upright, 8 bits a channel, in a mode masks.py reads, with the RGB colour profile kept.

`load_image(path)` is the public reader (diffusers' load_image, plus what product photos need); `from_file` does the
same to an image already opened; `rgb_icc` is the profile outputs carry, so that a product whose pixels are kept
exactly also looks the same in a colour-managed viewer.
"""
from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageCms, ImageOps

__all__ = ["load_image", "from_file", "rgb_icc", "notes", "PIL_MODES"]

PIL_MODES = ("L", "1", "RGB", "RGBA", "LA", "P")  # the modes masks.py reads as they are
_ORIENTATION = 0x0112  # EXIF tag


def rgb_icc(image: Image.Image) -> bytes | None:
    """The image's ICC profile if it describes RGB (header bytes 16-19, ICC.1:2010 7.2.6): outputs are RGB, and a
    CMYK or grey profile attached to them would tell viewers to misread every pixel."""
    icc = image.info.get("icc_profile") if isinstance(image, Image.Image) else None
    return icc if icc and icc[16:20] == b"RGB " else None


def orientation(im: Image.Image) -> int:
    """The EXIF orientation (1 = upright, 2-8 = mirrored and/or turned), 1 without EXIF."""
    try:
        return int(im.getexif().get(_ORIENTATION, 1))
    except Exception:  # a damaged EXIF block: PIL shows the stored pixels too
        return 1


def _eight_bits(im: Image.Image) -> Image.Image:
    """Integer (I, I;16*) and float (F) greys as 8-bit L, by the range the samples use: integers over 255 (16-bit
    data) keep their top 8 bits, integers up to 255 are 8-bit values already (a 0/1 label map saved from a uint16
    array: its top 8 bits were all 0), F in [0, 1] is scaled by 255 (F up to 255 taken as is). PIL's own convert
    clips at 255, so 16-bit white would be the only grey, [0, 1] floats black."""
    a = np.asarray(im)
    if im.mode == "F":
        a = np.nan_to_num(a.astype(np.float64))
        scale = 255.0 if a.size and a.max() <= 1.0 else 1.0
        return Image.fromarray((a * scale).round().clip(0, 255).astype(np.uint8))
    a = a.astype(np.int64)
    if a.size and a.max() > 255:
        if a.max() > 65535:
            raise ValueError(f"{im.mode} samples up to {a.max()} (more than 16 bits) cannot be read as 8 bits")
        a = a >> 8
    return Image.fromarray(a.clip(0, 255).astype(np.uint8))


def _cmyk_to_rgb(im: Image.Image) -> Image.Image:
    """A CMYK image through its own ICC profile to sRGB (what a colour-managed viewer shows); PIL's profile-less
    conversion without one (or if the profile cannot be used)."""
    icc = im.info.get("icc_profile")
    if icc:
        try:
            return ImageCms.profileToProfile(im, ImageCms.ImageCmsProfile(io.BytesIO(icc)),
                                             ImageCms.createProfile("sRGB"), outputMode="RGB")
        except (ImageCms.PyCMSError, OSError, ValueError):
            pass
    return im.convert("RGB")


def from_file(im: Image.Image) -> Image.Image:
    """An image as the pipeline reads it: upright (its EXIF orientation applied, as diffusers' load_image does: a
    phone photo is stored sideways), its first frame, 16-bit and float greys scaled to 8 bits (_eight_bits), CMYK
    converted through its profile (_cmyk_to_rgb), other modes (YCbCr, LAB, RGBX, ...) to RGB(A), and its RGB ICC
    profile kept in .info (other profiles dropped: the pixels are RGB now), and its file's .format (a JPEG mask's
    noise is no label map: masks._mask_item). An image already so is returned as is."""
    icc, kind = rgb_icc(im), im.format
    if orientation(im) != 1:
        im = ImageOps.exif_transpose(im)
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        im = _eight_bits(im)
    elif im.mode == "CMYK":
        im = _cmyk_to_rgb(im)
    elif im.mode == "La":  # premultiplied grey + alpha (Pillow converts La only to LA, which undoes it)
        im = im.convert("LA")
    elif im.mode not in PIL_MODES:  # RGBa (premultiplied: alpha band "a"), PA, YCbCr, ...
        im = im.convert("RGBA" if {"A", "a"} & set(im.getbands()) else "RGB")
    if im.info.get("icc_profile") != icc:
        im.info.pop("icc_profile", None)
        if icc:
            im.info["icc_profile"] = icc
    im.format = im.format or kind  # a new image (turned, converted) has none
    return im


def notes(im: Image.Image) -> list[str]:
    """What from_file changes beyond the orientation, for the CLI to say (before from_file, on the opened file)."""
    out = []
    wide = im.mode.startswith("I;16") or im.mode == "I"
    if wide and im.getextrema()[1] <= 255:
        out.append("16 bits a channel, all under 256: read as 8-bit values")
    elif wide or im.info.get("bits", 8) == 16:
        out.append("16 bits a channel: read as its top 8 bits (the output is an 8-bit PNG)")
    if im.mode == "F":
        out.append("floating-point samples: scaled to 8 bits")
    if im.mode == "CMYK":
        how = "through its ICC profile" if im.info.get("icc_profile") else \
            "without a colour profile (none in the file): colours are approximate"
        out.append(f"CMYK: converted to RGB {how}")
    if getattr(im, "n_frames", 1) > 1:
        out.append(f"{im.n_frames} frames: the first one is used")
    icc = im.info.get("icc_profile")
    if icc and icc[16:20] == b"GRAY":
        out.append("a grey ICC profile, which the RGB output cannot carry: a colour-managed viewer may show it a "
                   "little lighter or darker")
    return out


def load_image(path: str | os.PathLike) -> Image.Image:
    """An image file opened and loaded as the pipeline reads it (from_file): upright, 8 bits, RGB(A) or L, its RGB
    ICC profile in .info (outputs made from it carry that profile)."""
    with Image.open(path) as im:
        im.load()
        out = from_file(im)
        return out if out is not im else im.copy()
