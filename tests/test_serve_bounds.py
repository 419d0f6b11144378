"""The server's limits at their exact edges, and `serve run`'s boolean spellings:

- --max-body N takes a body of N bytes ("this server takes at most N") and refuses N + 1 with 413, whether the
  length is declared (Content-Length) or the body is streamed (chunked);
- the store behind "url" responses holds at most --max-files images, dropping the oldest;
- `serve run ... flag=on` (and off, yes, no, ...) means what the same word means in a Serve config file (YAML 1.1,
  as PyYAML reads it).
"""
import asyncio
import json

import httpx
import pytest
import yaml  # PyYAML: a transformers dependency, and what Ray reads Serve config files with

from backdrop.serve.engine import Engine, EngineConfig
from backdrop.serve.files import FileStore
from backdrop.serve.ray_serve import builder_args
from backdrop.serve.server import ServerConfig, create_app

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

LIMIT = 1000  # bytes


@pytest.fixture(scope="module")
def app(serve_pipe):
    """The server's ASGI app with a 1000-byte body limit, called in this process (no HTTP server, no batch worker:
    the requests here are answered before any generation)."""
    return create_app(Engine(serve_pipe, EngineConfig(), warmup=False), ServerConfig(steps=2, max_body_bytes=LIMIT))


def body_of(n: int) -> bytes:
    """A JSON request of exactly n bytes that the endpoint refuses for its size field (400), so that its status
    tells whether the body limit let it through (413 otherwise)."""
    head = json.dumps({"prompt": "a mug on marble", "size": "13x13"}).encode()
    return head + b" " * (n - len(head))  # JSON allows trailing whitespace


async def post(app, body: bytes, chunked: bool) -> httpx.Response:
    async def chunks():  # no Content-Length: the body is counted as it arrives
        for i in range(0, len(body), 64):
            yield body[i:i + 64]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        return await client.post("/v1/images/generations", headers={"content-type": "application/json"},
                                 content=chunks() if chunked else body)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_body_of_exactly_the_limit_is_taken_and_one_byte_more_is_413(app, chunked):
    for n, status in ((LIMIT - 1, 400), (LIMIT, 400), (LIMIT + 1, 413)):
        body = body_of(n)
        assert len(body) == n
        r = asyncio.run(post(app, body, chunked))
        assert r.status_code == status, (n, r.text)
        code = r.json()["error"]["code"]
        assert (code == "request_too_large") == (status == 413), (n, r.text)
        if status == 400:
            assert r.json()["error"]["param"] == "size", r.text  # read and parsed: the limit let it through


@pytest.mark.parametrize("max_files", [1, 2, 3])
def test_url_store_holds_at_most_max_files_newest_first(max_files):
    """The url-response store keeps the newest --max-files images; each older one is gone (its URL answers 404)."""
    store = FileStore(ttl=60, max_files=max_files)
    names = [store.put(b"png %d" % i) for i in range(5)]
    assert store.size == (max_files, sum(len(b"png %d" % i) for i in range(5 - max_files, 5)))
    assert [store.get(n) for n in names] == [None] * (5 - max_files) + [b"png %d" % i for i in range(5 - max_files, 5)]


FLAGS = ("url_responses", "cuda_graphs", "allow_pickle", "adaptive_delay", "echo_request_id")  # every boolean option
WORDS = ("true", "false", "yes", "no", "on", "off", "True", "FALSE", "Yes", "NO", "On", "OFF")


def test_serve_run_booleans_read_as_yaml_reads_them():
    """`serve run ... url_responses=on` passes the string "on"; a Serve config file's `url_responses: on` is YAML
    1.1's true (Ray reads config files with PyYAML). Both must mean the same, for every boolean option; 1 and 0
    too (YAML ints). A silent false for "on" would turn a feature off without a word."""
    def value(args: dict, name: str):
        for where in (args, args["engine_config"].__dict__, args["server_config"].__dict__):
            if name in where:
                return where[name]
        raise KeyError(name)

    for name in FLAGS:
        for word in WORDS + ("1", "0"):
            expected = bool(yaml.safe_load(word))
            assert isinstance(yaml.safe_load(word), bool if word not in ("1", "0") else int)
            for given in (word, f" {word} ", yaml.safe_load(word)):  # a command-line string, or a config's value
                assert value(builder_args({"model": "m", name: given}), name) is expected, (name, given)
