"""Prometheus metrics for the server, written by hand in the text exposition format (version 0.0.4).

Why not prometheus-client: we need four metric types' worth of text and six /proc reads (its process collector's
families, process_metrics below), not its multiprocess mode or global default registry (a module-level registry
would be shared state between the test's servers). The format is small and stable:
https://prometheus.io/docs/instrumenting/exposition_formats/

    # HELP backdrop_batch_size Items per UNet batch.
    # TYPE backdrop_batch_size histogram
    backdrop_batch_size_bucket{le="1"} 3
    ...
    backdrop_batch_size_bucket{le="+Inf"} 5
    backdrop_batch_size_sum 19
    backdrop_batch_size_count 5

`parse_histogram(text, name)` reads a histogram back (the tests and the load benchmark use it).
Every method is thread-safe: the HTTP handlers and the batch worker thread update the same metrics.
"""
from __future__ import annotations

import math
import os
import threading
import time
from typing import Callable, Iterable

__all__ = ["Counter", "Gauge", "Histogram", "Sampled", "ServerMetrics", "process_metrics", "parse_histogram",
           "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Labels = tuple[tuple[str, str], ...]


def _escape(value: str) -> str:
    # the exposition format escapes backslash, double quote and newline in label values
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: Labels, extra: Labels = ()) -> str:
    pairs = labels + extra
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}" if pairs else ""


def _num(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return str(int(x)) if float(x).is_integer() else repr(float(x))


class _Metric:
    type = ""
    # another registry's metric of the same name, kind and labels, updated with this one (Ray's: ray_serve.py)
    mirror = None

    def __init__(self, name: str, help: str, labelnames: Iterable[str] = ()):
        self.name, self.help, self.labelnames = name, help, tuple(labelnames)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, str]) -> Labels:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"metric {self.name}: labels {sorted(labels)} != declared {list(self.labelnames)}")
        return tuple((k, str(labels[k])) for k in self.labelnames)

    def _header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.type}"]


class Counter(_Metric):
    type = "counter"

    def __init__(self, name, help, labelnames=()):
        super().__init__(name, help, labelnames)
        self._values: dict[Labels, float] = {}

    def inc(self, amount: float = 1.0, **labels) -> None:
        if amount < 0:
            raise ValueError(f"counter {self.name} can only go up, got {amount}")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount
        if self.mirror is not None:
            self.mirror.inc(amount, tags=labels or None)

    def value(self, **labels) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        with self._lock:
            return self._header() + [f"{self.name}{_labels(k)} {_num(v)}" for k, v in sorted(self._values.items())]


class Gauge(_Metric):
    """A value set directly, or read at scrape time from `fn` (e.g. the queue depth)."""
    type = "gauge"

    def __init__(self, name, help, fn: Callable[[], float] | None = None):
        super().__init__(name, help)
        self._value, self._fn = 0.0, fn

    def set(self, value: float) -> None:
        with self._lock:
            self._value = value = float(value)
        if self.mirror is not None:
            self.mirror.set(value)

    def inc(self, amount: float = 1.0) -> None:
        with self._lock:
            self._value = value = self._value + amount
        if self.mirror is not None:
            self.mirror.set(value)

    def dec(self, amount: float = 1.0) -> None:
        self.inc(-amount)

    def value(self) -> float:
        if self._fn is not None:
            return float(self._fn())
        with self._lock:
            return self._value

    def render(self) -> list[str]:
        return self._header() + [f"{self.name} {_num(self.value())}"]


class Sampled(_Metric):
    """One value read at scrape time from `fn`, with constant labels; a counter or a gauge. No sample line when fn
    returns None (a figure this platform does not have)."""

    def __init__(self, name, help, fn: Callable[[], float | None], type: str = "gauge", labels: dict | None = None):
        super().__init__(name, help)
        self.type, self._fn, self._labels = type, fn, tuple((k, str(v)) for k, v in (labels or {}).items())

    def render(self) -> list[str]:
        value = self._fn()
        return self._header() + ([] if value is None else [f"{self.name}{_labels(self._labels)} {_num(value)}"])


def _proc(read: Callable[[], float]) -> Callable[[], float | None]:
    def fn():
        try:
            return read()
        except (OSError, ValueError, IndexError, StopIteration):  # not Linux (no /proc), or an unexpected format
            return None
    return fn


def _start_time() -> float:
    """The process's start, seconds since the epoch: /proc/self/stat's starttime (clock ticks after boot, the
    22nd field, counted after the parenthesised command name) plus the boot time from /proc/stat."""
    with open("/proc/self/stat") as f:
        ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/stat") as f:
        boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def _statm(field: int) -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[field]) * os.sysconf("SC_PAGE_SIZE")


def _max_fds() -> float:
    import resource

    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def process_metrics() -> list[Sampled]:
    """The standard process_* families of Prometheus' client libraries (same names, units and types), read from
    /proc on Linux; elsewhere only the CPU time."""
    start = _proc(_start_time)()  # read once: it does not change
    return [
        Sampled("process_cpu_seconds_total", "Total user and system CPU time spent in seconds.", time.process_time,
                type="counter"),
        Sampled("process_resident_memory_bytes", "Resident memory size in bytes.", _proc(lambda: _statm(1))),
        Sampled("process_virtual_memory_bytes", "Virtual memory size in bytes.", _proc(lambda: _statm(0))),
        Sampled("process_open_fds", "Number of open file descriptors.",
                _proc(lambda: len(os.listdir("/proc/self/fd")))),
        Sampled("process_max_fds", "Maximum number of open file descriptors.", _proc(_max_fds)),
        Sampled("process_start_time_seconds", "Start time of the process since unix epoch in seconds.",
                lambda: start),
    ]


class Histogram(_Metric):
    """Cumulative buckets (`le` = less than or equal), plus _sum and _count, per label set."""
    type = "histogram"

    def __init__(self, name, help, buckets: Iterable[float], labelnames=()):
        super().__init__(name, help, labelnames)
        self.buckets = tuple(sorted(float(b) for b in buckets)) + (math.inf,)
        self._data: dict[Labels, list] = {}   # labels -> [counts per bucket (not cumulative), sum, count]

    def observe(self, value: float, **labels) -> None:
        key = self._key(labels)
        with self._lock:
            counts, _, _ = d = self._data.setdefault(key, [[0] * len(self.buckets), 0.0, 0])
            counts[next(i for i, b in enumerate(self.buckets) if value <= b)] += 1
            d[1] += value
            d[2] += 1
        if self.mirror is not None:
            self.mirror.observe(value, tags=labels or None)

    def render(self) -> list[str]:
        lines = self._header()
        with self._lock:
            for key, (counts, total, n) in sorted(self._data.items()):
                running = 0
                for b, c in zip(self.buckets, counts):
                    running += c
                    lines.append(f"{self.name}_bucket{_labels(key, (('le', _num(b)),))} {running}")
                lines += [f"{self.name}_sum{_labels(key)} {_num(total)}", f"{self.name}_count{_labels(key)} {n}"]
        return lines


class ServerMetrics:
    """The server's metrics. `queue_depth` and `batch_wait` are read from the batcher at scrape time; `info` labels
    backdrop_build_info (version, backend, device, ...)."""

    def __init__(self, queue_depth: Callable[[], float] = lambda: 0.0, batch_wait: Callable[[], float] = lambda: 0.0,
                 info: dict[str, str] | None = None, cpu_cache_limit: Callable[[], float] = lambda: 0.0):
        self.batch_size = Histogram("backdrop_batch_size", "Items (images) per Pipeline call, i.e. per UNet batch "
                                    "before classifier-free guidance doubles it.", (1, 2, 3, 4, 6, 8, 12, 16, 24, 32))
        self.batch_seconds = Histogram("backdrop_batch_duration_seconds", "Wall time of one Pipeline call.",
                                       (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.queue_seconds = Histogram("backdrop_request_queue_duration_seconds", "Time from a request's "
                                       "admission to the start of the first batch that runs it, or to its drop "
                                       "(deadline passed, client gone) if none did.",
                                       (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
        self.latency = Histogram("backdrop_request_duration_seconds", "Request latency from the body read to the "
                                 "response, by endpoint.", (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
                                 labelnames=("endpoint",))
        self.requests = Counter("backdrop_requests_total", "Finished requests by endpoint and HTTP status code.",
                                labelnames=("endpoint", "code"))
        self.images = Counter("backdrop_images_total", "Images returned to clients.")
        self.queue_depth = Gauge("backdrop_queue_depth", "Items waiting in the batcher's queue.", fn=queue_depth)
        self.batch_wait = Gauge("backdrop_batch_wait_seconds", "How long a partial batch like the last one waits "
                                "for company once the model is free (learned, at most --max-queue-delay-ms).",
                                fn=batch_wait)
        self.in_flight = Gauge("backdrop_requests_in_flight", "Image requests admitted and not yet answered.")
        self.ready = Gauge("backdrop_ready", "1 once the model is loaded and warmed up.")
        self.cpu_cache_limit = Gauge("backdrop_cpu_cache_limit_bytes", "Resident memory above which freed CPU memory "
                                     "kept for reuse goes back to the OS (the warmed-up footprint plus "
                                     "--cpu-cache-mb); 0 when none is kept.", fn=cpu_cache_limit)
        self.memory_trims = Counter("backdrop_memory_trims_total", "Times the freed CPU memory kept for reuse went "
                                    "back to the OS: growth up to the limit is this cache, not a leak.")
        self.build_info = Sampled("backdrop_build_info", "Always 1; the labels say what is serving.", lambda: 1,
                                  labels=info)
        self.process = process_metrics()

    def served(self) -> tuple:
        """The metrics of the serving itself (not build_info and the process_* ones): those a scale-out platform
        exports for each replica (serve/ray_serve.py mirrors them into Ray's)."""
        return (self.batch_size, self.batch_seconds, self.queue_seconds, self.latency, self.requests, self.images,
                self.queue_depth, self.batch_wait, self.in_flight, self.ready, self.cpu_cache_limit,
                self.memory_trims)

    def render(self) -> str:
        metrics = (*self.served(), self.build_info, *self.process)
        return "\n".join(line for m in metrics for line in m.render()) + "\n"


def parse_histogram(text: str, name: str, **labels) -> dict:
    """{"buckets": {le: cumulative count}, "sum": float, "count": int} of one histogram in an exposition text
    (the label set given by `labels`; `le` excluded). Raises KeyError if the histogram has no such series."""
    want = {k: str(v) for k, v in labels.items()}
    out: dict = {"buckets": {}}
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        series, value = line.rsplit(" ", 1)
        metric, _, rest = series.partition("{")
        pairs = dict(p.split("=", 1) for p in rest.rstrip("}").split(",") if p) if rest else {}
        pairs = {k: v.strip('"') for k, v in pairs.items()}
        le = pairs.pop("le", None)
        if pairs != want:
            continue
        if metric == f"{name}_bucket":
            out["buckets"][float(le)] = int(float(value))
        elif metric == f"{name}_sum":
            out["sum"] = float(value)
        elif metric == f"{name}_count":
            out["count"] = int(float(value))
    if "count" not in out:
        raise KeyError(f"no histogram {name}{want or ''} in the metrics text")
    return out
