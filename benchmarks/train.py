"""Training throughput of the pretrain and inpaint stages: Backdrop's Trainer + stage vs the same loop written on
diffusers' UNet2DConditionModel (and AutoencoderKL for inpaint's masked image), identical weights and batch.

    .venv/bin/python benchmarks/train.py [--cases tiny-64,sd15-256] [--stages pretrain,inpaint,inpaint-product]
                                         [--threads N] [--repeats 2] [--precision fp32|bf16] [--weights fp32|bf16]

Ours: `Trainer.train_step()` (fused AdamW) on PretrainStage / InpaintStage with a cached batch (VAE posterior
moments and text embeddings precomputed, as `backdrop train cache` gives them; inpaint still encodes a freshly
masked image every step for random masks, as it must). Peer: the diffusers train_text_to_image loop on the same batch: posterior
sample, noise, random timesteps, DDPMScheduler.add_noise, UNet2DConditionModel, MSE to eps, backward,
clip_grad_norm_(1.0), torch.optim.AdamW(fused=True), as ours, with the same parameter groups, the same autocast
precision; inpaint builds the same random masks and encodes image * (mask < 0.5) with diffusers' AutoencoderKL
(ours encodes the all-grey image of the 25% fully masked items once and reuses it; the peer encodes every item, as
diffusers' examples do). Both draw every random number from one generator in the same order, so their first losses
agree (printed: a check that the work is the same). inpaint-product is `inpaint --masks product`'s step (the
Canvas recipe's second half): the product kept, so ours takes the masked image's latents from the cache
(product_latents, as `backdrop train cache` stores them) and runs no VAE; the peer encodes image * product every
step, as a diffusers loop does.

Each measurement is its own process (clean memory; SD1.5 training needs ~16 GiB), ours and peer alternate
`--repeats` times; a process's figure is its median step on the CPU, its mean step between two syncs on a GPU
(where steps overlap: ours never waits for the GPU, the peer reads its loss every step as diffusers' example
does), and the best process of each side counts (on a shared machine the best is the least disturbed). Both wall-clock and CPU-time throughput are reported: with other
work on the machine, images per CPU second is the steadier figure.
CUDA present: SD1.5 at 256 and 512 px in bf16 (`--cases sd15-256,sd15-512 --precision bf16`, the default there),
at batch 32 and 16 (the CPU runs batch 1).
Results: printed, and benchmarks/results/train-<device>.csv.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from common import commit, machine

RESULTS = Path(__file__).resolve().parent / "results"
CASES = {  # name: (preset, image size, {device: (batch, timed steps)})
    "tiny-64": ("tiny", 64, {"cpu": (2, 30), "cuda": (32, 20)}),
    # On a GPU, a training run's batch (MosaicML: 16-32 per A100 at 256 px), not 1: an H100 at batch 1 waits on
    # kernel launches. SD1.5's fp32 weights + grads + AdamW take ~14 GiB, autocast's bf16 weight copies ~2 GiB; the
    # activations of one image in bf16 were ~0.3 GiB at 256 px and ~1.2 GiB at 512 here (CPU peak RSS, rough), so
    # these need ~25 and ~35 GiB of an 80 GB H100. peak_gib in the results says; --batch-size changes them.
    "sd15-256": ("sd15", 256, {"cpu": (1, 3), "cuda": (32, 10)}),
    "sd15-512": ("sd15", 512, {"cpu": (1, 5), "cuda": (16, 10)}),
}
NEED_GIB = {"tiny": 1, "sd15": 17}  # resident memory of one training process at 256 px, fp32 weights + AdamW


class FixedBatch:
    """The same batch every step, with the position protocol train/core.py expects."""

    def __init__(self, batch):
        self.batch = batch

    def __next__(self):
        return self.batch

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def _batch(model, size: int, n: int, device) -> dict:
    """n synthetic images with their cached posterior moments and text embeddings (what a cache row holds)."""
    from backdrop.diffusion.masks import masked_image
    from backdrop.train.data import collate, make_dataset, product_repaint_mask
    from backdrop.train.stages.common import posterior_moments

    data = make_dataset(f"synthetic:{n}", size)
    items = collate([data[i] for i in range(n)])
    image, mask = items["image"].to(device), items["mask"].to(device)  # (n, 3, H, W), (n, 1, H, W) 1 = product
    with torch.no_grad():
        vae, text = model.vae.to(device).eval(), model.text_encoder.to(device).eval()
        moments = posterior_moments(vae, image)
        context = text(model.tokenizer(items["caption"]).to(device)).float()
        product_latents = vae.encode(masked_image(image, product_repaint_mask(mask))).float()  # as the cache
    return {"moments": moments, "context": context, "image": image, "index": items["index"], "mask": mask,
            "product_latents": product_latents}


def _ours(job: dict, model, batch, device) -> tuple[list[float], list[tuple[float, float]], float]:
    from backdrop.train.core import TrainConfig, Trainer
    from backdrop.train.stages.common import DiffusionOptions
    from backdrop.train.stages.inpaint import InpaintStage
    from backdrop.train.stages.pretrain import PretrainStage

    opts = DiffusionOptions(caption_dropout=0.1)
    if job["stage"] == "pretrain":
        stage = PretrainStage(model, opts, device)
    else:  # inpaint: random masks; inpaint-product: the product kept, its masked-image latents from the batch
        stage = InpaintStage(model, opts, device, masks="random" if job["stage"] == "inpaint" else "product",
                             latent_mask="diffusers")  # the mask rule of the diffusers loop it is timed against
    cfg = TrainConfig(steps=10 ** 6, batch_size=job["batch"], lr=1e-5, precision=job["precision"], seed=0)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(stage, FixedBatch(batch), cfg, out, device=device, progress=False)
        return _timed(lambda: trainer.train_step()["loss"], job, device)  # the loss stays a tensor: no wait


def _peer(job: dict, model, batch, device) -> tuple[list[float], list[tuple[float, float]], float]:
    import diffusers
    import torch.nn.functional as F
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    from backdrop.diffusion.latents import host_to_device
    from backdrop.train.data import random_mask
    from backdrop.train.stages.inpaint import to_inpaint_model

    if job["stage"] != "pretrain":
        model = to_inpaint_model(model)
    cfg = model.config
    with torch.device("meta"):  # take our tensors as they are: identical weights, no second copy in memory
        unet = diffusers.UNet2DConditionModel.from_config(cfg.unet.to_diffusers()).to(model.unet.conv_in.weight.dtype)
        vae = diffusers.AutoencoderKL.from_config(cfg.vae.to_diffusers())
    unet.load_state_dict(model.unet.state_dict(), strict=True, assign=True)
    vae.load_state_dict(model.vae.state_dict(), strict=True, assign=True)
    unet, vae = unet.to(device).train(), vae.to(device).eval().requires_grad_(False)
    with torch.no_grad():
        empty = model.text_encoder.to(device)(model.tokenizer([""]).to(device)).float()
    del model
    scheduler = diffusers.DDPMScheduler.from_config(cfg.scheduler.to_diffusers(cfg.prediction_type))
    params = [p for p in unet.parameters() if p.requires_grad]
    # fused, as ours: the one-kernel AdamW is a constructor argument any diffusers loop can pass (its default, foreach,
    # took 4.9 s a step against 1.0 s over SD1.5's 860 M parameters on one CPU thread: most of the old "1.3x")
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": 1e-2},
                                   {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=1e-5,
                                  fused=True)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(job["precision"])
    g = torch.Generator().manual_seed(0)  # the Trainer's generator for seed 0, rank 0
    n = job["batch"]
    # Draws come from the CPU generator (the same numbers as ours: equal first losses) and reach the GPU by a
    # non-blocking copy, as ours: diffusers' example draws on the device, so a blocking copy would be our harness's
    # cost, not theirs. Its per-step loss read (avg_loss.item()) is its own and stays.
    h2d = lambda x: host_to_device(x, device)  # noqa: E731

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            drop = h2d(torch.rand(n, generator=g) < 0.1)
            context = torch.where(drop[:, None, None], empty, batch["context"])
            posterior = DiagonalGaussianDistribution(batch["moments"])  # .sample(g), its eps copied as above
            eps = h2d(torch.randn(posterior.mean.shape, generator=g))
            latents = (posterior.mean + posterior.std * eps) * cfg.scaling_factor
            concat = None
            if job["stage"] != "pretrain":
                if job["stage"] == "inpaint":
                    mask = h2d(torch.stack([random_mask(*batch["image"].shape[-2:], g) for _ in range(n)]))
                else:  # the product kept: data.inpaint_mask draws its coin per item, then 1 - the product mask
                    [torch.rand(1, generator=g) for _ in range(n)]
                    mask = 1 - batch["mask"]
                with torch.no_grad():
                    masked = vae.encode(batch["image"] * (mask < 0.5)).latent_dist.mean * cfg.scaling_factor
                lat_mask = F.interpolate((mask >= 0.5).float(), size=latents.shape[-2:])
                concat = torch.cat([lat_mask, masked.float()], 1)
            noise = h2d(torch.randn(latents.shape, generator=g))
            t = h2d(torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=g))
            noisy = scheduler.add_noise(latents, noise, t)
            x = noisy if concat is None else torch.cat([noisy, concat], 1)
            pred = unet(x, t, context).sample
            loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        return float(loss.detach())

    return _timed(step, job, device)


def _timed(step, job: dict, device) -> tuple[list[float], list[tuple[float, float]], float]:
    """warmup + timed calls of step() -> loss (a float or a 0-dim tensor): the losses, each timed step's (wall, CPU)
    seconds, and the timed steps' wall time between two device syncs (on a GPU a step may return before its work
    is done, so only the total is its throughput)."""
    losses, times = [], []
    for i in range(job["warmup"] + job["steps"]):
        if i == job["warmup"]:
            _sync(device)
            start = time.perf_counter()
        t0, c0 = time.perf_counter(), time.process_time()
        losses.append(step())
        times.append((time.perf_counter() - t0, time.process_time() - c0))
    _sync(device)
    return [float(x) for x in losses], times[job["warmup"]:], time.perf_counter() - start


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def worker(job: dict) -> dict:
    from backdrop.nn.checkpoint import init_model

    if job["threads"]:
        torch.set_num_threads(job["threads"])
    device = torch.device(job["device"])
    model = init_model(job["preset"], seed=0)  # the same random weights in every process
    if job["weights"] == "bf16":  # the UNet's weights, gradients and AdamW state in bf16 (half the memory)
        model.unet.to(torch.bfloat16)
    batch = _batch(model, job["size"], job["batch"], device)
    losses, times, total = (_ours if job["who"] == "ours" else _peer)(job, model, batch, device)
    # CPU: the median step (a step that lost its core to another process for a while does not count); GPU: the
    # mean over the timed steps (steps overlap). CPU seconds (this process, all threads) per step: on a shared
    # machine wall time includes waiting for a core
    wall, cpu = (statistics.median(t[i] for t in times) for i in (0, 1))
    if device.type == "cuda":
        wall = total / len(times)
    peak = torch.cuda.max_memory_reserved(device) / 2 ** 30 if device.type == "cuda" else 0.0
    return {"images_per_s": job["batch"] / wall, "images_per_cpu_s": job["batch"] / cpu, "first_loss": losses[0],
            "peak_gib": peak}


def _available_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2 ** 20
    except OSError:
        pass
    return float("inf")


def _spawn(job: dict) -> dict:
    p = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{job['who']} {job['stage']} {job['preset']}-{job['size']} failed (exit status "
                           f"{p.returncode}; -9: killed, e.g. out of memory):\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="sd15-256,sd15-512" if cuda else "tiny-64,sd15-256",
                    help=f"comma-separated, from {', '.join(CASES)}")
    ap.add_argument("--stages", default="pretrain,inpaint,inpaint-product")
    ap.add_argument("--out", type=Path, default=None,
                    help="CSV to update, its rows of the same case replaced (default: "
                         "benchmarks/results/train-<device>.csv)")
    ap.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="bf16" if cuda else "fp32")
    ap.add_argument("--weights", choices=("fp32", "bf16"), default="fp32",
                    help="dtype of the trained UNet's weights and AdamW state on both sides; bf16 halves the memory "
                         "(SD1.5 then fits in ~9 GiB) and needs --precision bf16 (default: fp32)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--repeats", type=int, default=2, help="processes per side, alternating (default: 2)")
    ap.add_argument("--steps", type=int, help="timed steps (default: per case and device)")
    ap.add_argument("--batch-size", type=int, help="images per step (default: per case and device, see CASES)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.weights == "bf16" and args.precision != "bf16":
        ap.error("--weights bf16 needs --precision bf16 (autocast feeds the bf16 weights bf16 inputs)")

    device = "cuda" if cuda else "cpu"
    desc, sha = machine(device, args.threads or torch.get_num_threads()), commit()  # on the CPU: load at start
    print(f"machine: {desc}; commit {sha}")
    rows = []
    for case in args.cases.split(","):
        preset, size, per_device = CASES[case]
        batch, steps = per_device[device]
        batch = args.batch_size or batch
        for stage in args.stages.split(","):
            need, have = NEED_GIB[preset] / (2 if args.weights == "bf16" else 1), _available_gib()
            if device == "cpu" and have < need:
                print(f"{stage:8s} {case:9s} skipped: needs ~{need} GiB free memory, {have:.1f} GiB available")
                continue
            job = {"stage": stage, "preset": preset, "size": size, "batch": batch, "steps": args.steps or steps,
                   "warmup": args.warmup, "precision": args.precision, "weights": args.weights, "device": device,
                   "threads": args.threads}
            load0 = os.getloadavg()[0]
            results = {"ours": [], "peer": []}
            try:
                for _ in range(args.repeats):
                    for who in ("peer", "ours"):
                        results[who].append(_spawn(job | {"who": who}))
            except RuntimeError as e:
                print(f"{stage:8s} {case:9s} failed: {str(e).splitlines()[0]}")
                continue
            best = {w: max(r["images_per_s"] for r in rs) for w, rs in results.items()}
            per_cpu = {w: max(r["images_per_cpu_s"] for r in rs) for w, rs in results.items()}
            ratio, cpu_ratio = best["ours"] / best["peer"], per_cpu["ours"] / per_cpu["peer"]
            load = (load0 + os.getloadavg()[0]) / 2
            print(f"{stage:8s} {case:9s} batch {batch} {args.precision}/{args.weights} weights: peer (diffusers loop) "
                  f"{best['peer']:.3f} img/s, ours {best['ours']:.3f} img/s, ratio {ratio:.2f}x (per CPU second: "
                  f"{per_cpu['peer']:.3f} vs {per_cpu['ours']:.3f}, {cpu_ratio:.2f}x); first loss "
                  f"{results['peer'][0]['first_loss']:.5f} vs {results['ours'][0]['first_loss']:.5f}; load {load:.1f}")
            rows.append({"date": date.today().isoformat(), "device": device, "machine": desc, "commit": sha,
                         "threads": args.threads or torch.get_num_threads(), "stage": stage, "case": case,
                         "batch": batch, "precision": args.precision, "weights": args.weights, "steps": job["steps"],
                         "peer_images_per_s": round(best["peer"], 4), "ours_images_per_s": round(best["ours"], 4),
                         "ratio": round(ratio, 3), "peer_images_per_cpu_s": round(per_cpu["peer"], 4),
                         "ours_images_per_cpu_s": round(per_cpu["ours"], 4), "cpu_ratio": round(cpu_ratio, 3),
                         "peer_first_loss": results["peer"][0]["first_loss"],
                         "ours_first_loss": results["ours"][0]["first_loss"], "load_average": round(load, 1),
                         **{f"{w}_peak_gib": round(max(r.get("peak_gib", 0.0) for r in rs), 2)
                            for w, rs in results.items()}})
            # after every row: a run cut short keeps what it measured
            _write(args.out or RESULTS / f"train-{device}.csv", rows)
    return 0


def _write(path: Path, rows: list[dict]) -> None:
    """Add `rows` to the CSV, replacing earlier rows of the same measurement (stage, case, precisions, threads).
    Earlier rows with columns this script no longer writes, or without the key columns, are dropped; rows of
    files older than a column (e.g. commit) are kept, with that column empty."""
    fields = ("stage", "case", "precision", "weights", "threads")
    key = lambda r: tuple(str(r[k]) for k in fields)  # noqa: E731
    new = {key(r) for r in rows}
    old = []
    if path.is_file():
        with open(path, newline="") as f:
            old = [r for r in csv.DictReader(f) if set(fields) <= set(r) <= set(rows[0]) and key(r) not in new]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), restval="")
        w.writeheader()
        w.writerows(old + rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    raise SystemExit(main())
