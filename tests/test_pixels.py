"""Photos shared between the items of a call: pixels.image_rows reads an image given for several items once and
hands every such item the same array, and the paste-back end (crop_paste) takes those rows and per-item masks as
they are, with the results of the stacked batch. At 4096x3072, n copies of the photo and of its float mask were
most of a batched call's memory beside the model (benchmarks/photo.py)."""
import numpy as np
import pytest
import torch
from PIL import Image

from backdrop.diffusion import crop_paste as C
from backdrop.diffusion import masks as M
from backdrop.diffusion import pixels as P

from pipeline_helpers import images, rect_masks


def test_image_rows_share_one_array_per_image_given():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 256, (2, 24, 40, 3), dtype=np.uint8)
    rows = P.image_rows([a, b, a])
    assert rows[0] is rows[2] and rows[0] is not rows[1]
    assert np.array_equal(np.stack(rows), P.image_to_uint8([a, b, a])) and np.array_equal(rows[1], b)
    f = a.astype(np.float32) / 255  # floats: converted once too, rounded as tensor_to_uint8
    frows = P.image_rows([f, f])
    assert frows[0] is frows[1] and np.array_equal(frows[0], a)
    pil = Image.fromarray(a).convert("RGBA")  # PIL: converted once, alpha dropped
    prow = P.image_rows([pil] * 3)
    assert prow[0] is prow[2] and np.array_equal(prow[0], a)
    assert not any(np.shares_memory(r, s) for r, s in zip(P.image_rows(np.stack([a, a])), [b, b]))


def test_image_rows_name_the_item_at_fault():
    good = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match=r"image\[2\].*got shape \(8, 8, 5\)"):
        P.image_rows([good, good, np.zeros((8, 8, 5), np.uint8)])
    with pytest.raises(ValueError, match="item 1 is 8x9"):
        P.image_rows([good, np.zeros((8, 9, 3), np.uint8)])


@pytest.mark.parametrize("crop", [False, True])
@pytest.mark.parametrize("match", [False, True])
def test_paste_back_on_shared_rows_equals_the_stacked_batch(crop, match):
    ims, ms = images(2, seed=3), rect_masks(2, seed=3)
    rows = P.image_rows([ims[0], ims[1], ims[0]])  # items 0 and 2: one photo, one mask
    masks = [M.to_repaint_mask(mask=m) for m in ms]
    shared = [masks[0], masks[1], masks[0]]  # (1, 1, H, W) each
    batch = torch.cat(shared)  # (3, 1, H, W)
    boxes = [(8, 8, 40, 40), (0, 16, 32, 48), (8, 8, 40, 40)] if crop else None
    size = (32, 32) if crop else (64, 64)
    gen = np.random.default_rng(1).integers(0, 256, (3, *size, 3), dtype=np.uint8)
    want = C.composite(np.stack(rows), gen, batch, boxes=boxes, mask_blur=2.0, match_color=match)
    got = C.composite(rows, gen, shared, boxes=boxes, mask_blur=2.0, match_color=match)
    assert np.array_equal(got, want)
    full = C.uncrop(rows, gen, boxes) if crop else gen
    assert np.array_equal(C.color_match(full, rows, shared, boxes), C.color_match(full, np.stack(rows), batch, boxes))
    assert np.array_equal(C.crop_images(rows, [(8, 8, 40, 40)] * 3, (16, 16)),
                          C.crop_images(np.stack(rows), [(8, 8, 40, 40)] * 3, (16, 16)))


def test_a_list_of_masks_is_checked_item_by_item():
    img, gen = np.zeros((2, 16, 16, 3), np.uint8), np.zeros((2, 16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match=r"mask\[1\]: expected a float tensor"):
        C.composite(img, gen, [torch.ones(1, 1, 16, 16), np.ones((16, 16))])
    with pytest.raises(ValueError, match=r"\(1, 1, H, W\) tensors of one size.*\(2, 1, 16, 16\)"):
        C.composite(img, gen, [torch.ones(1, 1, 16, 16), torch.ones(2, 1, 16, 16)])
    with pytest.raises(ValueError, match="2 images, 2 generated, 1 masks"):
        C.composite(img, gen, [torch.ones(1, 1, 16, 16)])


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("crop_padding", [None, 8])
def test_inpaint_hands_paste_back_one_photo_and_mask_per_distinct_item(models, monkeypatch, crop_padding):
    """A photo inpainted n times reaches the paste-back as one array and one mask, not n copies of each."""
    pipe, seen = models["sd1-inpaint"].pipe, []
    composite = C.composite
    monkeypatch.setattr(C, "composite", lambda img, gen, mask, **kw: (seen.append((img, mask)),
                                                                      composite(img, gen, mask, **kw))[1])
    (a, b), (ma, mb) = images(2, seed=6), rect_masks(2, seed=6)
    out = pipe.inpaint([a, b, a], mask=[ma, mb, ma], prompt="x", seed=[1, 2, 3], steps=1,
                       crop_padding=crop_padding, progress=False, output_type="np").images
    (img, mask), = seen
    assert img[0] is img[2] and img[0] is not img[1] and mask[0] is mask[2] and mask[0] is not mask[1]
    alone = pipe.inpaint(a.copy(), mask=ma.copy(), prompt="x", seed=3, steps=1, crop_padding=crop_padding,
                         progress=False, output_type="np").images
    assert np.array_equal(out[2], alone[0])
