"""What training data and its latent cache promise beyond "the loss goes down": a cache made by another text encoder
or from a folder edited in place is named, a cache's product latents are the product-kept image's and reach the UNet
scaled as the pixels' do, a data position survives two changes of process count and refuses another seed, random
flips mirror about half the items, and the synthetic world stays the world that evaluations and saved classifiers
were made on."""
import os

import numpy as np
import pytest
import torch

from backdrop.nn.checkpoint import init_model
from backdrop.train.cache import LatentCache, build_cache
from backdrop.train.data import DataStream, SyntheticDataset, collate, make_dataset
from backdrop.train.image_folder import ImageFolder
from backdrop.train.stages.inpaint import InpaintStage
from backdrop.train.synthetic import World
from test_data import _picture
from test_stages import randomize_

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


# ------------------------------------------------------------------------------ the latent cache

def test_a_cache_made_with_another_text_encoder_is_refused(tmp_path):
    """The contexts are the text encoder's outputs: after `train clip` (which fine-tunes only the text encoder) the
    VAE is the same, so only the text encoder's fingerprint can refuse the stale contexts."""
    model = init_model("tiny", seed=0)
    cache = LatentCache(build_cache(model, make_dataset("synthetic:2", 64), tmp_path / "c", progress=False))
    other = init_model("tiny", seed=0)
    with torch.no_grad():
        other.text_encoder.text_model.final_layer_norm.weight.mul_(2)  # a fine-tuned text encoder, the same VAE
    cache.check(model, 64)
    with pytest.raises(ValueError, match="made with a different text encoder than the model being trained"):
        cache.check(other, 64)


def test_a_caption_edited_in_place_to_the_same_length_is_a_change(tmp_path):
    """A caption rewritten from "a red mug" to "a tan mug": the file count and sizes are unchanged; only the
    modification time tells, and a cache that missed it would train on the old caption's contexts."""
    folder = tmp_path / "data"
    folder.mkdir()
    for k in range(2):
        _picture(16, 16, (2, 2, 8 + k, 8))[0].save(folder / f"{k}.png")
        (folder / f"{k}.txt").write_text("a red mug")
    out = build_cache(init_model("tiny", seed=0), ImageFolder(folder, 16), tmp_path / "cache", batch_size=2,
                      source=str(folder), progress=False)
    assert LatentCache(out).source_changed() is None
    then = (folder / "1.txt").stat()
    (folder / "1.txt").write_text("a tan mug")
    os.utime(folder / "1.txt", ns=(then.st_atime_ns, then.st_mtime_ns + 5_000_000_000))  # saved 5 s later
    assert (folder / "1.txt").stat().st_size == then.st_size
    assert "which has changed since (4 files then, 4 now, or files modified)" in LatentCache(out).source_changed()


def test_cached_product_latents_are_the_product_kept_image_encoded_by_diffusers(tmp_path):
    """product_latents are what `inpaint --masks product` feeds the UNet for an item that keeps its product:
    the posterior mean of image * product (the backdrop grey), here from diffusers' AutoencoderKL with the same
    weights."""
    import diffusers

    model = init_model("tiny", seed=0)
    randomize_(model.vae, 1)
    data = make_dataset("synthetic:3", 64)
    cache = LatentCache(build_cache(model, data, tmp_path / "c", batch_size=2, progress=False))
    batch = collate([data[i] for i in range(3)])
    ref = diffusers.AutoencoderKL.from_config(model.config.vae.to_diffusers())
    ref.load_state_dict(model.vae.state_dict(), strict=True)
    with torch.no_grad():
        want = ref.encode(batch["image"] * batch["mask"]).latent_dist.mean  # (3, 4, 8, 8): the product kept
        greyed = ref.encode(batch["image"] * (1 - batch["mask"])).latent_dist.mean
    got = torch.stack([cache[i]["product_latents"] for i in range(3)])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (got - greyed).abs().max() > 0.1  # the two sides of the mask are told apart


def test_inpaint_from_a_cache_feeds_the_unet_what_the_pixels_do(tmp_path):
    """The 9 input channels of inpaint --masks product: from a --no-images cache (noisy latents from the cached
    moments, the cached product latents times the scaling factor) and from the images themselves, the same batch and
    draws. The existing loss comparison cannot see channels 5-8: to_inpaint_unet zero-initialises their weights."""
    model = init_model("tiny", seed=0)
    randomize_(model.vae, 1)
    data = make_dataset("synthetic:6", 64)
    cache = LatentCache(build_cache(model, data, tmp_path / "c", batch_size=4, images=False, progress=False))
    stage = InpaintStage(model, masks="product", product_prob=1.0)
    seen = []

    def unet(x, t, ctx):
        seen.append(x)
        return x[:, :4]

    pixels, cached = next(DataStream(data, 6, seed=3)), next(DataStream(cache, 6, seed=3))
    assert "image" not in cached and torch.equal(pixels["index"], cached["index"])
    with torch.no_grad():
        for batch in (pixels, cached):
            stage.loss(unet, batch, torch.Generator().manual_seed(11))
    assert seen[0].shape == (6, 9, 8, 8)
    assert seen[0][:, 5:].abs().mean() > 0.01  # masked-image latents that are not all zero
    torch.testing.assert_close(seen[1], seen[0], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ the data stream

def test_two_changes_of_process_count_keep_the_single_stream_order():
    """2 ranks take 20 items, 1 rank continues and takes 5, then 2 ranks continue again: the third run's ranks
    take up the single-process stream at item 25, striding over it (the oracle: one uninterrupted stream)."""
    n = 12  # 2 divides it: the hand-overs are exact
    data = SyntheticDataset(n, 8)
    straight = DataStream(data, 1, seed=4)
    single = [int(next(straight)["index"]) for _ in range(3 * n)]  # epochs 0, 1 and 2
    first = [DataStream(data, 1, seed=4, rank=r, world_size=2) for r in range(2)]
    for s in first:
        for _ in range(10):
            next(s)
    second = DataStream(data, 1, seed=4)
    assert second.continue_from([s.state_dict() for s in first]) == 20
    assert [int(next(second)["index"]) for _ in range(5)] == single[20:25]
    third = [DataStream(data, 1, seed=4, rank=r, world_size=2) for r in range(2)]
    assert {s.continue_from([second.state_dict()]) for s in third} == {25}
    for r, s in enumerate(third):  # rank r takes items 25 + r, 27 + r, ... up to the end of epoch 2
        want = single[25 + r::2]
        assert [int(next(s)["index"]) for _ in want] == want, r


def test_a_saved_position_is_refused_by_a_stream_of_another_seed():
    """`train --resume` with another --seed: the saved position is one in the seed-1 order; walking the seed-2
    order from there would repeat some items and skip others."""
    data = SyntheticDataset(10, 8)
    a = DataStream(data, 1, seed=1)
    for _ in range(4):
        next(a)
    with pytest.raises(ValueError, match="saved data position is for seed=1, this stream has seed=2"):
        DataStream(data, 1, seed=2).load_state_dict(a.state_dict())
    same = DataStream(data, 1, seed=1)
    same.load_state_dict(a.state_dict())
    assert int(next(same)["index"]) == int(next(a)["index"])


# ------------------------------------------------------------------------------ flips

def test_random_flips_mirror_about_half_the_items_and_vary_by_epoch(tmp_path):
    """flip=True is a coin per (seed, epoch, index), not a fixed mirror: over 20 items x 10 epochs about half
    are mirrored, and each item is seen both ways."""
    for i in range(20):
        _picture(16, 16, (0, 0, 4, 16))[0].save(tmp_path / f"{i}.png")  # a white stripe at the left edge
        (tmp_path / f"{i}.txt").write_text("x")
    mirrored = lambda ds, i, e: bool(ds[(i, e)]["image"][0, 0, -1] > 0)  # noqa: E731 - the stripe is at the right
    ds = ImageFolder(tmp_path, 16, flip=True)
    seen = np.array([[mirrored(ds, i, e) for e in range(10)] for i in range(20)])  # (items, epochs)
    assert 0.35 < seen.mean() < 0.65, seen.mean()
    assert seen.any(1).sum() >= 18 and (~seen).any(1).sum() >= 18, seen  # items go both ways across epochs
    plain = ImageFolder(tmp_path, 16)
    assert not any(mirrored(plain, i, e) for i in range(20) for e in range(3))


# ------------------------------------------------------------------------------ the synthetic world

# World(seed).sample(i, 32): caption, mask (pixel count, rows, columns) and mean colour, pinned. Held-out evaluation
# scenes, fitted classifier files and the model card's numbers are made on this world: a change to its draws keeps
# it deterministic (every other test passes) but changes every scene. Pixels are pinned by their means (within 0.05
# of a level: one pixel one level off moves a mean by 0.001), not a hash: numpy's float32 sin and exp may differ in
# the last bit between CPUs, which may move a texture pixel by a level.
GOLDEN = {
    (0, 0): ("a pink striped bowl on a marble counter in front of a plain white wall",
             122, (16, 24, 9, 26), (219.40, 212.18, 210.15)),
    (0, 1): ("a brown dotted lamp placed on the grass with a gray brick wall in the background",
             59, (16, 27, 9, 17), (96.55, 130.28, 86.44)),
    (0, 2): ("a photo of a plain red candle standing on checkered tiles, a plain mustard wall behind it",
             90, (11, 27, 14, 19), (180.09, 149.53, 92.64)),
    (5, 0): ("a plain black shoe placed on the sand with a plain terracotta wall in the background",
             135, (20, 28, 5, 24), (187.57, 138.00, 103.31)),
    (5, 2): ("a photo of a yellow dotted teapot standing on checkered tiles, a navy brick wall behind it",
             177, (12, 26, 5, 25), (103.16, 105.21, 109.21)),
}


@pytest.mark.parametrize("seed,index", list(GOLDEN))
def test_the_synthetic_world_is_pinned(seed, index):
    caption, area, box, mean = GOLDEN[(seed, index)]
    s = World(seed).sample(index, 32)
    ys, xs = np.nonzero(s.mask)
    assert s.caption == caption
    assert (int(s.mask.sum()), (ys.min(), ys.max(), xs.min(), xs.max())) == (area, box)
    np.testing.assert_allclose(s.image.reshape(-1, 3).mean(0), mean, atol=0.05)


def test_products_face_either_way():
    """A mug's handle is on the right unless the scene mirrors it (handles, spouts and toes face either way):
    about half of 100 scenes. The handle's side is read from the mask: the bounding box's centre lies on the
    handle's side of the body's (mass) centre."""
    w = World(0)
    right = []
    for i in range(100):
        ys, xs = np.nonzero(w.sample(i, 32, product="mug").mask)
        right.append((xs.min() + xs.max()) / 2 > xs.mean())
    assert 0.3 < np.mean(right) < 0.7, np.mean(right)

