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
    """The PNGs behind "url" responses: in memory, unguessable ids, dropped after `ttl` s or when full."""

    def __init__(self, ttl: float, max_files: int):
        self.ttl, self.max_files = ttl, max_files
        self._files: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, data: bytes) -> str:
        name, now = secrets.token_urlsafe(16), time.monotonic()
        with self._lock:
            while self._files and (len(self._files) >= self.max_files or next(iter(self._files.values()))[0] < now):
                self._files.popitem(last=False)
            self._files[name] = (now + self.ttl, data)
        return name

    def get(self, name: str) -> bytes | None:
        with self._lock:
            expires, data = self._files.get(name, (0.0, None))
        return data if expires >= time.monotonic() else None
