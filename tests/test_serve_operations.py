"""What an operator reads and sets, on a random tiny inpainting model on 127.0.0.1: one access line per API request
with its id and why it failed, the same in JSON for log shippers; /metrics with the queue time, the build info and
the process_* families Prometheus' client libraries export; --max-connections answering 503 past its cap."""
import json
import logging
import socket
import sys
import time

import httpx
import pytest

from backdrop.cli import main as cli_main
from backdrop.serve.engine import Engine, EngineConfig
from backdrop.serve.metrics import parse_histogram
from backdrop.serve.running import JsonFormatter, ServerThread
from backdrop.serve.server import ServerConfig, create_app

from serve_helpers import JSON, STEPS, inpaint_body, metrics, product, scalar, start_server, wait

pytestmark = [pytest.mark.usefixtures("one_thread"),  # conftest.py
              pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")]


@pytest.fixture(scope="module")
def server(serve_pipe):
    srv = start_server(serve_pipe, EngineConfig(max_batch_size=4, max_queue_delay_ms=10, request_timeout=120),
                       ServerConfig(steps=STEPS))
    wait(lambda: httpx.get(f"{srv.url}/readyz").status_code == 200, 60, "readyz")
    yield srv
    srv.stop()


def test_each_request_has_an_id_and_one_access_line_with_why_it_failed(server, caplog):
    """X-Request-ID is taken (or made) and echoed; the log has one line per API request with its status, latency and
    the reason of an error, which only the client saw before; /v1/models is counted in the metrics too."""
    with caplog.at_level("INFO", logger="backdrop.serve"):
        r = httpx.post(f"{server.url}/v1/inpaint", content=inpaint_body(product(1), steps=0), headers={
            **JSON, "x-request-id": "abc-123"})
        made = httpx.get(f"{server.url}/v1/models")
    assert r.status_code == 400 and r.headers["x-request-id"] == "abc-123"
    assert len(made.headers["x-request-id"]) == 16
    lines = [rec for rec in caplog.records if rec.getMessage().startswith("abc-123 ")]
    assert len(lines) == 1 and "POST /v1/inpaint 400" in lines[0].getMessage() and "steps" in lines[0].getMessage()
    # --log-format json: the same line as one object, its fields separate
    line = json.loads(JsonFormatter().format(lines[0]))
    assert line["request_id"] == "abc-123" and line["status"] == 400 and line["path"] == "/v1/inpaint", line
    assert line["method"] == "POST" and line["ms"] >= 0 and "steps" in line["error"] and line["level"] == "info"
    assert line["time"].endswith("Z") and line["logger"] == "backdrop.serve"
    assert scalar(metrics(server), 'backdrop_requests_total{endpoint="models",code="200"}') >= 1
    # refused before any endpoint (routing, the body limit): logged too, with the client's id
    with caplog.at_level("INFO", logger="backdrop.serve"):
        assert httpx.get(f"{server.url}/v2/nothing", headers={"x-request-id": "r-404"}).status_code == 404
        big = httpx.post(f"{server.url}/v1/inpaint", content=b"x" * (33 * 2**20), headers={  # over 32 MiB
            **JSON, "x-request-id": "r-413"})
        assert big.status_code == 413
    said = {rec.getMessage() for rec in caplog.records if rec.getMessage().startswith("r-4")}
    assert said == {"r-404 127.0.0.1 GET /v2/nothing 404: refused before an endpoint",
                    "r-413 127.0.0.1 POST /v1/inpaint 413: refused before an endpoint"}


def test_json_log_lines_are_one_object_each_with_the_traceback():
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        record = logging.LogRecord("backdrop.serve", logging.ERROR, __file__, 1, "batch of %d failed", (3,),
                                   sys.exc_info())
    text = JsonFormatter().format(record)
    assert "\n" not in text  # one line, whatever the message and traceback hold
    line = json.loads(text)
    assert line["message"] == "batch of 3 failed" and line["level"] == "error"
    assert "RuntimeError: boom" in line["exception"] and "request_id" not in line


def test_metrics_have_queue_time_build_info_and_process_families(server):
    before = parse_histogram(metrics(server), "backdrop_request_queue_duration_seconds")["count"] \
        if "backdrop_request_queue_duration_seconds_count" in metrics(server) else 0
    r = httpx.post(f"{server.url}/v1/inpaint", content=inpaint_body(product(2), n=2), headers=JSON)
    assert r.status_code == 200, r.text
    text = metrics(server)
    queued = parse_histogram(text, "backdrop_request_queue_duration_seconds")
    assert queued["count"] == before + 1 and 0 <= queued["sum"] < 120  # once a request, not once an image
    info = next(line for line in text.splitlines() if line.startswith("backdrop_build_info{"))
    assert info.endswith(" 1") and 'backend="torch"' in info and 'device="cpu"' in info and 'version="' in info
    assert scalar(text, "process_cpu_seconds_total") > 0
    if sys.platform == "linux":
        assert scalar(text, "process_resident_memory_bytes") > 50 * 2**20
        assert 0 < scalar(text, "process_open_fds") <= scalar(text, "process_max_fds")
        assert time.time() - 3600 < scalar(text, "process_start_time_seconds") < time.time()
    for line in text.splitlines():  # the exposition format: "# HELP|TYPE ..." or "name{labels} number"
        if not line.startswith("#"):
            float(line.rsplit(" ", 1)[1])


def test_max_connections_answers_503_past_the_cap(serve_pipe):
    """--max-connections, uvicorn's limit_concurrency: an idle keep-alive connection holds a place, so slow or idle
    clients cannot take every file descriptor; the next connection gets 503 at once, and a freed place is reused."""
    engine = Engine(serve_pipe, EngineConfig(), warmup=False)
    srv = ServerThread(create_app(engine, ServerConfig(steps=STEPS)), max_connections=1).start()
    try:
        held = socket.create_connection((srv.host, srv.port))
        held.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert held.recv(4096).startswith(b"HTTP/1.1 200")  # and the connection stays open (keep-alive)
        assert httpx.get(f"{srv.url}/healthz").status_code == 503
        held.close()
        wait(lambda: httpx.get(f"{srv.url}/healthz").status_code == 200, 10, "a freed place")
    finally:
        srv.stop()


def test_serve_cli_refuses_a_connection_cap_below_one(capsys):
    assert cli_main(["serve", "backdrop-tiny", "--port", "0", "--max-connections", "0"]) == 2
    assert "--max-connections 0 must be 1 or more" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- hostile clients (security audit)

def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes `sock` within `seconds` (reads until EOF; False if it is still open then)."""
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
        return True
    except socket.timeout:
        return False


def test_request_heads_have_a_deadline_and_a_size_limit(serve_pipe):
    """uvicorn held a half-sent request head (slowloris) or a silent new connection forever, and took heads of any
    size (a 200 MiB header cost 1.15 GiB): --header-timeout closes all three, and a head still incomplete past 16 KiB
    gets 400 (one that arrives whole in one read of up to 64 KiB is parsed)."""
    engine = Engine(serve_pipe, EngineConfig(), warmup=False)
    srv = ServerThread(create_app(engine, ServerConfig(steps=STEPS)), head_timeout=0.5).start()
    try:
        silent = socket.create_connection((srv.host, srv.port))
        half = socket.create_connection((srv.host, srv.port))
        half.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        later = socket.create_connection((srv.host, srv.port))  # a full request, then half of the next one
        later.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert later.recv(4096).startswith(b"HTTP/1.1 200")
        later.sendall(b"GET /healthz HTTP/1.1\r\nHo")
        assert all(closed_within(s, 5) for s in (silent, half, later))
        big = socket.create_connection((srv.host, srv.port))
        big.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
        for _ in range(4):  # just past 16 KiB of head, in reads of their own (more would meet a closed socket)
            big.sendall(b"a" * 4096)
            time.sleep(0.02)
        assert big.recv(4096).startswith(b"HTTP/1.1 400")
        assert httpx.get(f"{srv.url}/healthz").status_code == 200  # and a normal request still works
    finally:
        srv.stop()


def test_a_trickled_body_gets_408_at_its_deadline(serve_pipe):
    """--body-timeout bounds the whole body: a byte now and then no longer keeps a request (and its buffered
    body) alive forever."""
    import asyncio

    engine = Engine(serve_pipe, EngineConfig(), warmup=False)
    app = create_app(engine, ServerConfig(steps=STEPS, body_timeout=0.3))
    sent = []

    async def trickle():
        await asyncio.sleep(0.05)
        return {"type": "http.request", "body": b" ", "more_body": True}

    async def send(message):
        sent.append(message)
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/inpaint", "raw_path": b"/v1/inpaint", "root_path": "", "query_string": b"",
             "headers": [(b"content-type", b"application/json")], "client": ("127.0.0.1", 1),
             "server": ("127.0.0.1", 80)}
    t0 = time.perf_counter()
    asyncio.run(asyncio.wait_for(app(scope, trickle, send), 10))
    assert sent[0]["status"] == 408 and b"within 0.3 s" in sent[1]["body"] and time.perf_counter() - t0 < 2


def test_hostile_ids_paths_and_json_stay_small(server, caplog):
    """An X-Request-ID that is long or odd is replaced, not logged or echoed; control characters in a path are
    escaped in the log; a JSON body of a million objects is refused before it is parsed (~30x its size)."""
    with caplog.at_level("INFO", logger="backdrop.serve"):
        r = httpx.get(f"{server.url}/v1/models", headers={"x-request-id": "a" * 129})
        odd = httpx.get(f"{server.url}/v1/models", headers={"x-request-id": "id with spaces"})
        path = httpx.get(f"{server.url}/v1/models/x%1b%5b2J%0bFAKE%c2%85NEL")
        big = httpx.post(f"{server.url}/v1/images/generations", content=b'{"prompt": "x", "n": [' +
                         b"{}, " * 200_000 + b"{}]}", headers=JSON)
    assert len(r.headers["x-request-id"]) == 16 and len(odd.headers["x-request-id"]) == 16
    assert path.status_code == 404 and big.status_code == 400 and "1000 JSON objects" in big.json()["error"]["message"]
    messages = [rec.getMessage() for rec in caplog.records]
    assert not any("aaaa" in m for m in messages)
    line = next(m for m in messages if "/v1/models/x" in m)
    assert "\\x1b[2J\\x0bFAKE\\x85NEL" in line and line.isprintable(), line


def test_browsers_are_refused_unless_their_origin_is_allowed(serve_pipe):
    """A web page could make a visitor's browser POST to this unauthenticated server (a multipart edit needs no CORS
    preflight): a request with an Origin header gets 403 unless --allowed-origins lists it; API clients send none."""
    engine = Engine(serve_pipe, EngineConfig(), warmup=False)
    for allowed, origin, status in (((), "http://evil.example", 403), (("https://tool.example",), "https://tool.example",
                                    200), (("https://tool.example",), "http://evil.example", 403), ((), None, 200),
                                    (("*",), "http://any.example", 200)):
        srv = ServerThread(create_app(engine, ServerConfig(steps=STEPS, allowed_origins=allowed))).start()
        try:
            r = httpx.get(f"{srv.url}/v1/models", headers={"origin": origin} if origin else {})
            assert r.status_code == status, (allowed, origin, r.text)
            if status == 403:
                assert r.json()["error"]["code"] == "origin_not_allowed" and "--allowed-origins" in r.text
                assert 'endpoint="models",code="403"' in metrics(srv)
        finally:
            srv.stop()


def test_url_images_are_bounded_by_bytes_and_expire_when_asked_for(capsys):
    from backdrop.cli import main
    from backdrop.serve.files import FileStore

    store = FileStore(ttl=60, max_files=10, max_bytes=100)
    first = store.put(b"a" * 60)
    second = store.put(b"b" * 60)  # both would pass 100 bytes: the oldest goes
    assert store.get(first) is None and store.get(second) == b"b" * 60 and store.size == (1, 60)
    short = FileStore(ttl=0.05, max_files=10)
    short.put(b"c" * 10)
    time.sleep(0.1)
    assert short.get("any") is None and short.size == (0, 0)  # gone without a later put
    for flag in ("--max-file-mb", "--max-body-mb"):  # given in MB, named as given; nan and inf broke int()
        for value in ("0", "nan", "inf"):
            assert main(["serve", "backdrop-tiny", "--port", "0", flag, value]) == 2
            assert capsys.readouterr().err.strip().endswith(f"{flag}: {value} is out of range")
