"""ControlNet in `backdrop serve` (diffusion/control.py): a /v1/inpaint request's control fields, checked before
anything is queued, as every other field (serve/inputs.py).

A server started with --controlnet PATH (repeatable: several ControlNets, their residuals summed) runs them in every
Pipeline call, so every /v1/inpaint request must give

  control_image                   base64 PNG / JPEG / WebP (or a data: URL), decoded and limited as `image` is
                                  (inputs.decode_image: the server's pixel limit, at least MIN_SIDE a side); with
                                  several ControlNets a JSON list, one image per ControlNet in --controlnet order (one
                                  ControlNet takes a string or a list of one). Any size: the Pipeline resizes it to the
                                  image's. Alpha is dropped, as the Pipeline drops it.
  controlnet_conditioning_scale   a number in [-MAX_SCALE, MAX_SCALE], or a list with one per ControlNet (default:
                                  Pipeline.inpaint's, 0.5 as diffusers' ControlNet inpainting pipeline)
  control_guidance_start / _end   fractions of the steps in [0, 1], start below end; a number or one per ControlNet
  guess_mode                      true / false

The numbers are one value per Pipeline call: they join the batch key's options (only requests that agree share a
batch), always as one value per ControlNet so that 0.5 and [0.5] share it. The control images are per item
(engine.Item.control). A server without a ControlNet refuses these fields; OpenAI's endpoints cannot carry a control
image, so a server with one refuses them and points to /v1/inpaint (refuse_openai).
"""
from __future__ import annotations

from PIL import Image

from backdrop.serve.inputs import UNSUPPORTED, APIError, b64decode, boolean, decode_image, number, shown

__all__ = ["CONTROL_FIELDS", "MAX_SCALE", "control_fields", "decode_controls", "refuse_openai"]

CONTROL_FIELDS = ("control_image", "controlnet_conditioning_scale", "control_guidance_start", "control_guidance_end",
                  "guess_mode")
MAX_SCALE = 100.0  # diffusers takes any float; real ones are 0 .. 2, and a bound keeps fp16 residuals finite


def refuse_openai(nets: int, endpoint: str) -> None:
    """OpenAI's images/edits and images/generations have no control image field: on a ControlNet server, a 400."""
    if nets:
        raise APIError(400, f"this server runs {_count(nets)}, which needs a control image, and {endpoint} cannot "
                       "carry one: use POST /v1/inpaint with control_image", param="control_image", code=UNSUPPORTED)


def control_fields(fields: dict, nets: int, defaults: dict) -> tuple[list[bytes] | None, dict]:
    """A /v1/inpaint body's ControlNet fields on a server running `nets` ControlNets: (the control images' bytes, one
    per ControlNet, or None without ControlNets; the Pipeline options they set). `defaults`: Pipeline.inpaint's."""
    if not nets:
        given = next((k for k in CONTROL_FIELDS if fields.get(k) is not None), None)
        if given is not None:
            raise APIError(400, f"{given}: this server runs no ControlNet (start it with --controlnet PATH)",
                           param=given, code="invalid_value")
        return None, {}
    value = fields.get("control_image")
    listed = f"a list of {nets} base64 images, one per ControlNet in --controlnet order"
    if value is None:
        raise APIError(400, f"this server runs {_count(nets)}: give control_image (base64 PNG, JPEG or WebP: the "
                       f"edges, depth, pose, ... to follow{f'; {listed}' if nets > 1 else ''})", param="control_image",
                       code="invalid_image")
    many = isinstance(value, list)
    if (len(value) if many else 1) != nets:
        got = f"a list of {len(value)}" if many else "one image" if isinstance(value, str) else shown(value)
        raise APIError(400, f"control_image: this server runs {_count(nets)}: give "
                       f"{listed if nets > 1 else 'one base64 image'}, got {got}", param="control_image",
                       code="invalid_image")
    data = [_one(b64decode, v, i, nets) for i, v in enumerate(value if many else [value])]
    starts = _per_net(fields, "control_guidance_start", nets, 0.0, 1.0, defaults["control_guidance_start"])
    ends = _per_net(fields, "control_guidance_end", nets, 0.0, 1.0, defaults["control_guidance_end"])
    for s, e in zip(starts, ends):
        if not s < e:
            raise APIError(400, f"control_guidance_start {s:g} must be below control_guidance_end {e:g}",
                           param="control_guidance_start", code="invalid_value")
    return data, dict(
        controlnet_conditioning_scale=_per_net(fields, "controlnet_conditioning_scale", nets, -MAX_SCALE, MAX_SCALE,
                                               defaults["controlnet_conditioning_scale"]),
        control_guidance_start=starts, control_guidance_end=ends,
        guess_mode=boolean(fields.get("guess_mode"), "guess_mode", defaults["guess_mode"]))


def decode_controls(data: list[bytes] | None, max_pixels: int) -> tuple[Image.Image, ...] | None:
    """The control images (RGB), one per ControlNet, from control_fields' bytes; None for None. Runs off the event
    loop (decoding is CPU work)."""
    if data is None:
        return None
    return tuple(_one(lambda v, name: decode_image(v, name, max_pixels).convert("RGB"), v, i, len(data))
                 for i, v in enumerate(data))


def _one(read, value, i: int, nets: int):
    """read(value, name) for control image i: the message names control_image[i] when there are several, the error's
    param is control_image all the same."""
    try:
        return read(value, f"control_image[{i}]" if nets > 1 else "control_image")
    except APIError as e:
        e.param = "control_image"
        raise


def _per_net(fields: dict, name: str, nets: int, lo: float, hi: float, default: float) -> tuple[float, ...]:
    """A number for every ControlNet (one given applies to all), or a list of one each: always a tuple of `nets`."""
    value = fields.get(name)
    if not isinstance(value, list):
        return (float(number(value, name, lo, hi, default)),) * nets
    if len(value) != nets:
        raise APIError(400, f"{name}: {len(value)} values for this server's {_count(nets)}; give one number, or "
                       f"a list of {nets}", param=name, code="invalid_value")
    if any(v is None for v in value):
        raise APIError(400, f"{name} must hold numbers, got null", param=name, code="invalid_value")
    return tuple(float(number(v, name, lo, hi, None)) for v in value)


def _count(nets: int) -> str:
    return "a ControlNet" if nets == 1 else f"{nets} ControlNets"
