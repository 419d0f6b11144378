"""Around every API request (serve/server.py): its id, its access line, its metrics, and the refusal of browsers.

`endpoint(name, handler, metrics)` wraps a handler: APIError -> its OpenAI-shaped response, anything unexpected ->
500 (logged with the traceback), status and latency into the metrics, and one access line (`backdrop.serve`, INFO)
with the request id and why it failed. Client text reaches the log escaped (`loggable`), and a client's
X-Request-ID only when it is short and plain: a log line is never a terminal escape, a forged line or megabytes.

`BrowserGuard` refuses requests that carry an `Origin` header not on the allowed list. The server has no
authentication: a web page open in a browser that can reach it could otherwise make it work (a cross-origin
multipart POST to /v1/images/edits needs no CORS preflight), and after a DNS rebinding read the answer. API clients
(the openai SDK, curl, services) send no Origin, so they are unaffected.
"""
from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from typing import Callable

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from backdrop.serve.inputs import APIError, clip

__all__ = ["endpoint", "loggable", "request_id", "BrowserGuard", "ClientGone"]

log = logging.getLogger("backdrop.serve")

REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")  # an X-Request-ID taken as sent; any other gets our own


class ClientGone(Exception):
    """The client disconnected while its request waited: answered 499 (logged only)."""


def request_id(given: str) -> str:
    """The client's X-Request-ID if it is at most 128 plain characters (it is logged and echoed), else a new one."""
    return given if REQUEST_ID.fullmatch(given) else secrets.token_hex(8)


def loggable(text: str, limit: int = 200) -> str:
    """A client's text for a log line: control characters (terminal escapes, and the VT/FF/NEL/U+2028 that log
    shippers split lines at) escaped, at most `limit` characters."""
    text = text if len(text) <= limit else text[:limit - 1] + "…"
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def endpoint(name: str, handler: Callable, metrics, echo_request_id: bool = True) -> Callable:
    """`handler` as a route endpoint named `name` (its metrics label): errors in OpenAI's shape, one access line,
    metrics; the request id echoed in the response unless a proxy in front sets it (Ray Serve's)."""
    async def handle(request: Request) -> Response:
        t0, rid, why = time.perf_counter(), request_id(request.headers.get("x-request-id", "")), ""
        try:
            response = await handler(request)
        except APIError as e:
            response, why = e.response(), f": {e.code or e.status} {loggable(clip(e.message))}"
        except (ClientGone, ClientDisconnect):  # left while queued, or while still sending its body: nginx's
            response, why = Response(status_code=499), ": the client went away"  # 499, which nobody reads
        except asyncio.CancelledError:  # the server stopping past --drain-timeout (uvicorn cancels the handler), or
            # Ray Serve cancelling it for a client that went away: OpenAI's 503, which clients retry (elsewhere),
            # instead of the server's bare 500; the engine has dropped the work (_run)
            response = APIError(503, "the server stopped before this request was done; retry",
                                code="shutting_down").response()
            why = ": cancelled (the server is stopping, or the client went away)"
        except Exception:
            log.exception("%s %s failed", rid, name)
            response = APIError(500, "internal server error (see the server log)", code="internal_error").response()
        seconds = time.perf_counter() - t0
        if echo_request_id:
            response.headers["x-request-id"] = rid
        path, client = loggable(request.url.path), request.client.host if request.client else "-"
        log.info("%s %s %s %s %d %.0f ms%s", rid, client, request.method, path, response.status_code,
                 1000 * seconds, why, extra=dict(request_id=rid, client=client, method=request.method, path=path,
                                                 status=response.status_code, ms=round(1000 * seconds, 1),
                                                 error=why.removeprefix(": ") or None))
        metrics.requests.inc(endpoint=name, code=str(response.status_code))
        metrics.latency.observe(seconds, endpoint=name)
        return response
    handle.__name__ = name  # its Route's name, which labels the metrics of responses given before it runs
    return handle


def log_refusal(scope: dict, status: int) -> None:
    """The access line of a request refused before any endpoint ran (routing's 404 / 405, the body limit's 413 /
    408, the browser guard's 403), as endpoint() writes one for the rest: an abuse of the body limit shows in the
    log, not only in the status counts."""
    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", [])}
    rid, client = request_id(headers.get("x-request-id", "")), (scope.get("client") or ("-",))[0]
    method, path = scope.get("method", "-"), loggable(scope.get("path", ""))
    log.info("%s %s %s %s %d: refused before an endpoint", rid, client, method, path, status,
             extra=dict(request_id=rid, client=client, method=method, path=path, status=status, ms=None,
                        error="refused before an endpoint"))


class BrowserGuard:
    """ASGI wrapper: a request whose Origin header is not in `allowed` ("*": any) gets 403 before the app reads it.
    `count(scope, status)` is told of each refusal (the app's endpoints never see those requests)."""

    def __init__(self, app, allowed: tuple[str, ...], count: Callable[[dict, int], None]):
        self.app, self.allowed, self.count = app, tuple(a.rstrip("/").lower() for a in allowed), count

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and "*" not in self.allowed:
            origin = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"origin"), None)
            if origin is not None and origin.rstrip("/").lower() not in self.allowed:
                self.count(scope, 403)
                error = APIError(403, f"requests from web pages are refused (Origin: {loggable(origin, 100)}); the "
                                      "server has no authentication. Allow an origin with --allowed-origins",
                                 code="origin_not_allowed")
                return await error.response()(scope, receive, send)
        await self.app(scope, receive, send)
