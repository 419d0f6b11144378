"""What a Pipeline call hands back for batches of several inputs with k outputs each (diffusion/output.py): each
output carries the ICC profile of the input it was made from, and in a batch that mixes repainted items with items
that have nothing to repaint, the repainted ones are bit-identical to the same call without the others (the PIL ->
float -> PIL round trip that merges them is exact)."""
import numpy as np
import pytest
from PIL import Image, ImageCms

from pipeline_helpers import images, rect_masks

pytestmark = [pytest.mark.usefixtures("one_thread"),  # conftest.py
              pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                         "ignore::UserWarning")]

SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
OTHER_RGB = SRGB[:64] + (1).to_bytes(4, "big") + SRGB[68:]  # another RGB profile: rendering intent (ICC 7.2.15) 1


def _inputs():
    """Three photos (sRGB, no profile, another RGB profile) and their masks; the second has nothing to repaint."""
    photos = images(3, seed=3)
    photos[0].info["icc_profile"], photos[2].info["icc_profile"] = SRGB, OTHER_RGB
    masks = rect_masks(3, seed=3)
    return photos, masks, [masks[0], Image.new("L", (64, 64), 0), masks[2]]


def test_each_output_carries_the_profile_of_its_own_input(serve_pipe):
    """Input i's k outputs are items i*k .. i*k + k - 1 (num_images_per_prompt, the CLI's --n): each gets input i's
    profile, so the kept product looks the same as in its photo in a colour-managed viewer."""
    photos, masks, mixed = _inputs()
    want = [SRGB, SRGB, None, None, OTHER_RGB, OTHER_RGB]
    for kind, kwargs in (("inpaint", {"mask": masks}), ("inpaint", {"mask": mixed}), ("img2img", {})):
        out = getattr(serve_pipe, kind)(photos, prompt="x", steps=2, seed=[10, 20, 30], num_images_per_prompt=2,
                                        progress=False, **kwargs)
        assert [im.info.get("icc_profile") for im in out.images] == want, kind


@pytest.mark.parametrize("output_type", ["pil", "np"])
def test_repainted_items_of_a_mixed_batch_equal_the_call_without_the_unchanged_ones(serve_pipe, output_type):
    """Inputs [A, B, C] x 2 with B's mask empty: B's outputs are B itself, and A's and C's are exactly those of the
    call on [A, C] with the same seeds (the same 4-item batch reaches the model either way)."""
    photos, _, mixed = _inputs()
    out = serve_pipe.inpaint(photos, mixed, prompt="x", steps=2, seed=[10, 20, 30], num_images_per_prompt=2,
                             progress=False, output_type=output_type)
    alone = serve_pipe.inpaint([photos[0], photos[2]], [mixed[0], mixed[2]], prompt="x", steps=2, seed=[10, 30],
                               num_images_per_prompt=2, progress=False, output_type=output_type)
    u8 = lambda ims: (np.stack([np.asarray(im) for im in ims]) if output_type == "pil"  # noqa: E731
                      else (np.asarray(ims) * 255).round().astype(np.uint8))
    got, ref = u8(out.images), u8(alone.images)  # (6, 64, 64, 3), (4, 64, 64, 3)
    assert out.unchanged == [2, 3] and out.seeds == [10, 11, 20, 21, 30, 31]
    assert np.array_equal(got[2], np.asarray(photos[1])) and np.array_equal(got[3], np.asarray(photos[1]))
    assert np.array_equal(got[[0, 1, 4, 5]], ref)
    assert np.abs(ref.astype(int) - np.asarray(photos[0])).max() > 10  # A was repainted
    if output_type == "np":
        np.testing.assert_array_equal(np.asarray(out.images)[[0, 1, 4, 5]], np.asarray(alone.images))
