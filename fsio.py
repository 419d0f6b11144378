"""Files that other people and processes read: written under a private temporary name (tempfile's mkstemp /
mkdtemp make them 0600 / 0700, and safetensors writes its files 0600), then given the modes a plain open / mkdir
would have given (the umask applied) before they are renamed into place, so that a colleague on a shared machine,
or a server running as another user, can read a model, a checkpoint, a cache or an image."""
from __future__ import annotations

import os
import shutil
import socket
from functools import lru_cache
from pathlib import Path

__all__ = ["usual_permissions", "fsync", "append_line", "FolderLock", "FolderInUse"]


@lru_cache(maxsize=1)
def _umask() -> int:
    try:  # Linux says it: setting it to read it would, for a moment, make other threads' new files 0666
        with open("/proc/self/status") as f:
            return int(next(line.split()[1] for line in f if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0)  # elsewhere reading the umask means setting it: put it back at once
        os.umask(mask)
        return mask


def usual_permissions(root: str | os.PathLike) -> None:
    """chmod `root` (a file, or a folder and everything in it) to 0666 / 0777 less the umask."""
    root = Path(root)
    for path in [root, *root.rglob("*")] if root.is_dir() else [root]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_umask())


def fsync(path: str | os.PathLike) -> None:
    """Flush a file's data, or a folder's entries (which makes the renames inside it durable), to the disk: a power
    cut after a rename then finds the new file whole, not empty."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


class FolderInUse(OSError):
    """Another live process holds the folder's lock; `holder` says which ("pid N on HOST")."""

    def __init__(self, folder: Path, holder: str):
        super().__init__(f"{folder} is in use by {holder}")
        self.holder = holder


def _live(note: str) -> str:
    """The holder a lock file names ("pid N on HOST"), unless that process is gone: a lock file of another user's
    is locked read-only and keeps the note of the run that made it."""
    words = note.split()
    if len(words) == 4 and words[0] == "pid" and words[1].isdigit() and words[3] == socket.gethostname():
        try:
            os.kill(int(words[1]), 0)
        except ProcessLookupError:
            return f"another process (the lock file still names {note}, which has ended)"
        except OSError:  # alive, another user's
            pass
    return note or "another process"


class FolderLock:
    """An exclusive lock on FOLDER/.lock (fcntl.flock, released by the kernel if the process dies) for as long as a
    process writes there: a second one is refused (FolderInUse) instead of interleaving its files with the first's.
    Once held, the `stale` globs (temporary files of killed runs: no live run can own them now) are removed.
    release() removes the file, then unlocks it. A lock file left by a killed run of another user is locked
    read-only (flock needs no write permission); an OSError (a folder we cannot write) names the lock file."""

    def __init__(self, folder: Path, stale: tuple[str, ...] = ()):
        import fcntl

        self.path = Path(folder) / ".lock"
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _live(os.pread(fd, 200, 0).decode(errors="replace").strip())
                os.close(fd)
                raise FolderInUse(Path(folder), holder) from None
            # Held, but perhaps on a file its holder removed (release) between our open and our flock, while a
            # third process made and locked a new one: hold the lock only if our file is still the one at the path.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self._fd: int | None = fd
        try:  # who holds it, for the refusal of the next one (not written into another user's lock file)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        except OSError:
            pass
        for pattern in stale:
            for path in Path(folder).glob(pattern):
                try:
                    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
                except OSError:  # another user's, in a shared sticky folder: not ours to remove, and in no one's way
                    pass

    def _open(self) -> int:
        try:
            try:
                return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except PermissionError:  # another user's file (a killed run's), in a folder we may write
                return os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise OSError(e.errno, f"cannot open the lock file {self.path}: {e.strerror}") from None

    def release(self) -> None:
        if self._fd is not None:
            try:
                self.path.unlink(missing_ok=True)  # before unlocking: whoever opened it meanwhile sees it is gone
            except OSError:
                pass  # another user's file in a sticky folder: it stays, and the next run locks it as it is
            os.close(self._fd)
            self._fd = None
