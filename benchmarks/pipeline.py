"""Images per second and peak memory of text-to-image (also with a ControlNet) and inpainting: Backdrop's Pipeline
vs diffusers' pipelines on identical weights, same sampler (DPM-Solver++ 2M), steps, size, guidance 7.5, batch 1 and
4, in one run.

    .venv/bin/python benchmarks/pipeline.py [--models tiny,sd15] [--tasks txt2img,inpaint] [--batches 1,4]
                                           [--steps 4] [--repeats 1] [--cache DIR]
                                           [--impls diffusers:fp32,diffusers:bf16,ours:fp32,ours:default]

Models: random weights in full SD1.5 shapes ("sd15"; the 9-channel "sd15-inpaint" for inpainting) and the tiny
preset, built with init_model, saved once as diffusers folders (--cache) and loaded by both sides. CPU: SD1.5 at
256x256 and the tiny model at its native 64x64; CUDA: SD1.5 at 512x512. Every configuration runs in its own
process (so peak memory is its own: RSS on the CPU, torch.cuda.max_memory_allocated on GPU), loads the model,
warms up with one 1-step image (page-faults the weights, builds oneDNN primitives), then times --repeats calls
and keeps the best. Besides wall-clock images/s we report CPU-seconds per image, which a shared machine disturbs
less (wall time there depends on what else runs; the load average is printed with every row).

On CUDA the implementations are diffusers fp32 and fp16 (eager, SDPA attention), ours fp32 and fp16, and
ours:graphs (fp16 with the UNet replayed from CUDA graphs, as `backdrop serve` runs); ours:cl (an experiment, not
in the defaults: our default dtype with channels-last weights; slower on this CPU, unmeasured on a GPU, where
cuDNN's fp16 convolutions prefer NHWC and our transformer's token permutes become views); the issue's goals at 512x512,
30 steps, batch 1: `python benchmarks/pipeline.py --models sd15 --batches 1 --steps 30 --repeats 3`.
steps_per_s is steps / wall time of the whole call (text encoding and VAE decode included), a lower bound on the
denoising loop's rate that progress bars (and stable-fast's figures) report; one step is one guided UNet call.

Task "controlnet" (not in the default --tasks): text-to-image with one ControlNet, ours (`Pipeline.from_pretrained(
model, controlnet=DIR)`, `generate(control_image=edges)`) vs diffusers' StableDiffusionControlNetPipeline (`image=
edges`), everything else as txt2img. The ControlNet has random weights (nn/testing.randomize_: its zero convs too,
so its residuals count) in the real shape for the model's UNet: lllyasviel's control_v11 conditioning embedding (16,
32, 96, 256) for sd15, (8, 16, 16, 32) for tiny; built once beside the models (--cache). The control image is a
synthetic edge map (white lines on black) of the output size (random weights barely look at it, yet a flipped one
moves the tiny model's fp32 output to 73 dB, well below the ~130 dB of parity). With a ControlNet our calls run the
UNet eagerly, not from CUDA graphs, so the ours:graphs row of this task measures that (fp16, eager). E.g. on this
CPU, with txt2img for the ratio's context: `.venv/bin/python benchmarks/pipeline.py --models tiny --tasks
txt2img,controlnet --batches 1 --steps 4`; on CUDA: `python benchmarks/pipeline.py --models sd15 --tasks
txt2img,controlnet --batches 1 --steps 30 --repeats 3`.

Ratios: "same precision" is ours / diffusers at the same dtype, nothing else changed (ours:graphs: plus graphs); "vs
diffusers default" is ours at our default settings, the ones `backdrop generate` and `backdrop inpaint` run with
(Pipeline.from_pretrained's default_dtype, and backdrop.runtime.keep_freed_memory on the CPU), / diffusers at its
default, fp32. Quality: PSNR of each output against ours in fp32 on the same seeds. For text-to-image, with or
without ControlNet, the two pipelines compute the same image (same per-item noise), so diffusers' PSNR there is a
parity check; for inpainting they do not (ours dilates the mask and pastes the product back, diffusers samples the
masked-image latents from the VAE posterior), so there it is only informative; the exact parity tests are
tests/test_pipeline.py. Results: printed, and written into benchmarks/results/pipeline-<device>.csv (--out), this
run's rows replacing the earlier ones of their configuration; a ratio divides rows of one invocation only (the `run`
column)."""
from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from common import commit, machine, random_model

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT, NEGATIVE = "a glass bottle on a marble table, soft light", "blurry, text"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
INPAINT_PRESET = {"tiny": "tiny-inpaint", "sd15": "sd15-inpaint"}


# ------------------------------------------------------------------------------------------------------ inputs

def product_inputs(size: int):
    """A synthetic product shot: colour ramps + noise, and the product mask (white = keep) of a centred bottle."""
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.stack([yy, xx, 1 - yy], -1) * 200 + rng.normal(0, 10, (size, size, 3))
    product = np.zeros((size, size), np.uint8)
    product[size // 4: size - size // 8, 3 * size // 8: 5 * size // 8] = 255
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)), Image.fromarray(product)


def edge_map(size: int):
    """The control image: a synthetic edge map, white lines (size / 32 wide) on black, of the bottle's outline, the
    table's edge and a few fixed random lines."""
    from PIL import Image

    a, w = np.zeros((size, size, 3), np.uint8), max(1, size // 32)
    top, bottom, left, right = size // 4, size - size // 8, 3 * size // 8, 5 * size // 8
    a[top:top + w, left:right] = a[bottom - w:bottom, left:right] = 255  # the bottle's box
    a[top:bottom, left:left + w] = a[top:bottom, right - w:right] = 255
    a[2 * size // 3:2 * size // 3 + w, :] = 255  # the table's edge
    rng = np.random.default_rng(0)
    for _ in range(3):
        y, x = rng.integers(0, size - w, 2)
        a[y:y + w, : size // 3] = 255
        a[: size // 3, x:x + w] = 255
    return Image.fromarray(a)


CONTROL_EMBED = {"tiny": (8, 16, 16, 32), "sd15": (16, 32, 96, 256)}  # sd15: lllyasviel's control_v11 widths


def random_controlnet(model: str, cache: Path) -> Path:
    """A diffusers ControlNetModel folder with random weights (randomize_, seed 0: the zero convs too) for the
    UNet of preset `model`, in the real shape (CONTROL_EMBED), built once under `cache`."""
    folder = cache / f"{model}-controlnet"
    if not (folder / "config.json").is_file():
        import diffusers

        from backdrop.nn.config import PRESETS
        from backdrop.nn.controlnet import ControlNetConfig
        from backdrop.nn.testing import randomize_

        print(f"building random {model} ControlNet in {folder} ...", flush=True)
        cfg = ControlNetConfig(PRESETS[model].unet, CONTROL_EMBED[model])
        net = diffusers.ControlNetModel.from_config(cfg.to_diffusers()).eval()
        randomize_(net, seed=0)
        net.save_pretrained(folder)
    return folder


def prepare(model: str, task: str, cache: Path) -> tuple[Path, Path | None]:
    """The diffusers folder of a random-weight model, built once (the 9-channel variant for inpainting), and that
    of its ControlNet for task "controlnet" (else None)."""
    folder = random_model(INPAINT_PRESET[model] if task == "inpaint" else model, cache)
    return folder, random_controlnet(model, cache) if task == "controlnet" else None


# ------------------------------------------------------------------------------------------------------ worker

def _ours(folder, dtype, device, controlnet=None):
    from backdrop.diffusion.pipeline import Pipeline
    from backdrop.runtime import keep_freed_memory

    if dtype == "default":  # our defaults are what `backdrop generate|inpaint` run with: they keep freed memory
        keep_freed_memory()

    pipe = Pipeline.from_pretrained(folder, device=device, controlnet=controlnet,
                                    dtype=None if dtype in ("default", "graphs", "cl") else dtype)
    name = str(pipe.backend.dtype).removeprefix("torch.")
    if dtype == "cl":  # an experiment: our default dtype with channels-last UNet and VAE weights (NHWC convs)
        for part in (pipe.backend.model.unet, pipe.backend.model.vae):
            part.to(memory_format=torch.channels_last)
    if dtype == "graphs":  # our default dtype, the UNet replayed from CUDA graphs, as `backdrop serve` runs on a GPU
        from backdrop.serve.cuda_graphs import GraphedBackend

        nets, pipe = pipe.controlnet, Pipeline(GraphedBackend(pipe.backend))
        pipe.controlnet = nets  # as serve's with_cuda_graphs: calls with a ControlNet run the UNet eagerly

    def call(task, batch, steps, size, seeds):
        common = dict(negative_prompt=NEGATIVE, seed=seeds, steps=steps, sampler="dpmpp-2m", guidance_scale=7.5,
                      output_type="np", progress=False)
        if task == "txt2img":
            return pipe.generate([PROMPT] * batch, height=size, width=size, **common).images
        if task == "controlnet":  # one control image for every item
            return pipe.generate([PROMPT] * batch, height=size, width=size, control_image=edge_map(size),
                                 **common).images
        image, product = product_inputs(size)
        return pipe.inpaint(image, product_mask=product, prompt=[PROMPT] * batch, **common).images
    return call, name


def _diffusers(folder, dtype, device, controlnet=None):
    import diffusers
    from PIL import ImageOps

    task_cls = {"txt2img": diffusers.StableDiffusionPipeline, "inpaint": diffusers.StableDiffusionInpaintPipeline}
    cls = task_cls["inpaint" if "inpaint" in Path(folder).name else "txt2img"]
    extra = {}
    if controlnet is not None:
        cls = diffusers.StableDiffusionControlNetPipeline
        extra = dict(controlnet=diffusers.ControlNetModel.from_pretrained(controlnet, torch_dtype=DTYPES[dtype]))
    pipe = cls.from_pretrained(folder, torch_dtype=DTYPES[dtype], safety_checker=None, feature_extractor=None,
                               requires_safety_checker=False, **extra).to(device)
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)  # = "dpmpp-2m"
    pipe.set_progress_bar_config(disable=True)

    def call(task, batch, steps, size, seeds):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        common = dict(prompt=[PROMPT] * batch, negative_prompt=[NEGATIVE] * batch, num_inference_steps=steps,
                      guidance_scale=7.5, height=size, width=size, generator=gens, output_type="np")
        if task == "txt2img":
            return pipe(**common).images
        if task == "controlnet":  # one control image, repeated for the batch by diffusers
            return pipe(image=edge_map(size), **common).images
        image, product = product_inputs(size)
        # one image and mask for the batch: a list of `batch` copies beside per-item generators makes diffusers run
        # the VAE encoder once per item, where ours (and diffusers given one image) encodes it once
        return pipe(image=image, mask_image=ImageOps.invert(product), strength=1.0, **common).images
    return call, str(DTYPES.get(dtype, torch.float32)).removeprefix("torch.")  # diffusers' default: fp32


def worker(spec: dict) -> dict:
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    call, dtype = (_ours if spec["impl"] == "ours" else _diffusers)(spec["folder"], spec["dtype"], device,
                                                                    spec.get("controlnet"))
    seeds = list(range(100, 100 + spec["batch"]))
    call(spec["task"], 1, 1, spec["size"], seeds[:1])  # warm-up: touches every weight, builds the primitives
    if spec["batch"] > 1:  # and those of the timed batch (oneDNN; on CUDA Triton specialises on it, graphs capture)
        call(spec["task"], spec["batch"], 1, spec["size"], seeds)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    best = None
    for _ in range(spec["repeats"]):
        sync()
        w, c = time.perf_counter(), time.process_time()
        images = call(spec["task"], spec["batch"], spec["steps"], spec["size"], seeds)
        sync()
        w, c = time.perf_counter() - w, time.process_time() - c
        best = (w, c) if best is None or w < best[0] else best
    np.save(spec["images"], np.asarray(images, np.float32))
    # reserved, not allocated: a CUDA graph's intermediates live in its pool and count as free once captured
    peak = (torch.cuda.max_memory_reserved() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux: KB
    return dict(wall_s=best[0], cpu_s=best[1], peak_mb=peak / 2**20, dtype=dtype)


# ------------------------------------------------------------------------------------------------------ driver

def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(1.0 / mse))


def run_one(spec: dict) -> dict | None:
    """One configuration in its own process; None (its error printed) if it failed, so the others still run."""
    load = os.getloadavg()[0]
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        print(f"  worker FAILED: {spec['impl']}:{spec['dtype']} {spec['task']} b{spec['batch']}\n{r.stderr[-3000:]}",
              flush=True)
        return None
    return dict(json.loads(r.stdout.strip().splitlines()[-1]), load=round((load + os.getloadavg()[0]) / 2, 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="tiny,sd15")
    ap.add_argument("--tasks", default="txt2img,inpaint")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed calls per configuration, best kept (default: 5 for tiny, 1 for sd15)")
    ap.add_argument("--impls", default=None, help="impl:dtype list, run in this order (default: diffusers fp32 "
                                                  "and bf16, ours fp32 and default; on CUDA fp16 and fp32)")
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "backdrop-bench"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads in every worker (default: "
                                                             "torch's, one per core)")
    ap.add_argument("--out", type=Path, default=None, help="CSV merged into and rewritten (default: "
                                                          "benchmarks/results/pipeline-<device>.csv)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)  # for the machine line; each worker sets its own
    # on CUDA our default is fp16 with nothing else (keep_freed_memory is for the CPU), so ours:fp16 stands for it
    # and is compared with diffusers:fp16 (the issue's goal), not with diffusers' fp32 default; ours:graphs adds
    # the CUDA-graph UNet of `backdrop serve`, compared with diffusers:fp16 too
    impls = args.impls or ("diffusers:fp32,diffusers:fp16,ours:fp32,ours:fp16,ours:graphs" if cuda else
                           "diffusers:fp32,diffusers:bf16,ours:fp32,ours:default")
    impls = [tuple(s.split(":")) for s in impls.split(",")]
    path = args.out or RESULTS / f"pipeline-{device.type}.csv"
    cache, rows, old = Path(args.cache), [], read(path)
    merged, run = old, time.strftime("%Y-%m-%dT%H:%M:%S")  # the invocation: ratios only within one
    desc, sha = machine(str(device)), commit()  # the CPU's line carries its bf16 support and the load average
    print(f"machine: {desc}; commit {sha}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            size = 512 if cuda and model == "sd15" else (256 if model == "sd15" else 64)
            for task in args.tasks.split(","):
                folder, controlnet = prepare(model, task, cache)
                for batch in map(int, args.batches.split(",")):
                    group = []
                    for impl, setting in impls:
                        spec = dict(impl=impl, dtype=setting, folder=str(folder), task=task, batch=batch,
                                    controlnet=controlnet and str(controlnet),
                                    steps=args.steps, size=size, device=str(device),
                                    repeats=args.repeats or (5 if model == "tiny" else 1), threads=args.threads,
                                    images=os.path.join(tmp, f"{impl}-{setting}.npy"))
                        res = run_one(spec)
                        if res is None:
                            continue
                        print(f"  {model:5s} {task:10s} b{batch} {impl:9s} {setting:8s} {res['dtype']:9s} "
                              f"{batch / res['wall_s']:7.4f} img/s  {res['cpu_s'] / batch:7.2f} cpu-s/img  "
                              f"{res['peak_mb']:7.0f} MB  (load {res['load']})", flush=True)
                        group.append(dict(
                            benchmark=f"{task} {model} {size}x{size}", steps=args.steps, batch=batch,
                            threads=torch.get_num_threads(), impl=impl, setting=setting, dtype=res["dtype"],
                            images_per_s=round(batch / res["wall_s"], 5),
                            steps_per_s=round(args.steps / res["wall_s"], 3),
                            cpu_s_per_image=round(res["cpu_s"] / batch, 3), peak_mb=round(res["peak_mb"]),
                            load_avg=res["load"], images=np.load(spec["images"])))
                    ref = next((g for g in group if g["impl"] == "ours" and g["dtype"] == "float32"), None)
                    for g in group:  # quality: each output against ours in fp32, same seeds
                        if ref is not None and g is not ref:
                            g["psnr_vs_ours_fp32_db"] = round(psnr(g["images"], ref["images"]), 1)
                    rows += [{k: v for k, v in g.items() if k != "images"}
                             | dict(machine=desc, commit=sha, date=str(date.today()), run=run) for g in group]
                    merged = write(old, rows, path)  # after every group: a run cut short keeps what it measured
    report(merged)


KEY = ("benchmark", "steps", "batch", "threads", "impl", "setting")


def merge(old: list[dict], new: list[dict]) -> list[dict]:
    """This run's rows replace the earlier rows of their configuration; the others are kept as they were. (Files
    written before the `run` column kept the best of several runs per configuration, a bias toward whichever side
    was rerun more: their ratios may divide runs of different days.)"""
    rows = {tuple(str(r[k]) for k in KEY): r for r in old}
    rows |= {tuple(str(r[f]) for f in KEY): r for r in new}
    return list(rows.values())


def ratios(rows: list[dict]) -> None:
    """Ours vs diffusers at the same dtype, and ours at our default settings vs diffusers at its default (fp32)."""
    def find(r, impl, dtype):  # the peer row of the same configuration and the same invocation
        return next((p for p in rows if p["impl"] == impl and p["dtype"] == dtype and p.get("run") == r.get("run")
                     and all(str(p[k]) == str(r[k]) for k in KEY[:4])), None)
    for r in rows:
        for k in ("speedup_same_precision", "cpu_speedup_same_precision", "speedup_vs_diffusers_default",
                  "cpu_speedup_vs_diffusers_default"):
            r[k] = ""
        if r["impl"] != "ours":
            continue
        # "default" runs with our process settings too (keep_freed_memory), so it is compared with diffusers'
        # default only; the same-precision comparison is the explicit dtype rows (ours:bf16 vs diffusers:bf16).
        for prefix, peer in (("same_precision", find(r, "diffusers", r["dtype"]) if r["setting"] != "default"
                              else None),
                             ("vs_diffusers_default", find(r, "diffusers", "float32")
                              if r["setting"] == "default" else None)):
            if peer is not None:
                r[f"speedup_{prefix}"] = round(float(r["images_per_s"]) / float(peer["images_per_s"]), 2)
                r[f"cpu_speedup_{prefix}"] = round(float(peer["cpu_s_per_image"]) / float(r["cpu_s_per_image"]),
                                                   2)


def read(path: Path) -> list[dict]:
    """The rows of the results file (benchmarks/results/pipeline-<device>.csv) from earlier runs."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        old = list(csv.DictReader(f))
    for r in old:  # early files named diffusers' dtypes by their setting ("fp32") and had no threads column
        r["dtype"] = str(DTYPES.get(r["dtype"], r["dtype"])).removeprefix("torch.")
        r["threads"] = r.get("threads") or r["machine"].split(" threads")[0].rsplit(" ", 1)[-1]
    return old


def write(old: list[dict], rows: list[dict], path: Path) -> list[dict]:
    """Merge this run's rows into the earlier ones (see `merge`), recompute the ratios and write
    the file: rerunning one model or configuration updates its rows and keeps the others."""
    path.parent.mkdir(parents=True, exist_ok=True)
    merged = merge([dict(r) for r in old], rows)
    ratios(merged)
    # the union of all rows' columns, in this run's order first (so a column older files lack, such as commit,
    # sits where a fresh file has it); a row without a column writes it empty
    fields = list(dict.fromkeys(k for r in rows + merged for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, restval="")
        w.writeheader()
        w.writerows(merged)
    print(f"wrote {path}")
    return merged


def report(rows: list[dict]) -> None:
    print(f"{'benchmark':30s} {'b':>2s} {'t':>2s} {'impl':9s} {'setting':8s} {'img/s':>8s} {'cpu-s/img':>9s} "
          f"{'MB':>6s} {'same-prec':>9s} {'vs-default':>10s} {'PSNR':>6s} runs")
    for r in rows:
        print(f"{r['benchmark']:30s} {r['batch']!s:>2s} {r['threads']!s:>2s} {r['impl']:9s} {r['setting']:8s} "
              f"{float(r['images_per_s']):8.4f} {float(r['cpu_s_per_image']):9.2f} {float(r['peak_mb']):6.0f} "
              f"{r['speedup_same_precision']!s:>9s} {r['speedup_vs_diffusers_default']!s:>10s} "
              f"{r.get('psnr_vs_ours_fp32_db', '')!s:>6s} {r.get('runs', '')}")


if __name__ == "__main__":
    main()
