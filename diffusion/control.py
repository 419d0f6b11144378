"""ControlNet in the pipelines (nn/controlnet.py): what diffusers' StableDiffusionControlNet{,Img2Img,Inpaint}Pipeline
do around their UNet call, for one ControlNet or several (diffusers' MultiControlNetModel: residuals summed).

  * control_image: one image for every item, or one per request (num_images_per_prompt repeats it); with several
    ControlNets, as diffusers: one image per ControlNet ([canny, pose]), or per request one per ControlNet
    ([[canny_1, pose_1], [canny_2, pose_2]]). generate without height/width makes images of the (first) control
    image's size (diffusers rounds it down to a multiple of 8). Control images are read as image= is (8-bit RGB:
    EXIF orientation applied, 16-bit depth maps scaled to 8 bits where diffusers clips them, float arrays rounded
    to 8 bits), resized with Lanczos to the output size unless they have it (diffusers: PIL images with Lanczos,
    arrays nearest), in [0, 1]; padded and cropped as the image is (sizes that are not multiples of 8, inpaint's
    crop_padding), so they stay aligned with the pixels they control.
  * controlnet_conditioning_scale multiplies the residuals (default as diffusers': 1 for generate, 0.8 for img2img,
    0.5 for inpaint); control_guidance_start / end (fractions of the steps)
    limit the steps the ControlNet acts on: UNet call i of N runs it unless i / N < start or (i + 1) / N > end, as
    diffusers' controlnet_keep, which counts calls (heun's 2 a step but the last, pndm's one extra) as steps.
  * The ControlNet reads the latents (a 9-channel inpainting UNet's first 4 channels, as diffusers'
    StableDiffusionControlNetInpaintPipeline) and the text context (not an IP-Adapter's image tokens), for the
    unconditional and conditional halves of the guided batch alike; guess_mode runs it on the conditional half
    only (the unconditional half gets no residuals) with residuals scaled 0.1 .. 1 from the finest skip to the
    mid block. A ControlNet with global_pool_conditions (the "shuffle" one) always runs in guess mode, as in
    diffusers.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image

from backdrop.diffusion import pixels as P
from backdrop.diffusion.batching import as_number, broadcast, items, repeat
from backdrop.diffusion.schedule import Schedule

__all__ = ["Control", "Controls", "control_request", "controlled_unet", "per_net", "per_net_images"]


@dataclass(frozen=True)
class Control:
    """One call's ControlNets and their per-item control images: uint8 (H, W, 3) arrays (`images`, per net a list
    over the output items; items given one image share its array) until `at` makes them tensors (`tensors`, per
    net (B, 3, H, W) in [0, 1] on the CPU)."""
    nets: tuple
    images: tuple[list, ...]
    scales: tuple[float, ...]
    starts: tuple[float, ...]
    ends: tuple[float, ...]
    guess_mode: bool
    tensors: tuple[torch.Tensor, ...] | None = None

    def pick(self, rows: list[int]) -> "Control":
        """The control of output items `rows` only (inpaint's items that have something to repaint)."""
        return replace(self, images=tuple([imgs[i] for i in rows] for imgs in self.images))

    def at(self, size: tuple[int, int], pad=None, crop=None) -> "Control":
        """Control images for an H x W output: each resized to `size` (Lanczos) unless it has it, then either
        `crop` = (a box per item, (h, w)) cut and resized as inpaint's crop_padding cuts the image, or `pad`
        (the pipeline's padding to the processing size) applied."""
        from backdrop.diffusion import crop_paste as C
        out = []
        for imgs in self.images:
            rows, seen = [], {}  # an image given for many items is resized once
            for a in imgs:
                if id(a) not in seen:
                    seen[id(a)] = a if a.shape[:2] == tuple(size) else np.asarray(
                        Image.fromarray(a).resize((size[1], size[0]), Image.LANCZOS))
                rows.append(seen[id(a)])
            a = np.stack(rows) if crop is None else C.crop_images(np.stack(rows), *crop)  # (B, H, W, 3) uint8
            t = torch.from_numpy(a.astype(np.float32) / 255.0).permute(0, 3, 1, 2).contiguous()  # (B, 3, H, W)
            out.append(t if pad is None else pad(t))
        return replace(self, tensors=tuple(out))

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of the first control image: generate's default output size, as diffusers'."""
        return self.images[0][0].shape[:2]


@dataclass(frozen=True)
class Controls:
    """A call's ControlNets and T2I-Adapters (t2i.py), each a Control or None; made only when one is."""
    nets: Control | None
    adapters: Control | None

    def pick(self, rows: list[int]) -> "Controls":
        return Controls(*(c and c.pick(rows) for c in (self.nets, self.adapters)))

    def at(self, size: tuple[int, int], pad=None, crop=None) -> "Controls":
        return Controls(*(c and c.at(size, pad, crop) for c in (self.nets, self.adapters)))

    @property
    def size(self) -> tuple[int, int]:
        """generate's default size: the first control image's, else the first adapter image's."""
        return (self.nets or self.adapters).size


def _read(images: list, name: str) -> list[np.ndarray]:
    """Control images (one ControlNet's, one per request) as uint8 (H, W, 3) arrays, each distinct one read once."""
    out, seen = [], {}
    for j, x in enumerate(images):
        where = name if len(images) == 1 else f"{name}[{j}]"
        if isinstance(x, (str, bytes)):
            raise TypeError(f"{where}: a path string; give the image (PIL.Image.open(path)), as for image=")
        if id(x) not in seen:
            a = P._image_array(x, where)  # (H, W, 3) uint8, or float in [0, 1]: rounded as the image's pixels are
            seen[id(x)] = a if a.dtype == np.uint8 else (a.astype(np.float32) * 255).round().astype(np.uint8)
        out.append(seen[id(x)])
    return out


def per_net(value, n: int, name: str, check, nets: str = "ControlNets") -> tuple:
    """A number for each of the n `nets` loaded: one given for all, or a list of one each; `check` reads each."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ValueError(f"{name}: {len(values)} values for the {n} {nets} loaded; give one, or one each")
    return tuple(check(v) for v in values)


def per_net_images(image, nets: int, name: str, noun: str, n: int, k: int) -> tuple[list, ...]:
    """`image` (control_image, adapter_image) for `nets` networks (`noun`: what they are) as, per network, a uint8
    (H, W, 3) array for each of the n x k output items: one image, or one per request; with several networks one
    each ([canny, pose]), or per request one each ([[canny_1, pose_1], [canny_2, pose_2]]), as diffusers takes them."""
    given, names, label = [image], [name], name.removesuffix("_image")
    if nets > 1:
        if not isinstance(image, (list, tuple)) or not image:
            raise ValueError(f"{name}: {nets} {noun} take a list: one {label} image each, or per request a list of "
                             f"{nets} (diffusers' [[canny_1, pose_1], [canny_2, pose_2]])")
        nested = [isinstance(c, (list, tuple)) for c in image]
        if any(nested) and not all(nested and len(c) == nets for c, nested in zip(image, nested)):
            raise ValueError(f"{name}: a request's list must hold one image for each of the {nets} {noun}")
        given = [list(c) for c in zip(*image)] if any(nested) else list(image)
        if len(given) != nets:
            raise ValueError(f"{name}: {len(given)} {label} images for the {nets} {noun} loaded")
        names = [f"{name} ({noun[:-1]} {i})" for i in range(nets)]
    return tuple(repeat(broadcast(_read(items(g, nm), nm), n, nm), k) for g, nm in zip(given, names))


def control_request(nets, control_image, scale, start, end, guess_mode, n: int, k: int) -> Control | None:
    """The call's Control (None without a ControlNet), its arguments checked: `nets` the pipeline's ControlNets
    (a list; empty: none loaded), n requests of k images each."""
    if not nets:
        if control_image is not None:
            raise ValueError("control_image= needs a ControlNet: Pipeline.from_pretrained(..., controlnet=path), "
                             "or set pipe.controlnet")
        return None
    if control_image is None:
        raise ValueError(f"{len(nets)} ControlNet{'s' * (len(nets) > 1)} loaded: give control_image= (the edges, "
                         "depth, ... to follow), or set pipe.controlnet = None")
    images = per_net_images(control_image, len(nets), "control_image", "ControlNets", n, k)
    fraction = lambda name: lambda v: as_number(v, name, "a number in [0, 1]", lambda v: 0 <= v <= 1)  # noqa: E731
    scales = per_net(scale, len(nets), "controlnet_conditioning_scale",
                      lambda v: as_number(v, "controlnet_conditioning_scale", "a finite number"))
    starts = per_net(start, len(nets), "control_guidance_start", fraction("control_guidance_start"))
    ends = per_net(end, len(nets), "control_guidance_end", fraction("control_guidance_end"))
    for s, e in zip(starts, ends):
        if s >= e:
            raise ValueError(f"control_guidance_start {s} must be below control_guidance_end {e}")
    if not isinstance(guess_mode, (bool, np.bool_)):
        raise TypeError(f"guess_mode must be True or False, got {guess_mode!r}")
    return Control(tuple(nets), images, scales, starts, ends, bool(guess_mode))


def controlled_unet(unet, control: Control | None, rows: list[int], schedule: Schedule, text_tokens: int, device,
                    dtype, adapters: Control | None = None):
    """A Backend-style unet(x, t, context) running the torch `unet` (an nn.UNet) with the residuals of `control`'s
    ControlNets and the features of `adapters`' T2I-Adapters (t2i.py; either may be None) for output items `rows`:
    x holds those items (len(rows) rows) or, guided, their unconditional then conditional rows (2 * len(rows)); the
    context's first `text_tokens` tokens are the text's."""
    from backdrop.diffusion.t2i import adapter_features
    b, n = len(rows), schedule.num_steps
    n_calls = {"heun": 2 * n - 1, "pndm": n + 1}.get(schedule.sampler, n)  # the UNet calls of the sampler loop
    windows = [] if control is None else list(zip(control.nets, control.scales, control.starts, control.ends))
    images = [] if control is None else [image[rows].to(device, dtype) for image in control.tensors]  # (b, 3, H, W)
    features = adapter_features(adapters, rows, device, dtype) if adapters is not None else None  # once a loop
    adapted = 0 if adapters is None else int(n_calls * adapters.ends[0])  # the first calls get them (all at 1)
    doubled = []  # images and features for the guided batch's [uncond; cond] rows (2b, ...): made at its first call
    done = [0]  # calls made so far: the index of the next one

    @torch.inference_mode()
    def call(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if x.shape[0] not in (b, 2 * b):
            raise ValueError(f"ControlNet / T2I-Adapter: {x.shape[0]} UNet rows for {b} items (want {b}, or {2 * b} "
                             "guided)")
        x, t, context = x.to(device, dtype), t.to(device), context.to(device, dtype)
        guided, i = x.shape[0] == 2 * b, done[0]
        done[0] += 1
        down = mid = None
        if guided and not doubled:
            doubled.extend(torch.cat([c, c]) for c in images + (features or []))
        for j, (net, scale, start, end) in enumerate(windows):
            if i / n_calls < start or (i + 1) / n_calls > end:
                continue  # diffusers runs it at scale 0 here: no residual at all, the same sum
            guess = control.guess_mode or net.cfg.global_pool_conditions
            lat, ctx, ts, cond = x[:, :net.cfg.unet.in_channels], context[:, :text_tokens], t, images[j]
            if guided and guess:  # the conditional rows only
                lat, ctx, ts = lat[b:], ctx[b:], t[b:]
            elif guided:
                cond = doubled[j]
            d, m = net(lat, ts, ctx, cond, scale, guess)
            if guided and guess:
                d, m = [torch.cat([torch.zeros_like(r), r]) for r in d], torch.cat([torch.zeros_like(m), m])
            down = d if down is None else [u + v for u, v in zip(down, d)]
            mid = m if mid is None else mid + m
        intrablock = None
        if features is not None and i < adapted:
            intrablock = doubled[len(images):] if guided else features
        return unet(x, t, context, down, mid, intrablock).float()
    return call
