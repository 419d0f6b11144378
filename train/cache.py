"""A cache of VAE posteriors and text embeddings, so the diffusion stages skip both frozen encoders every step.

`backdrop train cache --data SPEC --init MODEL --out CACHE` encodes every item of the dataset once; then
`backdrop train pretrain|inpaint --data CACHE ...` trains from it: a `--data` folder holding `cache.json` is a
cache, used automatically. Layout of CACHE/:

    cache.json                 manifest: format, item count, image size, shapes, fingerprints, shard list
    shard-00000.safetensors    rows [0, shard_size): moments (n, 2C, h, w), context (n, 77, C),
    shard-00001.safetensors    image (n, 3, H, W) uint8 (unless --no-images), and with product masks: mask
                               (n, 1, H, W) uint8 and product_latents (n, C, h, w), the posterior mean of the
                               image with the product kept and the rest grey (what `inpaint --masks product`
                               feeds the UNet for an item that keeps its product)
    empty.safetensors          context (1, 77, C) of the empty prompt (caption dropout)

Row i is dataset item i, so a DataStream over the cache walks the same order as over the images. `moments` is the
posterior (mean, clamped log-variance), not a sample: the stage draws the sample from its generator exactly as
on-the-fly encoding does, so a run gives the same losses either way. The images are kept (as the uint8 they were
decoded from, so they come back bit-identical) because the inpaint stage encodes a freshly masked image each step
for random masks; an item that keeps its product takes its cached product_latents instead, so `inpaint --masks
product --product-prob 1` runs no VAE at all and trains from a --no-images cache.
Flips: Backdrop trains without random flips (product shots carry text and logos, which a mirror garbles), so one
entry per image is enough. The fingerprints of the weights that made the cache, the VAE's encoding half (encoder
and quant_conv) and the text encoder, are checked when training starts: a cache made by other encoders is refused
rather than silently training on the wrong latents, and one made before a decoder-only fine-tune (`train vae
--decoder-only`) still serves. Caches written before that rule hold the whole VAE's fingerprint ("vae"), and are
checked against the whole VAE.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..fsio import usual_permissions
from ..nn.checkpoint import Model
from ..diffusion.masks import IMAGE_EXTS, masked_image
from .data import collate, product_repaint_mask
from .image_folder import METADATA_FILES, find_metadata, folder_files, read_metadata
from .stages.common import posterior_moments

__all__ = ["MANIFEST", "is_cache", "fingerprint", "vae_encoder_fingerprint", "build_cache", "LatentCache"]

MANIFEST = "cache.json"
FORMAT = 1
STORE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def is_cache(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


def fingerprint(module: torch.nn.Module) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes and bytes), 16 hex digits."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def vae_encoder_fingerprint(vae: torch.nn.Module) -> str:
    """The fingerprint of what a cache's moments depend on: the VAE's encoder and quant_conv, not its decoder."""
    return fingerprint(torch.nn.ModuleDict({"encoder": vae.encoder, "quant_conv": vae.quant_conv}))


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats that came from uint8 (k / 127.5 - 1) back to exactly k."""
    return ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def _remove_stale_builds(out: Path) -> None:
    """The temporary folders of builds of `out` that were killed (SIGTERM, SIGKILL, the OOM killer: no cleanup ran),
    named by their process: removed unless that process still runs."""
    for tmp in out.parent.glob(f".{out.name}.tmp-*") if out.parent.is_dir() else ():
        pid = tmp.name.rpartition("-")[2]
        if pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@torch.no_grad()
def build_cache(model: Model, dataset, out: str | os.PathLike, *, batch_size: int = 16, shard_size: int = 512,
                images: bool = True, dtype: str = "fp32", device="cpu", source: str = "", init: str | None = None,
                source_state: dict | None = None, num_workers: int = 0, progress: bool = True,
                random_init: dict | None = None) -> Path:
    """Encode every item of `dataset` with `model`'s VAE and text encoder into `out` (written atomically, in a
    temporary folder beside it; those of killed builds are removed). num_workers: processes decoding images.
    source, init: the --data and --init it was made from, recorded for messages (the fingerprints decide), or
    random_init: the {"preset", "seed"} of the random model it was made with;
    source_state: folder_state(source) when `dataset` scanned it (by default: now, before any encoding), so that
    files added while the cache is built count as changes."""
    from tqdm.auto import tqdm

    source_state = source_state or folder_state(source)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: exists and is not empty; remove it or choose another --out")
    if dtype not in STORE_DTYPES:
        raise ValueError(f"cache dtype must be one of {', '.join(STORE_DTYPES)}, got {dtype!r}")
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size and batch_size must be >= 1, got {shard_size}, {batch_size}")
    store = STORE_DTYPES[dtype]
    device = torch.device(device)
    vae, text = model.vae.to(device).eval(), model.text_encoder.to(device).eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        empty = text(model.tokenizer([""]).to(device)).float().cpu()  # (1, 77, C)
        save_file({"context": empty.to(store)}, str(tmp / "empty.safetensors"))
        n, shards, rows, has_masks, size = len(dataset), [], [], None, None
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate,
                                             num_workers=num_workers)

        def flush():
            name = f"shard-{len(shards):05d}.safetensors"
            tensors = {k: torch.cat([r[k] for r in rows]) for k in rows[0]}
            save_file(tensors, str(tmp / name))
            shards.append({"file": name, "rows": int(tensors["context"].shape[0])})
            rows.clear()

        # a bar on a terminal; elsewhere (a job's log file, where \r frames pile up on one line) a plain line at
        # every tenth of the items, as `backdrop train` logs off a terminal
        lines, done, t0 = progress and not sys.stderr.isatty(), 0, time.perf_counter()
        for batch in tqdm(loader, desc="cache", disable=not progress or lines, dynamic_ncols=True):
            x = batch["image"].to(device)  # (B, 3, H, W)
            done += x.shape[0]
            if lines and done * 10 // n > (done - x.shape[0]) * 10 // n:  # a tenth (the last: all) reached
                print(f"cache: {done}/{n} items, {done / (time.perf_counter() - t0):.1f} items/s", file=sys.stderr,
                      flush=True)
            size = int(x.shape[-1])
            row = {"moments": posterior_moments(vae, x).cpu().to(store),  # (B, 2C, h, w)
                   "context": text(model.tokenizer(batch["caption"]).to(device)).float().cpu().to(store)}
            if images:
                row["image"] = _to_uint8(batch["image"])  # (B, 3, H, W)
            has_masks = "mask" in batch
            if has_masks:
                row["mask"] = (batch["mask"] > 0.5).to(torch.uint8)  # (B, 1, H, W)
                repaint = product_repaint_mask(row["mask"].float()).to(device)  # (B, 1, H, W)
                row["product_latents"] = vae.encode(masked_image(x, repaint)).float().cpu().to(store)  # (B, C, h, w)
            for i in range(x.shape[0]):  # split at shard boundaries
                rows.append({k: v[i:i + 1] for k, v in row.items()})
                if len(rows) == shard_size:
                    flush()
        if rows:
            flush()
        manifest = {
            "format": FORMAT, "rows": n, "size": size, "shard_size": shard_size, "shards": shards,
            "dtype": dtype, "has_images": images, "has_masks": bool(has_masks),
            "has_product_latents": bool(has_masks), "source": source, "init": init, "random_init": random_init,
            "source_state": source_state,
            "latent_channels": model.config.vae.latent_channels,
            "fingerprint": {"vae_encoder": vae_encoder_fingerprint(model.vae),
                            "text_encoder": fingerprint(model.text_encoder)},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        usual_permissions(tmp)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def folder_state(source: str) -> dict | None:
    """{"files", "sha256"} of the data files in a folder (images, masks, captions and metadata files: relative
    path, size, mtime; hidden ones aside), so that a cache can tell it was made from other data than the folder now
    holds (a cache or a run folder kept inside it is not data); None for synthetic data. A metadata file given as
    the data (.jsonl or .csv, by any name, as make_dataset takes it) stands for its folder; files a metadata file
    names outside its folder (../shared/a.png) count too.
    Changes are seen by size and modification time (a copy that keeps both, cp -p of same-size files, is not)."""
    path = Path(source)
    if not source or not path.exists() or path.is_file() and path.suffix.lower() not in (".jsonl", ".csv"):
        return None
    root = path if path.is_dir() else path.parent
    files = [p for p in folder_files(root)  # the files the image folder reads from: the same walk
             if p.suffix.lower() in (*IMAGE_EXTS, ".txt") or p.name in METADATA_FILES]
    meta = path if path.is_file() else find_metadata(root)
    try:
        named = [f for image, _, mask in (read_metadata(meta) if meta else []) for f in (image, mask) if f]
    except (OSError, ValueError):  # unreadable metadata: the dataset says why; its own file still counts
        named = []
    inside = {f.resolve() for f in files}
    outside = sorted({f.resolve() for f in named if f.is_file()} - inside)
    lines = []
    for f, name in [(f, f.relative_to(root)) for f in files] + [(f, f) for f in outside]:
        st = f.stat()
        lines.append(f"{name}\t{st.st_size}\t{st.st_mtime_ns}\n")
    return {"files": len(lines), "sha256": hashlib.sha256("".join(lines).encode()).hexdigest()}


class LatentCache(torch.utils.data.Dataset):
    """The items of a cache folder: moments, context, index, and image / mask when the cache has them."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self.manifest = json.loads((self.path / MANIFEST).read_text())
        except FileNotFoundError:
            raise ValueError(f"{self.path}: not a latent cache (no {MANIFEST}; make one with `backdrop train "
                             "cache`)") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{self.path / MANIFEST}: not valid JSON ({e})") from None
        m = self.manifest
        if m.get("format") != FORMAT:
            raise ValueError(f"{self.path / MANIFEST}: format {m.get('format')!r}, this Backdrop reads {FORMAT}")
        for shard in m["shards"]:  # each header read now: a damaged shard stopped a run when first reached, hours in
            try:
                with safe_open(str(self.path / shard["file"]), "pt") as f:
                    rows = {f.get_slice(k).get_shape()[0] for k in f.keys()}
            except FileNotFoundError:
                raise ValueError(f"{self.path}: shard {shard['file']} named in {MANIFEST} is missing") from None
            except (OSError, SafetensorError) as e:
                raise ValueError(f"{self.path}: shard {shard['file']} is damaged ({e}); rebuild the cache with "
                                 "`backdrop train cache`") from None
            if rows != {shard["rows"]}:
                raise ValueError(f"{self.path}: shard {shard['file']} holds {sorted(rows)} rows, {MANIFEST} says "
                                 f"{shard['rows']}; rebuild the cache with `backdrop train cache`")
        if sum(s["rows"] for s in m["shards"]) != m["rows"]:
            raise ValueError(f"{self.path / MANIFEST}: the shards hold {sum(s['rows'] for s in m['shards'])} rows, "
                             f"the manifest says {m['rows']}")
        self.size, self.has_masks, self.has_images = m["size"], m["has_masks"], m["has_images"]
        self.has_product_latents = m.get("has_product_latents", False)  # caches made before them have none
        self.empty_context = load_file(str(self.path / "empty.safetensors"))["context"].float()  # (1, 77, C)
        self._handles: dict[int, object] = {}

    def __len__(self) -> int:
        return self.manifest["rows"]

    def source_changed(self) -> str | None:
        """Why the data folder the cache was made from no longer matches it (files added, removed or modified),
        or None (unchanged, synthetic, gone, or a cache made before folders were recorded)."""
        m = self.manifest
        then = m.get("source_state")
        if then is None or not Path(m.get("source") or "").exists():
            return None
        now = folder_state(m["source"])
        if now == then:
            return None
        return (f"{self.path} was made from {m['source']}, which has changed since ({then['files']} files then, "
                f"{now['files']} now, or files modified): it trains on the data as it was; rebuild it with "
                "`backdrop train cache` for the data as it is")

    def check(self, model: Model, size: int) -> None:
        """Refuse to train `model` at `size` px from latents another VAE / text encoder made."""
        m = self.manifest
        if m["size"] != size:
            raise ValueError(f"{self.path}: cached at {m['size']} px, training at {size} px; pass --size "
                             f"{m['size']} or rebuild the cache")
        made = m["fingerprint"]
        vae = ("vae_encoder", vae_encoder_fingerprint(model.vae)) if "vae_encoder" in made else \
            ("vae", fingerprint(model.vae))  # a cache from before the encoder-only rule
        for name, have in (vae, ("text_encoder", fingerprint(model.text_encoder))):
            if have != made[name]:
                made_by = m.get("random_init")  # no --init: the random model of a --preset and --seed
                fix = (f"train with --init {m['init']}, the model it was made with, or rebuild it" if m.get("init")
                       else f"it was made from random weights (--preset {made_by['preset']} --seed "
                            f"{made_by['seed']}): train with those, or rebuild it with `backdrop train cache --init` "
                            "the model you train" if made_by
                       else "rebuild it with `backdrop train cache --init` the same model")
                raise ValueError(f"{self.path}: made with a different {name.replace('_', ' ')} than the model being "
                                 f"trained (fingerprint {made[name]} vs {have}); {fix}")

    def _handle(self, shard: int):
        if shard not in self._handles:  # opened lazily: DataLoader workers each open their own (mmap)
            self._handles[shard] = safe_open(str(self.path / self.manifest["shards"][shard]["file"]), "pt")
        return self._handles[shard]

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_handles"} | {"_handles": {}}

    def __getitem__(self, key) -> dict:
        index = int(key[0]) if isinstance(key, tuple) else int(key)  # ShardedSampler yields (index, epoch)
        if not 0 <= index < len(self):
            raise IndexError(f"LatentCache: index {index} out of range for {len(self)} rows")
        shard, row = divmod(index, self.manifest["shard_size"])
        f = self._handle(shard)
        get = lambda name: f.get_slice(name)[row:row + 1][0]  # noqa: E731 - one row, read from the mmap
        item = {"moments": get("moments").float(), "context": get("context").float(), "index": index}
        if self.has_images:
            item["image"] = get("image").float() / 127.5 - 1  # (3, H, W), as image_folder.image_tensor makes it
        if self.has_masks:
            item["mask"] = get("mask").float()  # (1, H, W)
        if self.has_product_latents:
            item["product_latents"] = get("product_latents").float()  # (C, h, w)
        return item
