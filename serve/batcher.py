"""Dynamic batching: a bounded queue that groups compatible requests into UNet batches. Pure CPU bookkeeping.

Like nano-vllm's Scheduler, this knows nothing about models or HTTP, so every rule is testable with a fake clock:

- A request carries `n` items (one per image). Items that share a `BatchKey` (model, kind, size bucket, steps,
  sampler) can ride in one UNet batch; each keeps its own prompt, image, mask, seed and strength (guidance is one
  value a call: part of the engine's key options).
- Batches are formed around the *oldest* queued item: its key is served first, with the compatible items behind it
  in arrival order, up to `max_batch_size`. So no request waits behind an unbounded stream of newer ones
  (head-of-line fairness), whatever their keys.
- A batch leaves when it is full or when its oldest item has waited for company long enough. The wait counts
  from when the engine could have run it (the later of the item's arrival and the end of the engine's last batch):
  time spent behind a busy engine is not time spent waiting for company. Without that, an item that missed a
  batch runs alone the moment the engine frees up, just before the clients of the batch before it come back,
  and closed-loop clients split into two half batches that take turns for good.
- How long is long enough is learned per key, up to `max_queue_delay` (`adaptive=True`, the default): after a
  batch leaves short of full, the next compatible arrival tells whether that was right. One that arrives while
  that batch is still running, within `max_queue_delay` of its leaving, came too late: the wait doubles. If it
  arrives after that batch finished and the batch was a single request (the wait brought no company at all), the
  wait was wasted: it halves. Otherwise it stays. So a lone client soon pays no wait at all, and the wait grows
  back as soon as company is missed. (Shrinking on anything less than no company at all, e.g. to what gathering
  took, made closed-loop clients miss their batches often enough to cost more than the waits saved: measured
  1.68-1.92 instead of 2 items per batch at concurrency 2.) `adaptive=False` always waits `max_queue_delay`.
  The learned waits of the last KEYS_REMEMBERED keys are kept.
- The queue holds at most `max_queue` items: `submit` raises `QueueFull` with a Retry-After estimate (HTTP 429).
- A request past its deadline is dropped from the queue and finished as `timeout` (HTTP 504); if it is already
  running, its results are discarded. A cancelled request (client gone) is dropped the same way.
- `close()` stops admissions (SIGTERM); queued work is still served, so the server can drain then exit.
"""
from __future__ import annotations

import itertools
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = ["BatchKey", "Request", "Batch", "Batcher", "QueueFull", "ShuttingDown"]


class QueueFull(Exception):
    def __init__(self, retry_after: float):
        super().__init__(f"the queue is full; retry in {retry_after:.0f} s")
        self.retry_after = retry_after


class ShuttingDown(Exception):
    pass


@dataclass(frozen=True)
class BatchKey:
    """What must be equal for items to share one UNet batch."""
    kind: str            # "generate" | "inpaint"
    height: int
    width: int
    steps: int
    sampler: str
    model: str = "default"


@dataclass(eq=False)
class Request:
    key: BatchKey
    items: list[Any]                      # per-image payloads (prompt, seed, image, mask, ...), len == n
    deadline: float | None = None         # absolute time on the batcher's clock; None: no deadline
    id: str = ""
    arrival: float = 0.0                  # set by submit()
    started: float | None = None          # when the first batch holding one of its items began (Engine)
    status: str = "queued"                # queued | running | done | failed | timeout | cancelled
    error: BaseException | None = None
    results: list[Any] = field(default_factory=list)
    _remaining: int = 0
    _done: threading.Event = field(default_factory=threading.Event)

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def _finish(self, status: str, error: BaseException | None = None) -> None:
        if not self._done.is_set():
            self.status, self.error = status, error
            self._done.set()


@dataclass(frozen=True)
class _Item:
    request: Request
    index: int
    seq: int                              # global arrival order (ties broken by item index)


@dataclass
class Batch:
    key: BatchKey
    entries: list[_Item]
    formed_at: float
    number: int = 0                       # in order of formation

    @property
    def payloads(self) -> list[Any]:
        return [e.request.items[e.index] for e in self.entries]

    def __len__(self) -> int:
        return len(self.entries)


KEYS_REMEMBERED = 256  # batch keys whose learned wait is kept; /v1/inpaint's options make keys unbounded


def _remember(table: dict, key, value) -> None:
    """table[key] = value, forgetting the least recently set key past KEYS_REMEMBERED."""
    table.pop(key, None)
    table[key] = value
    if len(table) > KEYS_REMEMBERED:
        del table[next(iter(table))]


class Batcher:
    def __init__(self, max_batch_size: int = 4, max_queue_delay: float = 0.01, max_queue: int = 64,
                 clock: Callable[[], float] = time.monotonic, adaptive: bool = True):
        if max_batch_size < 1 or max_queue < 1 or max_queue_delay < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1 and max_queue_delay >= 0")
        self.max_batch_size, self.max_queue_delay, self.max_queue = max_batch_size, max_queue_delay, max_queue
        self.clock, self.adaptive = clock, adaptive
        self._free_since = -math.inf      # when the engine finished its last batch (nothing running since)
        self._delay: dict[BatchKey, float] = {}                   # learned wait per key (adaptive)
        self._short: dict[BatchKey, tuple[int, float, bool]] = {}  # key -> its last batch that left short:
        #                                                          (number, formed_at, a single request)
        self._queue: deque[_Item] = deque()
        self._running: set[int] = set()   # numbers of the batches handed out and not yet completed
        self._seq, self._batches = itertools.count(), itertools.count(1)
        self._cond = threading.Condition()
        self._closed = False
        self._batch_seconds = 1.0         # running estimate of one batch's duration, for Retry-After
        self.on_expire: Callable[[Request], None] | None = None

    # ------------------------------------------------------------------ admission
    def submit(self, request: Request) -> Request:
        if not request.items:
            raise ValueError("a request needs at least one item")
        with self._cond:
            if self._closed:
                raise ShuttingDown("the server is shutting down")
            if len(self._queue) + len(request.items) > self.max_queue:
                raise QueueFull(self.retry_after())
            request.arrival = self.clock()
            self._learn(request.key, request.arrival)
            request.status, request._remaining = "queued", len(request.items)
            request.results = [None] * len(request.items)
            for i in range(len(request.items)):
                self._queue.append(_Item(request, i, next(self._seq)))
            self._cond.notify_all()
        return request

    def retry_after(self) -> float:
        """Seconds until the queue has room for a batch: batches ahead times the measured batch duration."""
        batches_ahead = math.ceil(len(self._queue) / self.max_batch_size) + len(self._running)
        return max(1.0, math.ceil(batches_ahead * self._batch_seconds))

    def cancel(self, request: Request) -> None:
        """The client went away: drop its queued items; its running items' results will be discarded."""
        with self._cond:
            self._drop(request, "cancelled")

    def close(self) -> None:
        """Stop admitting requests; what is queued is still served."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def delay(self, key: BatchKey) -> float:
        """How long a partial batch of `key` waits for company once the engine is free (seconds); none when batches
        hold one item (a batch is never partial)."""
        return 0.0 if self.max_batch_size == 1 else self._delay.get(key, self.max_queue_delay)

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def idle(self) -> bool:
        return not self._queue and not self._running

    # ------------------------------------------------------------------ batch formation
    def _drop(self, request: Request, status: str, error: BaseException | None = None) -> None:
        self._queue = deque(e for e in self._queue if e.request is not request)
        request._finish(status, error)

    def _expire(self, now: float) -> None:
        for req in {e.request for e in self._queue if e.request.deadline is not None and now >= e.request.deadline}:
            self._drop(req, "timeout")
            if self.on_expire:
                self.on_expire(req)

    def poll(self) -> Batch | None:
        """Form the next batch if one is due now, else None. Never blocks."""
        with self._cond:
            return self._poll(self.clock())

    def _poll(self, now: float) -> Batch | None:
        self._expire(now)
        if not self._queue:
            return None
        key = self._queue[0].request.key
        members = [e for e in self._queue if e.request.key == key][: self.max_batch_size]
        short = len(members) < self.max_batch_size
        if short and now < self._window_start() + self.delay(key) and not self._closed:
            return None
        taken = set(map(id, members))
        self._queue = deque(e for e in self._queue if id(e) not in taken)
        for e in members:
            e.request.status = "running"
        batch = Batch(key, members, now, next(self._batches))
        self._running.add(batch.number)
        if short and self.adaptive and not self._closed:
            _remember(self._short, key, (batch.number, now, all(e.request is members[0].request for e in members)))
        return batch

    def _window_start(self) -> float:
        """When the head item started waiting for company: its arrival, or the engine's last finish if later."""
        return max(self._queue[0].request.arrival, self._free_since)

    def _learn(self, key: BatchKey, now: float) -> None:
        """An item of `key` arrives: if the last batch of `key` left short of full, was its wait right?"""
        if key not in self._short:
            return
        number, formed_at, alone = self._short.pop(key)
        wait = self.delay(key)
        if number in self._running:                     # it came while that batch ran
            if now - formed_at < self.max_queue_delay:  # and a longer wait would have caught it
                _remember(self._delay, key, min(self.max_queue_delay, max(2 * wait, self.max_queue_delay / 8)))
        elif alone:                                     # nobody came, during the wait nor while it ran
            _remember(self._delay, key, wait / 2)

    def _next_wakeup(self, now: float) -> float | None:
        """Seconds until a batch could become due or a deadline passes (None: nothing queued)."""
        if not self._queue:
            return None
        times = [self._window_start() + self.delay(self._queue[0].request.key)]
        times += [e.request.deadline for e in self._queue if e.request.deadline is not None]
        return max(0.0, min(times) - now)

    def next_batch(self, timeout: float | None = None) -> Batch | None:
        """Block until a batch is due (or `timeout` seconds pass, or the batcher is closed and empty)."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                batch = self._poll(self.clock())
                if batch is not None:
                    return batch
                if self._closed and not self._queue:
                    return None
                wait = self._next_wakeup(self.clock())
                if end is not None:
                    left = end - time.monotonic()
                    if left <= 0:
                        return None
                    wait = left if wait is None else min(wait, left)
                self._cond.wait(wait)

    # ------------------------------------------------------------------ completion
    def complete(self, batch: Batch, outputs: list[Any], failed: dict[Request, BaseException] | None = None) -> None:
        """Hand each item its output; a request finishes when all its items have. The requests in `failed` fail
        with their error instead (their items queued for later batches are dropped). Late or cancelled ones are
        discarded (their request already finished as timeout/cancelled)."""
        if len(outputs) != len(batch):
            raise ValueError(f"batch of {len(batch)} items got {len(outputs)} outputs")
        failed = failed or {}
        with self._cond:
            self._account(batch)
            now = self.clock()
            for e, out in zip(batch.entries, outputs):
                req = e.request
                if req.finished:
                    continue
                if req in failed:
                    self._drop(req, "failed", failed[req])
                    continue
                if req.deadline is not None and now >= req.deadline:
                    req._finish("timeout")
                    continue
                req.results[e.index] = out
                req._remaining -= 1
                if req._remaining == 0:
                    req._finish("done")
            self._cond.notify_all()

    def _account(self, batch: Batch) -> None:
        self._running.discard(batch.number)
        if not self._running:
            self._free_since = self.clock()
        seconds = max(1e-3, self.clock() - batch.formed_at)
        self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * seconds
