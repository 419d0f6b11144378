"""The ONNX export folder's format, shared by the exporter (export/onnx.py) and its readers (the onnxruntime and
TensorRT backends): the manifest's names, each graph's interface (GraphSpec, graph_specs), the fingerprint of
folded weights in weights.json (digest), reading a folder back (load_export, component_keys), and what a writer
may replace (check_replaceable, export_layout, swap_in)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from backdrop.messages import some
from backdrop.nn.checkpoint import config_from_dict
from backdrop.nn.config import ModelConfig, SchedulerConfig
from backdrop.nn.tokenizer import Tokenizer

__all__ = ["COMPONENTS", "MANIFEST", "FORMAT", "GraphSpec", "graph_specs", "vae_decoder_inputs", "digest",
           "OnnxExport", "load_export", "check_replaceable", "export_layout", "component_keys", "swap_in",
           "check_dtype"]

COMPONENTS = ("text_encoder", "unet", "vae_encoder", "vae_decoder")
MANIFEST = "backdrop_export.json"
FORMAT = 1                # bump when the folder layout changes
# the inputs whose spatial dims are pixels (images, masks); every other (B, C, h, w) input is in latents
PIXEL_INPUTS = {"vae_encoder": ("sample",), "vae_decoder": ("image", "mask")}


@dataclass(frozen=True)
class GraphSpec:
    """One graph's interface: (name, dims) per input and output; a str dim is dynamic (its ONNX dim_param).
    Dynamic spatial dims must be multiples of `multiple` (see graph_specs); `scale` is pixels per latent."""
    name: str
    inputs: tuple[tuple[str, tuple[int | str, ...]], ...]
    outputs: tuple[tuple[str, tuple[int | str, ...]], ...]
    multiple: int = 1
    scale: int = 8

    def in_pixels(self, name: str) -> bool:
        """Whether input `name`'s spatial dims are pixels (an image or mask), not latents."""
        return name in PIXEL_INPUTS.get(self.name, ())

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {n: {i: d for i, d in enumerate(dims) if isinstance(d, str)} for n, dims in self.inputs + self.outputs}

    def to_json(self) -> dict:
        return {"inputs": {n: list(d) for n, d in self.inputs}, "outputs": {n: list(d) for n, d in self.outputs},
                "multiple": self.multiple, "scale": self.scale}

    @classmethod
    def from_json(cls, name: str, d: dict) -> "GraphSpec":
        return cls(name, tuple((n, tuple(v)) for n, v in d["inputs"].items()),
                   tuple((n, tuple(v)) for n, v in d["outputs"].items()), d["multiple"], d["scale"])

    def check(self, inputs: dict[str, tuple[int, ...]]) -> None:
        """Raise ValueError naming the graph, the input and the dim when `inputs` (name -> shape) do not fit."""
        sizes: dict[str, int] = {}
        for name, dims in self.inputs:
            shape = tuple(inputs[name])
            want = "(" + ", ".join(map(str, dims)) + ")"
            if len(shape) != len(dims):
                raise ValueError(f"{self.name}: input {name} must be {want}, got {shape}")
            for d, n in zip(dims, shape):
                if (d != n) if isinstance(d, int) else (sizes.setdefault(d, n) != n):
                    raise ValueError(f"{self.name}: input {name} must be {want}, got {shape}"
                                     + (f" ({d} is {sizes[d]} in another input)" if isinstance(d, str) else ""))
                if isinstance(d, str) and d != "batch" and n % self.multiple:
                    raise ValueError(f"{self.name}: input {name} {shape}: {d} {n} is not a multiple of "
                                     f"{self.multiple}; this export runs latent sides that are multiples of "
                                     f"{self.multiple} (images multiples of {self.scale * self.multiple} px)")
        for small, big in (("latent_height", "height"), ("latent_width", "width")):  # both: the decoder's condition
            if small in sizes and big in sizes and sizes[big] != self.scale * sizes[small]:
                got = ", ".join(f"{n} {tuple(s)}" for n, s in inputs.items())
                raise ValueError(f"{self.name}: {got}: {big} must be {self.scale} x {small} "
                                 f"= {self.scale * sizes[small]}, got {sizes[big]}")


def graph_specs(cfg: ModelConfig, static_hw: tuple[int, int] | None = None) -> dict[str, GraphSpec]:
    """The four graphs' interfaces. static_hw: fixed (height, width) in pixels, else dynamic spatial dims.

    A dynamic UNet runs every latent size, as the torch UNet does: traced, its up path upsamples to the skip
    connection's size read from the graph (nn/layers.py Upsample2D), where diffusers' and optimum's exports bake in
    a 2x that lands on the skips only at multiples of 2^(levels-1) (images multiples of 64 px for SD). Exports made
    before say so in their manifest (`multiple` 8), and callers pad to it.
    A mask-conditioned VAE's decoder also takes the inpainting condition, image and mask, at the image's size."""
    f, L, C = cfg.vae.downsample_factor, cfg.text.max_position_embeddings, cfg.text.hidden_size
    if static_hw is not None and (static_hw[0] % f or static_hw[1] % f):
        raise ValueError(f"static size {static_hw[0]}x{static_hw[1]} must be a multiple of {f} (the VAE's factor)")
    H, W = static_hw or ("height", "width")
    h, w = (H // f, W // f) if static_hw else ("latent_height", "latent_width")
    lat, cin = cfg.vae.latent_channels, cfg.unet.in_channels
    decoder_in = (("latent_sample", ("batch", lat, h, w)),)
    if cfg.vae.mask_conditioned:  # the known image in [-1, 1] and the repaint mask (1 = repaint)
        decoder_in += (("image", ("batch", cfg.vae.out_channels, H, W)), ("mask", ("batch", 1, H, W)))
    return {
        "text_encoder": GraphSpec("text_encoder", (("input_ids", ("batch", L)),),
                                  (("last_hidden_state", ("batch", L, C)),), 1, f),
        "unet": GraphSpec("unet", (("sample", ("batch", cin, h, w)), ("timestep", ("batch",)),
                                   ("encoder_hidden_states", ("batch", L, C))),
                          (("out_sample", ("batch", cfg.unet.out_channels, h, w)),),
                          1, f),
        "vae_encoder": GraphSpec("vae_encoder", (("sample", ("batch", cfg.vae.in_channels, H, W)),),
                                 (("latent_mean", ("batch", lat, h, w)),), 1, f),
        "vae_decoder": GraphSpec("vae_decoder", decoder_in,
                                 (("sample", ("batch", cfg.vae.out_channels, H, W)),), 1, f),
    }


def vae_decoder_inputs(spec: GraphSpec, latents: torch.Tensor, image: torch.Tensor | None = None,
                       mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The vae_decoder graph's inputs (float32) for the Backend call vae_decode(latents, image, mask).

    A mask-conditioned decoder's graph always takes image and mask: without a condition (text-to-image, img2img)
    it gets a zero image and an all-ones mask, which decode exactly as a plain VAE (the condition's features are
    multiplied by 1 - mask = 0 everywhere). A condition for a plain decoder is refused as VAE.decode refuses it."""
    if (image is None) != (mask is None):
        raise ValueError(f"{spec.name}: give both image and mask (the inpainting condition) or neither")
    inputs = {"latent_sample": latents.float()}
    dims = dict(spec.inputs)
    if "mask" not in dims:
        if image is not None:
            raise ValueError(f"{spec.name}: image/mask condition only a mask-conditioned VAE "
                             "(AsymmetricAutoencoderKL); this one is a plain AutoencoderKL")
        return inputs
    if image is None:
        B, _, h, w = latents.shape
        H, W = h * spec.scale, w * spec.scale
        image = latents.new_zeros(B, dims["image"][1], H, W)  # (B, 3, H, W)
        mask = latents.new_ones(B, 1, H, W)                    # repaint everything: the plain decoding
    return inputs | {"image": image.float(), "mask": mask.float()}


def digest(a: np.ndarray) -> str:
    """A fingerprint of an array's float32 values (not its shape)."""
    return hashlib.blake2b(np.ascontiguousarray(a, np.float32).tobytes(), digest_size=16).hexdigest()


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing from the export folder") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


# A folder layout: {name: FILE, ANY (a folder whose contents are not checked) or a nested layout}
FILE, ANY = "file", "any"


def export_layout() -> dict:
    """Every file and folder export_onnx writes (graphs' model.onnx.data only above 2 GB or when asked)."""
    graph = {"model.onnx": FILE, "model.onnx.data": FILE, "weights.json": FILE}
    return {MANIFEST: FILE, "model_config.json": FILE, "tokenizer": ANY,
            "scheduler": {"scheduler_config.json": FILE}} | {c: graph for c in COMPONENTS}


def foreign_entries(folder: Path, layout: dict) -> list[str]:
    """What `folder` holds that `layout` does not name (links included: a writer makes none), relative to
    `folder`, a folder's name ending in "/"."""
    found = []
    for path in sorted(folder.iterdir()):
        want, is_dir = layout.get(path.name), path.is_dir() and not path.is_symlink()
        if isinstance(want, dict) and is_dir:
            found += [f"{path.name}/{name}" for name in foreign_entries(path, want)]
        elif path.is_symlink() or want is None or (want == FILE) == is_dir:
            found.append(path.name + ("/" if is_dir else ""))
    return found


def check_replaceable(out: Path, manifest: str, what: str, components, layout: dict) -> None:
    """Refuse to replace `out` unless it is missing, empty, or an earlier folder of the same kind (it holds
    `manifest`) whose components are all being written again and which holds nothing but what such a writer
    writes (`layout`): never another folder's files (a model, the ONNX export an engine is built from, the working
    folder), never a graph the new folder would not have, never a file put there since (notes, engines)."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not (out / manifest).is_file():
        raise ValueError(f"{out}: exists and is not {what}; refusing to replace it")
    dropped = [c for c in read_json(out / manifest).get("components", {}) if c not in components]
    if dropped:
        raise ValueError(f"{out}: holds {what} with {', '.join(dropped)} too, which writing only "
                         f"{', '.join(components)} would delete; write those as well, or choose another folder")
    foreign = foreign_entries(out, layout)
    if foreign:
        raise ValueError(f"{out}: holds {some(foreign, 3)} besides {what}; replacing the folder "
                         f"would delete them: move them out, or choose another folder")


def swap_in(tmp: Path, out: Path, manifest: str) -> None:
    """Put the finished folder `tmp` (a sibling of `out`) at `out`. An earlier folder (check_replaceable) is swapped
    out whole, then deleted; an empty one is filled in place, `manifest` last (it may be a shell's working folder:
    `--out .`)."""
    if out.is_dir() and not any(out.iterdir()):
        for path in sorted(tmp.iterdir(), key=lambda p: p.name == manifest):
            os.replace(path, out / path.name)
        tmp.rmdir()
    elif out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)


@dataclass(frozen=True)
class OnnxExport:
    """An export folder, read: its ModelConfig, graph interfaces and files (the tokenizer loads on demand)."""
    folder: Path
    config: ModelConfig
    dtype: str
    specs: dict[str, GraphSpec]
    files: dict[str, Path]
    manifest: dict

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_folder(self.folder / "tokenizer")

    def weight_map(self, component: str) -> dict:
        return component_keys(component, read_json(self.files[component].parent / "weights.json"))


# Exports made before weight maps held the component's own keys prefixed them with export_onnx's graph wrappers'
# attribute names (text_encoder.text_model..., vae.decoder...).
_OLD_PREFIXES = {"text_encoder": "text_encoder.", "vae_encoder": "vae.", "vae_decoder": "vae."}


def component_keys(component: str, wmap: dict) -> dict:
    """`wmap` (a weights.json) keyed by the component's own state_dict keys, as refits give them; an older
    export's prefixed keys are stripped (no key of the text encoder or VAE itself starts with its prefix)."""
    prefix = _OLD_PREFIXES.get(component)
    keys = [k for e in wmap["initializers"].values() for k in e["keys"]] + list(wmap["folded"])
    if prefix is None or not keys or not all(k.startswith(prefix) for k in keys):
        return wmap
    inits = {name: e | {"keys": [k[len(prefix):] for k in e["keys"]]} for name, e in wmap["initializers"].items()}
    return wmap | {"initializers": inits, "folded": {k[len(prefix):]: d for k, d in wmap["folded"].items()}}


def check_dtype(folder: Path, precision: str, own: torch.dtype, asked: torch.dtype | None, remake: str) -> None:
    """An export's precision is fixed when it is made: a backend asked for another refuses (it would not convert)."""
    if asked is not None and asked != own:
        raise ValueError(f"{folder}: this export computes in {precision}, not {str(asked).removeprefix('torch.')}; "
                         f"an export's precision is fixed when it is made ({remake}), so leave the dtype out or "
                         "export again")


def beside(folder: Path, suffix: str) -> Path:
    """A new folder next to `folder`, named after it: models/sd15 -> models/sd15-onnx (. -> ../NAME-onnx)."""
    folder = folder if folder.name else folder.resolve()
    return folder.with_name(folder.name + suffix)


def not_an_export(folder: Path) -> str:
    """Why `folder` (no manifest) is not an export, and the command that makes one it can be given."""
    if (folder / "model_index.json").is_file() and (folder / "unet" / "model.onnx").is_file():
        return (f"an Optimum ONNX folder (ORTStableDiffusionPipeline), which Backdrop does not run; export the "
                f"diffusers model it came from with `backdrop export onnx MODEL --out {beside(folder, '-backdrop')}`")
    from backdrop.nn.resolve import builtin_models
    if name := next((n for n, p in builtin_models().items() if Path(p).resolve() == folder.resolve()), None):
        return (f"a built-in model, not a Backdrop ONNX export; export it with `backdrop export onnx {name} --out "
                f"{name}-onnx` (not inside the installed package)")
    if (folder / "model_index.json").is_file() or folder.is_file():
        return (f"a model, not a Backdrop ONNX export; export it with `backdrop export onnx {folder} --out "
                f"{beside(folder.with_suffix('') if folder.is_file() else folder, '-onnx')}`")
    out = beside(folder, "-onnx") if folder.exists() else folder
    return f"not a Backdrop ONNX export (no {MANIFEST}); make one with `backdrop export onnx MODEL --out {out}`"


def load_export(folder, require: tuple[str, ...] = COMPONENTS) -> OnnxExport:
    """Read an export folder written by export_onnx; every component in `require` must be there."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        raise FileNotFoundError(f"{folder}: {not_an_export(folder)}")
    manifest = read_json(folder / MANIFEST)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{folder / MANIFEST}: format {manifest.get('format')!r}, this Backdrop reads format "
                         f"{FORMAT}; export the model again")
    entries = manifest.get("components", {})
    absent = [c for c in require if c not in entries]
    if absent:
        raise FileNotFoundError(f"{folder}: the export has no {', '.join(absent)} graph (it holds "
                                f"{', '.join(entries) or 'none'}: made with --components); export all four "
                                f"components again, without --components")
    lost = [folder / entries[c]["file"] for c in require if not (folder / entries[c]["file"]).is_file()]
    if lost:
        raise FileNotFoundError(f"{', '.join(map(str, lost))} {'is' if len(lost) == 1 else 'are'} missing; the "
                                f"export is incomplete: export again")
    d = read_json(folder / "model_config.json")
    sched = read_json(folder / "scheduler" / "scheduler_config.json")
    try:
        cfg = config_from_dict(d | {"scheduler": dataclasses.asdict(SchedulerConfig.from_diffusers(sched))})
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{folder / 'model_config.json'}: {e!r}") from None
    try:
        specs = {c: GraphSpec.from_json(c, e) for c, e in entries.items()}
    except (KeyError, TypeError) as e:
        raise ValueError(f"{folder / MANIFEST}: malformed component entry (no {e}); export the model again") from None
    return OnnxExport(folder, cfg, manifest["dtype"], specs, {c: folder / e["file"] for c, e in entries.items()},
                      manifest)
