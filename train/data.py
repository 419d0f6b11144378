"""Training data: image folders, the synthetic world, a resumable sharded batch stream, random inpainting masks.

Every dataset returns items of one shape (and `collate` stacks them):
    image    (3, H, W) float32 in [-1, 1]
    caption  str
    mask     (1, H, W) float32 in {0, 1}, 1 = product; only when the dataset has masks (all items or none)
    index    int, the item actually returned

Folder layouts, and how files are read: train/image_folder.py.

Determinism: the order is a seeded permutation per epoch, and random crops/flips are seeded by (seed, epoch, index),
not by a global RNG, so the same position always gives the same batch whatever the workers did before.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from .image_folder import DataFileError, ImageFolder, find_metadata, image_tensor, item_key, mask_tensor
from .synthetic import World

__all__ = ["ImageFolder", "SyntheticDataset", "make_dataset", "collate", "ShardedSampler", "DataStream",
           "DataFileError", "find_metadata", "MASK_KINDS", "random_mask", "random_mask_with_kind",
           "product_repaint_mask", "inpaint_mask", "inpaint_mask_with_kind"]


class SyntheticDataset(torch.utils.data.Dataset):
    """`n` samples of the procedural world (train/synthetic.py), rendered on demand (hundreds per second)."""

    def __init__(self, n: int, size: int, seed: int = 0):
        if n <= 0:
            raise ValueError(f"SyntheticDataset: n must be positive, got {n}")
        self.n, self.size, self.world, self.has_masks = n, size, World(seed), True

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key) -> dict:
        index, _ = item_key(key)  # the world is already random per index: no augmentation, epochs look the same
        if not 0 <= index < self.n:
            raise IndexError(f"SyntheticDataset: index {index} out of range for {self.n} samples")
        s = self.world.sample(index, self.size)
        return {"image": image_tensor(s.image), "caption": s.caption, "mask": mask_tensor(s.mask), "index": index}


def make_dataset(spec: str, size: int, seed: int = 0, **folder_options) -> torch.utils.data.Dataset:
    """'synthetic:N' (N samples of the procedural world), a folder of images, or a metadata .jsonl / .csv file."""
    if spec.startswith("synthetic:"):
        n = spec.split(":", 1)[1]
        if not (n.isdigit() and int(n) > 0):
            raise ValueError(f"{spec}: N in 'synthetic:N' must be a positive integer, e.g. 'synthetic:10000'")
        return SyntheticDataset(int(n), size, seed)
    path = Path(spec)
    if path.is_dir():
        return ImageFolder(path, size, seed=seed, **folder_options)
    if path.is_file() and path.suffix.lower() in (".jsonl", ".csv"):
        return ImageFolder(path.parent, size, metadata=path, seed=seed, **folder_options)
    raise ValueError(f"{spec}: {'not a .jsonl or .csv file' if path.is_file() else 'not there'}; expected "
                     "'synthetic:N', a folder of images or a metadata .jsonl / .csv file")


def collate(items: list[dict]) -> dict:
    """Stack tensors, turn ints into a LongTensor, keep strings as lists."""
    keys = set(items[0])
    for it in items:
        if set(it) != keys:
            raise ValueError(f"collate: items {items[0].get('index')} and {it.get('index')} have different fields "
                             f"({sorted(keys)} vs {sorted(it)}); does only part of the dataset have masks?")
    out = {}
    for k in items[0]:
        vals = [it[k] for it in items]
        if isinstance(vals[0], torch.Tensor):
            out[k] = torch.stack(vals)  # (B, ...)
        elif isinstance(vals[0], int):
            out[k] = torch.tensor(vals, dtype=torch.long)
        else:
            out[k] = vals
    return out


class ShardedSampler(torch.utils.data.Sampler):
    """An endless, seeded order over n items, sharded across DDP ranks, that can start at any position.

    Epoch e is the permutation of range(n) drawn from (seed, e); rank r of `world_size` takes its positions r,
    r + world_size, ... (DistributedSampler's striding, without padding), so the ranks' shards of an epoch are
    disjoint and cover every index exactly once. Yields (index, epoch), which the datasets use to seed augmentation.
    `start` counts the items this rank has already taken; each rank runs through its own shards, epoch after epoch.
    `origin` is where in the endless stream (epoch origin // n, position origin % n) this world's striding began: 0,
    or the items a run with another number of processes had taken (DataStream.continue_from).
    """

    def __init__(self, n: int, *, seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                 start: int = 0, origin: int = 0):
        if not 0 <= rank < world_size:
            raise ValueError(f"ShardedSampler: rank {rank} is not in [0, world_size={world_size})")
        if n < world_size:
            raise ValueError(f"ShardedSampler: {n} items cannot be shared by {world_size} ranks")
        self.n, self.seed, self.rank, self.world_size = n, seed, rank, world_size
        self.shuffle, self.start, self.origin = shuffle, start, origin
        self.epoch_length = len(range(rank, n, world_size))  # this rank's items per whole epoch

    def shard(self, epoch: int, offset: int = 0) -> np.ndarray:
        """This rank's items of epoch `epoch`, from position `offset` of its order on."""
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n) if self.shuffle else np.arange(self.n)
        return order[offset + self.rank::self.world_size]

    def __iter__(self):
        epoch, offset = divmod(self.origin, self.n)
        skip = self.start
        first = len(range(offset + self.rank, self.n, self.world_size))  # this rank's items of the first epoch
        if skip >= first:
            whole, skip = divmod(skip - first, self.epoch_length)
            epoch, offset = epoch + 1 + whole, 0
        while True:
            for i in self.shard(epoch, offset)[skip:]:
                yield int(i), epoch
            epoch, offset, skip = epoch + 1, 0, 0


class DataStream:
    """Endless batches of a dataset for one DDP rank, in ShardedSampler order, resumable exactly.

    `state_dict()` counts the items this stream has *handed out*, not what DataLoader workers have prefetched, so
    `load_state_dict()` followed by `next()` gives exactly the batch an uninterrupted run would have got.
    """

    def __init__(self, dataset, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, num_workers: int = 0):
        if batch_size <= 0:
            raise ValueError(f"DataStream: batch_size must be positive, got {batch_size}")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world_size, self.shuffle, self.num_workers = rank, world_size, shuffle, num_workers
        self.consumed, self.origin, self._it = 0, 0, None  # origin: see ShardedSampler
        ShardedSampler(len(dataset), rank=rank, world_size=world_size)  # validate now, not at the first batch

    def _loader(self) -> torch.utils.data.DataLoader:
        sampler = ShardedSampler(len(self.dataset), seed=self.seed, rank=self.rank, world_size=self.world_size,
                                 shuffle=self.shuffle, start=self.consumed, origin=self.origin)
        # An explicit generator: otherwise DataLoader draws its worker base seed from the global torch RNG.
        return torch.utils.data.DataLoader(self.dataset, batch_size=self.batch_size, sampler=sampler,
                                           collate_fn=collate, num_workers=self.num_workers,
                                           generator=torch.Generator().manual_seed(self.seed))

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._it is None:
            self._it = iter(self._loader())
        batch = next(self._it)
        self.consumed += self.batch_size
        return batch

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "origin": self.origin, "seed": self.seed, "n": len(self.dataset),
                "rank": self.rank, "world_size": self.world_size, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        self._check(state, ("seed", "n", "rank", "world_size", "shuffle"))
        self.consumed, self.origin = int(state["consumed"]), int(state.get("origin", 0))
        self._it = None  # dropping the iterator shuts its workers down

    def continue_from(self, states: list[dict]) -> int:
        """Take up the stream where a run with another number of processes left it: `states` holds the state_dict
        of each of its ranks. This world's striding starts at the item the old ranks had taken together, which is
        where they were, exactly, when the old process count divides the dataset's size; otherwise each old rank
        ran through its epochs at its own pace, and up to an epoch's items are seen twice or skipped. Returns that
        item's index in the endless stream (epoch = index // n)."""
        for state in states:
            self._check(state, ("seed", "n", "shuffle"))
        self.origin = int(states[0].get("origin", 0)) + sum(int(s["consumed"]) for s in states)
        self.consumed, self._it = 0, None
        return self.origin

    def _check(self, state: dict, fields: tuple[str, ...]) -> None:
        mine = self.state_dict()
        for field in fields:
            if state.get(field) == mine[field]:
                continue
            if field == "n":
                raise ValueError(f"the checkpoint's run read {state.get('n')} items, the data now has {mine['n']} (a "
                                 "file added or removed, or now left out as unreadable: see the lines above); the "
                                 "saved position is one in that order, so resume with the same data, or start a new "
                                 "run from a model folder (--init)")
            raise ValueError(f"DataStream: the saved data position is for {field}={state.get(field)!r}, this "
                             f"stream has {field}={mine[field]!r}; resuming would not continue the same order")


# ---------------------------------------------------------------------- inpainting masks
# The SD-inpainting recipe (runwayml/stable-diffusion-inpainting model card, after LaMa, Suvorov et al. 2021):
# synthetic masks, and in 25% of cases the whole image is masked. Ours: full 25%, box, ellipse, brush 25% each.
MASK_KINDS = ("box", "ellipse", "brush", "full")


def _pixel_span(lo: float, hi: float, n: int) -> tuple[int, int]:
    """Indices [i0, i1) of the pixels whose centres (i + 0.5) / n can lie in [lo, hi], with a pixel to spare."""
    return max(0, math.floor(lo * n - 0.5) - 1), min(n, math.ceil(hi * n - 0.5) + 2)


def random_mask_with_kind(h: int, w: int, generator: torch.Generator) -> tuple[torch.Tensor, str]:
    """A random repaint mask (1, h, w) float32 in {0, 1}, 1 = repaint, and its kind; deterministic per generator."""
    r = lambda k=1: torch.rand(k, generator=generator).tolist()  # noqa: E731
    kind = MASK_KINDS[min(3, int(r()[0] * 4))]
    y = ((torch.arange(h, dtype=torch.float32) + 0.5) / h)[:, None]  # (h, 1) pixel centres in [0, 1]
    x = ((torch.arange(w, dtype=torch.float32) + 0.5) / w)[None, :]  # (1, w)
    if kind == "full":
        m = torch.ones(h, w, dtype=torch.bool)
    elif kind == "box":  # half-sizes 0.1-0.4 of the side: never empty (>= 1 pixel centre), never the whole image
        cy, cx, hy, hx = r(4)
        cy, cx = 0.1 + 0.8 * cy, 0.1 + 0.8 * cx
        m = ((y - cy).abs() < 0.1 + 0.3 * hy) & ((x - cx).abs() < 0.1 + 0.3 * hx)
    elif kind == "ellipse":  # a rotated ellipse, radii 0.12-0.45
        cy, cx, ry, rx, th = r(5)
        cy, cx, ry, rx, th = 0.15 + 0.7 * cy, 0.15 + 0.7 * cx, 0.12 + 0.33 * ry, 0.12 + 0.33 * rx, math.pi * th
        dy, dx = y - cy, x - cx
        a, b = dx * math.cos(th) + dy * math.sin(th), -dx * math.sin(th) + dy * math.cos(th)  # (h, w) rotated
        m = (a / rx) ** 2 + (b / ry) ** 2 <= 1
    else:  # brush: 1-4 strokes, each a random walk of 3-8 thick segments (LaMa's irregular masks)
        m = torch.zeros(h, w, dtype=torch.bool)
        strokes = 1 + int(r()[0] * 4)
        for _ in range(strokes):
            py, px, angle, width, steps = r(5)
            py, px, angle, radius = 0.1 + 0.8 * py, 0.1 + 0.8 * px, 2 * math.pi * angle, 0.02 + 0.05 * width
            radius = max(radius, 0.75 / min(h, w))  # at least ~1.5 px wide, so a stroke never vanishes
            for _ in range(3 + int(steps * 6)):
                turn, length = r(2)
                angle += (turn - 0.5) * 2.0  # up to about +-57 degrees a step
                qy = min(max(py + math.sin(angle) * (0.05 + 0.2 * length), 0.0), 1.0)
                qx = min(max(px + math.cos(angle) * (0.05 + 0.2 * length), 0.0), 1.0)
                # distance to the segment p -> q, only over the pixels of its box grown by the radius (the rest
                # are farther): a stroke touches a few % of the image, and this was 90% of a 512-px mask's time
                (r0, r1), (c0, c1) = (_pixel_span(min(a, b) - radius, max(a, b) + radius, n)
                                      for a, b, n in ((py, qy, h), (px, qx, w)))
                yy, xx, vy, vx = y[r0:r1], x[:, c0:c1], qy - py, qx - px
                t = (((yy - py) * vy + (xx - px) * vx) / max(vy * vy + vx * vx, 1e-12)).clamp(0, 1)
                m[r0:r1, c0:c1] |= (yy - py - t * vy) ** 2 + (xx - px - t * vx) ** 2 <= radius * radius
                py, px = qy, qx
    return m.float()[None], kind  # (1, h, w)


def random_mask(h: int, w: int, generator: torch.Generator) -> torch.Tensor:
    """A random repaint mask (1, h, w): box, ellipse, brush strokes or (25%) everything; 1 = repaint."""
    return random_mask_with_kind(h, w, generator)[0]


def product_repaint_mask(product_mask: torch.Tensor) -> torch.Tensor:
    """Keep the product, repaint everything else: 1 - product mask (same shape)."""
    return 1 - product_mask


def inpaint_mask_with_kind(h: int, w: int, generator: torch.Generator, product_mask: torch.Tensor | None = None,
                           product_prob: float = 0.5) -> tuple[torch.Tensor, str]:
    """The fine-tuning mask for one item: with a product mask, `product_prob` of the time keep the product (the
    job the model ships for); otherwise a random mask. (1, h, w), 1 = repaint, and its kind: "product" or the
    random mask's (MASK_KINDS)."""
    u = torch.rand(1, generator=generator).item()  # drawn always, so the stream of draws does not depend on masks
    if product_mask is not None and u < product_prob:
        if product_mask.shape[-2:] != (h, w):
            raise ValueError(f"inpaint_mask: product mask is {tuple(product_mask.shape)}, expected (1, {h}, {w})")
        return product_repaint_mask(product_mask), "product"
    return random_mask_with_kind(h, w, generator)


def inpaint_mask(h: int, w: int, generator: torch.Generator, product_mask: torch.Tensor | None = None,
                 product_prob: float = 0.5) -> torch.Tensor:
    """inpaint_mask_with_kind's mask alone."""
    return inpaint_mask_with_kind(h, w, generator, product_mask, product_prob)[0]
