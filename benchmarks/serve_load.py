"""Serving throughput and latency with dynamic batching on vs off, over loopback HTTP.

    .venv/bin/python benchmarks/serve_load.py [--model PATH|PRESET] [--size PX] [--concurrency 1,2,4,8,16,32]
        [--steps 4] [--max-batch-size 8] [--max-queue-delay-ms 50] [--threads 1] [--min-requests 96]
        [--max-seconds 90] [--repeats 3] [--device cpu|cuda] [--cache DIR]

    on a GPU, the issue's goal (SD1.5 inpainting at 512x512, 30 steps; ~10 minutes):
    python benchmarks/serve_load.py --device cuda --model sd15-inpaint --size 512 --steps 30 \
        --concurrency 1,8,16 --repeats 1 --min-requests 32 --max-seconds 60

Starts `backdrop serve` twice as subprocesses on 127.0.0.1 (a model folder or file, or a preset name such as
tiny-inpaint, the default, or sd15-inpaint, built once with random weights under --cache): one with
--max-batch-size N (batching on), one with 1 (off), same everything else, both up for the whole run. For each
concurrency c, c closed-loop clients (asyncio + httpx) each send POST /v1/images/edits (an RGBA product
cut-out, --size pixels square, the model's native size by default, n = 1, its own seed) and send the next as
soon as the answer arrives, until
max(min-requests, 2c) requests are done or --max-seconds pass. Each level runs --repeats times on each server,
the two servers taking turns (on, off, on, off, ...), so that a slow spell of a shared machine or the order of
the runs does not land on one side; the row of each (server, c) is its run with the median images/s, and
`runs` / `runs_mean_batch` list the images/s / mean batch of all. Reports images/s (answered images / wall
time of the level), latency p50/p95/p99 (nearest rank; with 16-64 samples p99 is about the maximum), the mean
batch size the server actually ran (from its /metrics histogram), and the load average before and after.
Results: printed, and benchmarks/results/serve-<device>.csv.
"""
from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from common import commit, machine, random_model

RESULTS = Path(__file__).resolve().parent / "results"


def product_png(seed: int, size: int = 64) -> bytes:
    """An RGBA cut-out: noisy background at alpha 0 (to repaint), an opaque disc in the middle (kept)."""
    rng = np.random.default_rng(seed)
    rgba = np.zeros((size, size, 4), np.uint8)
    rgba[..., :3] = rng.integers(0, 256, (size, size, 3))
    yy, xx = np.mgrid[:size, :size]
    rgba[..., 3] = np.where(np.hypot(yy - size / 2, xx - size / 2) < size * 0.3, 255, 0)
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, "PNG")
    return buf.getvalue()


def prepare(model: str, cache: Path, size: int | None) -> tuple[str, int]:
    """The model to serve (a preset name is built once under `cache` with random weights) and the edit size."""
    from backdrop.nn.config import PRESETS

    native = 512                                 # a single file: SD's
    if model in PRESETS and not Path(model).exists():
        model, native = str(random_model(model, cache)), PRESETS[model].image_size
    elif (Path(model) / "unet" / "config.json").is_file():  # a diffusers folder: the UNet's sample size x 8
        native = 8 * json.loads((Path(model) / "unet" / "config.json").read_text())["sample_size"]
    return model, size or native


def batch_stats(url: str) -> tuple[float, int]:
    from backdrop.serve.metrics import parse_histogram

    h = parse_histogram(httpx.get(f"{url}/metrics").text, "backdrop_batch_size")
    return h["sum"], h["count"]


class Server:
    def __init__(self, model: str, batch: int, args):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "backdrop", "serve", model, "--port", str(self.port), "--device", args.device,
               "--max-batch-size", str(batch), "--max-queue-delay-ms", str(args.max_queue_delay_ms),
               "--max-queue", "256", "--steps", str(args.steps), "--log-level", "warning"]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))  # torch's intra-op threads in the server
        self.proc = subprocess.Popen(cmd, env=env)
        end = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"the server did not come up: {' '.join(cmd)}")
            try:
                if httpx.get(f"{self.url}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(120)


async def level(url: str, concurrency: int, total: int, max_seconds: float, images: list[bytes]) -> dict:
    latencies, errors, sent = [], 0, 0
    t0 = time.perf_counter()

    async def client(worker: int):
        nonlocal sent, errors
        async with httpx.AsyncClient(timeout=600) as http:
            while sent < total and time.perf_counter() - t0 < max_seconds:
                i = sent
                sent += 1
                start = time.perf_counter()
                r = await http.post(f"{url}/v1/images/edits",
                                    files={"image": ("p.png", images[i % len(images)], "image/png")},
                                    data={"prompt": f"product photo, backdrop {i}", "seed": str(i)})
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - start)
                else:
                    errors += 1
    await asyncio.gather(*(client(w) for w in range(concurrency)))
    wall = time.perf_counter() - t0
    lat = sorted(latencies)

    def pct(p):  # nearest rank
        return lat[max(0, min(len(lat) - 1, int(np.ceil(p / 100 * len(lat))) - 1))] if lat else float("nan")
    return {"requests": len(lat), "errors": errors, "seconds": round(wall, 2),
            "images_per_s": round(len(lat) / wall, 3), "p50_s": round(pct(50), 3), "p95_s": round(pct(95), 3),
            "p99_s": round(pct(99), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-inpaint",
                        help="model folder or file, or a preset name built with random weights (default: %(default)s)")
    parser.add_argument("--size", type=int, default=None, help="edit size in pixels (default: the model's native)")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "backdrop-bench"),
                        help="where presets are built, once (default: %(default)s)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--concurrency", default="1,2,4,8,16,32")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-queue-delay-ms", type=float, default=50, help="the server's default")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads in the server")
    parser.add_argument("--min-requests", type=int, default=96,
                        help="requests per concurrency level at least (a level of ~1 s is noise on a quiet CPU)")
    parser.add_argument("--max-seconds", type=float, default=90, help="per concurrency level")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each level on each server; the median")
    parser.add_argument("--out", type=Path, default=None,
                        help="CSV to write (default: benchmarks/results/serve-<device>.csv)")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    model, size = prepare(args.model, Path(args.cache), args.size)
    images = [product_png(s, size) for s in range(8)]
    modes = (("batching", args.max_batch_size), ("no batching", 1))
    servers = []
    try:
        for _, batch in modes:
            servers.append(Server(model, batch, args))
        for server in servers:  # first-request effects out of the numbers, and every batch size the levels see
            asyncio.run(level(server.url, 1, 2, 60, images))
            asyncio.run(level(server.url, max(levels), 2 * max(levels), 120, images))
        rows = []
        for c in levels:
            runs = {mode: [] for mode, _ in modes}
            for _ in range(args.repeats):
                for (mode, batch), server in zip(modes, servers):
                    load0 = os.getloadavg()[0]
                    s0, n0 = batch_stats(server.url)
                    row = asyncio.run(level(server.url, c, max(args.min_requests, 2 * c), args.max_seconds,
                                            images))
                    s1, n1 = batch_stats(server.url)
                    row = {"mode": mode, "max_batch_size": batch, "concurrency": c, **row,
                           "mean_batch": round((s1 - s0) / max(1, n1 - n0), 2),
                           "load_avg_before": round(load0, 2), "load_avg_after": round(os.getloadavg()[0], 2)}
                    runs[mode].append(row)
                    print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
            for mode, _ in modes:
                ordered = sorted(runs[mode], key=lambda r: r["images_per_s"])
                rows.append({**ordered[len(ordered) // 2],
                             "runs": " ".join(str(r["images_per_s"]) for r in runs[mode]),
                             "runs_mean_batch": " ".join(str(r["mean_batch"]) for r in runs[mode])})
    finally:
        for server in servers:
            server.stop()

    meta = {"model": f"{args.model}{' (random weights)' if not Path(args.model).exists() else ''}, "
                     f"{size}x{size} edits", "steps": args.steps,
            "sampler": "dpmpp-2m", "max_queue_delay_ms": args.max_queue_delay_ms, "device": args.device,
            "machine": machine(args.device, args.threads), "commit": commit(), "date": date.today().isoformat()}
    out = args.out or RESULTS / f"serve-{args.device}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*rows[0], *meta])
        writer.writeheader()
        writer.writerows({**r, **meta} for r in rows)
    print(f"\n{'concurrency':>11} {'on img/s':>9} {'off img/s':>9} {'ratio':>6} {'on p50/p95/p99 s':>20} "
          f"{'off p50/p95/p99 s':>20}")
    by = {(r["mode"], r["concurrency"]): r for r in rows}
    for c in levels:
        on, off = by[("batching", c)], by[("no batching", c)]
        ratio = on["images_per_s"] / off["images_per_s"] if off["images_per_s"] else float("nan")
        print(f"{c:>11} {on['images_per_s']:>9.2f} {off['images_per_s']:>9.2f} {ratio:>6.2f} "
              f"{on['p50_s']:>6.2f}/{on['p95_s']:.2f}/{on['p99_s']:.2f} {off['p50_s']:>8.2f}/{off['p95_s']:.2f}/"
              f"{off['p99_s']:.2f}")
    print(f"machine: {meta['machine']}; {meta['model']}, {args.steps} steps; results: {out}")


if __name__ == "__main__":
    main()
