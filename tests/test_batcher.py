"""The batcher's rules with a fake clock: grouping, delay, fairness, backpressure, deadlines, cancellation, drain."""
import threading

import pytest

from backdrop.serve.batcher import Batcher, BatchKey, QueueFull, Request, ShuttingDown

A = BatchKey("inpaint", 512, 512, 30, "dpmpp-2m")
B = BatchKey("generate", 512, 512, 30, "dpmpp-2m")


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def make(max_batch=4, delay=0.05, max_queue=16):
    clock = Clock()
    return Batcher(max_batch, delay, max_queue, clock=clock), clock


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


def test_queue_limit_raises_queue_full_with_retry_after():
    b, _ = make(max_queue=3)
    b.submit(req(n=2))
    with pytest.raises(QueueFull) as e:
        b.submit(req(n=2))
    assert e.value.retry_after >= 1
    b.submit(req(n=1))                           # exactly full is fine


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
    b.fail(batch, RuntimeError("boom"))
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
