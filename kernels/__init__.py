"""The single dispatch point for our kernels. Model code calls only `attention` and `group_norm`.

impl="auto" (the default) runs the Triton kernels on CUDA tensors and the torch reference elsewhere; the env var
BACKDROP_KERNELS=torch|triton overrides "auto" process-wide, and impl="torch"|"triton" overrides both for one
call. "auto" also falls back to torch for what the kernels do not cover (head dim > 256, float64, a crop whose
spatial dims do not collapse); an explicit impl="triton" raises a ValueError naming the problem instead.
Triton on a CPU tensor runs in Triton's interpreter and needs TRITON_INTERPRET=1 set before this package is
imported (the tests do that). This package imports nothing from backdrop.
"""
from __future__ import annotations

import contextlib
import os

import torch

from .reference import attention_ref, group_norm_ref

try:
    import triton.language as tl

    from . import attention as _attention_mod
    from . import group_norm as _group_norm_mod
except ImportError:  # Triton ships for Linux only: elsewhere "auto" always runs the torch references
    tl = _attention_mod = _group_norm_mod = None

__all__ = ["attention", "group_norm", "attention_ref", "group_norm_ref"]

IMPLS = ("auto", "torch", "triton")
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _on_device_of(x: torch.Tensor):
    """Triton launches on the current CUDA device, not on the tensors' one (a server's worker thread starts on
    cuda:0 whatever its model's device). The backward needs nothing: autograd runs it on the tensors' device."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _choose(impl: str, x: torch.Tensor, supported) -> str:
    """'torch' or 'triton' for this call; `supported()` says whether auto may pick the kernel."""
    source = "impl"
    if impl == "auto":
        impl, source = os.environ.get("BACKDROP_KERNELS") or "auto", "BACKDROP_KERNELS"
    if impl not in IMPLS:
        raise ValueError(f"{source}={impl!r}: kernel impl must be one of {', '.join(IMPLS)}")
    if impl == "auto":
        return "triton" if x.is_cuda and tl is not None and supported() else "torch"
    if impl == "triton" and tl is None:
        raise ValueError(f"{source}='triton': Triton is not installed here (it ships for Linux); use impl='torch'")
    if impl == "triton" and not x.is_cuda:
        if os.environ.get("TRITON_INTERPRET") != "1":
            instead = "unset BACKDROP_KERNELS" if source == "BACKDROP_KERNELS" else "use impl='torch'"
            raise ValueError(f"{source}='triton': Triton kernels on a {x.device.type} tensor need TRITON_INTERPRET=1 "
                             f"(set before importing backdrop); {instead} or use CUDA tensors")
        if not _interpreted():
            raise ValueError("TRITON_INTERPRET=1 was set after Triton was imported, so its kernels were set up for "
                             "the GPU; set it before the first import of triton / backdrop.kernels")
    return impl


def _interpreted() -> bool:
    """Whether Triton and our kernels were set up for the interpreter. Triton decides once per process, when a
    @triton.jit function is decorated (its own library functions at `import triton`), from TRITON_INTERPRET."""
    def interpreted(fn):
        while type(fn).__name__ != "InterpretedFunction":
            if not hasattr(fn, "fn"):  # Autotuner -> JITFunction / InterpretedFunction -> plain function
                return False
            fn = fn.fn
        return True
    return interpreted(tl.zeros) and interpreted(_attention_mod._attn_fwd) and interpreted(_group_norm_mod._gn_fwd)


def attention(q, k, v, *, causal: bool = False, scale: float | None = None, impl: str = "auto"):
    """softmax(q kᵀ · scale) v.  q (B, H, Sq, D), k/v (B, H, Sk, D) -> (B, H, Sq, D). No attention mask or dropout.

    scale defaults to 1/sqrt(D); causal is top-left aligned (query i sees keys j <= i), as in SDPA."""
    def supported():
        return (q.dtype in _KERNEL_DTYPES and q.shape[-1] <= _attention_mod.MAX_HEAD_DIM
                and all(t.stride(-1) == 1 for t in (q, k, v)) and (scale is None or scale > 0))
    if _choose(impl, q, supported) == "triton":
        with _on_device_of(q):
            return _attention_mod.attention(q, k, v, causal=causal, scale=scale)
    return attention_ref(q, k, v, causal=causal, scale=scale)


def group_norm(x, num_groups: int, weight=None, bias=None, eps: float = 1e-5, *, silu: bool = False,
               impl: str = "auto"):
    """GroupNorm over x (B, C, *spatial), optionally followed by SiLU."""
    def supported():
        return x.dtype in _KERNEL_DTYPES and _group_norm_mod._strides_bcl(x) is not None
    if _choose(impl, x, supported) == "triton":
        with _on_device_of(x):
            return _group_norm_mod.group_norm(x, num_groups, weight, bias, eps, silu=silu)
    return group_norm_ref(x, num_groups, weight, bias, eps, silu=silu)
