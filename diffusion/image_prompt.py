"""A call's `ip_adapter_image` (diffusers' argument) for the IP-Adapter loaded then (nn/ip_adapter.py): one image
prompt for the whole call, or one per request as every other argument (a list of n), so that one batch holds
requests with different reference images (`backdrop serve` batches them so).

Each distinct image is encoded once (the distinct images of one size in one image encoder call); its tokens go to
every output item of its request (n requests x k images each, batching.requests' order). diffusers' nested lists
(several images for one IP-Adapter) are refused. IPAdapterMixin gives Pipeline diffusers' IP-Adapter methods.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from backdrop.diffusion import pixels as P
from backdrop.diffusion.batching import broadcast, items
from backdrop.diffusion.diffusers_api import WEIGHT_CHANGES
from backdrop.diffusion.inpaint_items import distinct

__all__ = ["IPAdapterMixin", "ImagePrompt", "image_prompt"]

_ONE_IP_ADAPTER = "an IP-Adapter is loaded already: unload_ip_adapter() first (one at a time here)"


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


class IPAdapterMixin:
    """diffusers' IP-Adapter methods, mixed into Pipeline (self.backend; self._ip: (IPAdapter, links) or None)."""

    def load_ip_adapter(self, pretrained_model_name_or_path_or_dict, subfolder: str, weight_name: str,
                        image_encoder_folder: str | None = "image_encoder") -> None:
        """diffusers' load_ip_adapter: an image prompt (nn/ip_adapter.py), given per call as ip_adapter_image=.
        The IP-Adapter is `subfolder`/`weight_name` in a folder or a hub repo id in the local cache
        (load_ip_adapter("h94/IP-Adapter", subfolder="models", weight_name="ip-adapter_sd15.safetensors")), its
        image encoder the CLIPVisionModelWithProjection folder `image_encoder_folder` inside `subfolder` (a name
        with a / is from the top). Its scale starts at 1 (set_ip_adapter_scale). Torch backend only; one at a time.
        A call running in another thread meanwhile keeps the IP-Adapter it started with (or none)."""
        from backdrop.nn.checkpoint import torch_model
        from backdrop.nn.ip_adapter import read_image_encoder, read_ip_adapter
        from backdrop.nn.ldm_keys import CheckpointError, MissingFile
        from backdrop.nn.resolve import cached_repo, hub_snapshot, is_repo_id
        from backdrop.nn.weight_files import adapter_file

        model = torch_model(self.backend, "load_ip_adapter", "an export's UNet has no image-prompt attention")
        if self._ip is not None:  # before reading the files; checked again under the lock
            raise ValueError(_ONE_IP_ADAPTER)
        given = (pretrained_model_name_or_path_or_dict, subfolder, weight_name, image_encoder_folder)
        if not all(isinstance(g, (str, os.PathLike)) for g in given[:3]) or not isinstance(given[3], (str, type(None))):
            raise TypeError("load_ip_adapter takes one IP-Adapter: a folder or hub repo id, and the subfolder and "
                            f"file name in it, as strings (diffusers' lists of several are not supported), got "
                            f"{', '.join(type(g).__name__ for g in given)}")
        if image_encoder_folder is None:
            raise ValueError("image_encoder_folder=None: the image encoder is loaded with the IP-Adapter here; name "
                             "its folder (a CLIPVisionModelWithProjection)")
        root = Path(pretrained_model_name_or_path_or_dict)
        if not root.exists():
            if not (snapshot := cached_repo(root)):  # None for a path that is no repo id
                where = ", nor a repo id in the local Hugging Face cache (nothing is downloaded)" * is_repo_id(root)
                raise MissingFile(f"{root}: no such folder{where}")
            root = snapshot
        root = hub_snapshot(root)
        weights = adapter_file(root / subfolder, weight_name, "IP-Adapter", lambda p: CheckpointError(
            f"{p}: a pickle file, which can run code when loaded, and is not read here: use the .safetensors file "
            "published beside it (h94/IP-Adapter has models/ip-adapter_sd15.safetensors)"))
        encoder = root / (image_encoder_folder if "/" in image_encoder_folder else
                          Path(subfolder, image_encoder_folder))
        p = next(model.unet.parameters())
        adapter = read_ip_adapter(weights, model.unet, read_image_encoder(encoder, p.dtype, p.device))
        with WEIGHT_CHANGES:  # as a LoRA's load: not while another thread loads or moves weights
            if self._ip is not None:
                raise ValueError(_ONE_IP_ADAPTER)
            self._ip = (adapter, adapter.links(model.unet, [1.0] * len(adapter.layers)))

    def set_ip_adapter_scale(self, scale) -> None:
        """diffusers' set_ip_adapter_scale: how strongly the image prompt counts (0: not at all, 1: as trained); a
        number, or InstantStyle's per-level dict, e.g. {"up": {"block_1": [0.0, 1.0, 0.0]}}: one attention layer
        of one level (nn/ip_adapter.layer_scales), or a list of one of these (one per IP-Adapter, as diffusers)."""
        from backdrop.diffusion.batching import as_number
        from backdrop.nn.ip_adapter import layer_scales
        if isinstance(scale, (list, tuple)):
            if len(scale) != 1:
                raise ValueError(f"ip_adapter scale: {len(scale)} values for the 1 IP-Adapter loaded")
            scale = scale[0]
        unet = self.backend.model.unet
        scales = layer_scales(unet, scale, lambda v: as_number(v, "ip_adapter scale", "a finite number"))
        with WEIGHT_CHANGES:
            if self._ip is None:
                raise ValueError("no IP-Adapter is loaded: load_ip_adapter(...) first")
            self._ip = (self._ip[0], self._ip[0].links(unet, scales))

    @property
    def ip_adapter_loaded(self) -> bool:
        """Whether an IP-Adapter is loaded: every call then needs ip_adapter_image=."""
        return self._ip is not None

    def unload_ip_adapter(self) -> None:
        """diffusers' unload_ip_adapter: later calls attend to the text alone again."""
        with WEIGHT_CHANGES:
            self._ip = None
