"""CUDA-graph replay of the UNet, one graph per (batch bucket, input shapes), as nano-vllm's model runner does.

Why: at serving batch sizes a UNet step launches hundreds of small kernels and the CPU cannot queue them as fast
as the GPU runs them; a CUDA graph replays the whole launch sequence with one call (PyTorch docs, "CUDA Graphs";
nano-vllm `ModelRunner.capture_cudagraph`). What we take from nano-vllm:

  * Batch buckets: a call with B rows runs the graph of the smallest bucket >= B (1, 2, 4, 8, ...); rows B..P-1
    of the static input buffers hold whatever the last replay left there (zeros at first). UNet items never
    interact (GroupNorm and attention are per item), so the extra rows cost time but cannot change row b < B;
    their outputs are dropped. Classifier-free guidance doubles B, so one served batch of n images is 2n rows.
  * Static buffers: a graph reads its inputs from fixed addresses, so each call copies latents / t / context into
    them, replays, and clones the output (the next replay overwrites it).
  * One memory pool shared by every graph (torch.cuda.graph(pool=...)): graphs never run concurrently, so their
    intermediates can share memory. Each graph's static inputs and output stay referenced for its whole life, so
    no other capture can reuse their memory.
  * Lazy capture on first use of a key (warm-up runs on a side stream first, as the PyTorch docs require, so
    cuDNN and Triton autotuning happen outside the capture). Calls past the largest bucket, or after `max_graphs`
    captures, run eagerly.

Guarded by device.type == "cuda": on the CPU `graphs=False` and the wrapper only pads to the bucket and runs the
UNet eagerly, which is what the CPU test checks (bucket choice, padding, slicing). Graph capture itself was
written against the PyTorch API but has not been run in this repository's CI (no GPU there).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["CUDAGraphUNet", "GraphedBackend", "with_cuda_graphs", "BATCH_BUCKETS"]

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


@dataclass
class _Graph:
    latents: torch.Tensor              # (P, Cin, h, w) static input
    t: torch.Tensor                    # (P,)
    context: torch.Tensor              # (P, 77, C)
    out: torch.Tensor | None = None    # (P, 4, h, w) static output (written by replay)
    graph: object = None               # torch.cuda.CUDAGraph, or None: run eagerly on the static buffers


class CUDAGraphUNet:
    """`unet(latents (B, Cin, h, w), t (B,), context (B, 77, C)) -> (B, 4, h, w)`, replayed from CUDA graphs."""

    def __init__(self, unet: Callable, device, buckets: tuple[int, ...] = BATCH_BUCKETS, graphs: bool | None = None,
                 warmup: int = 2, max_graphs: int = 64):
        self.unet, self.device = unet, torch.device(device)
        self.graphs = self.device.type == "cuda" if graphs is None else graphs
        if self.graphs and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {self.device}")
        if list(buckets) != sorted(set(buckets)) or buckets[0] < 1:
            raise ValueError(f"buckets must be increasing positive batch sizes, got {buckets}")
        self.buckets, self.warmup, self.max_graphs = tuple(buckets), warmup, max_graphs
        self._cache: dict[tuple, _Graph] = {}
        self._pool = None

    def bucket(self, batch: int) -> int | None:
        """The smallest bucket holding `batch` rows, or None (too big: run eagerly)."""
        return next((b for b in self.buckets if b >= batch), None)

    @torch.inference_mode()
    def __call__(self, latents: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B = latents.shape[0]
        t = t.reshape(-1).expand(B) if t.numel() == 1 else t  # a scalar timestep applies to every row
        P = self.bucket(B)
        key = (P, tuple(latents.shape[1:]), tuple(context.shape[1:]), latents.dtype, context.dtype, t.dtype)
        g = self._cache.get(key)
        if g is None:
            if P is None or len(self._cache) >= self.max_graphs:
                return self.unet(latents, t, context)
            g = self._cache[key] = self._build(P, latents, t, context)
        g.latents[:B].copy_(latents)  # rows B..P-1 keep stale but finite values; their outputs are dropped
        g.t[:B].copy_(t)
        g.context[:B].copy_(context)
        if g.graph is not None:
            g.graph.replay()
        else:
            g.out = self.unet(g.latents, g.t, g.context)
        return g.out[:B].clone()  # (B, 4, h, w): the next replay overwrites g.out

    def _build(self, P: int, latents, t, context) -> _Graph:
        def static(x: torch.Tensor) -> torch.Tensor:
            buf = torch.zeros((P, *x.shape[1:]), dtype=x.dtype, device=self.device)  # (P, ...)
            buf[:] = x[:1].to(self.device)  # every row a valid input (a real timestep, not 0-everything)
            return buf

        g = _Graph(static(latents), static(t), static(context))
        if not self.graphs:
            return g
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up outside the capture: cuDNN algorithm search, Triton autotune
            for _ in range(self.warmup):
                self.unet(g.latents, g.t, g.context)
        torch.cuda.current_stream(self.device).wait_stream(side)
        g.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g.graph, pool=self._pool):
            g.out = self.unet(g.latents, g.t, g.context)
        if self._pool is None:
            self._pool = g.graph.pool()
        return g

    @property
    def captured(self) -> list[tuple]:
        return list(self._cache)


class GraphedBackend:
    """A Backend (export/backends.py) whose `unet` replays CUDA graphs; everything else is the wrapped backend's.
    The Pipeline sees an ordinary Backend, so no code outside serve/ knows graphs exist."""

    def __init__(self, backend, **options):
        self._backend = backend
        self.unet = CUDAGraphUNet(backend.unet, backend.device, **options)

    def __getattr__(self, name):  # config, tokenizer, device, encode_text, vae_encode, vae_decode, ...
        return getattr(self._backend, name)


def with_cuda_graphs(pipe):
    """`pipe` with its UNet replayed from CUDA graphs when it runs the torch backend on a CUDA device, as `backdrop
    serve` and its Ray Serve replicas run it; otherwise `pipe` itself (the CPU, ONNX Runtime, TensorRT)."""
    from backdrop.diffusion.pipeline import Pipeline

    backend = pipe.backend
    if getattr(backend, "name", None) != "torch" or torch.device(backend.device).type != "cuda":
        return pipe
    graphed = Pipeline(GraphedBackend(backend))
    graphed.controlnet = pipe.controlnet  # its ControlNets (`serve --controlnet`): a call with them runs eagerly
    graphed._ip = pipe._ip  # its IP-Adapter (`serve --ip-adapter`): captured with its scale, which serve never changes
    return graphed
