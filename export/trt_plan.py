"""The plain-Python half of the TensorRT export: shape buckets -> optimization profiles, profile selection, the
precision rule, and refit arrays from a torch state_dict. No TensorRT here, so all of it is tested on any machine
(tests/test_tensorrt_logic.py); export/tensorrt.py builds and runs the engines with it, and the onnxruntime backend
borrows `refit_arrays` for its own refit.

Shapes. A ShapeBucket names the requests an engine serves: images of height x width pixels, 1..N per batch.
Each bucket becomes one optimization profile per graph with the graph's batch range derived from it (classifier-
free guidance doubles the UNet's batch, and a batch's prompts and negative prompts go through the text encoder
together), over every input: images and masks (the VAE encoder's input, a mask-conditioned decoder's condition) at
the bucket's pixel size, the rest at its latent size. A request is matched to the tightest profile that holds every
input's shape; one that fits none is refused with a ShapeError naming the buckets built, before TensorRT sees it.
A bucket whose batch range is a single value is static: its first run captures a CUDA graph that later runs replay.

Precision. TensorRT 10 can lower an fp32 graph to fp16 or bf16 by builder flag ("weak typing"); TensorRT 11
removed those flags and only builds strongly typed networks, in the graph's own precision. `precision_plan`
encodes that rule: on TensorRT 11, or with strongly_typed=True, fp16 engines need an fp16 ONNX export
(`backdrop export onnx --dtype fp16`, whose float16 graph keeps fp32 inputs/outputs, as ModelOpt's AutoCast).

Refit. Engines are built refittable (BuilderFlag.REFIT). TensorRT names refittable weights after the ONNX
initializers; export/onnx.py saved which torch state_dict keys each initializer equals (weights.json), so
`refit_arrays` turns a LoRA-merged UNet's state_dict into the arrays to set. The build writes the base weights
(refit_base.safetensors, by initializer name); `refit(component)` with no weights sets them back, bit for bit.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import numpy as np
import torch

from backdrop.export.onnx_folder import GraphSpec, digest
from backdrop.messages import some
from backdrop.nn.config import ModelConfig

__all__ = ["Range", "ShapeBucket", "Profile", "ShapeError", "RefitError", "BuildError", "parse_bucket",
           "default_buckets", "profiles_for", "select_profile", "precision_plan", "refit_arrays"]


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
            for d, want in zip(spatial, (bucket.height, bucket.width) if spec.in_pixels(name) else (h, w)):
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
                      (changed, "are not among this graph's weights (unused by it, e.g. the VAE encoder's in the "
                                "decoder, or folded into constants at export, e.g. a zero bias), so only their "
                                "export-time values can be given; export the changed model instead")):
        if keys:
            raise RefitError(f"{some(keys)}: {why}")
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
