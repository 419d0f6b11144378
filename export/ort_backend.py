"""The Backend contract (export/backends.py) on ONNX Runtime: the four graphs of an export folder.

    backend = OnnxRuntimeBackend("out/sd15-onnx")               # CPU
    backend = OnnxRuntimeBackend("out/sd15-onnx", "cuda")       # CUDA execution provider, CPU fallback
    backend = OnnxRuntimeBackend(DIR, "cuda", providers=("tensorrt", "cuda"))  # ORT's TensorRT provider first
    Pipeline(backend) / Pipeline.from_pretrained(DIR, backend="onnxruntime")

The graphs compute in the precision they were exported in (backdrop_export.json "dtype"); inputs and outputs are
float32 either way (export/onnx.py keeps fp16 graphs' interfaces in fp32), and every call returns float32 on
`device`, as the contract says. A `dtype` other than the export's is refused (nothing converts an export: export
again with --dtype). An export made with a fixed --size runs that size only (`static_hw`). Shapes are checked
against the export's interface before ONNX Runtime sees them, so a wrong channel count or a latent size the graph
cannot run is a ValueError naming the graph and the dim, not an ORT stack trace; a graph file ONNX Runtime cannot
load is a ValueError naming the file.

On CPU, inputs go in and out as numpy arrays (zero-copy views of the torch tensors). On CUDA, an IOBinding binds
torch's device buffers directly and ORT runs on torch's current stream (`user_compute_stream`), so nothing
crosses the bus and no extra synchronisation is needed.
"""
from __future__ import annotations

import numpy as np
import torch

from backdrop.export.onnx_folder import COMPONENTS, OnnxExport, check_dtype, load_export, vae_decoder_inputs
from backdrop.export.trt_plan import refit_arrays
from backdrop.messages import require
from backdrop.nn.config import ModelConfig

__all__ = ["OnnxRuntimeBackend", "PROVIDERS", "session_providers", "attached"]

# Our short names for ORT's execution providers.
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
             "tensorrt": "TensorrtExecutionProvider"}


def session_providers(device: torch.device, requested: tuple[str, ...] | None = None,
                      trt_cache: str | None = None) -> list:
    """ORT's `providers` list for `device`: CPU alone on the CPU; on CUDA the requested providers (default
    ("cuda",)) in order, then CPU for any node they do not take. A provider this onnxruntime build lacks is a
    ValueError that says which package has it. A provider the build lists can still fail to load (e.g. a
    CUDA 12 onnxruntime-gpu on a CUDA 13 machine): ORT then only warns and runs on the CPU, so
    OnnxRuntimeBackend checks every session's providers once it is made (`attached`)."""
    import onnxruntime as ort

    if device.type == "cpu":
        if requested and set(requested) != {"cpu"}:
            raise ValueError(f"providers {list(requested)} need a CUDA device; pass device='cuda'")
        return ["CPUExecutionProvider"]
    if device.type != "cuda":
        raise ValueError(f"onnxruntime backend: device {device} is not supported (cpu or cuda)")
    available, index = ort.get_available_providers(), device.index or 0
    out = []
    for short in requested or ("cuda",):
        if short not in PROVIDERS:
            raise ValueError(f"unknown provider {short!r}; choose from {', '.join(PROVIDERS)}")
        full = PROVIDERS[short]
        if full not in available:
            raise ValueError(f"this onnxruntime has no {full} (it has {', '.join(available)}); install "
                             f"onnxruntime-gpu (CUDA and TensorRT providers) in place of onnxruntime")
        stream = {"user_compute_stream": str(torch.cuda.current_stream(device).cuda_stream)}
        if short == "cuda":
            out.append((full, {"device_id": index, **stream}))
        elif short == "tensorrt":  # fp16 engines, cached across runs (the first build takes minutes)
            out.append((full, {"device_id": index, "trt_fp16_enable": True, **stream,
                               "trt_engine_cache_enable": trt_cache is not None,
                               **({"trt_engine_cache_path": trt_cache} if trt_cache else {})}))
    return out + ["CPUExecutionProvider"]


class OnnxRuntimeBackend:
    """encode_text / unet / vae_encode / vae_decode over the ONNX graphs of an export folder."""

    name = "onnxruntime"

    def __init__(self, folder, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                 providers: tuple[str, ...] | None = None, threads: int | None = None,
                 trt_cache: str | None = None):
        require("the onnxruntime backend", "export", "onnxruntime")
        if not isinstance(folder, (str, bytes)) and not hasattr(folder, "__fspath__"):
            raise TypeError(f"the onnxruntime backend runs an export folder, not a {type(folder).__name__}; "
                            "make one with `backdrop export onnx MODEL --out DIR` (or export.onnx.export_onnx)")
        self.export: OnnxExport = load_export(folder)
        self.config: ModelConfig = self.export.config
        self.tokenizer = self.export.tokenizer()
        self.device = torch.device(device or "cpu")
        self.dtype = {"fp32": torch.float32, "fp16": torch.float16}[self.export.dtype]  # what the graphs compute in
        check_dtype(self.export.folder, self.export.dtype, self.dtype, dtype, "backdrop export onnx --dtype")
        # (height, width) in pixels of an export made with --size, else None (any size)
        self.static_hw = tuple(self.export.manifest["static_hw"]) if self.export.manifest.get("static_hw") else None
        # latent sides must be multiples of this (8 for a dynamic-size SD UNet: export/onnx.py graph_specs)
        self.latent_multiple = self.export.specs["unet"].multiple
        # As many threads as torch uses, so that backends compare like for like (ORT's default is every core)
        self.threads = threads or torch.get_num_threads()
        self.providers = session_providers(self.device, providers, trt_cache)
        self._pinned: dict[str, dict] = {}
        self.sessions = {c: self._session(c) for c in COMPONENTS}

    def _session(self, component: str, overrides: dict[str, np.ndarray] | None = None):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.log_severity_level = 3
        values = {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in (overrides or {}).items()}
        for name, value in values.items():
            so.add_initializer(name, value)  # replaces the graph's initializer of that name
        if values:  # above ORT_ENABLE_EXTENDED the CPU provider keeps the graph's own Conv weights, and every
            # weight of an fp16 graph, whatever the overrides say (onnxruntime 1.32): a refit would change nothing
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        self._pinned[component] = values  # ORT uses override buffers in place: they must outlive the session
        path = self.export.files[component]
        try:
            sess = ort.InferenceSession(str(path), so, providers=self.providers)
        except Exception as e:  # onnxruntime's pybind errors (InvalidProtobuf, Fail, ...) are not RuntimeErrors
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(f"{path}: onnxruntime cannot load this graph ({why}); the file is damaged or incomplete "
                             "(an interrupted copy, a missing model.onnx.data): export the model again") from None
        return attached(sess, self.providers, component)

    def refit(self, component: str = "unet", weights: dict[str, torch.Tensor] | None = None) -> None:
        """Swap new weights into a graph without exporting again, e.g. a LoRA-merged UNet's state_dict (any
        subset of its keys): the session is rebuilt with ONNX Runtime overriding the initializers they map to
        (export/trt_plan.py refit_arrays, through the export's weights.json). weights=None restores the graph's
        own weights."""
        arrays = {} if weights is None else refit_arrays(self.export.weight_map(component), weights)
        self.sessions[component] = self._session(component, arrays)

    # ------------------------------------------------------------------------------------------- the contract

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._run("text_encoder", input_ids=input_ids.long())

    def unet(self, latents: torch.Tensor, t, context: torch.Tensor) -> torch.Tensor:
        B = latents.shape[0]
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1)
        if t.numel() == 1:
            t = t.expand(B)  # a scalar timestep for the whole batch, as UNet.forward accepts
        return self._run("unet", sample=latents.float(), timestep=t, encoder_hidden_states=context.float())

    def vae_encode(self, images: torch.Tensor) -> torch.Tensor:
        return self._run("vae_encoder", sample=images.float())

    def vae_decode(self, latents: torch.Tensor, image: torch.Tensor | None = None,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
        # a mask-conditioned decoder given no condition decodes a zero image under an all-ones mask: plain decoding
        spec = self.export.specs["vae_decoder"]
        return self._run("vae_decoder", **vae_decoder_inputs(spec, latents, image, mask))

    # ------------------------------------------------------------------------------------------------- running

    def _run(self, component: str, **inputs: torch.Tensor) -> torch.Tensor:
        spec = self.export.specs[component]
        spec.check({k: tuple(v.shape) for k, v in inputs.items()})
        if self.device.type == "cuda":
            return self._run_cuda(component, inputs)
        feed = {k: v.detach().cpu().contiguous().numpy() for k, v in inputs.items()}
        (out,) = self.sessions[component].run(None, feed)
        return torch.from_numpy(out).float()

    def _run_cuda(self, component: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        spec, sess = self.export.specs[component], self.sessions[component]
        binding, index = sess.io_binding(), self.device.index or 0
        keep = []  # the bound buffers must outlive the run
        for name, t in inputs.items():
            t = t.to(self.device).contiguous()
            keep.append(t)
            binding.bind_input(name, "cuda", index, _NP[t.dtype], tuple(t.shape), t.data_ptr())
        (name, _), = spec.outputs
        out = torch.empty(_output_shape(spec, inputs, self.config.vae.downsample_factor), device=self.device)
        binding.bind_output(name, "cuda", index, np.float32, tuple(out.shape), out.data_ptr())
        sess.run_with_iobinding(binding)
        return out


def attached(sess, providers: list, component: str = "graph"):
    """`sess`, once every provider in `providers` (session_providers' list) is found attached to it. ORT only
    warns about a requested provider it cannot load and builds the session without it; a CUDA session fallen back
    to the CPU would fail later, at its first run ("no data transfer registered" for the bound CUDA buffers)."""
    names = [p[0] if isinstance(p, tuple) else p for p in providers]
    missing = [n for n in names if n not in sess.get_providers()]
    if missing:
        raise RuntimeError(f"onnxruntime did not attach {', '.join(missing)} to the {component} session (it has "
                           f"{sess.get_providers()}): the provider failed to load, e.g. an onnxruntime-gpu built "
                           f"for another CUDA or cuDNN than this machine's (see onnxruntime's warnings above)")
    return sess


_NP = {torch.float32: np.float32, torch.int64: np.int64}


def _output_shape(spec, inputs: dict[str, torch.Tensor], f: int) -> tuple[int, ...]:
    """The single output's shape, its symbolic dims read off the inputs (height = f * latent_height, both ways)."""
    sizes = {}
    for name, dims in spec.inputs:
        sizes |= {d: n for d, n in zip(dims, inputs[name].shape) if isinstance(d, str)}
    for small, big in (("latent_height", "height"), ("latent_width", "width")):
        if big in sizes:
            sizes.setdefault(small, sizes[big] // f)  # the VAE encoder rounds odd sides down
        elif small in sizes:
            sizes[big] = sizes[small] * f
    (_, dims), = spec.outputs
    return tuple(sizes[d] if isinstance(d, str) else d for d in dims)
