"""Measure an inpainting model on the procedural world (train/synthetic.py) instead of eyeballing it.

Two judges independent of the generator, checked on the renderer's own images from held-out world seeds (the
training data is World(0) by default; the judges use CLASSIFIER_SEED, the evaluation EVAL_SEED):

* AttributeClassifier: multinomial logistic regression on hand-crafted features of the pixels *outside* the
  product (colour statistics and histograms, band means, gradient energy of the rows that are always wall/sky and
  of those always floor) predicts the floor, the backdrop kind (wall/sky), the sky and the wall colour; one on the
  pixels *inside* predicts the product's colour (a sanity check: a kept product keeps its colour). Its accuracy on
  real renders is the ceiling a perfect generator reaches; chance is 1 / classes, which is also what any
  prompt-blind generator scores, because the harness balances the prompted values.
* ObjectExpansion (train/expansion.py): does the product's silhouette grow into the backdrop?

`evaluate_inpainting(inpaint_fn)` runs the protocol and returns a JSON-able dict; `format_report` turns it into
the model card's markdown tables. A pipeline plugs in as

    def inpaint_fn(images, product_masks, prompts, seeds):
        out = pipe.inpaint(image=images, product_mask=product_masks, prompt=prompts, seed=seeds, output_type="np")
        return (np.asarray(out) * 255).round().astype(np.uint8)  # floats in [0, 1] -> (n, H, W, 3) uint8
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter
from safetensors import safe_open
from safetensors.numpy import save_file
from tqdm import tqdm

from .expansion import CLASSIFIER_SEED, ObjectExpansion, _check_batch, _disk_dilate, _erode
from .synthetic import FLOORS, SKIES, TEMPLATES, VOCAB, WALL_COLOURS, WALL_PATTERNS, World

__all__ = ["AttributeClassifier", "ObjectExpansion", "Scene", "plan_scenes", "evaluate_inpainting",
           "format_report", "CLASSIFIER_SEED", "EVAL_SEED"]

EVAL_SEED = 2_000_003
# attribute -> (labels, feature group, the backdrop kind it applies to: skies have a sky, walls a wall colour)
ATTRS = {"floor": (FLOORS, "outside", None), "backdrop": (VOCAB["backdrop"], "outside", None),
         "sky": (SKIES, "outside", "sky"), "wall_colour": (tuple(WALL_COLOURS), "outside", "wall"),
         "colour": (VOCAB["colour"], "inside", None)}
FORMAT = "backdrop.AttributeClassifier/1"


# ---------------------------------------------------------------------- masks
# ---------------------------------------------------------------------- the attribute classifier
def _hist(x: np.ndarray, region: np.ndarray, k: int) -> np.ndarray:
    """Joint colour histograms, 4 levels a channel, of k labelled regions: x (B, H, W, 3) in [0, 1], region
    (B, H, W) int in [0, k) or -1 (not counted) -> (B, k, 64) fractions of each region's pixels."""
    B = x.shape[0]
    q = np.minimum((x * 4).astype(np.int64), 3)  # (B, H, W, 3)
    idx = (np.arange(B)[:, None, None] * k + region) * 64 + q[..., 0] * 16 + q[..., 1] * 4 + q[..., 2]
    h = np.bincount(idx[region >= 0], minlength=B * k * 64).reshape(B, k, 64).astype(np.float32)
    return h / np.maximum(h.sum(2, keepdims=True), 1)


def _moments(x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-row weighted sums: x (B, H, W, 3), w (B, H, W) 0/1 -> count (B, H), sum and sum of squares (B, H, 3)."""
    xw = x * w[..., None]
    return w.sum(2), xw.sum(2), (xw * x).sum(2)


def _stats(n, s1, s2) -> list[np.ndarray]:
    """Mean, std and chromaticity of a region from its sums: n (B,), s1, s2 (B, 3) -> three (B, 3)."""
    n = np.maximum(n, 1)[:, None]
    mean = s1 / n
    std = np.sqrt(np.maximum(s2 / n - mean * mean, 0))
    chroma = mean / np.maximum(mean.sum(1, keepdims=True), 1e-3)  # brightness-free hue: robust to shading
    return [mean, std, chroma]


def _features(images: np.ndarray, masks: np.ndarray, ignore: int) -> dict[str, np.ndarray]:
    """Feature vectors of a batch: 'outside' (backdrop, product ignored) and 'inside' (product), (B, F) float32."""
    x = images.astype(np.float32) / 255  # (B, H, W, 3)
    H = x.shape[1]
    outside = ~_disk_dilate(masks, ignore)  # clear of the product's antialiased edge and of what grew out of it
    core = _erode(masks, 1)
    core = np.where(core.any((1, 2))[:, None, None], core, masks)  # a product too thin to erode keeps its mask
    # The horizon lies at 0.40-0.58 of the height (synthetic.World._render): above 0.4 is always wall or sky, below
    # 0.62 always floor. Four bands in each keep the sky's vertical gradient and the floor's perspective.
    row = (np.arange(H) + 0.5) / H  # (H,)
    regions = [(row < 0.4), (row >= 0.62)]
    rid = np.where(regions[0], 0, np.where(regions[1], 1, -1))[None, :, None] * outside - ~outside  # (B, H, W)
    n, s1, s2 = _moments(x, outside.astype(np.float32))  # (B, H), (B, H, 3), (B, H, 3)
    lum = x @ np.asarray([0.299, 0.587, 0.114], np.float32)  # (B, H, W) Rec. 601 luma
    pair_x = outside[:, :, 1:] & outside[:, :, :-1]  # horizontal neighbours both outside
    gx = np.abs(np.diff(lum, axis=2)) * pair_x  # (B, H, W - 1)
    pair_y = outside[:, 1:] & outside[:, :-1]  # vertical neighbours both outside
    gy = np.abs(np.diff(lum, axis=1)) * pair_y  # (B, H - 1, W)
    hist = np.sqrt(_hist(x, rid, 2))  # (B, 2, 64); the square root evens out rare and common bins
    out = []
    for r, rows in enumerate(regions):
        out += _stats(n[:, rows].sum(1), s1[:, rows].sum(1), s2[:, rows].sum(1)) + [hist[:, r]]
        # texture energy: mean |luma step| between neighbours (tiles and bricks high, sand and plain walls low)
        both = rows[1:] & rows[:-1]  # row pairs inside the region
        out += [(gx[:, rows].sum((1, 2)) / np.maximum(pair_x[:, rows].sum((1, 2)), 1))[:, None],
                (gy[:, both].sum((1, 2)) / np.maximum(pair_y[:, both].sum((1, 2)), 1))[:, None]]
        bands = np.array_split(np.flatnonzero(rows), 4)
        out += [s1[:, b].sum(1) / np.maximum(n[:, b].sum(1), 1)[:, None] for b in bands]  # (B, 3) band means
    nc, c1, c2 = _moments(x, core.astype(np.float32))
    inside = _stats(nc.sum(1), c1.sum(1), c2.sum(1)) + [np.sqrt(_hist(x, np.where(core, 0, -1), 1)[:, 0])]
    return {"outside": np.concatenate(out, 1).astype(np.float32),
            "inside": np.concatenate(inside, 1).astype(np.float32)}


def _fit_softmax(x: np.ndarray, y: np.ndarray, k: int, l2: float, steps: int = 500) -> tuple[np.ndarray, ...]:
    """Multinomial logistic regression, L2 on the weights (not the bias): x (N, F) standardised, y (N,) int ->
    weight (k, F), bias (k,). Nesterov's accelerated gradient with the fixed step 1 / L, L = l2 + ||X||^2 / 2N
    bounding the loss's curvature (Böhning 1992: the softmax Hessian is below (1/2) X^T X / N): no line search, no
    tuning, deterministic, and numpy only (torch.optim would import torch._dynamo, seconds on CI)."""
    n, f = x.shape
    xb = np.concatenate([x, np.ones((n, 1))], 1).astype(np.float64)  # (N, F + 1): the last column is the bias
    onehot = np.eye(k)[y]  # (N, k)
    reg = np.full((f + 1, 1), l2)
    reg[-1] = 0
    step = 1 / (l2 + 0.5 * np.linalg.eigvalsh(xb.T @ xb)[-1] / n)  # ||X||^2 is X^T X's top eigenvalue
    w = z = np.zeros((f + 1, k))
    for t in range(steps):
        logits = xb @ z  # (N, k)
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        w, w_prev = z - step * (xb.T @ (p - onehot) / n + reg * z), w
        z = w + t / (t + 3) * (w - w_prev)
    return w[:-1].T.astype(np.float32), w[-1].astype(np.float32)


def _accuracy(pred: list, truth: list) -> float | None:
    """Accuracy over the items whose truth is not None (sky for skies, wall colour for walls); None if none."""
    pairs = [(p, t) for p, t in zip(pred, truth) if t is not None]
    return sum(p == t for p, t in pairs) / len(pairs) if pairs else None


class AttributeClassifier:
    """Predicts the backdrop's attributes around a product (and the product's colour) from uint8 images.
    `tensors`: per feature group its standardisation ('outside.mean', ...), per attribute 'floor.weight' (K, F)
    and 'floor.bias' (K,); `meta`: labels, fit settings and held-out accuracy (JSON)."""

    def __init__(self, tensors: dict[str, np.ndarray], meta: dict):
        self.tensors, self.meta = tensors, meta

    @property
    def accuracy(self) -> dict[str, float]:
        """Held-out accuracy per attribute on real renders (what a perfect generator would score)."""
        return dict(self.meta["accuracy"])

    @property
    def chance(self) -> dict[str, float]:
        return {a: 1 / len(labels) for a, labels in self.meta["labels"].items()}

    @classmethod
    def fit(cls, seed: int = CLASSIFIER_SEED, n: int = 1000, size: int = 64, *, holdout: float = 0.2,
            ignore: int = 2, l2: float = 1e-2) -> AttributeClassifier:
        """Fit on n renders of World(seed); the last `holdout` of them measure the accuracy. Half the training
        renders are blurred a little (Gaussian, radius 0.3-1.2 px) so a soft VAE decode is not judged by crispness.
        `ignore`: pixels this close to the product are left out (its antialiased edge, and what grew out of it)."""
        if n < 50:
            raise ValueError(f"AttributeClassifier.fit: n={n} renders are too few; use a few hundred or more")
        world = World(seed)
        samples = [world.sample(i, size) for i in tqdm(range(n), desc="rendering", leave=False, disable=None)]
        images, masks = np.stack([s.image for s in samples]), np.stack([s.mask for s in samples])
        n_fit = n - max(1, int(n * holdout))
        rng = np.random.default_rng([seed, 1])
        train = images[:n_fit].copy()
        for i in np.flatnonzero(rng.random(n_fit) < 0.5):
            soft = np.asarray(Image.fromarray(images[i]).filter(ImageFilter.GaussianBlur(0.3 + 0.9 * rng.random())))
            train[i] = np.where(masks[i][..., None], images[i], soft)  # the kept product stays sharp (paste-back)
        feats = _features(train, masks[:n_fit], ignore)
        tensors = {}
        for g, x in feats.items():
            std = x.std(0)
            tensors[f"{g}.mean"], tensors[f"{g}.std"] = x.mean(0), np.where(std > 1e-6, std, 1).astype(np.float32)
        for a, (labels, group, when) in ATTRS.items():
            rows = [i for i in range(n_fit) if when is None or samples[i].attributes["backdrop"] == when]
            y = np.asarray([labels.index(samples[i].attributes[a]) for i in rows])
            x = (feats[group][rows] - tensors[f"{group}.mean"]) / tensors[f"{group}.std"]
            tensors[f"{a}.weight"], tensors[f"{a}.bias"] = _fit_softmax(x, y, len(labels), l2)
        meta = {"format": FORMAT, "labels": {a: list(v[0]) for a, v in ATTRS.items()}, "seed": seed, "n": n,
                "size": size, "ignore": ignore}
        model = cls(tensors, meta)
        pred = model.predict(images[n_fit:], masks[n_fit:])
        meta["accuracy"] = {a: _accuracy(pred[a], [s.attributes[a] for s in samples[n_fit:]]) for a in ATTRS}
        return model

    def predict(self, images, product_masks) -> dict[str, list[str]]:
        """images uint8 (B, H, W, 3), product_masks (B, H, W) bool -> {attribute: B labels}. Every attribute is
        predicted for every image; 'sky' means something only for skies, 'wall_colour' only for walls."""
        images, masks = _check_batch(images, product_masks, self.meta["size"])
        feats, t, out = _features(images, masks, self.meta["ignore"]), self.tensors, {}
        for a, (_, g, _) in ATTRS.items():
            logits = (feats[g] - t[f"{g}.mean"]) / t[f"{g}.std"] @ t[f"{a}.weight"].T + t[f"{a}.bias"]  # (B, K)
            out[a] = [self.meta["labels"][a][k] for k in logits.argmax(1)]
        return out

    def save(self, path) -> None:
        """One .safetensors file: the weights, with labels, fit settings and accuracy as JSON in its metadata."""
        save_file({k: np.ascontiguousarray(v) for k, v in self.tensors.items()}, str(path),
                  metadata={"backdrop": json.dumps(self.meta)})

    @classmethod
    def load(cls, path) -> AttributeClassifier:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"AttributeClassifier.load: {path} does not exist")
        with safe_open(str(path), framework="np") as f:
            meta = json.loads((f.metadata() or {}).get("backdrop", "{}"))
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path}: not an AttributeClassifier file (metadata format "
                                 f"{meta.get('format')!r}, expected {FORMAT!r})")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        for a, (labels, g, _) in ATTRS.items():
            if meta.get("labels", {}).get(a) != list(labels):
                raise ValueError(f"{path}: labels of {a!r} are {meta.get('labels', {}).get(a)}, the world now has "
                                 f"{list(labels)}; refit the classifier")
            for key in (f"{a}.weight", f"{a}.bias", f"{g}.mean", f"{g}.std"):
                if key not in tensors:
                    raise ValueError(f"{path}: tensor {key!r} is missing")
            want = (len(labels), tensors[f"{g}.mean"].shape[0])
            if tensors[f"{a}.weight"].shape != want or tensors[f"{a}.bias"].shape != want[:1]:
                raise ValueError(f"{path}: {a}.weight/.bias have shapes {tensors[f'{a}.weight'].shape}/"
                                 f"{tensors[f'{a}.bias'].shape}, expected {want}/{want[:1]}")
        return cls(tensors, meta)


# ---------------------------------------------------------------------- object expansion
# ---------------------------------------------------------------------- the harness
@dataclass(frozen=True)
class Scene:
    """One evaluation item: scene `index` of World(seed) as rendered (`source`), and the backdrop to ask for."""
    index: int
    source: dict     # the rendered scene's attributes: what the input image shows
    target: dict     # the prompted scene: the same product, another floor and backdrop
    template: int    # which caption template (synthetic.TEMPLATES) the prompt uses
    seed: int        # the item's generation seed

    @property
    def prompt(self) -> str:
        return World.caption(self.target, self.template)

    @property
    def overrides(self) -> dict:
        """The World.sample keywords that render the target scene."""
        keys = ("floor", "backdrop", "sky") if self.target["backdrop"] == "sky" else \
            ("floor", "backdrop", "wall_colour", "wall_pattern")
        return {k: self.target[k] for k in keys}


def _balanced(rng, labels: tuple, avoid: list) -> list:
    """One label per item, every label used equally often (+-1), item i never getting avoid[i]: a shuffled
    balanced list, then swaps that fix each clash without creating another. With balanced targets a generator
    that ignores the prompt scores chance, whatever it always draws."""
    m = len(avoid)
    out = list(rng.permutation(np.resize(rng.permutation(len(labels)), m)))
    for i in range(m):
        if labels[out[i]] == avoid[i]:
            j = next((j for j in rng.permutation(m) if labels[out[j]] != avoid[i] and labels[out[i]] != avoid[j]),
                     None)
            if j is None:
                raise RuntimeError(f"cannot choose {m} balanced targets from {labels} avoiding {avoid}")
            out[i], out[j] = out[j], out[i]
    return [labels[k] for k in out]


def plan_scenes(n: int, seed: int = EVAL_SEED) -> list[Scene]:
    """The first n scenes of World(seed), each with a target backdrop: the floor always changes; the backdrop kind
    is wall or sky half each; a sky or wall colour never repeats the scene's own. Deterministic in (n, seed)."""
    if n < 1:
        raise ValueError(f"plan_scenes: n must be >= 1, got {n}")
    world, rng = World(seed), np.random.default_rng([seed, 2])
    src = [world.attributes(i) for i in range(n)]
    floors = _balanced(rng, FLOORS, [s["floor"] for s in src])
    kinds = _balanced(rng, VOCAB["backdrop"], [None] * n)
    chosen = {}
    for kind, key, labels in (("sky", "sky", SKIES), ("wall", "wall_colour", tuple(WALL_COLOURS))):
        items = [i for i in range(n) if kinds[i] == kind]
        chosen |= dict(zip(items, _balanced(rng, labels, [src[i][key] for i in items])))
    patterns, templates = rng.integers(len(WALL_PATTERNS), size=n), rng.integers(len(TEMPLATES), size=n)
    seeds = rng.integers(2 ** 31, size=n)
    scenes = []
    for i in range(n):
        new = {"floor": floors[i], "backdrop": kinds[i]}
        new |= {"sky": chosen[i]} if kinds[i] == "sky" else \
            {"wall_colour": chosen[i], "wall_pattern": WALL_PATTERNS[patterns[i]]}
        scenes.append(Scene(i, src[i], world.attributes(i, **new), int(templates[i]), int(seeds[i])))
    return scenes


def _generate(inpaint_fn, images, masks, prompts, seeds, batch_size) -> np.ndarray:
    """Call inpaint_fn in batches with PIL inputs; check and stack what it returns: (n, H, W, 3) uint8."""
    n, step, out = len(images), batch_size or len(images), []
    for s in tqdm(range(0, n, step), desc="inpainting", leave=False, disable=None):
        part = slice(s, s + step)
        got = np.asarray(inpaint_fn([Image.fromarray(x) for x in images[part]],
                                    [Image.fromarray(m.astype(np.uint8) * 255, "L") for m in masks[part]],
                                    prompts[part], seeds[part]))
        want = images[part].shape
        if got.shape != want or got.dtype != np.uint8:
            raise ValueError(f"inpaint_fn returned {got.dtype} {got.shape} for {want[0]} images, expected uint8 "
                             f"{want} (from floats in [0, 1]: (x * 255).round().astype(np.uint8))")
        out.append(got)
    return np.concatenate(out)


def evaluate_inpainting(inpaint_fn, n: int = 64, size: int = 64, seed: int = EVAL_SEED,
                        classifier: AttributeClassifier | None = None,
                        expansion: ObjectExpansion | Sequence[ObjectExpansion] | None = None, *,
                        control: bool = False, batch_size: int | None = None) -> dict:
    """Score `inpaint_fn(images, product_masks, prompts, seeds) -> (n, H, W, 3) uint8` on n held-out scenes.

    For each scene of plan_scenes(n, seed): the input is its render and product mask (PIL, L, white = product),
    the prompt names a new floor and backdrop in the world's own caption templates. Reports, per attribute, the
    accuracy of `classifier` on the generated images against the prompt, on the true renders of the prompted scenes
    (the ceiling: the product's geometry stays the same under the override, which is checked) and chance; for each
    `expansion` ring (default 3 and 6 px at 64x64, scaled with size) object expansion raw, on those true renders
    (baseline) and the difference, plus the detector's recall on simulated growth in the true renders; the
    fraction of product pixels kept bit-identical. `control=True` runs inpaint_fn again with empty prompts: what a
    prompt-blind model scores. Without a classifier one is fitted on World(CLASSIFIER_SEED) (seconds). Returns a
    JSON-able dict (see format_report)."""
    classifier = classifier or AttributeClassifier.fit(size=size)
    ring = max(1, round(3 * size / 64))  # 3 px at 64: scale with size
    rings = expansion or (ObjectExpansion(ring), ObjectExpansion(2 * ring))
    rings = (rings,) if isinstance(rings, ObjectExpansion) else tuple(rings)
    if classifier.meta["seed"] == seed:
        raise ValueError(f"evaluate_inpainting: seed {seed} is the world the classifier was fitted on; evaluate "
                         f"on another (default EVAL_SEED = {EVAL_SEED})")
    scenes = plan_scenes(n, seed)
    world = World(seed)
    src = [world.sample(s.index, size) for s in tqdm(scenes, desc="rendering scenes", leave=False, disable=None)]
    truth = [world.sample(s.index, size, **s.overrides) for s in scenes]
    for s, a, b in zip(scenes, src, truth):
        if not np.array_equal(a.mask, b.mask):
            raise RuntimeError(f"World({seed}).sample({s.index}, **{s.overrides}) moved the product: the evaluation "
                               f"needs overrides that keep its geometry (train/synthetic.py)")
    images, masks = np.stack([s.image for s in src]), np.stack([s.mask for s in src])  # (n, H, W, 3), (n, H, W)
    real = np.stack([t.image for t in truth])
    prompts, seeds = [s.prompt for s in scenes], [s.seed for s in scenes]
    generated = _generate(inpaint_fn, images, masks, prompts, seeds, batch_size)
    pred, pred_real = classifier.predict(generated, masks), classifier.predict(real, masks)
    pred_control = (classifier.predict(_generate(inpaint_fn, images, masks, [""] * n, seeds, batch_size), masks)
                    if control else None)
    attributes = {}
    for a, (labels, _, _) in ATTRS.items():
        want = [s.target[a] for s in scenes]
        used = [w for w in want if w is not None]
        attributes[a] = {"accuracy": _accuracy(pred[a], want), "ceiling": _accuracy(pred_real[a], want),
                         "heldout": classifier.accuracy[a], "chance": 1 / len(labels),
                         "majority": max(map(used.count, set(used))) / len(used) if used else None, "n": len(used)}
        if control:
            attributes[a]["control"] = _accuracy(pred_control[a], want)

    # the whole backdrop right: floor, kind, and the sky or the wall colour; chance 1 / (6 * 2 * 4 or 10)
    parts = [("floor", "backdrop", "sky" if s.target["backdrop"] == "sky" else "wall_colour") for s in scenes]
    whole = lambda p: float(np.mean([all(p[k][i] == scenes[i].target[k] for k in ks)  # noqa: E731
                                     for i, ks in enumerate(parts)]))
    scene = {"accuracy": whole(pred), "ceiling": whole(pred_real),
             "chance": float(np.mean([np.prod([1 / len(ATTRS[k][0]) for k in ks]) for ks in parts]))}
    if control:
        scene["control"] = whole(pred_control)
    grown = np.stack([t.coverage >= 0.5 for t in truth])  # (n, H, W): truly product, for the detector's recall
    expansions = []
    pasted = np.where(masks[..., None], images, np.roll(real, 1, axis=0))  # each product on the next scene's truth
    for e in rings:
        raw, base = e.rates(generated, masks).mean(), e.rates(real, masks).mean()
        expansions.append({"ring": e.ring, "raw": float(raw), "baseline": float(base), "corrected": float(raw - base),
                           "texture_reference": float(e.rates(pasted, masks).mean() - base),
                           "recall": e.recall(real, masks, grown)})
    return {"n": n, "size": size, "seed": seed, "attributes": attributes, "scene": scene, "expansion": expansions,
            "product_preserved": float((generated == images).all(-1)[masks].mean()),
            "classifier": {"seed": classifier.meta["seed"], "n": classifier.meta["n"]}}


def format_report(r: dict) -> str:
    """The model card's markdown: one row an attribute, then one an expansion ring, and product preservation."""
    pct = lambda v: "–" if v is None else f"{100 * v:.0f}%"  # noqa: E731
    ctl = "control" in r["scene"]
    lines = [f"Evaluated on {r['n']} held-out scenes of the synthetic world (seed {r['seed']}) at {r['size']}x"
             f"{r['size']}: each prompt asks for a new floor and backdrop around the kept product. The attribute "
             f"classifier was fitted on World({r['classifier']['seed']}), seen neither in training nor here.", "",
             "| attribute | prompted | ceiling (true renders) | chance |" + (" empty prompt |" if ctl else "")
             + " items |", "|---|---|---|---|" + ("---|" if ctl else "") + "---|"]
    names = {"floor": "floor", "backdrop": "backdrop kind (wall/sky)", "sky": "sky", "wall_colour": "wall colour",
             "colour": "product colour (kept)"}
    rows = [(names[a], v, v["n"]) for a, v in r["attributes"].items()] + [("whole backdrop", r["scene"], r["n"])]
    for name, v, items in rows:
        lines.append(f"| {name} | {pct(v['accuracy'])} | {pct(v['ceiling'])} | {pct(v['chance'])} |"
                     + (f" {pct(v['control'])} |" if ctl else "") + f" {items} |")
    pts = lambda v: "–" if v is None else f"{100 * v:+.1f} pts"  # noqa: E731
    lines += ["", "| object expansion: ring pixels that look like product | generated | true renders | corrected "
              "| texture reference | detector recall |", "|---|---|---|---|---|---|"]
    lines += [f"| ring of {e['ring']} px | {pct(e['raw'])} | {pct(e['baseline'])} | {pts(e['corrected'])} "
              f"| {pts(e.get('texture_reference'))} | {pct(e['recall'])} |" for e in r["expansion"]]
    lines += ["", "Detector recall: the share of truly grown product pixels it flags (simulated growth in the true "
              "renders); the corrected figure subtracts its false positives. Texture reference: the same figure "
              "for each product pasted unchanged on another scene's true backdrop, no growth at all (see "
              "train/expansion.py).", "",
              f"Product pixels kept bit-identical: {100 * r['product_preserved']:.2f}%."]
    return "\n".join(lines) + "\n"
