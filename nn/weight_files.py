"""Reading weight files without loading them: safetensors headers checked against the file size, the tensors of one
checkpoint (a file, its shards, an allowed pickle, or a state dict already in memory) fetched by key on demand
(mmap), a diffusers component folder's weight files, an add-on's file (a path, a folder, or a hub repo id in the
local cache), and the refusal of pickle files with the one-line conversion that replaces them."""
from __future__ import annotations

import json
import logging
import math
import shlex
import struct
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .ldm_keys import CheckpointError, MissingFile
from .resolve import _hub_cache, cached_repo, hub_snapshot, is_repo_id

__all__ = ["PICKLE_SUFFIXES", "adapter_file", "stored_dtype"]

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


# The first bytes of torch.save's zip format, of its legacy format (pickle PROTO 2, then its magic number as a LONG1)
# and of a plain pickle (PROTO 4/5, FRAME). Read as a safetensors header length, each is far longer than the file:
# they are looked for only then, to tell such a file from a truncated safetensors one.
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80\x02\x8a\x0a", b"\x80\x04\x95", b"\x80\x05\x95")
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


def _header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict, dict[str, tuple[str, int, int]]]:
    """({key: shape}, metadata, {key: (dtype, first byte, end byte in the file)}) of a safetensors file, checked
    against the file size so that a truncated or corrupt file fails here, naming itself, not deep inside a reader."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file: {size} bytes, too short for the 8-byte "
                                  "header length")
        n = struct.unpack("<Q", head)[0]  # little-endian u64 header length
        if 8 + n > size:
            if head.startswith(_PICKLE_MAGIC):  # a CheckpointError, not a PickleRefused: allow_pickle cannot help
                refusal = PickleRefused([(path, path.with_name(f"{path.stem}-converted.safetensors"))], option=False,
                                        what=f"{path}: a pickle (torch.save) file under a {path.suffix} name")
                raise CheckpointError(str(refusal))
            raise CheckpointError(f"{path}: not a safetensors file, or truncated: {size} bytes cannot hold "
                                  f"the {n}-byte header it announces")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    metadata, data, shapes, where = header.pop("__metadata__", None) or {}, size - 8 - n, {}, {}
    for key, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for {key!r}: {info!r}") from None
        if end > data:
            raise CheckpointError(f"{path}: truncated: tensor {key!r} ends at byte {end} of the data, but the "
                                  f"file holds only {data} bytes of data (an interrupted download or copy?)")
        if dtype in _DTYPE_BYTES and end - begin != math.prod(shape) * _DTYPE_BYTES[dtype]:
            raise CheckpointError(f"{path}: corrupt: tensor {key!r} {dtype} {shape} spans {end - begin} bytes")
        shapes[key], where[key] = shape, (dtype, 8 + n + begin, 8 + n + end)
    return shapes, metadata, where


class PickleRefused(CheckpointError):
    """Pickle weight files not read (allow_pickle off). `files`: (the pickle file, the .safetensors file the
    loader reads in its place) pairs; the message gives one command that converts them all."""

    def __init__(self, files: list[tuple[Path, Path]], option: bool = True, what: str | None = None):
        """what: how the message names the files (default: the path, or how many and which)."""
        self.files, self.option = list(files), option
        pairs = repr([(str(a), str(b)) for a, b in self.files])
        what = what or (str(self.files[0][0]) if len(self.files) == 1 else
                        f"{len(self.files)} pickle weight files ({', '.join(str(a) for a, _ in self.files)})")
        program = ("import torch, safetensors.torch as st; [st.save_file({k: v.contiguous().clone() for k, v in "
                   "(lambda sd: sd.get('state_dict', sd))(torch.load(a, map_location='cpu', weights_only=True))"
                   f".items() if isinstance(v, torch.Tensor)}}, b) for a, b in {pairs}]")
        super().__init__(  # quoted for a POSIX shell: paths with ' or $ in them stay as they are
            f"{what}: pickle checkpoints can run arbitrary code when loaded, so Backdrop reads .safetensors. "
            f"Convert {'it' if len(self.files) == 1 else 'them'} once, where you trust the files:\n"
            f"  python -c {shlex.quote(program)}" +
            ("\nor pass allow_pickle=True (--allow-pickle; it loads the files with torch.load(weights_only=True))."
             if option else ""))


def _pickle_refusal(path: Path, option: bool = True) -> CheckpointError:
    """option: mention load_model's allow_pickle (LoRA files, nn/lora.py, have no such option)."""
    return PickleRefused([(path, path.with_suffix(".safetensors"))], option)


def adapter_file(path: Path, file_name: str, what: str, refusal=_pickle_refusal) -> Path:
    """The .safetensors file of an add-on (a LoRA, an embedding) that `path` names: the file itself, or `file_name`
    inside a folder (diffusers' save folders, Hub downloads): a hub cache entry (models--org--name) or a repo id
    (org/name) means its snapshot, looked up in the local Hugging Face cache only, as nn/resolve.resolve_model
    does for models. A missing one, or a pickle file (`refusal(path)` says how to convert it), is a
    CheckpointError naming the path."""
    # org/name, as diffusers users write it; not a missing dir/file.safetensors
    repo_id = not path.exists() and is_repo_id(path) and path.suffix not in (".safetensors", *PICKLE_SUFFIXES)
    path = (repo_id and cached_repo(path)) or hub_snapshot(path)
    if path.is_dir():
        if not (path / file_name).is_file():
            others = sorted(p.name for p in path.glob("*.safetensors"))
            held = f" (it holds {', '.join(others[:5])}: give one's path)" if others else ""
            raise MissingFile(f"{path}: a folder without {file_name}{held}; give the {what}'s .safetensors file")
        path = path / file_name
    elif not path.is_file():
        cache = f", nor a repo id in the local Hugging Face cache {_hub_cache()} (nothing is downloaded)" \
            if repo_id else ""
        raise MissingFile(f"{path}: no such file{cache}")
    if path.suffix in PICKLE_SUFFIXES:
        raise refusal(path)
    return path


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        try:  # the zip format maps lazily; the legacy format cannot be mapped
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling errors come in many types; all mean "cannot read"
        raise CheckpointError(f"{path}: torch.load(weights_only=True) failed: {e}") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):  # Lightning / LDM training checkpoints
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: holds a {type(sd).__name__}, not a state dict")
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


class _Reader:
    """The tensors of one checkpoint (a safetensors file, its shards, or a pickle), fetched by key on demand: mapped
    from the file (no copy) when they are used as stored, or read into memory of their own when they are cast or
    moved, so that the file's pages never add to the process's memory beside the converted copy."""

    def __init__(self, files: list[Path], allow_pickle: bool = False):
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.where: dict[str, Path] = {}
        self.metadata: dict = {}
        self._spans: dict[str, tuple[str, int, int]] = {}  # key -> safetensors dtype, byte span in its file
        self._handles: dict[Path, object] = {}
        self._pickled: dict[str, torch.Tensor] = {}
        self._staging = torch.empty(0, dtype=torch.uint8)  # get(copy=True)'s memory, grown to the largest tensor
        for f in files:
            if f.suffix in PICKLE_SUFFIXES:
                if not allow_pickle:
                    raise _pickle_refusal(f)
                self._pickled |= _load_pickle(f)
                shapes = {k: tuple(v.shape) for k, v in self._pickled.items()}
            else:
                shapes, meta, spans = _header(f)
                self.metadata |= meta
                self._spans |= spans
            self.shapes |= shapes
            self.where |= dict.fromkeys(shapes, f)
        self.label = "" if not files else str(files[0]) if len(files) == 1 else \
            f"{files[0].parent} ({len(files)} shards)"

    @classmethod
    def of_tensors(cls, tensors: Mapping, label: str) -> _Reader:
        """A reader of a state dict already in memory ({key: tensor}), named `label` in errors."""
        for k, v in tensors.items():
            if not (isinstance(k, str) and isinstance(v, torch.Tensor)):
                raise CheckpointError(f"{label}: its entry {k!r} is a {type(v).__name__}; expected str -> tensor")
        reader = cls([])
        reader._pickled = dict(tensors)  # held as a loaded pickle's tensors are
        reader.shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        reader.label = label
        return reader

    def dtype(self, key: str) -> torch.dtype | None:
        """The stored dtype of `key` (None for one torch cannot hold)."""
        if key in self._pickled:
            return self._pickled[key].dtype
        return _TORCH_DTYPES.get(self._spans[key][0])

    def get(self, key: str, staged: bool = False) -> torch.Tensor:
        """The tensor `key` as stored, mapped from the file. staged: read instead into the reader's staging memory,
        which the next staged get() overwrites: for a caller that converts (casts or moves) each tensor at once, so
        that the file's pages, which a mapping keeps resident, never add to the process's memory."""
        if key in self._pickled:
            return self._pickled[key]
        f = self.where[key]
        if staged and self.dtype(key) is not None:
            _, begin, end = self._spans[key]
            if self._staging.numel() < end - begin:
                self._staging = torch.empty(end - begin, dtype=torch.uint8)
            buffer = self._staging[: end - begin]
            with open(f, "rb") as fh:
                fh.seek(begin)
                got = fh.readinto(buffer.numpy())
            if got != end - begin:
                raise CheckpointError(f"{f}: cannot read tensor {key!r}: {got} of its {end - begin} bytes")
            return buffer.view(self.dtype(key)).view(self.shapes[key])
        try:
            if f not in self._handles:
                self._handles[f] = safe_open(str(f), framework="pt")  # mmap: pages are read on first touch
            return self._handles[f].get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{f}: cannot read tensor {key!r}: {e}") from None


def _shards(index: Path) -> list[Path]:
    """The files a `*.safetensors.index*.json` (transformers/diffusers sharding) names, all present."""
    weight_map = _json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: no weight_map")
    names = set(weight_map.values())
    for name in names:  # shards sit beside their index: no path may lead out of the model's folder
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", "..") or "\\" in name:
            raise CheckpointError(f"{index}: weight_map names {name!r:.100}, not a file name beside the index")
    files = [index.parent / name for name in sorted(names)]
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{index}: names shard {f.name}, which is missing")
    return files


def _weight_files(folder: Path, stem: str, allow_pickle: bool, variant: str | None = None) -> list[Path]:
    """A component folder's weights: `stem`.safetensors, else sharded, else the .fp16 variant (diffusers naming).
    variant ("fp16", ...: diffusers' variant=): `stem`.<variant>.safetensors or its shards first; a folder without
    them is read as without variant=, with a warning."""
    if variant is not None:
        for name in (f"{stem}.{variant}.safetensors", f"{stem}.safetensors.index.{variant}.json"):
            if (folder / name).is_file():
                return _shards(folder / name) if name.endswith(".json") else [folder / name]
        log.warning("%s: no %s variant (%s.%s.safetensors): reading its other weights", folder, variant, stem,
                    variant)
    full_pickle = [folder / n for n in (f"{stem}.bin", f"pytorch_{stem}.bin") if (folder / n).is_file()]
    for name in (f"{stem}.safetensors", f"{stem}.safetensors.index.json", f"{stem}.fp16.safetensors",
                 f"{stem}.safetensors.index.fp16.json"):
        if (folder / name).is_file():
            if "fp16" in name and full_pickle:  # diffusers, not asked for the variant, would read the pickle
                log.warning("%s: reading the fp16 variant %s; the full-precision weights are in %s, a pickle: "
                            "convert it to %s.safetensors to read those", folder, name, full_pickle[0].name, stem)
            return _shards(folder / name) if name.endswith(".json") else [folder / name]
    for name in (f"{stem}.bin", f"pytorch_{stem}.bin", f"{stem}.fp16.bin", f"pytorch_{stem}.fp16.bin"):
        if (folder / name).is_file():  # converted, it is read as the .safetensors name of its variant
            if not allow_pickle:
                raise PickleRefused([(folder / name, folder / f"{stem}{'.fp16' * ('.fp16.' in name)}.safetensors")])
            return [folder / name]
    for name in (f"{stem}.bin.index.json", f"pytorch_{stem}.bin.index.json"):
        if (folder / name).is_file():
            if not allow_pickle:
                raise CheckpointError(f"{folder / name}: sharded pickle weights, which can run arbitrary code when "
                                      "loaded: pass allow_pickle=True (--allow-pickle) where you trust them, or "
                                      "save the model again with diffusers' save_pretrained(safe_serialization=True)")
            return _shards(folder / name)
    if broken := sorted(p.name for p in folder.glob(f"*{stem}*") if p.is_symlink() and not p.exists()):
        raise CheckpointError(f"{folder}: {', '.join(broken)}: a link whose target is gone (a Hugging Face cache "
                              "blob deleted?): download the model again")
    raise MissingFile(f"{folder}: no weights: expected {stem}.safetensors (or sharded "
                          f"{stem}.safetensors.index.json, or the {stem}.fp16.safetensors variant)")


_STORED_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_TORCH_DTYPES = {**_STORED_DTYPES, "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
                 "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def stored_dtype(path, variant: str | None = None) -> torch.dtype | None:
    """The precision a model's UNet weights are stored in (fp32/fp16/bf16), for diffusers' torch_dtype="auto";
    None where it cannot be read without loading (pickle weights, an unreadable file: load_model says why)."""
    path = Path(path)
    try:
        file = _weight_files(path / "unet", "diffusion_pytorch_model", True, variant)[0] if path.is_dir() else path
        with safe_open(str(file), framework="pt") as f:
            key = next(k for k in f.keys() if path.is_dir() or k.startswith("model.diffusion_model."))
            return _STORED_DTYPES.get(f.get_slice(key).get_dtype())
    except (OSError, CheckpointError, SafetensorError, StopIteration):
        return None
