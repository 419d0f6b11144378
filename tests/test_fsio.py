"""fsio.FolderLock, the one-writer lock of the CLI's --out and of a training run's OUT: never two holders, and a
lock file left by a killed run of another user neither blocks the folder nor ends in a traceback."""
import fcntl
import os
import socket
import subprocess

import pytest

from backdrop.fsio import FolderInUse, FolderLock


def test_a_lock_released_between_anothers_open_and_flock_is_not_held_twice(tmp_path, monkeypatch):
    """B opens .lock while A holds it; A releases (removes the file) before B's flock, which then succeeds on the
    removed file; C, arriving next, made a new .lock and held it too: two runs in one folder. B must notice that its
    file is gone and lock the one at the path, so that C is refused."""
    a = FolderLock(tmp_path)
    flock = fcntl.flock

    def a_ends_first(fd, op):
        monkeypatch.setattr(fcntl, "flock", flock)
        a.release()
        return flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", a_ends_first)
    b = FolderLock(tmp_path)
    assert os.path.samestat(os.fstat(b._fd), os.stat(tmp_path / ".lock"))
    with pytest.raises(FolderInUse, match=rf"in use by pid {os.getpid()} on "):
        FolderLock(tmp_path)
    b.release()
    assert not (tmp_path / ".lock").exists()
    FolderLock(tmp_path).release()


def test_another_users_leftover_lock_file_is_locked_read_only(tmp_path, monkeypatch):
    """A run killed by SIGKILL leaves its .lock (0644): another user cannot open it for writing, and the run ended
    in a PermissionError traceback. flock needs no write permission: the file is locked read-only, as it is."""
    dead = subprocess.Popen(["true"])
    dead.wait()  # a process of this host that has ended: the run that left the file
    (tmp_path / ".lock").write_text(f"pid {dead.pid} on {socket.gethostname()}\n")
    real_open = os.open

    def as_another_user(path, flags, *mode):  # root passes permission checks; refuse writing as they would
        if str(path).endswith(".lock") and flags & (os.O_RDWR | os.O_WRONLY):
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *mode)

    monkeypatch.setattr(os, "open", as_another_user)
    held = FolderLock(tmp_path)
    with pytest.raises(FolderInUse, match=rf"in use by another process \(the lock file still names pid {dead.pid} "
                                          r"on .*, which has ended\)"):  # its old text stays: not ours to write
        FolderLock(tmp_path)
    held.release()
    (tmp_path / ".lock").write_text("pid 123 on otherhost\n")  # another host's: not ours to check
    held = FolderLock(tmp_path)
    with pytest.raises(FolderInUse, match="in use by pid 123 on otherhost"):
        FolderLock(tmp_path)
    held.release()
    monkeypatch.setattr(os, "open", lambda *a: (_ for _ in ()).throw(PermissionError(13, "Permission denied")))
    with pytest.raises(OSError, match=r"cannot open the lock file .*\.lock: Permission denied"):
        FolderLock(tmp_path)  # a folder we cannot write at all: an error naming the file, for a one-line message


def test_the_umask_is_read_without_setting_it(monkeypatch):
    """os.umask(0) to read it made, for a moment, every file another thread created world-writable (the server
    writes files from threads); on Linux it is read from /proc."""
    from backdrop import fsio

    mask = os.umask(0o027)
    try:
        fsio._umask.cache_clear()
        monkeypatch.setattr(os, "umask", lambda m: pytest.fail("the umask was set"))
        assert fsio._umask() == 0o027
    finally:
        monkeypatch.undo()
        os.umask(mask)
        fsio._umask.cache_clear()


def test_a_stale_file_that_is_not_ours_to_remove_is_left(tmp_path, monkeypatch):
    """Another user's temporary file left by a killed run in a shared sticky --out: removing it is refused, and
    every run failed with "Operation not permitted"; it is left where it is, and the lock is held."""
    from pathlib import Path

    (tmp_path / ".x.png.abc.tmp").write_bytes(b"half")
    monkeypatch.setattr(Path, "unlink", lambda self, missing_ok=False: (_ for _ in ()).throw(PermissionError(1, "no")))
    held = FolderLock(tmp_path, stale=(".*.png.*.tmp",))
    monkeypatch.undo()
    assert (tmp_path / ".x.png.abc.tmp").exists()
    held.release()
