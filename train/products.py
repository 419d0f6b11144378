"""The products of the synthetic world (train/synthetic.py): ten shapes drawn analytically in their own units, a
pattern on their body, and the contact shadow under them.

A shape function takes product coordinates p (right) and q (up from the base; 1 unit = the product's height
before scaling) and the light's x direction, and returns (inside, palette index, shade, specular, u[, v]):
which points are product, which palette slot paints them, their diffuse shading and highlight, and the surface
coordinates the pattern follows. `_place` puts a product in the image from the scene's random draws,
`_draw_product` rasterises it, `_contact_shadow` darkens the floor under it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def _frac(x):
    return x - np.floor(x)


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
