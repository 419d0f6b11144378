"""Files that other people and processes read: written under a private temporary name (tempfile's mkstemp /
mkdtemp make them 0600 / 0700, and safetensors writes its files 0600), then given the modes a plain open / mkdir
would have given (the umask applied) before they are renamed into place, so that a colleague on a shared machine,
or a server running as another user, can read a model, a checkpoint, a cache or an image."""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

__all__ = ["usual_permissions", "append_line"]


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


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append `line` + newline to `path` whole, or leave the file as it was and raise the OSError: a write cut short
    (a full disk, a file-size limit) is truncated away, not left as a torn line that the next append would run into
    (one unreadable JSON line where there were two)."""
    data = memoryview((line + "\n").encode())
    with open(path, "ab", buffering=0) as f:  # unbuffered: every byte written is known, none is left to a close
        end = f.seek(0, os.SEEK_END)
        try:
            while data:
                data = data[f.write(data):]
        except OSError:
            try:
                f.truncate(end)
            except OSError:
                pass  # the torn line stays: nothing more can be done
            raise
