"""TensorRT engines from an ONNX export: shape buckets -> optimization profiles, build, refit, and the runtime.

    build_engines("out/sd15-onnx", "out/sd15-trt", buckets=[ShapeBucket(512, 512, Range(1, 2, 4)), ...])
    backend = TensorRTBackend("out/sd15-trt")            # or Pipeline.from_pretrained(DIR, backend="tensorrt")
    backend.refit("unet", lora_merged_unet.state_dict()); ...; backend.refit("unet")   # restore the base

Shape buckets, profiles, the precision rule and refit arrays are plain Python in export/trt_plan.py (tested on
any machine, tests/test_tensorrt_logic.py; its names are re-exported here). This file calls the TensorRT 10 Python
API, imported lazily, and needs an NVIDIA GPU.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from backdrop.export.onnx_folder import (ANY, COMPONENTS, FILE, MANIFEST, GraphSpec, beside, check_dtype,
                                         check_replaceable, component_keys, load_export, swap_in, vae_decoder_inputs)
from backdrop.export.trt_plan import (BuildError, Profile, Range, RefitError, ShapeBucket, ShapeError,
                                      default_buckets, parse_bucket, precision_plan, profiles_for, refit_arrays,
                                      select_profile)
from backdrop.fsio import usual_permissions
from backdrop.nn.config import ModelConfig

__all__ = ["Range", "ShapeBucket", "Profile", "ShapeError", "RefitError", "BuildError", "parse_bucket",
           "default_buckets", "profiles_for", "select_profile", "precision_plan", "refit_arrays", "build_engines",
           "Engine", "TensorRTBackend", "TRT_MANIFEST"]

TRT_MANIFEST = "backdrop_tensorrt.json"
REFITTABLE = ("text_encoder", "unet")  # what LoRAs patch; the VAE engines are built without the REFIT flag


def trt_layout() -> dict:
    """Every file and folder build_engines writes."""
    refit = {"weights.json": FILE, "refit_base.safetensors": FILE}
    return ({TRT_MANIFEST: FILE, "model_config.json": FILE, "timing.cache": FILE, "tokenizer": ANY,
             "scheduler": {"scheduler_config.json": FILE}} | {f"{c}.plan": FILE for c in COMPONENTS}
            | {c: refit for c in REFITTABLE})


def _trt():
    try:
        import tensorrt as trt
    except ImportError:
        raise ImportError("the tensorrt backend needs NVIDIA TensorRT: pip install 'backdrop-diffusion[tensorrt]' "
                          "(tensorrt 10.x), on a machine with an NVIDIA GPU") from None
    return trt


def _logger():
    trt = _trt()
    return trt.Logger(trt.Logger.WARNING)


def _build_one(onnx_path: Path, profiles: list[Profile], strongly_typed: bool, flags: tuple[str, ...],
               refit: bool, workspace_gb: float, timing_cache: Path) -> bytes:
    """Parse one ONNX graph and build its serialized engine, reading and updating the timing cache."""
    trt = _trt()
    logger = _logger()
    builder = trt.Builder(logger)
    net_flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(net_flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # reads model.onnx.data next to it too
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(f"{onnx_path}: TensorRT's ONNX parser failed: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 2**30))
    for name in flags + (("REFIT",) if refit else ()):
        config.set_flag(getattr(trt.BuilderFlag, name))
    for p in profiles:
        op = builder.create_optimization_profile()
        for name, lo, opt, hi in p.shapes:
            op.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(op)
    # The timing cache holds measured kernel timings: a rebuild (new bucket, refreshed weights) skips them
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):  # made by another GPU or TensorRT version
        print(f"warning: {timing_cache} does not match this GPU/TensorRT; starting a new timing cache")
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BuildError(f"{onnx_path}: TensorRT could not build the engine (see the log above)")
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return bytes(plan)


def build_engines(onnx_dir, out, buckets: list[ShapeBucket] | None = None, precision: str = "fp16",
                  strongly_typed: bool = False, workspace_gb: float = 8.0, timing_cache=None,
                  components: tuple[str, ...] = COMPONENTS) -> Path:
    """Build one engine per component of the export `onnx_dir` into the folder `out` (self-contained: engines,
    profiles, tokenizer, configs, the refittable components' weight maps and base weights). The timing cache
    defaults to out/timing.cache; pass a shared path to reuse it across builds."""
    from safetensors.numpy import save_file

    export = load_export(onnx_dir, require=components)
    buckets = buckets or default_buckets(export.config)
    profiles = {c: profiles_for(export.specs[c], export.config, buckets) for c in components}  # fail before building
    out = Path(out).resolve()  # "." has no name to build the temporary folder's name from
    check_replaceable(out, TRT_MANIFEST, "a Backdrop TensorRT folder", components, trt_layout())  # not ONNX_DIR
    trt = _trt()
    major = int(trt.__version__.split(".")[0])
    cc = torch.cuda.get_device_capability() if torch.cuda.is_available() else (0, 0)
    typed, flags = precision_plan(precision, export.dtype, major, strongly_typed, bf16_supported=cc >= (8, 0))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        cache = Path(timing_cache) if timing_cache else tmp / "timing.cache"
        if not timing_cache and (out / "timing.cache").is_file():
            shutil.copy(out / "timing.cache", cache)
        entries = {}
        for c in components:
            refit = c in REFITTABLE
            (tmp / f"{c}.plan").write_bytes(_build_one(export.files[c], profiles[c], typed, flags, refit,
                                                       workspace_gb, cache))
            entries[c] = {"file": f"{c}.plan", "spec": export.specs[c].to_json(), "refittable": refit,
                          "profiles": [p.to_json() for p in profiles[c]]}
            if refit:
                (tmp / c).mkdir()
                wmap = export.weight_map(c)
                (tmp / c / "weights.json").write_text(json.dumps(wmap))
                save_file(_initializers(export.files[c]), str(tmp / c / "refit_base.safetensors"))
        for sub in ("tokenizer", "scheduler"):
            shutil.copytree(export.folder / sub, tmp / sub)
        shutil.copy(export.folder / "model_config.json", tmp / "model_config.json")
        (tmp / TRT_MANIFEST).write_text(json.dumps({
            "format": 1, "tensorrt": trt.__version__, "gpu": torch.cuda.get_device_name(), "compute_capability": cc,
            "precision": precision, "strongly_typed": typed, "onnx_export": str(Path(onnx_dir).resolve()),
            "buckets": [asdict(b) for b in buckets], "components": entries}, indent=1))
        usual_permissions(tmp)
        swap_in(tmp, out, TRT_MANIFEST)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _initializers(onnx_path: Path) -> dict[str, np.ndarray]:
    """Every float initializer of a graph by name: the base weights, and whatever TensorRT fused with a weight
    being refit (it asks for those too: Refitter.get_missing_weights)."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(onnx_path))  # external data included
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer if t.data_type in floats}


def _build_hint(folder: Path) -> str:
    """How to make a TensorRT folder for the backend given `folder`; engines never go into an ONNX export."""
    if (folder / MANIFEST).is_file():
        return (f"it is an ONNX export: run it with --backend onnxruntime, or build engines from it with "
                f"`backdrop export tensorrt {folder} --out {beside(folder, '-trt')}`")
    out = beside(folder, "-trt") if folder.exists() else folder
    return f"build one with `backdrop export tensorrt ONNX_DIR --out {out}`"


class Engine:
    """One deserialized engine: picks the profile per call, runs on its own CUDA stream, replays CUDA graphs for
    static profiles, and refits."""

    def __init__(self, component: str, plan: bytes, profiles: list[Profile], device: torch.device,
                 cuda_graphs: bool = True):
        trt = _trt()
        self.component, self.profiles, self.device, self.cuda_graphs = component, profiles, device, cuda_graphs
        self.logger = _logger()
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise BuildError(f"{component}: TensorRT could not load the engine (built by another TensorRT "
                             f"version or for another GPU? rebuild it with backdrop export tensorrt)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.stream = torch.cuda.Stream(device)
        self.contexts: dict[int, object] = {}  # one per profile used: switching profiles on one context is slow
        self.graphs: dict[tuple, tuple] = {}   # (profile, shapes) -> (CUDAGraph, static inputs, static output)

    def _context(self, index: int):
        if index not in self.contexts:
            ctx = self.engine.create_execution_context()
            ctx.set_optimization_profile_async(index, self.stream.cuda_stream)
            self.contexts[index] = ctx
        return self.contexts[index]

    def _enqueue(self, ctx, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        for name, t in inputs.items():
            ctx.set_input_shape(name, tuple(t.shape))
            ctx.set_tensor_address(name, t.data_ptr())
        (name,) = self.outputs
        out = torch.empty(tuple(ctx.get_tensor_shape(name)), device=self.device,
                          dtype=_TORCH[str(self.engine.get_tensor_dtype(name))])
        ctx.set_tensor_address(name, out.data_ptr())
        if not ctx.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError(f"{self.component}: TensorRT execute_async_v3 failed")
        return out

    def __call__(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        shapes = {k: tuple(v.shape) for k, v in inputs.items()}
        index = select_profile(self.component, self.profiles, shapes)  # refuses before anything runs
        inputs = {k: v.to(self.device).contiguous() for k, v in inputs.items()}
        ctx = self._context(index)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # inputs were written on torch's stream
        key = (index, tuple(sorted(shapes.items())))
        with torch.cuda.stream(self.stream):
            if self.cuda_graphs and self.profiles[index].static:
                if key not in self.graphs:
                    static_in = {k: v.clone() for k, v in inputs.items()}
                    self._enqueue(ctx, static_in)  # one plain run first: TensorRT sets up shapes lazily
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, stream=self.stream):
                        static_out = self._enqueue(ctx, static_in)
                    self.graphs[key] = (graph, static_in, static_out)
                graph, static_in, static_out = self.graphs[key]
                for k, v in inputs.items():
                    static_in[k].copy_(v)
                graph.replay()
                out = static_out.clone()
            else:
                out = self._enqueue(ctx, inputs)
        caller = torch.cuda.current_stream(self.device)
        caller.wait_stream(self.stream)
        out.record_stream(caller)  # allocated on our stream, used on the caller's: keep it until that is done
        return out.float()

    def refit(self, arrays: dict[str, np.ndarray], base: dict[str, np.ndarray]) -> None:
        """Set `arrays` (by initializer name); weights TensorRT fused with them come from `base`."""
        trt = _trt()
        refitter = trt.Refitter(self.engine, self.logger)
        keep = []  # trt.Weights does not own its memory: the arrays must live until refit_cuda_engine returns
        for name, a in arrays.items():
            keep.append(a)
            if not refitter.set_named_weights(name, trt.Weights(a)):
                raise RefitError(f"{self.component}: TensorRT rejected new weights for {name} {a.shape} {a.dtype}")
        for name in refitter.get_missing_weights():
            keep.append(base[name])
            refitter.set_named_weights(name, trt.Weights(base[name]))
        torch.cuda.synchronize(self.device)  # no run may read the weights while they change
        if not refitter.refit_cuda_engine():
            raise RefitError(f"{self.component}: TensorRT refit failed (see the log above)")
        self.graphs.clear()  # captured graphs may hold the old weights' addresses


_TORCH = {"DataType.FLOAT": torch.float32, "DataType.HALF": torch.float16, "DataType.BF16": torch.bfloat16,
          "DataType.INT64": torch.int64, "DataType.INT32": torch.int32}


class TensorRTBackend:
    """The Backend contract on TensorRT engines built by build_engines (one CUDA device)."""

    name = "tensorrt"

    def __init__(self, folder, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                 cuda_graphs: bool = True):
        from backdrop.nn.checkpoint import config_from_dict
        from backdrop.nn.config import SchedulerConfig
        from backdrop.nn.tokenizer import Tokenizer

        folder = Path(folder)
        if not (folder / TRT_MANIFEST).is_file():
            raise FileNotFoundError(f"{folder}: not a Backdrop TensorRT folder (no {TRT_MANIFEST}); "
                                    f"{_build_hint(folder)}")
        self.device = torch.device(device or "cuda")
        if self.device.type != "cuda":
            raise ValueError(f"the tensorrt backend runs on CUDA devices, not {self.device}")
        self.manifest = json.loads((folder / TRT_MANIFEST).read_text())
        sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        cfg = json.loads((folder / "model_config.json").read_text())
        self.config: ModelConfig = config_from_dict(cfg | {"scheduler": asdict(SchedulerConfig.from_diffusers(sched))})
        self.tokenizer = Tokenizer.from_folder(folder / "tokenizer")
        self.dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.manifest["precision"]]
        check_dtype(folder, self.manifest["precision"], self.dtype, dtype, "backdrop export tensorrt --precision")
        self.folder, self.specs, self.engines = folder, {}, {}
        for c, e in self.manifest["components"].items():
            self.specs[c] = GraphSpec.from_json(c, e["spec"])
            self.engines[c] = Engine(c, (folder / e["file"]).read_bytes(),
                                     [Profile.from_json(p) for p in e["profiles"]], self.device, cuda_graphs)
        self.latent_multiple = self.specs["unet"].multiple if "unet" in self.specs else 1
        self._base: dict[str, dict[str, np.ndarray]] = {}

    def _run(self, component: str, **inputs: torch.Tensor) -> torch.Tensor:
        self.specs[component].check({k: tuple(v.shape) for k, v in inputs.items()})
        return self.engines[component](inputs)

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._run("text_encoder", input_ids=input_ids.long())

    def unet(self, latents: torch.Tensor, t, context: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float32, device=self.device).reshape(-1)
        t = t.expand(latents.shape[0]) if t.numel() == 1 else t
        return self._run("unet", sample=latents.float(), timestep=t, encoder_hidden_states=context.float())

    def vae_encode(self, images: torch.Tensor) -> torch.Tensor:
        return self._run("vae_encoder", sample=images.float())

    def vae_decode(self, latents: torch.Tensor, image: torch.Tensor | None = None,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
        # a mask-conditioned decoder given no condition decodes a zero image under an all-ones mask: plain decoding
        # (its engine's profiles hold image and mask, so every call binds them)
        return self._run("vae_decoder", **vae_decoder_inputs(self.specs["vae_decoder"], latents, image, mask))

    def refit(self, component: str = "unet", weights: dict[str, torch.Tensor] | None = None) -> None:
        """Load new weights (e.g. a LoRA-merged UNet's state_dict) into the engine; weights=None restores the
        base weights the engine was built with, exactly (they are kept in refit_base.safetensors)."""
        from safetensors.numpy import load_file

        if not self.manifest["components"].get(component, {}).get("refittable"):
            raise RefitError(f"{component}: this engine was not built refittable (refittable: "
                             f"{', '.join(c for c, e in self.manifest['components'].items() if e['refittable'])})")
        if component not in self._base:
            self._base[component] = load_file(str(self.folder / component / "refit_base.safetensors"))
        wmap = component_keys(component, json.loads((self.folder / component / "weights.json").read_text()))
        arrays = self._base[component] if weights is None else refit_arrays(wmap, weights)
        self.engines[component].refit(arrays, self._base[component])
