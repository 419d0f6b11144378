"""Our Triton kernels vs PyTorch's on the shapes Stable Diffusion really runs. CUDA only.

    .venv/bin/python benchmarks/kernels.py [--ops attention,group_norm] [--dtypes fp16,bf16] [--quick]

attention   SD1.5 (8 heads of 40/80/160/160 over the four UNet levels) and SD2 (heads of 64) at 512² and 768²,
            B=2 (classifier-free guidance), self-attention (Sk = S) and cross-attention (Sk = 77 CLIP tokens),
            plus the causal CLIP text encoders. Inputs are (B, S, H, D) projections viewed as (B, H, S, D), as the
            UNet makes them. Peers: F.scaled_dot_product_attention pinned to its flash and its cuDNN backends.
            Figure: TFLOP/s, counting 4·B·H·Sq·Sk·D for the forward (half that when causal) and 2.5x more for the
            backward (FlashAttention-2's convention).
group_norm  GroupNorm(32) + SiLU on SD1.5's UNet activations at 512² and 768² and on VAE-decoder activations,
            NCHW and channels_last. Peer: F.group_norm then F.silu (eager). Figure: GB/s of compulsory traffic
            (read x, write y; the backward adds read x and dy, write dx), its share of the GPU's spec-sheet HBM
            peak (hbm_pct) and of the bandwidth measured here (copy_pct: a 1 GiB device-to-device copy, read +
            write, which is what "measured HBM bandwidth" means in the goal; on an H100 SXM about 90% of spec).
Passes: forward, and forward+backward (grads of all inputs). Timing: triton.testing.do_bench (mean ms) after one
untimed call, which autotunes our kernels; with --cudagraph the forward rows use do_bench_cudagraph (replays, no
Python dispatch on either side: at the deep levels' 64-256 tokens eager timings are mostly launch overhead).
A backend that fails on a row is recorded as `error` in that row. Prints every row (peer, ours, ratio = ours/peer
in the figure's unit, >1 is faster) and writes benchmarks/results/kernels-<gpu>.csv.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from common import commit

RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = ["gpu", "commit", "op", "shape", "dtype", "pass", "unit", "ours", "peer_name", "peer", "ratio",
           "ours_ms", "peer_ms", "hbm_pct", "copy_pct", "timing", "error"]
HBM_GBPS = {"H100 SXM": 3350, "H100 80GB HBM3": 3350, "H100 PCIe": 2000, "H100 NVL": 3900, "H200": 4800,
            "A100-SXM4-80GB": 2039, "A100 80GB PCIe": 1935, "A100-SXM4-40GB": 1555, "A100-PCIE-40GB": 1555}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
OPS = ("attention", "group_norm")


def names_of(choices):
    """argparse type: a comma-separated list, each name one of `choices` (checked before anything runs)."""
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        bad = [n for n in names if n not in choices]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"{', '.join(bad) or repr(text)}: choose from {', '.join(choices)}")
        return names
    return parse


def attention_shapes(quick: bool) -> list[tuple[str, tuple[int, int, int, int, int, bool]]]:
    """(label, (B, H, Sq, Sk, D, causal)) for the UNet levels of SD1.5 / SD2 at 512² and 768², and CLIP."""
    rows = []
    for family, heads, dims in (("sd15", (8, 8, 8, 8), (40, 80, 160, 160)), ("sd2", (5, 10, 20, 20), (64,) * 4)):
        for res in (512, 768):
            side = res // 8  # latent side; the UNet's levels halve it three times
            for level, (h, d) in enumerate(zip(heads, dims)):
                s = (side >> level) ** 2
                rows.append((f"{family}-{res} L{level} self", (2, h, s, s, d, False)))
                rows.append((f"{family}-{res} L{level} cross", (2, h, s, 77, d, False)))
    rows += [("clip-l text (sd15)", (2, 12, 77, 77, 64, True)), ("openclip-h text (sd2)", (2, 16, 77, 77, 64, True))]
    return [r for r in rows if not quick or "512 L0" in r[0] or "text" in r[0]]


def group_norm_shapes(quick: bool) -> list[tuple[str, tuple[int, ...]]]:
    rows = []
    for res in (512, 768):
        side = res // 8
        for level, c in enumerate((320, 640, 1280, 1280)):
            rows.append((f"sd15-{res} unet L{level}", (2, c, side >> level, side >> level)))
    rows += [("sd15-512 vae dec 512²", (1, 128, 512, 512)), ("sd15-512 vae dec 256²", (1, 256, 256, 256)),
             ("sd15-512 vae dec 64²", (1, 512, 64, 64))]
    return [r for r in rows if not quick or "L0" in r[0]]


GRAPHED = False  # --cudagraph: forward passes replayed from a CUDA graph (kernel time, no Python dispatch)


def bench_ms(fn, grads=None) -> float:
    from triton.testing import do_bench, do_bench_cudagraph
    fn()  # compiles and autotunes our kernels outside the timed region
    torch.cuda.synchronize()
    if GRAPHED and grads is None:
        return do_bench_cudagraph(fn, rep=100)
    return do_bench(fn, warmup=25, rep=100, grad_to_none=grads)


def attention_rows(dtype: torch.dtype, quick: bool):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from backdrop import kernels

    peers = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION}
    for label, (B, H, Sq, Sk, D, causal) in attention_shapes(quick):
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=dtype, generator=g).transpose(1, 2)
                   for S in (Sq, Sk, Sk))  # (B, H, S, D) views of (B, S, H, D) memory
        do = torch.randn(B, H, Sq, D, device="cuda", dtype=dtype, generator=g)
        fwd_flops = 4 * B * H * Sq * Sk * D * (0.5 if causal else 1.0)
        shape = f"{label}: B={B} H={H} Sq={Sq} Sk={Sk} D={D}" + (" causal" if causal else "")
        for pass_, flops in (("fwd", fwd_flops), ("fwd+bwd", 3.5 * fwd_flops)):
            def run(attn, pass_=pass_):
                if pass_ == "fwd":
                    with torch.no_grad():
                        return bench_ms(lambda: attn(q, k, v))
                q_, k_, v_ = (t.detach().requires_grad_() for t in (q, k, v))
                return bench_ms(lambda: attn(q_, k_, v_).backward(do), grads=[q_, k_, v_])

            ours = measure(lambda: run(lambda a, b, c: kernels.attention(a, b, c, causal=causal, impl="triton")))
            for peer_name, backend in peers.items():
                def sdpa(a, b, c, backend=backend):
                    with sdpa_kernel(backend):
                        return F.scaled_dot_product_attention(a, b, c, is_causal=causal)
                peer = measure(lambda: run(sdpa))
                yield row("attention", shape, dtype, pass_, "TFLOP/s", flops / 1e12, ours, peer_name, peer)


def copy_gbps() -> float:
    """The HBM bandwidth a plain 1 GiB device-to-device copy achieves (bytes read + written per second)."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    src = dst = None  # 2 GiB back to the pool before the benchmarks
    torch.cuda.empty_cache()
    return 2 * 2**30 / (ms * 1e-3) / 1e9


def group_norm_rows(dtype: torch.dtype, quick: bool, peak_gbps: float | None, measured_gbps: float):
    from backdrop import kernels

    for label, shape in group_norm_shapes(quick):
        for layout in ("nchw", "channels_last"):
            g = torch.Generator(device="cuda").manual_seed(0)
            x = torch.randn(shape, device="cuda", dtype=dtype, generator=g)
            if layout == "channels_last":
                x = x.to(memory_format=torch.channels_last)
            w, b = (torch.randn(shape[1], device="cuda", dtype=dtype, generator=g) for _ in range(2))
            dy = torch.randn_like(x)
            nbytes = x.numel() * x.element_size()
            for pass_, traffic in (("fwd", 2 * nbytes), ("fwd+bwd", 5 * nbytes)):
                def run(norm, pass_=pass_):
                    if pass_ == "fwd":
                        with torch.no_grad():
                            return bench_ms(lambda: norm(x, w, b))
                    x_, w_, b_ = (t.detach().requires_grad_() for t in (x, w, b))
                    return bench_ms(lambda: norm(x_, w_, b_).backward(dy), grads=[x_, w_, b_])

                ours = measure(lambda: run(lambda a, c, d: kernels.group_norm(a, 32, c, d, silu=True, impl="triton")))
                peer = measure(lambda: run(lambda a, c, d: F.silu(F.group_norm(a, 32, c, d))))
                r = row("group_norm+silu", f"{label} {layout}: {tuple(shape)}", dtype, pass_, "GB/s", traffic / 1e9,
                        ours, "F.group_norm+F.silu", peer)
                if r["ours"] != "":
                    r["copy_pct"] = f"{100 * r['ours'] / measured_gbps:.0f}"
                    if peak_gbps:
                        r["hbm_pct"] = f"{100 * r['ours'] / peak_gbps:.0f}"
                yield r


def measure(fn) -> tuple[float, str]:
    """(ms, "") or (nan, the error) — a failing backend costs its row, not the run."""
    try:
        return fn(), ""
    except Exception as e:  # noqa: BLE001 — unsupported shape/dtype in a backend, OOM, compile failure...
        try:
            torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001 — a poisoned CUDA context raises again here; the row still records e
            pass
        return math.nan, f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


def row(op, shape, dtype, pass_, unit, work, ours, peer_name, peer) -> dict:
    (ours_ms, ours_err), (peer_ms, peer_err) = ours, peer
    fig = lambda ms: work / (ms * 1e-3) if ms == ms else math.nan  # noqa: E731  (nan-safe figure)
    o, p = fig(ours_ms), fig(peer_ms)
    errors = "; ".join(f"{who}: {e}" for who, e in (("ours", ours_err), (peer_name, peer_err)) if e)
    return {"op": op, "shape": shape, "dtype": str(dtype).removeprefix("torch."), "pass": pass_, "unit": unit,
            "ours": round(o, 2) if o == o else "", "peer_name": peer_name, "peer": round(p, 2) if p == p else "",
            "ratio": round(o / p, 3) if o == o and p == p else "", "ours_ms": round(ours_ms, 4) if o == o else "",
            "peer_ms": round(peer_ms, 4) if p == p else "", "hbm_pct": "", "copy_pct": "", "error": errors}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ops", default="attention,group_norm", type=names_of(OPS),
                    help="comma-separated: attention, group_norm (default: %(default)s)")
    ap.add_argument("--dtypes", default="fp16,bf16", type=names_of(DTYPES),
                    help="comma-separated: fp16, bf16 (default: %(default)s)")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: attention at 512² (UNet level 0) and the text encoder's, GroupNorm at the "
                         "UNets' level 0")
    ap.add_argument("--out", type=Path, default=None, help="CSV path (default benchmarks/results/kernels-<gpu>.csv)")
    ap.add_argument("--cudagraph", action="store_true",
                    help="time forward passes as CUDA-graph replays: the kernels without Python dispatch, which is "
                         "how `backdrop serve` runs the UNet (short sequences are otherwise mostly launch overhead)")
    args = ap.parse_args(argv)
    global GRAPHED
    GRAPHED = args.cudagraph
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU (the kernels are Triton; on the CPU they only run in the "
              "interpreter, which measures nothing). Skipping.")
        return 0
    gpu = torch.cuda.get_device_name()
    peak = next((v for k, v in HBM_GBPS.items() if k.lower() in gpu.lower()), None)
    meta = {"gpu": gpu, "commit": commit()}
    measured = copy_gbps()
    print(f"{gpu} (HBM peak {peak or '?'} GB/s on the spec sheet, {measured:.0f} GB/s measured by a copy), "
          f"torch {torch.__version__}, commit {meta['commit']}")
    out = args.out or RESULTS / f"kernels-{re.sub(r'[^a-z0-9]+', '-', gpu.lower()).strip('-')}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.stem + ".partial.csv")  # rows so far; replaces `out` only when the run completes
    rows = []
    with open(partial, "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        for name in args.dtypes:
            dtype = DTYPES[name]
            gens = []
            if "attention" in args.ops:
                gens.append(attention_rows(dtype, args.quick))
            if "group_norm" in args.ops:
                gens.append(group_norm_rows(dtype, args.quick, peak, measured))
            for gen in gens:
                for r in gen:
                    r.update(meta, timing="cudagraph" if GRAPHED and r["pass"] == "fwd" else "eager")
                    rows.append(r)
                    writer.writerow(r)
                    f.flush()
                    print(f"{r['op']:16} {r['dtype']:9} {r['pass']:8} {r['shape'][:70]:70} {r['peer_name']:20} "
                          f"{r['peer']!s:>9} ours {r['ours']!s:>9} {r['unit']:8} x{r['ratio']!s:6} "
                          f"{r['copy_pct'] and r['copy_pct'] + '% of copy'} {r['error']}", flush=True)
    os.replace(partial, out)
    print(f"{len(rows)} rows -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
