"""`backdrop train clip`: contrastive training of the CLIP text and vision towers on (image, caption) pairs.

The loss is CLIP's symmetric InfoNCE (Radford et al. 2021, Figure 3): in a batch of B pairs, each caption must
pick its own image out of the B, and each image its caption; the temperature is learned (capped at 100).
The text tower is the one that conditions the UNet (the model's text_encoder: its weights seed the tower and the
trained ones replace them); the vision tower and the two projections are what a CLIP score needs.

What it writes to OUT/final/: the whole model (the new text encoder in text_encoder/), and
  image_encoder/model.safetensors + config.json   transformers' CLIPVisionModelWithProjection (loads with its
                                                  from_pretrained; load_model and diffusers ignore the folder)
  image_encoder/text_projection.safetensors       text_projection.weight and logit_scale: the text side of the
                                                  joint space, which CLIPVisionModelWithProjection has no room for
`load_clip(folder)` puts the two back together as one nn/clip.py CLIP. A later `--init` of the clip stage
continues from them; the other stages carry image_encoder/ along (stages/common.py write_model).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ...diffusion.latents import host_to_device
from ...fsio import usual_permissions
from ...nn.checkpoint import CheckpointError, Model, load_model
from ...nn.clip import CLIP, clip_preprocess, vision_config_from_transformers
from ...nn.config import VisionConfig
from .common import write_model

__all__ = ["ClipStage", "vision_config", "load_clip", "save_image_encoder", "clip_score"]

IMAGE_ENCODER = "image_encoder"
TRANSFORMERS_VERSION = "4.40.0"  # the oldest transformers whose CLIPVisionModelWithProjection reads this config


def vision_config(image_size: int, projection_dim: int, width: int = 128, layers: int = 4, heads: int = 4,
                  patch_size: int = 8) -> VisionConfig:
    """A ViT for `image_size` images: width x layers, MLP 4x wide (ViT-B/16 is 768 x 12, patch 16, at 224 px)."""
    return VisionConfig(image_size=image_size, patch_size=patch_size, hidden_size=width, intermediate_size=4 * width,
                        num_layers=layers, num_heads=heads, projection_dim=projection_dim)


def _vision_to_transformers(cfg: VisionConfig) -> dict:
    return {"architectures": ["CLIPVisionModelWithProjection"], "model_type": "clip_vision_model",
            "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
            "image_size": cfg.image_size, "patch_size": cfg.patch_size, "num_channels": cfg.num_channels,
            "hidden_act": cfg.hidden_act, "layer_norm_eps": cfg.layer_norm_eps,
            "projection_dim": cfg.projection_dim, "attention_dropout": 0.0, "dropout": 0.0,
            "initializer_factor": 1.0, "initializer_range": 0.02, "dtype": "float32",
            "transformers_version": TRANSFORMERS_VERSION}


def _vision_from_transformers(d: dict, source: str) -> VisionConfig:
    try:
        return vision_config_from_transformers(d, source)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def save_image_encoder(clip: CLIP, model_dir: str | os.PathLike) -> Path:
    """Write `model_dir/image_encoder/` (see the module docstring); replaces an old one atomically."""
    model_dir = Path(model_dir)
    state = {k: v.detach().cpu().contiguous() for k, v in clip.state_dict().items()}
    tmp = Path(tempfile.mkdtemp(prefix=f".{IMAGE_ENCODER}.", dir=model_dir))
    try:
        save_file({k: v for k, v in state.items() if k.startswith(("vision_model.", "visual_projection."))},
                  str(tmp / "model.safetensors"), metadata={"format": "pt"})
        save_file({"text_projection.weight": state["text_projection.weight"], "logit_scale": state["logit_scale"]},
                  str(tmp / "text_projection.safetensors"), metadata={"format": "pt"})
        cfg = _vision_to_transformers(clip.vision_model.cfg)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        usual_permissions(tmp)
        final = model_dir / IMAGE_ENCODER
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _read_image_encoder(model_dir: Path) -> tuple[VisionConfig, dict[str, torch.Tensor]]:
    folder = model_dir / IMAGE_ENCODER
    try:
        cfg = _vision_from_transformers(json.loads((folder / "config.json").read_text()), str(folder / "config.json"))
        state = load_file(str(folder / "model.safetensors"))
        state |= load_file(str(folder / "text_projection.safetensors"))
    except FileNotFoundError as e:
        raise CheckpointError(f"{folder}: missing {Path(e.filename).name} (written by `backdrop train clip`)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder}: unreadable ({e})") from None
    return cfg, state


def _build_clip(model: Model, vision: VisionConfig, state: dict[str, torch.Tensor] | None, source: str,
                seed: int = 0) -> CLIP:
    """CLIP with the model's text tower and, when given, the saved vision tower and projections; else a random
    vision tower, the same for the same seed (drawn without touching the caller's global RNG)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip = CLIP(model.config.text, vision)
    full = clip.state_dict()  # random vision tower, projections and temperature to start with
    full |= {f"text_model.{k}": v for k, v in model.text_encoder.text_model.state_dict().items()}
    if state is not None:
        want = {k for k in full if not k.startswith("text_model.")}
        if set(state) != want:
            missing, extra = sorted(want - set(state))[:5], sorted(set(state) - want)[:5]
            raise CheckpointError(f"{source}: does not match the CLIP vision tower its config.json describes "
                                  f"(missing {missing}, unexpected {extra})")
        for k, v in state.items():
            if v.shape != full[k].shape:
                raise CheckpointError(f"{source}: {k} is {tuple(v.shape)}, the model expects {tuple(full[k].shape)}")
        full |= state
    clip.load_state_dict(full, strict=True)
    return clip


def load_clip(path: str | os.PathLike, model: Model | None = None) -> CLIP:
    """The CLIP a clip-stage output folder holds: text_encoder/ + image_encoder/ (`model`: the already loaded
    model of that folder, to skip loading it again)."""
    path = Path(path)
    model = model or load_model(path)
    vision, state = _read_image_encoder(path)
    return _build_clip(model, vision, state, str(path / IMAGE_ENCODER)).eval()


@torch.no_grad()
def clip_score(clip: CLIP, tokenizer, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """CLIPScore without its rescaling (Hessel et al. 2021; torchmetrics' CLIPScore): 100 * max(cos(image, text),
    0) per pair. images (B, 3, H, W) in [-1, 1] -> (B,)."""
    device = next(clip.parameters()).device
    pixels = clip_preprocess(images.to(device), clip.vision_model.cfg.image_size)
    cos = (clip.encode_image(pixels) * clip.encode_text(tokenizer(captions).to(device))).sum(-1)
    return 100 * cos.clamp(min=0)


class ClipStage:
    """Trains a CLIP whose text tower is `model.text_encoder`'s; the vision tower is new (built from `vision`)
    unless `init` is a folder holding an image_encoder/ from an earlier clip run, which continues it."""

    def __init__(self, model: Model, vision: VisionConfig | None = None, device="cpu", init=None, seed: int = 0):
        self.model, self.device, self.init = model, torch.device(device), init
        saved = init is not None and (Path(init) / IMAGE_ENCODER).is_dir()
        if saved:
            vision_saved, state = _read_image_encoder(Path(init))
            if vision is not None and vision != vision_saved:
                raise ValueError(f"{Path(init) / IMAGE_ENCODER}: the saved vision tower is {vision_saved}, not the "
                                 f"{vision} asked for; drop the --vision-* options to continue it")
            vision = vision_saved
        elif vision is None:
            raise ValueError("ClipStage: give a VisionConfig (no image_encoder/ to continue from in --init)")
        self.clip = _build_clip(model, vision, state if saved else None, str(Path(init or "") / IMAGE_ENCODER), seed)

    def trainable(self) -> nn.Module:
        return self.clip

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        if "image" not in batch:
            raise ValueError("the clip stage trains the text encoder, so it needs images and captions, not a latent "
                             "cache (pass --data synthetic:N or an image folder)")
        images = batch["image"]  # (B, 3, H, W) in [-1, 1]
        ids = host_to_device(self.model.tokenizer(batch["caption"]), images.device)  # (B, 77)
        pixels = clip_preprocess(images, self.clip.vision_model.cfg.image_size)  # (B, 3, S, S)
        text, image, scale = model(ids, pixels, embeddings=True)  # (B, P) each; through the DDP wrapper
        all_text, all_image, first = _gathered(text), _gathered(image), _rank() * ids.shape[0]
        logits_per_text = scale * text @ all_image.t()  # (B, B * world): this rank's captions vs every image
        logits_per_image = scale * image @ all_text.t()
        labels = first + torch.arange(ids.shape[0], device=images.device)
        # symmetric InfoNCE, as CLIP.contrastive_loss, against the whole global batch as open_clip does under DDP:
        # each rank's rows, every rank's columns (gathered with their gradients), so 2 ranks x 4 pairs train as 8
        loss = (F.cross_entropy(logits_per_text.float(), labels)
                + F.cross_entropy(logits_per_image.float(), labels)) / 2
        accuracy = (logits_per_text.argmax(dim=1) == labels).float().mean()  # caption -> its image, in-batch
        return loss, {"accuracy": accuracy.detach(), "logit_scale": _unwrap(model).logit_scale.detach().exp()}

    def save_final(self, module: nn.Module, out_dir: Path) -> None:
        text = {k[len("text_model."):]: v for k, v in module.state_dict().items() if k.startswith("text_model.")}
        self.model.text_encoder.text_model.load_state_dict(text, strict=True)
        write_model(self.model, out_dir)  # no carry-over from --init: image_encoder/ is rewritten next
        save_image_encoder(module, out_dir)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _gathered(x: torch.Tensor) -> torch.Tensor:
    """Every rank's x, concatenated in rank order, differentiable (torch.distributed.nn's all_gather sends each rank
    the gradient of its own rows back); x itself alone."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x))


def _unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module
