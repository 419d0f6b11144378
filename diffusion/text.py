"""Prompts to the UNet's context (B, 77, C): the distinct texts of one call tokenized and encoded together, once
each, at the text encoder layer `clip_skip` asks for (pipeline.py's module docstring says what the user sees).

clip_skip is diffusers' StableDiffusionPipeline argument: the context is the final LayerNorm of the output
clip_skip layers before the last (nn/clip.py, TextTransformer.forward); A1111's "CLIP skip" setting is clip_skip + 1.
diffusers 0.42 applies it to the prompt only and encodes the negative prompt at the last layer; we apply it to
both, as A1111 and ComfyUI do: guidance extrapolates from one context to the other, so both should come from the
same layer (diffusers PRs #13796 and #13973 raise the same asymmetry for SDXL). Only the torch backend can do it:
an exported (ONNX / TensorRT) text encoder ends at its last layer.
"""
from __future__ import annotations

import functools
import logging
import re

import torch

from backdrop.diffusion.batching import as_number
from backdrop.nn.tokenizer import CONTEXT_LENGTH

__all__ = ["check_clip_skip", "clip_cut", "embed", "contexts"]

log = logging.getLogger(__name__)

# A1111's and ComfyUI's prompt syntax for loading a LoRA (LyCORIS: <lyco:...>); here it is only text
_A1111_LORA = re.compile(r"<(lora|lyco):[^>]+>", re.IGNORECASE)
_SKIP_INSTEAD = ("encode the prompts with a torch pipeline, encode_prompt(text, clip_skip=...), and pass "
                 "prompt_embeds= and negative_prompt_embeds=")


def check_clip_skip(clip_skip, backend, instead: str = _SKIP_INSTEAD) -> int:
    """clip_skip as an int: None is 0 (the last layer); else an int in [0, num_layers] that `backend` can run.
    `instead`: what to do when it cannot, in the caller's terms (Python, the CLI, HTTP); the reason is given here."""
    if clip_skip is None:
        return 0
    n = backend.config.text.num_layers
    skip = as_number(clip_skip, "clip_skip", f"None or an int in [0, {n}] (layers of this {n}-layer text encoder "
                     "to skip)", lambda v: 0 <= v <= n, integer=True)
    if skip:
        from backdrop.nn.checkpoint import torch_model  # here: importing the torch modules costs seconds
        torch_model(backend, f"clip_skip={skip}", f"an exported text encoder gives its last layer's output only; "
                    f"{instead}")
    return skip


def clip_cut(tokenizer, text: str) -> tuple[str, str] | None:
    """(kept, dropped) when `text` is over CLIP's 77 tokens (BOS and EOS included), else None: what the text encoder
    reads and what it never sees, decoded from the tokens (so in the tokenizer's normal form: lower case, single
    spaces)."""
    ids = tokenizer.encode(text)  # BOS ... EOS, uncut
    if len(ids) <= CONTEXT_LENGTH:
        return None
    return tokenizer.decode(ids[1:CONTEXT_LENGTH - 1]), tokenizer.decode(ids[CONTEXT_LENGTH - 1:-1])


@functools.cache  # once a process: a server would log it on every request
def _warn_a1111_lora() -> None:
    log.warning("a prompt holds A1111's <lora:NAME:WEIGHT> syntax, which loads nothing here: the text encoder reads "
                "it as words. Load the LoRA with pipe.load_lora_weights(path, lora_scale=WEIGHT) (the CLI's --lora "
                "PATH:WEIGHT) and leave the tag out of the prompt (warned once)")


def embed(backend, texts: list[str], clip_skip: int = 0) -> torch.Tensor:
    """(U, 77, C) float32 in one text encoder call; a text over CLIP's 77 tokens is cut there, with a warning.
    clip_skip: checked by check_clip_skip."""
    tok = backend.tokenizer
    if any(_A1111_LORA.search(t) for t in texts):
        _warn_a1111_lora()
    for t in texts:
        cut = clip_cut(tok, t)
        if cut:
            dropped = cut[1] if len(cut[1]) <= 80 else f"{cut[1][:80]}... ({len(cut[1])} characters)"
            log.warning("prompt cut to CLIP's %d tokens; dropped: %r", CONTEXT_LENGTH, dropped)  # a line, not a page
    ids = tok(texts)  # (U, 77)
    if not clip_skip:
        return backend.encode_text(ids).float()
    with torch.inference_mode():  # the Backend contract has no clip_skip: run the torch text encoder directly
        return backend.model.text_encoder(ids.to(backend.device), clip_skip=clip_skip).float()


def contexts(backend, prompts: list, negatives: list, guided: bool, clip_skip: int = 0):
    """-> (context, uncond_context or None), (B, L, C): each distinct text encoded once, in one call; embedding
    rows (L, C) taken as they are."""
    items = prompts + (negatives if guided else [])
    texts = list(dict.fromkeys(p for p in items if isinstance(p, str)))
    emb = embed(backend, texts, clip_skip) if texts else None  # (U, 77, C)
    row = {t: i for i, t in enumerate(texts)}
    shapes = sorted({tuple(emb.shape[1:]) if isinstance(p, str) else tuple(p.shape) for p in items})
    if len(shapes) > 1:
        raise ValueError(f"the prompts' and negative prompts' embeddings of one call need one shape (L, C), got "
                         f"{shapes} (a text prompt encodes to ({CONTEXT_LENGTH}, C))")
    dev = backend.device

    def stack(values: list) -> torch.Tensor:
        return torch.stack([emb[row[v]] if isinstance(v, str) else v.to(dev, torch.float32) for v in values])
    return stack(prompts), (stack(negatives) if guided else None)
