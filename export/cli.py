"""`backdrop export onnx` and `backdrop export tensorrt`: make a model runnable by ONNX Runtime or TensorRT.

    backdrop export onnx sd15-inpaint/ --out sd15-onnx            # four checked graphs + tokenizer + configs
    backdrop export onnx sd15/ --out style-onnx --lora style.safetensors:0.8   # a LoRA merged into the weights
    backdrop export tensorrt sd15-onnx --out sd15-trt --bucket 512 --bucket 512x768:1-4
    backdrop inpaint ... / Pipeline.from_pretrained("sd15-onnx", backend="onnxruntime")

User errors (a missing model, a bad bucket, a graph that fails its check) are one line on stderr and exit status
2 (backdrop.cli.CLIError); the path written is printed on success.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from backdrop.cli import CLIError, add_checkpoint_options, checkpoint_options, lora_spec, one_line, parse_device
from backdrop.messages import require

__all__ = ["add_parser"]


def _output_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--out", required=True, metavar="DIR",
                   help="the folder to write: a new or empty one, or an earlier output of the same command, "
                        "which is replaced whole once everything in it has been built and checked (any other "
                        "folder, or one holding files the command did not write, is refused)")
    return p


def add_parser(subparsers) -> None:
    out = _output_options()
    export = subparsers.add_parser("export", help="export a model to ONNX, or build TensorRT engines from that",
                                   description="Export a model for ONNX Runtime or TensorRT.")
    sub = export.add_subparsers(dest="target", metavar="TARGET", required=True)

    onnx = sub.add_parser(
        "onnx", parents=[out], help="write the four ONNX graphs of a model, each checked against PyTorch",
        description="Export the text encoder, UNet, VAE encoder and VAE decoder of MODEL to ONNX, with "
                    "the tokenizer and configs, into one folder that `--backend onnxruntime` runs on its own. "
                    "Every graph is run on random inputs and compared with the PyTorch model; one that disagrees "
                    "is not written.",
        epilog="example: backdrop export onnx sd-v1-5-inpainting.safetensors --out sd15-onnx --dtype fp16")
    onnx.add_argument("model", metavar="MODEL",
                      help="a diffusers model folder, one .safetensors checkpoint, or a built-in model's name")
    onnx.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32",
                      help="weight precision of the graphs; inputs and outputs stay fp32 (default: %(default)s)")
    onnx.add_argument("--size", metavar="HxW", default=None,
                      help="fix the image size in pixels (e.g. 512x512); default: any size, as with torch")
    onnx.add_argument("--components", nargs="+", metavar="NAME", default=None,
                      help="export only these: text_encoder unet vae_encoder vae_decoder (default: all four). "
                           "Neither backend nor `export tensorrt` runs a folder without all four: it is for "
                           "inspecting graphs, or for build_engines(components=) in Python")
    onnx.add_argument("--opset", type=int, default=17, metavar="N",
                      help="ONNX opset, 17 to 20 (default: %(default)s, which TensorRT 10 and ONNX Runtime 1.14+ "
                           "read)")
    onnx.add_argument("--external-data", action="store_true",
                      help="always keep weights in model.onnx.data next to each graph (automatic above 2 GB)")
    add_checkpoint_options(onnx)
    onnx.add_argument("--lora", action="append", default=[], type=lora_spec, metavar="PATH[:SCALE]",
                      help="merge a LoRA .safetensors file (diffusers/PEFT or kohya-ss format) into the model's "
                           "weights before exporting, scaled by SCALE (default 1); repeat to stack several. The "
                           "export holds the merged weights: a LoRA cannot be added to or taken out of it later")
    onnx.add_argument("--quiet", action="store_true", help="no progress bar")
    onnx.add_argument("--device", default="cpu",
                      help="where to trace and check the model: cpu, cuda, ... (default: %(default)s)")
    onnx.set_defaults(func=_onnx)

    trt = sub.add_parser(
        "tensorrt", parents=[out], help="build TensorRT engines from an ONNX export (NVIDIA GPU)",
        description="Build one TensorRT engine per graph of the ONNX_DIR export, for the image sizes and batch "
                    "sizes named by --bucket. Requests outside every bucket are refused at run time.",
        epilog="example: backdrop export tensorrt sd15-onnx --out sd15-trt --bucket 512:1-4 --bucket 512x768:2")
    trt.add_argument("onnx_dir", metavar="ONNX_DIR", help="a folder written by `backdrop export onnx`")
    trt.add_argument("--bucket", action="append", metavar="HxW[:MIN-MAX]", default=None,
                     help="image size and batch range to build for, repeatable: 512 (512x512, batch 1-4), "
                          "512x768:1-8, 768:2 (exactly 2: replayed as a CUDA graph). Default: the model's size "
                          "and its 2:3 and 3:2 neighbours")
    trt.add_argument("--precision", choices=("fp16", "bf16", "fp32"), default="fp16",
                     help="engine precision (default: %(default)s); bf16 needs TensorRT 10 and an Ampere+ GPU")
    trt.add_argument("--strongly-typed", action="store_true",
                     help="build in the ONNX graph's own types (needs an fp16 export for fp16; TensorRT 11 "
                          "always does)")
    trt.add_argument("--timing-cache", metavar="FILE", default=None,
                     help="kernel timing cache to read and update, shared across builds (default: DIR/timing.cache)")
    trt.add_argument("--workspace-gb", type=float, default=8.0, metavar="GB",
                     help="scratch GPU memory TensorRT may use while building (default: %(default)s)")
    trt.set_defaults(func=_tensorrt)


def _size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        h, _, w = text.lower().partition("x")
        hw = int(h), int(w or h)
    except ValueError:
        raise CLIError(f"--size {text!r}: expected HEIGHTxWIDTH in pixels, e.g. 512x768") from None
    if min(hw) < 8:
        raise CLIError(f"--size {text}: sides must be at least 8 px (multiples of the VAE's 8)")
    return hw


def _check_out(out: str, manifest: str, what: str, components, layout: dict) -> None:
    """Refuse `--out` before minutes of work: a folder that may not be replaced, or a place nothing can be written."""
    from backdrop.export.onnx_folder import check_replaceable

    try:
        check_replaceable(Path(out), manifest, what, components, layout)
    except (ValueError, OSError) as e:
        raise CLIError(f"--out {e}") from None
    _check_writable(out)


def _check_writable(out: str) -> None:
    """Make (and remove) a folder in the nearest existing folder above `out`, where the command will make its own
    (the temporary one next to `out`, and any missing folders on the way)."""
    parent = Path(out).resolve().parent
    existing = next(p for p in (parent, *parent.parents) if p.exists())
    if not existing.is_dir():
        raise CLIError(f"--out {out}: {existing} is a file, not a folder")
    try:
        Path(tempfile.mkdtemp(prefix=".backdrop-probe-", dir=existing)).rmdir()
    except OSError as e:
        raise CLIError(_out_error(out, e)) from None


def _out_error(out: str, e: OSError) -> str:
    """One line naming --out and the user's path (not a temporary folder's), for a filesystem error writing it."""
    return f"--out {out}: cannot write there ({e.strerror or e})"


def _components(names: list[str] | None) -> tuple[str, ...]:
    from backdrop.export.onnx import COMPONENTS

    unknown = [c for c in names or () if c not in COMPONENTS]
    if unknown:
        raise CLIError(f"--components {' '.join(unknown)}: choose from {' '.join(COMPONENTS)}")
    return tuple(names or COMPONENTS)


def _onnx(args) -> int:
    import torch

    try:  # before minutes of loading and tracing
        require("backdrop export onnx", "export", "onnx", "onnxslim")
    except ModuleNotFoundError as e:
        raise CLIError(str(e)) from None

    from backdrop.export.onnx import MANIFEST, OPSETS, ExportError, export_layout, export_onnx
    from backdrop.nn.checkpoint import load_model
    from backdrop.nn.resolve import resolve_model

    static_hw, components, device = _size(args.size), _components(args.components), parse_device(args.device)
    if args.opset not in OPSETS:
        raise CLIError(f"--opset {args.opset}: choose {OPSETS[0]} to {OPSETS[-1]}")
    _check_out(args.out, MANIFEST, "a Backdrop ONNX export", components, export_layout())  # before loading
    try:
        model = load_model(resolve_model(args.model), dtype=torch.float32, device=device,
                           **checkpoint_options(args))
    except (OSError, ValueError, RuntimeError) as e:  # missing files, CheckpointError
        raise CLIError(f"cannot load model {args.model}: {e}") from None
    if args.lora:
        from backdrop.nn.lora import fuse_lora
        stack = []  # after=: one CPU copy of each weight however many LoRAs change it
        for lora, scale in args.lora:  # as generate's --lora (backdrop.cli.load_loras), on the model itself
            try:
                stack.append(fuse_lora(model, lora, scale, after=stack))
            except (OSError, ValueError) as e:  # CheckpointError (a ValueError) names the file and the keys
                raise CLIError(f"--lora: {one_line(e)}") from None
    merged = [{"lora": str(f.path), "sha256": _sha256(f.path), "scale": f.scale} for f in stack] if args.lora else []
    try:
        path = export_onnx(model, args.out, dtype=args.dtype, static_hw=static_hw, components=components,
                           opset=args.opset, external_data=True if args.external_data else None,
                           progress=False if args.quiet else None, merged=merged)  # a bar on a terminal only
    except OSError as e:  # the model is loaded: writing --out failed (full disk, permissions changed)
        raise CLIError(_out_error(args.out, e)) from None
    except (ExportError, ValueError) as e:
        raise CLIError(str(e)) from None
    print(path)
    return 0


def _sha256(path) -> str:
    import hashlib

    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _tensorrt(args) -> int:
    from backdrop.export.onnx_folder import COMPONENTS
    from backdrop.export.tensorrt import TRT_MANIFEST, BuildError, build_engines, parse_bucket, trt_layout

    if not args.workspace_gb > 0:
        raise CLIError(f"--workspace-gb {args.workspace_gb}: must be > 0")
    _check_out(args.out, TRT_MANIFEST, "a Backdrop TensorRT folder", COMPONENTS, trt_layout())
    try:
        buckets = [parse_bucket(b) for b in args.bucket] if args.bucket else None
        path = build_engines(args.onnx_dir, args.out, buckets=buckets, precision=args.precision,
                             strongly_typed=args.strongly_typed, workspace_gb=args.workspace_gb,
                             timing_cache=args.timing_cache)
    except (ImportError, BuildError, ValueError, OSError) as e:
        raise CLIError(str(e)) from None
    print(path)
    return 0
