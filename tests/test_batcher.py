"""The batcher's rules with a fake clock: grouping, delay, fairness, backpressure, deadlines, cancellation, drain."""
import itertools
import threading

import pytest

from backdrop.serve.batcher import KEYS_REMEMBERED, Batcher, BatchKey, QueueFull, Request, ShuttingDown

A = BatchKey("inpaint", 512, 512, 30, "dpmpp-2m")
B = BatchKey("generate", 512, 512, 30, "dpmpp-2m")


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def make(max_batch=4, delay=0.05, max_queue=16, adaptive=True):
    clock = Clock()
    return Batcher(max_batch, delay, max_queue, clock=clock, adaptive=adaptive), clock


def req(key=A, n=1, deadline=None, name=""):
    return Request(key, [f"{name}{i}" for i in range(n)], deadline=deadline, id=name)


def test_full_batch_leaves_at_once_partial_batch_waits_for_the_delay():
    b, clock = make(max_batch=3)
    for i in range(2):
        b.submit(req(name=f"r{i}"))
    assert b.poll() is None                       # 2 of 3 and no time has passed
    clock.t += 0.049
    assert b.poll() is None
    clock.t += 0.002
    batch = b.poll()
    assert batch.payloads == ["r00", "r10"]
    for i in range(4):
        b.submit(req(name=f"s{i}"))
    assert b.poll().payloads == ["s00", "s10", "s20"]  # full: no waiting
    assert b.depth == 1


def test_only_compatible_items_share_a_batch_and_each_keeps_its_payload():
    b, clock = make(max_batch=4)
    b.submit(req(A, name="a"))
    b.submit(req(B, name="b"))
    b.submit(req(A, n=2, name="c"))
    clock.t += 1
    first = b.poll()
    assert first.key == A and first.payloads == ["a0", "c0", "c1"]
    assert b.poll().payloads == ["b0"]


def test_head_of_line_fairness_against_a_stream_of_newer_requests():
    b, clock = make(max_batch=2, delay=0.01, max_queue=1000)
    old = b.submit(req(B, name="old"))
    served = []
    for step in range(50):                       # a steady stream of key-A pairs that would always fill a batch
        b.submit(req(A, name=f"new{step}-"))
        b.submit(req(A, name=f"new{step}+"))
        batch = b.poll()
        if batch is not None:
            served.append(batch)
            b.complete(batch, batch.payloads)
        if old.finished:
            break
        clock.t += 0.001
    assert old.finished and old.results == ["old0"]
    assert len(served) <= 11                     # it went as soon as its own delay elapsed


def test_the_wait_for_company_counts_from_when_the_engine_is_free():
    b, clock = make(max_batch=4, delay=0.5, adaptive=False)   # times in binary fractions: exact sums
    b.submit(req(name="x")), b.submit(req(name="y"))
    clock.t += 0.5
    running = b.poll()                           # x, y leave after the delay
    clock.t += 0.125
    b.submit(req(name="s"))                      # s arrives while the engine is busy ...
    clock.t += 2
    b.complete(running, ["x", "y"])              # ... for longer than the delay,
    assert b.poll() is None                      # yet it waits for company now that the engine is free
    clock.t += 0.25
    b.submit(req(name="t"))
    assert b.poll() is None
    clock.t += 0.25
    assert b.poll().payloads == ["s0", "t0"]


def closed_loop(b, clock, clients, run_seconds, back_after, first_arrivals, seconds):
    """`clients` closed-loop clients on the fake clock, one engine: each client sends a request, waits for its
    answer and sends the next `back_after(i)` seconds later, for `seconds`; then what is queued is served.
    A batch of any size takes `run_seconds`. Returns the sizes of the batches run, in order."""
    start = clock.t
    arrivals = {i: start + at for i, at in enumerate(first_arrivals)}   # first_arrivals: seconds from now
    sizes, running, done_at = [], None, 0.0
    for tick in itertools.count():               # 1 ms ticks
        clock.t = start + tick * 1e-3
        sending = clock.t < start + seconds
        if not sending and running is None and b.idle:
            return sizes
        for i, at in sorted(arrivals.items()):
            if sending and at is not None and clock.t >= at - 1e-9:
                b.submit(Request(A, [i], id=str(i)))
                arrivals[i] = None
        if running is not None and clock.t >= done_at - 1e-9:
            b.complete(running, running.payloads)
            for i in running.payloads:
                arrivals[i] = clock.t + back_after(i)
            running = None
        if running is None and (running := b.poll()) is not None:
            sizes.append(len(running))
            done_at = clock.t + run_seconds


def test_closed_loop_clients_do_not_split_into_alternating_half_batches():
    # 8 clients whose answers take 20-34 ms to come back as their next request; one started late. Counting the
    # wait from arrival, the straggler would run alone each time the engine frees up, just before the other 7
    # come back: batches of 7, 1, 7, 1, ... for good. Counting it from when the engine is free, it waits for them.
    b, clock = make(max_batch=8, delay=0.05, max_queue=64)
    sizes = closed_loop(b, clock, 8, run_seconds=0.1, back_after=lambda i: 0.020 + 0.002 * i,
                        first_arrivals=[0.0] * 7 + [0.06], seconds=3.0)
    assert len(sizes) > 20 and sizes[0] == 7 and all(n == 8 for n in sizes[1:]), sizes


def test_a_lone_client_soon_pays_no_wait_and_the_wait_grows_back_with_company():
    b, clock = make(max_batch=8, delay=0.05, max_queue=64)
    sizes = closed_loop(b, clock, 1, run_seconds=0.1, back_after=lambda i: 0.02, first_arrivals=[0.0], seconds=2)
    assert set(sizes) == {1} and len(sizes) > 10
    assert b.delay(A) < 0.05 / 2 ** 9            # halved after every lone batch that nobody missed
    # a second client, 10 ms behind the first: it arrives while the first runs alone (missed it), so the wait
    # doubles until it covers the 10 ms, and from then on the two ride together
    sizes = closed_loop(b, clock, 2, run_seconds=0.1, back_after=lambda i: 0.02 + 0.01 * i,
                        first_arrivals=[0.0, 0.01], seconds=2)
    assert sizes[:2] == [1, 1] and all(n == 2 for n in sizes[6:]), sizes
    assert 0.01 <= b.delay(A) <= 0.05


def test_a_fixed_wait_does_not_learn():
    b, clock = make(max_batch=8, delay=0.05, max_queue=64, adaptive=False)
    closed_loop(b, clock, 1, run_seconds=0.1, back_after=lambda i: 0.02, first_arrivals=[0.0], seconds=1)
    assert b.delay(A) == 0.05


def test_batches_of_one_never_wait():
    """--max-batch-size 1 (batching off): a batch is full as it forms, and the wait (the metric's gauge) says 0."""
    b, clock = make(max_batch=1, delay=0.5)
    assert b.delay(A) == 0.0
    b.submit(req(A))
    assert len(b.poll()) == 1  # at once, the clock not moved


def test_learned_waits_are_kept_for_a_bounded_number_of_keys():
    b, clock = make(max_batch=8, delay=0.05, max_queue=64)
    for i in range(KEYS_REMEMBERED + 50):        # (the server's keys carry /v1/inpaint's options: unbounded)
        key = BatchKey("inpaint", 64, 64, 1 + i, "dpmpp-2m")
        for _ in range(2):                       # a lone request, then the next: the wait of `key` halves
            r = b.submit(Request(key, ["x"]))
            clock.t += 1
            b.complete(b.poll(), ["y"])
            assert r.status == "done"
    assert len(b._delay) == len(b._short) == KEYS_REMEMBERED
    assert b.delay(key) == 0.025


def test_queue_limit_raises_queue_full_with_retry_after():
    b, _ = make(max_queue=3)
    b.submit(req(n=2))
    with pytest.raises(QueueFull) as e:
        b.submit(req(n=2))
    assert e.value.retry_after >= 1
    b.submit(req(n=1))                           # exactly full is fine


def test_retry_after_counts_running_batches_and_learns_their_duration():
    """Retry-After stayed at its 1 s floor whatever ran or how long batches took."""
    b, clock = make(max_batch=2, max_queue=2)
    b.submit(req(n=2))
    running = b.poll()                           # one batch running, then one queued: 2 batches ahead
    b.submit(req(n=2))
    with pytest.raises(QueueFull) as e:
        b.submit(req())
    assert e.value.retry_after == 2
    clock.t += 10                                # that batch took 10 s
    b.complete(running, ["x", "y"])
    assert b.retry_after() >= 3


def test_the_learned_wait_never_passes_max_queue_delay():
    """A partial batch that misses a request doubles its wait, up to the operator's --max-queue-delay, never past."""
    b, clock = make(max_batch=4, delay=0.05)
    for _ in range(3):
        b.submit(req(name="a"))
        clock.t += 0.05
        alone = b.poll()                         # left short ...
        clock.t += 0.01
        b.submit(req(name="b"))                  # ... and missed this one while it ran
        b.complete(alone, alone.payloads)
        clock.t += 1
        b.complete(later := b.poll(), later.payloads)
    assert b.delay(A) == 0.05


def test_deadline_expires_queued_work_and_discards_late_results():
    b, clock = make(max_batch=2, delay=10)
    expired = []
    b.on_expire = expired.append
    r1 = b.submit(req(deadline=clock.t + 1, name="late"))
    clock.t += 1.5
    assert b.poll() is None and r1.status == "timeout" and expired == [r1] and b.depth == 0
    r2 = b.submit(req(n=2, deadline=clock.t + 1, name="slow"))
    batch = b.poll()                              # full (2 items) -> runs
    clock.t += 2                                  # ... and finishes after its deadline
    b.complete(batch, ["x", "y"])
    assert r2.status == "timeout" and r2.results == [None, None]


def test_cancel_drops_queued_items_and_running_results():
    b, clock = make(max_batch=2)
    r1, r2 = b.submit(req(name="a")), b.submit(req(name="b"))
    b.cancel(r2)
    clock.t += 1
    batch = b.poll()
    assert batch.payloads == ["a0"] and r2.status == "cancelled"
    b.cancel(r1)
    b.complete(batch, ["done"])
    assert r1.status == "cancelled" and r1.results == [None]


def test_requests_larger_than_a_batch_are_split_and_finish_once_all_items_are_done():
    b, clock = make(max_batch=4)
    r = b.submit(req(n=6, name="big"))
    first = b.poll()
    assert len(first) == 4 and not r.finished
    clock.t += 1
    second = b.poll()
    b.complete(second, ["e", "f"])
    assert not r.finished
    b.complete(first, ["a", "b", "c", "d"])
    assert r.status == "done" and r.results == list("abcdef")


def test_failure_finishes_every_request_in_the_batch_with_the_error():
    b, clock = make(max_batch=2)
    r1, r2 = b.submit(req(name="a")), b.submit(req(n=2, name="b"))
    batch = b.poll()
    b.complete(batch, [None] * len(batch), {e.request: RuntimeError("boom") for e in batch.entries})
    assert r1.status == r2.status == "failed" and str(r2.error) == "boom" and b.depth == 0


def test_close_refuses_new_work_and_drains_the_queue_without_waiting():
    b, _ = make(max_batch=4, delay=60)
    r = b.submit(req(name="a"))
    b.close()
    with pytest.raises(ShuttingDown):
        b.submit(req())
    batch = b.next_batch(timeout=1)               # closed: no waiting for company
    assert batch.payloads == ["a0"]
    b.complete(batch, ["ok"])
    assert r.status == "done" and b.next_batch(timeout=1) is None and b.idle


def test_next_batch_blocks_until_work_arrives():
    b = Batcher(max_batch_size=2, max_queue_delay=0.0, max_queue=8)  # real clock
    got = []
    t = threading.Thread(target=lambda: got.append(b.next_batch(timeout=5)))
    t.start()
    b.submit(req(name="x"))
    t.join(5)
    assert got and got[0].payloads == ["x0"]


def test_bad_arguments():
    with pytest.raises(ValueError):
        Batcher(max_batch_size=0)
    b, _ = make(max_batch=1)
    with pytest.raises(ValueError, match="at least one item"):
        b.submit(Request(A, []))
    r = b.submit(req())
    batch = b.next_batch(timeout=1)
    with pytest.raises(ValueError, match="1 items got 2 outputs"):
        b.complete(batch, [1, 2])
    assert not r.finished
