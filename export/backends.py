"""The Backend contract (../shared/ARCHITECTURE.md) and its torch implementation.

Everything downstream of the models (Pipeline, the server, the benchmarks) sees a model only through these four
calls, so torch, ONNX Runtime and TensorRT are interchangeable:

    encode_text(input_ids (B, 77) int64)          -> context (B, 77, C)
    unet(latents (B, Cin, h, w), t (B,), context) -> eps or v (B, 4, h, w)   (Cin = 9 for inpainting UNets)
    vae_encode(images in [-1, 1] (B, 3, H, W))    -> latents (B, 4, H/8, W/8), the unscaled posterior mean
    vae_decode(latents (B, 4, h, w), image=None, mask=None)
                                                  -> images in [-1, 1] (B, 3, 8h, 8w)

vae_decode's image (B, 3, 8h, 8w) in [-1, 1] and repaint mask (B, 1, 8h, 8w) (1 = repaint) are the inpainting
condition of a mask-conditioned VAE (config.vae.mask_conditioned, diffusers' AsymmetricAutoencoderKL); the
Pipeline passes them only to such a model, and without them it decodes as a plain VAE.

Inputs may come in any float dtype; a backend computes in its own dtype and returns float32, so the sampler's
arithmetic is always float32 whatever the weights are.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from backdrop.nn.config import ModelConfig
from backdrop.nn.tokenizer import Tokenizer

__all__ = ["Backend", "TorchBackend", "make_backend", "BACKENDS"]

BACKENDS = ("torch", "onnxruntime", "tensorrt")


@runtime_checkable
class Backend(Protocol):
    config: ModelConfig
    tokenizer: Tokenizer         # nn/tokenizer.py: tok(texts) -> LongTensor (B, 77); tok.encode(text), uncut ids
    device: torch.device

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor: ...

    def unet(self, latents: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor: ...

    def vae_encode(self, images: torch.Tensor) -> torch.Tensor: ...

    def vae_decode(self, latents: torch.Tensor, image: torch.Tensor | None = None,
                   mask: torch.Tensor | None = None) -> torch.Tensor: ...


class TorchBackend:
    """Eager PyTorch: the four components of a backdrop.nn Model, in one dtype on one device."""

    name = "torch"

    def __init__(self, model, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
        # default: where the weights are (a Model has no .device; its .dtype is read off the UNet the same way)
        self.device = torch.device(device) if device is not None else next(model.unet.parameters()).device
        self.dtype = dtype or model.dtype
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.config: ModelConfig = model.config
        self.tokenizer = model.tokenizer

    def to(self, device=None, dtype: torch.dtype | None = None) -> "TorchBackend":
        """This backend's model moved to `device` and/or cast to `dtype`, in place (the Parameters stay the same
        objects, so merged LoRAs can still be undone); None keeps the current one."""
        return TorchBackend(self.model, device=self.device if device is None else device, dtype=dtype or self.dtype)

    @torch.inference_mode()
    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.text_encoder(input_ids.to(self.device)).float()

    @torch.inference_mode()
    def unet(self, latents: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = latents.to(self.device, self.dtype)
        return self.model.unet(x, t.to(self.device), context.to(self.device, self.dtype)).float()

    @torch.inference_mode()
    def vae_encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.vae.encode(images.to(self.device, self.dtype)).float()

    @torch.inference_mode()
    def vae_decode(self, latents: torch.Tensor, image: torch.Tensor | None = None,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
        cond = [None if t is None else t.to(self.device, self.dtype) for t in (image, mask)]
        return self.model.vae.decode(latents.to(self.device, self.dtype), *cond).float()


def make_backend(kind: str, model_or_path, device=None, dtype=None, **options) -> Backend:
    """Build a backend by name. `model_or_path` is a loaded Model (torch) or an export folder (the others):
    `backdrop export onnx` writes the onnxruntime one, `backdrop export tensorrt` the tensorrt one.
    options: the backend's own keywords (onnxruntime: providers, threads, trt_cache; tensorrt: cuda_graphs)."""
    if kind == "torch":
        if options:
            raise TypeError(f"the torch backend takes no options, got {sorted(options)}")
        return TorchBackend(model_or_path, device=device, dtype=dtype)
    if kind == "onnxruntime":
        from backdrop.export.ort_backend import OnnxRuntimeBackend
        return OnnxRuntimeBackend(model_or_path, device=device, dtype=dtype, **options)
    if kind == "tensorrt":
        from backdrop.export.tensorrt import TensorRTBackend
        return TensorRTBackend(model_or_path, device=device, dtype=dtype, **options)
    raise ValueError(f"unknown backend {kind!r}; choose one of {', '.join(BACKENDS)}")
