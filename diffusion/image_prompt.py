"""A call's `ip_adapter_image` (diffusers' argument) for the IP-Adapter loaded then (nn/ip_adapter.py): one image
prompt for the whole call, or one per request as every other argument (a list of n), so that one batch holds
requests with different reference images (`backdrop serve` batches them so).

Each distinct image is encoded once; its tokens go to every output item of its request (n requests x k images each,
batching.requests' order). diffusers' nested lists (several images for one IP-Adapter) are refused.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from backdrop.diffusion import pixels as P
from backdrop.diffusion.batching import broadcast, items
from backdrop.diffusion.inpaint_items import distinct

__all__ = ["ImagePrompt", "image_prompt"]


@dataclass(frozen=True)
class ImagePrompt:
    """The IP-Adapter a call started with, its links (nn.unet.IP_LINKS) and the call's image prompts (empty: none)."""
    adapter: object | None = None
    links: dict | None = None
    images: tuple = ()

    @property
    def lengths(self) -> dict[str, int]:
        """For batching.requests: the number of image prompts given (1 = one for all)."""
        return {"ip_adapter_image": len(self.images)} if self.images else {}

    def tokens(self, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor, dict] | None:
        """(tokens, unconditional tokens, links) for n requests x k images: tokens (n*k, N, C) float32 each, item
        i*k + j the image prompt of request i; None without an image prompt."""
        if not self.images:
            return None
        pictures = broadcast(list(self.images), n, "ip_adapter_image")
        first = distinct([id(p) for p in pictures])  # an image given for many requests is encoded once
        by_size: dict[tuple, list] = {}  # the distinct images of one size go through the image encoder together
        for i in sorted(set(first)):
            x = P.image_to_tensor([_on_white(pictures[i])])  # (1, 3, H, W)
            by_size.setdefault(tuple(x.shape[-2:]), []).append((i, x))
        done = {}
        for group in by_size.values():
            tokens, uncond = self.adapter.tokens(torch.cat([x for _, x in group]))  # (G, N, C) each
            done |= {i: (tokens[j:j + 1], uncond[j:j + 1]) for j, (i, _) in enumerate(group)}
        rows = [first[i] for i in range(n) for _ in range(k)]
        return (torch.cat([done[i][0] for i in rows]), torch.cat([done[i][1] for i in rows]), self.links)


def image_prompt(ip, image) -> ImagePrompt:
    """ip: the Pipeline's (IPAdapter, links) or None; image: the call's ip_adapter_image (one image or a list of one
    per request). An image without an IP-Adapter, or an IP-Adapter without an image, is a ValueError."""
    if ip is None:
        if image is not None:
            raise ValueError("ip_adapter_image= needs an IP-Adapter: load_ip_adapter(...) first")
        return ImagePrompt()
    if image is None:
        raise ValueError("an IP-Adapter is loaded: give ip_adapter_image= (the image prompt), or unload_ip_adapter()")
    given = items(image, "ip_adapter_image")
    if any(isinstance(g, (list, tuple)) for g in given):
        raise ValueError("ip_adapter_image: a nested list (diffusers' several images for one IP-Adapter) is not "
                         "supported; give one image, or a flat list of one image per request")
    return ImagePrompt(ip[0], ip[1], tuple(given))


def _on_white(picture):
    """Transparency onto white, as transformers' CLIP image processor sees an RGBA image."""
    if isinstance(picture, Image.Image) and picture.mode != "RGB":
        return Image.alpha_composite(Image.new("RGBA", picture.size, "white"), picture.convert("RGBA"))
    return picture
