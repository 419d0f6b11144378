"""Forward-pass speed on the CPU at the full SD1.5 size: Backdrop's UNet, VAE decoder and text encoder against
diffusers' UNet2DConditionModel / AutoencoderKL and transformers' CLIPTextModel holding the very same weights.

    .venv/bin/python benchmarks/forward.py [--size 64] [--repeats 3] [--dtypes fp32,bf16] [--threads N]
                                           [--components unet,vae,text] [--clock wall|cpu]

UNet: batch 2 (one prompt with classifier-free guidance), 77-token context, `--size` latents (64 = 512x512
images, 32 = 256x256). VAE: decode one `--size` latent. Text: batch 2 x 77 tokens. Weights are random (no
downloads), 1/sqrt(fan_in)-scaled so activations have realistic magnitudes; the peer's modules are built on the
meta device and take our tensors (load_state_dict(assign=True)), so both run on identical memory. bf16 means
torch.autocast("cpu", bfloat16) around fp32 weights, as a pipeline would run it.

Each component gets one untimed warm-up call per implementation (also the output check, `max_rel_diff`), then
`--repeats` timed calls alternating peer/ours and swapping who goes first. Reported: median and best (min)
seconds; ratio = peer / ours, so >= 1 means Backdrop is faster: `ratio` is the median over repeats of each
back-to-back pair's ratio, `ratio_min` the ratio of the best times. `--clock cpu` times process CPU time
instead of wall time: on a shared, oversubscribed machine it removes the time spent waiting for a core (use
with --threads 1, where CPU time is exactly the work done). Results: printed, and benchmarks/results/forward-cpu.csv.
"""
from __future__ import annotations

import argparse
import csv
import math
import statistics
import time
from datetime import date
from pathlib import Path

import torch
from tqdm import tqdm

from backdrop.nn.config import PRESETS
from backdrop.nn.unet import UNet
from backdrop.nn.vae import VAE

from common import commit, machine

RESULTS = Path(__file__).resolve().parent / "results" / "forward-cpu.csv"


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in tqdm(list(model.named_parameters()), f"random weights ({type(model).__name__})",
                        mininterval=5, leave=False):
        if p.dim() == 1:
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g) if "norm" in name and name.endswith("weight")
                    else 0.1 * torch.randn(p.shape, generator=g))
        else:
            p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=g)


def on_meta_then_share(build, ours: torch.nn.Module) -> torch.nn.Module:
    """The peer, built without allocating, then pointed at our tensors (strict: same keys and shapes)."""
    with torch.device("meta"):
        peer = build()
    peer.load_state_dict(ours.state_dict(), strict=True, assign=True)
    return peer.eval()


def build_unet(cfg):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        ours = UNet(cfg.unet)
    ours.to_empty(device="cpu").eval()  # UNet holds no buffers, so every tensor is a parameter we fill next
    randomize_(ours, seed=0)
    peer = on_meta_then_share(lambda: UNet2DConditionModel.from_config(cfg.unet.to_diffusers()), ours)
    return ours, peer


def build_vae(cfg):
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        ours = VAE(cfg.vae)
    ours.to_empty(device="cpu").eval()
    randomize_(ours, seed=1)
    peer = on_meta_then_share(lambda: AutoencoderKL.from_config(cfg.vae.to_diffusers()), ours)
    return ours, peer


def build_text(cfg):
    """Built normally (123M parameters): transformers' CLIP keeps buffers a meta build would leave empty."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from backdrop.nn.clip import TextEncoder

    ours = TextEncoder(cfg.text).eval()
    randomize_(ours, seed=2)
    peer = CLIPTextModel(CLIPTextConfig(**cfg.text.to_transformers())).eval()
    sd = ours.text_model.state_dict()
    if any(k.startswith("text_model.") for k in peer.state_dict()):  # transformers 4.x keeps the prefix, 5.x not
        sd = {f"text_model.{k}": v for k, v in sd.items()}
    peer.load_state_dict(sd, strict=True)
    return ours, peer


def cases(name: str, cfg, size: int):
    """(label, ours_call, peer_call) for one component; inputs fixed by seed."""
    g = torch.Generator().manual_seed(3)
    if name == "unet":
        ours, peer = build_unet(cfg)
        x = torch.randn(2, 4, size, size, generator=g)
        ctx = torch.randn(2, 77, cfg.unet.cross_attention_dim, generator=g)
        t = torch.tensor([500, 500])
        return (f"UNet sd15 batch 2, {size}x{size} latents ({8 * size}px), 77-token context",
                lambda: ours(x, t, ctx), lambda: peer(x, t, ctx).sample, "diffusers UNet2DConditionModel")
    if name == "vae":
        ours, peer = build_vae(cfg)
        z = torch.randn(1, 4, size, size, generator=g)
        return (f"VAE decode sd15 batch 1, {size}x{size} latents -> {8 * size}px",
                lambda: ours.decode(z), lambda: peer.decode(z).sample, "diffusers AutoencoderKL.decode")
    ours, peer = build_text(cfg)
    ids = torch.randint(0, cfg.text.vocab_size - 2, (2, 77), generator=g)
    ids[:, 0], ids[:, -1] = cfg.text.bos_token_id, cfg.text.eos_token_id
    return ("text encoder sd15 (CLIP ViT-L/14 text) batch 2 x 77 tokens",
            lambda: ours(ids), lambda: peer(ids).last_hidden_state, "transformers CLIPTextModel")


def time_pair(ours, peer, repeats: int, clock) -> tuple[list[float], list[float], float]:
    """Warm up both (and compare their outputs), then alternate, swapping who goes first each repeat."""
    a, b = ours(), peer()
    rel = ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
    times = {"ours": [], "peer": []}
    for r in tqdm(range(repeats), "repeats", leave=False):
        order = [("ours", ours), ("peer", peer)] if r % 2 else [("peer", peer), ("ours", ours)]
        for who, fn in order:
            t0 = clock()
            fn()
            times[who].append(clock() - t0)
    return times["ours"], times["peer"], rel


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=64, help="latent side for the UNet and VAE (64 = 512px images)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per implementation")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16 (autocast)")
    p.add_argument("--components", default="unet,vae,text", help="comma list of unet, vae, text")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: elapsed time; cpu: process CPU time (steadier on a busy shared machine)")
    p.add_argument("--out", type=Path, default=RESULTS, help="CSV to write")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    cfg = PRESETS["sd15"]
    rows, notes, sha = [], [], commit()
    for comp in args.components.split(","):
        try:
            label, ours, peer, peer_name = cases(comp, cfg, args.size)
        except ImportError as e:  # the text encoder is optional: nn/clip.py may not exist yet
            notes.append(f"{comp}: skipped ({e})")
            continue
        for dtype in args.dtypes.split(","):
            with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=dtype == "bf16"):
                t_ours, t_peer, rel = time_pair(ours, peer, args.repeats, clock)
            row = {"benchmark": label, "dtype": dtype, "peer": peer_name,
                   "peer_median_s": statistics.median(t_peer), "ours_median_s": statistics.median(t_ours),
                   "peer_min_s": min(t_peer), "ours_min_s": min(t_ours)}
            # Each repeat times both back to back, so its ratio sees one machine state: their median is the
            # figure least moved by load changing over the run. ratio_min compares the two best times.
            row["ratio"] = statistics.median([tp / to for tp, to in zip(t_peer, t_ours)])
            row["ratio_min"] = row["peer_min_s"] / row["ours_min_s"]
            row |= {"max_rel_diff": rel, "repeats": args.repeats, "clock": args.clock,
                    "machine": machine("cpu", args.threads), "commit": sha, "date": date.today().isoformat()}
            rows.append(row)
            print(f"{label} [{dtype}]  peer {row['peer_median_s']:.3f}s  ours {row['ours_median_s']:.3f}s  "
                  f"ratio {row['ratio']:.3f} (paired median), {row['ratio_min']:.3f} (best times)  "
                  f"rel diff {rel:.1e}", flush=True)
        del ours, peer

    print(f"\n{machine('cpu', args.threads)}; commit {sha}; clock: {args.clock}; "
          "ratio = peer / ours (>= 1: Backdrop is faster)")
    print("times: medians; ratio: median of the per-repeat peer/ours ratios; best: min(peer) / min(ours)")
    head = f"{'component':<62} {'dtype':<5} {'peer s':>8} {'ours s':>8} {'ratio':>6} {'best':>6}"
    print(head + "\n" + "-" * len(head))
    for r in rows:
        print(f"{r['benchmark'][:62]:<62} {r['dtype']:<5} {r['peer_median_s']:>8.3f} {r['ours_median_s']:>8.3f} "
              f"{r['ratio']:>6.3f} {r['ratio_min']:>6.3f}")
    for n in notes:
        print("note:", n)
    if rows:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows({k: (f"{v:.2e}" if k == "max_rel_diff" else round(v, 4)) if isinstance(v, float) else v
                         for k, v in r.items()} for r in rows)
        print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
