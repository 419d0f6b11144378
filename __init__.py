"""Backdrop: a lean, fast latent-diffusion engine for product backdrops.

Public API (imported lazily, so `import backdrop` does no work):
    backdrop.load_model(path)          -> Model with .unet, .vae, .text_encoder, .tokenizer, .config
    backdrop.init_model(preset)        -> the same, random weights
    backdrop.Pipeline.from_pretrained  -> generate / img2img / inpaint (interrupt= raises SamplingInterrupted)
    backdrop.load_image(path)          -> a PIL image as Backdrop reads files (upright, 8 bits, RGB profile kept)
"""
__version__ = "0.1.0"

_LAZY = {
    "load_model": "backdrop.nn.checkpoint",
    "init_model": "backdrop.nn.checkpoint",
    "save_model": "backdrop.nn.checkpoint",
    "CheckpointError": "backdrop.nn.checkpoint",
    "Pipeline": "backdrop.diffusion.pipeline",
    "SamplingInterrupted": "backdrop.diffusion.pipeline",
    "Output": "backdrop.diffusion.output",
    "load_image": "backdrop.diffusion.image_io",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'backdrop' has no attribute {name!r}")


def __dir__():
    """The lazy public names too (PEP 562), for dir() and tab completion."""
    return sorted({*globals(), *__all__})
