"""Mutation-testing gaps in diffusion/masks.py: how colour masks and painted layers
with transparency are read, and the inverted-product-mask check on the image border."""
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from backdrop.diffusion import masks as M


def _layer(luma: np.ndarray, alpha: np.ndarray) -> Image.Image:
    return Image.fromarray(np.dstack([luma] * 3 + [alpha]).astype(np.uint8), "RGBA")


def test_a_colour_mask_is_read_by_its_luma_as_diffusers():
    """A green-on-black mask (a labelling tool's class colour) is its luma, convert("L") (green 255 -> 150), not its
    red channel (which is empty). (M08)"""
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[2:6, 2:6] = (0, 255, 0)
    want = np.asarray(Image.fromarray(rgb).convert("L")).astype(np.float32) / 255
    assert want.max() == pytest.approx(150 / 255)
    for given in (rgb, Image.fromarray(rgb)):
        assert torch.equal(M.to_repaint_mask(mask=given)[0, 0], torch.from_numpy(want))


def test_a_painted_layer_is_flattened_over_black_with_rounding():
    """Its semi-transparent edge: luma * alpha / 255 rounded to nearest (250 at alpha 127 is 124.5 -> 125). (M09)"""
    luma = np.full((8, 8), 255, np.uint8)
    alpha = np.zeros((8, 8), np.uint8)
    alpha[2:6, 2:6] = 255
    luma[1, :], alpha[1, :] = 250, 127  # an anti-aliased edge row
    got = M.read_mask(_layer(luma, alpha), kind="mask")
    want = np.rint(luma.astype(np.float64) * alpha / 255).astype(np.uint8)
    assert got[1, 0] == 125 and np.array_equal(got, want)


def test_a_soft_edged_layer_is_a_layer_and_a_greyish_picture_is_a_picture():
    """Only the opaque pixels (alpha >= 1/2) say whether a layer is painted black and white: a wide faint grey halo
    (alpha 20) is no picture (M10); a picture with 20% grey opaque pixels is one, refused as a repaint mask (M11)."""
    alpha = np.zeros((20, 20), np.uint8)
    alpha[5:15, 5:15] = 255
    luma = np.full((20, 20), 128, np.uint8)  # grey where (nearly) transparent
    luma[5:15, 5:15] = 255
    alpha[alpha == 0] = 20  # a faint halo over most of the layer
    m = M.to_repaint_mask(mask=_layer(luma, alpha))
    assert m[0, 0, 10, 10] == 1 and m[0, 0, 0, 0] == pytest.approx(round(128 * 20 / 255) / 255)
    picture = np.where(np.arange(400).reshape(20, 20) % 5 == 0, 128, 255).astype(np.uint8)  # 20% grey
    opaque = np.full((20, 20), 255, np.uint8)
    opaque[:, :4] = 0
    with pytest.raises(ValueError, match="picture, not black and white"):
        M.to_repaint_mask(mask=_layer(picture, opaque))


def test_border_share_counts_all_four_edges(caplog):
    """A product mask white down its left and right edges (a backdrop mask of a centred product, inverted) is
    warned about like one white along the top and bottom. (M04)"""
    a = np.zeros((10, 10), np.uint8)
    a[:, 0] = a[:, -1] = 255
    assert M.border_share(a) == pytest.approx(20 / 36)
    assert M.border_share(a.T) == pytest.approx(20 / 36)
    with caplog.at_level(logging.WARNING, logger="backdrop.diffusion.masks"):
        M.to_repaint_mask(product_mask=a)
    assert "white on 56% of its border" in caplog.text


def test_size_helpers_refuse_at_the_boundary():
    """Reflect padding needs pad < size (4 rows padded by 4 is torch's RuntimeError, said as ours) (M16); crop_to
    refuses a target larger than the tensor instead of returning less (M17)."""
    with pytest.raises(ValueError, match="4x4 .* too small to reflect-pad to 8x8; use 'replicate'"):
        M.pad_to_multiple(torch.zeros(1, 3, 4, 4))
    assert M.pad_to_multiple(torch.zeros(1, 3, 4, 4), mode="replicate").shape == (1, 3, 8, 8)
    with pytest.raises(ValueError, match=r"crop_to: 8x8 \(HxW\) is smaller than the target 9x8"):
        M.crop_to(torch.zeros(1, 3, 8, 8), (9, 8))


def test_half_a_mask_is_repainted_as_diffusers_binarises_it():
    """A float mask at exactly 0.5: diffusers' binarize (>= 0.5) makes it 1 in the latent mask (M20), and its
    masked image zeroes it (image * (mask < 0.5)) (M21)."""
    half = torch.full((1, 1, 16, 16), 0.5)
    assert M.latent_mask(half, mode="diffusers").eq(1).all()
    assert M.masked_image(torch.ones(1, 3, 16, 16), half).eq(0).all()


def test_default_mask_blur_by_convention():
    """A product's silhouette and a cut-out's alpha are not feathered (a band of the old backdrop showed); a
    brush mask is. (M25)"""
    assert (M.default_mask_blur("mask"), M.default_mask_blur("product_mask"), M.default_mask_blur("image")) == \
        (4.0, 0.0, 0.0)


def test_alpha_is_found_in_la_arrays_and_at_254():
    """An LA numpy array or a 2-channel tensor has alpha (M26); one pixel at alpha 254 is transparency (M27)."""
    la = np.full((4, 4, 2), 255, np.uint8)
    assert M.has_alpha(la) and M.has_alpha(torch.from_numpy(la).permute(2, 0, 1))
    assert not M.has_transparency(la)
    la[0, 0, 1] = 254
    assert M.has_transparency(la)
    assert M.convention(None, None, la) == ("image", None)


def test_an_integer_mask_tensor_is_refused_by_name():
    with pytest.raises(ValueError, match=r"mask: expected a float tensor \(B, 1, H, W\)"):  # (M29)
        M.dilate(torch.ones(1, 1, 4, 4, dtype=torch.uint8), 1)
