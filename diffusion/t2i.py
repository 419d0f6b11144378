"""T2I-Adapter in the pipelines (nn/t2i_adapter.py): what diffusers' StableDiffusionAdapterPipeline does around its
UNet call, for one adapter or several (diffusers' MultiAdapter: features summed, each times its scale), in generate,
img2img and inpaint (diffusers has the text-to-image pipeline only, for SD 1.x/2.x).

  * adapter_image: as control_image (control.py): one image for every item, or one per request; with several
    adapters one each, or per request a list of one each. Read, resized (Lanczos) to the output size, padded and
    cropped with the image as control images are; in [0, 1]; for a 1-channel adapter (canny, sketch) made grey as
    PIL's convert("L") makes it (an "L" image, as diffusers takes one, is read back unchanged). generate without a
    size makes the first adapter image's (a ControlNet's control image's first).
  * adapter_conditioning_scale multiplies the features (default 1; a number, or one per adapter).
  * adapter_conditioning_factor (diffusers' SDXL adapter pipeline's; its SD 1.x/2.x one always uses 1): the
    fraction of the sampler loop's UNet calls, from the first, that get the features: call i of C while
    i < int(C * factor). For one-call-a-step samplers (C = N steps) that is diffusers' rule; for heun (C = 2N - 1)
    and pndm (C = N + 1) diffusers compares the call index with int(N * factor), which at factor 1 would leave the
    last calls without the features that its SD 1.x/2.x pipeline gives every call.
  * The adapters run once a sampler loop, not once a step: a T2I-Adapter sees neither the latents nor the timestep.
    Both halves of the guided batch get the features, as in diffusers. With a ControlNet as well, the UNet takes
    both (nn/unet.py).

A call's adapters travel as a control.Control (its images and scales; ends holds the factor) and run in
control.controlled_unet, beside the ControlNets.
"""
from __future__ import annotations

import torch

from backdrop.diffusion.batching import as_number
from backdrop.diffusion.control import Control, per_net, per_net_images

__all__ = ["adapter_request", "adapter_features"]


def adapter_request(adapters, adapter_image, scale, factor, n: int, k: int) -> Control | None:
    """The call's adapters as a Control (None without a T2I-Adapter), its arguments checked: `adapters` the
    pipeline's (a list; empty: none loaded), n requests of k images each."""
    if not adapters:
        if adapter_image is not None:
            raise ValueError("adapter_image= needs a T2I-Adapter: Pipeline.from_pretrained(..., adapter=path), or set "
                             "pipe.adapter")
        return None
    if adapter_image is None:
        raise ValueError(f"{len(adapters)} T2I-Adapter{'s' * (len(adapters) > 1)} loaded: give adapter_image= (the "
                         "edges, depth, sketch, ... to follow), or set pipe.adapter = None")
    images = per_net_images(adapter_image, len(adapters), "adapter_image", "T2I-Adapters", n, k)
    scales = per_net(scale, len(adapters), "adapter_conditioning_scale",
                     lambda v: as_number(v, "adapter_conditioning_scale", "a finite number"), "T2I-Adapters")
    factor = as_number(factor, "adapter_conditioning_factor", "a number in [0, 1]", lambda v: 0 <= v <= 1)
    return Control(tuple(adapters), images, scales, (0.0,) * len(adapters), (factor,) * len(adapters), False)


def adapter_features(adapters: Control, rows: list[int], device, dtype) -> list[torch.Tensor]:
    """The summed, scaled features of output items `rows`: one (len(rows), C_i, h_i, w_i) a UNet down level."""
    total = None
    for net, image, scale in zip(adapters.nets, adapters.tensors, adapters.scales):
        x = image[rows]  # (b, 3, H, W) in [0, 1]
        if net.cfg.in_channels == 1:
            x = _grey(x)
        with torch.inference_mode():
            features = [scale * f for f in net(x.to(device, dtype))]
        total = features if total is None else [a + f for a, f in zip(total, features)]
    return total


def _grey(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1], 8-bit values -> (B, 1, H, W): PIL's convert("L") (ITU-R 601-2 luma, rounded)."""
    rgb = (x * 255).round().long()
    luma = (rgb[:, 0:1] * 19595 + rgb[:, 1:2] * 38470 + rgb[:, 2:3] * 7471 + 0x8000) >> 16
    return luma.float() / 255
