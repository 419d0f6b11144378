"""The training loop's mechanics on a small regression problem: loss falls, resume == straight run, atomic
checkpoints survive SIGKILL, DDP (2 gloo processes) == 1 process with the doubled batch, EMA."""
import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace

import pytest
import torch
from torch import nn

from backdrop.train import checkpointing as ckpt
from backdrop.train.core import EMA, ConfigError, StopRequested, TrainConfig, Trainer, lr_at


class Regression:
    """A stage: fit y = W x + noise with a small MLP; the loss draws dropout-like noise from the generator so that
    exact resume also proves the generator state is restored."""

    def __init__(self, seed=0):
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(8, 32), nn.SiLU(), nn.LayerNorm(32), nn.Linear(32, 4))

    def trainable(self):
        return self.net

    def loss(self, model, batch, generator):
        x, y = batch
        noise = 0.01 * torch.randn(x.shape, generator=generator)
        loss = nn.functional.mse_loss(model(x + noise), y)
        return loss, {"mse": loss.detach()}

    def save_final(self, module, out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(module.state_dict(), out_dir / "weights.pt")


class Loader:
    """Deterministic batches by position; rank r of w takes rows r::w of each global batch."""

    def __init__(self, batch_size, rank=0, world=1, seed=0):
        self.batch_size, self.rank, self.world, self.seed, self.pos = batch_size, rank, world, seed, 0
        self.w = torch.randn(8, 4, generator=torch.Generator().manual_seed(99))

    def __next__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.pos)
        x = torch.randn(self.batch_size * self.world, 8, generator=g)
        y = x @ self.w
        self.pos += 1
        return x[self.rank::self.world], y[self.rank::self.world]

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.pos = state["pos"]


def _weights(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0) and lr_at(99, cfg) == pytest.approx(0.1)
    assert all(lr_at(i, cfg) >= lr_at(i + 1, cfg) for i in range(10, 99))


def test_loss_falls_and_ema(tmp_path):
    cfg = TrainConfig(steps=150, batch_size=16, lr=1e-2, ema_decay=0.9, log_every=1)
    trainer = Trainer(Regression(), Loader(16), cfg, tmp_path, progress=False)
    metrics = trainer.train_step()  # tensors: reading them waits for the step, which fit() does only to log
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in metrics.values())
    first = float(metrics["loss"])
    trainer.fit()
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(2, 151))
    assert log[-1]["loss"] < 0.1 * first and {"lr", "images_per_s", "step_time", "grad_norm"} <= set(log[-1])
    ema_module = trainer.final_module()
    raw, ema = _weights(trainer.module), _weights(ema_module)
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)
    trainer.save_final()
    loaded = torch.load(tmp_path / "final" / "weights.pt", weights_only=True)
    assert all(torch.equal(loaded[k], ema[k]) for k in ema)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])  # fp16: the grad scaler's state resumes too (it
def test_resume_equals_straight_run(tmp_path, precision):  # crashed: "Attempted update but _scale is None")
    cfg = TrainConfig(steps=12, batch_size=4, grad_accum=2, lr=1e-2, warmup_steps=3, ema_decay=0.95, save_every=5,
                      keep_last=5, precision=precision)
    straight = Trainer(Regression(), Loader(4), cfg, tmp_path / "a", progress=False)
    straight.fit()

    # Stop after 5 steps (the periodic save), then resume in a fresh trainer built from a different init and RNG.
    cut = Trainer(Regression(), Loader(4), cfg, tmp_path / "b", progress=False)
    for _ in range(5):
        cut.train_step()
    cut.save()
    torch.manual_seed(1234)
    resumed = Trainer(Regression(seed=7), Loader(4), cfg, tmp_path / "b", progress=False)
    resumed.resume(tmp_path / "b")
    assert resumed.step == 5
    resumed.fit()
    a, b = _weights(straight.module), _weights(resumed.module)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run diverged from the straight run"
    assert all(torch.equal(straight.ema.shadow[k], resumed.ema.shadow[k]) for k in a)
    assert straight.scaler.state_dict() == resumed.scaler.state_dict()


def test_a_stop_request_saves_the_step_it_ends_and_resumes_exactly(tmp_path):
    """request_stop() (the CLI's SIGTERM handler) mid-step: the step finishes, is saved although no periodic save
    is due, fit raises StopRequested, and a resume from there ends as the straight run does."""
    cfg = TrainConfig(steps=9, batch_size=4, lr=1e-2, warmup_steps=2, ema_decay=0.9, save_every=100)
    straight = Trainer(Regression(), Loader(4), cfg, tmp_path / "a", progress=False)
    straight.fit()

    class StopAtStep4(Regression):
        trainer = None

        def loss(self, model, batch, generator):
            if self.trainer.step == 3:  # during the 4th step, as a signal would come
                self.trainer.request_stop()
            return super().loss(model, batch, generator)
    stage = StopAtStep4()
    cut = stage.trainer = Trainer(stage, Loader(4), cfg, tmp_path / "b", progress=False)
    with pytest.raises(StopRequested, match="step 4"):
        cut.fit()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "b" / "checkpoints")] == ["step-00000004"]
    resumed = Trainer(Regression(seed=7), Loader(4), cfg, tmp_path / "b", progress=False)
    resumed.resume(tmp_path / "b")
    resumed.fit()
    a, b = _weights(straight.module), _weights(resumed.module)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("saved, resumed, match", [(0.9, 0.0, "would drop; resume with --ema-decay 0.9"),
                                                     (0.0, 0.9, "has no EMA")])
def test_resume_refuses_to_drop_or_invent_an_ema(tmp_path, saved, resumed, match):
    cut = Trainer(Regression(), Loader(2), TrainConfig(steps=4, batch_size=2, ema_decay=saved), tmp_path,
                  progress=False)
    cut.train_step()
    cut.save()
    again = Trainer(Regression(), Loader(2), TrainConfig(steps=4, batch_size=2, ema_decay=resumed), tmp_path,
                    progress=False)
    with pytest.raises(ValueError, match=match):
        again.resume(tmp_path)


def test_keep_last_and_resolve(tmp_path):
    cfg = TrainConfig(steps=6, batch_size=2, save_every=1, keep_last=2)
    Trainer(Regression(), Loader(2), cfg, tmp_path, progress=False).fit()
    names = [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")]
    assert names == ["step-00000005", "step-00000006"]
    assert ckpt.resolve(tmp_path).name == "step-00000006"
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        ckpt.resolve(tmp_path / "nothing")


def test_resuming_an_earlier_checkpoint_sets_the_later_ones_aside(tmp_path, capsys, monkeypatch):
    """Resumed from step 2 of a run that saved 2, 4 and 6, the new run's checkpoints were pruned at once (4 and 6
    ranked higher) and --resume latest then picked the old step 6. A step saved again replaces its checkpoint
    whole, or leaves the old one if the rename fails (it was deleted first)."""
    cfg = TrainConfig(steps=6, batch_size=2, save_every=2, keep_last=3)
    Trainer(Regression(), Loader(2), cfg, tmp_path, progress=False).fit()
    names = [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")]
    failed = Trainer(Regression(), Loader(2), replace(cfg, steps=3, keep_last=2), tmp_path, progress=False)
    failed.resume(tmp_path / "checkpoints" / "step-00000002")  # a resumed run that fails before it saves ...
    assert "later checkpoints (step-00000004, step-00000006)" in capsys.readouterr().err
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")] == names  # ... leaves them be
    again = Trainer(Regression(), Loader(2), replace(cfg, steps=3, keep_last=2), tmp_path, progress=False)
    again.resume(tmp_path / "checkpoints" / "step-00000002")
    again.fit()
    assert "set aside as abandoned-step-00000004, abandoned-step-00000006" in capsys.readouterr().err
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")] == ["step-00000002", "step-00000003"]
    assert ckpt.resolve(tmp_path).name == "step-00000003"
    monkeypatch.setattr(ckpt.os, "replace", lambda a, b: (_ for _ in ()).throw(OSError(28, "No space left")) if
                        ".tmp-" in str(a) else os.rename(a, b))
    with pytest.raises(OSError):
        ckpt.save_checkpoint(tmp_path / "checkpoints", 3, {"w": torch.ones(1)}, {"step": 3})
    assert ckpt.load_checkpoint(tmp_path)[1]["step"] == 3  # the step's old checkpoint, whole
    monkeypatch.setattr(ckpt.os, "replace", lambda a, b: (_ for _ in ()).throw(KeyboardInterrupt) if
                        ".tmp-" in str(a) else os.rename(a, b))  # Ctrl-C between the two renames
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path / "checkpoints", 3, {"w": torch.ones(1)}, {"step": 3})
    assert ckpt.load_checkpoint(tmp_path)[1]["step"] == 3
    monkeypatch.setattr(ckpt.os, "replace", os.rename)
    os.rename(tmp_path / "checkpoints" / "step-00000003", tmp_path / "checkpoints" / ".old-step-00000003-99")  # killed
    ckpt.save_checkpoint(tmp_path / "checkpoints", 4, {"w": torch.ones(1)}, {"step": 4}, keep_last=0)  # the next save
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")] == [f"step-0000000{n}" for n in (2, 3, 4)]
    assert not list((tmp_path / "checkpoints").glob(".*"))


def test_half_written_checkpoint_is_never_picked(tmp_path):
    root = tmp_path / "checkpoints"
    ckpt.save_checkpoint(root, 1, {"w": torch.ones(3)}, {"step": 1})
    # what a kill mid-save leaves behind: a temp dir with a partial tensor file and no meta
    partial = root / ".tmp-step-00000002-999"
    partial.mkdir()
    (partial / "state.safetensors").write_bytes(b"\x10\x00\x00")
    tensors, meta = ckpt.load_checkpoint(tmp_path)
    assert meta["step"] == 1 and torch.equal(tensors["w"], torch.ones(3))
    (root / "step-00000003").mkdir()  # a step-N copied in part (rsync, a cloud sync): no meta.json, never picked
    (root / "step-00000003" / "state.safetensors").write_bytes(b"\x10\x00\x00")
    assert ckpt.resolve(tmp_path).name == "step-00000001"


def test_sigkill_during_saves_leaves_a_loadable_checkpoint(tmp_path):
    """A child process saves ~8 MB checkpoints in a loop; we SIGKILL it at arbitrary moments."""
    script = textwrap.dedent(f"""
        import torch
        from backdrop.train import checkpointing as ckpt
        step = 0
        while True:
            step += 1
            ckpt.save_checkpoint({str(tmp_path)!r}, step, {{"w": torch.full((2_000_000,), float(step))}},
                                 {{"step": step}}, keep_last=2)
    """)
    for delay in (0.8, 1.1, 1.35, 1.6):
        proc = subprocess.Popen([sys.executable, "-c", script])
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if not ckpt.list_checkpoints(tmp_path):
            continue  # killed before the first save completed: nothing to load, nothing half-loaded either
        tensors, meta = ckpt.load_checkpoint(tmp_path)
        assert torch.all(tensors["w"] == float(meta["step"]))


class NoNoise(Regression):
    """The same stage without generator noise (each DDP rank draws its own, a single process cannot match that)."""

    def loss(self, model, batch, generator):
        x, y = batch
        return nn.functional.mse_loss(model(x), y), {}


DDP_WORKER = """
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, {tests!r})
from test_train_core import Loader, NoNoise
from backdrop.train.core import TrainConfig, Trainer
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
cfg = TrainConfig(steps=4, batch_size=4, grad_accum=2, lr=1e-2)
trainer = Trainer(NoNoise(), Loader(cfg.batch_size, rank, world), cfg, {out!r}, progress=False)
trainer.fit()
if rank == 0:
    torch.save(trainer.module.state_dict(), os.path.join({out!r}, "w.pt"))
dist.barrier()  # both ranks leave together: a rank tearing gloo down while its peer still works can abort (CI once)
trainer.close()  # DDP's reducer holds the group: held at exit, it aborts the process (SIGABRT) now and then
dist.destroy_process_group()
"""


def test_ddp_two_gloo_processes_match_one_process_with_double_batch(tmp_path):
    # The loss is a batch mean and DDP averages gradients across ranks, so 2 ranks x 4 rows == 1 process x 8 rows;
    # grad_accum=2 checks that gradients sync only on the last micro-step and still add up.
    single = Trainer(NoNoise(), Loader(8), TrainConfig(steps=4, batch_size=8, grad_accum=2, lr=1e-2), tmp_path / "one",
                     progress=False)
    single.fit()
    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER.format(tests=os.path.dirname(__file__), out=str(tmp_path / "ddp")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    ddp = torch.load(tmp_path / "ddp" / "w.pt", weights_only=True)
    ref = single.module.state_dict()
    for k in ref:
        torch.testing.assert_close(ddp[k], ref[k], rtol=1e-5, atol=1e-6)
    # the logged loss is the whole global batch's (each rank's mean, averaged over the ranks), as one process logs it
    def logged(run):
        return [json.loads(line) for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged("ddp")] == [r["step"] for r in logged("one")] == [4]
    assert logged("ddp")[0]["loss"] == pytest.approx(logged("one")[0]["loss"], rel=1e-5)
    # and the DDP run's checkpoint holds both ranks' RNG and data positions
    _, meta = ckpt.load_checkpoint(tmp_path / "ddp")
    assert meta["world_size"] == 2 and [d["pos"] for d in meta["data"]] == [8, 8]


SAVE_FAILS_WORKER = """
import os, sys, torch.distributed as dist
sys.path.insert(0, {tests!r})
from test_train_core import Loader, NoNoise
from backdrop.train.core import TrainConfig, Trainer
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
cfg = TrainConfig(steps=6, batch_size=2, save_every=2)
trainer = Trainer(NoNoise(), Loader(cfg.batch_size, rank, world), cfg, {out!r}, progress=False)
try:
    trainer.fit()
except OSError as e:
    with open(os.path.join({report!r}, f"rank-{{rank}}.txt"), "w") as f:
        f.write(f"stopped at step {{trainer.step}}: {{e}}")
    sys.exit(3)
"""


def test_a_failed_save_under_ddp_stops_every_rank(tmp_path):
    """Rank 0 cannot write its checkpoint (here: a file where the checkpoints folder goes): every rank stops at
    that step with an OSError, instead of the others training on into an all-reduce with a peer that is gone."""
    out = tmp_path / "ddp"
    out.mkdir()
    (out / "checkpoints").write_text("not a folder")
    script = tmp_path / "worker.py"
    script.write_text(SAVE_FAILS_WORKER.format(tests=os.path.dirname(__file__), out=str(out), report=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode != 0
    reports = [tmp_path / f"rank-{r}.txt" for r in (0, 1)]
    assert all(f.exists() for f in reports), run.stderr[-3000:]
    zero, one = (f.read_text() for f in reports)
    assert zero.startswith("stopped at step 2: ") and "checkpoints" in zero
    assert one.startswith("stopped at step 2: rank 0 could not write the checkpoint of step 2 (FileExistsError")


STOP_WORKER = """
import os, sys, torch.distributed as dist
sys.path.insert(0, {tests!r})
from test_train_core import Loader, NoNoise
from backdrop.train.core import StopRequested, TrainConfig, Trainer
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
cfg = TrainConfig(steps=20, batch_size=2, log_every=3, save_every=100)
trainer = Trainer(NoNoise(), Loader(cfg.batch_size, rank, world), cfg, {out!r}, progress=False)
real = trainer.train_step
def step():
    if rank == 1 and trainer.step == 4:  # a signal that reaches rank 1 alone, during step 5
        trainer.request_stop()
    return real()
trainer.train_step = step
try:
    trainer.fit()
except StopRequested as e:
    with open(os.path.join({report!r}, f"rank-{{rank}}.txt"), "w") as f:
        f.write(str(e.step))
dist.barrier()
trainer.close()
dist.destroy_process_group()
"""


def test_a_stop_request_under_ddp_stops_every_rank_at_the_same_logged_step(tmp_path):
    """SIGTERM reaches torchrun's ranks at different steps: they agree at the next step that logs (6, with
    log_every 3, for a request during step 5 on rank 1 only) and all stop there, with one checkpoint of it."""
    script = tmp_path / "worker.py"
    script.write_text(STOP_WORKER.format(tests=os.path.dirname(__file__), out=str(tmp_path / "ddp"),
                                         report=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert [(tmp_path / f"rank-{r}.txt").read_text() for r in (0, 1)] == ["6", "6"]
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "ddp" / "checkpoints")] == ["step-00000006"]


def test_a_log_line_that_cannot_be_written_is_reported_once_and_training_goes_on(tmp_path, capsys):
    (tmp_path / "log.jsonl").mkdir()  # appending to it fails, as on a full disk
    trainer = Trainer(Regression(), Loader(2), TrainConfig(steps=3, batch_size=2, log_every=1), tmp_path,
                      progress=False)
    trainer.fit()
    assert trainer.step == 3 and len(ckpt.list_checkpoints(tmp_path / "checkpoints")) == 1
    err = capsys.readouterr().err
    assert err.count("cannot append") == 1 and "training goes on without these log lines" in err


def test_progress_off_a_terminal_is_one_plain_line_a_log_record(tmp_path, capsys):
    """nohup / cron / a scheduler's log file: no tqdm frames (\r, no newline), a line per --log-every instead."""
    Trainer(Regression(), Loader(2), TrainConfig(steps=4, batch_size=2, log_every=2), tmp_path, progress=True).fit()
    err = capsys.readouterr().err  # capsys's stderr is no terminal
    assert "\r" not in err and [line.split(":")[0] for line in err.splitlines()] == ["step 2/4", "step 4/4"]


def test_ema_decay_warmup_and_start():
    net = nn.Linear(2, 2)
    ema = EMA(net, decay=0.999, start_step=3)
    assert ema.decay_at(0) == 0.0 and ema.decay_at(2) == 0.0
    assert ema.decay_at(3) == pytest.approx(0.1) and ema.decay_at(10_000) == 0.999


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp8")
    with pytest.raises(ValueError, match="grad_accum"):
        TrainConfig(grad_accum=0)
    # each of these used to be accepted: a ZeroDivisionError at the first log, an EMA frozen or diverging, ...
    for field, value in {"log_every": 0, "ema_decay": 1.0, "keep_last": -1, "warmup_steps": -1, "grad_clip": -1.0,
                         "lr": 0.0, "weight_decay": float("nan")}.items():
        with pytest.raises(ConfigError) as e:
            TrainConfig(**{field: value})
        assert e.value.field == field and field in str(e.value)


class Wider(Regression):
    """The same stage with a wider first layer: a checkpoint of one is not a checkpoint of the other."""

    def __init__(self):
        self.net = nn.Sequential(nn.Linear(8, 48), nn.SiLU(), nn.LayerNorm(48), nn.Linear(48, 4))


def test_resume_refuses_other_weights_and_steps_already_past(tmp_path):
    Trainer(Regression(), Loader(2), TrainConfig(steps=3, batch_size=2), tmp_path, progress=False).fit()
    tensors, meta = ckpt.load_checkpoint(tmp_path)
    other = Trainer(Wider(), Loader(2), TrainConfig(steps=3, batch_size=2), tmp_path / "w", progress=False)
    with pytest.raises(ValueError, match=r"checkpoint's 0.weight is \(32, 8\), this run's model has \(48, 8\)"):
        other.load_state(tensors, meta)  # was load_state_dict's RuntimeError listing every mismatch
    dropped = {k: v for k, v in tensors.items() if not k.startswith("model.3.")}
    with pytest.raises(ValueError, match=r"2 missing, e.g. \['3.bias', '3.weight'\]"):
        Trainer(Regression(), Loader(2), TrainConfig(steps=3, batch_size=2), tmp_path / "d",
                progress=False).load_state(dropped, meta)
    with pytest.raises(ValueError, match="at step 3, past this run's last step 2"):
        Trainer(Regression(), Loader(2), TrainConfig(steps=2, batch_size=2), tmp_path / "s",
                progress=False).load_state(tensors, meta)


def test_resume_forgets_logged_steps_after_the_checkpoint(tmp_path):
    cfg = TrainConfig(steps=4, batch_size=2, save_every=2, keep_last=0, log_every=1)
    Trainer(Regression(), Loader(2), cfg, tmp_path, progress=False).fit()
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # torn by the stop
    resumed = Trainer(Regression(), Loader(2), cfg, tmp_path, progress=False)
    resumed.resume(tmp_path / "checkpoints" / "step-00000002")
    assert [json.loads(x)["step"] for x in (tmp_path / "log.jsonl").read_text().splitlines()] == [1, 2]
    resumed.fit()
    assert [json.loads(x)["step"] for x in (tmp_path / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_a_log_line_cut_short_by_a_full_disk_leaves_no_torn_line(tmp_path):
    """The append that fails part-way (here a file-size limit, as a full disk) is undone, so the next record starts
    on a line of its own; a torn '{"step": 2, "lo' would have made it '{"step": 2, "lo{"step": 3}'."""
    script = textwrap.dedent("""
        import resource, signal, sys
        from backdrop.fsio import append_line
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
        append_line(sys.argv[1], '{"step": 1}')  # 12 bytes
        resource.setrlimit(resource.RLIMIT_FSIZE, (20, resource.RLIM_INFINITY))  # 8 more bytes fit, not a line
        try:
            append_line(sys.argv[1], '{"step": 2, "loss": 0.125}')
        except OSError as e:
            print(e.errno)
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        append_line(sys.argv[1], '{"step": 3}')
    """)
    log = tmp_path / "log.jsonl"
    p = subprocess.run([sys.executable, "-c", script, str(log)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == [str(errno.EFBIG)]
    assert [json.loads(x) for x in log.read_text().splitlines()] == [{"step": 1}, {"step": 3}]
