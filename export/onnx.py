"""Export a model's four components to ONNX, check every graph against torch on the spot, write one folder.

    export_onnx(model, "out/")  ->  out/ with text_encoder/, unet/, vae_encoder/, vae_decoder/ (model.onnx each,
    + model.onnx.data above 2 GB), tokenizer/, scheduler/scheduler_config.json, model_config.json and
    backdrop_export.json (the manifest: opset, dtype, every graph's inputs/outputs and its measured parity).

How one graph is made (`export_component`):
  1. torch.onnx.export with the TorchScript tracer (dynamo=False), opset 17 (or up to 20: `opset=`), constant
     folding on, dynamic batch (and optionally dynamic height/width). We chose the tracer over torch.export
     (dynamo=True) after timing both on the tiny UNet (2 loaded cores): torch.export alone took 35 s and would
     not keep height/width dynamic until they were declared multiples of 8; the tracer took 5 s for the whole
     export. Its one limit, the same as diffusers' and optimum's exports: the UNet's up path is traced as a fixed
     2x upsampling, so a dynamic UNet runs latent sides that are multiples of 8 (graph_specs; the backends refuse
     other sizes by name). Attention and GroupNorm are traced through backdrop.kernels' torch reference
     (F.scaled_dot_product_attention, F.group_norm): we set BACKDROP_KERNELS=torch for the export, so a model
     on CUDA never puts a Triton call into the graph.
  2. onnxslim: constant folding (its vendored onnx-graphsurgeon fold), dead-node removal, pattern cleanup of the
     Shape/Gather/Concat chains the tracer leaves around every reshape, and symbolic shape inference that names
     every dynamic dim (ORT's memory planner and TensorRT's parser read them), iterated to a fixed point: the
     SD1.5 UNet goes from 4600 to 2217 nodes. We prefer it to graphsurgeon alone, which folds but neither
     fuses nor infers symbolic shapes. onnxslim cannot serialise a model over protobuf's 2 GB limit, so there
     the weights (float initializers of >= 1024 values) leave the graph as inputs while it runs and come back
     after (the tracer has already folded their transposes); the 3.4 GB SD1.5 UNet then slims in 7 GB of RAM.
  3. fp16 (optional): ONNX Runtime's float16 converter on the checked fp32 graph, inputs and outputs kept fp32.
  4. Check: ONNX Runtime (CPU) against the torch module on random inputs at batches other than the traced one
     (and another spatial size when h/w are dynamic). A graph over TOLERANCES[dtype] raises ExportError naming
     the component and the measured error, and nothing is written. A mask-conditioned VAE's decoder graph takes
     image and mask too (graph_specs), checked with random binary masks (both sides of its blend).
A weight map (name of each ONNX initializer -> the torch state_dict keys it equals, maybe transposed) is saved
next to each graph: TensorRT's refitter names weights by ONNX initializer, LoRA patches by torch key.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

# The folder's format lives in onnx_folder.py (its readers need no exporter); the public names stay importable here.
from backdrop.export.onnx_folder import (COMPONENTS, FORMAT, MANIFEST, GraphSpec, OnnxExport,  # noqa: F401
                                         check_replaceable, digest, export_layout, graph_specs, load_export,
                                         swap_in, write_json)
from backdrop.fsio import usual_permissions
from backdrop.nn.checkpoint import Model, config_to_dict, diffusers_configs
from backdrop.nn.config import ModelConfig

__all__ = ["export_onnx", "export_component", "load_export", "graph_specs", "sample_inputs", "measure",
           "ExportError", "Tolerance", "TOLERANCES", "GraphSpec", "OnnxExport", "COMPONENTS", "OPSET", "OPSETS",
           "MANIFEST"]

OPSET = 17                # LayerNormalization is native from 17; TensorRT 10 and ORT >= 1.14 read it
OPSETS = range(17, 21)    # 17 .. 20, the TorchScript exporter's highest
EXTERNAL_DATA_BYTES = 2**31 - 2**27  # protobuf's 2 GiB limit, less room for the graph itself
_WEIGHT_MIN_NUMEL = 1024  # float initializers this big are weights: kept out of onnxslim (see step 2)
_TRACE_BATCH = 2          # the traced batch; checks run at others to prove the batch axis is dynamic


class ExportError(RuntimeError):
    """A component could not be exported, or its graph disagrees with torch; nothing was written for it."""


@dataclass(frozen=True)
class Tolerance:
    max_rel_err: float    # max |onnx - torch| / max |torch|
    min_psnr_db: float    # 20 log10(range of torch / RMS error)


# fp32: both runtimes compute the same ops in float32, so only summation order differs (~1e-6 seen).
# fp16: 11-bit mantissa (2^-11 ~ 5e-4 per rounding) compounded through a few dozen layers; 5e-3 seen on tiny models.
TOLERANCES = {"fp32": Tolerance(1e-3, 40.0), "fp16": Tolerance(3e-2, 30.0)}


# ------------------------------------------------------------------------------------------ graph modules

class _TextEncoder(nn.Module):
    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        return self.text_encoder(input_ids)  # (B, 77, C)


class _VAEEncoder(nn.Module):
    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, sample):
        return self.vae.encode(sample)  # (B, 4, H/8, W/8): the posterior mean, unscaled


class _VAEDecoder(nn.Module):
    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample, image=None, mask=None):
        # image (B, 3, 8h, 8w), mask (B, 1, 8h, 8w): a mask-conditioned VAE's graph inputs (graph_specs)
        return self.vae.decode(latent_sample, image, mask)  # (B, 3, 8h, 8w)


def graph_modules(model: Model) -> dict[str, nn.Module]:
    """The torch module behind each graph; its forward takes the graph's inputs in order."""
    return {"text_encoder": _TextEncoder(model.text_encoder), "unet": model.unet,
            "vae_encoder": _VAEEncoder(model.vae), "vae_decoder": _VAEDecoder(model.vae)}


def component_module(module: nn.Module) -> nn.Module:
    """The model component behind a graph module (the text encoder or VAE a wrapper above holds, else the module
    itself): weight maps use its state_dict keys, the ones a refit is given (model.text_encoder.state_dict())."""
    if isinstance(module, (_TextEncoder, _VAEEncoder, _VAEDecoder)):
        (inner,) = module.children()
        return inner
    return module


def sample_inputs(spec: GraphSpec, cfg: ModelConfig, batch: int, latent_hw: tuple[int, int],
                  seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs for `spec` in the ranges each graph sees in use (ids in the vocabulary, images in [-1, 1],
    binary masks, timesteps in [0, num_train_timesteps), unit-variance latents and context). Static dims win over
    latent_hw. A mask is random 0/1 per pixel, so a check covers both sides of the conditioned decoder's blend."""
    g = torch.Generator().manual_seed(seed)
    f = cfg.vae.downsample_factor
    size = {"batch": batch, "latent_height": latent_hw[0], "latent_width": latent_hw[1],
            "height": latent_hw[0] * f, "width": latent_hw[1] * f}
    out = {}
    for name, dims in spec.inputs:
        shape = tuple(size[d] if isinstance(d, str) else d for d in dims)
        if name == "input_ids":
            out[name] = torch.randint(0, cfg.text.vocab_size, shape, generator=g)
        elif name == "timestep":
            out[name] = torch.rand(shape, generator=g) * (cfg.scheduler.num_train_timesteps - 1)
        elif name == "mask":
            out[name] = torch.randint(0, 2, shape, generator=g).float()
        elif spec.in_pixels(name):
            out[name] = torch.rand(shape, generator=g) * 2 - 1
        else:
            out[name] = torch.randn(shape, generator=g)
    return out


# ------------------------------------------------------------------------------------------------ checks

def measure(actual: np.ndarray, expected: np.ndarray) -> tuple[float, float]:
    """(max relative error, PSNR in dB) of `actual` against `expected`; non-finite values count as total failure."""
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    if a.shape != e.shape:
        raise ExportError(f"output shape {a.shape} != torch's {e.shape}")
    if not np.isfinite(a).all():
        return math.inf, -math.inf
    err = np.abs(a - e)
    rel = float(err.max() / max(np.abs(e).max(), 1e-12))
    rmse = float(np.sqrt((err ** 2).mean()))
    psnr = math.inf if rmse == 0 else 20 * math.log10(max(float(e.max() - e.min()), 1e-12) / rmse)
    return rel, psnr


def _session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or torch.get_num_threads()
    so.log_severity_level = 3  # errors only: the float16 graphs' inserted casts otherwise log warnings
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _check(name: str, path: Path, reference: nn.Module, cases: list[dict[str, torch.Tensor]],
           tol: Tolerance) -> dict:
    """Run the graph in ORT and `reference` in torch on each case; raise ExportError past `tol`. The reference
    runs the torch kernels too: the math the graph holds (the Triton kernels have their own parity tests)."""
    try:
        sess = _session(path)
    except Exception as e:  # noqa: BLE001 - ORT raises several types (Fail, InvalidGraph, NotImplemented)
        raise ExportError(f"{name}: onnxruntime cannot load the exported graph: {e}") from None
    device = next(reference.parameters()).device
    worst = {"max_rel_err": 0.0, "psnr_db": math.inf, "shapes": []}
    for inputs in cases:
        with torch_kernels(), full_fp32(), torch.no_grad():
            want = reference(*(t.to(device) for t in inputs.values())).float().cpu().numpy()
        try:
            got = sess.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"{name}: onnxruntime failed to run the exported graph on "
                              f"{ {k: tuple(v.shape) for k, v in inputs.items()} }: {e}") from None
        rel, psnr = measure(got, want)
        shape = list(next(iter(inputs.values())).shape)
        if rel > tol.max_rel_err or psnr < tol.min_psnr_db:
            raise ExportError(f"{name}: the ONNX graph disagrees with torch on input {tuple(shape)}: max rel err "
                              f"{rel:.2e} (limit {tol.max_rel_err:.0e}), PSNR {psnr:.1f} dB (limit "
                              f"{tol.min_psnr_db:.0f} dB); not written")
        worst = {"max_rel_err": max(worst["max_rel_err"], rel), "psnr_db": min(worst["psnr_db"], psnr),
                 "shapes": worst["shapes"] + [shape]}
    return worst | {"psnr_db": min(worst["psnr_db"], 999.0)}  # an exact match has infinite PSNR; JSON has no inf


# ------------------------------------------------------------------------------------------- one graph

@contextmanager
def torch_kernels():
    """BACKDROP_KERNELS=torch while tracing: the graph must hold SDPA and group_norm, which every runtime reads,
    not Triton launches (kernels/__init__.py reads the variable at every call, so this scope is exact)."""
    old = os.environ.get("BACKDROP_KERNELS")
    os.environ["BACKDROP_KERNELS"] = "torch"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("BACKDROP_KERNELS", None)
        else:
            os.environ["BACKDROP_KERNELS"] = old


@contextmanager
def full_fp32():
    """TF32 off for cuDNN convolutions and CUDA matmuls (cuDNN's allow_tf32 defaults to True): a reference on a
    GPU must compute in float32 like ONNX Runtime on the CPU, or TF32's 10-bit mantissa alone can exceed
    TOLERANCES["fp32"]. Both settings are restored after; nothing changes on the CPU."""
    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul


def _trace(name: str, module: nn.Module, spec: GraphSpec, inputs: dict[str, torch.Tensor], path: Path,
           opset: int) -> None:
    device = next(module.parameters()).device
    args = tuple(t.to(device) for t in inputs.values())
    try:
        with torch_kernels(), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's DeprecationWarning and TracerWarnings on shape reads
            torch.onnx.export(module, args, str(path), dynamo=False, opset_version=opset, do_constant_folding=True,
                              input_names=[n for n, _ in spec.inputs], output_names=[n for n, _ in spec.outputs],
                              dynamic_axes=spec.dynamic_axes())
    except Exception as e:  # noqa: BLE001 - the exporter raises many types; all mean "cannot export"
        raise ExportError(f"{name}: torch.onnx.export failed: {type(e).__name__}: {e}") from None


def _slim(proto, hold_out_weights: bool | None = None):
    """onnxslim.slim(proto); over protobuf's 2 GB limit (or when asked) with the weights held out as graph
    inputs while it runs (see the module docstring, step 2). Not always: onnxslim's cleanup is quadratic in
    the number of graph inputs (30 s instead of 10 s for the tiny UNet)."""
    import onnx
    import onnxslim
    from onnx import helper

    graph = proto.graph
    if hold_out_weights is None:
        hold_out_weights = sum(t.ByteSize() for t in graph.initializer) > EXTERNAL_DATA_BYTES
    if not hold_out_weights:
        return onnxslim.slim(proto)
    weights = {t.name: t for t in graph.initializer
               if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
               and math.prod(t.dims) >= _WEIGHT_MIN_NUMEL}
    rest = [t for t in graph.initializer if t.name not in weights]
    del graph.initializer[:]
    graph.initializer.extend(rest)
    graph.input.extend(helper.make_tensor_value_info(n, t.data_type, list(t.dims)) for n, t in weights.items())
    slim = onnxslim.slim(proto)
    inputs = [i for i in slim.graph.input if i.name not in weights]
    del slim.graph.input[:]
    slim.graph.input.extend(inputs)
    used = {x for node in slim.graph.node for x in node.input}
    slim.graph.initializer.extend(t for n, t in weights.items() if n in used)
    return slim


def weight_map(proto, module: nn.Module) -> dict:
    """Which torch weights each ONNX initializer holds, for refits (export/trt_plan.py refit_arrays):

    {"initializers": {name: {"keys": [state_dict keys], "transpose": bool, "shape": [...], "dtype": ...}},
     "folded": {key: digest}}: the float weights no initializer holds, with a digest of their export-time value.
    Matched by content (shape without its 1s + digest), because the tracer renames what it folds (a Linear
    weight becomes "onnx::MatMul_123", transposed; a GroupNorm weight (C, 1, 1); a 1x1 conv used as a Linear,
    SD1's proj_in/proj_out (C, C, 1, 1), a transposed (C, C)). Keys with equal values share one initializer (the
    exporter stores equal tensors once). A weight can vanish: the graph may not use it (the VAE decoder's graph
    holds no encoder weight), or onnxslim drops an Add of zeros or a Mul by ones, which random inits are full of."""
    from onnx import numpy_helper

    table: dict[tuple, list[tuple[str, bool]]] = {}
    arrays = {k: t.detach().float().cpu().numpy() for k, t in module.state_dict().items() if t.is_floating_point()}
    for key, a in arrays.items():
        table.setdefault((a.squeeze().shape, digest(a)), []).append((key, False))
        if a.squeeze().ndim == 2:  # a Linear's (out, in), or a 1x1 conv's (out, in, 1, 1) used as one
            t = a.squeeze().T
            table.setdefault((t.shape, digest(t)), []).append((key, True))
    inits = {}
    for init in proto.graph.initializer:
        if init.data_type != 1:  # float32 only: the map is built on the fp32 graph
            continue
        a = numpy_helper.to_array(init)
        hits = table.get((a.squeeze().shape, digest(a)), [])
        for transpose in (False, True):
            keys = sorted(k for k, tr in hits if tr == transpose)
            if keys:
                inits[init.name] = {"keys": keys, "transpose": transpose, "shape": list(init.dims),
                                    "dtype": "float32"}
                break
    held = {k for e in inits.values() for k in e["keys"]}
    return {"initializers": inits, "folded": {k: digest(a) for k, a in arrays.items() if k not in held}}


def _to_fp16(proto):
    from onnxruntime.transformers.float16 import convert_float_to_float16

    big = sum(t.ByteSize() for t in proto.graph.initializer) > EXTERNAL_DATA_BYTES
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert_float_to_float16(proto, keep_io_types=True, disable_shape_infer=big)


def _save(proto, path: Path, external_data: bool | None) -> bool:
    import onnx

    if external_data is None:
        external_data = sum(t.ByteSize() for t in proto.graph.initializer) > EXTERNAL_DATA_BYTES
    path.parent.mkdir(parents=True, exist_ok=True)
    if external_data:
        onnx.save(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save(proto, str(path))
    return external_data


def export_component(spec: GraphSpec, module: nn.Module, cfg: ModelConfig, path, *, dtype: str = "fp32",
                     opset: int = OPSET, tolerance: Tolerance | None = None, reference: nn.Module | None = None,
                     check_cases: list[tuple[int, tuple[int, int]]] | None = None,
                     external_data: bool | None = None) -> dict:
    """Export `module` as the graph `spec` to `path` (model.onnx), checked against `reference` (default: the
    module itself) at check_cases [(batch, latent (h, w))]. Returns the manifest entry; raises ExportError."""
    import onnx

    if dtype not in TOLERANCES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(TOLERANCES)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # fp32 is always checked first, so that an fp16 failure can only mean precision
    tols = {"fp32": tolerance if tolerance and dtype == "fp32" else TOLERANCES["fp32"],
            "fp16": tolerance or TOLERANCES["fp16"]}
    module.eval()
    static = _static_latent_hw(spec, cfg.vae.downsample_factor)
    base = static or (8, 8)  # 8x8 latents: the smallest size every level of SD's 4-level UNet still halves
    cases = check_cases or [(1, base), (3, base if static else (base[0], 2 * base[1]))]
    with tempfile.TemporaryDirectory(prefix="backdrop-onnx-") as tmp:
        raw = Path(tmp) / "raw.onnx"
        _trace(spec.name, module, spec, sample_inputs(spec, cfg, _TRACE_BATCH, base, seed=1), raw, opset)
        proto = _slim(onnx.load(str(raw)))
    weights = weight_map(proto, component_module(module))
    graphs = {"fp32": proto} | ({"fp16": _to_fp16(proto)} if dtype == "fp16" else {})
    for t in graphs[dtype].graph.initializer:  # the fp16 converter keeps initializer names
        if t.name in weights["initializers"]:
            weights["initializers"][t.name]["dtype"] = "float16" if t.data_type == onnx.TensorProto.FLOAT16 \
                else "float32"
    del proto
    inputs = [sample_inputs(spec, cfg, b, hw, seed=2 + i) for i, (b, hw) in enumerate(cases)]
    with tempfile.TemporaryDirectory(prefix=".backdrop-onnx-", dir=path.parent) as tmp:
        for kind in list(graphs):
            trial = Path(tmp) / kind / path.name
            external = _save(graphs.pop(kind), trial, external_data)  # pop: free each graph once written
            check = _check(spec.name, trial, reference or module, inputs, tols[kind])
        for f in trial.parent.iterdir():  # the last graph written is the one asked for
            os.replace(f, path.parent / f.name)
    (path.parent / "weights.json").write_text(json.dumps(weights, indent=1) + "\n")
    return {"file": f"{path.parent.name}/{path.name}", "external_data": external, "dtype": dtype,
            **spec.to_json(), "check": check | {"tolerance": dataclasses.asdict(tols[dtype])}}


def _static_latent_hw(spec: GraphSpec, f: int) -> tuple[int, int] | None:
    """The latent (h, w) a graph with static spatial dims was exported at, else None."""
    for name, dims in spec.inputs:
        if len(dims) == 4 and not isinstance(dims[2], str):
            return (dims[2] // f, dims[3] // f) if spec.in_pixels(name) else (dims[2], dims[3])
    return None


# -------------------------------------------------------------------------------------------- the folder

def export_onnx(model: Model, out, *, dtype: str = "fp32", static_hw: tuple[int, int] | None = None,
                components: tuple[str, ...] = COMPONENTS, opset: int = OPSET, external_data: bool | None = None,
                progress: bool | None = True, merged: list[dict] | None = None) -> Path:
    """Export `model` (float32 weights, any device) into the folder `out`, each graph checked against torch.

    dtype: "fp32" or "fp16" (weights and arithmetic; inputs/outputs stay float32). static_hw: (height, width)
    in pixels to fix the spatial dims (TensorRT then builds for that size only); default dynamic. external_data:
    weights in model.onnx.data; default only above 2 GB. The folder is written next to `out` and swapped in,
    so a failed export leaves what was there before. Raises ExportError naming the component at fault.
    merged: what was merged into the weights before (the CLI's --lora: file, sha256, scale), kept in the manifest
    as "merged", so that an export says which LoRAs it holds.
    """
    from tqdm import tqdm

    if model.dtype != torch.float32:
        raise ValueError(f"export needs float32 weights (fp16 graphs are converted from the checked fp32 one); "
                         f"the model is {model.dtype}: load it with load_model(path, dtype=torch.float32)")
    if opset not in OPSETS:
        raise ValueError(f"opset {opset}: choose {OPSETS[0]} to {OPSETS[-1]} ({OPSETS[0]} is the lowest with "
                         f"LayerNormalization, {OPSETS[-1]} the highest torch's exporter writes)")
    unknown = [c for c in components if c not in COMPONENTS]
    if unknown or not components:
        raise ValueError(f"components {list(components)}: choose from {', '.join(COMPONENTS)}")
    out = Path(out).resolve()  # "." and ".." have no name to build the temporary folders' names from
    check_replaceable(out, MANIFEST, "a Backdrop ONNX export", components, export_layout())
    cfg, specs, modules = model.config, graph_specs(model.config, static_hw), graph_modules(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        entries = {}
        # progress None: a bar on a terminal only (tqdm's disable=None)
        for name in tqdm(components, desc="export onnx", disable=None if progress is None else not progress):
            entries[name] = export_component(specs[name], modules[name], cfg, tmp / name / "model.onnx",
                                             dtype=dtype, opset=opset, external_data=external_data)
        model.tokenizer.save(tmp / "tokenizer")
        (tmp / "scheduler").mkdir()
        write_json(tmp / "scheduler" / "scheduler_config.json",
                    diffusers_configs(cfg)["scheduler/scheduler_config.json"])
        write_json(tmp / "model_config.json", {k: v for k, v in config_to_dict(cfg).items() if k != "scheduler"})
        write_json(tmp / MANIFEST, {"format": FORMAT, "opset": opset, "dtype": dtype,
                                     "static_hw": list(static_hw) if static_hw else None,
                                     "versions": _versions(), "merged": merged or [], "components": entries})
        usual_permissions(tmp)
        swap_in(tmp, out, MANIFEST)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _versions() -> dict:
    import onnx
    import onnxruntime
    import onnxslim

    from backdrop import __version__
    return {"backdrop": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "onnxslim": onnxslim.__version__}


