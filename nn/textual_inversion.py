"""Textual inversion: new words for the CLIP text encoder, each one or more learned token embeddings.

Textual inversion (Gal et al. 2022, "An Image is Worth One Word", arXiv:2208.01618) learns the input embedding of
a new token, e.g. <cat-toy>, with the whole model frozen. Loading one appends the token to the tokenizer and its
vectors to the text encoder's token embedding, as diffusers' TextualInversionLoaderMixin.load_textual_inversion
does (diffusers/loaders/textual_inversion.py). What a source may be:

  diffusers file  learned_embeds.safetensors = {"<token>": (C,) or (n, C)}: the key is the token; a folder holding
                  that file works too
  A1111 file      <name>.safetensors = {"emb_params": (n, C)}: the token is token=, else the file's name, the word
                  A1111 users write (diffusers would call it "emb_params")
  state dict      either of those as a dict of tensors
  tensor          (C,) or (n, C) with token=; or (n, C) with a list of n tokens, a row each (as diffusers)

A file with several tensors needs token= naming the one to load. An embedding of n > 1 vectors becomes the tokens
token, token_1, ..., token_{n-1}, and `token` in a prompt stands for all n (Tokenizer.add_tokens). Pickle files
(.pt/.bin: A1111's and diffusers' older formats) are refused, as nn/checkpoint.py and nn/lora.py refuse them:
unpickling can run code; the error says how to convert one once.

Every source is read and checked (its tokens new to the vocabulary, its width the text encoder's hidden size)
before anything changes; unload_textual_inversion puts the tokenizer and the embedding rows back bit-exactly.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .checkpoint import CheckpointError, Model
from .weight_files import _Reader, adapter_file

__all__ = ["Embedding", "read_embeddings", "load_textual_inversion", "unload_textual_inversion"]

DIFFUSERS_FILE = "learned_embeds.safetensors"  # diffusers' TEXT_INVERSION_NAME_SAFE
A1111_KEY = "emb_params"  # A1111's safetensors embeddings (modules/textual_inversion/textual_inversion.py)


@dataclass(frozen=True)
class Embedding:
    """One embedding to load: the word prompts use, its vectors, and where it came from (for errors)."""
    token: str
    vectors: torch.Tensor  # (n, C)
    source: str

    @property
    def tokens(self) -> list[str]:
        """token, token_1, ..., token_{n-1}: diffusers' names for the vectors of a multi-vector embedding."""
        return [self.token, *(f"{self.token}_{i}" for i in range(1, len(self.vectors)))]


# ------------------------------------------------------------------------------------------------------ reading

def _pickle_refusal(path: Path) -> CheckpointError:
    """checkpoint._pickle_refusal's, with a conversion that also unpacks A1111's nested {"string_to_param":
    {"*": (n, C)}} (that one keeps top-level tensors only) into emb_params, keeping the file's name (the token)."""
    out = path.with_suffix(".safetensors")
    return CheckpointError(
        f"{path}: a pickle file, which Backdrop does not load: unpickling can run arbitrary code. Convert it once, "
        f"where you trust the file:\n  python -c \"import torch, safetensors.torch as st; "
        f"d = torch.load('{path}', map_location='cpu', weights_only=True); "
        f"d = {{'{A1111_KEY}': d['string_to_param']['*']}} if 'string_to_param' in d else d; "
        f"st.save_file({{k: v.contiguous() for k, v in d.items()}}, '{out}')\"")


def _tensors(source) -> tuple[str, str, dict[str, tuple[int, ...]], Callable[[str], torch.Tensor]]:
    """(label for errors, the file's name, {key: shape}, get(key)) of a file, a folder or a state dict; a file's
    tensors are read only when asked for (a model checkpoint given by mistake is refused from its header)."""
    if isinstance(source, dict):
        for k, v in source.items():
            if not (isinstance(k, str) and isinstance(v, torch.Tensor)):
                raise ValueError(f"the state dict's entry {k!r} is a {type(v).__name__}; expected str -> tensor")
        return "the state dict", "", {k: tuple(v.shape) for k, v in source.items()}, source.__getitem__
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"an embedding is a file or folder path, a state dict or a tensor, got "
                        f"{type(source).__name__}")
    file = adapter_file(Path(source), DIFFUSERS_FILE, "embedding", _pickle_refusal)
    reader = _Reader([file])
    return str(file), file.stem, reader.shapes, reader.get


def _pick(label: str, name: str, shapes: dict[str, tuple[int, ...]], token: str | None) -> tuple[str, str]:
    """(key to load, token it gets): the only tensor, or the one `token` names."""
    if not shapes:
        raise CheckpointError(f"{label}: holds no tensors")
    if token in shapes:
        return token, token
    if len(shapes) > 1:
        keys = sorted(shapes)
        listed = ", ".join(map(repr, keys[:6])) + (", ..." if len(keys) > 6 else "")
        sdxl = "; clip_l and clip_g make an SDXL embedding, for SDXL's two text encoders" \
            if {"clip_l", "clip_g"} <= set(keys) else ""
        if any(re.search(r"\.lora(_linear_layer)?[._](down|up|A|B)\b", k) for k in keys):  # kohya, PEFT, old diffusers
            raise CheckpointError(f"{label}: a LoRA file ({listed}), not a textual-inversion embedding; load it "
                                  "with Pipeline.load_lora_weights (the CLI's --lora)")
        which = "give token= naming the one to load" if token is None else f"none is named {token!r}"
        raise CheckpointError(f"{label}: holds {len(keys)} tensors ({listed}), where an embedding file holds one; "
                              f"{which}{sdxl}")
    (key,) = shapes
    return key, token or (name if key == A1111_KEY and name else key)


def _check_shape(where: str, shape: tuple[int, ...], width: int) -> None:
    if len(shape) not in (1, 2) or 0 in shape:
        raise CheckpointError(f"{where} has shape {shape}; an embedding is (C,) or (n, C), n >= 1 vectors of width C")
    if shape[-1] != width:
        raise CheckpointError(f"{where} has shape {shape}: vectors {shape[-1]} wide, but this text encoder's token "
                              f"embeddings are {width} wide (its hidden_size); an embedding trained for another base "
                              "model? (SD1: 768, SD2: 1024)")


def _read(source, token: str | None, width: int) -> Embedding:
    if token is not None and (not isinstance(token, str) or not token.strip()):
        raise ValueError(f"token must be a non-empty string (the word prompts use), got {token!r}")
    if isinstance(source, torch.Tensor):
        if token is None:
            raise ValueError("a tensor embedding needs token=, the word prompts use for it")
        label = where = "the tensor"
        tensor = source
        _check_shape(where, tuple(tensor.shape), width)
    else:
        label, name, shapes, get = _tensors(source)
        key, token = _pick(label, name, shapes, token)
        where = f"{label}: tensor {key!r}"
        _check_shape(where, shapes[key], width)
        tensor = get(key)
    if not tensor.is_floating_point():
        raise CheckpointError(f"{where} is {tensor.dtype}; an embedding is floating point")
    if not bool(torch.isfinite(tensor).all()):  # one NaN row would turn every image with the word black
        raise CheckpointError(f"{where} holds NaN or infinite values")
    vectors = tensor.detach().reshape(-1, width)  # (C,) -> (1, C); (n, C) stays
    return Embedding(token, vectors, label)


def read_embeddings(pretrained_model_name_or_path, token: str | list[str] | None, width: int) -> list[Embedding]:
    """The embeddings of one source or a list of them (see the module docstring), with one token each or None,
    checked to be `width` wide. diffusers' special case too: one (n, C) tensor and a list of n tokens."""
    given = pretrained_model_name_or_path
    sources = list(given) if isinstance(given, (list, tuple)) else [given]
    tokens = list(token) if isinstance(token, (list, tuple)) else [token] * (len(sources) if token is None else 1)
    if len(sources) == 1 and len(tokens) > 1 and isinstance(sources[0], torch.Tensor) and sources[0].ndim == 2:
        sources = list(sources[0])  # (n, C) -> n rows (C,)
    if not sources:
        raise ValueError("no embedding given")
    if len(sources) != len(tokens):
        raise ValueError(f"{len(sources)} embeddings and {len(tokens)} tokens: give one token per embedding, or "
                         "token=None for the files' own")
    return [_read(s, t, width) for s, t in zip(sources, tokens)]


# ------------------------------------------------------------------------------------------------------ loading

def _token_embedding(model: Model) -> nn.Embedding:
    return model.text_encoder.text_model.embeddings.token_embedding  # (V, C)


def _set_token_embedding(model: Model, weight: torch.Tensor) -> None:
    """Put an embedding over `weight` (V', C) in place of the current one, trainable as that one was."""
    old = _token_embedding(model)
    model.text_encoder.text_model.embeddings.token_embedding = nn.Embedding.from_pretrained(
        weight, freeze=not old.weight.requires_grad)


@torch.no_grad()
def load_textual_inversion(model: Model, pretrained_model_name_or_path, token: str | list[str] | None = None
                           ) -> list[str]:
    """Add the embeddings' tokens to model.tokenizer and their vectors as new rows of the text encoder's token
    embedding; returns the words prompts use. All checked first: after an error nothing has changed."""
    tok, emb = model.tokenizer, _token_embedding(model)
    if emb.num_embeddings != tok.vocab_size:
        raise ValueError(f"the text encoder has {emb.num_embeddings} token embeddings but the tokenizer "
                         f"{tok.vocab_size} ids; textual inversion appends to both, so they must be equal")
    embeddings = read_embeddings(pretrained_model_name_or_path, token, emb.embedding_dim)
    seen: dict[str, str] = {}
    for e in embeddings:
        for t in e.tokens:
            if (taken := tok.taken_by(t)) is not None:  # prompts match tokens case-insensitively
                raise ValueError(f"{e.source}: token {t!r} would take the vocabulary's {taken!r} (a word of it, or "
                                 "an embedding loaded before; case does not matter); give another with token=, or "
                                 "unload_textual_inversion()")
            if (key := t.lower()) in seen:
                raise ValueError(f"{e.source}: token {t!r} is given twice (also by {seen[key]}; case does not "
                                 "matter); give another with token=")
            seen[key] = e.source
    rows = torch.cat([e.vectors for e in embeddings]).to(emb.weight)  # (sum of n, C), the embedding's dtype
    weight = torch.cat([emb.weight.detach(), rows])  # (V + sum of n, C): may run out of memory, nothing changed yet
    tok.add_tokens([(e.token, len(e.vectors)) for e in embeddings])  # ids V, V + 1, ...: the new rows
    _set_token_embedding(model, weight)
    return [e.token for e in embeddings]


@torch.no_grad()
def unload_textual_inversion(model: Model) -> None:
    """Remove every loaded embedding: the tokenizer and the token embedding are as before the first load."""
    removed = model.tokenizer.remove_added_tokens()
    if removed:
        emb = _token_embedding(model)
        _set_token_embedding(model, emb.weight.detach()[:emb.num_embeddings - removed].clone())  # (V, C)
