"""Training checkpoints: atomic directories of safetensors + JSON, never pickle.

Layout of one checkpoint:  OUT/checkpoints/step-00000100/{state.safetensors, meta.json}
It is written as OUT/checkpoints/.tmp-step-00000100-<pid>/, every file fsynced, then renamed into place with
os.replace and the parent directory fsynced. A run killed at any moment, including mid-save, leaves only complete
`step-*` directories (a rename is atomic on POSIX), so the newest one is always loadable; leftover `.tmp-*`
directories are ignored and cleaned up by the next save.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..fsio import fsync, usual_permissions

PREFIX = "step-"


class SaveError(OSError):
    """A checkpoint could not be written (disk full, no permission): the older complete ones are untouched."""


def _write_synced(path: Path, write) -> None:
    write(path)
    fsync(path)


def save_checkpoint(root: str | os.PathLike, step: int, tensors: dict[str, torch.Tensor], meta: dict,
                    keep_last: int = 2) -> Path:
    """Write one checkpoint atomically under `root`; keep only the newest `keep_last` (0 keeps all)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    # safetensors refuses shared or non-contiguous storage: give it plain contiguous copies where needed
    plain = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    try:
        tmp.mkdir()
        _write_synced(tmp / "state.safetensors", lambda p: save_file(plain, str(p)))
        _write_synced(tmp / "meta.json", lambda p: p.write_text(json.dumps(meta)))
        usual_permissions(tmp)
        fsync(tmp)
    except (OSError, SafetensorError) as e:  # safetensors reports I/O errors (a full disk) as SafetensorError
        shutil.rmtree(tmp, ignore_errors=True)  # give the space back at once
        raise SaveError(f"{final}: cannot write the checkpoint ({' '.join(str(e).split())})") from None
    old = root / f".old-{final.name}-{os.getpid()}"
    if final.exists():  # re-saving the same step (e.g. the final save after a periodic one): swapped, then the old
        os.replace(final, old)  # one removed (removing it first left no checkpoint of the step for as long as that
    try:  # took, or for good if the rename then failed)
        os.replace(tmp, final)
    except BaseException:  # a failed rename, or Ctrl-C / a second SIGTERM (KeyboardInterrupt) between the two
        if old.exists():
            os.replace(old, final)
        raise
    fsync(root)
    shutil.rmtree(old, ignore_errors=True)
    _restore_swapped(root)
    for old in list_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def _restore_swapped(root: Path) -> None:
    """A run killed between a re-save's two renames left its step's old checkpoint as .old-step-N-<pid>: put back
    where no step-N stands, else removed."""
    for old in root.glob(f".old-{PREFIX}*"):
        final = root / old.name[len(".old-"):].rsplit("-", 1)[0]
        if not final.exists() and (old / "meta.json").is_file():
            os.replace(old, final)
        else:
            shutil.rmtree(old, ignore_errors=True)


def set_aside_after(root: str | os.PathLike, step: int) -> list[Path]:
    """Rename the complete checkpoints past `step` under `root` to abandoned-step-N: a run resumed from an earlier
    checkpoint in its own folder goes another way from there, and those of the way given up outranked its own (the
    pruning kept them and deleted the new ones; --resume latest picked them). Returns their new paths."""
    moved = []
    for path in checkpoints_after(root, step):
        dest = path.with_name(f"abandoned-{path.name}")
        dest = dest if not dest.exists() else dest.with_name(f"{dest.name}-{os.getpid()}")
        os.replace(path, dest)
        moved.append(dest)
    return moved


def checkpoints_after(root: str | os.PathLike, step: int) -> list[Path]:
    """The complete checkpoints under `root` past `step`, oldest first."""
    return [p for p in list_checkpoints(root) if int(p.name[len(PREFIX):]) > step]


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint directory, or the newest one under a run directory (OUT/) or its OUT/checkpoints/."""
    path = Path(path)
    if (path / "meta.json").is_file() and (path / "state.safetensors").is_file():
        return path
    for root in (path / "checkpoints", path):
        found = list_checkpoints(root)
        if found:
            return found[-1]
    raise FileNotFoundError(f"{path}: no complete checkpoint here (expected {PREFIX}NNNNNNNN/ with meta.json and "
                            "state.safetensors, or a run directory holding checkpoints/)")


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    ck = resolve(path)
    try:
        meta = json.loads((ck / "meta.json").read_text())
        tensors = load_file(str(ck / "state.safetensors"))
    except Exception as e:  # corrupt or truncated: say which file, and what can be resumed instead
        saved = list_checkpoints(ck.parent)
        older = saved[:saved.index(ck)] if ck in saved else []
        hint = f"; the one before it can be: --resume {older[-1]}" if older else ""
        raise ValueError(f"{ck}: unreadable checkpoint ({type(e).__name__}: {e}){hint}") from e
    return tensors, meta


def flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """torch optimizer state_dict -> (tensors, JSON-able meta) without pickle."""
    tensors, scalars = {}, {}
    for idx, per_param in state["state"].items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{name}"] = value
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}
