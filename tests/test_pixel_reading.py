"""Mutation-testing gaps in diffusion/pixels.py and diffusion/crop_paste.py: input
checks whose error messages a user relies on, and the paste-back / crop arithmetic that keeps pixels exact."""
import numpy as np
import pytest
import torch

from backdrop.diffusion import crop_paste as C
from backdrop.diffusion import pixels as P


@pytest.mark.parametrize("bad,words", [
    (np.full((8, 8, 3), 1.2, np.float32), ["[0, 1]", "1.2"]),  # a float just past white (P02)
    (np.zeros((0, 8, 3), np.uint8), ["no pixels"]),  # an empty crop (P05)
    (np.zeros((8, 8, 2), np.uint8), ["1, 3 or 4 channels"]),  # LA as numpy is no image (P10)
    ([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.float32)], ["mix dtypes"]),  # (P09)
])
def test_images_the_pixel_readers_refuse_are_named(bad, words):
    with pytest.raises(ValueError) as err:
        P.image_rows(bad)
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_bool_and_rgba_arrays_read_as_their_pixels():
    """A bool image is 0/255 (not 0/1: black), an RGBA array its RGB channels (not G, B, A). (P03, P11)"""
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (6, 5, 4), dtype=np.uint8)
    assert np.array_equal(P.image_to_uint8(rgba)[0], rgba[..., :3])
    assert np.array_equal(P.image_to_uint8(torch.from_numpy(rgba).permute(2, 0, 1))[0], rgba[..., :3])
    white = np.zeros((4, 4), bool)
    white[1:3, 1:3] = True
    got = P.image_to_uint8(white)[0]
    assert got.shape == (4, 4, 3) and set(np.unique(got)) == {0, 255} and got[1, 1].tolist() == [255, 255, 255]
    torch.testing.assert_close(P.image_to_tensor(white)[0, :, 1, 1], torch.ones(3))


def test_tensor_to_uint8_and_to_pil_edge_inputs():
    """An integer tensor is refused (it is no VAE output); a one-channel uint8 batch becomes mode-L images.
    (P17, P18)"""
    with pytest.raises(ValueError, match="expected a float tensor"):
        P.tensor_to_uint8(torch.zeros(1, 3, 4, 4, dtype=torch.uint8))
    grey = np.arange(16, dtype=np.uint8).reshape(1, 4, 4, 1)
    (im,) = P.to_pil(grey)
    assert im.mode == "L" and np.array_equal(np.asarray(im), grey[0, ..., 0])


def test_crop_box_refuses_a_fractional_pad():
    with pytest.raises(ValueError, match="pad must be a non-negative integer, got 1.5"):  # (C01)
        C.crop_box(torch.ones(1, 1, 8, 8), (8, 8), pad=1.5)


def test_crop_masks_max_keeps_a_thin_line_at_full_strength():
    """'max' is a covering resize: a 1-px repaint line shrunk 4x is a full-strength (1.0) row, not a faint 0.25 one
    the model would only partly repaint. (C07)"""
    m = torch.zeros(1, 1, 32, 32)
    m[..., 13, 4:28] = 1.0
    out = C.crop_masks(m, [(0, 0, 32, 32)], (8, 8))
    assert out.shape == (1, 1, 8, 8) and out[0, 0, 3, 1:7].eq(1).all() and out.sum() == out[0, 0, 3].sum()


def test_crop_masks_diffusers_mode_rounds_like_diffusers_and_keeps_the_dtype():
    """diffusers quantises a float mask for PIL with (m * 255).round() (numpy_to_pil): 0.999 is level 255 and
    100.6/255 level 101, not 254 and 100 (truncated). A box resized to its own size is that quantised mask; a
    float16 mask stays float16. (C08, C09)"""
    values = torch.tensor([0.999, 100.6 / 255, 0.3 / 255, 1.0]).repeat(16).view(1, 1, 8, 8)
    out = C.crop_masks(values, [(0, 0, 8, 8)], (8, 8), mode="diffusers")
    assert out[0, 0, 0, :4].mul(255).round().tolist() == [255.0, 101.0, 0.0, 255.0]
    assert C.crop_masks(values.half(), [(0, 0, 8, 8)], (8, 8), mode="diffusers").dtype == torch.float16
    assert C.crop_masks(values.half(), [(0, 0, 8, 8)], (8, 8), mode="max").dtype == torch.float16


def test_color_match_clips_rather_than_wraps():
    """A generation 60 levels darker than the photo where kept is lifted by 60: its near-white repainted pixels
    saturate at 255 (they wrapped round to near black). (C13)"""
    rng = np.random.default_rng(1)
    img = rng.integers(100, 200, (1, 32, 32, 3)).astype(np.uint8)
    gen = (img.astype(int) - 60).astype(np.uint8)
    gen[0, 8:16, 8:16] = 250  # repainted: a bright highlight
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:16, 8:16] = 1
    out = C.color_match(gen, img, mask)
    assert out[0, 8:16, 8:16].min() == 255
    assert np.abs(out[0][mask[0, 0].numpy() == 0].astype(int) - img[0][mask[0, 0].numpy() == 0]).max() <= 1


def test_paste_back_refuses_a_blend_of_another_batch():
    img = np.zeros((2, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match=r"blend is 8x8 \(HxW, batch 1\) but the image is 8x8 \(batch 2\)"):  # (C18)
        C.paste_back(img, img, torch.ones(1, 1, 8, 8))


def test_composite_feathers_with_mask_blur():
    """mask_blur feathers the inside of the mask's edge (kept pixels stay exact): there are blended levels, and none
    without it. (C20)"""
    img, gen = np.zeros((1, 32, 32, 3), np.uint8), np.full((1, 32, 32, 3), 255, np.uint8)
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    hard = C.composite(img, gen, mask, mask_blur=0.0)
    soft = C.composite(img, gen, mask, mask_blur=2.0)
    assert set(np.unique(hard)) == {0, 255}
    inside = soft[0, 8:24, 8:24]
    assert ((inside > 0) & (inside < 255)).any() and inside[8, 8].tolist() == [255] * 3  # edge soft, core full
    assert (soft[0][mask[0, 0].numpy() == 0] == 0).all()


def test_paste_back_reads_rgba_batches_as_rgb():
    """A uint8 RGBA batch (an RGBA product photo as numpy) is read as its RGB, as any other input is. (C22)"""
    rng = np.random.default_rng(2)
    rgba = rng.integers(0, 256, (1, 8, 8, 4), dtype=np.uint8)
    gen = rng.integers(0, 256, (1, 8, 8, 3), dtype=np.uint8)
    blend = torch.zeros(1, 1, 8, 8)
    blend[..., :4] = 1
    out = C.paste_back(rgba, gen, blend)
    assert out.shape == (1, 8, 8, 3)
    assert np.array_equal(out[0, :, 4:], rgba[0, :, 4:, :3]) and np.array_equal(out[0, :, :4], gen[0, :, :4])


def test_a_list_of_masks_of_two_sizes_is_refused():
    img = np.zeros((2, 16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match=r"one size.*\(1, 1, 16, 16\), \(1, 1, 16, 15\)"):  # (C23)
        C.composite(img, img, [torch.ones(1, 1, 16, 16), torch.ones(1, 1, 16, 15)])
