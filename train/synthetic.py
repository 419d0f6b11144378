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
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

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


def _frac(x):
    return x - np.floor(x)


def _box_down(a, k: int):
    """Mean over k x k blocks of the first two axes: a box filter (strided adds beat numpy's multi-axis mean)."""
    a = sum(a[i::k] for i in range(k))  # (H / k, W, ...)
    return sum(a[:, j::k] for j in range(k)) / np.float32(k * k)  # (H / k, W / k, ...)


def _hash(a):
    """A cheap per-cell pseudo-random number in [0, 1) (the classic GLSL sin hash)."""
    return _frac(np.sin(a * 12.9898 + 4.1414) * 43758.5453)


# ---------------------------------------------------------------------- products
# Palette slots a shape paints with: the body takes the pattern; accents are fixed colours.
BODY, PATTERN, INNER, PLAIN, METAL, WHITE, DARK, FLAME = range(8)
# product -> (extent left, extent right, height, half-width of the foot), in the product's own units
EXTENTS = {"mug": (0.36, 0.64, 1.09, 0.36), "bottle": (0.23, 0.23, 1.0, 0.22), "box": (0.45, 0.43, 0.94, 0.45),
           "ball": (0.5, 0.5, 1.0, 0.3), "vase": (0.35, 0.35, 1.05, 0.16), "lamp": (0.37, 0.37, 1.0, 0.2),
           "shoe": (0.6, 0.66, 0.54, 0.6), "teapot": (0.64, 0.76, 0.93, 0.3), "bowl": (0.7, 0.7, 0.61, 0.25),
           "candle": (0.17, 0.17, 0.99, 0.16)}


@dataclass(frozen=True)
class _Placement:
    product: str
    scale: float    # image fraction per product unit
    cx: float       # image x of the product's axis (p = 0)
    base: float     # image y of its base (q = 0)
    mirror: int     # +1, or -1 to face the other way (handles, spouts, toes)
    light: float    # x-component of the light direction in the image (the shadow falls the other way)


def _place(product: str, g) -> _Placement:
    left, right, height, _ = EXTENTS[product]
    mirror = 1 if g[9] < 0.5 else -1
    if mirror < 0:
        left, right = right, left
    width = left + right
    f = 0.34 + 0.2 * g[6]  # size: 34-54% of the image, on the larger of height and 0.62 * width (wide products)
    s = min(f / max(height, 0.62 * width), 0.78 / width)
    cx = float(np.clip(0.4 + 0.2 * g[7], 0.04 + s * left, 0.96 - s * right))
    base = max(0.76 + 0.14 * g[8], 0.04 + s * height)
    light = (0.3 + 0.4 * g[10]) * (1 if g[11] < 0.5 else -1)
    return _Placement(product, s, cx, base, mirror, light)


def _smoothstep(t):
    t = np.clip(t, 0, 1)
    return t * t * (3 - 2 * t)


def _ellipse(p, q, cp, cq, rp, rq):
    return ((p - cp) / rp) ** 2 + ((q - cq) / rq) ** 2 <= 1


def _cylinder(nx, lx):
    """Lambert diffuse plus a Blinn-Phong-like highlight stripe on a vertical cylinder (normal x-component nx)."""
    nz = np.sqrt(np.clip(1 - nx * nx, 0, 1))
    diffuse = np.clip(nx * lx + nz * math.sqrt(1 - lx * lx), 0, 1)
    spec = np.clip(1 - np.abs(nx - 0.5 * lx) / 0.15, 0, 1) ** 2  # the half vector of light and view: ~lx / 2
    return 0.3 + 0.75 * diffuse, 0.4 * spec


def _sphere(nx, ny, lx):
    """The same on a sphere; the light comes from lx sideways, 0.45 above, and the front."""
    nz = np.sqrt(np.clip(1 - nx * nx - ny * ny, 0, 1))
    lz = math.sqrt(1 - lx * lx - 0.45 ** 2)
    diffuse = np.clip(nx * lx + ny * 0.45 + nz * lz, 0, 1)
    hx, hy, hz = lx, 0.45, lz + 1  # Blinn's half vector between the light and the viewer (0, 0, 1)
    n = math.sqrt(hx * hx + hy * hy + hz * hz)
    spec = np.clip((nx * hx + ny * hy + nz * hz) / n, 0, 1) ** 40
    return 0.3 + 0.75 * diffuse, 0.6 * spec


def _body(p, q, w, q0, q1, lx):
    """A body of revolution with half-width w (scalar or per row) between heights q0 and q1."""
    inside = (np.abs(p) < w) & (q >= q0) & (q <= q1)
    nx = np.clip(p / w, -1, 1)
    shade, spec = _cylinder(nx, lx)
    return inside, shade, spec, np.arcsin(nx) * w  # u: arc length round the body, so patterns wrap


def _mug(p, q, lx):
    w = 0.36
    body, shade, spec, u = _body(p, q, w, 0, 1, lx)
    rim, inner = _ellipse(p, q, 0, 1, w, 0.09), _ellipse(p, q, 0, 1, 0.88 * w, 0.065)  # open top seen from above
    r = np.hypot(p - w - 0.03, q - 0.52)
    handle = (r < 0.24) & (r > 0.14) & (p > w - 0.02) & ~body
    tube = 0.4 + 0.55 * np.sqrt(np.clip(1 - ((r - 0.19) / 0.05) ** 2, 0, 1))
    idx = np.where(inner, INNER, np.where(handle, PLAIN, BODY))
    return body | rim | handle, idx, np.where(handle, tube, shade), np.where(handle | inner, 0, spec), u


def _bottle(p, q, lx):
    w = np.where(q > 0.87, 0.1, 0.22 - 0.135 * _smoothstep((q - 0.52) / 0.2))  # body, shoulder, neck, cap
    inside, shade, spec, u = _body(p, q, w, 0, 1, lx)
    return inside, np.where(q > 0.87, METAL, np.where(q > 0.6, PLAIN, BODY)), shade, spec, u


def _vase(p, q, lx):
    w = 0.13 + 0.21 * np.exp(-((q - 0.33) / 0.24) ** 2) + 0.07 * np.clip((q - 0.82) / 0.18, 0, 1) ** 2
    body, shade, spec, u = _body(p, q, w, 0, 1, lx)
    rim, inner = _ellipse(p, q, 0, 1, 0.2, 0.05), _ellipse(p, q, 0, 1, 0.16, 0.035)
    return body | rim, np.where(inner, INNER, BODY), shade, np.where(inner, 0, spec), u


def _lamp(p, q, lx):
    shade_part, shade, spec, u = _body(p, q, 0.36 - 0.16 * (q - 0.55) / 0.45, 0.55, 1, lx)
    stem = (np.abs(p) < 0.028) & (q >= 0.04) & (q < 0.56)
    foot = _ellipse(p, q, 0, 0.04, 0.2, 0.045) & (q >= 0)
    m_shade, m_spec = _cylinder(np.clip(p / np.where(q > 0.07, 0.028, 0.2), -1, 1), lx)
    return (shade_part | stem | foot, np.where(shade_part, BODY, METAL), np.where(shade_part, shade, m_shade),
            np.where(shade_part, spec, m_spec), u)


def _candle(p, q, lx):
    body, shade, spec, u = _body(p, q, 0.16, 0, 0.74, lx)
    top = _ellipse(p, q, 0, 0.74, 0.16, 0.045) & ~body
    wick = (np.abs(p) < 0.014) & (q > 0.74) & (q < 0.8)
    flame = _ellipse(p, q, 0, 0.88, 0.055, 0.11)  # emissive: no shading
    idx = np.where(flame, FLAME, np.where(wick, DARK, np.where(top, PLAIN, BODY)))
    return body | top | wick | flame, idx, np.where(flame | top, 1.0, shade), np.where(flame, 0, spec), u


def _ball(p, q, lx):
    nx, ny = p / 0.5, (q - 0.5) / 0.5
    inside = nx * nx + ny * ny <= 1
    shade, spec = _sphere(nx, ny, lx)
    lat = np.arcsin(np.clip(ny, -1, 1))
    u = 0.5 * np.arcsin(np.clip(nx / np.maximum(np.cos(lat), 1e-3), -1, 1))  # longitude arc at the equator
    return inside, np.full(inside.shape, BODY), shade, spec, u, 0.5 + 0.5 * lat  # v: latitude arc, bands


def _teapot(p, q, lx):
    body = _ellipse(p, q, 0, 0.39, 0.42, 0.39)
    lid = _ellipse(p, q, 0, 0.77, 0.22, 0.075) | _ellipse(p, q, 0, 0.875, 0.06, 0.05)
    t = np.clip(((p - 0.3) * 0.38 + (q - 0.32) * 0.36) / (0.38 ** 2 + 0.36 ** 2), 0, 1)  # spout: (.3,.32)->(.68,.68)
    spout = np.hypot(p - 0.3 - 0.38 * t, q - 0.32 - 0.36 * t) < 0.085 - 0.045 * t
    r = np.hypot(p + 0.42, q - 0.45)
    handle = (r < 0.21) & (r > 0.13) & (p < -0.3)
    nx = np.clip(p / 0.42, -1, 1)
    shade, spec = _sphere(nx, (q - 0.39) / 0.39, lx)
    l_shade, l_spec = _sphere(np.clip(p / 0.22, -1, 1), 0.6, lx)
    extra = (spout | handle) & ~body
    idx = np.where(body, BODY, PLAIN)
    shade = np.where(body, shade, np.where(lid, l_shade, 0.8))
    return body | lid | extra, idx, shade, np.where(body, spec, np.where(lid, l_spec, 0)), np.arcsin(nx) * 0.42


def _bowl(p, q, lx):
    w = 0.7 * np.sqrt(np.clip(1 - ((q - 0.5) / 0.44) ** 2, 1e-4, 1))
    body, shade, spec, u = _body(p, q, np.where(q > 0.5, 0.7, w), 0.06, 0.5, lx)
    rim, inner = _ellipse(p, q, 0, 0.5, 0.7, 0.11), _ellipse(p, q, 0, 0.5, 0.64, 0.09)
    foot = (np.abs(p) < 0.24) & (q >= 0) & (q < 0.08)
    idx = np.where(inner, INNER, np.where(foot & ~body, PLAIN, BODY))
    return body | rim | foot, idx, shade, np.where(inner, 0, spec), u


def _box(p, q, lx):
    f0, f1, h, d = -0.45, 0.21, 0.72, 0.22  # front face p in [f0, f1], q in [0, h]; oblique depth d up and right
    front = (p >= f0) & (p <= f1) & (q >= 0) & (q <= h)
    top = (q > h) & (q <= h + d) & (p - (q - h) >= f0) & (p - (q - h) <= f1)
    side = (p > f1) & (p <= f1 + d) & (q - (p - f1) >= 0) & (q - (p - f1) <= h)
    lz = math.sqrt(1 - lx * lx - 0.25)  # flat shading of three faces under the light (lx, 0.5, lz)
    shade = np.where(top, 1.05, np.where(side, 0.35 + 0.8 * max(lx, 0.0), 0.35 + 0.8 * lz))
    u, v = np.where(top, p - (q - h), p), np.where(side, q - (p - f1), q)
    inside = front | top | side
    return inside, np.full(inside.shape, BODY), shade, 0.0, u, v


def _shoe(p, q, lx):
    toe = 0.09 + 0.11 * np.sqrt(np.clip(1 - ((p - 0.35) / 0.27) ** 2, 0, 1))
    top = np.where(p < 0.35, 0.5 - 0.3 * _smoothstep((p + 0.1) / 0.45) - 0.1 * _smoothstep((-0.45 - p) / 0.15), toe)
    sole = ((q >= 0) & (q < 0.09) & (p > -0.6) & (p < 0.55)) | _ellipse(p, q, 0.55, 0.045, 0.1, 0.045)
    upper = (q >= 0.08) & (q < top) & (p > -0.58) & (p < 0.62)
    collar = _ellipse(p, q, -0.3, 0.5, 0.2, 0.04)
    laces = upper & (p > -0.05) & (p < 0.3) & (top - q < 0.05) & (_frac(p / 0.08) < 0.45)
    idx = np.where(collar, DARK, np.where(sole | laces, WHITE, BODY))
    shade = (0.62 + 0.45 * np.clip(q / top, 0, 1)) * (1 + 0.12 * lx * np.clip(p, -1, 1))
    return sole | upper | collar, idx, shade, 0.0, p


SHAPES = {"mug": _mug, "bottle": _bottle, "box": _box, "ball": _ball, "vase": _vase, "lamp": _lamp,
          "shoe": _shoe, "teapot": _teapot, "bowl": _bowl, "candle": _candle}


def _pattern(kind: str, u, v):
    """Stripes or dots 0.2 product units apart, in surface coordinates (u around, v up)."""
    if kind == "striped":
        return _frac(v / 0.2) < 0.45
    row = np.floor(v / 0.2)
    du = _frac(u / 0.2 + 0.5 * (row % 2)) - 0.5
    return du * du + (v / 0.2 - row - 0.5) ** 2 < 0.3 ** 2


def _draw_product(x, y, geo: _Placement, primary, pattern):
    """The product over a grid of image points x (1, W), y (H, 1): (inside (H, W) bool, colour (H, W, 3))."""
    p = (x - geo.cx) / geo.scale * geo.mirror  # (1, W) product units, mirrored so shapes face +p
    q = (geo.base - y) / geo.scale  # (H, 1)
    out = SHAPES[geo.product](p, q, geo.light * geo.mirror)
    inside, idx, shade, spec, u = out[:5]
    v = out[5] if len(out) > 5 else q
    if pattern != "plain":  # on u, v as given: often (H, 1) or (1, W), which is much cheaper
        idx = np.where((idx == BODY) & _pattern(pattern, u, v), PATTERN, idx)
    inside, idx = np.broadcast_arrays(inside, idx)  # (H, W)
    lum = primary @ np.asarray([0.299, 0.587, 0.114], np.float32)  # Rec. 601 luma picks a contrasting pattern ink
    ink = primary * 0.3 if lum > 170 else np.asarray((245, 245, 240), np.float32)
    palette = np.stack([primary, ink, primary * 0.45, primary, np.asarray((185, 185, 192), np.float32),
                        np.asarray((240, 240, 234), np.float32), np.asarray((40, 40, 46), np.float32),
                        np.asarray((255, 205, 90), np.float32)])  # indexed by BODY ... FLAME
    occlusion = np.where(idx == FLAME, 1.0, 0.78 + 0.22 * np.clip(q / 0.08, 0, 1))  # darker where it meets the floor
    light = (shade * occlusion)[..., None], (255 * np.asarray(spec, np.float32))[..., None]
    rgb = np.take(palette, idx.astype(np.intp), axis=0) * light[0] + light[1]  # (H, W, 3)
    return inside, np.clip(rgb, 0, 255)


def _contact_shadow(img, x, y, geo: _Placement):
    """Darken the floor under the product: a tight contact blob and a fainter cast shadow away from the light."""
    S, s = img.shape[0], geo.scale
    foot = EXTENTS[geo.product][3] * s
    c0, c1 = max(0, int((geo.cx - foot - s * 0.6) * S)), min(S, int((geo.cx + foot + s * 0.6) * S) + 1)
    r0, r1 = max(0, int((geo.base - 0.08) * S)), min(S, int((geo.base + 0.06) * S) + 1)
    xs, ys = x[:, c0:c1], y[r0:r1]
    contact = ((xs - geo.cx + 0.03 * geo.light) / (1.3 * foot + 0.02)) ** 2 + ((ys - geo.base) / 0.028) ** 2
    cast = ((xs - geo.cx + 0.4 * s * geo.light) / (foot + 0.3 * s)) ** 2 + ((ys - geo.base + 0.015) / 0.045) ** 2
    keep = (1 - 0.55 * np.clip(1 - contact, 0, 1) ** 2) * (1 - 0.25 * np.clip(1 - cast, 0, 1) ** 2)  # (h, w)
    img[r0:r1, c0:c1] *= keep[..., None]


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
