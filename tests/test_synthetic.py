"""The procedural world: deterministic, masks exactly the product's pixels, captions that say what is drawn, every
attribute reachable, and attributes a trivial classifier can tell apart at 64x64."""
import re

import numpy as np
import pytest

from backdrop.train import products
from backdrop.train.synthetic import COLOURS, VOCAB, WALL_COLOURS, World, vocabulary


def test_same_seed_and_index_give_identical_samples():
    a, b = World(7).sample(3), World(7).sample(3)  # two World objects: no hidden state between calls
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert a.caption == b.caption and a.attributes == b.attributes
    assert a.image.shape == (64, 64, 3) and a.image.dtype == np.uint8 and a.mask.dtype == bool
    w = World(7)
    for i in range(5):  # and independent of what was rendered before
        w.sample(i + 10)
    assert np.array_equal(w.sample(3).image, a.image)


def test_different_seeds_and_indices_differ():
    base = World(0).sample(5).image.astype(int)
    assert np.abs(base - World(1).sample(5).image).mean() > 10
    assert np.abs(base - World(0).sample(6).image).mean() > 10


@pytest.mark.parametrize("seed", [0, 11])
def test_mask_is_exactly_the_products_pixels(seed):
    """A pixel belongs to the product iff the product alone, drawn over black and over white, is not exactly the
    backdrop there (no pixel can be both pure black and pure white). The scene outside the mask is the scene
    without the product, shadow included; changing only the product's colour changes pixels only inside."""
    w = World(seed)
    for i in range(24):
        s = w.sample(i)
        on_black, on_white = w.product_layer(i, 64, (0, 0, 0)), w.product_layer(i, 64, (255, 255, 255))
        backdrop = (on_black == 0).all(-1) & (on_white == 255).all(-1)
        assert np.array_equal(s.mask, ~backdrop), (i, s.attributes)
        assert 0.01 < s.mask.mean() < 0.6, (i, s.mask.mean())
        assert np.array_equal(s.mask, s.coverage > 0)
        outside = ~s.mask
        assert np.array_equal(s.image[outside], w.background(i)[outside])
        colour = "teal" if s.attributes["colour"] != "teal" else "red"
        changed = (w.sample(i, colour=colour).image != s.image).any(-1)
        assert changed.any() and not (changed & outside).any()


def test_shadow_is_in_the_scene_but_not_in_the_mask():
    w = World(2)
    darker = 0
    for i in range(12):
        s = w.sample(i)
        rows = np.nonzero(s.mask.any(1))[0]
        cols = np.nonzero(s.mask[rows[-1]])[0]
        below = s.image[rows[-1] + 1:rows[-1] + 3, cols[0]:cols[-1] + 1].astype(float).mean()
        far = s.image[rows[-1] + 1:rows[-1] + 3, :4].astype(float).mean()  # same rows, at the image's edge
        darker += below < far
        assert not s.mask[rows[-1] + 1:].any()
    assert darker >= 10  # the floor right under the product is darker than the same rows away from it


def _words(caption):
    return re.findall(r"[a-z]+", caption)


def test_captions_mention_every_attribute():
    w = World(3)
    for i in range(200):
        a = w.attributes(i)
        words = _words(w.sample(i, 16).caption)
        for key in ("product", "colour", "pattern", "backdrop", "sky", "wall_colour", "wall_pattern"):
            if a[key] is not None:
                assert a[key] in words, (key, a, words)
        assert any(word.startswith(a["floor"]) for word in words), (a, words)  # "wooden floor", "checkered tiles"
        named = {word for word in words if word in COLOURS or word in WALL_COLOURS}
        assert named <= {a["colour"], a["wall_colour"]}, (a, words)  # no colour that is not drawn
        assert (a["sky"] is None) == (a["backdrop"] == "wall")


def test_every_attribute_value_appears_in_500_samples():
    w = World(0)
    seen = {k: set() for k in VOCAB}
    for i in range(500):
        for k, v in w.attributes(i).items():
            seen[k].add(v)
    for k, values in vocabulary().items():
        assert set(values) <= seen[k], (k, set(values) - seen[k])
    assert len(VOCAB["product"]) >= 8 and len(VOCAB["colour"]) >= 8
    assert w.sample(17, 16).attributes == w.attributes(17)


def test_overrides_pin_one_attribute_and_keep_the_rest():
    w = World(4)
    base = w.sample(9)
    red = w.sample(9, colour="red")
    assert np.array_equal(red.mask, base.mask)  # same geometry
    assert {k: v for k, v in red.attributes.items() if k != "colour"} == \
        {k: v for k, v in base.attributes.items() if k != "colour"}
    night = w.sample(9, sky="night")
    assert night.attributes["backdrop"] == "sky" and "night sky" in night.caption
    assert np.array_equal(night.mask, base.mask)
    with pytest.raises(ValueError, match="unknown attribute 'hue'"):
        w.sample(0, hue="red")
    with pytest.raises(ValueError, match="colour='mauve' is not one of"):
        w.sample(0, colour="mauve")
    with pytest.raises(ValueError, match="conflicts"):
        w.sample(0, backdrop="wall", sky="dawn")
    with pytest.raises(ValueError, match="size must be an int >= 8"):
        w.sample(0, size=4)


@pytest.mark.parametrize("product", VOCAB["product"])
def test_products_stay_inside_their_declared_extents(product):
    """The renderer draws a product only inside its EXTENTS box; a shape spilling out would be cut off."""
    left, right, height, _ = products.EXTENTS[product]
    for mirror in (1, -1):
        geo = products._Placement(product, scale=0.25, cx=0.5, base=0.75, mirror=mirror, light=0.5)
        n = 1000
        y = ((np.arange(n, dtype=np.float32) + 0.5) / n)[:, None]
        inside, _ = products._draw_product(y.reshape(1, n), y, geo, np.float32([200, 40, 40]), "dotted")
        ys, xs = np.nonzero(inside)
        p = ((xs + 0.5) / n - 0.5) / 0.25
        q = (0.75 - (ys + 0.5) / n) / 0.25
        lo, hi = (left, right) if mirror > 0 else (right, left)
        assert -p.min() <= lo + 0.01 and p.max() <= hi + 0.01 and -0.01 <= q.min() and q.max() <= height + 0.01
        assert q.min() < 0.03  # and it stands on the floor


def test_sizes_render_the_same_scene():
    w = World(5)
    small, big = w.sample(8, 64), w.sample(8, 128)
    assert small.caption == big.caption and big.image.shape == (128, 128, 3)
    down = big.coverage.reshape(64, 2, 64, 2).mean((1, 3))
    assert np.abs(down - small.coverage).mean() < 0.02
    assert np.abs(np.asarray(big.pil().resize((64, 64)), float) - small.image).mean() < 12


def _nearest_centroid_accuracy(features, labels, scenes):
    """Fit class means on the scenes with even index, classify those with odd index."""
    features, labels = np.asarray(features, float), np.asarray(labels)
    train, test = np.asarray(scenes) % 2 == 0, np.asarray(scenes) % 2 == 1
    classes = sorted(set(labels))
    means = np.stack([features[train][labels[train] == c].mean(0) for c in classes])
    pred = np.array(classes)[((features[test][:, None] - means[None]) ** 2).sum(-1).argmin(1)]
    return (pred == labels[test]).mean()


def test_attributes_are_distinguishable_at_64px():
    """Even nearest-centroid on mean colours separates product colours, skies and floors at 64x64."""
    w = World(6)
    scenes = [i for i in range(8) for _ in VOCAB["colour"]]
    feats = []
    for i, c in zip(scenes, VOCAB["colour"] * 8):
        s = w.sample(i, colour=c, pattern="plain")
        feats.append(s.image[s.coverage == 1].mean(0))
    assert _nearest_centroid_accuracy(feats, VOCAB["colour"] * 8, scenes) >= 0.9
    scenes = [i for i in range(8) for _ in VOCAB["sky"]]
    feats = [w.sample(i, 32, sky=sky).image[:6].reshape(-1, 3).mean(0)  # the top of the sky
             for i, sky in zip(scenes, VOCAB["sky"] * 8)]
    assert _nearest_centroid_accuracy(feats, VOCAB["sky"] * 8, scenes) >= 0.95
    scenes = [i for i in range(8) for _ in VOCAB["floor"]]
    feats = []
    for i, floor in zip(scenes, VOCAB["floor"] * 8):
        bottom = w.sample(i, 32, floor=floor).image[-4:].reshape(-1, 3).astype(float)
        feats.append(np.concatenate([bottom.mean(0), bottom.std(0)]))
    assert _nearest_centroid_accuracy(feats, VOCAB["floor"] * 8, scenes) >= 0.9
