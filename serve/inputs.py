"""Request inputs: decoding untrusted images, reading fields, and the OpenAI-shaped error every check raises.

Everything here is pure (no HTTP, no model), so each rule is a plain function the handlers in server.py call
before anything is queued. Every failure is an APIError naming the field (`param`) at fault, which the server
turns into OpenAI's {"error": {"message", "type", "param", "code"}} body. Images are checked from their header
before any pixel is decoded: a 100-byte PNG may claim 10000 x 10000 pixels, and PIL's own decompression-bomb
guard only warns below 2 x 89 M pixels, so our own limit (far lower) is what protects the server. Numbers and
booleans in JSON must be JSON ones; multipart fields, strings by nature, hold decimal digits. Messages quote a
client's value only as its first ECHO_CHARS characters (`shown`).
"""
from __future__ import annotations

import base64
import binascii
import io
import math

import numpy as np
from PIL import Image
from starlette.responses import JSONResponse

from backdrop.diffusion import masks as M
from backdrop.nn.tokenizer import check_texts

__all__ = ["APIError", "size_buckets", "decode_image", "repaint_mask", "number", "form_int", "seconds", "boolean",
           "text", "choice", "check_fields", "b64decode", "shown", "clip", "IMAGE_FORMATS", "MIN_SIDE",
           "MAX_PROMPT_CHARS", "MAX_STEPS", "MAX_SEED"]

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")   # what OpenAI's edits accept; anything else PIL reads is refused
MIN_SIDE = 16               # smaller images cannot be reflect-padded to the VAE's multiple of 8 (masks.py)
MAX_PROMPT_CHARS = 4000     # CLIP reads 77 tokens anyway; this only bounds the tokenizer's work
MAX_STEPS = 1000            # the training schedule's timesteps
MAX_SEED = 2**63 - 1
# accepted for client compatibility and ignored: one model, one quality here
OPENAI_IGNORED = ("model", "user", "quality", "style", "moderation", "safety_identifier", "input_fidelity")
OPENAI_CHECKED = ("background",)  # accepted by every endpoint when it asks for what we do anyway (check_fields)
ECHO_CHARS = 60             # error messages quote at most this much of a client's value (a prompt may be 1 MB)
B64_SPACE = b" \t\n\r\v\f"  # base64 tools and MIME wrap lines (at 76 columns); the breaks are not data


def clip(s: str) -> str:
    """`s` cut to ECHO_CHARS characters, "…" marking the cut."""
    return s if len(s) <= ECHO_CHARS else s[:ECHO_CHARS - 1] + "…"


def shown(value) -> str:
    """repr(value) for an error message, at most about ECHO_CHARS characters long, "…" marking a cut (a long
    string is cut before its repr is built)."""
    return repr(clip(value)) if isinstance(value, str) else clip(repr(value))


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
    return M.from_file(im)  # upright; 16-bit, CMYK, ...: to what masks.py reads


def repaint_mask(kind: str, value: Image.Image, size: tuple[int, int], param: str) -> Image.Image:
    """Any mask convention (masks.to_repaint_mask) -> mode "L", white = repaint, the same pixels exactly
    (the float mask holds uint8 / 255), so every request of a batch uses the Pipeline's `mask=` form."""
    try:
        m = M.to_repaint_mask(**{kind: value}, size=size)  # (1, 1, H, W)
    except ValueError as e:
        if "nothing to repaint" in str(e):  # allowed: the Pipeline returns the input unchanged
            return Image.new("L", (size[1], size[0]), 0)
        raise APIError(400, f"{param}: {e}", param=param, code="invalid_mask") from None
    return Image.fromarray((m[0, 0].numpy() * 255).round().astype(np.uint8), "L")


def number(value, name: str, lo, hi, default, kind=float):
    """A JSON number in [lo, hi] (an integer for kind=int), or `default` if absent. Strings are refused, "2" as
    much as "1_0" (int("1_0") is 10): JSON has numbers for numbers."""
    if value is None:
        return default
    x = _numeric(value, name, kind)
    if not lo <= x <= hi or x in (math.inf, -math.inf):  # NaN fails the first; math.isfinite(10**400) overflows
        raise APIError(400, f"{name} must be in [{lo}, {hi}], got {shown(value)}", param=name, code="invalid_value")
    return x


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


def check_fields(fields: dict, allowed) -> None:
    for name in fields:
        if name not in allowed and name not in OPENAI_IGNORED + OPENAI_CHECKED:
            raise APIError(400, f"unknown parameter {shown(name)}", param=clip(name), code="unknown_parameter")
    choice(fields.get("output_format"), "output_format", ("png",), "png")
    if boolean(fields.get("stream"), "stream", False):
        raise APIError(400, "stream: streaming partial images is not supported", param="stream")
    if choice(fields.get("background"), "background", ("auto", "opaque", "transparent"), "auto") == "transparent":
        raise APIError(400, "background: transparent is not supported; images come back as opaque PNGs (send "
                       "auto or opaque, or leave it out)", param="background", code="invalid_value")


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
