"""The one `backdrop` command. Subcommands live next to their code and register themselves here."""
from __future__ import annotations

import argparse
import importlib
import math
import os
import re
import signal
import sys
from pathlib import Path

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


def make_folder(path, flag: str = "--out") -> Path:
    """The folder an option names, created with its parents, or a CLIError naming the option."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CLIError(f"{flag} {folder}: cannot create the folder ({e.strerror or e})") from None
    return folder


def one_line(e: Exception) -> str:
    """An exception's message on one line, for a CLIError."""
    return " ".join(str(e).split())


def _path_and_suffix(text: str, what: str) -> tuple[str, str | None]:
    """PATH[:WHAT] -> (path, suffix or None). The whole text is the path when it names an existing file (`style:2`)
    or when what follows the last colon holds a slash (`C:/x.safetensors`, `dir:with:colons/x.safetensors`)."""
    path, sep, suffix = text.rpartition(":")
    if not (sep and path) or os.path.exists(text) or "/" in suffix or "\\" in suffix:
        return text, None
    if not suffix.strip():
        raise argparse.ArgumentTypeError(f"{text!r} ends in ':' without a {what}; give PATH or PATH:{what}")
    return path, suffix


def lora_spec(text: str) -> tuple[str, float]:
    """--lora PATH[:SCALE] -> (path, scale); a suffix that is not a number is part of the path (default scale 1)."""
    path, scale = _path_and_suffix(text, "SCALE")
    if scale is None:
        return text, 1.0
    try:
        value = float(scale)
    except ValueError:
        return text, 1.0
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"SCALE {scale!r} in {text!r} must be a finite number")
    return path, value


def add_dtype_option(group) -> None:
    """--dtype, shared by the commands that run a model (generate, img2img, inpaint, serve)."""
    group.add_argument("--dtype", choices=("fp32", "bf16", "fp16", "auto"), default=None,  # nn.resolve.parse_dtype
                       help="weight precision of --backend torch (default: fp16 on GPUs, bf16 on CPUs with native "
                            "bf16, else fp32; auto: as the model's weights are stored); an export runs in the "
                            "precision it was exported in")


def add_checkpoint_options(group) -> None:
    """How a model file is read, shared by the commands that load one (generate, img2img, inpaint, serve, export):
    load_model's prediction_type, vae, allow_pickle and variant."""
    group.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default=None,
                       help="what the model's UNet predicts, for a single file that does not say: SD 2.x 768-v files "
                            "are v_prediction (default: the folder's scheduler config; for a file its .yaml beside "
                            "it, else epsilon, guessed with a warning for SD 2.x text-to-image files)")
    group.add_argument("--vae", default=None, metavar="PATH",
                       help="run this VAE instead of the model's own: a .safetensors file (e.g. "
                            "vae-ft-mse-840000-ema-pruned.safetensors), a diffusers VAE or model folder, or a "
                            "hub repo id already in the local Hugging Face cache (stabilityai/sd-vae-ft-mse)")
    group.add_argument("--allow-pickle", action="store_true",
                       help="read pickle .ckpt/.bin files with torch.load(weights_only=True); only files you trust")
    group.add_argument("--variant", default=None, metavar="NAME",
                       help="read a model folder's NAME variant of its weights, e.g. fp16: the "
                            "*.fp16.safetensors files of a Hub snapshot that holds both (diffusers' variant=)")


def checkpoint_options(args) -> dict:
    """add_checkpoint_options' values as load_model's / Pipeline.from_pretrained's keyword arguments."""
    return dict(prediction_type=args.prediction_type, vae=args.vae, allow_pickle=args.allow_pickle,
                variant=args.variant)


def add_lora_option(group) -> None:
    """--lora, shared by the commands that load a model (generate, img2img, inpaint, serve)."""
    group.add_argument("--lora", action="append", default=[], type=lora_spec, metavar="PATH[:SCALE]",
                       help="merge a LoRA .safetensors file (diffusers/PEFT or kohya-ss format) into the model's "
                            "weights, scaled by SCALE (default 1; lower is milder); repeat to stack several "
                            "(--backend torch only)")


def load_loras(pipe, loras: list[tuple[str, float]]) -> None:
    """Merge every --lora into the pipeline's weights, all active at once; a bad file or key is a one-line
    CLIError."""
    names = [f"lora_{i}" for i in range(len(loras))]
    try:
        for (path, scale), name in zip(loras, names):
            pipe.load_lora_weights(path, adapter_name=name, lora_scale=scale)  # each alone: checked one by one
        if len(names) > 1:
            pipe.set_adapters(names)
    except (OSError, ValueError) as e:  # CheckpointError (a ValueError) names the file and the keys
        raise CLIError(f"--lora: {one_line(e)}") from None


def textual_inversion_spec(text: str) -> tuple[str, str | None]:
    """--textual-inversion PATH[:TOKEN] -> (path, token; None: the file's own)."""
    return _path_and_suffix(text, "TOKEN")


FREEU = {"sd1": (0.9, 0.2, 1.5, 1.6), "sd2": (0.9, 0.2, 1.4, 1.6)}  # the FreeU authors' s1, s2, b1, b2


def freeu_spec(text: str) -> tuple[float, ...]:
    """argparse type of --freeu: a name in FREEU, or four comma-separated numbers."""
    if text.strip() in FREEU:
        return FREEU[text.strip()]
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4:
        raise argparse.ArgumentTypeError(f"{text!r} is not four comma-separated numbers S1,S2,B1,B2, sd1 or sd2")
    return values


def add_freeu_option(group) -> None:
    """--freeu, for the commands that load a model."""
    group.add_argument("--freeu", type=freeu_spec, default=None, metavar="S1,S2,B1,B2",
                       help="FreeU (Si et al. 2023): weigh the UNet's backbone features up and its skips' low "
                            "frequencies down, training-free; 'sd1' (0.9,0.2,1.5,1.6) and 'sd2' (0.9,0.2,1.4,1.6) "
                            "are the authors' values (default: off; --backend torch only)")


def add_textual_inversion_option(group) -> None:
    """--textual-inversion, for the commands that load a model."""
    group.add_argument("--textual-inversion", action="append", default=[], type=textual_inversion_spec,
                       metavar="PATH[:TOKEN]",
                       help="add a learned word (a textual inversion embedding: diffusers' learned_embeds or "
                            "A1111's .safetensors) for prompts to use as TOKEN (default: the one the file names; "
                            "A1111's: the file's name); repeat for several (--backend torch only)")


def add_ip_adapter_options(group, image: str) -> None:
    """--ip-adapter and --ip-adapter-scale, for the commands that load a model; `image`: where its image prompt
    comes from (the command's own words)."""
    group.add_argument("--ip-adapter", metavar="FILE",
                       help="an IP-Adapter .safetensors (ip-adapter_sd15 or ip-adapter-plus_sd15; its image "
                            "encoder is the image_encoder folder beside it, as in h94/IP-Adapter's models/ folder); "
                            f"{image}; --backend torch only")
    group.add_argument("--ip-adapter-scale", type=float, default=1.0, metavar="S",
                       help="how strongly the image prompt counts: 0 not at all, 1 as trained (default: %(default)s)")


def check_ip_adapter_options(args) -> None:
    """Before the model loads: --ip-adapter names a file, --backend is torch, --ip-adapter-scale is finite, >= 0."""
    if not 0 <= args.ip_adapter_scale < math.inf:
        raise CLIError(f"--ip-adapter-scale {args.ip_adapter_scale:g} must be finite and >= 0")
    if args.ip_adapter is None:
        return
    if args.backend != "torch":
        raise CLIError(f"--ip-adapter needs --backend torch, not {args.backend}: an export's UNet has no "
                       "image-prompt attention")
    if not Path(args.ip_adapter).expanduser().is_file():
        raise CLIError(f"--ip-adapter {args.ip_adapter}: no such file (an IP-Adapter's .safetensors)")


def load_ip_adapter(pipe, path: str | None, scale: float) -> None:
    """--ip-adapter FILE at --ip-adapter-scale: its image encoder is the image_encoder folder beside it."""
    if path is None:
        return
    if not 0 <= scale < math.inf:  # before loading (Ray Serve's replicas come here without check_ip_adapter_options)
        raise CLIError(f"--ip-adapter-scale {scale:g} must be finite and >= 0")
    weights = Path(path).expanduser()
    try:
        pipe.load_ip_adapter(str(weights.parent), subfolder="", weight_name=weights.name)
        pipe.set_ip_adapter_scale(scale)
    except (OSError, ValueError) as e:  # CheckpointError, a missing image encoder, another backend
        raise CLIError(f"--ip-adapter {path}: {one_line(e)}") from None


def load_textual_inversions(pipe, specs: list[tuple[str, str | None]]) -> None:
    """Load each --textual-inversion into the pipeline; a bad file, key or token is a one-line CLIError."""
    for path, token in specs:
        try:
            (word,) = pipe.load_textual_inversion(path, token=token)
        except (OSError, ValueError) as e:  # CheckpointError (a ValueError) names the file and the key
            raise CLIError(f"--textual-inversion: {one_line(e)}") from None
        if token is None:  # the file named it (A1111's: after the file): say which word prompts use
            print(f"--textual-inversion {path}: prompts use {word!r}", file=sys.stderr)


_OPTION = re.compile(r"--[A-Za-z0-9][A-Za-z0-9_-]*")  # an option's name; a value may look like one, with spaces


def _dashed(args: list[str]) -> list[str]:
    """Each --long_option (or --long_option=value) as --long-option; values (a prompt "--no_text please"), and
    anything after `--`, as given."""
    out = list(args)
    for i, a in enumerate(out):
        if a == "--":
            break
        name, eq, value = a.partition("=")
        if "_" in name and _OPTION.fullmatch(name):
            out[i] = name.replace("_", "-") + eq + value
    return out


_NUMBER = r"[-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|inf|nan)"


def _as_typed(message: str, names: dict[str, str], argv: list[str]) -> str:
    """`message` with each option named as the user typed it: errors name an option by its first name (--steps),
    the user may have given an alias (--num-inference-steps), diffusers' spelling (--num_inference_steps) or an
    abbreviation argparse took (--num-inf). Given twice, the last spelling names it, as its value is the last.
    A number after the option's name is shown as typed too (`--strength -1`, not the parsed -1.0)."""
    typed: dict[str, tuple[str, str | None]] = {}  # our name -> the user's last spelling of it, and its value
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        spelled, eq, value = arg.partition("=")
        if not _OPTION.fullmatch(spelled):
            continue
        dashed = spelled.replace("_", "-")
        ours = names.get(dashed) or _abbreviated(dashed, names)
        if ours is not None:
            typed[ours] = spelled, (value if eq else argv[i + 1] if i + 1 < len(argv) else None)
    for ours, (spelled, value) in typed.items():
        if value is not None:
            message = re.sub(re.escape(ours) + f" ({_NUMBER})(?![\\w.])",
                             lambda m: f"{ours} {value}" if _same_number(m[1], value) else m[0], message)
        if spelled != ours:
            message = re.sub(re.escape(ours) + r"(?![\w-])", spelled, message)
    return message


def as_typed(message: str, args: argparse.Namespace) -> str:
    """`message` with the options of this command line (and the numbers after them) named as the user typed them."""
    return _as_typed(message, args.option_names, _Parser.typed)


def _same_number(shown: str, typed: str) -> bool:
    try:
        return float(shown) == float(typed)
    except ValueError:
        return False


def _abbreviated(prefix: str, names: dict[str, str]) -> str | None:
    """The option a unique prefix stands for (argparse's allow_abbrev), else None."""
    meant = {ours for name, ours in names.items() if name.startswith(prefix)}
    return meant.pop() if len(meant) == 1 else None


def apply_model_options(pipe, args) -> None:
    """The model options of the commands that load one (generate, img2img, inpaint, serve), in order: merge
    --lora, add --textual-inversion words, set the --controlnet and --adapter ones, load --ip-adapter, turn on
    --freeu, check --clip-skip against the model (its text encoder's layers; an exported backend cannot skip).
    Each error is a one-line CLIError naming its option."""
    from backdrop.diffusion.text import check_clip_skip

    load_loras(pipe, args.lora)
    load_textual_inversions(pipe, args.textual_inversion)
    load_controlnets(pipe, getattr(args, "controlnet", None) or [], getattr(args, "allow_pickle", False))
    load_adapters(pipe, getattr(args, "adapter", None) or [])
    load_ip_adapter(pipe, getattr(args, "ip_adapter", None), getattr(args, "ip_adapter_scale", 1.0))
    if args.freeu is not None:
        try:
            pipe.enable_freeu(*args.freeu)
        except ValueError as e:  # a scale <= 0, or another backend
            raise CLIError(f"--freeu {','.join(f'{v:g}' for v in args.freeu)}: {one_line(e)}") from None
    try:
        check_clip_skip(args.clip_skip, pipe.backend,
                        "run the model folder with --backend torch, or leave out --clip-skip")
    except ValueError as e:
        layers, n = pipe.config.text.num_layers, args.clip_skip
        why = one_line(e) if 0 <= n <= layers else f"give 0 to {layers} (this model's text encoder has {layers} layers)"
        raise CLIError(f"--clip-skip {n}: {why}") from None


def load_adapters(pipe, paths: list) -> None:
    """--adapter (repeatable): pipe.adapter runs them all, in order."""
    from backdrop.nn.t2i_adapter import load_t2i_adapter
    _set_in_order(pipe, "adapter", "--adapter", paths, load_t2i_adapter,
                  "an export's UNet takes no adapter features (--backend torch)")


def load_controlnets(pipe, paths: list, allow_pickle: bool = False) -> None:
    """--controlnet (repeatable): pipe.controlnet runs them all, in order."""
    from backdrop.nn.controlnet import load_controlnet
    _set_in_order(pipe, "controlnet", "--controlnet", paths,
                  lambda path, dtype, device: load_controlnet(path, dtype, device, allow_pickle),
                  "an export's UNet takes no ControlNet residuals (--backend torch)")


def _set_in_order(pipe, attribute: str, flag: str, paths: list, load, instead: str) -> None:
    """pipe.<attribute> (controlnet, adapter) = the networks at `paths`, loaded by load(path, dtype, device) and set
    one at a time, so that an error (a file that is no such network, one for another base model, another backend)
    is a one-line CLIError naming its `flag` and path."""
    from backdrop.nn.checkpoint import torch_model

    loaded = []
    for path in paths:
        try:
            torch_model(pipe.backend, flag, instead)
            loaded.append(load(path, pipe.backend.dtype, pipe.backend.device))
            setattr(pipe, attribute, loaded)
        except (OSError, ValueError, TypeError) as e:  # CheckpointError, MissingFile, a misfit, another backend
            raise CLIError(f"{flag} {path}: {one_line(e)}") from None


class _Parser(argparse.ArgumentParser):
    """argparse, except that a usage error is one line (with where to find help), like every other user error,
    instead of the usage block, naming options as typed; subcommands' parsers are of this class too
    (add_subparsers takes the parent's)."""

    typed: list[str] = []  # the command line as the user typed it, set by parse_args for the errors of every parser

    def error(self, message: str):
        self._fail(self.prog, message)

    def parse_args(self, args=None, namespace=None):
        """As argparse's, but an option the subcommand does not know is blamed on the subcommand (`backdrop
        generate: error: ... (see backdrop generate --help)`), not on `backdrop`; and options may be spelled as
        diffusers' scripts spell them (--max_train_steps for --max-train-steps): no option here has a '_'."""
        _Parser.typed = list(sys.argv[1:] if args is None else args)
        dashed = _dashed(_Parser.typed)
        known, extra = self.parse_known_args(dashed, namespace)
        if extra:
            as_typed = dict(zip(dashed, _Parser.typed))
            self._fail(getattr(known, "prog", self.prog),
                       f"unrecognized arguments: {' '.join(as_typed.get(a, a) for a in extra)}")
        return known

    def _fail(self, prog: str, message: str):
        # argparse names an option by all its names ("argument --steps/--num-inference-steps: ..."): the first
        # is enough, and _as_typed turns it into the user's spelling
        message = re.sub(r"argument (--?[\w-]+)(?:/--?[\w-]+)+", r"argument \1", message)
        message = _as_typed(message, _option_names(self), _Parser.typed)
        self.exit(2, f"{prog}: error: {message} (see {prog} --help)\n")


def _option_names(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each long option of `parser` -> the name errors use for it (its first: --num-inference-steps -> --steps)."""
    return {o: a.option_strings[0] for a in parser._actions for o in a.option_strings if o.startswith("--")}


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
    _name_commands(parser)
    return parser


def _name_commands(parser: argparse.ArgumentParser) -> None:
    """Each (sub)command's parser records its own name ("backdrop train vae") in the namespace, for its errors, and
    the name errors use for each of its long options (--num-inference-steps: --steps), for _as_typed."""
    parser.set_defaults(prog=parser.prog, option_names=_option_names(parser))
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _name_commands(child)


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
        parser.print_help(sys.stderr)
        return 2
    ours = argv is None  # a process of our own: stop the way shells expect (below)
    if ours:
        if hasattr(sys.stdout, "reconfigure"):  # a path's undecodable bytes go out as they came in
            sys.stdout.reconfigure(errors="surrogateescape")
        if args.command in ONE_SHOT:  # serve and train handle SIGTERM themselves (drain; save and exit 143)
            signal.signal(signal.SIGTERM, _terminate)
    try:
        return int(args.func(args) or 0)
    except CLIError as e:
        print(f"{args.prog}: error: {as_typed(str(e), args)}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, _Terminated, BrokenPipeError) as e:
        # Temporary files are gone (the writers' cleanups ran). A process of our own then dies by the signal, so a
        # shell loop over `backdrop` stops at Ctrl-C (an exit status 130 does not stop it) and `| head -1` is quiet.
        number = {KeyboardInterrupt: signal.SIGINT, _Terminated: signal.SIGTERM}.get(type(e), signal.SIGPIPE)
        if number != signal.SIGPIPE:
            print("interrupted" if number == signal.SIGINT else "terminated", file=sys.stderr)
        if not ours:
            return 128 + number
        if number == signal.SIGPIPE:  # nothing more can be written to stdout; keep Python's exit flush quiet
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        signal.signal(number, signal.SIG_DFL)
        os.kill(os.getpid(), number)
        return 128 + number  # (not reached)


ONE_SHOT = ("generate", "img2img", "inpaint", "export")


class _Terminated(BaseException):
    """SIGTERM in a one-shot command: unwinds like Ctrl-C, so that a half-written output is removed."""


def _terminate(signum, frame):
    raise _Terminated()


if __name__ == "__main__":
    raise SystemExit(main())
