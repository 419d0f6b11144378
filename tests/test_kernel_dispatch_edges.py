"""Mutation-testing gaps in kernels/__init__.py and kernels/attention.py's launcher checks. impl="auto" only
considers the kernels for CUDA tensors; without a GPU, tensors that report is_cuda (a Tensor subclass, still on the
CPU) reach the "does the kernel cover this?" decision, whose answer must be the torch
reference for what the kernels cannot do. On a GPU machine the same tests run with real CUDA tensors."""
import pytest
import torch

# TRITON_INTERPRET=1 (no GPU) is set by tests/conftest.py before anything imports triton.
from backdrop import kernels
from backdrop.kernels.attention_kernels import MAX_HEAD_DIM
from backdrop.kernels.reference import attention_ref, group_norm_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class _ClaimsCuda(torch.Tensor):
    """A CPU tensor that says it is on CUDA: "auto" then asks whether the kernels cover the call. Were the kernels
    picked, launching them would fail here (torch.cuda.device(cpu) / their checks); the reference runs fine."""

    @property
    def is_cuda(self):
        return True


def _cuda(t: torch.Tensor) -> torch.Tensor:
    return t.cuda() if DEVICE == "cuda" else t.as_subclass(_ClaimsCuda)


@pytest.fixture(autouse=True)
def _auto(monkeypatch):
    monkeypatch.delenv("BACKDROP_KERNELS", raising=False)


def test_auto_runs_the_reference_for_head_dims_past_the_kernels():
    """(K05)"""
    q, k, v = (_cuda(torch.randn(1, 1, 4, MAX_HEAD_DIM + 8)) for _ in range(3))
    torch.testing.assert_close(torch.Tensor(kernels.attention(q, k, v)).cpu(),
                               attention_ref(*(torch.Tensor(t).cpu() for t in (q, k, v))))


def test_auto_runs_the_reference_for_a_non_positive_scale():
    """A scale <= 0 (the kernels take each row's running max before scaling) goes to the reference. (K06)"""
    q, k, v = (_cuda(torch.randn(1, 1, 4, 16)) for _ in range(3))
    for scale in (0.0, -0.5):
        got = torch.Tensor(kernels.attention(q, k, v, scale=scale)).cpu()
        torch.testing.assert_close(got, attention_ref(*(torch.Tensor(t).cpu() for t in (q, k, v)), scale=scale))


def test_auto_runs_the_reference_for_a_crop_that_does_not_collapse():
    """x[..., 1:-1, 1:-1] has spatial strides the kernels cannot walk as one L: the reference instead. (K07)"""
    x = _cuda(torch.randn(2, 4, 8, 8))[..., 1:-1, 1:-1]
    got = torch.Tensor(kernels.group_norm(x, 2)).cpu()
    torch.testing.assert_close(got, group_norm_ref(torch.Tensor(x).cpu(), 2))


def test_the_kernels_take_head_dim_256():
    """The largest head dim the launcher admits runs (MAX_HEAD_DIM inclusive). (A04)"""
    assert MAX_HEAD_DIM == 256
    q, k, v = (torch.randn(1, 1, 2, 256, device=DEVICE) for _ in range(3))
    torch.testing.assert_close(kernels.attention(q, k, v, impl="triton"), attention_ref(q, k, v),
                               atol=1e-4, rtol=1e-4)


def test_the_gradient_of_a_sum_is_read_right():
    """out.sum().backward() hands the backward an expanded gradient (stride 0 along D): made contiguous, the
    kernels' gradients equal the reference's. (A07)"""
    q, k, v = (torch.randn(1, 2, 8, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    kernels.attention(q, k, v, impl="triton").sum().backward()
    ours = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    attention_ref(q, k, v).sum().backward()
    for a, b in zip(ours, (q.grad, k.grad, v.grad)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_no_queries_give_zero_key_and_value_gradients():
    """Sq == 0: no query looks at any key, so dk and dv are 0 (poisoned buffers show any left unwritten). (A08)"""
    from backdrop.kernels.attention import _attention_bwd, _attention_fwd

    q, k, v = torch.randn(1, 2, 0, 16, device=DEVICE), *(torch.randn(1, 2, 5, 16, device=DEVICE) for _ in range(2))
    o, lse, o32 = _attention_fwd(q, k, v, keep_fp32=True, poison=True)
    dq, dk, dv = _attention_bwd(q, k, v, o32, lse, torch.zeros_like(q), poison=True)
    assert dq.shape == q.shape and dk.eq(0).all() and dv.eq(0).all()


def test_group_norm_takes_a_size_one_spatial_dim_of_any_stride():
    """x[..., :1] (W = 1 sliced off a wider tensor: its stride is not H's) still collapses to (B, C, L). (G05)"""
    x = torch.randn(2, 4, 8, 8, device=DEVICE)[..., :1]
    torch.testing.assert_close(kernels.group_norm(x, 2, impl="triton"), group_norm_ref(x, 2), atol=1e-5, rtol=1e-5)


def test_group_norm_backward_takes_a_gradient_that_does_not_collapse():
    """A gradient whose spatial dims do not collapse (a crop of a larger one) is made contiguous. (G06)"""
    from backdrop.kernels.group_norm import _group_norm_bwd, _group_norm_fwd

    x = torch.randn(2, 4, 6, 6, device=DEVICE)
    dy = torch.randn(2, 4, 8, 8, device=DEVICE)[..., 1:-1, 1:-1]
    y, mean, rstd = _group_norm_fwd(x, 2, None, None, 1e-5)
    got = _group_norm_bwd(x, dy, None, None, mean, rstd, 2)[0]
    torch.testing.assert_close(got, _group_norm_bwd(x, dy.contiguous(), None, None, mean, rstd, 2)[0])


def test_group_norm_of_nothing_has_zero_parameter_gradients():
    """An empty input (L = 0): dweight and dbias are 0, not the poisoned (uninitialised) buffer. (G08)"""
    from backdrop.kernels.group_norm import _group_norm_bwd, _group_norm_fwd

    x, w, b = torch.randn(2, 4, 0, device=DEVICE), torch.ones(4, device=DEVICE), torch.zeros(4, device=DEVICE)
    y, mean, rstd = _group_norm_fwd(x, 2, w, b, 1e-5, poison=True)
    dx, dw, db = _group_norm_bwd(x, torch.zeros_like(x), w, b, mean, rstd, 2, poison=True)
    assert dx.shape == x.shape and dw.eq(0).all() and db.eq(0).all()


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU tensors only")
def test_the_launchers_refuse_cpu_tensors_outside_the_interpreter(monkeypatch):
    """Called directly (not through the dispatch), the kernels name the problem for a CPU tensor when Triton is not
    interpreting. (G09)"""
    import importlib

    import triton

    A, G = (importlib.import_module(f"backdrop.kernels.{m}") for m in ("attention", "group_norm"))

    monkeypatch.setattr(triton.knobs.runtime, "interpret", False)
    with pytest.raises(ValueError, match=r"group_norm: x is on cpu; the Triton kernels need CUDA tensors"):
        G.group_norm(torch.randn(1, 4, 3), 2)
    with pytest.raises(ValueError, match=r"attention: q is on cpu; the Triton kernels need CUDA tensors"):
        A.attention(*(torch.randn(1, 1, 2, 8) for _ in range(3)))
