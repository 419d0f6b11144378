"""`backdrop train {clip,vae,pretrain,inpaint,cache}`: the training stages from the command line.

Options (train/cli_options.py) every stage shares are defined once, in parent parsers; a stage adds only its own. Each
stage starts from `--init MODEL` (a model folder or file) or from random weights of `--preset`, trains its component,
and writes the whole model to OUT/final/ (a diffusers folder), which the next stage takes as its --init. Progress goes
to tqdm and OUT/log.jsonl, checkpoints to OUT/checkpoints/ (resume with --resume OUT). Under torchrun every process
trains on its own shard of the data (gloo on CPU, nccl on GPU); --batch-size is per process.

Option names are short, with the names of diffusers' training scripts (train_text_to_image.py) and accelerate as
aliases where they exist: --steps / --max-train-steps, --lr / --learning-rate, --out / --output-dir, ... (also with
underscores, as those scripts spell them: backdrop/cli.py); their options we lack are refused with what to do
instead (DIFFUSERS_INSTEAD).

User errors (bad --data, unreadable model, mismatched cache, bad option values, an --out that holds another run, a
--resume checkpoint of another stage or model) are one line and exit status 2. Resuming with options other than
the checkpoint's is allowed (e.g. more --steps, a lower --lr) and listed in a warning.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from pathlib import Path

from backdrop.cli import CLIError, as_typed, make_folder, one_line, parse_device
from backdrop.train.cli_options import DEFAULT_LR, add_stage_parsers
from backdrop.train.diffusers_options import resolve_aliases

__all__ = ["add_parser"]

CALIBRATION_IMAGES = 64  # images the vae stage measures the latent scaling factor on

def add_parser(subparsers) -> None:
    stages, cache = add_stage_parsers(subparsers)
    for sub in stages:
        sub.set_defaults(func=_run_stage)
    cache.set_defaults(func=_run_cache)


# ------------------------------------------------------------------------------------------------ running

FLAG_OF_FIELD = {"warmup_steps": "--warmup", "prediction_type": "--prediction"}  # config fields named otherwise


def _data_error(e: BaseException) -> str:
    """A data file's error on one line; raised in a DataLoader worker, torch re-raises it with the worker's whole
    traceback in the message, whose last line is the error itself."""
    lines = [line for line in str(e).splitlines() if line.strip()]
    if len(lines) > 1 and "Original Traceback" in lines[1]:
        return lines[-1].split(": ", 1)[-1]
    return one_line(e)


def _named(flag: str, value, e: BaseException) -> CLIError:
    """`flag value: message`, without saying the value twice when the message starts with it (a path)."""
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    return CLIError(f"{flag} {msg}" if msg.startswith(str(value)) else f"{flag} {value}: {msg}")


@contextlib.contextmanager
def _options_named():
    """A config field out of range (train/core.py ConfigError) becomes an error naming the option."""
    from backdrop.train.core import ConfigError

    try:
        yield
    except ConfigError as e:
        flag = FLAG_OF_FIELD.get(e.field, "--" + e.field.replace("_", "-"))
        raise CLIError(f"{flag} {e.value}: must be {e.want}") from None


def _check_options(args) -> None:
    """Options no config class sees (TrainConfig and DiffusionOptions check theirs: see _configs)."""
    rules = [("--num-workers", args.num_workers, args.num_workers >= 0, ">= 0"),
             ("--size", args.size, args.size is None or args.size >= 8, "at least 8")]
    if args.stage == "cache":  # the cache has no TrainConfig
        rules += [("--batch-size", args.batch_size, args.batch_size >= 1, ">= 1"),
                  ("--shard-size", args.shard_size, args.shard_size >= 1, ">= 1")]
    if args.stage == "inpaint":
        if args.product_prob is not None and args.masks != "product":
            raise CLIError(f"--product-prob {args.product_prob}: applies with --masks product only (the share of "
                           "product masks, the rest random); --masks random uses random masks throughout")
        args.product_prob = 1.0 if args.product_prob is None else args.product_prob
    if args.stage in ("vae", "inpaint"):
        rules.append(("--product-prob", args.product_prob, 0 <= args.product_prob <= 1, "in [0, 1]"))
    if args.stage == "vae":
        rules += [("--ssim-weight", args.ssim_weight, 0 <= args.ssim_weight <= 1, "in [0, 1]"),
                  ("--kl-weight", args.kl_weight, args.kl_weight >= 0, ">= 0")]
    if args.stage == "clip":
        vision = {k: getattr(args, f"vision_{k}") for k in ("width", "layers", "heads", "patch")}
        rules += [(f"--vision-{k}", v, v is None or v >= 1, ">= 1") for k, v in vision.items()]
    for flag, value, ok, want in rules:
        if not ok:
            raise CLIError(f"{flag} {value}: must be {want}")


def _configs(args, name: str):
    """(TrainConfig, DiffusionOptions or None), built before anything is loaded, so a bad value fails at once."""
    from backdrop.train.core import TrainConfig
    from backdrop.train.stages.common import DiffusionOptions

    with _options_named():
        cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                          lr=args.lr if args.lr is not None else DEFAULT_LR[name], weight_decay=args.weight_decay,
                          warmup_steps=args.warmup, grad_clip=args.grad_clip, precision=args.precision,
                          ema_decay=args.ema_decay, gradient_checkpointing=args.gradient_checkpointing,
                          save_every=args.save_every, keep_last=args.keep_last, log_every=args.log_every,
                          seed=args.seed)
        options = None
        if name in ("pretrain", "inpaint"):
            options = DiffusionOptions(args.prediction, args.snr_gamma, args.noise_offset, args.input_perturbation,
                                       args.zero_terminal_snr, args.caption_dropout)
    return cfg, options


def _device(args):
    import torch

    if not args.device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return parse_device(args.device)


def _distributed(args) -> tuple[int, int, object]:
    """(rank, world size, device); under torchrun it joins the process group (train/core.py)."""
    from backdrop.train.core import join_process_group

    try:
        return join_process_group(_device(args))
    except ValueError as e:  # more processes on a node than GPUs
        raise CLIError(f"{e} (--nproc_per_node), or --device cpu") from None


def _model(args):
    from backdrop.nn.checkpoint import init_model, load_model
    from backdrop.nn.resolve import resolve_model

    if not args.init:
        return init_model(args.preset, seed=args.seed)
    try:  # a built-in model's name too ("backdrop-tiny"), as the other commands take
        init = resolve_model(args.init)
    except FileNotFoundError as e:
        raise _named("--init", args.init, e) from None
    if not (init / "model_index.json").is_file() and (init / "final" / "model_index.json").is_file():
        raise CLIError(f"--init {init} is a training run's folder; its model is {init / 'final'}")
    if (init / "meta.json").is_file() and (init / "state.safetensors").is_file():
        raise CLIError(f"--init {init} is a training checkpoint, not a model: continue its run with --resume, or "
                       "start from the run's final/")
    try:
        return load_model(init)
    except (ValueError, OSError) as e:  # CheckpointError is a ValueError
        raise _named("--init", init, e) from None


def _image_size(args, model) -> int:
    """--size, or the model's native size; a positive multiple of the VAE's downsampling factor."""
    size = args.size if args.size is not None else model.config.image_size
    f = model.config.vae.downsample_factor
    if size < f or size % f:
        raise CLIError(f"--size {size}: must be a multiple of {f}, the VAE's downsampling factor")
    return size


def _dataset(args, stage: str, size: int, model):
    from backdrop.train.cache import LatentCache, is_cache
    from backdrop.train.data import make_dataset

    if is_cache(args.data):
        if stage not in ("pretrain", "inpaint"):
            raise CLIError(f"--data {args.data} is a latent cache; the {stage} stage trains an encoder the cache "
                           "stands in for, so give it images (synthetic:N or an image folder)")
        data = LatentCache(args.data)
        data.check(model, size)
        if (changed := data.source_changed()) is not None:
            print(f"warning: {changed}", file=sys.stderr)
        if stage == "inpaint" and not data.has_images and not (
                args.masks == "product" and args.product_prob == 1 and data.has_product_latents):
            raise CLIError(f"--data {args.data}: cache built with --no-images, " + (
                "so random masks cannot be encoded; only --masks product --product-prob 1 trains without the "
                "pixels" if data.has_product_latents else "and without product latents (its data had no product "
                "masks, or the cache predates them); rebuild it without --no-images"))
    else:
        # Only the stages that read product masks load (and check) a folder's: its masks are all or none there.
        masks = stage == "cache" or (stage == "inpaint" and args.masks == "product") or (
            stage == "vae" and (args.mask_conditioned or model.config.vae.mask_conditioned))
        try:  # Synthetic data is World(0), the world the evaluator holds its seeds out from; --seed orders the data.
            data = make_dataset(args.data, size, seed=0, masks=masks)
        except (ValueError, OSError) as e:
            raise _named("--data", args.data, e) from None
    if stage == "inpaint" and args.masks == "product" and not data.has_masks:
        raise CLIError(f"--data {args.data} has no product masks, which --masks product needs")
    return data


def _stage(args, name: str, model, data, size: int, device, options):
    if name == "clip":
        from backdrop.train.stages.clip import IMAGE_ENCODER, ClipStage, vision_config

        given = [args.vision_width, args.vision_layers, args.vision_heads, args.vision_patch]
        vision = None
        if any(x is not None for x in given) or not (args.init and (Path(args.init) / IMAGE_ENCODER).is_dir()):
            w, layers, heads, patch = (x if x is not None else d for x, d in zip(given, (128, 4, 4, 8)))
            try:
                vision = vision_config(size, model.config.text.projection_dim, w, layers, heads, patch)
            except ValueError as e:  # width not a multiple of heads, size not of patch
                raise CLIError(f"--vision-width {w} --vision-heads {heads} --vision-patch {patch} at --size {size}: "
                               f"{e}") from None
        return ClipStage(model, vision, device, args.init, seed=args.seed)
    if name == "vae":
        import torch

        from backdrop.train.stages.vae import VAEStage

        if args.decoder_only and not args.init:
            raise CLIError("--decoder-only fine-tunes a trained VAE's decoder; give it with --init")
        n = min(CALIBRATION_IMAGES, len(data))
        calibration = None if args.decoder_only else torch.stack([data[i]["image"] for i in range(n)])  # (n, 3, H, W)
        return VAEStage(model, device, args.init, args.ssim_weight, args.kl_weight, calibration, args.decoder_only,
                        args.mask_conditioned, args.product_prob)
    if name == "pretrain":
        from backdrop.train.stages.pretrain import PretrainStage

        return PretrainStage(model, options, device, args.init)
    from backdrop.train.stages.inpaint import InpaintStage

    return InpaintStage(model, options, device, args.init, args.masks, args.product_prob, args.latent_mask)


def _trainer(args, name: str, out: Path, cfg, options, resume: Path | None, rank: int, world: int, device):
    """Model, data, stage and Trainer of the run; from the checkpoint `resume` when given."""
    from backdrop.train import checkpointing, run_folder
    from backdrop.train.core import Trainer
    from backdrop.train.data import DataStream

    model = _model(args)
    size = _image_size(args, model)
    data = _dataset(args, name, size, model)
    stage = _stage(args, name, model, data, size, device, options)
    loader = DataStream(data, args.batch_size, seed=args.seed, rank=rank, world_size=world,
                        num_workers=args.num_workers)
    run = run_folder.run_record(args, lr=cfg.lr, size=size)
    trainer = Trainer(stage, loader, cfg, out, device=device, progress=not args.quiet, run=run)
    if resume is not None:
        try:
            tensors, meta = checkpointing.load_checkpoint(resume)
            changed = run_folder.changed_options(meta.get("run"), run, resume)
            if changed and rank == 0:  # before load_state, whose refusal the change may explain
                print(f"warning: resuming {resume} with options other than its run's: "
                      f"{as_typed('; '.join(changed), args)}", file=sys.stderr)
            trainer.load_state(tensors, meta)
        except (ValueError, KeyError) as e:  # KeyError: a meta.json without a field every checkpoint has
            raise _named("--resume", resume, e) from None
    return trainer


def _lock(out: Path, rank: int, world: int, device):
    """Rank 0's RunLock on `out`; every rank stops with a CLIError if it cannot be had (under torchrun the ranks
    agree first: one rank stopping alone would leave the others waiting in a collective)."""
    from backdrop.train import run_folder

    lock = error = None
    if rank == 0:
        try:
            lock = run_folder.RunLock(out)
        except CLIError as e:
            error = e
    if world > 1:
        import torch
        import torch.distributed as dist

        agreed = torch.tensor([0 if error else 1], device=device)  # nccl reduces CUDA tensors only
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        if not agreed.item() and error is None:
            error = CLIError(f"--out {out} is in use by another run (rank 0 says which)")
    if error is not None:
        raise error
    return lock


@contextlib.contextmanager
def _terminate_as_interrupt(trainer):
    """SIGTERM (a scheduler's preemption, `kill`, Kubernetes) stops the run after the current step, with a
    checkpoint of it (under torchrun: at the next step that logs), as schedulers expect within their grace period;
    a second SIGTERM stops at once, as Ctrl-C does. Yields a list that holds "terminated" once SIGTERM came."""
    signalled: list[str] = []

    def on_term(signum, frame):
        if signalled:
            raise KeyboardInterrupt
        signalled.append("terminated")
        trainer.request_stop()
    try:
        old = signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread: signals stay as they are
        yield signalled
        return
    try:
        yield signalled
    finally:
        signal.signal(signal.SIGTERM, old)


def _run_stage(args) -> int:
    import torch.distributed as dist
    from safetensors import SafetensorError

    from backdrop.train import run_folder
    from backdrop.train.core import StopRequested
    from backdrop.train.data import DataFileError

    name, out = args.stage, Path(args.out)
    resolve_aliases(args)
    _check_options(args)
    cfg, options = _configs(args, name)
    resume = run_folder.resume_checkpoint(args.resume, args.out)
    run_folder.check_out(out, resume)
    if resume is not None:
        run_folder.resumed_init(args, resume)
    lock = trainer = None
    try:
        rank, world, device = _distributed(args)
        if out.is_dir():  # before the trainer, which reads (and may cut) the run's log
            lock = _lock(out, rank, world, device)
        try:
            trainer = _trainer(args, name, out, cfg, options, resume, rank, world, device)
        except DataFileError as e:  # an image damaged after its header, read while the stage is set up (vae)
            raise CLIError(f"--data {args.data}: {_data_error(e)}") from None
        except (ValueError, FileNotFoundError) as e:
            raise CLIError(str(e).splitlines()[0]) from None
        make_folder(out)
        if lock is None:
            lock = _lock(out, rank, world, device)
        if resume is None and run_folder.stopped_before_a_checkpoint(out) and rank == 0:
            print(f"--out {out}: its run stopped before its first checkpoint; starting over (its log.jsonl is "
                  "replaced)", file=sys.stderr)
            (out / "log.jsonl").unlink()
        # the command of the run; a resume's own beside it, so that neither is lost
        record = {k: v for k, v in vars(args).items() if k not in ("func", "option_names")} | {"world_size": world}
        file = "args.json" if resume is None else f"args-resume-{trainer.step}.json"
        try:
            trainer.on_rank0(lambda: (out / file).write_text(json.dumps(record, indent=2) + "\n"), file)
            try:
                with _terminate_as_interrupt(trainer) as signalled:
                    trainer.fit()
            except (KeyboardInterrupt, StopRequested):
                if rank == 0:
                    print(f"{signalled[0] if signalled else 'interrupted'} at step {trainer.step}; "
                          f"{run_folder.what_is_kept(out)}", file=sys.stderr)
                return 143 if signalled else 130
            final = trainer.save_final()
        except (OSError, SafetensorError) as e:  # a full disk, a folder gone read-only, a damaged data file
            raise CLIError(f"{_data_error(e)}; {run_folder.what_is_kept(out)}") from None
        if rank == 0:  # save_final returns on every rank once rank 0 has written
            print(final)
    finally:
        if lock is not None:
            lock.release()
        if trainer is not None:
            trainer.close()  # before the process group goes
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


def _run_cache(args) -> int:
    from safetensors import SafetensorError

    from backdrop.train import run_folder
    from backdrop.train.cache import build_cache, folder_state, is_cache
    from backdrop.train.data import DataFileError

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise CLIError("the cache command runs in one process; start it without torchrun")
    _check_options(args)
    if is_cache(args.data):
        raise CLIError(f"--data {args.data} is already a latent cache; give the images it should encode")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise CLIError(f"--out {args.out} is a file; give the folder the cache should be written to")
    device = _device(args)
    model = _model(args)
    source = run_folder.normalised("data", args.data)  # absolute: a run elsewhere compares the same folder
    state = folder_state(source)  # before the scan: files added while the cache is built are changes
    data = _dataset(args, "cache", _image_size(args, model), model)
    try:
        out = build_cache(model, data, args.out, batch_size=args.batch_size, shard_size=args.shard_size,
                          images=not args.no_images, dtype=args.dtype, device=device, source=source,
                          source_state=state,
                          init=args.init and run_folder.normalised("init", args.init), num_workers=args.num_workers,
                          random_init=None if args.init else {"preset": args.preset, "seed": args.seed},
                          progress=not args.quiet)
    except ValueError as e:
        raise _named("--out", args.out, e) from None
    except DataFileError as e:  # an image damaged after its header
        raise CLIError(f"--data {args.data}: {_data_error(e)}") from None
    except (OSError, SafetensorError) as e:  # a full disk: build_cache removes what it had written
        raise CLIError(f"--out {args.out}: cannot write the cache ({one_line(e)})") from None
    print(out)
    return 0
