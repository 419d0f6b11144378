"""The one `backdrop` command. Subcommands live next to their code and register themselves here."""
from __future__ import annotations

import argparse
import importlib
import sys

# Each module's `add_parser(subparsers)` adds its subcommands, each with `set_defaults(func=...)`.
SUBCOMMAND_MODULES = [
    "backdrop.diffusion.cli",   # generate, img2img, inpaint
    "backdrop.train.cli",       # train {clip,vae,pretrain,inpaint,cache}
    "backdrop.export.cli",      # export {onnx,tensorrt}
    "backdrop.serve.cli",       # serve
]


LONG_RUNNING = {"serve"}  # commands that run until stopped and manage memory themselves: see main()


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2, no traceback."""


def parse_device(text: str | None, flag: str = "--device"):
    """The torch.device a --device option names (None stays None: the command's default), checked against this
    machine, or a CLIError naming the option."""
    if text is None:
        return None
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise CLIError(f"{flag} {text!r} is not a device name (try cpu, cuda or cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"{flag} {text}: no CUDA GPU is available here; use {flag} cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise CLIError(f"{flag} {text}: this machine has {torch.cuda.device_count()} GPU(s)")
    return device


class _Parser(argparse.ArgumentParser):
    """argparse, except that a usage error is one line (with where to find help), like every other user error,
    instead of the usage block; subcommands' parsers are of this class too (add_subparsers takes the parent's)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="backdrop",
        description="Backdrop: paint new scenes around products (inpainting), text-to-image and image-to-image.",
    )
    parser.add_argument("--version", action="version", version=f"backdrop {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:  # a subcommand whose module is not written yet
            if e.name == name:
                continue
            raise
        module.add_parser(sub)
    return parser


def _version() -> str:
    from backdrop import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    """The command line's entry point; argv None reads sys.argv. Run as a program (argv None), the process is ours,
    so a one-shot job keeps freed memory for reuse (backdrop.runtime; opt out with BACKDROP_MALLOC=system); a
    long-running server, whose mix of shapes fragments a heap that never shrinks, does so itself within a budget
    (--cpu-cache-mb, serve/engine.py); called in-process with argv, e.g. from tests, the host's allocator is left
    alone."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if argv is None and args.command not in LONG_RUNNING:
        from backdrop.runtime import keep_freed_memory

        keep_freed_memory()
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except CLIError as e:
        print(f"backdrop {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
