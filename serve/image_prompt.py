"""IP-Adapter in `backdrop serve` (diffusion/image_prompt.py): a /v1/inpaint request's image prompt, checked before
anything is queued, as every other field (serve/inputs.py).

A server started with --ip-adapter FILE runs it in every Pipeline call (at --ip-adapter-scale), so every /v1/inpaint
request must give

  ip_adapter_image   base64 PNG / JPEG / WebP (or a data: URL): a photo of the scene or style wanted around the
                     product, decoded and limited as `image` is (inputs.decode_image); any size (the image encoder
                     resizes and centre-crops it); transparency is seen on white, as the Pipeline sees it.

The image is per item (engine.Item.ip_image): requests with different reference photos share a batch, each with its
own. A server without an IP-Adapter refuses the field; OpenAI's endpoints cannot carry an image prompt, so a server
with one refuses them and points to /v1/inpaint (refuse_openai).
"""
from __future__ import annotations

from PIL import Image

from backdrop.serve.inputs import UNSUPPORTED, APIError, b64decode, decode_image

__all__ = ["IP_FIELD", "decode_ip_image", "ip_field", "refuse_openai"]

IP_FIELD = "ip_adapter_image"


def refuse_openai(loaded: bool, endpoint: str) -> None:
    """OpenAI's images/edits and images/generations have no image prompt field: on an IP-Adapter server, a 400."""
    if loaded:
        raise APIError(400, f"this server runs an IP-Adapter, which needs an image prompt, and {endpoint} cannot "
                       f"carry one: use POST /v1/inpaint with {IP_FIELD}", param=IP_FIELD, code=UNSUPPORTED)


def ip_field(fields: dict, loaded: bool) -> bytes | None:
    """A /v1/inpaint body's image prompt bytes on a server with (`loaded`) or without an IP-Adapter; None without."""
    value = fields.get(IP_FIELD)
    if not loaded:
        if value is not None:
            raise APIError(400, f"{IP_FIELD}: this server runs no IP-Adapter (start it with --ip-adapter FILE)",
                           param=IP_FIELD, code="invalid_value")
        return None
    if value is None:
        raise APIError(400, f"this server runs an IP-Adapter: give {IP_FIELD} (base64 PNG, JPEG or WebP: a photo of "
                       "the scene or style wanted)", param=IP_FIELD, code="invalid_image")
    return b64decode(value, IP_FIELD)


def decode_ip_image(data: bytes | None, max_pixels: int) -> Image.Image | None:
    """The image prompt from ip_field's bytes (None for None). Runs off the event loop (decoding is CPU work)."""
    return None if data is None else decode_image(data, IP_FIELD, max_pixels)
