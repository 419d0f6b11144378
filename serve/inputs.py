"""Request inputs: decoding untrusted images, reading fields, and the OpenAI-shaped error every check raises.

Everything here is pure (no HTTP, no model), so each rule is a plain function the handlers in server.py call
before anything is queued. Every failure is an APIError naming the field (`param`) at fault, which the server
turns into OpenAI's {"error": {"message", "type", "param", "code"}} body. Images are checked from their header
before any pixel is decoded: a 100-byte PNG may claim 10000 x 10000 pixels, and PIL's own decompression-bomb
guard only warns below 2 x 89 M pixels, so our own limit (far lower) is what protects the server. Numbers and
booleans in JSON must be JSON ones; multipart fields, strings by nature, hold decimal digits (`form_int`) or
true / false in any case (`form_bool`, as the openai client sends stream=false). Messages quote a client's value
only as its first ECHO_CHARS characters (`shown`).

OpenAI fields that change nothing here are accepted only with the values the openai client's types allow
(EDIT_IGNORED, GENERATE_IGNORED: openai 3.54's image_edit_params.py / image_generate_params.py), and those that
ask for what this server cannot do (streaming, JPEG, transparency) are refused with code UNSUPPORTED.
"""
from __future__ import annotations

import base64
import binascii
import io
import math
import reprlib

import numpy as np
from PIL import Image
from starlette.datastructures import UploadFile
from starlette.responses import JSONResponse

from backdrop.diffusion import masks as M
from backdrop.diffusion.guidance import check_start
from backdrop.diffusion.image_io import from_file
from backdrop.diffusion.schedule import build_schedule
from backdrop.nn.tokenizer import check_texts

__all__ = ["APIError", "size_buckets", "decode_image", "repaint_mask", "require_edit_area", "require_transparency",
           "one_image", "edit_inputs", "number", "form_int", "form_bool", "seconds", "boolean", "text", "choice",
           "check_fields", "b64decode", "shown", "clip", "custom_schedule_fields", "schedule_steps", "IMAGE_FORMATS",
           "MIN_SIDE", "MAX_PROMPT_CHARS", "MAX_STEPS", "MAX_SEED", "IDENTITY_IGNORED", "EDIT_IGNORED",
           "GENERATE_IGNORED", "OPENAI_OUTPUT", "UNSUPPORTED"]

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")   # what OpenAI's edits accept; anything else PIL reads is refused
MIN_SIDE = 16               # smaller images cannot be reflect-padded to the VAE's multiple of 8 (masks.py)
MAX_PROMPT_CHARS = 4000     # CLIP reads 77 tokens anyway; this only bounds the tokenizer's work
MAX_STEPS = 1000            # the training schedule's timesteps
MAX_SEED = 2**32 - 1  # torch's CPU generator keeps a seed's low 32 bits (diffusion/batching.py)
# OpenAI fields accepted and ignored -> the values allowed (None: any string). One model is served (model); users are
# not tracked (user, safety_identifier); the server's --steps fixes the work per image (quality, complexity); the
# model has no style or moderation setting; the product's pixels are always kept exactly (input_fidelity).
IDENTITY_IGNORED = {"model": None, "user": None, "safety_identifier": None}
COMPLEXITY = ("low", "medium", "high")
EDIT_IGNORED = IDENTITY_IGNORED | {"quality": ("low", "medium", "high", "xhigh", "max", "auto", "standard"),
                                   "input_fidelity": ("high", "low"), "complexity": COMPLEXITY}
GENERATE_IGNORED = IDENTITY_IGNORED | {"quality": ("low", "medium", "high", "xhigh", "max", "auto", "standard", "hd"),
                                       "style": ("vivid", "natural"), "moderation": ("low", "auto"),
                                       "complexity": COMPLEXITY}
OPENAI_CHECKED = ("background", "output_format")  # every endpoint: accepted when asking for what we do anyway
OPENAI_OUTPUT = ("output_compression", "stream", "partial_images")  # the OpenAI endpoints': checked the same way
OPENAI_FORMATS = ("png", "webp", "jpeg", "gif", "svg")  # output_format's values in the openai client
UNSUPPORTED = "unsupported_value"  # the code of a valid OpenAI value this server does not do
ECHO_CHARS = 60             # error messages quote at most this much of a client's value (a prompt may be 1 MB)
B64_SPACE = b" \t\n\r\v\f"  # base64 tools and MIME wrap lines (at 76 columns); the breaks are not data


def clip(s: str) -> str:
    """`s` cut to ECHO_CHARS characters, "…" marking the cut."""
    return s if len(s) <= ECHO_CHARS else s[:ECHO_CHARS - 1] + "…"


def _short_repr() -> reprlib.Repr:
    r = reprlib.Repr()  # Python 3.12 takes these as keywords; 3.10 and 3.11 as attributes
    r.maxlevel, r.maxlist, r.maxtuple, r.maxdict = 2, 4, 4, 4
    r.maxstring = r.maxother = r.maxlong = ECHO_CHARS
    return r


_SHORT_REPR = _short_repr()


def shown(value) -> str:
    """repr(value) for an error message, at most about ECHO_CHARS characters long, "…" marking a cut (a long string
    is cut before its repr is built; a big list or dict shows its first items only, never a repr of it all)."""
    return repr(clip(value)) if isinstance(value, str) else clip(_SHORT_REPR.repr(value))


class APIError(Exception):
    """An HTTP error in OpenAI's shape; `param` names the request field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def response(self) -> JSONResponse:
        kind = "rate_limit_error" if self.status == 429 else (
            "invalid_request_error" if self.status < 500 else "server_error")
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def size_buckets(native: int) -> dict[str, tuple[int, int]]:
    """OpenAI size strings ("WxH") this model serves -> (height, width): sides of native or 2 x native pixels."""
    sides = (native, 2 * native)
    return {f"{w}x{h}": (h, w) for h in sides for w in sides}


def decode_image(data: bytes, param: str, max_pixels: int) -> Image.Image:
    """PNG / JPEG / WebP bytes -> a loaded PIL image (first frame), or APIError(400) naming `param`.
    The size is checked from the header, before any pixel is decoded (a 100-byte PNG may claim 10000 x 10000)."""
    if not data:
        raise APIError(400, f"{param} is empty", param=param, code="invalid_image")
    try:
        im = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        w, h = im.size
    except Image.DecompressionBombError:
        raise APIError(400, f"{param}: the image is far too large", param=param, code="image_too_large") from None
    except Exception as e:  # untrusted bytes: whatever PIL raises, it is the client's file
        raise APIError(400, f"{param} is not a readable PNG, JPEG or WebP image ({type(e).__name__})",
                       param=param, code="invalid_image") from None
    if w * h > max_pixels:
        raise APIError(400, f"{param} is {w}x{h}, more than this server's {max_pixels} pixels", param=param,
                       code="image_too_large")
    if min(w, h) < MIN_SIDE:
        raise APIError(400, f"{param} is {w}x{h}; both sides must be at least {MIN_SIDE} pixels", param=param,
                       code="image_too_small")
    try:
        im.load()
    except Exception as e:  # truncated or corrupt pixel data
        raise APIError(400, f"{param}: the image data is corrupt or truncated ({type(e).__name__})", param=param,
                       code="invalid_image") from None
    return from_file(im)  # upright; 16-bit, CMYK, ...: to what masks.py reads; its RGB profile kept


def repaint_mask(kind: str, value: Image.Image, size: tuple[int, int], param: str) -> np.ndarray:
    """Any mask convention (masks.to_repaint_mask) -> (H, W) float32 in [0, 1], 1 = repaint, so every request of a
    batch uses the Pipeline's `mask=` form with the very values the Python API would use (an 8-bit image of it was
    read again, and a mask peaking at 1/255 taken for a 0/1 label map: repainted whole). An empty mask is all 0:
    the Pipeline returns the input unchanged (/v1/inpaint); edits refuse it (require_edit_area)."""
    try:
        m = M.to_repaint_mask(**{kind: value}, size=size, label=param)  # (1, 1, H, W)
    except M.EmptyMask:
        return np.zeros(size, np.float32)
    except ValueError as e:
        raise APIError(400, str(e), param=param, code="invalid_mask") from None
    return m[0, 0].numpy().astype(np.float32)


def require_transparency(image: Image.Image) -> None:
    """/v1/inpaint without a mask repaints the image's transparent pixels: an image without one (no alpha channel,
    or an exporter's RGBA that is opaque everywhere) marks nothing."""
    if not M.has_transparency(image):
        raise APIError(400, "image has no transparent pixel, so nothing marks what to repaint: send an RGBA image "
                       "whose transparent pixels are to be repainted, or a mask or product_mask", param="image",
                       code="invalid_image")


def require_edit_area(repaint: np.ndarray, param: str) -> None:
    """OpenAI edits repaint the fully transparent pixels (alpha 0) of the mask, or of the image without one: a
    `param` with none of them marks nothing to edit, and its edit would return the input unchanged."""
    if repaint.max() < 1:  # 1 = alpha 0
        raise APIError(400, f"{param} has no fully transparent pixel (alpha 0), so nothing marks what to edit: make "
                       "the pixels to repaint transparent" + (", or send a mask" if param == "image" else ""),
                       param=param, code="invalid_image" if param == "image" else "invalid_mask")


def one_image(form) -> UploadFile:
    """The edit's image: one file part, named image, or image[] as the openai client names a list."""
    uploads = form.getlist("image") + form.getlist("image[]")
    if any(not isinstance(u, UploadFile) for u in uploads):
        raise APIError(400, "image must be a file part, got a text field", param="image", code="invalid_image")
    if not uploads:
        raise APIError(400, "image is required: a PNG, JPEG or WebP file part", param="image",
                       code="invalid_image")
    if len(uploads) > 1:
        raise APIError(400, f"one image file is accepted per edit, got {len(uploads)} (several input images are "
                       "not supported)", param="image", code="invalid_image")
    return uploads[0]


def edit_inputs(image_bytes: bytes, mask_bytes: bytes | None, max_pixels: int):
    """(RGB image, repaint mask): the alpha-0 pixels of the mask, or of the image without one (OpenAI's rule)."""
    image = decode_image(image_bytes, "image", max_pixels)
    if mask_bytes is None:
        if not M.has_alpha(image):
            raise APIError(400, "image has no transparency, so nothing marks what to edit: send an RGBA image "
                           "whose transparent pixels (alpha 0) are to be repainted, or a mask",
                           param="image", code="invalid_image")
        alpha, param = image, "image"
    else:
        alpha, param = decode_image(mask_bytes, "mask", max_pixels), "mask"
    repaint = repaint_mask("image", alpha, (image.height, image.width), param)
    require_edit_area(repaint, param)
    return image.convert("RGB"), repaint


def number(value, name: str, lo, hi, default, kind=float):
    """A JSON number in [lo, hi] (an integer for kind=int), or `default` if absent. Strings are refused, "2" as
    much as "1_0" (int("1_0") is 10): JSON has numbers for numbers."""
    if value is None:
        return default
    x = _numeric(value, name, kind)
    if not lo <= x <= hi or x in (math.inf, -math.inf):  # NaN fails the first; math.isfinite(10**400) overflows
        raise APIError(400, f"{name} must be in [{lo}, {hi}], got {shown(value)}", param=name, code="invalid_value")
    return x


def custom_schedule_fields(fields: dict, max_steps: int) -> dict:
    """/v1/inpaint's custom schedule: {"timesteps": tuple} or {"sigmas": tuple} (a JSON list, or a name such as
    "ays"), or {}; the list's values are the schedule's to check (build_schedule)."""
    custom = {}
    for name in ("timesteps", "sigmas"):
        value = fields.get(name)
        if value is None:
            continue
        if not isinstance(value, (list, str)) or len(value) > max_steps + (name == "sigmas"):  # N + 1 sigmas
            raise APIError(400, f"{name} must be a list of at most {max_steps} steps (--max-steps) or a schedule "
                                f"name (ays), got {shown(value)}", param=name, code="invalid_value")
        custom[name] = tuple(value) if isinstance(value, list) else value
    return custom


def schedule_steps(config, sampler: str, steps: int, strength: float, **custom) -> int:
    """Refuse what the model's scheduler cannot run (DDIM's leading spacing at 1000 steps would pass timestep 1000;
    int(steps * strength) = 0 leaves no step) before it is queued: in a batch it would fail every request beside it.
    config: the model's ModelConfig; custom: timesteps= or sigmas= (custom_schedule_fields). Returns the number of
    steps."""
    try:
        full = build_schedule(sampler, steps, config.scheduler, **custom)
        schedule = full.img2img(strength)
    except ValueError as e:
        param = next((k for k in (*custom, "strength") if k in str(e)), "steps")
        raise APIError(400, str(e), param=param, code="invalid_value") from None
    try:  # an epsilon model at sigma = inf (zero terminal SNR): it failed in the batch, a 500
        check_start(schedule, config.prediction_type)
    except ValueError as e:
        raise APIError(400, str(e), param="sampler", code="invalid_value") from None
    return full.num_steps


def _numeric(value, name: str, kind):
    if isinstance(value, bool) or not isinstance(value, int if kind is int else (int, float)):
        raise APIError(400, f"{name} must be {'an integer' if kind is int else 'a number'}, got {shown(value)}",
                       param=name, code="invalid_value")
    try:
        return kind(value)
    except OverflowError:  # an integer past float's range
        return math.inf


def form_int(value, name: str) -> int | None:
    """A multipart form field holding an integer (OpenAI clients send n="2"): decimal digits only, no sign, space
    or underscore. None if absent; range checks are number()'s."""
    if value is None:
        return None
    if isinstance(value, str) and value.isascii() and value.isdigit():
        try:
            return int(value)
        except ValueError:  # more digits than int() takes (4300): out of any range anyway
            pass
    raise APIError(400, f"{name} must be an integer (decimal digits), got {shown(value)}", param=name,
                   code="invalid_value")


def seconds(value, name: str) -> float | None:
    """A duration: a JSON number, more than 0 and finite; None if absent."""
    if value is None:
        return None
    x = _numeric(value, name, float)
    if not 0 < x < math.inf:  # NaN fails too
        raise APIError(400, f"{name} must be more than 0 seconds and finite, got {shown(value)}", param=name,
                       code="invalid_value")
    return x


def boolean(value, name: str, default: bool) -> bool:
    """A JSON true or false, or `default` if absent; the strings "true" / "false" are refused like numbers as
    strings (JSON has booleans for booleans)."""
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    raise APIError(400, f"{name} must be true or false, got {shown(value)}", param=name, code="invalid_value")


def form_bool(value, name: str) -> bool | None:
    """A multipart form field holding a boolean: true or false in any case (the openai client sends stream=false).
    None if absent."""
    if value is None:
        return None
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise APIError(400, f"{name} must be true or false, got {shown(value)}", param=name, code="invalid_value")


def text(value, name: str, required: bool = False) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        raise APIError(400, f"{name} must be a non-empty string" if required else f"{name} must be a string",
                       param=name, code="invalid_value")
    if len(value) > MAX_PROMPT_CHARS:
        raise APIError(400, f"{name} is {len(value)} characters; at most {MAX_PROMPT_CHARS}", param=name,
                       code="invalid_value")
    try:
        check_texts(value)  # the tokenizer's own rule, before queueing: JSON may carry lone surrogates ("\ud800")
    except ValueError as e:
        raise APIError(400, f"{name}: {e}", param=name, code="invalid_value") from None
    return value


def choice(value, name: str, choices, default):
    if value is None:
        return default
    if value not in choices:
        raise APIError(400, f"{name} must be one of {', '.join(map(str, choices))}; got {shown(value)}", param=name,
                       code="invalid_value")
    return value


def check_fields(fields: dict, allowed, ignored: dict = IDENTITY_IGNORED, form: bool = False) -> None:
    """Refuse unknown fields, ignored fields with values OpenAI's client would not send, and OpenAI values asking for
    what this server cannot do. `form`: multipart fields (strings by nature)."""
    for name in fields:
        if name not in allowed and name not in ignored and name not in OPENAI_CHECKED:
            raise APIError(400, f"unknown parameter {shown(name)}", param=clip(name), code="unknown_parameter")
    for name, values in ignored.items():
        _ignored_value(fields.get(name), name, values)
    _check_output(fields, form)
    _check_streaming(fields, form)


def _ignored_value(value, name: str, values) -> None:
    if value is None:
        return
    if values is None and not isinstance(value, str):
        raise APIError(400, f"{name} must be a string, got {shown(value)}", param=name, code="invalid_value")
    if values is not None:
        choice(value, name, values, None)


def _check_output(fields: dict, form: bool) -> None:
    """PNG, opaque: background auto / opaque, output_format png, output_compression 100 (PNG is lossless)."""
    fmt = fields.get("output_format")
    if fmt is not None and fmt != "png":
        raise APIError(400, f"output_format {shown(fmt)} is not supported: this server returns PNG (send png or leave "
                       "it out)", param="output_format", code=UNSUPPORTED if fmt in OPENAI_FORMATS else "invalid_value")
    if choice(fields.get("background"), "background", ("auto", "opaque", "transparent"), "auto") == "transparent":
        raise APIError(400, "background: transparent is not supported; images come back as opaque PNGs (send "
                       "auto or opaque, or leave it out)", param="background", code=UNSUPPORTED)
    compression = _integer(fields.get("output_compression"), "output_compression", form)
    if number(compression, "output_compression", 0, 100, 100, int) != 100:
        raise APIError(400, "output_compression applies to jpeg and webp output; this server returns PNG, which is "
                       "lossless (send 100 or leave it out)", param="output_compression", code=UNSUPPORTED)


def _check_streaming(fields: dict, form: bool) -> None:
    stream = fields.get("stream")
    if boolean(form_bool(stream, "stream") if form else stream, "stream", False):
        raise APIError(400, "streaming is not supported: send stream=false or leave it out", param="stream",
                       code=UNSUPPORTED)
    partial = _integer(fields.get("partial_images"), "partial_images", form)
    if number(partial, "partial_images", 0, 3, 0, int):  # OpenAI's range; 0 is one image, as here
        raise APIError(400, "streaming (partial_images) is not supported: send 0 or leave it out",
                       param="partial_images", code=UNSUPPORTED)


def _integer(value, name: str, form: bool):
    """A form field's digits as an int (multipart); JSON values as they are, for number() to check."""
    return form_int(value, name) if form else value


def b64decode(value, name: str) -> bytes:
    """base64 (optionally a data: URL) -> bytes. Line breaks and spaces are skipped; any other character outside
    the base64 alphabet is refused."""
    if not isinstance(value, str):
        raise APIError(400, f"{name} must be a base64 string", param=name, code="invalid_image")
    if value.startswith("data:"):
        value = value.partition(",")[2]
    try:
        return base64.b64decode(value.encode("ascii").translate(None, B64_SPACE), validate=True)
    except (binascii.Error, ValueError):  # UnicodeEncodeError is a ValueError
        raise APIError(400, f"{name} is not valid base64", param=name, code="invalid_image") from None
