"""What `backdrop train` checks before a run writes into its --out folder or continues a checkpoint.

A run folder holds log.jsonl, checkpoints/step-N/ and final/ (train/core.py writes them). A new run starts only in
a folder that holds none of those, so it never overwrites another run's model or prunes its checkpoints; a resumed
run continues in its checkpoint's own folder, or in a fresh one. Every checkpoint records the run it belongs to
(`run_record`: the stage and the options that decide what is trained), so a resume from another stage is refused,
and options that differ from the checkpoint's are named, never changed silently.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from backdrop.cli import CLIError
from backdrop.fsio import FolderInUse, FolderLock
from backdrop.messages import some

from . import checkpointing as ckpt

__all__ = ["RUN_FILES", "LOCK", "RunLock", "held_run_files", "resume_checkpoint", "resumed_init", "check_out", "normalised",
           "run_record", "changed_options", "what_is_kept"]

RUN_FILES = ("checkpoints", "final", "log.jsonl")
LOCK = ".lock"  # held by the running process (rank 0): a second run in the same folder is refused
# Options that do not change what is trained (where the run goes, how it reports, how it uses the machine): they
# may differ on resume without a word. Everything else is recorded and compared.
BOOKKEEPING = frozenset({"func", "prog", "option_names", "command", "stage", "resume", "out", "quiet", "device",
                         "num_workers", "log_every", "save_every", "keep_last", "gradient_checkpointing"})
PATH_OPTIONS = ("data", "init")  # recorded as absolute paths, so a resume from another working folder matches


def held_run_files(out: Path) -> list[str]:
    """Which of RUN_FILES the folder `out` holds (checkpoints/ counts only with a complete checkpoint in it; a log
    alone is a run stopped before its first checkpoint, which holds nothing to go on from: a new run replaces it)."""
    held = {"checkpoints": bool(ckpt.list_checkpoints(out / "checkpoints")), "final": (out / "final").exists()}
    held["log.jsonl"] = (out / "log.jsonl").is_file() and any(held.values())
    return [name for name in RUN_FILES if held[name]]


def stopped_before_a_checkpoint(out: Path) -> bool:
    """A run folder whose run logged steps but saved no checkpoint nor model (stopped early)."""
    return (out / "log.jsonl").is_file() and not held_run_files(out)


def resume_checkpoint(resume: str | None, out: str) -> Path | None:
    """The checkpoint folder --resume names ('latest': the newest one in --out), or None without --resume. A name
    that is no folder here is looked up in --out's checkpoints/, as diffusers' --resume_from_checkpoint step-N is
    in its --output_dir."""
    if not resume:
        return None
    path = Path(out if resume == "latest" else resume)
    if not path.exists() and (Path(out) / "checkpoints" / resume).exists():
        path = Path(out) / "checkpoints" / resume
    try:
        return ckpt.resolve(path)
    except FileNotFoundError as e:
        if stopped_before_a_checkpoint(path):
            raise CLIError(f"--resume {resume}: its run stopped before writing a checkpoint, so there is nothing to "
                           f"go on from; run the command without --resume to start it over") from None
        raise CLIError(f"--resume {e}") from None


def resumed_init(args, checkpoint: Path) -> None:
    """--init of a resumed run. A checkpoint holds only the weights its stage trains; the rest of the model (a
    diffusion stage's frozen text encoder and VAE) is built from --init again. Left out, --init is the run's own,
    from the checkpoint's run record (said on stderr): a random model in its place would be trained against and
    shipped in final/. Another --init is taken as asked, and named among the changed options."""
    try:
        saved = json.loads((checkpoint / "meta.json").read_text()).get("run") or {}
    except (OSError, ValueError):  # load_checkpoint names an unreadable checkpoint
        return
    init = saved.get("options", {}).get("init")
    if args.init is None and init is not None:
        args.init = init
        if os.environ.get("RANK", "0") == "0":
            print(f"--resume {checkpoint}: --init {init}, its run's model (the checkpoint holds only the weights "
                  "it trains)", file=sys.stderr)


def check_out(out: Path, resume: Path | None) -> None:
    """Refuse an --out that is a file, holds another run, holds files a run did not write (for a new run), or
    cannot be created; nothing is created yet (a run that fails its other checks leaves no folder behind):
    backdrop.cli.make_folder does that."""
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} is a file; give the folder the run should write to")
    held = held_run_files(out)
    continues_it = resume is not None and resume.parent.resolve() == (out / "checkpoints").resolve()
    if held and resume is None:
        raise CLIError(f"--out {out} already holds a run ({', '.join(held)}); pass --resume {out} to continue it, "
                       "or choose another --out")
    if held and not continues_it:
        raise CLIError(f"--out {out} holds another run ({', '.join(held)}) than the checkpoint --resume {resume} "
                       "continues; resume into that run's own folder or into a new --out")
    # a new run's folder (a resumed run's own may hold the user's notes: it writes only its own files there)
    others = [p.name for p in sorted(out.iterdir()) if not _written_by_a_run(p)] if out.is_dir() and not held else []
    if others:
        raise CLIError(f"--out {out} holds {some(others, 3)}, which a run did not write; give a new or "
                       "empty folder")
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise CLIError(f"--out {out}: cannot write to {existing}")


def _written_by_a_run(path: Path) -> bool:
    """A run's own entry: RUN_FILES (an empty checkpoints/ too), or the args.json / args-resume-N.json of a run that
    stopped early (a `backdrop train` record: a user's own args.json is not overwritten)."""
    if path.name in RUN_FILES or path.name == LOCK:
        return True
    if not (path.name == "args.json" or path.name.startswith("args-resume-")) or not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("command") == "train"
    except (OSError, ValueError, AttributeError):
        return False


def normalised(name: str, value):
    """An option's value as a run records it: --data and --init as absolute paths when they are ones."""
    if name in PATH_OPTIONS and value is not None and Path(value).exists():
        return str(Path(value).resolve())
    return value


def run_record(args, **resolved) -> dict:
    """What a checkpoint records of its run: the stage and every option that decides what is trained, with the
    values in effect (`resolved` replaces defaults the command fills in, e.g. lr and size)."""
    options = {k: normalised(k, v) for k, v in vars(args).items() if k not in BOOKKEEPING} | resolved
    return {"stage": args.stage, "options": options}


def changed_options(saved: dict | None, run: dict, source: Path) -> list[str]:
    """'--lr 0.01 (was 0.0001)' for each option of `run` that differs from the checkpoint's `saved` run record;
    a checkpoint of another stage is refused. A checkpoint written before runs were recorded (None) is compared
    only by its weights (train/core.py checks every key and shape)."""
    if saved is None:
        return []
    if saved.get("stage") != run["stage"]:
        raise CLIError(f"--resume {source}: a checkpoint of `backdrop train {saved.get('stage')}`, not of "
                       f"`backdrop train {run['stage']}`")
    before, now = saved.get("options", {}), run["options"]
    return [f"--{k.replace('_', '-')} {now.get(k)} (was {before.get(k)})"
            for k in sorted(before.keys() | now.keys()) if before.get(k) != now.get(k)]


def what_is_kept(out: Path) -> str:
    """What a run stopped by a failed write (a full disk) can go on from: its newest checkpoint, or nothing (then
    --resume would only fail)."""
    saved = ckpt.list_checkpoints(out / "checkpoints")
    if not saved:
        return "no checkpoint was written before it (--save-every K writes them along the way): run the command " \
               "again to start over"
    return f"the checkpoints are intact: --resume {out} goes on from {saved[-1].name}"


class RunLock(FolderLock):
    """fsio.FolderLock on OUT/.lock for as long as a run writes there, so that a second run in the same folder (a
    requeued job beside a still-running one, a --resume of a live run) is refused instead of interleaving its log
    and pruning the other's checkpoints; a final model half-written by a killed run is removed once it is held."""

    def __init__(self, out: Path):
        try:
            super().__init__(out, stale=(".final.*.tmp",))
        except FolderInUse as e:
            raise CLIError(f"--out {out} is in use by a run still going ({e.holder}); wait for it to end, or stop it "
                           "first") from None
        except OSError as e:
            raise CLIError(f"--out {out}: {e.strerror or e}") from None
