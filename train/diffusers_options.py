"""diffusers' and accelerate's ways of asking `backdrop train` for things (train/cli.py takes their option names as
aliases): their options Backdrop lacks, a flag for what it always does, and their spellings of a value resolved to
ours, so that a run's record and a resume compare values, not spellings."""
from __future__ import annotations

import argparse

from backdrop.cli import CLIError

__all__ = ["DIFFUSERS_INSTEAD", "ALWAYS_SO", "EMA_DECAY", "Instead", "AlwaysSo", "resolve_aliases"]

EMA_DECAY = 0.9999  # --use-ema: diffusers' EMAModel default

_NO_HUB = "models are local folders or built-in names (--init): there are no hub downloads"
_LOG = "progress goes to the progress bar and OUT/log.jsonl"
_ADAM = "AdamW uses betas (0.9, 0.999) and eps 1e-8, torch's defaults (--adam-weight-decay is taken)"
_UPLOAD = "the trained model is OUT/final, a diffusers folder: upload it with huggingface_hub yourself"
# Options of diffusers' train_text_to_image.py with no counterpart here -> why, and what to do instead
DIFFUSERS_INSTEAD = {
    "--caption-column": "captions are the \"text\" of metadata.jsonl / metadata.csv (HF imagefolder's name), or a "
                        ".txt beside each image: rename the column to text",
    "--image-column": "images are the \"file_name\" of metadata.jsonl / metadata.csv, relative to it (HF imagefolder)",
    "--max-train-samples": "give --data a folder (or a metadata file) that holds just the samples to train on",
    "--allow-tf32": "mixed precision (--precision bf16 or fp16) is the fast path on GPUs; fp32 runs keep torch's "
                    "matmul precision",
    "--adam-beta1": _ADAM, "--adam-beta2": _ADAM, "--adam-epsilon": _ADAM,
    "--revision": _NO_HUB, "--variant": _NO_HUB, "--non-ema-revision": _NO_HUB, "--cache-dir": _NO_HUB,
    "--logging-dir": _LOG, "--tracker-project-name": _LOG,
    "--push-to-hub": _UPLOAD, "--hub-token": _UPLOAD, "--hub-model-id": _UPLOAD,
    "--lr-scheduler": "the schedule is linear warm-up (--warmup) then cosine decay to a tenth of --lr",
    "--random-flip": "training never flips images (mirrored logos and text)",
    "--dataset-name": "there are no hub downloads: give --data an image folder with a metadata.jsonl",
    "--report-to": _LOG,
    "--validation-prompts": "sample OUT/final (or a checkpoint's model) with `backdrop generate`",
    "--use-8bit-adam": "AdamW keeps fp32 state (fused on GPUs)",
    "--num-train-epochs": "a run's length is --steps (optimizer steps), whatever the dataset's size",
    "--scale-lr": "give the --lr to use; it is not scaled by batch size or processes",
    "--validation-epochs": "sample OUT/final (or a checkpoint's model) with `backdrop generate`",
}
# diffusers flags for what Backdrop always does: taken, and nothing recorded
ALWAYS_SO = ("--center-crop",  # images are resized, then centre-cropped to --size
             "--enable-xformers-memory-efficient-attention",  # attention is memory-efficient (flash attention)
             "--local-rank")  # torch.distributed.launch's: each process reads LOCAL_RANK from its environment


class Instead(argparse.Action):
    """A diffusers option we do not take (DIFFUSERS_INSTEAD): a one-line error, not argparse's 'unrecognized'."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, argparse.SUPPRESS, nargs="?", default=argparse.SUPPRESS,
                         help=argparse.SUPPRESS)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} (diffusers' option) is not taken: {DIFFUSERS_INSTEAD[option_string]}")


class AlwaysSo(argparse.Action):
    """A diffusers flag for what Backdrop always does (ALWAYS_SO): taken, with or without a value (diffusers' own
    scripts are called with --center_crop=True too), and nothing to record."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, argparse.SUPPRESS, nargs="?", default=argparse.SUPPRESS,
                         help=argparse.SUPPRESS)

    def __call__(self, parser, namespace, values, option_string=None):
        pass


def resolve_aliases(args) -> None:
    """diffusers' and accelerate's spellings of a value (--mixed-precision no, --use-ema) as ours, so that a run's
    record and a resume compare the value, not how it was asked for."""
    args.precision = "fp32" if args.precision == "no" else args.precision
    if args.ema_decay is None:
        args.ema_decay = EMA_DECAY if args.use_ema else 0.0
    elif args.use_ema and args.ema_decay == 0:
        raise CLIError("--use-ema with --ema-decay 0: the EMA is off at decay 0; drop one of them")
    del args.use_ema
