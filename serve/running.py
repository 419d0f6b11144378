"""Running an ASGI app (serve/server.py's create_app) under uvicorn: `run` in the foreground until a signal, or
`ServerThread` in a background thread on an already bound socket. Nothing here knows the app's routes."""
from __future__ import annotations

import contextlib
import json
import logging
import socket
import sys
import threading
import time

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["bind", "run", "uvicorn_config", "head_deadline", "stderr_logging", "JsonFormatter", "ServerThread",
           "DelayedExit"]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object a line (log shippers' format): time (ISO 8601, UTC), level, logger, message, the access
    line's fields when it is one (request_id, client, method, path, status, ms, error), and the traceback if any."""
    FIELDS = ("request_id", "client", "method", "path", "status", "ms", "error")

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{record.msecs:03.0f}Z",
               "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        out.update({k: getattr(record, k) for k in self.FIELDS if getattr(record, k, None) is not None})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


class _Stderr(logging.StreamHandler):
    """A StreamHandler on whatever sys.stderr is when it writes (not the stream of when it was made)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


@contextlib.contextmanager
def stderr_logging(level: str = "info", fmt: str = "text"):
    """While inside: every line of the process, backdrop's and uvicorn's, to stderr in one format, "text"
    (timestamped lines) or "json" (one object a line); `run` leaves uvicorn's loggers to propagate here. The root
    logger's handlers and level are put back on the way out (the command may run inside a host process: tests)."""
    handler = _Stderr()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    try:
        yield
    finally:
        root.handlers[:], level_before = saved
        root.setLevel(level_before)


def bind(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A socket bound to host:port (port 0: a free one). `backdrop serve` binds before it loads the model, so that a
    port in use is said at once, not after the load and warm-up; OSError if it cannot be bound."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def run(app, sock: socket.socket, shutdown_delay: float = 0, on_shutdown=None, **options) -> None:
    """Serve on the bound `sock` until SIGINT/SIGTERM (`options`: uvicorn_config's). uvicorn then stops accepting
    connections, waits for the in-flight requests (the worker keeps serving them) at most `drain_timeout` seconds,
    and runs the lifespan shutdown, which drains the queue. on_shutdown() runs at the first SIGTERM/SIGINT (the
    engine stops admitting work and /readyz turns 503); the listener keeps answering for `shutdown_delay` seconds
    more, so that a load balancer sees the pod unready and stops sending it connections before they would be
    refused (Kubernetes removes it from the Service's endpoints while the signal is already on its way)."""
    config = uvicorn_config(app, **options)
    DelayedExit(config, shutdown_delay, on_shutdown).run(sockets=[sock])


def uvicorn_config(app, log_level: str = "info", keep_alive: float = 5, drain_timeout: float | None = None,
                   forwarded_allow_ips: str | None = None, max_connections: int | None = None,
                   head_timeout: float = 60) -> uvicorn.Config:
    """`backdrop serve`'s uvicorn settings. keep_alive: seconds an idle connection is kept (a load balancer's idle
    timeout must be shorter: AWS ALB's is 60 s); drain_timeout: the longest wait for in-flight requests at shutdown
    (None: as long as they take); forwarded_allow_ips: the proxies whose X-Forwarded-Proto/For are trusted
    (uvicorn's; default 127.0.0.1), for the scheme of "url" responses; max_connections: open connections at most,
    more are answered 503 at once (uvicorn's limit_concurrency counts the connection it decides on among the open
    ones: N + 1 serves N); head_timeout: seconds a request head may take (HeadDeadline; heads are bounded too)."""
    # access_log off: the app logs one line per API request itself (request id, latency, why it failed), and none
    # per health probe or metrics scrape; log_config None: uvicorn's own lines go through the root logger's handler
    # (stderr_logging), in our format
    return uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_keep_alive=keep_alive, access_log=False,
                          timeout_graceful_shutdown=drain_timeout, forwarded_allow_ips=forwarded_allow_ips,
                          limit_concurrency=None if max_connections is None else max_connections + 1, log_config=None,
                          http=head_deadline(head_timeout))


class HeadDeadline(H11Protocol):
    """uvicorn's h11 protocol (whose parser answers 400 to a request head still incomplete past 16 KiB, so a head
    is at most that plus one read; its httptools one, the default where installed, takes heads of any size), closing
    a connection whose request head is not complete `seconds` after the connection opened or the head's first byte
    came: uvicorn has no such deadline, so a client that sends half a head and waits (slowloris) held its
    connection forever. Idle keep-alive connections are uvicorn's (timeout_keep_alive); bodies are BodyLimit's
    (serve/body_limit.py)."""
    seconds = 60.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._head_timer = self.loop.call_later(self.seconds, self._head_late)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        waiting = self.conn.their_state is h11.IDLE and not self.transport.is_closing()  # a head begun, not done
        if waiting and self._head_timer is None:
            self._head_timer = self.loop.call_later(self.seconds, self._head_late)
        elif not waiting:
            self._cancel_head_timer()

    def connection_lost(self, exc) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_late(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def head_deadline(seconds: float) -> type[HeadDeadline]:
    """HeadDeadline with its deadline, for uvicorn.Config(http=...), which makes the protocol itself."""
    return type("HeadDeadline", (HeadDeadline,), {"seconds": seconds})


class DelayedExit(uvicorn.Server):
    """uvicorn's server, whose first exit signal calls on_shutdown() and exits `delay` seconds later; a second
    signal goes uvicorn's own way at once."""

    def __init__(self, config, delay: float = 0, on_shutdown=None):
        super().__init__(config)
        self.delay, self.on_shutdown, self._signalled = delay, on_shutdown, False

    def handle_exit(self, sig, frame) -> None:
        if self._signalled or not (self.delay or self.on_shutdown):
            return super().handle_exit(sig, frame)
        self._signalled = True
        if self.on_shutdown is not None:
            self.on_shutdown()
        timer = threading.Timer(self.delay, super().handle_exit, (sig, frame))
        timer.daemon = True
        timer.start()


class ServerThread:
    """uvicorn in a background thread on an already bound socket (port 0: a free one). For tests, benchmarks
    and notebooks; signals stay with the main thread. `options`: uvicorn_config's (`backdrop serve`'s settings)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning", **options):
        self.sock = bind(host, port)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn_config(app, log_level=log_level, **options))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 60.0) -> "ServerThread":
        self.thread.start()
        end = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > end:
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 60.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()
