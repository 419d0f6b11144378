"""The one training loop every stage uses (nanoGPT-sized).

A stage (train/stages/*.py) supplies only what is its own: the module to train, a loss over a batch, and how to
write the final model. This file owns everything else: AdamW with warmup + cosine decay, bf16/fp16 autocast (the
trainable weights stay fp32; fp16 uses a grad scaler), gradient accumulation and clipping, gradient checkpointing,
EMA, DDP under torchrun (gloo on CPU, nccl on GPU) with gradient sync only on the last micro-step, logging to tqdm
and a JSONL file, and checkpoints that are atomic and resume exactly (model, EMA, optimizer, LR schedule, step, data
position and every RNG), so a stopped-and-resumed CPU run ends with the same weights as a straight run.

Checkpoints contain no pickle: tensors go to safetensors, everything else to JSON.
"""
from __future__ import annotations

import contextlib
import copy
import gc
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import torch
import torch.distributed as dist
from torch import nn

from ..diffusion.latents import host_to_device
from ..fsio import append_line
from . import checkpointing as ckpt
from . import rng

__all__ = ["TrainConfig", "ConfigError", "Stage", "Trainer", "StopRequested", "EMA", "lr_at", "join_process_group"]


class ConfigError(ValueError):
    """A config field out of range; `field`, `value` and `want` let the command line name its own option."""

    def __init__(self, owner: str, field: str, value, want: str):
        super().__init__(f"{owner}: {field} must be {want}, got {value!r}")
        self.field, self.value, self.want = field, value, want


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000                 # optimizer steps (each of grad_accum micro-batches)
    batch_size: int = 8               # per-process micro-batch
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0             # linear warm-up from 0 (Goyal et al. 2017)
    lr_schedule: str = "cosine"       # "cosine" (to min_lr_ratio * lr at the last step) or "constant"
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0            # max global grad norm; 0 disables
    precision: str = "fp32"           # "fp32" | "bf16" | "fp16" (autocast; fp16 adds a grad scaler)
    ema_decay: float = 0.0            # 0 disables EMA; e.g. 0.999 for short runs, 0.9999 for long ones
    ema_start_step: int = 0           # before this step the EMA copies the weights
    ema_warmup: bool = True           # decay ramps as (1+n)/(10+n) (Tarvainen & Valpola; diffusers' EMAModel)
    gradient_checkpointing: bool = False
    save_every: int = 0               # 0: only the final checkpoint
    keep_last: int = 2
    log_every: int = 10
    seed: int = 0

    def __post_init__(self):
        rules = [("precision", self.precision in ("fp32", "bf16", "fp16"), "fp32, bf16 or fp16"),
                 ("lr_schedule", self.lr_schedule in ("cosine", "constant"), "cosine or constant"),
                 *((name, getattr(self, name) >= 1, ">= 1")
                   for name in ("steps", "batch_size", "grad_accum", "log_every")),
                 *((name, getattr(self, name) >= 0, ">= 0")
                   for name in ("weight_decay", "warmup_steps", "grad_clip", "save_every", "keep_last",
                                "ema_start_step")),
                 ("lr", 0 < self.lr < math.inf, "> 0"),
                 ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "in [0, 1]"),
                 # decay 1 would freeze the EMA at the initial weights; above 1 it diverges
                 ("ema_decay", 0 <= self.ema_decay < 1, "in [0, 1) (0: off)")]
        for name, ok, want in rules:
            if not ok:
                raise ConfigError("TrainConfig", name, getattr(self, name), want)


class Stage(Protocol):
    """What a stage supplies. `loss` receives the (possibly DDP-wrapped) trainable module."""

    def trainable(self) -> nn.Module: ...

    def loss(self, model: nn.Module, batch: Any, generator: torch.Generator) -> tuple[torch.Tensor, dict]: ...

    def save_final(self, module: nn.Module, out_dir: Path) -> None: ...


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up, then cosine to min_lr_ratio * lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    span = max(1, cfg.steps - cfg.warmup_steps - 1)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class EMA:
    """Exponential moving average of a module's floating-point parameters and buffers (kept in fp32)."""

    def __init__(self, module: nn.Module, decay: float, start_step: int = 0, warmup: bool = True):
        self.decay, self.start_step, self.warmup = decay, start_step, warmup
        self.shadow = {k: v.detach().float().clone() for k, v in module.state_dict().items() if v.is_floating_point()}

    def decay_at(self, step: int) -> float:
        if step < self.start_step:
            return 0.0  # copy the weights until EMA starts
        n = step - self.start_step
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        """shadow <- lerp(shadow, weights, 1 - decay), all tensors in one foreach call (as torch.optim.swa_utils'
        EMA): on a GPU one launch per chunk of tensors instead of one per tensor (~700 for SD1.5's UNet)."""
        state = module.state_dict()
        keys = [k for k in self.shadow if k in state]
        torch._foreach_lerp_([self.shadow[k] for k in keys], [state[k].detach().float() for k in keys],
                             1.0 - self.decay_at(step))

    def copy_to(self, module: nn.Module) -> None:
        state = module.state_dict()
        module.load_state_dict({k: self.shadow[k].to(state[k].dtype) if k in self.shadow else v
                                for k, v in state.items()})


def _check_weights(saved: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """Strict loading with errors that name a key: a checkpoint of another stage or model shape is refused here,
    not by load_state_dict's wall of every key."""
    missing, unexpected = sorted(want.keys() - saved.keys()), sorted(saved.keys() - want.keys())
    if missing or unexpected:
        raise ValueError(f"the checkpoint holds other weights than this run trains ({len(missing)} missing, e.g. "
                         f"{missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]}): a checkpoint of "
                         "another stage or model?")
    for k, v in want.items():  # in the module's order: the first mismatch is the one nearest the input
        if saved[k].shape != v.shape:
            raise ValueError(f"the checkpoint's {k} is {tuple(saved[k].shape)}, this run's model has "
                             f"{tuple(v.shape)}: a checkpoint of another model shape?")


def _unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def _set_gradient_checkpointing(module: nn.Module, on: bool) -> None:
    for m in module.modules():
        if hasattr(m, "gradient_checkpointing"):
            m.gradient_checkpointing = on


class StopRequested(Exception):
    """fit() stopped early on request (Trainer.request_stop), after saving a checkpoint of `step`."""

    def __init__(self, step: int):
        super().__init__(f"stopped at step {step} on request, with a checkpoint of it")
        self.step = step


class Trainer:
    """Runs `cfg.steps` optimizer steps of `stage` over `loader` and writes checkpoints under `out/`.

    `loader` is an iterator of batches with `state_dict()` / `load_state_dict()` (its position), already sharded for
    this process's rank; with `continue_from(states)` too, it resumes checkpoints of another number of processes.
    Under torchrun, call `torch.distributed.init_process_group` before creating the Trainer, and `close()` before
    `destroy_process_group`.
    `run` (JSON-able) is written into each checkpoint's meta.json as "run", for whoever resumes it to compare.
    """

    def __init__(self, stage: Stage, loader: Iterator, cfg: TrainConfig, out: str | os.PathLike,
                 device: str | torch.device = "cpu", progress: bool = True, run: dict | None = None):
        self.stage, self.loader, self.cfg, self.out = stage, loader, cfg, Path(out)
        self.run = run  # JSON-able description of the run (the CLI's stage and options), kept in every checkpoint
        self.device = torch.device(device)
        self.progress = progress
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.step = 0
        self.stop_requested = False  # request_stop(): save at the end of the current step, then StopRequested
        self.generator = torch.Generator(device="cpu").manual_seed(cfg.seed * 1000 + self.rank)

        module = stage.trainable().to(self.device)
        _set_gradient_checkpointing(module, cfg.gradient_checkpointing)
        self.module = module
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the stage's trainable module has no parameters with requires_grad=True")
        decay = [p for p in params if p.ndim >= 2]        # no weight decay on norms and biases (GPT-2 practice)
        no_decay = [p for p in params if p.ndim < 2]
        # fused: one kernel per step over all parameters, the same update as the default (foreach) within an ulp;
        # measured 3x faster on the CPU (135M fp32 parameters, 2 cores: 95 vs 300 ms a step)
        fused = all(p.device.type in ("cpu", "cuda") for p in params)  # (parameters with grads are floating)
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=cfg.betas, fused=fused or None)
        self.model = module
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(module, device_ids=ids)
        self.ema = EMA(module, cfg.ema_decay, cfg.ema_start_step, cfg.ema_warmup) if cfg.ema_decay > 0 else None
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
        self.log_path = self.out / "log.jsonl"
        self._abandon_after: int | None = None  # resumed here, before later checkpoints: set them aside at a save
        self._log_failed = False  # a log line could not be written (warned once)

    # ---------------------------------------------------------------- checkpoints
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Everything a resume needs. Model/EMA/optimizer are identical on every rank; RNG and data position are
        per rank, so they are gathered to rank 0 (a list indexed by rank)."""
        tensors = {f"model.{k}": v for k, v in self.module.state_dict().items()}
        if self.ema is not None:
            tensors |= {f"ema.{k}": v for k, v in self.ema.shadow.items()}
        opt_tensors, opt_meta = ckpt.flatten_optimizer(self.optimizer.state_dict())
        tensors |= {f"optim.{k}": v for k, v in opt_tensors.items()}
        per_rank = [(rng.state(self.generator), self.loader.state_dict())]
        if self.world > 1:
            gathered = [None] * self.world
            dist.all_gather_object(gathered, per_rank[0])
            per_rank = gathered
        for r, ((rng_tensors, _), _) in enumerate(per_rank):
            tensors |= {f"rng.{r}.{k}": v for k, v in rng_tensors.items()}
        meta = {"step": self.step, "config": asdict(self.cfg), "optimizer": opt_meta, "world_size": self.world,
                "rng": [m for (_, m), _ in per_rank], "data": [d for _, d in per_rank], "run": self.run,
                "scaler": self.scaler.state_dict()}  # fp16: its scale and growth tracker ({} otherwise)
        return tensors, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        before = int(meta.get("world_size", 1))
        if before != self.world and not hasattr(self.loader, "continue_from"):
            raise ValueError(f"checkpoint was written by {before} processes, resuming with {self.world}")
        if int(meta["step"]) > self.cfg.steps:
            raise ValueError(f"the checkpoint is at step {meta['step']}, past this run's last step {self.cfg.steps}; "
                             "train to at least that many steps")
        sub = lambda prefix: {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}  # noqa: E731
        _check_weights(sub("model."), self.module.state_dict())
        self.module.load_state_dict(sub("model."), strict=True)
        ema, decay = sub("ema."), meta.get("config", {}).get("ema_decay")
        if ema and self.ema is None:  # resuming without EMA would lose the average kept so far
            raise ValueError(f"the checkpoint keeps an EMA of the weights (decay {decay}) that this run, without "
                             f"EMA, would drop; resume with --ema-decay {decay} to keep it")
        if self.ema is not None:
            if not ema:
                raise ValueError(f"the checkpoint has no EMA of the weights, and an EMA started at its step would "
                                 f"not be the average this run's decay {self.cfg.ema_decay} means; resume without "
                                 "EMA (--ema-decay 0) or train from the start with it")
            if set(ema) != set(self.ema.shadow):
                raise ValueError("the checkpoint's EMA weights do not match this run's model")
            self.ema.shadow = {k: v.float().clone() for k, v in ema.items()}
        self.optimizer.load_state_dict(ckpt.unflatten_optimizer(sub("optim."), meta["optimizer"]))
        saved = meta.get("scaler") or ({"scale": float(tensors["scaler.scale"])} if "scaler.scale" in tensors else {})
        if self.scaler.is_enabled() and saved:  # (older checkpoints kept the scale alone, as a tensor)
            self.scaler.load_state_dict({**self.scaler.state_dict(), **saved})
        self.step = int(meta["step"])
        if before == self.world:
            rng.set_state(sub(f"rng.{self.rank}."), meta["rng"][self.rank], self.generator)
            self.loader.load_state_dict(meta["data"][self.rank])
        else:
            self._take_over(before, meta)
        if self.rank == 0:
            self._forget_logged_steps_after(self.step)
            later = [p.name for p in ckpt.checkpoints_after(self.out / "checkpoints", self.step)]
            if later:  # set aside at this run's first save: a resumed run that fails before it leaves them be
                self._abandon_after = self.step
                print(f"warning: resumed at step {self.step}: this folder's later checkpoints ({', '.join(later)}) "
                      "belong to the run given up there; this run's first checkpoint sets them aside as "
                      "abandoned-step-N", file=sys.stderr)

    def _take_over(self, before: int, meta: dict) -> None:
        """Go on from a checkpoint written by `before` processes with this run's number (torchrun elastic, a job
        requeued on fewer GPUs): the data stream continues from the items they had taken together, and each rank's
        random numbers are seeded anew from (seed, step, rank), since the old ranks' streams do not map onto the
        new ones."""
        item = self.loader.continue_from(meta["data"])
        rng.seed_all((self.cfg.seed, self.step, self.rank), self.generator)
        if self.rank == 0:
            old = meta["config"]["batch_size"] * meta["config"]["grad_accum"] * before
            new = self.cfg.batch_size * self.cfg.grad_accum * self.world
            keep, exact = divmod(old, self.cfg.batch_size * self.world)
            hint = f"; --grad-accum {keep} keeps {old}" if new != old and keep and not exact else ""
            print(f"warning: the checkpoint was written by {before} processes, this run has {self.world}: the data "
                  f"goes on from item {item} of its stream (epoch {item // meta['data'][0]['n']}), each process's "
                  f"random numbers are seeded anew, and a step trains on {new} images (was {old}){hint}",
                  file=sys.stderr)

    def _forget_logged_steps_after(self, step: int) -> None:
        """Drop log.jsonl records of the steps after the checkpoint (a run stopped between saves logged them): they
        are trained again, and a log with two records of one step plots as a zigzag (TensorBoard's purge_step)."""
        if not self.log_path.is_file():
            return
        kept = []
        for line in self.log_path.read_text().splitlines(keepends=True):
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError):  # a line torn by the stop
                continue
        tmp = self.log_path.with_name(f".{self.log_path.name}.tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, self.log_path)

    def save(self) -> Path | None:
        tensors, meta = self.state()  # every rank takes part in the gather
        return self.on_rank0(lambda: self._write_checkpoint(tensors, meta), "the checkpoint")

    def _write_checkpoint(self, tensors: dict, meta: dict) -> Path:
        root = self.out / "checkpoints"
        if self._abandon_after is not None:  # resumed from an earlier checkpoint: the later ones go out of the way
            resumed, self._abandon_after = self._abandon_after, None
            moved = ckpt.set_aside_after(root, resumed)
            print(f"warning: the checkpoints past step {resumed} (of the run given up there) are set aside as "
                  f"{', '.join(p.name for p in moved)}", file=sys.stderr)
        return ckpt.save_checkpoint(root, self.step, tensors, meta, keep_last=self.cfg.keep_last)

    def on_rank0(self, write: Callable[[], Any], what: str) -> Any:
        """write() on rank 0 (the others get None). Under DDP every rank then learns whether it worked: a failed
        write (a full disk) stops every rank with an OSError, rather than rank 0 alone while the others train on
        into an all-reduce, or wait at a barrier, for a peer that has gone."""
        result, error = None, None
        if self.rank == 0:
            try:
                result = write()
            except Exception as e:  # noqa: BLE001 - re-raised below, once the other ranks are told
                error = e
        if self.world > 1:
            told = [None if error is None else f"{type(error).__name__}: {error}"]
            dist.broadcast_object_list(told, src=0)  # also: no rank goes on before rank 0 has written
            if told[0] is not None and self.rank != 0:
                raise OSError(f"rank 0 could not write {what} of step {self.step} ({told[0]})")
        if error is not None:
            raise error
        return result

    def resume(self, path: str | os.PathLike) -> None:
        """Resume from a checkpoint directory, or from the newest complete one under a run's out/ directory."""
        tensors, meta = ckpt.load_checkpoint(path)
        self.load_state(tensors, meta)

    # ---------------------------------------------------------------- the loop
    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def train_step(self) -> dict[str, torch.Tensor]:
        """One optimizer step. Its metrics (loss, the stage's own, grad_norm) come back as 0-dim tensors where the
        step ran, not floats: float(v) waits for the GPU to finish the step, so fit() reads them only when it logs,
        and otherwise goes on to the next step's host work (masks, noise, Python) while the GPU computes."""
        cfg = self.cfg
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, cfg)
        self.optimizer.zero_grad(set_to_none=True)
        metrics = {}
        for micro in range(cfg.grad_accum):
            batch = _to_device(next(self.loader), self.device)
            last = micro == cfg.grad_accum - 1
            sync = contextlib.nullcontext() if last or self.world == 1 else self.model.no_sync()
            with sync:
                with self._autocast():
                    loss, m = self.stage.loss(self.model, batch, self.generator)
                self.scaler.scale(loss / cfg.grad_accum).backward()
            for k, v in {"loss": loss.detach(), **m}.items():
                metrics[k] = metrics.get(k, 0.0) + v / cfg.grad_accum
        self.scaler.unscale_(self.optimizer)
        if cfg.grad_clip > 0:
            metrics["grad_norm"] = nn.utils.clip_grad_norm_(self.module.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.module, self.step - 1)
        return metrics

    def fit(self) -> nn.Module:
        """Train to cfg.steps, saving every cfg.save_every steps and at the end; returns the trained module."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        # a bar on a terminal; elsewhere (nohup, cron, a job scheduler's log) one plain line a log record, as \r
        # frames would pile up on one line of the log file
        shown = self.progress and self.rank == 0
        lines = shown and not sys.stderr.isatty()
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not shown or lines, desc="train", dynamic_ncols=True)
        images = cfg.batch_size * cfg.grad_accum * self.world
        since, t_since = self.step, time.perf_counter()  # the last log: step_time is the mean step since then
        while self.step < cfg.steps:
            metrics = self.train_step()
            bar.update(1)
            logs = self.step % cfg.log_every == 0 or self.step == cfg.steps  # the same steps on every rank
            stop = self.stop_requested if self.world == 1 else False
            if logs and self.world > 1:
                metrics, stop = self._over_ranks(metrics)
            if self.rank == 0 and logs:
                record = {k: float(v) for k, v in metrics.items()}  # waits for the GPU (no other wait in bf16/fp32)
                now = time.perf_counter()
                dt = (now - t_since) / (self.step - since)
                since, t_since = self.step, now
                record |= {"step": self.step, "lr": lr_at(self.step - 1, cfg), "step_time": dt,
                           "images_per_s": images / dt}
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", ips=f"{images / dt:.1f}")
                if lines:
                    print(f"step {self.step}/{cfg.steps}: loss {record['loss']:.4f}, lr {record['lr']:.2e}, "
                          f"{images / dt:.1f} images/s", file=sys.stderr, flush=True)
                self._log(record)
            saved = bool(cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps)
            if saved:
                self.save()
                since, t_since = self.step, time.perf_counter()  # a save is not a training step
            if self.step < cfg.steps and stop:
                bar.close()
                if not saved:
                    self.save()
                raise StopRequested(self.step)
        bar.close()
        self.save()
        return self.module

    def request_stop(self) -> None:
        """Stop after the current step with a checkpoint of it (fit raises StopRequested): for a preemption signal,
        which a scheduler follows with SIGKILL after a grace period. Safe to call from a signal handler."""
        self.stop_requested = True

    def _over_ranks(self, metrics: dict) -> tuple[dict, bool]:
        """Under torchrun, on the steps that log (which wait for the device anyway; doing it every step would stall
        the GPU's overlap with the host), one all-reduce of a few numbers gives: the metrics of the whole global
        batch, each rank's (a mean over its equal share) averaged over the ranks, as accelerate's gather or
        Lightning's sync_dist log them (grad_norm is already global, taken after the gradients' all-reduce); and
        whether any rank was asked to stop, as the ranks get a signal at different steps and must stop together."""
        keys = [k for k in metrics if k != "grad_norm"]
        values = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=self.device).reshape(())
                              for v in [*(metrics[k] for k in keys), float(self.stop_requested)]])
        dist.all_reduce(values)
        return metrics | dict(zip(keys, values[:-1] / self.world)), bool(values[-1].item())

    def _log(self, record: dict) -> None:
        """Append a record to log.jsonl. A line that cannot be written (a full disk) is reported once and training
        goes on: the log is a report, and the next checkpoint, which must be written, stops every rank if the disk
        is still full (on_rank0), where a failed log line on rank 0 alone would strand the other ranks."""
        try:
            append_line(self.log_path, json.dumps(record))
        except OSError as e:
            if not self._log_failed:
                print(f"warning: {self.log_path}: cannot append ({e.strerror or e}); training goes on without "
                      "these log lines", file=sys.stderr)
            self._log_failed = True

    def final_module(self) -> nn.Module:
        """The module to ship: the EMA weights when EMA is on, else the raw weights."""
        if self.ema is None:
            return self.module
        module = copy.deepcopy(self.module)
        self.ema.copy_to(module)
        return module

    def save_final(self) -> Path:
        path = self.out / "final"
        self.on_rank0(lambda: self.stage.save_final(self.final_module(), path), "the final model")
        return path

    def close(self) -> None:
        """Before destroy_process_group: drop DDP's wrapper (its reducer holds the group) and collect the cycles round
        it: a gloo group freed at interpreter exit can abort a finished run (SIGABRT; 5 torchrun runs in 50, 2 CPUs)."""
        self.model = self.module
        gc.collect()


def _to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return host_to_device(batch, device)
    if isinstance(batch, dict):  # product masks stay on the host, where the stages draw repaint masks from them
        return {k: v if k == "mask" else _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def join_process_group(device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this process. Under torchrun (WORLD_SIZE > 1) it joins the process group (nccl
    on GPUs, gloo on the CPU), each process on its node's GPU LOCAL_RANK; ValueError when the node has fewer GPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise ValueError(f"process {local} of this machine needs cuda:{local}, and there are "
                             f"{torch.cuda.device_count()} GPUs: run at most that many processes per node")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device
