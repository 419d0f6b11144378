"""A procedural product-on-backdrop world: the tiny model's training data, drawn with numpy and Pillow.

One product (a mug, a bottle, a ball, ...) in a named colour and pattern stands on a floor (wood, marble, ...) in
front of a wall (a named colour and pattern) or a sky (dawn, noon, sunset, night), with simple shading and a soft
contact shadow. `World(seed).sample(i, size)` is a pure function of (seed, i, size): the image, a caption built from
the attributes, and the product's mask. Every random draw happens up front in a fixed order, so overriding one
attribute (`sample(i, colour="red")`) leaves the rest of the scene, the product's geometry included, unchanged.

Antialiasing (a VAE learns aliasing too): the product is drawn with hard edges at `supersample` x `supersample`
sub-samples per pixel (4 up to 128 px, 2 above), the backdrop at half that, and both are box-filtered down. The mask
comes from the very same hard-edged product layer: a pixel is in the mask iff any of its sub-samples is product
(`coverage > 0`). So outside the mask the image is exactly the product-free scene, and `1 - mask` never holds
product colour, which is what keep-the-product inpainting wants. The shadow is not product.
Geometry is in image fractions (x right, y down, both in [0, 1]); a product is drawn in its own units, `p` right
and `q` up from its base, one unit being its height (before scaling).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .products import EXTENTS, _contact_shadow, _draw_product, _frac, _place

__all__ = ["World", "Sample", "VOCAB", "PRODUCTS", "COLOURS", "WALL_COLOURS", "vocabulary", "contact_sheet"]

# Colours are sRGB, spread in hue and lightness so a small classifier tells them apart at 64x64 even under shading.
COLOURS = {
    "red": (205, 30, 40), "orange": (245, 125, 20), "yellow": (245, 210, 40), "green": (45, 150, 55),
    "teal": (0, 140, 140), "blue": (40, 75, 210), "purple": (125, 55, 170), "pink": (245, 135, 185),
    "white": (238, 238, 232), "black": (32, 32, 38), "brown": (120, 72, 36), "gray": (135, 135, 140),
}
# Walls are muted so the product stands out; their names differ from the products' where the tone does.
WALL_COLOURS = {
    "white": (236, 234, 228), "beige": (218, 198, 162), "gray": (150, 152, 156), "charcoal": (62, 64, 70),
    "sage": (150, 178, 140), "navy": (38, 50, 96), "terracotta": (192, 98, 66), "pink": (238, 182, 192),
    "mustard": (218, 172, 52), "lavender": (178, 162, 218),
}
PRODUCTS = ("mug", "bottle", "box", "ball", "vase", "lamp", "shoe", "teapot", "bowl", "candle")
PATTERNS = ("plain", "striped", "dotted")
FLOORS = ("wood", "marble", "tiles", "grass", "sand", "concrete")
SKIES = ("dawn", "noon", "sunset", "night")
WALL_PATTERNS = ("plain", "striped", "brick")
VOCAB: dict[str, tuple[str, ...]] = {
    "product": PRODUCTS, "colour": tuple(COLOURS), "pattern": PATTERNS, "floor": FLOORS,
    "backdrop": ("wall", "sky"), "sky": SKIES, "wall_colour": tuple(WALL_COLOURS), "wall_pattern": WALL_PATTERNS,
}
# (top, horizon) colours of each sky's vertical gradient
SKY_GRADIENTS = {"dawn": ((120, 135, 200), (252, 196, 170)), "noon": ((38, 105, 215), (175, 212, 245)),
                 "sunset": ((72, 40, 112), (255, 138, 42)), "night": ((4, 7, 24), (28, 40, 78))}
FLOOR_PHRASES = {"wood": "a wooden floor", "marble": "a marble counter", "tiles": "checkered tiles",
                 "grass": "the grass", "sand": "the sand", "concrete": "a concrete floor"}
TEMPLATES = ("{obj} on {floor} in front of {back}",
             "a photo of {obj} standing on {floor}, {back} behind it",
             "product photo, {obj} on {floor} against {back}",
             "{obj} placed on {floor} with {back} in the background")


def vocabulary() -> dict[str, tuple[str, ...]]:
    """Every attribute and its values, in a fixed order (the evaluator's label sets)."""
    return dict(VOCAB)


@dataclass(frozen=True)
class Sample:
    image: np.ndarray        # (H, W, 3) uint8 RGB
    mask: np.ndarray         # (H, W) bool: every pixel the product covers at all; the shadow is not product
    coverage: np.ndarray     # (H, W) float32 in [0, 1]: the fraction of each pixel the product covers
    caption: str
    attributes: dict         # VOCAB key -> value; sky is None for walls, wall_colour/wall_pattern None for skies
    index: int

    def pil(self) -> Image.Image:
        return Image.fromarray(self.image, "RGB")

    def mask_pil(self) -> Image.Image:
        return Image.fromarray(self.mask.astype(np.uint8) * 255, "L")


@functools.lru_cache(maxsize=8)
def _noise(S: int) -> tuple[np.ndarray, np.ndarray]:
    """Two fixed value-noise fields spanning 2x2 image widths at S px per width: smooth (16 cells per 2 widths)
    and fine (192). Built once per resolution from a fixed seed; a scene crops them at a random offset."""
    rng = np.random.default_rng(0x5EED)
    fields = []
    for cells in (16, 192):
        grid = rng.random((cells + 1, cells + 1), dtype=np.float32)
        fields.append(np.asarray(Image.fromarray(grid).resize((2 * S, 2 * S), Image.Resampling.BICUBIC)))
    return fields[0], fields[1]


def _box_down(a, k: int):
    """Mean over k x k blocks of the first two axes: a box filter (strided adds beat numpy's multi-axis mean)."""
    a = sum(a[i::k] for i in range(k))  # (H / k, W, ...)
    return sum(a[:, j::k] for j in range(k)) / np.float32(k * k)  # (H / k, W / k, ...)


def _hash(a):
    """A cheap per-cell pseudo-random number in [0, 1) (the classic GLSL sin hash)."""
    return _frac(np.sin(a * 12.9898 + 4.1414) * 43758.5453)


class World:
    """The procedural world. `sample(i, size)` is deterministic per (seed, i, size); attribute values are drawn
    uniformly and independently (backdrop: wall or sky, half each). `supersample` overrides the sub-sampling."""

    def __init__(self, seed: int = 0, supersample: int | None = None):
        if supersample is not None and not (isinstance(supersample, int) and 1 <= supersample <= 8):
            raise ValueError(f"World: supersample must be an int in 1..8, got {supersample!r}")
        self.seed, self.supersample = int(seed), supersample

    def __repr__(self):
        return f"World(seed={self.seed})"

    # ------------------------------------------------------------------ attributes and captions
    def _draw(self, index: int, overrides: dict) -> tuple[dict, list[float], int]:
        if index < 0:
            raise ValueError(f"World.sample: index must be >= 0, got {index}")
        rng = np.random.default_rng([self.seed, index])
        # Fixed draw order, whatever is overridden: 8 categorical picks, a template, 24 geometry/texture numbers.
        attrs = {k: v[int(rng.integers(len(v)))] for k, v in VOCAB.items()}
        template = int(rng.integers(len(TEMPLATES)))
        g = rng.random(24).tolist()  # Python floats keep the float32 arrays float32 (numpy 2 promotion)
        for k, v in overrides.items():
            if k not in VOCAB:
                raise ValueError(f"World.sample: unknown attribute {k!r}; expected one of {list(VOCAB)}")
            if v not in VOCAB[k]:
                raise ValueError(f"World.sample: {k}={v!r} is not one of {list(VOCAB[k])}")
        attrs |= overrides
        implied = "sky" if "sky" in overrides else "wall" if {"wall_colour", "wall_pattern"} & set(overrides) else None
        if implied and "backdrop" in overrides and overrides["backdrop"] != implied:
            raise ValueError(f"World.sample: backdrop={overrides['backdrop']!r} conflicts with the {implied} "
                             f"attributes given ({sorted(overrides)})")
        attrs["backdrop"] = overrides.get("backdrop", implied or attrs["backdrop"])
        unused = ("wall_colour", "wall_pattern") if attrs["backdrop"] == "sky" else ("sky",)
        attrs |= dict.fromkeys(unused)
        return attrs, g, template

    def attributes(self, index: int, **overrides) -> dict:
        """The attribute dict of sample `index`, without rendering it."""
        return self._draw(index, overrides)[0]

    @staticmethod
    def caption(attrs: dict, template: int = 0) -> str:
        article = lambda w: ("an " if w[0] in "aeiou" else "a ") + w  # noqa: E731
        colour, pattern = attrs["colour"], attrs["pattern"]
        obj = article(f"plain {colour}" if pattern == "plain" else f"{colour} {pattern}") + " " + attrs["product"]
        if attrs["backdrop"] == "sky":
            back = f"a {attrs['sky']} sky"
        else:
            wc, wp = attrs["wall_colour"], attrs["wall_pattern"]
            back = article(f"plain {wc}" if wp == "plain" else f"{wc} {wp}") + " wall"
        return TEMPLATES[template].format(obj=obj, floor=FLOOR_PHRASES[attrs["floor"]], back=back)

    # ------------------------------------------------------------------ rendering
    def sample(self, index: int, size: int = 64, **overrides) -> Sample:
        """Render sample `index` at size x size. Keyword overrides pin attributes (e.g. colour="red")."""
        attrs, g, template = self._draw(index, overrides)
        image, coverage = self._render(attrs, g, size, flat=None, shadow=True, product=True)
        return Sample(image, coverage > 0, coverage, self.caption(attrs, template), attrs, index)

    def background(self, index: int, size: int = 64, **overrides) -> np.ndarray:
        """The same scene without the product (its shadow stays): (H, W, 3) uint8."""
        attrs, g, _ = self._draw(index, overrides)
        return self._render(attrs, g, size, flat=None, shadow=True, product=False)[0]

    def product_layer(self, index: int, size: int = 64, background=(0, 0, 0), **overrides) -> np.ndarray:
        """The product alone over a flat colour, no shadow: (H, W, 3) uint8 (for checks and cut-outs)."""
        attrs, g, _ = self._draw(index, overrides)
        return self._render(attrs, g, size, flat=background, shadow=False, product=True)[0]

    def _render(self, attrs, g, size, flat, shadow, product):
        if not (isinstance(size, (int, np.integer)) and size >= 8):
            raise ValueError(f"World.sample: size must be an int >= 8, got {size!r}")
        ss = self.supersample or (4 if size <= 128 else 2)  # product sub-samples per pixel side
        sb = max(1, ss // 2)  # the backdrop's: soft textures need fewer, and it covers the whole image
        img = np.empty((size, size, 3), np.float32)
        geo = _place(attrs["product"], g)
        if flat is not None:
            img[:] = np.asarray(flat, np.float32)
        else:
            S = size * sb
            y = ((np.arange(S, dtype=np.float32) + 0.5) / S)[:, None]  # (S, 1) sub-sample centres
            x = y.reshape(1, S)  # (1, S)
            smooth, fine = _noise(S)
            ox, oy = int(g[0] * S), int(g[1] * S)
            sm, fn = smooth[oy:oy + S, ox:ox + S], fine[oy:oy + S, ox:ox + S]  # (S, S) noise crops
            horizon = 0.4 + 0.18 * g[2]
            h = min(S, int(round(horizon * S)))
            back = np.empty((S, S, 3), np.float32)
            if attrs["backdrop"] == "sky":
                back[:h] = self._sky(attrs["sky"], x, y[:h], sm[:h], fn[:h], horizon, g)
            else:
                back[:h] = self._wall(attrs, x, y[:h], sm[:h], horizon, g)
            back[h:] = self._floor(attrs["floor"], x, y[h:], sm[h:], fn[h:], horizon, g)
            if shadow:
                _contact_shadow(back, x, y, geo)
            img[:] = _box_down(back, sb)  # (size, size, 3)
        coverage = np.zeros((size, size), np.float32)
        if product:
            # Draw the product in its bounding box at ss x ss sub-samples and blend: a pixel's colour is the mean
            # of its sub-samples, product or backdrop. Where no sub-sample is product, the backdrop is untouched.
            left, right, height, _ = EXTENTS[geo.product]
            left, right = (left, right) if geo.mirror > 0 else (right, left)
            s = geo.scale
            j0, j1 = max(0, int((geo.cx - s * left) * size) - 1), min(size, int((geo.cx + s * right) * size) + 2)
            i0, i1 = max(0, int((geo.base - s * height) * size) - 1), min(size, int(geo.base * size) + 2)
            S = size * ss
            y = ((np.arange(i0 * ss, i1 * ss, dtype=np.float32) + 0.5) / S)[:, None]  # (H, 1)
            x = ((np.arange(j0 * ss, j1 * ss, dtype=np.float32) + 0.5) / S)[None, :]  # (1, W)
            inside, rgb = _draw_product(x, y, geo, np.asarray(COLOURS[attrs["colour"]], np.float32),
                                       attrs["pattern"])
            cov = _box_down(inside.astype(np.float32), ss)  # (hh, ww)
            col = _box_down(np.where(inside[..., None], rgb, np.float32(0)), ss)  # (hh, ww, 3)
            img[i0:i1, j0:j1] = img[i0:i1, j0:j1] * (1 - cov)[..., None] + col
            coverage[i0:i1, j0:j1] = cov
        return np.clip(img + 0.5, 0, 255).astype(np.uint8), coverage

    # ------------------------------------------------------------------ backdrops
    @staticmethod
    def _sky(kind, x, y, sm, fn, horizon, g):
        top, bottom = (np.asarray(c, np.float32) for c in SKY_GRADIENTS[kind])
        t = (y / horizon)[..., None] ** 1.6  # (h, 1, 1): the colour changes fastest near the horizon
        img = np.broadcast_to(top + (bottom - top) * t, (y.shape[0], x.shape[1], 3)).copy()  # (h, S, 3)
        sx = 0.2 + 0.6 * g[3]
        if kind == "noon":  # fair-weather clouds where the smooth noise is high
            cloud = np.clip((sm - 0.55) * 3.5, 0, 1) * (y < 0.85 * horizon)
            img += (np.float32(250) - img) * (0.9 * cloud)[..., None]
        elif kind == "night":  # stars and a moon
            img[(fn > 0.94) & (y < 0.85 * horizon)] = 235
            img[(x - sx) ** 2 + (y - 0.16) ** 2 < 0.045 ** 2] = (232, 230, 210)
        else:  # dawn: a pale glow; sunset: a low sun with a wide warm glow
            sy = horizon - 0.06
            d2 = (x - sx) ** 2 + (y - sy) ** 2
            warm = (255, 225, 205) if kind == "dawn" else (255, 190, 80)
            img += (np.asarray(warm, np.float32) - img) * (0.55 * np.exp(-d2 / 0.02))[..., None]
            if kind == "sunset":
                img[d2 < 0.05 ** 2] = (255, 236, 160)
        return img

    @staticmethod
    def _wall(attrs, x, y, sm, horizon, g):
        base = np.asarray(WALL_COLOURS[attrs["wall_colour"]], np.float32)
        dark = base.mean() < 110  # patterns on dark walls go lighter, on light walls darker
        tone = 0.97 + 0.05 * sm  # (h, S) faint plaster blotches
        if attrs["wall_pattern"] == "striped":  # vertical stripes, 0.1 image widths apart
            tone = tone * np.where(_frac(x / 0.1 + g[4]) < 0.5, 1.0, 1.35 if dark else 0.8)
        elif attrs["wall_pattern"] == "brick":  # running bond: rows 0.06 high, bricks 0.14 wide, half offset
            row = np.floor(y / 0.06)
            bx = x / 0.14 + 0.5 * (row % 2) + g[4]
            brick = 0.9 + 0.2 * _hash(row * 31.0 + np.floor(bx))
            mortar = (_frac(y / 0.06) < 0.16) | (_frac(bx) < 0.06)
            tone = tone * np.where(mortar, 1.45 if dark else 0.72, brick)
        tone = tone * (1 - 0.3 * np.exp(-(horizon - y) / 0.02))  # the corner where wall meets floor is darker
        return base * tone[..., None]

    @staticmethod
    def _floor(kind, x, y, sm, fn, horizon, g):
        d = np.maximum(y - horizon, 1e-3)  # (h, 1) rows below the horizon
        z = 0.3 / d  # depth of the ground plane seen by a pinhole camera at height 0.3 (perspective: 1 / d)
        fu = (x - (0.35 + 0.3 * g[5])) * z  # (h, S) ground coordinates: across, and away (fv = z)
        if kind == "wood":  # planks 0.14 wide running away from the camera, with grain and dark seams
            plank = np.floor(fu / 0.14)
            tone = (0.82 + 0.3 * _hash(plank)) * (1 + 0.08 * np.sin(z * 4 + sm * 12 + plank))
            tone = tone * np.where(_frac(fu / 0.14) < 0.06, 0.55, 1.0)
            base = (150, 96, 52)
        elif kind == "tiles":  # a black-and-white checkerboard with grey grout
            cu, cv = np.floor(fu / 0.2), np.floor(z / 0.2)
            tone = np.where((cu + cv) % 2 == 0, 1.0, 0.28) * (0.95 + 0.08 * sm)
            tone = np.where((_frac(fu / 0.2) < 0.05) | (_frac(z / 0.2) < 0.05), 0.7, tone)
            base = (232, 230, 222)
        elif kind == "marble":  # white with wavy grey veins (a sine warped by noise)
            vein = np.clip(1 - np.abs(np.sin((2 * x + 3 * y) * 4 + sm * 4)) / 0.1, 0, 1)
            tone = 1 - 0.35 * vein - 0.05 * sm
            base = (234, 232, 228)
        elif kind == "grass":  # blotchy green with blades (fine noise) and mowing stripes
            tone = (0.72 + 0.35 * sm + 0.4 * (fn - 0.5)) * (1 + 0.08 * np.sign(np.sin(fu * 10)))
            base = (72, 142, 50)
        elif kind == "sand":  # wind ripples across the view and grains
            tone = 0.92 + 0.1 * sm + 0.06 * np.sin(z * 30 + sm * 8) + 0.1 * (fn - 0.5)
            base = (224, 198, 150)
        else:  # concrete: grey blotches, grit and slab joints
            joint = (_frac(fu / 0.5) < 0.02) | (_frac(z / 0.5) < 0.02)
            tone = (0.86 + 0.2 * sm + 0.16 * (fn - 0.5)) * np.where(joint, 0.7, 1.0)
            base = (156, 156, 152)
        # Texture fades to its mean towards the horizon, where it would alias (and looks hazy anyway).
        fade = np.clip(d / 0.12, 0, 1)
        tone = tone * fade + np.mean(tone) * (1 - fade)
        return np.asarray(base, np.float32) * tone[..., None]


def contact_sheet(world: World, indices, size: int = 64, columns: int = 4) -> Image.Image:
    """A grid of samples (for looking at the world); captions are not drawn."""
    indices = list(indices)
    rows = -(-len(indices) // columns)
    sheet = Image.new("RGB", (columns * (size + 2), rows * (size + 2)), (255, 255, 255))
    for k, i in enumerate(indices):
        sheet.paste(world.sample(i, size).pil(), ((k % columns) * (size + 2), (k // columns) * (size + 2)))
    return sheet
