"""TensorRT engines from an ONNX export: shape buckets -> optimization profiles, build, refit, and the runtime.

    build_engines("out/sd15-onnx", "out/sd15-trt", buckets=[ShapeBucket(512, 512, Range(1, 2, 4)), ...])
    backend = TensorRTBackend("out/sd15-trt")            # or Pipeline.from_pretrained(DIR, backend="tensorrt")
    backend.refit("unet", lora_merged_unet.state_dict()); ...; backend.refit("unet")   # restore the base

Shapes. A ShapeBucket names the requests an engine serves: images of height x width pixels, 1..N per batch.
Each bucket becomes one optimization profile per graph with the graph's batch range derived from it (classifier-
free guidance doubles the UNet's batch, and a batch's prompts and negative prompts go through the text encoder
together). A request is matched to the tightest profile that holds every input's shape; one that fits none is
refused with a ShapeError naming the buckets built, before TensorRT sees it. A bucket whose batch range is a
single value is static: its first run captures a CUDA graph that later runs replay.

Precision. TensorRT 10 can lower an fp32 graph to fp16 or bf16 by builder flag ("weak typing"); TensorRT 11
removed those flags and only builds strongly typed networks, in the graph's own precision. `precision_plan`
encodes that rule: on TensorRT 11, or with strongly_typed=True, fp16 engines need an fp16 ONNX export
(`backdrop export onnx --dtype fp16`, whose float16 graph keeps fp32 inputs/outputs, as ModelOpt's AutoCast).

Refit. Engines are built refittable (BuilderFlag.REFIT). TensorRT names refittable weights after the ONNX
initializers; export/onnx.py saved which torch state_dict keys each initializer equals (weights.json), so
`refit_arrays` turns a LoRA-merged UNet's state_dict into the arrays to set. The build writes the base weights
(refit_base.safetensors, by initializer name); `refit(component)` with no weights sets them back, bit for bit.

What runs where: everything above the `# --- TensorRT` line is plain Python and is tested on any machine
(tests/test_tensorrt_logic.py); below it the code calls the TensorRT 10 Python API and needs an NVIDIA GPU.
"""
from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from backdrop.export.onnx import COMPONENTS, GraphSpec, digest, load_export
from backdrop.nn.config import ModelConfig

__all__ = ["Range", "ShapeBucket", "Profile", "ShapeError", "RefitError", "BuildError", "parse_bucket",
           "default_buckets", "profiles_for", "select_profile", "precision_plan", "refit_arrays", "build_engines",
           "Engine", "TensorRTBackend", "TRT_MANIFEST"]

TRT_MANIFEST = "backdrop_tensorrt.json"
REFITTABLE = ("text_encoder", "unet")  # what LoRAs patch; the VAE engines are built without the REFIT flag


class ShapeError(ValueError):
    """A request fits none of the engine's optimization profiles (it is refused, never run)."""


class RefitError(ValueError):
    """New weights do not fit the engine (unknown key, wrong shape, or shared weights given different values)."""


class BuildError(RuntimeError):
    """TensorRT could not parse the graph or build the engine."""


@dataclass(frozen=True)
class Range:
    """min <= opt <= max: TensorRT builds for the whole range and tunes its kernels for opt."""
    min: int
    opt: int
    max: int

    def __post_init__(self):
        if not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(f"Range needs 1 <= min <= opt <= max, got {self.min}/{self.opt}/{self.max}")

    def __contains__(self, n: int) -> bool:
        return self.min <= n <= self.max

    def scaled(self, k: int) -> "Range":
        return Range(self.min, self.opt * k, self.max * k)


@dataclass(frozen=True)
class ShapeBucket:
    """Requests of `batch` images of height x width pixels."""
    height: int
    width: int
    batch: Range = Range(1, 1, 4)

    def __post_init__(self):
        if self.height < 8 or self.width < 8:
            raise ValueError(f"ShapeBucket {self.height}x{self.width}: sides must be at least 8 px")

    @property
    def name(self) -> str:
        return f"{self.height}x{self.width} batch {self.batch.min}-{self.batch.max}"

    @property
    def static(self) -> bool:
        return self.batch.min == self.batch.max


_BUCKET = re.compile(r"^(\d+)(?:x(\d+))?(?::(\d+)(?:-(\d+))?(?:@(\d+))?)?$")


def parse_bucket(text: str) -> ShapeBucket:
    """'512' (512x512, batch 1-4), '512x768', '512x768:1-8' (batch range), '512x768:1-8@2' (opt 2), '768:4'
    (static batch 4: CUDA-graph captured)."""
    m = _BUCKET.match(text.strip())
    if not m:
        raise ValueError(f"bucket {text!r}: expected HEIGHT[xWIDTH][:MIN[-MAX][@OPT]], e.g. 512x768:1-4")
    h, w, lo, hi, opt = m.groups()
    height, width = int(h), int(w or h)
    if lo is None:
        return ShapeBucket(height, width)
    lo, hi = int(lo), int(hi or lo)
    return ShapeBucket(height, width, Range(lo, int(opt or lo), hi))


def default_buckets(cfg: ModelConfig, max_batch: int = 4) -> list[ShapeBucket]:
    """The model's native square size plus its 2:3 and 3:2 neighbours (512 -> 512², 512x768, 768x512)."""
    s, b = cfg.image_size, Range(1, 1, max_batch)
    long = s * 3 // 2 // 64 * 64 or s
    return [ShapeBucket(s, s, b)] + ([ShapeBucket(s, long, b), ShapeBucket(long, s, b)] if long != s else [])


@dataclass(frozen=True)
class Profile:
    """One optimization profile: per input (name, min shape, opt shape, max shape)."""
    bucket: ShapeBucket
    shapes: tuple[tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, ...]], ...]

    @property
    def static(self) -> bool:
        return all(lo == hi for _, lo, _, hi in self.shapes)

    def fits(self, shapes: dict[str, tuple[int, ...]]) -> bool:
        return all(name in shapes and len(shapes[name]) == len(lo)
                   and all(a <= n <= b for a, n, b in zip(lo, shapes[name], hi)) for name, lo, _, hi in self.shapes)

    def volume(self) -> int:
        return sum(int(np.prod(hi)) for _, _, _, hi in self.shapes)

    def to_json(self) -> dict:
        return {"bucket": asdict(self.bucket), "shapes": [[n, list(a), list(b), list(c)] for n, a, b, c in self.shapes]}

    @classmethod
    def from_json(cls, d: dict) -> "Profile":
        b = d["bucket"]
        return cls(ShapeBucket(b["height"], b["width"], Range(**b["batch"])),
                   tuple((n, tuple(a), tuple(o), tuple(c)) for n, a, o, c in d["shapes"]))


def _batch_range(component: str, batch: Range) -> Range:
    """A bucket's image batch B -> the graph's batch. The UNet runs uncond + cond in one call under guidance: up
    to 2B (B without guidance), exactly 2B for a static bucket, whose CUDA graph serves guided batches. The text
    encoder sees a batch's distinct prompts and negative prompts together: 1 to 2B. The VAE sees the B images."""
    if component == "unet":
        return Range(2 * batch.min, 2 * batch.opt, 2 * batch.max) if batch.min == batch.max else batch.scaled(2)
    if component == "text_encoder":
        return Range(1, 2 * batch.opt, 2 * batch.max)
    return batch


def profiles_for(spec: GraphSpec, cfg: ModelConfig, buckets: list[ShapeBucket]) -> list[Profile]:
    """One profile per bucket for the graph `spec` (identical ones merged: the text encoder has no spatial dims).
    A bucket the graph cannot serve (not its static size; sides not multiples of what it runs) is a ValueError."""
    f, out = cfg.vae.downsample_factor, []
    for bucket in buckets:
        if bucket.height % f or bucket.width % f:
            raise ValueError(f"bucket {bucket.name}: sides must be multiples of {f} px (the VAE's factor)")
        h, w = bucket.height // f, bucket.width // f
        if spec.multiple > 1 and (h % spec.multiple or w % spec.multiple):
            raise ValueError(f"bucket {bucket.name}: this export's {spec.name} runs images whose sides are "
                             f"multiples of {f * spec.multiple} px")
        b = _batch_range(spec.name, bucket.batch)
        sizes = {"latent_height": h, "latent_width": w, "height": bucket.height, "width": bucket.width}
        shapes = []
        for name, dims in spec.inputs:
            spatial = dims[2:] if len(dims) == 4 else ()  # (B, C, H, W) inputs only
            for d, want in zip(spatial, (h, w) if spec.name != "vae_encoder" else (bucket.height, bucket.width)):
                if isinstance(d, int) and d != want:
                    raise ValueError(f"bucket {bucket.name}: {spec.name} was exported at a static size "
                                     f"({name} {dims}); build for that size or export with dynamic sizes")
            fixed = [sizes.get(d, d) if d != "batch" else None for d in dims]
            lo, opt, hi = ([x if x is not None else n for x in fixed] for n in (b.min, b.opt, b.max))
            shapes.append((name, tuple(lo), tuple(opt), tuple(hi)))
        profile = Profile(bucket, tuple(shapes))
        if all(p.shapes != profile.shapes for p in out):
            out.append(profile)
    return out


def select_profile(component: str, profiles: list[Profile], shapes: dict[str, tuple[int, ...]]) -> int:
    """Index of the profile to run `shapes` with: a static one that fits exactly first (its CUDA graph), else the
    fitting one with the smallest maximum (TensorRT tuned it closest). Raises ShapeError when none fits."""
    fitting = [i for i, p in enumerate(profiles) if p.fits(shapes)]
    if not fitting:
        got = ", ".join(f"{n} {tuple(s)}" for n, s in shapes.items())
        built = "; ".join(p.bucket.name for p in profiles)
        raise ShapeError(f"{component}: {got} fits none of the engine's optimization profiles, built for: {built}. "
                         f"The request is refused; rebuild with a bucket that holds it (backdrop export tensorrt "
                         f"--bucket HxW:MIN-MAX)")
    return min(fitting, key=lambda i: (not profiles[i].static, profiles[i].volume()))


def precision_plan(precision: str, onnx_dtype: str, trt_major: int, strongly_typed: bool = False,
                   bf16_supported: bool = True) -> tuple[bool, tuple[str, ...]]:
    """(strongly typed?, BuilderFlag names) for an engine in `precision` from a graph exported in `onnx_dtype`.
    Raises ValueError when this TensorRT cannot build that combination, saying what would."""
    if precision not in ("fp32", "fp16", "bf16"):
        raise ValueError(f"precision {precision!r}: choose fp32, fp16 or bf16")
    if trt_major >= 11 or strongly_typed:
        if precision != onnx_dtype:  # a strongly typed network computes in the graph's own types
            why = "TensorRT 11 builds strongly typed networks only" if trt_major >= 11 else "strongly typed"
            raise ValueError(f"{why}: a {precision} engine needs a {precision} ONNX export, and this one is "
                             f"{onnx_dtype}" + ("; export with `backdrop export onnx --dtype fp16`"
                                                if precision == "fp16" else "; bf16 needs TensorRT 10 (weak typing)"))
        return True, ()
    if precision == "bf16" and not bf16_supported:
        raise ValueError("bf16 engines need an Ampere or newer GPU (compute capability 8.0+); use fp16")
    return False, {"fp32": (), "fp16": ("FP16",), "bf16": ("BF16",)}[precision]


def refit_arrays(weight_map: dict, weights: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """{initializer name: array} to refit from torch `weights` (a full or partial state_dict of the component),
    through the export's weight map (export/onnx.py weight_map).

    Each array is the torch tensor as the export stored it (transposed, reshaped) in the engine's weight dtype.
    A weight the export folded away may be passed unchanged but not changed. Unknown keys, wrong shapes, and keys
    the export stored as one weight given different values raise RefitError naming them."""
    inits, folded = weight_map["initializers"], weight_map["folded"]
    owner = {k: name for name, e in inits.items() for k in e["keys"]}
    unknown = [k for k in weights if k not in owner and k not in folded]
    changed = [k for k in weights if k in folded and digest(weights[k].detach().float().cpu().numpy()) != folded[k]]
    for keys, why in ((unknown, "are not weights of this component"),
                      (changed, "were folded into constants at export (an Add of zeros or Mul by ones is dropped), "
                                "so only their export-time values can be given; export the changed model instead")):
        if keys:
            more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
            raise RefitError(f"{', '.join(keys[:5])}{more}: {why}")
    out = {}
    for name in dict.fromkeys(owner[k] for k in weights if k in owner):
        entry = inits[name]
        given = [k for k in entry["keys"] if k in weights]
        arrays = [weights[k].detach().float().cpu().numpy() for k in given]
        arrays = [a.T if entry["transpose"] else a for a in arrays]
        if arrays[0].squeeze().shape != np.empty(entry["shape"]).squeeze().shape:
            raise RefitError(f"{given[0]}: shape {tuple(weights[given[0]].shape)} does not fit the engine's "
                             f"weight {name} {tuple(entry['shape'])}")
        if len(given) < len(entry["keys"]) or any(not np.array_equal(a, arrays[0]) for a in arrays[1:]):
            raise RefitError(f"{', '.join(entry['keys'])} were equal at export and are one weight ({name}) in the "
                             f"engine: give them all, with equal values")
        out[name] = np.ascontiguousarray(arrays[0].reshape(entry["shape"]), dtype=entry["dtype"])
    return out


# --- TensorRT ------------------------------------------------------------------------------------------------
# Everything below imports tensorrt lazily and needs an NVIDIA GPU (TensorRT 10 Python API names).

def _trt():
    try:
        import tensorrt as trt
    except ImportError:
        raise ImportError("the tensorrt backend needs NVIDIA TensorRT: pip install tensorrt (10.x), on a machine "
                          "with an NVIDIA GPU") from None
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
    trt = _trt()
    major = int(trt.__version__.split(".")[0])
    cc = torch.cuda.get_device_capability() if torch.cuda.is_available() else (0, 0)
    typed, flags = precision_plan(precision, export.dtype, major, strongly_typed, bf16_supported=cc >= (8, 0))
    out = Path(out)
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
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
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
            raise FileNotFoundError(f"{folder}: not a Backdrop TensorRT folder (no {TRT_MANIFEST}); build one with "
                                    f"`backdrop export tensorrt ONNX_DIR --out {folder}`")
        self.device = torch.device(device or "cuda")
        if self.device.type != "cuda":
            raise ValueError(f"the tensorrt backend runs on CUDA devices, not {self.device}")
        self.manifest = json.loads((folder / TRT_MANIFEST).read_text())
        sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        cfg = json.loads((folder / "model_config.json").read_text())
        self.config: ModelConfig = config_from_dict(cfg | {"scheduler": asdict(SchedulerConfig.from_diffusers(sched))})
        self.tokenizer = Tokenizer.from_folder(folder / "tokenizer")
        self.dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.manifest["precision"]]
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

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self._run("vae_decoder", latent_sample=latents.float())

    def refit(self, component: str = "unet", weights: dict[str, torch.Tensor] | None = None) -> None:
        """Load new weights (e.g. a LoRA-merged UNet's state_dict) into the engine; weights=None restores the
        base weights the engine was built with, exactly (they are kept in refit_base.safetensors)."""
        from safetensors.numpy import load_file

        if not self.manifest["components"].get(component, {}).get("refittable"):
            raise RefitError(f"{component}: this engine was not built refittable (refittable: "
                             f"{', '.join(c for c, e in self.manifest['components'].items() if e['refittable'])})")
        if component not in self._base:
            self._base[component] = load_file(str(self.folder / component / "refit_base.safetensors"))
        wmap = json.loads((self.folder / component / "weights.json").read_text())
        arrays = self._base[component] if weights is None else refit_arrays(wmap, weights)
        self.engines[component].refit(arrays, self._base[component])
