"""Files that other people and processes read: written under a private temporary name (tempfile's mkstemp /
mkdtemp make them 0600 / 0700, and safetensors writes its files 0600), then given the modes a plain open / mkdir
would have given (the umask applied) before they are renamed into place, so that a colleague on a shared machine,
or a server running as another user, can read a model, a checkpoint, a cache or an image."""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

__all__ = ["usual_permissions"]


@lru_cache(maxsize=1)
def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: put it back at once (first call, before any thread)
    os.umask(mask)
    return mask


def usual_permissions(root: str | os.PathLike) -> None:
    """chmod `root` (a file, or a folder and everything in it) to 0666 / 0777 less the umask."""
    root = Path(root)
    for path in [root, *root.rglob("*")] if root.is_dir() else [root]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_umask())
