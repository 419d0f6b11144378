"""The serving engine: one Pipeline, one Batcher, one worker thread. No HTTP here (that is server.py).

Like nano-vllm's LLMEngine, the step is a few lines: the worker takes the next batch from the Batcher
(serve/batcher.py), runs it as ONE Pipeline call with per-item prompts, images, masks, seeds, strengths and control
images (ControlNet), and hands each item its image. What must be equal for items to share that call is the batch
key: the Batcher's BatchKey (kind, size, steps, sampler, model) plus `options`, the Pipeline arguments that are one
value per call (guidance scale, mask blur, crop padding, ControlNet scales, ...). Requests with the server's
defaults all share one key per size.

Callers (the async HTTP handlers) wait without blocking their event loop: `submit(..., on_done)` registers a
callback the worker calls (from its thread) when the request finishes, whether done, failed or expired.
A request whose client went away or whose deadline passed is `abandon`ed: dropped from the queue, its results
discarded, and if every request of the running batch is gone the batch is interrupted between two steps.
If a batch's call fails, each of its requests is run again alone, so that only a request that fails on its own
(an input that trips a bug, say) gets the error and the other clients of its batch get their images.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from backdrop import __version__, runtime
from backdrop.diffusion.pipeline import Pipeline, SamplingInterrupted
from backdrop.serve.batcher import Batch, BatchKey, Batcher, Request
from backdrop.serve.cuda_graphs import BATCH_BUCKETS
from backdrop.serve.metrics import ServerMetrics

__all__ = ["ServeKey", "Item", "Engine", "EngineConfig", "warm_up_batches", "controlnet_count"]

log = logging.getLogger("backdrop.serve")


@dataclass(frozen=True)
class ServeKey(BatchKey):
    """BatchKey plus the Pipeline arguments that take one value per call, as sorted (name, value) pairs."""
    options: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class Item:
    """One image to make. `image` (RGB) and `mask` ((H, W) float32 in [0, 1], 1 = repaint) only for inpainting."""
    prompt: str
    seed: int
    negative_prompt: str = ""
    strength: float = 1.0
    image: Image.Image | None = None
    mask: np.ndarray | None = None
    control: tuple[Image.Image, ...] | None = None  # one control image per ControlNet the pipeline runs, in order
    ip_image: Image.Image | None = None  # the image prompt, when the pipeline runs an IP-Adapter


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 8          # items per Pipeline call; 1 turns dynamic batching off
    max_queue_delay_ms: float = 50   # the longest a partial batch waits for company once the engine is free
    max_queue: int = 64              # queued items (images) before submissions get 429
    request_timeout: float = 300.0   # seconds from arrival to answer, queueing included; then 504
    model_name: str = "backdrop"     # the `model` of every BatchKey (one model per engine)
    # CPU only: freed memory the process may keep for reuse above its footprint after warm-up, in MiB (see
    # backdrop.runtime: keep_freed_memory, trimmed back with release_freed_memory past the budget). 0: leave
    # malloc alone. Process-wide, so off unless asked for (`backdrop serve` asks: --cpu-cache-mb).
    cpu_cache_mb: float = 0
    adaptive_delay: bool = True      # learn the wait per batch key, up to max_queue_delay_ms (serve/batcher.py)

    def __post_init__(self):
        for name, ok in (("max_batch_size", self.max_batch_size >= 1), ("max_queue", self.max_queue >= 1),
                         ("max_queue_delay_ms", self.max_queue_delay_ms >= 0),
                         ("request_timeout", self.request_timeout > 0), ("cpu_cache_mb", self.cpu_cache_mb >= 0)):
            if not ok:
                raise ValueError(f"EngineConfig.{name} = {getattr(self, name)!r} is out of range")


def controlnet_count(pipe: Pipeline) -> int:
    """How many ControlNets `pipe` runs (pipe.controlnet: None, one, or a list): each call needs as many control
    images."""
    nets = pipe.controlnet
    return 0 if nets is None else len(nets) if isinstance(nets, list) else 1


def warm_up_batches(device_type: str, max_batch_size: int) -> list[int]:
    """The batch sizes the engine warms up with: 1 on the CPU; on CUDA each graph bucket below max_batch_size,
    and max_batch_size itself."""
    if device_type != "cuda":
        return [1]
    return sorted({b for b in BATCH_BUCKETS if b < max_batch_size} | {max_batch_size})


class Engine:
    def __init__(self, pipeline: Pipeline, config: EngineConfig = EngineConfig(), warmup: bool = True):
        self.pipe, self.config = pipeline, config
        self.batcher = Batcher(config.max_batch_size, config.max_queue_delay_ms / 1000, config.max_queue,
                               adaptive=config.adaptive_delay)
        self.batcher.on_expire = self._expired
        self._last_key: BatchKey | None = None   # the key of the last batch run, for the batch-wait gauge
        backend = pipeline.backend
        self.metrics = ServerMetrics(queue_depth=lambda: self.batcher.depth, batch_wait=lambda: (
            self.batcher.max_queue_delay if self._last_key is None else self.batcher.delay(self._last_key)),
            info=dict(version=__version__, torch=torch.__version__, backend=getattr(backend, "name", "torch"),
                      device=str(backend.device), dtype=str(backend.dtype).removeprefix("torch."),
                      model=config.model_name),
            cpu_cache_limit=lambda: (self._rss_limit_mb or 0) * 2**20)
        self.ready = threading.Event()
        self.draining = threading.Event()  # shutting down: /readyz says 503, new work gets 503 shutting_down
        self.error: BaseException | None = None       # what went wrong in warm-up, shown by /readyz
        self._warmup = warmup
        self._callbacks: dict[Request, Callable[[], None]] = {}
        self._lock = threading.Lock()
        self._current: tuple[Batch, threading.Event] | None = None
        self._thread: threading.Thread | None = None
        self._closing = False
        self._rss_limit_mb: float | None = None  # set after warm-up when keeping freed memory (cpu_cache_mb)
        self.memory_trims = 0                    # times the freed memory went back to the OS

    @property
    def native_size(self) -> int:
        return self.pipe.config.image_size

    @property
    def native_hw(self) -> tuple[int, int]:
        """(H, W) px of a request that names no size: the model's native square, or an export's fixed --size."""
        return tuple(self.pipe.fixed_size or (self.native_size,) * 2)

    # ------------------------------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="backdrop-batch-worker", daemon=True)
            self._thread.start()

    def problem(self) -> str | None:
        """Why this engine cannot serve, or None: its warm-up failed, or its batch worker thread is gone though it was
        not closed (an exception outside a batch's handling: a bug, a wedged device), so every request would wait for
        its 504. For health checks: /readyz, and Ray Serve's check_health (serve/ray_serve.py) that replaces such a
        replica."""
        if self.error is not None:
            return f"warm-up failed: {self.error}"
        thread = self._thread
        if thread is not None and not thread.is_alive() and not self._closing:
            return "the batch worker thread has stopped"
        return None

    def begin_shutdown(self) -> None:
        """Stop admitting new work (503, retryable) and say not ready, while what is admitted still runs: the first
        step of a graceful shutdown, before the listener closes (serve/running.py's --shutdown-delay)."""
        self.draining.set()
        self.batcher.close()

    def close(self, timeout: float | None = None) -> None:
        """Stop admissions; the worker serves what is queued (drain), then exits."""
        self._closing = True
        self.batcher.close()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        keep = (self.config.cpu_cache_mb > 0 and torch.device(self.pipe.backend.device).type == "cpu"
                and runtime.keep_freed_memory())
        try:
            if self._warmup:
                self._warm_up()
            if keep:
                self._rss_limit_mb = runtime.rss_mb() + self.config.cpu_cache_mb
            self.ready.set()
            self.metrics.ready.set(1)
        except Exception as e:  # the model cannot run: /readyz says why; requests will fail with the reason
            log.exception("warm-up failed")
            self.error = e
        while True:
            batch = self.batcher.next_batch(timeout=0.5)
            if batch is None:
                if self._closing and self.batcher.idle:  # closed and drained
                    return
                continue
            self._run(batch)
            if self._rss_limit_mb is not None and runtime.rss_mb() > self._rss_limit_mb:
                runtime.release_freed_memory()
                self.memory_trims += 1
                self.metrics.memory_trims.inc()

    def _warm_up(self) -> None:
        """One-step calls through every component (text encoder, VAE decode and, for inpainting models, encode; UNet
        with guidance) at the native size (an export's fixed size), so the first requests do not pay for lazy
        initialisation. On the CPU one image is enough; on CUDA every batch bucket up to max_batch_size runs once,
        capturing its UNet graph and compiling the Triton kernels for its batch size (the first full batch would
        otherwise pay several seconds for them)."""
        h, w = self.native_hw
        t0 = time.perf_counter()
        sizes = warm_up_batches(torch.device(self.pipe.backend.device).type, self.config.max_batch_size)
        nets, black = controlnet_count(self.pipe), Image.new("RGB", (w, h))
        control = {"control_image": black if nets == 1 else [black] * nets} if nets else {}  # with --controlnet
        if self.pipe.ip_adapter_loaded:  # with --ip-adapter: its image encoder warms up too
            control["ip_adapter_image"] = black
        for b in sizes:
            if self.pipe.config.unet.in_channels == 9:
                image = Image.new("RGB", (w, h), (128, 128, 128))
                mask = Image.new("L", (w, h), 255)
                self.pipe.inpaint(image, mask=mask, prompt=["warm-up"] * b, seed=list(range(b)), steps=1,
                                  progress=False, **control)
            else:
                self.pipe.generate(["warm-up"] * b, seed=list(range(b)), steps=1, progress=False, **control)
        log.info("warm-up (batches of %s) took %.1f s", sizes, time.perf_counter() - t0)

    # ------------------------------------------------------------------------------------------ requests
    def submit(self, key: ServeKey, items: list[Item], on_done: Callable[[], None],
               timeout: float | None = None) -> Request:
        """Queue one request (n items). Raises batcher.QueueFull (429) or batcher.ShuttingDown (503).
        `on_done()` is called from another thread once the request has finished, whatever its status."""
        seconds = self.config.request_timeout if timeout is None else min(timeout, self.config.request_timeout)
        req = Request(key, list(items), deadline=self.batcher.clock() + seconds)
        with self._lock:
            self._callbacks[req] = on_done
        try:
            return self.batcher.submit(req)
        except BaseException:
            with self._lock:
                self._callbacks.pop(req, None)
            raise

    def abandon(self, req: Request) -> None:
        """The client left or the deadline passed: drop the request; interrupt its batch if nobody else waits."""
        self.batcher.cancel(req)
        self._dequeued(req, self.batcher.clock())
        self._notify(req)
        current = self._current
        if current is not None and all(e.request.finished for e in current[0].entries):
            current[1].set()

    def _expired(self, req: Request) -> None:
        self._dequeued(req, self.batcher.clock())
        self._notify(req)

    def _dequeued(self, req: Request, now: float) -> None:
        """A request's queue time, once: to its first batch, or to its drop (deadline, client gone) if none ran it,
        so that overload, when requests time out in the queue, shows in the histogram rather than hiding there."""
        with self._lock:
            if req.started is not None:
                return
            req.started = now
        self.metrics.queue_seconds.observe(now - req.arrival)

    def _notify(self, req: Request) -> None:
        with self._lock:
            callback = self._callbacks.pop(req, None)
        if callback is not None:
            callback()

    # ------------------------------------------------------------------------------------------ the step
    def _run(self, batch: Batch) -> None:
        self._last_key = batch.key
        interrupt = threading.Event()
        self._current = (batch, interrupt)  # first, so an abandon() from now on can interrupt this batch
        live = [i for i, e in enumerate(batch.entries) if not e.request.finished]  # cancelled after formation
        outputs: list[Any] = [None] * len(batch)
        failed: dict[Request, BaseException] = {}
        now = self.batcher.clock()
        for req in {batch.entries[i].request for i in live}:
            self._dequeued(req, now)  # its first batch: the time it queued
        try:
            try:
                self._call_into(batch, live, outputs, interrupt)
            except SamplingInterrupted:  # every request of the batch was abandoned: nothing to deliver
                pass
            except Exception as e:  # a model failure: find whose, keep serving the next batches
                failed = self._run_alone(batch, live, outputs, interrupt, e)
            self.batcher.complete(batch, outputs, failed)
        finally:
            self._current = None
            for req in {e.request for e in batch.entries}:
                if req.finished:
                    self._notify(req)

    def _run_alone(self, batch: Batch, live: list[int], outputs: list[Any], interrupt: threading.Event,
                   error: Exception) -> dict[Request, BaseException]:
        """The batch's call failed: run each of its requests alone, so that only a request that also fails on its
        own gets the failure, not the other clients' requests beside it. Returns the failed requests and their
        errors. A batch of one request is not retried (it would fail the same way, at the cost of a second run)."""
        entries: dict[Request, list[int]] = {}
        for i in live:
            entries.setdefault(batch.entries[i].request, []).append(i)
        if len(entries) == 1:
            log.error("batch of %d failed", len(live), exc_info=error)
            return dict.fromkeys(entries, error)
        log.warning("batch of %d images from %d requests failed (%s: %s); running each request alone", len(live),
                    len(entries), type(error).__name__, error)
        failed: dict[Request, BaseException] = {}
        for req, indices in entries.items():
            if req.finished:  # abandoned meanwhile
                continue
            try:
                self._call_into(batch, indices, outputs, interrupt)
            except SamplingInterrupted:  # every request of the batch is gone now
                break
            except Exception as e:
                log.exception("a request of %d image(s) failed alone", len(indices))
                failed[req] = e
        return failed

    def _call_into(self, batch: Batch, indices: list[int], outputs: list[Any], interrupt: threading.Event) -> None:
        """One Pipeline call for the batch's items at `indices`; their images go to the same places in `outputs`."""
        if not indices:
            return
        t0 = time.perf_counter()
        payloads = batch.payloads
        try:
            images = self._call(batch.key, [payloads[i] for i in indices], interrupt)
        finally:  # interrupted and failed batches used the accelerator too: utilisation counts them
            self.metrics.batch_size.observe(len(indices))
            self.metrics.batch_seconds.observe(time.perf_counter() - t0)
        for i, image in zip(indices, images):
            outputs[i] = image

    def _call(self, key: ServeKey, items: list[Item], interrupt: threading.Event) -> list[Image.Image]:
        """One Pipeline call for `items`: every per-item value as a list, one seed per item."""
        args = dict(prompt=[it.prompt for it in items], negative_prompt=[it.negative_prompt for it in items],
                    seed=[it.seed for it in items], steps=key.steps, sampler=key.sampler, progress=False,
                    interrupt=interrupt, **dict(key.options))
        if items[0].control is not None:  # per item one image per ControlNet: diffusers' nested form for several
            args["control_image"] = [it.control[0] if len(it.control) == 1 else list(it.control) for it in items]
        if items[0].ip_image is not None:  # one image prompt per item (diffusion/image_prompt.py)
            args["ip_adapter_image"] = [it.ip_image for it in items]
        if key.kind == "generate":
            out = self.pipe.generate(height=key.height, width=key.width, **args)
        elif key.kind == "inpaint":
            out = self.pipe.inpaint([it.image for it in items], mask=[it.mask for it in items],
                                    strength=[it.strength for it in items], **args)
        else:
            raise ValueError(f"unknown batch kind {key.kind!r}")
        return out.images
