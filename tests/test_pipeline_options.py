"""Inpaint options whose effect the parity tests leave open (they run with diffusers' settings), each checked against
what it stands for (mutation testing found a change to any of them went unnoticed): mask_dilate grows the model's
mask by latent cells (8 px each), color_match acts without paste-back too, and a 9-channel inpainting UNet asked for
generate sees a full mask (repaint everything) over the grey image."""
import numpy as np
import pytest
import torch

from backdrop.diffusion import crop_paste as C
from backdrop.diffusion import masks as M
from backdrop.diffusion import pixels as P

from pipeline_helpers import images, rect_masks

pytestmark = pytest.mark.usefixtures("one_thread")
KW = dict(prompt="x", progress=False)


def test_mask_dilate_grows_the_models_mask_by_latent_cells(models):
    pipe = models["sd1"].pipe
    image, mask = images(1, seed=5), rect_masks(1, seed=5, soft=False)
    grown = (M.dilate(M.to_repaint_mask(mask=mask), 8)[0, 0].numpy() * 255).astype(np.uint8)  # one cell: 8 px
    one = pipe.inpaint(image, mask, mask_dilate=1, seed=3, steps=3, output_type="latent", **KW).images
    assert torch.allclose(one, pipe.inpaint(image, grown, mask_dilate=0, seed=3, steps=3, output_type="latent",
                                            **KW).images, atol=1e-6)


def test_color_match_acts_without_paste_back(models):
    pipe = models["sd1"].pipe
    image, mask = images(1, seed=2)[0], rect_masks(1, seed=2)[0]
    kw = dict(seed=1, steps=2, paste_back=False, output_type="np", **KW)
    raw = pipe.inpaint(image, mask, color_match=False, **kw).images
    got = pipe.inpaint(image, mask, color_match=True, **kw).images
    want = C.color_match((raw * 255).round().astype(np.uint8), P.image_to_uint8(image), M.to_repaint_mask(mask=mask))
    assert np.array_equal((got * 255).round().astype(np.uint8), want) and not np.array_equal(got, raw)


def test_a_nine_channel_unet_asked_to_generate_sees_a_full_mask(models):
    pipe = models["sd1-inpaint"].pipe
    seen, unet = [], pipe.backend.unet
    pipe.backend.unet = lambda x, t, c: (seen.append(x[:, 4].clone()), unet(x, t, c))[1]  # channel 4: the mask
    try:
        pipe.generate("x", seed=4, steps=1, output_type="latent", progress=False)
    finally:
        del pipe.backend.unet  # the class's method again
    assert seen and all(bool((s == 1).all()) for s in seen)


@pytest.mark.parametrize("crop_padding", [None, 8])
def test_one_image_and_mask_for_many_items_is_prepared_once_with_the_same_images(models, crop_padding):
    """The CLI's --n passes one photo and mask object n times: its mask work (read, dilate, crop, feather) is done
    once, and each image equals the one made from separate copies."""
    pipe = models["sd1-inpaint"].pipe
    image, mask = images(1, seed=6)[0], rect_masks(1, seed=6)[0]
    kw = dict(prompt="x", seed=[1, 2, 3], steps=2, crop_padding=crop_padding, mask_blur=2, output_type="np",
              progress=False)
    shared = pipe.inpaint([image] * 3, mask=[mask] * 3, **kw).images
    copies = pipe.inpaint([image.copy() for _ in range(3)], mask=[mask.copy() for _ in range(3)], **kw).images
    assert np.array_equal(shared, copies) and not np.array_equal(shared[0], shared[1])
