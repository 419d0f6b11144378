"""GroupNorm(+SiLU) (kernels/group_norm.py) against a float64 reference, forward and backward.

Without a GPU the Triton kernels run in Triton's interpreter on the CPU (TRITON_INTERPRET=1). Small `tile` /
`single_max` arguments force the split schedule (several chunks of several tiles per group) on tiny tensors.
"""
import numpy as np
import pytest
import torch

# TRITON_INTERPRET=1 (no GPU) is set by tests/conftest.py before anything imports triton.
from backdrop import kernels
from backdrop.kernels.group_norm import (
    _group_norm_bwd, _group_norm_fwd, _plan, _strides_bcl, group_norm_ref,
)
from triton_h100 import compile_for_h100  # tests/ is on sys.path (pyproject pythonpath)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Max |ours − float64 reference| / max |reference|: statistics are fp32, so 16-bit error is the output rounding.
TOL = {
    torch.float32: {"fwd": 1e-5, "bwd": 1e-4},
    torch.float16: {"fwd": 2e-3, "bwd": 4e-3},
    torch.bfloat16: {"fwd": 1.6e-2, "bwd": 3e-2},
}
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),  # ids for -k
          pytest.param(torch.bfloat16, id="bf16",
                       marks=pytest.mark.skipif(DEVICE != "cuda", reason="bf16 checked on CUDA"))]

CASES = {  # name: (shape, groups, channels_last, affine, silu, launcher overrides)
    "nchw-single": ((2, 30, 7, 9), 3, False, True, True, {}),  # C/G = 10, not a power of two; odd H×W = 63
    "cl-single": ((2, 30, 7, 9), 3, True, True, False, {}),    # channels_last, several groups per program
    "nchw-split": ((1, 6, 5, 7), 2, False, True, True, dict(tile=16, single_max=16)),  # 3 chunks of 3 tiles
    "cl-split": ((2, 20, 3, 7), 4, True, False, True, dict(tile=64, single_max=64)),  # C/G = 5, no affine
    "3d": ((3, 12, 50), 4, False, False, True, {}),            # (B, C, L) input
    "3d-split": ((1, 6, 77), 2, False, True, False, dict(tile=64, single_max=64)),    # C/G = 3, L = 77
    "one-element-groups": ((2, 8, 1, 1), 8, False, True, True, {}),  # variance 0: y = bias, dx = 0
}


def _make(shape, groups, channels_last, affine, dtype, offset=-2.3, spread=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = offset + spread * torch.randn(shape, generator=g, dtype=torch.float64)  # off-centre input
    C = shape[1]
    w = 1 + 0.3 * torch.randn(C, generator=g, dtype=torch.float64) if affine else None
    b = 0.2 * torch.randn(C, generator=g, dtype=torch.float64) if affine else None
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    x, dy = x.to(DEVICE, dtype), dy.to(DEVICE, dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w, b = (t.to(DEVICE, dtype) if t is not None else None for t in (w, b))
    return x, w, b, dy


def _reference(x, groups, w, b, dy, silu, eps=1e-5):
    x64 = x.double().requires_grad_()
    w64, b64 = (t.double().requires_grad_() if t is not None else None for t in (w, b))
    y = group_norm_ref(x64, groups, w64, b64, eps, silu=silu)
    y.backward(dy.double())
    return y.detach(), x64.grad, w64.grad if w is not None else None, b64.grad if b is not None else None


def _err(actual, expected):
    # (a floor on the scale: with one element per group dx is exactly 0 here and 1e-14 in the reference)
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-6)).item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_forward_backward_match_float64(case, dtype):
    shape, G, cl, affine, silu, kw = CASES[case]
    if dtype != torch.float32 and case in ("nchw-split", "3d-split", "one-element-groups"):
        pytest.skip("fp32 covers this schedule; the dtype only changes loads and stores")  # interpreter budget
    x, w, b, dy = _make(shape, G, cl, affine, dtype)
    # poison=True: every buffer the launchers allocate starts as NaN, so an element a kernel forgets shows up.
    y, mean, rstd = _group_norm_fwd(x, G, w, b, 1e-5, silu, poison=True, **kw)
    dx, dw, db = _group_norm_bwd(x, dy, w, b, mean, rstd, G, silu, poison=True, **kw)
    ref = _reference(x, G, w, b, dy, silu)
    tol = TOL[dtype]
    assert y.dtype == dtype and y.stride() == x.stride()  # channels_last in, channels_last out
    assert _err(y, ref[0]) < tol["fwd"], f"forward error {_err(y, ref[0]):.2e}"
    xg = x.double().reshape(shape[0], G, -1)
    assert torch.allclose(mean.double(), xg.mean(-1), rtol=1e-5, atol=1e-6)
    assert torch.allclose(rstd.double(), (xg.var(-1, unbiased=False) + 1e-5).rsqrt(), rtol=1e-4)
    for name, ours, theirs in (("dx", dx, ref[1]), ("dw", dw, ref[2]), ("db", db, ref[3])):
        if theirs is None:
            assert ours is None
            continue
        assert ours.dtype == dtype and ours.shape == theirs.shape
        assert _err(ours, theirs) < tol["bwd"], f"{name} error {_err(ours, theirs):.2e}"


def test_split_schedule_is_exercised():
    # The cases above claim to cover both schedules and several chunks; make sure the plan agrees.
    p = _plan(torch.empty(1, 6, 5, 7), 2, tile=16, single_max=16)
    assert not p["single"] and p["nch"] > 1 and p["tiles"] > 1 and p["nch"] * p["tiles"] * p["BLOCK_L"] >= 35
    assert _plan(torch.empty(2, 30, 7, 9), 3, tile=4096, single_max=16384)["single"]
    cl = torch.empty(2, 30, 7, 9).to(memory_format=torch.channels_last)
    assert _plan(cl, 3, tile=4096, single_max=16384)["BLOCK_G"] > 1  # channels_last reads several groups at once


def test_kernels_compile_for_h100():
    # As in test_kernels_attention.py: the real code generator for sm_90a, in a subprocess without the interpreter.
    # SD1.5's first GroupNorm at 512² (2, 320, 64, 64) fp16: NCHW must load 16 bytes a thread; channels_last
    # (several groups of 10 channels per program) must at least compile.
    jobs = []
    for channels_last in (False, True):
        x = torch.empty(2, 320, 64, 64, dtype=torch.float16, device="meta")
        x = x.to(memory_format=torch.channels_last) if channels_last else x
        p = _plan(x, 32, tile=4096, single_max=16384)
        sb, sc, sl = _strides_bcl(x)
        ints = dict(L=4096, G=32, CPG=10, n_gblocks=p["n_gblocks"], NCH=8, TILES=2, **{
            f"stride_{t}{d}": s for t in "xydg" for d, s in zip("bcl", (sb, sc, sl)) if t != "d"},
            stride_db=sb, stride_dc=sc, stride_dl=sl)
        blocks = dict(BLOCK_L=p["BLOCK_L"], BLOCK_G=p["BLOCK_G"], BLOCK_CPG=p["BLOCK_CPG"])
        flags = dict(HAS_W=True, HAS_B=True, SILU=True)
        split = dict(blocks, **flags, SINGLE=False, BLOCK_NCH=8)
        jobs += [["_gn_stats", "fp16", blocks, ints, 8, 2], ["_gn_fwd", "fp16", split, ints, 8, 2],
                 ["_gn_bwd_stats", "fp16", dict(blocks, **flags), ints, 8, 2], ["_gn_bwd", "fp16", split, ints, 8, 2]]
    out = compile_for_h100("backdrop.kernels.group_norm", jobs)
    assert len(out) == len(jobs)
    assert all(vec4 for _, _, _, _, vec4 in out[:4]), out[:4]  # NCHW: every kernel's loads are 16-byte vectors


@pytest.mark.parametrize("schedule", [{}, dict(tile=128, single_max=128)])
def test_statistics_survive_a_large_offset(schedule):
    # 300 ± 0.1 in fp32: E[x²] − E[x]² loses ~half the digits of the variance here; Welford/two-pass does not.
    x, w, b, dy = _make((2, 8, 9, 11), 2, False, True, torch.float32, offset=300.0, spread=0.1)
    y, mean, rstd = _group_norm_fwd(x, 2, w, b, 1e-5, True, **schedule)
    dx, dw, db = _group_norm_bwd(x, dy, w, b, mean, rstd, 2, True, **schedule)
    ref = _reference(x, 2, w, b, dy, True)
    assert _err(y, ref[0]) < 2e-3 and _err(dx, ref[1]) < 2e-3 and _err(dw, ref[2]) < 2e-3


def test_autograd_through_dispatch_channels_last():
    x, w, b, dy = _make((2, 12, 5, 6), 4, True, True, torch.float32)
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    y = kernels.group_norm(x, 4, w, b, eps=1e-6, silu=True, impl="triton")
    assert type(y.grad_fn).__name__ == "_GroupNormBackward"
    assert y.is_contiguous(memory_format=torch.channels_last)
    y.backward(dy)
    ref = _reference(x.detach(), 4, w.detach(), b.detach(), dy, True, eps=1e-6)
    assert _err(y.detach(), ref[0]) < TOL[torch.float32]["fwd"]
    for t, r in zip((x, w, b), ref[1:]):
        assert _err(t.grad, r) < TOL[torch.float32]["bwd"]


def test_double_backward_is_right_and_numpy_groups_are_taken():
    """A gradient penalty through group_norm (create_graph=True, a loss linear in the output): the second order
    runs F.group_norm's, which once_differentiable used to drop silently. num_groups may be a numpy int."""
    def penalty(impl, x, w, groups):
        x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
        y = kernels.group_norm(x, groups, w, None, silu=True, impl=impl)
        weights = torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=y.device).view(y.shape)
        gx, gw = torch.autograd.grad((y * weights).sum(), (x, w), create_graph=True)
        (gx.square().sum() + gw.square().sum() + x.sum()).backward()
        return x.grad, w.grad
    x, w, _, _ = _make((2, 6, 3, 4), 3, False, True, torch.float32)
    ours = penalty("triton", x, w, np.int64(3))
    ref = penalty("torch", x.double(), w.double(), 3)
    for a, r in zip(ours, ref):
        assert _err(a, r) < TOL[torch.float32]["bwd"]
    assert (ours[0] - 1).abs().max() > 0.1  # not only the x.sum() term


@pytest.mark.parametrize("make, match", [
    (lambda: (torch.randn(2, 30, 4, 4), 4, None, None, 1e-5), "num_groups=4 must be a positive divisor of the C=30"),
    (lambda: (torch.randn(2, 30, 4, 4), 3, torch.ones(29), None, 1e-5), r"weight has shape \(29,\), expected \(30,\)"),
    (lambda: (torch.randn(2, 30, 4, 4), 3, None, torch.ones(30, dtype=torch.int64), 1e-5), "bias is torch.int64"),
    (lambda: (torch.randn(2, 30, 4, 4).double(), 3, None, None, 1e-5), "dtype torch.float64"),
    (lambda: (torch.randn(30), 3, None, None, 1e-5), r"must be a \(B, C, \*spatial\) tensor"),
    # the crop on the device: copying a non-dense tensor to another device makes it contiguous
    (lambda: (torch.randn(2, 30, 6, 6, device=DEVICE)[..., 1:-1, 1:-1], 3, None, None, 1e-5),
     "do not collapse into one"),
    (lambda: (torch.randn(2, 30, 4, 4), 3, None, None, -1.0), "eps must be"),
])
def test_launcher_rejects_what_it_cannot_do(make, match):
    x, G, w, b, eps = make()
    with pytest.raises(ValueError, match=match):
        _group_norm_fwd(x.to(DEVICE), G, w if w is None else w.to(DEVICE), b if b is None else b.to(DEVICE), eps)


def test_dispatch_env_and_impl(monkeypatch):
    x, w, b, _ = _make((2, 6, 3, 5), 3, False, True, torch.float32)
    x.requires_grad_()
    name = lambda out: type(out.grad_fn).__name__  # noqa: E731  (which implementation built this output)
    ours = kernels.group_norm(x, 3, w, b, silu=True, impl="triton")
    theirs = kernels.group_norm(x, 3, w, b, silu=True, impl="torch")
    assert name(ours) == "_GroupNormBackward" and name(theirs) != name(ours)
    assert _err(ours.detach(), theirs.detach().double()) < TOL[torch.float32]["fwd"]  # switching impl is harmless
    monkeypatch.delenv("BACKDROP_KERNELS", raising=False)
    auto = name(theirs) if DEVICE == "cpu" else name(ours)  # auto: the kernels on CUDA only
    assert name(kernels.group_norm(x, 3, w, b, silu=True)) == auto
    monkeypatch.setenv("BACKDROP_KERNELS", "triton")
    assert name(kernels.group_norm(x, 3, w, b, silu=True)) == name(ours)
    assert name(kernels.group_norm(x, 3, w, b, silu=True, impl="torch")) == name(theirs)  # impl= beats the env
    crop = torch.randn(2, 6, 7, 7, device=DEVICE)[..., 1:-1, 1:-1].requires_grad_()
    with pytest.raises(ValueError, match="do not collapse"):  # an explicit triton request is never downgraded
        kernels.group_norm(crop, 3)
    monkeypatch.setenv("BACKDROP_KERNELS", "torch")
    assert name(kernels.group_norm(x, 3, w, b, silu=True)) == name(theirs)
    monkeypatch.setenv("BACKDROP_KERNELS", "Triton")
    with pytest.raises(ValueError, match="BACKDROP_KERNELS='Triton'"):
        kernels.group_norm(x, 3, w, b)


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU tensors only")
def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        kernels.group_norm(torch.randn(2, 4, 3, 3), 2, impl="triton")
