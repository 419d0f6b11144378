"""The request body limit, as ASGI middleware around the app (serve/server.py): a declared Content-Length over the
limit is answered 413 before the body is read, and a streamed one is cut off as it passes the limit; a body not
complete `timeout` seconds after the app starts reading it (a stalled upload, a slowloris client trickling a byte
at a time) is given up. The request head has its own deadline (serve/running.py's HeadDeadline)."""
from __future__ import annotations

import asyncio
from typing import Callable

from backdrop.serve.inputs import APIError

__all__ = ["BodyLimit", "BodyTooLarge", "BodyTimeout"]


class BodyTooLarge(Exception):
    pass


class BodyTimeout(Exception):
    pass


class BodyLimit:
    """ASGI wrapper: 413 before reading when Content-Length is over the limit; a streamed (chunked) body is
    counted as it arrives and reading stops with BodyTooLarge once it passes the limit. `count(scope, status)`
    is told of each response it gives itself (the app's endpoints never see those requests)."""

    def __init__(self, app, max_bytes: int, count: Callable[[dict, int], None], timeout: float | None = None):
        self.app, self.max_bytes, self.count, self.timeout = app, max_bytes, count, timeout

    async def _refuse(self, error: APIError, scope, receive, send):
        self.count(scope, error.status)
        await error.response()(scope, receive, send)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                declared = -1
            if declared < 0:
                return await self._refuse(APIError(400, "Content-Length is not a number", code="bad_content_length"),
                                          scope, receive, send)
            if declared > self.max_bytes:
                return await self._refuse(APIError(413, f"the body is {declared} bytes; this server takes at most "
                                                   f"{self.max_bytes}", code="request_too_large"), scope, receive, send)
        seen, deadline, complete = 0, None, False
        loop = asyncio.get_running_loop()

        async def limited():
            nonlocal seen, deadline, complete
            if complete or self.timeout is None:  # after the body: the app listening for a disconnect
                message = await receive()
            else:
                deadline = deadline or loop.time() + self.timeout  # a deadline for the whole body, not per chunk
                try:
                    message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0))
                except asyncio.TimeoutError:
                    raise BodyTimeout(f"the body did not arrive within {self.timeout:g} s ({seen} bytes came; the "
                                      "server's --body-timeout)") from None
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise BodyTooLarge(f"the body passed {self.max_bytes} bytes, this server's limit")
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, limited, send)
