"""LoRA: merge the low-rank weight deltas of a `.safetensors` file into a Model's UNet and text encoder, and undo it.

A LoRA (Hu et al. 2021, arXiv:2106.09685) holds, for some Linear or Conv2d weights W (out, in[, kh, kw]), a pair
down (rank, in[, kh, kw]) and up (out, rank[, 1, 1]) and optionally an alpha. Merging it at `scale` is

    W += scale * alpha / rank * up @ down        (no alpha: alpha = rank, a factor of 1)

as diffusers' `load_lora_weights(path)` + `fuse_lora(lora_scale=scale)` compute it (PEFT's LoraLayer: scaling =
lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora). A 3x3 conv's LoRA (LoCon) has a 3x3 down and a 1x1 up,
so up @ down is one matmul over the flattened kernel. The file formats people have:

  diffusers / PEFT   unet.<module>.lora_A.weight (down) and .lora_B.weight (up), text_encoder.<module>.lora_A/_B;
                     alphas as `<component>.<module>.alpha` tensors (diffusers' network_alphas), or PEFT's LoraConfig
                     (lora_alpha, alpha_pattern, use_rslora) in the `lora_adapter_metadata` header that diffusers'
                     save_lora_weights writes
  diffusers < 0.27   <module>.lora_linear_layer.{down,up}.weight and <module>.lora.{down,up}.weight (what
                     convert_state_dict_to_diffusers still writes for text encoders), and the attention processors'
                     <attention>[.processor].to_{q,k,v,out}_lora.{down,up}.weight (LoRAAttnProcessor; the oldest
                     files name the UNet's without the `unet.` prefix)
  kohya-ss           lora_unet_<module, "_" for ".">.lora_down.weight / .lora_up.weight / .alpha and lora_te_<module>
                     (sd-scripts' networks/lora.py; what A1111 and ComfyUI read)

Module names are diffusers' UNet2DConditionModel's and transformers' CLIPTextModel's, which are ours, resolved with
nn/ldm_keys.folder_key exactly as a diffusers folder's keys are (transformers >= 5 drops `text_model.`). A file with
no component prefix at all holds UNet keys (what UNet2DConditionModel.save_attn_procs / save_lora_adapter write, read
as diffusers' unet.load_attn_procs / load_lora_adapter read them); kohya names may also use the original LDM UNet
blocks (lora_unet_input_blocks_1_1_..., as A1111 and ComfyUI read them), mapped through nn/ldm_keys' table. The
source is a file, diffusers' LoRA folder, a hub repo id or cache entry in the local Hugging Face cache, or a state
dict of tensors. Loading is as strict as nn/checkpoint.py's: every tensor of the file must belong to a complete
down/up pair (rank >= 1) for a Linear or Conv2d weight of the model, with shapes that fit, and every alpha must be one
finite number, or one CheckpointError names the file and the keys and nothing is merged; the whole file is checked
(from its header, plus the alpha scalars) before any weight changes. SDXL LoRAs and LyCORIS variants (LoHa, LoKr,
norm and full-diff weights) and DoRA are refused by name. An alpha of 0 merges nothing (diffusers' arithmetic; kohya
reads it as alpha = rank), with a warning.

The merge runs in float32, cast back to the weight's dtype, in place (CUDA graphs captured over the weights stay
valid); a merged weight that is not finite in that dtype (inf/NaN in the file, or fp16 overflow at a large scale)
is refused with the model left as it was. The weights it touches are copied to the CPU first (no accelerator memory
spent), so `unfuse_lora` restores them bit-exactly. That copy costs host memory, the touched weights' size: for a
kohya LoRA on SD1.5's transformer blocks and text encoder 0.66 GiB in fp16, for a LoCon 1.76 GiB. A stack fused
with `after=` (as a Pipeline merges its active adapters, diffusion/adapters.py) keeps one copy of each weight, the
oldest, however many of its LoRAs touch it, and is undone as a whole.
"""
from __future__ import annotations

import json
import logging
import math
import numbers
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoint import CheckpointError, Model, _Problems
from .weight_files import _pickle_refusal, _Reader, adapter_file
from .ldm_keys import UNET, folder_key, ldm_names
from ..messages import some

__all__ = ["FusedLora", "fuse_lora", "unfuse_lora", "LORA_INSTEAD", "COMPONENTS"]

log = logging.getLogger(__name__)

COMPONENTS = ("unet", "text_encoder")  # what SD 1.x / 2.x LoRAs patch; never the VAE
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"  # the file diffusers' save_lora_weights(folder) writes
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY: {"unet.lora_alpha": 8, ...}

# (suffix, role) of the tensors of each format; "down" is PEFT's A (rank, in), "up" its B (out, rank)
_DIFFUSERS_ROLES = ((".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
                    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
                    (".lora_A.weight", "down"), (".lora_B.weight", "up"), (".alpha", "alpha"))
_KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder"}
_KOHYA_ROLES = ((".lora_down.weight", "down"), (".lora_up.weight", "up"), (".alpha", "alpha"))
# diffusers' LoRAAttnProcessor named an attention's four projections its own way (diffusers' DIFFUSERS_OLD_TO_PEFT)
_PROCESSOR = re.compile(r"(?P<attn>.+?)(?:\.processor)?\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<role>down|up)"
                        r"\.weight")
_PROJ = {"unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
         "text_encoder": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}}
# Adapters that are not a plain low-rank pair, by the key that gives them away (LyCORIS: KohakuBlueleaf/LyCORIS)
_UNSUPPORTED = {"a LyCORIS LoHa": re.compile(r".*hada_.*"), "a LyCORIS LoKr": re.compile(r".*lokr_.*"),
                "a LyCORIS Tucker LoRA (lora_mid)": re.compile(r".*lora_mid.*"),
                "a LyCORIS norm weight": re.compile(r".*\.[wb]_norm"),
                "a LyCORIS full diff": re.compile(r".*\.diff(_b)?"),
                "DoRA": re.compile(r".*(dora_scale|lora_magnitude_vector).*"),
                "an embedding or bias LoRA": re.compile(r".*(lora_embedding_|lora_B\.bias).*")}
# Keys only SDXL LoRAs have: its second text encoder, as kohya (te1/te2) and diffusers name it
_SDXL = ("lora_te1_", "lora_te2_", "text_encoder_2.")
_PREFIXED = ("unet.", "text_encoder.", *_KOHYA_PREFIXES)  # a key naming its component


@dataclass(frozen=True)
class _Key:
    """What one tensor of a LoRA file is: the down/up/alpha of a module of a component."""
    component: str  # "unet" or "text_encoder"
    module: str     # as the file names it: dotted, or kohya's flat name with "_" for "."
    role: str       # "down", "up" or "alpha"
    kohya: bool = False


def _with_role(component: str, rest: str, roles, kohya: bool) -> _Key | None:
    for suffix, role in roles:
        if rest.endswith(suffix) and len(rest) > len(suffix):
            return _Key(component, rest[:-len(suffix)], role, kohya)
    return None


def _parse(key: str, bare_unet: bool = False) -> _Key | None:
    """The module and role a file key names, or None when it is not a LoRA key of a format we read. bare_unet: the
    file names no component, so its keys are the UNet's (save_attn_procs / save_lora_adapter files)."""
    for prefix, component in _KOHYA_PREFIXES.items():
        if key.startswith(prefix):
            return _with_role(component, key[len(prefix):], _KOHYA_ROLES, kohya=True)
    component, _, rest = key.partition(".")
    bare = component not in COMPONENTS
    if bare:  # the oldest diffusers files: the UNet's attention processors without a prefix
        component, rest = "unet", key
    if m := _PROCESSOR.fullmatch(rest):
        return _Key(component, f"{m['attn']}.{_PROJ[component][m['proj']]}", m["role"])
    return None if bare and not bare_unet else _with_role(component, rest, _DIFFUSERS_ROLES, kohya=False)


def _unsupported(key: str) -> str | None:
    """What kind of adapter `key` belongs to when it is one we name but do not merge."""
    return next((kind for kind, pattern in _UNSUPPORTED.items() if pattern.fullmatch(key)), None)


@dataclass(frozen=True)
class _PeftConfig:
    """The fields of a component's PEFT LoraConfig (in diffusers' metadata header) that set a module's alpha."""
    lora_alpha: float | None = None
    alpha_pattern: tuple[tuple[re.Pattern, float], ...] = ()  # PEFT's get_pattern_key: a dotted suffix of the name
    use_rslora: bool = False  # rank-stabilised LoRA (Kalajdzievski 2023): alpha / sqrt(rank)

    def factor(self, module: str, rank: int, alpha: float | None) -> float:
        """alpha / rank for `module` (the file's name); `alpha` from the file's own .alpha tensor wins."""
        if alpha is None:
            alpha = next((a for pattern, a in self.alpha_pattern if pattern.match(module)), self.lora_alpha)
        alpha = rank if alpha is None else alpha
        return alpha / (math.sqrt(rank) if self.use_rslora else rank)


def _peft_config(meta: dict, c: str) -> _PeftConfig:
    alpha, patterns = meta.get(f"{c}.lora_alpha"), meta.get(f"{c}.alpha_pattern") or {}
    return _PeftConfig(None if alpha is None else float(alpha),
                       tuple((re.compile(rf"(.*\.)?({p})$"), float(a)) for p, a in patterns.items()),
                       bool(meta.get(f"{c}.use_rslora")))


def _peft_configs(reader: _Reader) -> dict[str, _PeftConfig]:
    """{component: its LoraConfig's alphas} from the metadata header diffusers' save_lora_weights writes."""
    raw = reader.metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
        configs = {c: _peft_config(meta, c) for c in COMPONENTS}
    except (ValueError, TypeError, AttributeError, re.error) as e:
        raise CheckpointError(f"{reader.label}: unreadable {METADATA_KEY} header ({e})") from None
    if dora := [c for c in COMPONENTS if meta.get(f"{c}.use_dora")]:
        raise CheckpointError(f"{reader.label}: a DoRA adapter ({dora[0]}.use_dora in its {METADATA_KEY}); only "
                              "plain LoRA is supported")
    return configs


# --------------------------------------------------------------------------------------------------- checking

@dataclass(frozen=True)
class _Pair:
    """One weight's LoRA, checked against the model."""
    component: str
    target: str    # our parameter, e.g. "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    down: str      # file keys
    up: str
    factor: float  # alpha / rank


def _kernel(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A conv's (kh, kw), or () for a Linear and a 1x1 conv (the same map on each pixel's channels)."""
    return tuple(shape[2:]) if any(d != 1 for d in shape[2:]) else ()


def _fits(down: tuple[int, ...], up: tuple[int, ...], weight: tuple[int, ...]) -> bool:
    """down (rank, in[, kh, kw]) and up (out, rank[, 1, 1]) merge into weight (out, in[, kh, kw])."""
    return (len(down) in (2, 4) and len(up) in (2, 4) and up[0] == weight[0] and up[1] == down[0]
            and down[1] == weight[1] and _kernel(up) == () and _kernel(down) == _kernel(weight))


class _LoraProblems(_Problems):
    """nn/checkpoint.py's list of faults, plus alphas that are not one finite number. Only down/up widths that differ
    from the weight's suggest a LoRA for another base model; a bad alpha or an empty (rank 0) module is the file's."""

    def __init__(self):
        super().__init__()
        self.alphas, self.widths = [], 0

    def raise_if_any(self, label: str, what: str) -> None:
        if self.widths:  # SD 1.x's text width is 768, 2.x's 1024, SDXL's 768 + 1280 (its UNet's context 2048)
            what += " (a LoRA for another base model? SD 1.x, 2.x and SDXL LoRAs do not fit each other)"
        found = ((self.missing, "missing"), (self.unexpected, "unexpected"), (self.shapes, "with the wrong shape"),
                 (self.alphas, "with a bad alpha"))
        parts = [f"{len(items)} {kind}: {some(items)}" for items, kind in found if items]
        if parts:
            raise CheckpointError(f"{label}: does not match {what}: " + "; ".join(parts))


def _alpha(reader: _Reader, key: str | None, problems: _LoraProblems) -> float | None:
    if key is None:
        return None
    t = reader.get(key)
    if t.numel() != 1 or not math.isfinite(value := t.float().item()):
        problems.alphas.append(f"{key}: an alpha is one finite number, got {tuple(t.shape)} {t.flatten()[:4]}")
        return None
    return value


def _groups(reader: _Reader, problems: _LoraProblems) -> dict[tuple[str, str, bool], dict[str, str]]:
    """{(component, module, kohya): {role: file key}}; keys of no format we read go to `problems`."""
    if sdxl := next((k for k in reader.shapes if k.startswith(_SDXL)), None):
        raise CheckpointError(f"{reader.label}: an SDXL LoRA (its key {sdxl!r} names one of SDXL's two text "
                              "encoders); this model is SD 1.x/2.x: use a LoRA made for it")
    bare_unet = not any(k.startswith(_PREFIXED) for k in reader.shapes)
    parsed = {k: _parse(k, bare_unet) for k in reader.shapes}
    if not any(parsed.values()):
        example = f", e.g. {next(iter(parsed))!r}" if parsed else ""
        embedding = len(parsed) <= 2 and all(len(s) <= 2 for s in reader.shapes.values())  # (C,) or (n, C) each
        hint = ("; it looks like a textual-inversion embedding: load it with Pipeline.load_textual_inversion "
                "(the CLI's --textual-inversion)") if parsed and embedding else ""
        if kind := next((k for k in map(_unsupported, parsed) if k), None):
            hint = f"; it is {kind}, not a plain LoRA: not supported"
        raise CheckpointError(f"{reader.label}: not a LoRA file: none of its {len(parsed)} tensors is named as a "
                              f"LoRA weight (diffusers/PEFT lora_A/lora_B, kohya-ss lora_down/lora_up){example}{hint}")
    groups = {}
    for key, p in parsed.items():
        if p is None:
            kind = _unsupported(key)
            why = f"not a plain LoRA: {kind}, not supported" if kind else \
                "not a LoRA key for an SD 1.x/2.x UNet or text encoder"
            problems.unexpected.append(f"{key} ({why})")
            continue
        roles = groups.setdefault((p.component, p.module, p.kohya), {})
        if p.role in roles:
            problems.unexpected.append(f"{key} (a second {p.role} tensor for the module of {roles[p.role]})")
            continue
        roles[p.role] = key
    return groups


def _kohya_names(model: Model, params: dict[str, dict[str, nn.Parameter]]) -> dict[str, dict[str, str]]:
    """{component: {kohya's flat module name: our weight}}: ours with "_" for "."; for the UNet also its original
    LDM name (input_blocks_1_1_transformer_blocks_0_attn1_to_k, in A1111's and ComfyUI's files)."""
    flat = {c: {n.removesuffix(".weight").replace(".", "_"): n for n in params[c] if n.endswith(".weight")}
            for c in COMPONENTS}
    ldm = ldm_names(model.config, {"unet": flat["unet"].values(), "vae": (), "text_encoder": ()})["unet"]
    flat["unet"] |= {src.key.removeprefix(UNET).removesuffix(".weight").replace(".", "_"): n for n, src in ldm.items()}
    return flat


def _plan(model: Model, reader: _Reader, warn: bool = True) -> list[_Pair]:
    """Every down/up pair of the file, matched to the model's weights; one CheckpointError lists all faults."""
    problems = _LoraProblems()
    groups = _groups(reader, problems)
    params = {c: dict(getattr(model, c).named_parameters()) for c in COMPONENTS}
    flat = _kohya_names(model, params)
    configs, pairs, seen = _peft_configs(reader), [], {}
    for (c, module, kohya), roles in groups.items():
        if "down" not in roles or "up" not in roles:
            problems.missing.append(f"the {'up' if 'down' in roles else 'down'} tensor for {min(roles.values())}")
            continue
        target = flat[c].get(module, "") if kohya else folder_key(c, module + ".weight")
        weight = params[c].get(target)
        if weight is None or weight.dim() not in (2, 4):
            problems.unexpected.append(f"{roles['down']} (the {c} has no Linear or Conv2d weight {module})")
            continue
        if (c, target) in seen:
            problems.unexpected.append(f"{roles['down']} (a second LoRA for {c}.{target}, after {seen[c, target]})")
            continue
        seen[c, target] = roles["down"]
        down, up = reader.shapes[roles["down"]], reader.shapes[roles["up"]]
        if not _fits(down, up, tuple(weight.shape)):
            problems.shapes.append(f"{roles['down']} {down} and {roles['up']} {up}: file vs model {c}.{target} "
                                   f"{tuple(weight.shape)}")
            problems.widths += 1
            continue
        if down[0] == 0:  # alpha / rank would divide by zero
            problems.shapes.append(f"{roles['down']} {down} and {roles['up']} {up}: rank 0, an empty module")
            continue
        factor = configs.get(c, _PeftConfig()).factor(module, down[0], _alpha(reader, roles.get("alpha"), problems))
        pairs.append(_Pair(c, target, roles["down"], roles["up"], factor))
    problems.raise_if_any(reader.label, "this model's UNet and text encoder")
    if warn and (zero := [p.down for p in pairs if p.factor == 0]):
        log.warning("%s: alpha 0 for %d of its %d modules (%s): they change nothing, as in diffusers (kohya's "
                    "sd-scripts reads alpha 0 as alpha = rank)", reader.label, len(zero), len(pairs), some(zero, 2))
    return pairs


# ---------------------------------------------------------------------------------------------------- merging

@dataclass(frozen=True)
class FusedLora:
    """A LoRA merged into a model: what unfuse_lora needs to put the weights it changed back, bit-exactly."""
    path: Path | None                                        # None: merged from a state dict
    scale: float | dict[str, float]                         # as given to fuse_lora
    targets: tuple[str, ...]                                 # "unet.<param>" / "text_encoder.<param>", merge order
    saved: tuple[tuple[nn.Parameter, torch.Tensor], ...]     # (the live weight, its values before, on the CPU)
    borrowed: tuple[str, ...] = ()  # targets not in `saved`: an earlier LoRA of its stack (after=) holds them


@torch.no_grad()
def _restore(saved) -> None:
    for weight, before in reversed(saved):
        weight.copy_(before)


def _open(source) -> tuple[Path | None, _Reader]:
    """(the file, its reader) for a path, diffusers' LoRA folder or hub repo id; (None, reader) for a state dict."""
    if isinstance(source, Mapping):  # diffusers' load_lora_weights(state_dict), e.g. keys converted in memory
        return None, _Reader.of_tensors(source, "the LoRA state dict")
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"a LoRA is a .safetensors file, diffusers' LoRA folder, a hub repo id in the local cache "
                        f"or a state dict of tensors, got a {type(source).__name__}")
    file = adapter_file(Path(source), DIFFUSERS_FILE, "LoRA", lambda p: _pickle_refusal(p, option=False))
    return file, _Reader([file])


def lora_components(model: Model, source) -> tuple[Path | None, tuple[str, ...]]:
    """(the file `source` names, None for a state dict; the components the LoRA changes), after every check
    fuse_lora makes before merging; nothing is merged."""
    file, reader = _open(source)
    changed = {p.component for p in _plan(model, reader)}
    return file, tuple(c for c in COMPONENTS if c in changed)


def _not_finite(label: str, p: _Pair, down, up, weight, scale: float) -> CheckpointError:
    """Why merging `p` made a weight inf/NaN, as an error naming the file, the keys and the weight."""
    if not (torch.isfinite(down).all() and torch.isfinite(up).all()):
        cause = "inf/NaN in the file (a training run that overflowed?)"
    elif not torch.isfinite(weight).all():
        cause = "the model's weight is inf/NaN already"
    else:
        cause = f"out of {str(weight.dtype).removeprefix('torch.')} range at scale {scale:g}: use a smaller scale"
    return CheckpointError(f"{label}: {p.down} and {p.up} would make {p.component}.{p.target} inf/NaN ({cause}); "
                           "nothing was merged")


@torch.no_grad()
def fuse_lora(model: Model, path, scale: float | Mapping[str, float] = 1.0,
              after: Sequence[FusedLora] = (), warn: bool = True) -> FusedLora:
    """Merge the LoRA at `path` (a .safetensors file, diffusers' LoRA folder, a hub repo id in the local cache, or a
    state dict of tensors) into model's UNet and text encoder, in place: W += scale * alpha / rank * up @ down, as
    diffusers' load_lora_weights + fuse_lora(lora_scale=scale). Fuse several to stack them; unfuse_lora in the
    reverse order restores the weights bit-exactly.
    after: the LoRAs of this stack still fused into `model`, oldest first. The weights one of them saved are not
    copied again (the oldest copy is the original), so the stack keeps one copy of each weight; such a LoRA is
    undone together with those it borrows from: unfuse_lora([*after, fused]).
    scale: one for the whole LoRA, or {component: scale} ("unet", "text_encoder"): a component left out is not
    merged (what Pipeline.fuse_lora(components=) needs). warn=False: no warning about the file (a LoRA merged
    again, warned about when it was first read)."""
    scales = scale if isinstance(scale, Mapping) else dict.fromkeys(COMPONENTS, scale)
    for s in scales.values():
        if not isinstance(s, numbers.Real) or isinstance(s, bool) or not math.isfinite(s):
            raise ValueError(f"lora_scale must be a finite number, got {s!r}")
    if unknown := set(scales) - set(COMPONENTS):
        raise ValueError(f"lora_scale: no component {some(sorted(unknown), 2)} (they are {', '.join(COMPONENTS)})")
    file, reader = _open(path)
    pairs, before = [p for p in _plan(model, reader, warn) if p.component in scales], []
    kept = {id(weight) for f in after for weight, _ in f.saved}
    try:
        for p in pairs:
            weight = getattr(model, p.component).get_parameter(p.target)
            before.append((weight, weight.detach().to("cpu", copy=True)))  # all of them until the merge is done
            down = reader.get(p.down).to(weight.device, torch.float32).flatten(1)  # (rank, in * kh * kw)
            up = reader.get(p.up).to(weight.device, torch.float32).flatten(1)  # (out, rank)
            delta = (up @ down).view(weight.shape)  # (out, in[, kh, kw])
            merged = (weight.float() + delta * (scales[p.component] * p.factor)).to(weight.dtype)
            if not torch.isfinite(merged).all():  # else every image after this is black (diffusers' safe_fusing)
                raise _not_finite(reader.label, p, down, up, weight, scales[p.component])
            weight.copy_(merged)
    except BaseException:  # an unreadable tensor, a non-finite merge, out of memory, Ctrl-C: leave the model be
        _restore(before)
        raise
    names = tuple(f"{p.component}.{p.target}" for p in pairs)
    return FusedLora(file, dict(scale) if isinstance(scale, Mapping) else float(scale), names,
                     tuple((w, b) for w, b in before if id(w) not in kept),
                     tuple(n for n, (w, _) in zip(names, before) if id(w) in kept))


def unfuse_lora(fused: FusedLora | Sequence[FusedLora]) -> None:
    """Put back the weights as they were before `fused`: one FusedLora, or a stack of them (oldest first, as they
    were fused), undone newest first. A LoRA fused with after= kept no copy of the weights the earlier ones had
    saved: it is undone only in a stack that holds them (a ValueError says so, before any weight changes)."""
    stack, held = [fused] if isinstance(fused, FusedLora) else list(fused), set()
    for f in stack:
        if lacking := [t for t in f.borrowed if t not in held]:
            raise ValueError(f"unfuse_lora: the LoRA {f.path or 'state dict'} was fused after= others and keeps no "
                             f"copy of {some(lacking, 2)}: undo it together with them, unfuse_lora([*after, fused])")
        held |= set(f.targets)
    for f in reversed(stack):
        _restore(f.saved)


LORA_INSTEAD = ("LoRAs are merged into PyTorch weights and an export holds fixed weights. Merge the LoRA first "
                "(backdrop.nn.lora.fuse_lora on backdrop.load_model(...), then save_model) and export that model, "
                "or export with it merged: backdrop export onnx MODEL --lora PATH[:SCALE]")
