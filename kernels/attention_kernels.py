"""Flash attention in Triton: the device side — the @triton.jit kernels, forward and backward, and how they are
tiled and autotuned. The launchers, checks and autograd Function are in attention.py, the torch reference in
reference.py.

Algorithm: FlashAttention-2 (Dao 2023, arXiv:2307.08691), the layout of Triton's tutorial 06 "Fused Attention".
The forward streams key/value blocks through an online softmax (running max `m_i`, running sum `l_i`) in base 2
(exp2 with log2(e) folded into the scale) and saves the per-row log-sum-exp; the backward recomputes P from it and
runs two kernels: one program per key block accumulates dK/dV over the query blocks, one program per query block
accumulates dQ over the key blocks (no atomics, so autotuning may rerun any kernel safely).

Head dims. SD1.5 has D = 40/80/160, SD2 has 64. A power-of-two tile (tl.arange needs one) would pad 40 to 64 and
waste 37% of the work. We split D into two power-of-two chunks instead, D0 = the largest power of two <= D plus a
rest chunk, and run every matmul as two dots, `q0 @ k0ᵀ + q1 @ k1ᵀ`:
  D=40 -> 32 + 8, D=80 -> 64 + 16, D=160 -> 128 + 32, D=64 -> 64 (no rest chunk).
Tensor cores need the *reduction* dim of an fp16/bf16 dot to be >= 16 (mma k16; triton's min_dot_size), so where
D is the reduction dim (q kᵀ, dO vᵀ) the rest chunk is padded to 16: D=40 reduces over 48 lanes, not 64. Where D is
the output dim (P v in the forward) the rest chunk is exact: 8 lanes for D=40. The backward keeps one width (48).

Causal masking is top-left aligned, like F.scaled_dot_product_attention(is_causal=True): query i sees keys j <= i.
Each program splits its loop into blocks that need no mask (no bounds or causal test in the hot loop) and the few
diagonal/tail blocks that do (the MASK constexpr). Accumulation is fp32; fp32 inputs use 3xTF32 dots (~fp32
accuracy on tensor cores), fp16/bf16 inputs the plain tensor-core path. For training the forward also keeps O in
fp32 for the backward's Δ = rowsum(dO ∘ O) (see _FlashAttention for why).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .autotune import autotune
from .autotune import interpreting as _interpreting  # patched by the tests

LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e)); exp2 is the native instruction
MAX_HEAD_DIM = 256  # at most 256 lanes of q, k, v per row; beyond that the tiles no longer fit on chip


def _head_dim_split(d: int) -> tuple[int, int, int]:
    """(BLOCK_D0, BLOCK_DK1, BLOCK_DV1): main chunk, rest chunk as a reduction dim (>= 16) and as an output dim."""
    d0 = max(16, 1 << (d.bit_length() - 1))  # largest power of two <= d (at least 16, masked when d < 16)
    rest = d - d0
    if rest <= 0:
        return d0, 0, 0
    p2 = triton.next_power_of_2(rest)
    return d0, max(16, p2), max(8, p2)


def _configs(*mnws):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in mnws]


# H100 candidates (BLOCK_M, BLOCK_N, warps, stages). 128x64 tiles with 8 warps and 3 stages is where FA2-style
# Triton kernels peak on sm_90 (tutorial 06); 64-row tiles keep the short SD sequences (S=64..256 at the deep
# levels) spread over 132 SMs; the backward streams 32/64-row blocks past 128 resident rows like tutorial 06.
# Checked offline by compiling for sm_90a with ptxas -v: all use wgmma and cp.async pipelining; the pruning below
# drops the ones that spill registers or overflow shared memory at a given head dim.
_FWD_CONFIGS = _configs((128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (64, 64, 4, 4),
                        (64, 128, 8, 3))
_DKDV_CONFIGS = _configs((32, 128, 8, 3), (64, 128, 8, 3), (32, 128, 4, 3), (32, 64, 4, 3), (64, 64, 8, 3))
_DQ_CONFIGS = _configs((128, 32, 8, 3), (128, 64, 8, 3), (128, 32, 4, 3), (64, 32, 4, 3), (64, 64, 8, 3))
# Used only when none of the above fits: fp32 inputs at head dim 160 (SD1.5's deepest attention). Compiled for
# sm_90a: fwd (64, 32, 4, 3) 196,608 B, dkdv (16, 64, 4, 2) 200,832 B, dq (64, 16, 4, 2) 200,704 B of the
# 232,448 an H100 block may use; every candidate above needs 278-311 KB there. The second of each pair is smaller
# still (a fraction of the speed: no wgmma at 32x32), the last resort.
_FALLBACK = {"fwd": _configs((64, 32, 4, 3), (64, 32, 4, 2)), "dkdv": _configs((16, 64, 4, 2), (32, 32, 4, 2)),
             "dq": _configs((64, 16, 4, 2), (32, 32, 4, 2))}
# Under TRITON_INTERPRET=1 autotuning cannot time anything; the blocks are small enough that the CPU tests cross
# block boundaries, diagonals and ragged tails with tiny tensors.
_INTERPRET = {"fwd": (64, 32), "dkdv": (32, 64), "dq": (64, 32)}
_SMEM_BUDGET = 220 * 1024  # an H100 block may use 227 KB of shared memory
_KEY = ["SQ_KEY", "SK_KEY", "HEAD_DIM", "CAUSAL"]  # re-tuned per power-of-two bucket of Sq / Sk


def _prune(kernel: str):
    """early_config_prune for the autotuner: one fixed config when interpreting; otherwise drop configs that
    cannot fit in shared memory (they fail to launch) or whose fp32 accumulators outgrow the register file."""
    streamed, resident = {"fwd": ("BLOCK_N", "BLOCK_M"), "dkdv": ("BLOCK_M", "BLOCK_N"),
                          "dq": ("BLOCK_N", "BLOCK_M")}[kernel]

    def prune(configs, named_args, **kwargs):
        if _interpreting():
            m, n = _INTERPRET[kernel]
            return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=4, num_stages=1)]
        args = {**named_args, **kwargs}
        width = args["BLOCK_D0"] + args["BLOCK_DK1"]
        row_bytes = 2 * width * args["Q"].element_size()  # K and V (fwd, dq) or Q and dO (dkdv) travel together
        # fp32 (tf32x3) backward kernels hold a second copy of their resident tiles: +73 KB at head dim 160
        resident_copies = 2 if kernel != "fwd" and args["Q"].element_size() == 4 else 1

        def smem(c):  # at or a few % above the compiler's figure: pipelined tiles + the resident ones
            return (c.num_stages * c.kwargs[streamed] + resident_copies * c.kwargs[resident]) * row_bytes

        def regs(c):  # fp32 accumulators + the score tile per thread; ptxas spills past ~180 of these
            m, n = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
            acc = 2 * n * width if kernel == "dkdv" else m * width
            return (acc + m * n) / (32 * c.num_warps)

        fallback = {_shape(c) for c in _FALLBACK[kernel]}
        fits = [c for c in configs if smem(c) <= _SMEM_BUDGET and regs(c) < 180]
        return ([c for c in fits if _shape(c) not in fallback] or [c for c in fits if _shape(c) in fallback]
                or [min(configs, key=smem)])
    return prune


def _shape(c) -> tuple[int, int, int, int]:
    return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages


@triton.jit
def _load_tile(ptr, base, offs_r, stride_r, offs_d, r_lim, HEAD_DIM: tl.constexpr, MASK_R: tl.constexpr,
               ALIGN: tl.constexpr):
    """A (rows, d) tile; rows are masked only in MASK_R blocks, d always (the rest chunk is padded)."""
    # ALIGN: every row starts on an ALIGN-element boundary (the launcher checked the strides). Triton only learns
    # that by itself for strides divisible by 16 (D=40 has 40), and without it loads are neither vectorized nor
    # pipelined through cp.async.
    rows = tl.multiple_of(base + offs_r * stride_r, ALIGN)
    mask = offs_d[None, :] < HEAD_DIM
    if MASK_R:
        mask = mask & (offs_r[:, None] < r_lim)
    return tl.load(ptr + rows[:, None] + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _load_tile_t(ptr, base, offs_r, stride_r, offs_d, r_lim, HEAD_DIM: tl.constexpr, MASK_R: tl.constexpr,
                 ALIGN: tl.constexpr):
    """The same tile transposed, (d, rows): the right-hand operand of q @ kᵀ without a register transpose."""
    rows = tl.multiple_of(base + offs_r * stride_r, ALIGN)
    mask = offs_d[:, None] < HEAD_DIM
    if MASK_R:
        mask = mask & (offs_r[None, :] < r_lim)
    return tl.load(ptr + rows[None, :] + offs_d[:, None], mask=mask, other=0.0)


@triton.jit
def _store_tile(ptr, base, offs_r, stride_r, offs_d, r_lim, value, HEAD_DIM: tl.constexpr, ALIGN: tl.constexpr):
    rows = tl.multiple_of(base + offs_r * stride_r, ALIGN)
    mask = (offs_r[:, None] < r_lim) & (offs_d[None, :] < HEAD_DIM)
    tl.store(ptr + rows[:, None] + offs_d[None, :], value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fwd_inner(acc0, acc1, l_i, m_i, q0, q1, K, V, k_base, v_base, stride_ks, stride_vs, offs_m, lo, hi, Sk,
               qk_scale, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D0: tl.constexpr,
               BLOCK_DK1: tl.constexpr, BLOCK_DV1: tl.constexpr, CAUSAL: tl.constexpr, MASK: tl.constexpr,
               PRECISION: tl.constexpr, ALIGN: tl.constexpr):
    offs_d0 = tl.arange(0, BLOCK_D0)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kt0 = _load_tile_t(K, k_base, offs_n, stride_ks, offs_d0, Sk, HEAD_DIM, MASK, ALIGN)  # (D0, BLOCK_N)
        qk = tl.dot(q0, kt0, input_precision=PRECISION)  # (BLOCK_M, BLOCK_N)
        if BLOCK_DK1 > 0:
            offs_dk1 = BLOCK_D0 + tl.arange(0, BLOCK_DK1)
            kt1 = _load_tile_t(K, k_base, offs_n, stride_ks, offs_dk1, Sk, HEAD_DIM, MASK, ALIGN)
            qk = tl.dot(q1, kt1, qk, input_precision=PRECISION)
        if MASK:
            keep = offs_n[None, :] < Sk
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None])
            qk = tl.where(keep, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)  # every row sees key 0, so m_new is finite
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)  # rescales what was accumulated under the old max
        l_i = l_i * alpha + tl.sum(p, 1)
        v0 = _load_tile(V, v_base, offs_n, stride_vs, offs_d0, Sk, HEAD_DIM, MASK, ALIGN)  # (BLOCK_N, D0)
        acc0 = tl.dot(p.to(v0.dtype), v0, acc0 * alpha[:, None], input_precision=PRECISION)
        if BLOCK_DV1 > 0:
            offs_dv1 = BLOCK_D0 + tl.arange(0, BLOCK_DV1)
            v1 = _load_tile(V, v_base, offs_n, stride_vs, offs_dv1, Sk, HEAD_DIM, MASK, ALIGN)  # (BLOCK_N, DV1)
            acc1 = tl.dot(p.to(v1.dtype), v1, acc1 * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc0, acc1, l_i, m_i


@autotune(_FWD_CONFIGS + _FALLBACK["fwd"], _KEY, _prune("fwd"))
@triton.jit
def _attn_fwd(
    Q, K, V,  # (B, H, Sq|Sk, D) inputs, any strides with unit stride along D
    O,        # (B, H, Sq, D) output, same dtype as Q; every row < Sq is written
    O32,      # (B, H, Sq, D) fp32 contiguous output, written only when STORE_O32 (training; see _FlashAttention)
    LSE,      # (B, H, Sq) fp32, contiguous: base-2 log-sum-exp of each row's scaled scores, for the backward
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os,
    H, Sq, Sk, qk_scale, SQ_KEY, SK_KEY,  # *_KEY: power-of-two buckets of Sq/Sk, the autotuner's cache key
    HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_DK1: tl.constexpr, BLOCK_DV1: tl.constexpr,
    CAUSAL: tl.constexpr, PRECISION: tl.constexpr, ALIGN: tl.constexpr, STORE_O32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d0 = tl.arange(0, BLOCK_D0)
    q_base = b * stride_qb + h * stride_qh
    q0 = _load_tile(Q, q_base, offs_m, stride_qs, offs_d0, Sq, HEAD_DIM, True, ALIGN)  # (BLOCK_M, D0)
    q1 = q0  # placeholder when D is a power of two (BLOCK_DK1 == 0)
    if BLOCK_DK1 > 0:
        offs_dk1 = BLOCK_D0 + tl.arange(0, BLOCK_DK1)
        q1 = _load_tile(Q, q_base, offs_m, stride_qs, offs_dk1, Sq, HEAD_DIM, True, ALIGN)  # (BLOCK_M, DK1)
    acc0 = tl.zeros([BLOCK_M, BLOCK_D0], dtype=tl.float32)
    acc1 = acc0
    if BLOCK_DV1 > 0:
        acc1 = tl.zeros([BLOCK_M, BLOCK_DV1], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    # Key blocks every row of this query block sees in full, then the diagonal / ragged tail with masks.
    full_hi = (Sk // BLOCK_N) * BLOCK_N
    end = Sk
    if CAUSAL:
        full_hi = tl.minimum((start_m + 1) // BLOCK_N * BLOCK_N, full_hi)
        end = tl.minimum(start_m + BLOCK_M, Sk)
    k_base = b * stride_kb + h * stride_kh
    v_base = b * stride_vb + h * stride_vh
    acc0, acc1, l_i, m_i = _fwd_inner(acc0, acc1, l_i, m_i, q0, q1, K, V, k_base, v_base, stride_ks, stride_vs,
                                      offs_m, 0, full_hi, Sk, qk_scale, HEAD_DIM, BLOCK_N, BLOCK_D0, BLOCK_DK1,
                                      BLOCK_DV1, CAUSAL, False, PRECISION, ALIGN)
    acc0, acc1, l_i, m_i = _fwd_inner(acc0, acc1, l_i, m_i, q0, q1, K, V, k_base, v_base, stride_ks, stride_vs,
                                      offs_m, full_hi, end, Sk, qk_scale, HEAD_DIM, BLOCK_N, BLOCK_D0, BLOCK_DK1,
                                      BLOCK_DV1, CAUSAL, True, PRECISION, ALIGN)
    tl.store(LSE + bh * Sq + offs_m, m_i + tl.math.log2(l_i), mask=offs_m < Sq)
    o_base = b * stride_ob + h * stride_oh
    acc0 = acc0 / l_i[:, None]
    _store_tile(O, o_base, offs_m, stride_os, offs_d0, Sq, acc0, HEAD_DIM, ALIGN)
    if STORE_O32:
        _store_tile(O32, bh * Sq * HEAD_DIM, offs_m, HEAD_DIM, offs_d0, Sq, acc0, HEAD_DIM, ALIGN)
    if BLOCK_DV1 > 0:
        offs_dv1 = BLOCK_D0 + tl.arange(0, BLOCK_DV1)
        acc1 = acc1 / l_i[:, None]
        _store_tile(O, o_base, offs_m, stride_os, offs_dv1, Sq, acc1, HEAD_DIM, ALIGN)
        if STORE_O32:
            _store_tile(O32, bh * Sq * HEAD_DIM, offs_m, HEAD_DIM, offs_dv1, Sq, acc1, HEAD_DIM, ALIGN)


@triton.jit
def _attn_bwd_delta(
    O, DO,  # (B, H, Sq, D) forward output and its incoming gradient, unit stride along D
    DELTA,  # (B, H, Sq) fp32 out: rowsum(dO * O), the softmax-backward term (FA2 paper, Algorithm 2 line 4)
    stride_ob, stride_oh, stride_os, stride_db, stride_dh, stride_ds, H, Sq,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_tile(O, b * stride_ob + h * stride_oh, offs_m, stride_os, offs_d, Sq, HEAD_DIM, True, 1)
    do = _load_tile(DO, b * stride_db + h * stride_dh, offs_m, stride_ds, offs_d, Sq, HEAD_DIM, True, 1)
    tl.store(DELTA + bh * Sq + offs_m, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=offs_m < Sq)


@triton.jit
def _dkdv_inner(dk0, dk1, dv0, dv1, k0, k1, v0, v1, Q, DO, LSE, DELTA, q_base, do_base, stride_qs, stride_ds,
                offs_n, lo, hi, Sq, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, CAUSAL: tl.constexpr, MASK: tl.constexpr,
                PRECISION: tl.constexpr, ALIGN: tl.constexpr):
    offs_d0 = tl.arange(0, BLOCK_D0)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        qt0 = _load_tile_t(Q, q_base, offs_m, stride_qs, offs_d0, Sq, HEAD_DIM, MASK, ALIGN)  # (D0, BLOCK_M)
        do0 = _load_tile(DO, do_base, offs_m, stride_ds, offs_d0, Sq, HEAD_DIM, MASK, ALIGN)  # (BLOCK_M, D0)
        if MASK:
            lse = tl.load(LSE + offs_m, mask=offs_m < Sq, other=0.0)
            delta = tl.load(DELTA + offs_m, mask=offs_m < Sq, other=0.0)
        else:
            lse = tl.load(LSE + offs_m)
            delta = tl.load(DELTA + offs_m)
        qkt = tl.dot(k0, qt0, input_precision=PRECISION)  # (BLOCK_N, BLOCK_M): Sᵀ, so Pᵀ needs no transpose
        dpt = tl.dot(v0, tl.trans(do0), input_precision=PRECISION)  # dPᵀ = (dO vᵀ)ᵀ
        if BLOCK_D1 > 0:
            offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
            qt1 = _load_tile_t(Q, q_base, offs_m, stride_qs, offs_d1, Sq, HEAD_DIM, MASK, ALIGN)
            do1 = _load_tile(DO, do_base, offs_m, stride_ds, offs_d1, Sq, HEAD_DIM, MASK, ALIGN)
            qkt = tl.dot(k1, qt1, qkt, input_precision=PRECISION)
            dpt = tl.dot(v1, tl.trans(do1), dpt, input_precision=PRECISION)
        pt = tl.math.exp2(qkt * qk_scale - lse[None, :])
        if MASK:
            keep = offs_m[None, :] < Sq
            if CAUSAL:
                keep = keep & (offs_m[None, :] >= offs_n[:, None])
            pt = tl.where(keep, pt, 0.0)
        dst = pt * (dpt - delta[None, :])  # dSᵀ = Pᵀ ∘ (dPᵀ - Δ)
        dv0 = tl.dot(pt.to(do0.dtype), do0, dv0, input_precision=PRECISION)
        dk0 = tl.dot(dst.to(qt0.dtype), tl.trans(qt0), dk0, input_precision=PRECISION)
        if BLOCK_D1 > 0:
            dv1 = tl.dot(pt.to(do1.dtype), do1, dv1, input_precision=PRECISION)
            dk1 = tl.dot(dst.to(qt1.dtype), tl.trans(qt1), dk1, input_precision=PRECISION)
    return dk0, dk1, dv0, dv1


@autotune(_DKDV_CONFIGS + _FALLBACK["dkdv"], _KEY, _prune("dkdv"))
@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO,  # (B, H, S, D) forward inputs and dO, unit stride along D
    LSE, DELTA,   # (B, H, Sq) fp32 contiguous: from the forward and from _attn_bwd_delta
    DK, DV,       # (B, H, Sk, D) out, written for every key row < Sk
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    stride_db, stride_dh, stride_ds, stride_dkb, stride_dkh, stride_dks, stride_dvb, stride_dvh, stride_dvs,
    H, Sq, Sk, sm_scale, qk_scale, SQ_KEY, SK_KEY,
    HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_DK1: tl.constexpr, CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr, ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d0 = tl.arange(0, BLOCK_D0)
    k_base = b * stride_kb + h * stride_kh
    v_base = b * stride_vb + h * stride_vh
    k0 = _load_tile(K, k_base, offs_n, stride_ks, offs_d0, Sk, HEAD_DIM, True, ALIGN)  # (BLOCK_N, D0), resident
    v0 = _load_tile(V, v_base, offs_n, stride_vs, offs_d0, Sk, HEAD_DIM, True, ALIGN)
    dk0 = tl.zeros([BLOCK_N, BLOCK_D0], dtype=tl.float32)
    dv0 = dk0
    k1, v1, dk1, dv1 = k0, v0, dk0, dv0  # placeholders when D is a power of two
    if BLOCK_DK1 > 0:
        offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_DK1)
        k1 = _load_tile(K, k_base, offs_n, stride_ks, offs_d1, Sk, HEAD_DIM, True, ALIGN)  # (BLOCK_N, D1)
        v1 = _load_tile(V, v_base, offs_n, stride_vs, offs_d1, Sk, HEAD_DIM, True, ALIGN)
        dk1 = tl.zeros([BLOCK_N, BLOCK_DK1], dtype=tl.float32)
        dv1 = dk1
    # Query blocks: [lo, diag) may hold rows that must not see some of these keys (causal), [diag, sq_full) see
    # all of them, [max(diag, sq_full), Sq) is the ragged tail. Rows before lo see none of these keys.
    sq_full = (Sq // BLOCK_M) * BLOCK_M
    lo = 0
    diag = 0
    if CAUSAL:
        lo = (start_n // BLOCK_M) * BLOCK_M
        diag = tl.minimum(tl.cdiv(start_n + BLOCK_N - 1, BLOCK_M) * BLOCK_M, tl.cdiv(Sq, BLOCK_M) * BLOCK_M)
    q_base = b * stride_qb + h * stride_qh
    do_base = b * stride_db + h * stride_dh
    dk0, dk1, dv0, dv1 = _dkdv_inner(dk0, dk1, dv0, dv1, k0, k1, v0, v1, Q, DO, LSE + bh * Sq, DELTA + bh * Sq,
                                     q_base, do_base, stride_qs, stride_ds, offs_n, lo, diag, Sq, qk_scale,
                                     HEAD_DIM, BLOCK_M, BLOCK_D0, BLOCK_DK1, CAUSAL, True, PRECISION, ALIGN)
    dk0, dk1, dv0, dv1 = _dkdv_inner(dk0, dk1, dv0, dv1, k0, k1, v0, v1, Q, DO, LSE + bh * Sq, DELTA + bh * Sq,
                                     q_base, do_base, stride_qs, stride_ds, offs_n, diag, sq_full, Sq, qk_scale,
                                     HEAD_DIM, BLOCK_M, BLOCK_D0, BLOCK_DK1, CAUSAL, False, PRECISION, ALIGN)
    dk0, dk1, dv0, dv1 = _dkdv_inner(dk0, dk1, dv0, dv1, k0, k1, v0, v1, Q, DO, LSE + bh * Sq, DELTA + bh * Sq,
                                     q_base, do_base, stride_qs, stride_ds, offs_n, tl.maximum(diag, sq_full), Sq,
                                     Sq, qk_scale, HEAD_DIM, BLOCK_M, BLOCK_D0, BLOCK_DK1, CAUSAL, True,
                                     PRECISION, ALIGN)
    dk_base = b * stride_dkb + h * stride_dkh
    dv_base = b * stride_dvb + h * stride_dvh
    _store_tile(DK, dk_base, offs_n, stride_dks, offs_d0, Sk, dk0 * sm_scale, HEAD_DIM, ALIGN)
    _store_tile(DV, dv_base, offs_n, stride_dvs, offs_d0, Sk, dv0, HEAD_DIM, ALIGN)
    if BLOCK_DK1 > 0:
        offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_DK1)
        _store_tile(DK, dk_base, offs_n, stride_dks, offs_d1, Sk, dk1 * sm_scale, HEAD_DIM, ALIGN)
        _store_tile(DV, dv_base, offs_n, stride_dvs, offs_d1, Sk, dv1, HEAD_DIM, ALIGN)


@triton.jit
def _dq_inner(dq0, dq1, q0, q1, do0, do1, lse, delta, K, V, k_base, v_base, stride_ks, stride_vs, offs_m, lo, hi,
              Sk, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D0: tl.constexpr,
              BLOCK_D1: tl.constexpr, CAUSAL: tl.constexpr, MASK: tl.constexpr, PRECISION: tl.constexpr,
              ALIGN: tl.constexpr):
    offs_d0 = tl.arange(0, BLOCK_D0)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kt0 = _load_tile_t(K, k_base, offs_n, stride_ks, offs_d0, Sk, HEAD_DIM, MASK, ALIGN)  # (D0, BLOCK_N)
        vt0 = _load_tile_t(V, v_base, offs_n, stride_vs, offs_d0, Sk, HEAD_DIM, MASK, ALIGN)
        qk = tl.dot(q0, kt0, input_precision=PRECISION)  # (BLOCK_M, BLOCK_N)
        dp = tl.dot(do0, vt0, input_precision=PRECISION)
        if BLOCK_D1 > 0:
            offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
            kt1 = _load_tile_t(K, k_base, offs_n, stride_ks, offs_d1, Sk, HEAD_DIM, MASK, ALIGN)
            vt1 = _load_tile_t(V, v_base, offs_n, stride_vs, offs_d1, Sk, HEAD_DIM, MASK, ALIGN)
            qk = tl.dot(q1, kt1, qk, input_precision=PRECISION)
            dp = tl.dot(do1, vt1, dp, input_precision=PRECISION)
        p = tl.math.exp2(qk * qk_scale - lse[:, None])
        if MASK:
            keep = offs_n[None, :] < Sk
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None])
            p = tl.where(keep, p, 0.0)
        ds = p * (dp - delta[:, None])  # dS = P ∘ (dP - Δ)
        dq0 = tl.dot(ds.to(kt0.dtype), tl.trans(kt0), dq0, input_precision=PRECISION)
        if BLOCK_D1 > 0:
            dq1 = tl.dot(ds.to(kt1.dtype), tl.trans(kt1), dq1, input_precision=PRECISION)
    return dq0, dq1


@autotune(_DQ_CONFIGS + _FALLBACK["dq"], _KEY, _prune("dq"))
@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO,  # (B, H, S, D) forward inputs and dO, unit stride along D
    LSE, DELTA,   # (B, H, Sq) fp32 contiguous
    DQ,           # (B, H, Sq, D) out, written for every row < Sq
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    stride_db, stride_dh, stride_ds, stride_dqb, stride_dqh, stride_dqs,
    H, Sq, Sk, sm_scale, qk_scale, SQ_KEY, SK_KEY,
    HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_DK1: tl.constexpr, CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr, ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d0 = tl.arange(0, BLOCK_D0)
    q_base = b * stride_qb + h * stride_qh
    do_base = b * stride_db + h * stride_dh
    q0 = _load_tile(Q, q_base, offs_m, stride_qs, offs_d0, Sq, HEAD_DIM, True, ALIGN)  # (BLOCK_M, D0)
    do0 = _load_tile(DO, do_base, offs_m, stride_ds, offs_d0, Sq, HEAD_DIM, True, ALIGN)
    dq0 = tl.zeros([BLOCK_M, BLOCK_D0], dtype=tl.float32)
    q1, do1, dq1 = q0, do0, dq0  # placeholders when D is a power of two
    if BLOCK_DK1 > 0:
        offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_DK1)
        q1 = _load_tile(Q, q_base, offs_m, stride_qs, offs_d1, Sq, HEAD_DIM, True, ALIGN)  # (BLOCK_M, D1)
        do1 = _load_tile(DO, do_base, offs_m, stride_ds, offs_d1, Sq, HEAD_DIM, True, ALIGN)
        dq1 = tl.zeros([BLOCK_M, BLOCK_DK1], dtype=tl.float32)
    lse = tl.load(LSE + bh * Sq + offs_m, mask=offs_m < Sq, other=0.0)
    delta = tl.load(DELTA + bh * Sq + offs_m, mask=offs_m < Sq, other=0.0)
    full_hi = (Sk // BLOCK_N) * BLOCK_N  # the same key-block split as the forward
    end = Sk
    if CAUSAL:
        full_hi = tl.minimum((start_m + 1) // BLOCK_N * BLOCK_N, full_hi)
        end = tl.minimum(start_m + BLOCK_M, Sk)
    k_base = b * stride_kb + h * stride_kh
    v_base = b * stride_vb + h * stride_vh
    dq0, dq1 = _dq_inner(dq0, dq1, q0, q1, do0, do1, lse, delta, K, V, k_base, v_base, stride_ks, stride_vs, offs_m,
                         0, full_hi, Sk, qk_scale, HEAD_DIM, BLOCK_N, BLOCK_D0, BLOCK_DK1, CAUSAL, False, PRECISION,
                         ALIGN)
    dq0, dq1 = _dq_inner(dq0, dq1, q0, q1, do0, do1, lse, delta, K, V, k_base, v_base, stride_ks, stride_vs, offs_m,
                         full_hi, end, Sk, qk_scale, HEAD_DIM, BLOCK_N, BLOCK_D0, BLOCK_DK1, CAUSAL, True,
                         PRECISION, ALIGN)
    dq_base = b * stride_dqb + h * stride_dqh
    _store_tile(DQ, dq_base, offs_m, stride_dqs, offs_d0, Sq, dq0 * sm_scale, HEAD_DIM, ALIGN)
    if BLOCK_DK1 > 0:
        offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_DK1)
        _store_tile(DQ, dq_base, offs_m, stride_dqs, offs_d1, Sq, dq1 * sm_scale, HEAD_DIM, ALIGN)
