"""The images of the server's answers: their PNG bytes, and the store behind `response_format: "url"`."""
from __future__ import annotations

import io
import secrets
import threading
import time
from collections import OrderedDict

from PIL import Image

__all__ = ["png_bytes", "FileStore"]


def png_bytes(image: Image.Image) -> bytes:
    """The PNG file of an answer's image."""
    buf = io.BytesIO()
    image.save(buf, "PNG", compress_level=3)  # level 3: ~3x faster than the default 6, ~5% bigger files
    return buf.getvalue()


class FileStore:
    """The PNGs behind "url" responses: in memory, unguessable ids, dropped after `ttl` s, or oldest first when
    `max_files` or `max_bytes` would be passed (a count alone let large images hold unbounded memory)."""

    def __init__(self, ttl: float, max_files: int, max_bytes: int = 256 * 2**20):
        self.ttl, self.max_files, self.max_bytes = ttl, max_files, max_bytes
        self._files: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, data: bytes) -> str:
        name, now = secrets.token_urlsafe(16), time.monotonic()
        with self._lock:
            self._expire(now)
            while self._files and (len(self._files) >= self.max_files or self._bytes + len(data) > self.max_bytes):
                self._bytes -= len(self._files.popitem(last=False)[1][1])
            self._files[name] = (now + self.ttl, data)
            self._bytes += len(data)
        return name

    def get(self, name: str) -> bytes | None:
        with self._lock:
            self._expire(time.monotonic())  # expired files go when anyone asks, not only at the next put
            return self._files.get(name, (0.0, None))[1]

    @property
    def size(self) -> tuple[int, int]:
        """(files, bytes) held."""
        with self._lock:
            return len(self._files), self._bytes

    def _expire(self, now: float) -> None:
        while self._files and next(iter(self._files.values()))[0] < now:  # insertion order = expiry order
            self._bytes -= len(self._files.popitem(last=False)[1][1])
