"""Flash attention (kernels/attention.py, attention_kernels.py) against a float64 reference, forward and backward.

Without a GPU the Triton kernels run in Triton's interpreter on the CPU (TRITON_INTERPRET=1), so the shapes are
small, but the head dims are SD's real ones and every block boundary, diagonal and ragged tail is crossed: the
interpreter runs 64x32 query/key blocks (see attention_kernels._INTERPRET).
"""
import os
import sys

import pytest
import torch

# TRITON_INTERPRET=1 (no GPU) is set by tests/conftest.py before anything imports triton.
from backdrop import kernels
from backdrop.kernels.attention import _attention_bwd, _attention_fwd, _row_align
from backdrop.kernels.reference import attention_ref
from backdrop.kernels.attention_kernels import _attn_bwd_dkdv, _attn_bwd_dq, _attn_fwd, _head_dim_split, _prune
from triton_h100 import compile_for_h100  # tests/ is on sys.path (pyproject pythonpath)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Max |ours − float64 reference| / max |reference|. fp16/bf16 follow FlashAttention: P is rounded to the input
# dtype before P·V (and dS before dS·K), so the error is a few units of that dtype's epsilon.
TOL = {
    torch.float32: {"fwd": 2e-5, "bwd": 1e-4},
    torch.float16: {"fwd": 4e-3, "bwd": 1e-2},
    torch.bfloat16: {"fwd": 3e-2, "bwd": 1.2e-1},  # dq: emulating these roundings in float64 gives up to 6e-2
}
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),  # ids for -k
          pytest.param(torch.bfloat16, id="bf16",
                       marks=pytest.mark.skipif(DEVICE != "cuda", reason="bf16 dots need CUDA"))]


def _inputs(B, H, Sq, Sk, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Off-centre (-2.3 + 0.5 randn): a kernel that forgets the running max or a mask term is visibly wrong.
    q, k, v = (-2.3 + 0.5 * torch.randn(B, H, S, D, generator=g, dtype=torch.float64) for S in (Sq, Sk, Sk))
    do = torch.randn(B, H, Sq, D, generator=g, dtype=torch.float64)
    return [t.to(DEVICE, dtype) for t in (q, k, v, do)]


def _reference(q, k, v, do, causal, scale=None):
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    o = attention_ref(q64, k64, v64, causal=causal, scale=scale)
    o.backward(do.double())
    return o.detach(), q64.grad, k64.grad, v64.grad


def _err(actual, expected):
    return ((actual.double() - expected).abs().max() / expected.abs().max()).item()


CASES = {  # name: (B, H, Sq, Sk, D, causal)
    "d40-self": (1, 2, 100, 100, 40, False),    # head_dim 40: SD1.5 level 1, split 32 + 8; 100 = no block multiple
    "d40-cross77": (2, 1, 100, 77, 40, False),  # 77 keys: the CLIP context of cross-attention
    "d80-cross77": (1, 2, 65, 77, 80, False),   # head_dim 80: SD1.5 level 2, split 64 + 16
    "d160-self": (2, 1, 33, 33, 160, False),    # head_dim 160: SD1.5 level 3, split 128 + 32
    "d64-cross77": (1, 2, 130, 77, 64, False),  # head_dim 64: SD2 and CLIP, one chunk
    "d64-causal77": (1, 2, 77, 77, 64, True),   # causal over 77 tokens: the CLIP text encoder
    "d40-causal": (1, 2, 100, 100, 40, True),   # causal with the split head dim: diagonal blocks + ragged tail
    "d64-causal-wide": (1, 2, 33, 70, 64, True),  # Sq < Sk, top-left aligned like SDPA's is_causal
    "d8-small": (2, 1, 40, 50, 8, False),       # head_dim < 16: one padded, masked chunk
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_forward_backward_match_float64(case, dtype):
    B, H, Sq, Sk, D, causal = CASES[case]
    if dtype != torch.float32 and case in ("d8-small", "d64-causal-wide", "d40-self"):
        pytest.skip("fp32 covers this shape; 16-bit runs the SD shapes")  # keeps the interpreter under budget
    q, k, v, do = _inputs(B, H, Sq, Sk, D, dtype)
    # poison=True: every buffer the launchers allocate starts as NaN, so an element a kernel forgets shows up.
    o, lse, o32 = _attention_fwd(q, k, v, causal=causal, keep_fp32=True, poison=True)
    dq, dk, dv = _attention_bwd(q, k, v, o32, lse, do, causal=causal, poison=True)
    ref = _reference(q, k, v, do, causal)
    tol = TOL[dtype]
    assert o.dtype == dtype and o.shape == q.shape
    assert _err(o, ref[0]) < tol["fwd"], f"forward error {_err(o, ref[0]):.2e}"
    # before the output's rounding: fp32 accumulation, plus P rounded to the input dtype for P·V (an exact emulation
    # gives 0.8-1.4e-4 in fp16, 5.9-9.9e-4 in bf16 on these shapes)
    assert _err(o32, ref[0]) < {torch.bfloat16: 3e-3}.get(dtype, TOL[torch.float32]["fwd"] * 20)
    for name, ours, theirs in zip(("dq", "dk", "dv"), (dq, dk, dv), ref[1:]):
        assert ours.dtype == dtype and ours.shape == theirs.shape
        assert _err(ours, theirs) < tol["bwd"], f"{name} error {_err(ours, theirs):.2e}"
    # The saved log-sum-exp (base 2) is what the backward trusts: check it too.
    s = (q.double() @ k.double().transpose(-1, -2)) * D ** -0.5
    if causal:
        s = s.masked_fill(torch.ones(Sq, Sk, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    assert torch.allclose(lse.double(), torch.logsumexp(s, -1) / torch.log(torch.tensor(2.0)), atol=1e-3, rtol=1e-4)


def test_head_dim_split_wastes_little():
    # 40 = 32 + 8 for P·V (the output dim may be 8) but 32 + 16 where D is reduced over (tensor cores need k >= 16).
    assert _head_dim_split(40) == (32, 16, 8)
    assert _head_dim_split(80) == (64, 16, 16)
    assert _head_dim_split(160) == (128, 32, 32)
    assert _head_dim_split(64) == (64, 0, 0)
    for d in range(16, 257):
        d0, dk1, dv1 = _head_dim_split(d)
        assert d0 + dv1 >= d and d0 + dk1 >= d and dk1 in (0,) + tuple(2 ** i for i in range(4, 8))
        assert (d0 + dk1) / d < 1.5 or d < 32, f"D={d} pads to {d0 + dk1}"


def test_the_alignment_hint_divides_every_row_stride():
    """tl.multiple_of is a no-op in the interpreter: a hint larger than a stride allows would load misaligned
    vectors on a GPU and nothing here would see it, so the hint itself is checked."""
    assert _row_align(torch.empty(2, 3, 5, 40)) == 8  # strides 600, 200, 40
    assert _row_align(torch.empty(2, 5, 3, 64).transpose(1, 2)) == 16  # (B, S, H, D) viewed as (B, H, S, D)
    assert _row_align(torch.empty(1, 1, 7, 77)[..., :40]) == 1  # a slice keeps the parent's stride 77
    assert _row_align(torch.empty(1, 2, 4, 64), torch.empty(1, 2, 4, 80)[..., 8:72]) == 16


def test_autograd_through_dispatch_keeps_layout_and_scale():
    # q, k, v as the UNet makes them: views of (B, S, H, D) projections, transposed to (B, H, S, D).
    B, S, H, D = 2, 70, 2, 40
    g = torch.Generator().manual_seed(1)
    x = [(-2.3 + 0.5 * torch.randn(B, S, H, D, generator=g)).to(DEVICE).requires_grad_() for _ in range(3)]
    q, k, v = (t.transpose(1, 2) for t in x)
    out = kernels.attention(q, k, v, scale=0.3, impl="triton")
    assert type(out.grad_fn).__name__ == "_FlashAttentionBackward"
    assert out.stride() == q.stride()  # (B, S, H, D) memory: folding the heads back is a free view
    do = torch.randn(B, H, S, D, generator=g).to(DEVICE)
    out.backward(do)
    ref = _reference(q.detach(), k.detach(), v.detach(), do, causal=False, scale=0.3)
    assert _err(out.detach(), ref[0]) < TOL[torch.float32]["fwd"]
    for t, r in zip(x, ref[1:]):
        assert _err(t.grad.transpose(1, 2), r) < TOL[torch.float32]["bwd"]


def test_kernels_compile_for_h100():
    # The interpreter accepts things the GPU compiler does not (dots with k < 16, scoping across static ifs); this
    # catches them, and checks the hot loops really run on wgmma tensor cores fed by cp.async pipelining (which
    # needs the ALIGN hint for D = 40's 80-byte rows).
    d0, dk1, dv1 = _head_dim_split(40)  # head_dim 40: both chunks, the 8-wide P·V, causal masks
    base = dict(HEAD_DIM=40, BLOCK_D0=d0, BLOCK_DK1=dk1, CAUSAL=True, PRECISION="tf32", ALIGN=8)
    jobs = [["_attn_fwd", "fp16", dict(base, BLOCK_DV1=dv1, STORE_O32=True, BLOCK_M=128, BLOCK_N=64), {}, 8, 3],
            ["_attn_bwd_dkdv", "fp16", dict(base, BLOCK_M=32, BLOCK_N=128), {}, 8, 3],
            ["_attn_bwd_dq", "fp16", dict(base, BLOCK_M=128, BLOCK_N=32), {}, 8, 3],
            ["_attn_fwd", "bf16", dict(base, HEAD_DIM=64, BLOCK_D0=64, BLOCK_DK1=0, BLOCK_DV1=0, CAUSAL=False,
                                       STORE_O32=False, BLOCK_M=128, BLOCK_N=128), {}, 8, 3]]  # SD2: one chunk
    for name, smem, wgmma, cp_async, _ in compile_for_h100("backdrop.kernels.attention_kernels", jobs):
        assert wgmma and cp_async and smem <= 220 * 1024, name


def test_fp32_at_head_dim_160_keeps_only_configs_that_fit_an_h100(monkeypatch):
    # SD1.5's deepest attention in an fp32 UNet (or fp32 training): tf32x3's backward keeps a second copy of its
    # resident tiles, and every regular candidate needs 278-311 KB of shared memory, past the 232,448 B an H100
    # block may use, so the launch would fail. The pruner must fall back to configs that fit. (Once, offline, all
    # 102 configs it keeps for head dims 40/64/80/160 x fp32/fp16 were compiled so: the largest took 221,696 B.)
    # the configs a GPU would keep, not the interpreter's one
    monkeypatch.setattr(sys.modules["backdrop.kernels.attention_kernels"], "_interpreting", lambda: False)
    d0, dk1, dv1 = _head_dim_split(160)
    base = dict(HEAD_DIM=160, BLOCK_D0=d0, BLOCK_DK1=dk1, CAUSAL=False, PRECISION="tf32x3", ALIGN=16)
    jobs = []
    for kernel, fn in (("fwd", _attn_fwd), ("dkdv", _attn_bwd_dkdv), ("dq", _attn_bwd_dq)):
        kept = _prune(kernel)(fn.configs, dict(BLOCK_D0=d0, BLOCK_DK1=dk1, Q=torch.empty(0)))
        assert kept and len(kept) < len(fn.configs), kernel
        for c in kept:
            extra = dict(BLOCK_DV1=dv1, STORE_O32=True) if kernel == "fwd" else {}
            jobs.append([fn.fn.__name__, "fp32", dict(base, **c.kwargs, **extra), {}, c.num_warps, c.num_stages])
    for name, smem, *_ in compile_for_h100("backdrop.kernels.attention_kernels", jobs):
        assert smem <= 232_448, (name, smem)


def _qkv(B=1, H=2, Sq=8, Sk=8, D=16, dtype=torch.float32):
    return [torch.randn(B, H, S, D, dtype=dtype, device=DEVICE) for S in (Sq, Sk, Sk)]


@pytest.mark.parametrize("bad, match", [
    (lambda q, k, v: (q, k, v[..., :-1, :]), "k and v lengths differ"),
    (lambda q, k, v: (q, k[:, :1], v[:, :1]), "batch and heads must match"),
    (lambda q, k, v: (q[0], k[0], v[0]), "must be 4-D"),
    (lambda q, k, v: (q.double(), k.double(), v.double()), "dtype torch.float64"),
    (lambda q, k, v: (q, k.half(), v), "share a dtype"),
    (lambda q, k, v: (q, k[..., :8], v[..., :8]), "head dims differ"),
    (lambda q, k, v: (q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2)), "needs unit stride"),
    (lambda q, k, v: (q, k[:, :, :0], v[:, :, :0]), "no keys"),
    (lambda q, k, v: tuple(torch.zeros(1, 2, 4, 264, device=DEVICE) for _ in range(3)), "D=264"),
])
def test_launcher_rejects_what_it_cannot_do(bad, match):
    q, k, v = bad(*_qkv())
    with pytest.raises(ValueError, match=match):
        _attention_fwd(q, k, v)


@pytest.mark.parametrize("scale", [0.0, -0.125])
def test_a_scale_the_kernels_cannot_take_is_refused_or_runs_in_torch(scale):
    """The kernels mask and take each row's running maximum before scaling, which needs scale > 0: explicit triton
    refuses it, auto runs torch (whose result it then is), rather than NaN where a block is masked."""
    q, k, v = _qkv(Sq=20, Sk=13)
    with pytest.raises(ValueError, match="scale must be a positive"):
        kernels.attention(q, k, v, scale=scale, impl="triton")
    out = kernels.attention(q, k, v, scale=scale, impl="auto")  # 13 keys: a masked tail in a 32-key block
    assert torch.equal(out, kernels.attention_ref(q, k, v, scale=scale)) and out.isfinite().all()


def test_options_are_keywords_so_an_sdpa_mask_is_not_read_as_causal():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="positional"):
        kernels.attention(q, k, v, torch.zeros(1, 1, 1, 1), impl="triton")  # SDPA's attn_mask position


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter's limit")
def test_bf16_in_the_interpreter_is_refused():
    """Triton's interpreter multiplies bf16 bit patterns in tl.dot (triton#11584): an error, not garbage."""
    with pytest.raises(ValueError, match="bfloat16 needs CUDA"):
        kernels.attention(*_qkv(dtype=torch.bfloat16), impl="triton")


@pytest.mark.parametrize("causal", [False, True])
def test_double_backward_is_right(causal):
    """A gradient penalty (create_graph=True) differentiates the backward again; with a loss linear in the output
    the incoming gradient carries no graph, which once_differentiable let through as a silent zero. The second
    order now runs the math reference; its result is the float64 math one's."""
    def penalty(fn, x):
        x = x.detach().requires_grad_()
        q, k, v = x[:, :, :6], x[:, :, 6:], 0.5 * x[:, :, 6:] + 1
        w = torch.linspace(-1, 1, q.numel(), dtype=x.dtype, device=x.device).view(q.shape)
        g, = torch.autograd.grad((fn(q, k, v, causal=causal, scale=0.4) * w).sum(), x, create_graph=True)
        (g.square().sum() + x.sum()).backward()
        return x.grad
    x = torch.randn(1, 2, 15, 16, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(3))
    ours = penalty(lambda *a, **kw: kernels.attention(*a, **kw, impl="triton"), x)
    ref = penalty(kernels.reference.attention_math, x.double())
    assert _err(ours, ref) < TOL[torch.float32]["bwd"] and (ours - 1).abs().max() > 0.1  # not only the x.sum() term
    q, k, v = (torch.randn(1, 2, 5, 8, dtype=torch.float64) for _ in range(3))  # the UNet's calls give no scale:
    torch.testing.assert_close(kernels.reference.attention_math(q, k, v, causal=causal),  # the default is D^-0.5
                               kernels.reference.attention_ref(q, k, v, causal=causal))


def test_dispatch_env_and_impl(monkeypatch):
    q, k, v = (t.requires_grad_() for t in _qkv(Sq=20, Sk=12))
    name = lambda out: type(out.grad_fn).__name__  # noqa: E731  (which implementation built this output)
    ours = kernels.attention(q, k, v, impl="triton")
    theirs = kernels.attention(q, k, v, impl="torch")
    assert name(ours) == "_FlashAttentionBackward" and name(theirs) != name(ours)
    assert _err(ours.detach(), theirs.detach().double()) < TOL[torch.float32]["fwd"]  # switching impl is harmless
    monkeypatch.delenv("BACKDROP_KERNELS", raising=False)
    auto = name(theirs) if DEVICE == "cpu" else name(ours)  # auto: the kernels on CUDA only
    assert name(kernels.attention(q, k, v)) == auto
    monkeypatch.setenv("BACKDROP_KERNELS", "triton")
    assert name(kernels.attention(q, k, v)) == name(ours)
    assert name(kernels.attention(q, k, v, impl="torch")) == name(theirs)  # impl= beats the env var
    monkeypatch.setenv("BACKDROP_KERNELS", "torch")
    assert name(kernels.attention(q, k, v)) == name(theirs)
    if DEVICE == "cpu":  # the variable a model user set, named with what to do
        monkeypatch.setenv("BACKDROP_KERNELS", "triton")
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(ValueError, match="BACKDROP_KERNELS='triton'.*unset BACKDROP_KERNELS"):
            kernels.attention(q, k, v)
    monkeypatch.setenv("BACKDROP_KERNELS", "cuda")
    with pytest.raises(ValueError, match="BACKDROP_KERNELS='cuda'"):
        kernels.attention(q, k, v)
    with pytest.raises(ValueError, match="impl='fast'"):
        kernels.attention(q, k, v, impl="fast")


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU tensors only")
def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        kernels.attention(*_qkv(), impl="triton")


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter's path")
def test_every_autotuned_kernel_is_untimed_in_the_interpreter():
    """The interpreter can time nothing. Triton 3.6 (the GPU machine's image) still times a single pruned config,
    so each autotuned kernel must carry kernels/autotune.py's bench, which returns without running the kernel."""
    modules = [sys.modules[f"backdrop.kernels.{name}"] for name in ("attention_kernels", "group_norm")]
    tuned = [k for m in modules for k in vars(m).values() if hasattr(k, "prune_configs")]
    assert len(tuned) == 7, [k.fn.__name__ for k in tuned]  # 3 attention kernels, 4 GroupNorm kernels
    for k in tuned:
        assert k.do_bench(lambda: pytest.fail(f"{k.fn.__name__} was timed"), quantiles=(0.5, 0.2, 0.8)) == [0.0] * 3


def test_without_triton_everything_runs_the_torch_reference():
    """Triton ships for Linux only: without it the package still imports, "auto" runs the references and an
    explicit impl="triton" says why it cannot (a fresh process in which `import triton` fails)."""
    code = """
import sys
sys.modules["triton"] = None  # makes `import triton` raise ImportError
import torch
from backdrop import kernels
from backdrop.nn.checkpoint import init_model
q = torch.randn(1, 2, 5, 8)
assert torch.equal(kernels.attention(q, q, q), kernels.attention_ref(q, q, q))
x = torch.randn(2, 8, 3, 3)
assert torch.equal(kernels.group_norm(x, 4, silu=True), kernels.group_norm_ref(x, 4, silu=True))
try:
    kernels.attention(q, q, q, impl="triton")
    raise SystemExit("no error")
except ValueError as e:
    assert "Triton is not installed" in str(e), e
m = init_model("tiny")
m.unet(torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 77, m.config.unet.cross_attention_dim))
print("ok")
"""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
