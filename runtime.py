"""Process-wide CPU settings that the `backdrop` command applies for its own process (never the library on its own:
a library must not change how its host program allocates memory). Python API users call them explicitly.

    import backdrop.runtime
    backdrop.runtime.keep_freed_memory()   # before running a full-size model on the CPU
"""
from __future__ import annotations

import ctypes
import os
import platform

__all__ = ["keep_freed_memory", "keeping_freed_memory", "release_freed_memory", "rss_mb"]

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt() parameter numbers (malloc.h)
_INT_MAX = 2**31 - 1


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory in the process for reuse instead of handing it back to the OS.

    Why: glibc serves large blocks (above a threshold that never exceeds 32 MB) with a fresh mmap and unmaps them
    on free, so every large activation of a full-size model is page-faulted in again, one zero-filled 4 KiB page at
    a time. The SD1.5 VAE decoder at batch 4 x 256² (bf16, 2 threads, AMD EPYC) took 1.2 million page faults and
    2.4 s of system time per call; with mmap and trimming off: 24 thousand faults, 0.04 s, and the decode went
    from 6.88 s to 5.90 s (-14%); the UNet, whose activations are smaller, was unchanged; peak RSS unchanged
    (6444 MB both). This is what the jemalloc/tcmalloc LD_PRELOAD of torch.backends.xeon.run_cpu buys, without
    preloading anything.

    The cost is memory. Freed memory stays in the process, and blocks of ever new sizes fragment a heap that never
    shrinks: the tiny model through 150 text-to-image calls of random sizes (64-512 px, batch 1-4) ran 1.42x faster
    (114 s vs 162 s) but its RSS kept climbing, to 3.1 GB, where glibc's default peaked at 1.7 GB and settled near
    0.95 GB. A job of one shape (an inpainting run, a training run) reaches its plateau after the first step. So
    `backdrop` applies it to its one-shot commands; `backdrop serve` on the CPU applies it with a budget, trimming
    with `release_freed_memory` when RSS grows past it (serve/engine.py).

    Returns whether the setting was applied: False on non-glibc systems, or when BACKDROP_MALLOC=system asks to
    leave malloc alone.
    """
    if os.environ.get("BACKDROP_MALLOC", "").lower() == "system":
        return False
    mallopt = _glibc("mallopt", [ctypes.c_int, ctypes.c_int])
    if mallopt is None:
        return False
    # mallopt returns 1 on success. Order matters little; both are needed: no mmap for large blocks (so they come
    # from the heap and return to it), and no trimming of the heap's free top back to the OS.
    global _applied
    _applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _INT_MAX))
    return _applied


_applied = False


def keeping_freed_memory() -> bool:
    """Whether keep_freed_memory() took effect in this process."""
    return _applied


def release_freed_memory() -> bool:
    """Hand the heap's free memory back to the OS now (glibc malloc_trim(0)); True if some was released.

    With keep_freed_memory this bounds a long-running process: call it when `rss_mb()` passes a budget. The tiny
    model through the 150-call soak above, trimming whenever RSS passed 1.5 GB: 125 s (1.30x glibc's default, vs
    1.42x untrimmed) with RSS at most 1.45 GB, below the default's 1.7 GB peak; 24 trims."""
    trim = _glibc("malloc_trim", [ctypes.c_size_t])
    return trim is not None and bool(trim(0))


def _glibc(name: str, argtypes: list):
    """glibc's function `name` (returning int), or None where the C library is not glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        fn = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = argtypes, ctypes.c_int
    return fn


def rss_mb() -> float:
    """This process's resident memory now, in MiB (Linux; elsewhere its peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
