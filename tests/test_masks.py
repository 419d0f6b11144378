"""diffusion/masks.py and crop_paste.py: mask conventions agree, paste-back keeps kept pixels bit-identical under
every option, and the diffusers-convention paths (preprocess, postprocess, mask latents, crop box, crop + overlay)
equal diffusers' own VaeImageProcessor / StableDiffusionInpaintPipeline code on the same inputs."""
import io
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from backdrop.diffusion import crop_paste as C
from backdrop.diffusion import masks as M
from backdrop.diffusion import pixels as P

ODD = [(67, 45), (333, 517)]  # not multiples of 8, portrait and landscape


def random_mask(rng, h, w, soft=True):
    """uint8 (h, w): a few rectangles of 255 with soft random edges; never empty, never full."""
    m = np.zeros((h, w), np.uint8)
    for _ in range(rng.integers(1, 4)):
        y, x = rng.integers(0, h - 2), rng.integers(0, w - 2)
        m[y:y + rng.integers(2, max(3, h // 2)), x:x + rng.integers(2, max(3, w // 2))] = 255
    if soft:  # an anti-aliased rim: random levels where a dilated copy of the mask reaches
        rim = (M.dilate(torch.from_numpy(m).float()[None, None], 2)[0, 0].numpy() > 0) & (m == 0)
        m[rim] = rng.integers(1, 255, rim.sum())
    m[0, 0] = 0
    return m


def random_image(rng, h, w):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def vae_processors():
    from diffusers.image_processor import VaeImageProcessor

    # exactly what StableDiffusionInpaintPipeline.__init__ builds (diffusers 0.42)
    image_proc = VaeImageProcessor(vae_scale_factor=8)
    mask_proc = VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    return image_proc, mask_proc


# ----------------------------------------------------------------------------------------------- conventions

@pytest.mark.parametrize("h,w,seed", [(67, 45, 0), (67, 45, 1), (67, 45, 2), (333, 517, 3)])
def test_conventions_agree(h, w, seed):
    rng = np.random.default_rng(seed)
    m = random_mask(rng, h, w)
    rgb = random_image(rng, h, w)
    sd = M.to_repaint_mask(mask=Image.fromarray(m))
    assert sd.shape == (1, 1, h, w) and sd.dtype == torch.float32
    assert torch.equal(sd[0, 0], torch.from_numpy(m.astype(np.float32) / 255))
    rgba = np.dstack([rgb, 255 - m])  # OpenAI: alpha 0 = edit
    same = {
        "product L": M.to_repaint_mask(product_mask=Image.fromarray(255 - m)),
        "product RGB": M.to_repaint_mask(product_mask=Image.fromarray(np.dstack([255 - m] * 3))),
        "product P": M.to_repaint_mask(product_mask=Image.fromarray(255 - m).convert("P")),
        "alpha RGBA image": M.to_repaint_mask(image=Image.fromarray(rgba, "RGBA")),
        "alpha LA mask png": M.to_repaint_mask(image=Image.fromarray(rgba).convert("LA")),
        "alpha numpy": M.to_repaint_mask(image=rgba),
        "alpha tensor": M.to_repaint_mask(image=torch.from_numpy(rgba).permute(2, 0, 1)),
        "sd RGB": M.to_repaint_mask(mask=Image.fromarray(np.dstack([m] * 3))),
        "sd numpy": M.to_repaint_mask(mask=m),
        "sd numpy HW1": M.to_repaint_mask(mask=m[..., None]),
        "sd tensor": M.to_repaint_mask(mask=torch.from_numpy(m)),
        "sd tensor B1HW": M.to_repaint_mask(mask=torch.from_numpy(m)[None, None]),
    }
    for name, got in same.items():
        assert torch.equal(got, sd), name  # bit-identical: inversion happens in the uint8 domain
    for name, got in {"product float": M.to_repaint_mask(product_mask=1 - m / 255),
                      "sd float tensor": M.to_repaint_mask(mask=torch.from_numpy(m / 255))}.items():
        torch.testing.assert_close(got, sd, atol=1e-7, rtol=0, msg=name)

    binary = np.where(m >= 128, 255, 0).astype(np.uint8)  # binary masks: SD white == product black == alpha 0
    alpha_zero = torch.from_numpy(np.dstack([rgb, 255 - binary])[..., 3] == 0).float()[None, None]
    assert torch.equal(M.to_repaint_mask(mask=m, threshold=0.5), alpha_zero)
    assert torch.equal(M.to_repaint_mask(image=np.dstack([rgb, 255 - binary])), alpha_zero)
    assert torch.equal(M.to_repaint_mask(product_mask=Image.fromarray(255 - binary).convert("1")), alpha_zero)
    assert torch.equal(M.to_repaint_mask(product_mask=binary == 0), alpha_zero)  # bool
    keyed = Image.fromarray(255 - binary)
    keyed.info["transparency"] = 0  # a colour-keyed PNG: value 0 is transparent
    assert torch.equal(M.to_repaint_mask(image=keyed), alpha_zero)
    torch.testing.assert_close(M.invert(M.invert(sd)), sd, atol=1e-7, rtol=0)  # float: 1 - (1 - x) rounds
    assert torch.equal(M.invert(alpha_zero), 1 - alpha_zero)


def test_batches_of_masks_and_images():
    rng = np.random.default_rng(7)
    ms = [random_mask(rng, 45, 67) for _ in range(3)]
    ims = [random_image(rng, 45, 67) for _ in range(3)]
    batch = M.to_repaint_mask(mask=[Image.fromarray(m) for m in ms])
    assert batch.shape == (3, 1, 45, 67)
    for i, m in enumerate(ms):
        assert torch.equal(batch[i:i + 1], M.to_repaint_mask(mask=m))
    assert torch.equal(M.to_repaint_mask(mask=np.stack(ms)[..., None]), batch)  # (B, H, W, 1)
    x = P.image_to_tensor([Image.fromarray(i) for i in ims])
    assert x.shape == (3, 3, 45, 67) and torch.equal(x, P.image_to_tensor(np.stack(ims)))
    assert np.array_equal(P.image_to_uint8(x.add(1).div(2)), np.stack(ims))  # [0, 1] tensors round back exactly
    gens = np.stack([random_image(rng, 32, 32) for _ in range(3)])
    boxes = C.crop_box(batch, (32, 32), pad=2)
    assert len(set(boxes)) == 3  # per-item boxes
    out = C.composite(ims, gens, batch, boxes=boxes, mask_blur=1.5, match_color=True)
    for i in range(3):  # a batch is exactly its items, one at a time
        assert np.array_equal(out[i], C.composite(ims[i], gens[i], batch[i:i + 1], boxes=boxes[i:i + 1],
                                                  mask_blur=1.5, match_color=True)[0])


def _openai_mask() -> Image.Image:
    """OpenAI's edit mask: the photo itself, transparent (alpha 0) where it is to be repainted."""
    rgba = np.random.default_rng(0).integers(0, 256, (16, 16, 4)).astype(np.uint8)
    rgba[..., 3] = 255
    rgba[:, :8, 3] = 0
    return Image.fromarray(rgba, "RGBA")


@pytest.mark.parametrize("call,words", [
    (lambda: M.to_repaint_mask(), ["exactly one", "none"]),
    (lambda: M.to_repaint_mask(mask=np.ones((4, 4), np.uint8), product_mask=np.ones((4, 4), np.uint8)),
     ["exactly one", "product_mask"]),
    (lambda: M.to_repaint_mask(mask=Image.fromarray(np.full((4, 4), 70000, np.int32))), ["70000", "16 bits",
                                                                                         "mask[0]"]),
    (lambda: M.to_repaint_mask(mask=_openai_mask()), ["transparent", "picture", "product mask", "mask[0]"]),
    (lambda: M.to_repaint_mask(mask=np.ones((4, 4), np.int32)), ["int32"]),
    (lambda: M.to_repaint_mask(mask=np.full((4, 4), 2.0)), ["[0, 1]", "2"]),
    (lambda: M.to_repaint_mask(mask=np.full((4, 4), np.nan)), ["[0, 1]"]),
    (lambda: M.to_repaint_mask(mask=np.ones((67, 45), np.uint8), size=(64, 48)), ["67x45", "64x48"]),
    (lambda: M.to_repaint_mask(mask=[np.ones((6, 5), np.uint8), np.ones((5, 6), np.uint8)]), ["6x5", "5x6"]),
    (lambda: M.to_repaint_mask(image=Image.new("RGB", (4, 4))), ["no alpha", "RGB"]),
    (lambda: M.to_repaint_mask(image=np.ones((4, 4, 3), np.uint8)), ["no alpha"]),
    (lambda: M.to_repaint_mask(mask=np.zeros((4, 4), np.uint8)), ["empty", "mask[0]"]),
    (lambda: M.to_repaint_mask(product_mask=[np.zeros((4, 4)), np.ones((4, 4))]), ["empty", "product_mask[1]"]),
    (lambda: M.to_repaint_mask(mask="mask.png"), ["str"]),
    (lambda: P.image_to_tensor(torch.rand(1, 3, 8, 8) * 2 - 1), ["[0, 1]", "(x + 1) / 2"]),
    (lambda: P.image_to_tensor([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 9, 3), np.uint8)]), ["8x8", "8x9"]),
    (lambda: M.dilate(np.ones((1, 1, 8, 8)), 1), ["(B, 1, H, W)"]),
    (lambda: M.latent_mask(torch.ones(1, 1, 67, 45)), ["67x45", "pad_to_multiple"]),
    (lambda: M.latent_mask(torch.ones(1, 1, 8, 8), mode="bilinear"), ["mode"]),
    (lambda: C.crop_box(torch.zeros(1, 1, 8, 8), (8, 8)), ["empty"]),
    (lambda: C.paste_back(np.zeros((1, 67, 45, 3), np.uint8), np.zeros((1, 64, 48, 3), np.uint8),
                          torch.ones(1, 1, 67, 45)), ["67x45", "64x48"]),
    (lambda: C.paste_back(np.zeros((1, 67, 45, 3), np.uint8), np.zeros((1, 67, 45, 3), np.uint8),
                          torch.ones(1, 1, 64, 48)), ["blend", "64x48", "67x45"]),
    (lambda: M.pad_to_multiple(torch.zeros(1, 3, 3, 3)), ["3x3", "replicate"]),
])
def test_clear_errors(call, words):
    with pytest.raises((ValueError, TypeError)) as err:
        call()
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_an_inverted_product_mask_is_named(caplog):
    """A background mask given as the product mask (white = backdrop, as segmentation tools often export it) kept
    the backdrop and repainted the product without a word; it is used as given, with a warning that says what to
    pass instead. A product filling the bottom edge (a sofa) is not doubted."""
    product = np.zeros((40, 60), np.uint8)
    product[10:30, 20:40] = 255
    sofa = np.zeros((40, 60), np.uint8)
    sofa[15:, 5:55] = 255
    with caplog.at_level("WARNING", logger="backdrop.diffusion.masks"):
        M.to_repaint_mask(product_mask=[product, sofa])
        assert caplog.text == ""
        m = M.to_repaint_mask(product_mask=[sofa, 255 - product])
        with pytest.raises(M.EmptyMask, match=r"product_mask\[3\]: the mask is empty"):  # all product: not inverted
            M.to_repaint_mask(product_mask=np.full((40, 60), 255, np.uint8), first=3)  # (a request's 4th item)
    assert torch.equal(m[1, 0], torch.from_numpy(product / 255).float())  # as given
    assert caplog.messages == ["product_mask[1] is white on 100% of its border, and white is the product to keep: "
                               "is it inverted (white = backdrop)? Then give it as the repaint mask (mask= / --mask)"]
    assert M.border_share(sofa) < 0.5 < M.border_share(255 - sofa)


# ----------------------------------------------------------------------------------------------- images vs diffusers

def test_image_conversions_match_diffusers():
    image_proc, _ = vae_processors()
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(random_image(rng, 64, 40)) for _ in range(2)]
    assert torch.equal(P.image_to_tensor(imgs), image_proc.preprocess(imgs, height=64, width=40))
    # postprocess rounding, including values off [-1, 1], exact half levels, and fp16 decoder output
    halves = torch.arange(256, dtype=torch.float32).add(0.5).div(255).mul(2).sub(1)
    for x in [torch.randn(2, 3, 67, 45) * 0.7, halves.view(1, 1, 16, 16).expand(1, 3, 16, 16).clone(),
              (torch.randn(1, 3, 33, 17) * 0.6).half()]:
        ref = np.stack([np.asarray(p) for p in image_proc.postprocess(x, output_type="pil")])
        assert np.array_equal(P.tensor_to_uint8(x), ref)
        assert all(np.array_equal(np.asarray(p), r) for p, r in zip(P.to_pil(x), ref))
    u8 = random_image(rng, 67, 45)
    assert np.array_equal(P.tensor_to_uint8(P.image_to_tensor(u8))[0], u8)  # uint8 -> [-1, 1] -> uint8 is exact


@pytest.mark.parametrize("h,w,mode", [(64, 48, "L"), (40, 72, "RGB"), (8, 8, "L")])
def test_mask_latents_match_diffusers(h, w, mode):
    image_proc, mask_proc = vae_processors()
    rng = np.random.default_rng(h * w)
    masks = []
    for _ in range(2):
        m = random_mask(rng, h, w)
        m[rng.random((h, w)) < 0.05] = rng.choice([126, 127, 128, 129])  # straddle the 0.5 threshold
        masks.append(Image.fromarray(m).convert(mode))
    images = [Image.fromarray(random_image(rng, h, w)) for _ in range(2)]
    # StableDiffusionInpaintPipeline.__call__ step 7 and prepare_mask_latents, verbatim
    mask_condition = mask_proc.preprocess(masks, height=h, width=w)
    init_image = image_proc.preprocess(images, height=h, width=w)
    ref_masked = init_image * (mask_condition < 0.5)
    ref_latent = F.interpolate(mask_condition, size=(h // 8, w // 8))

    mask = M.to_repaint_mask(mask=masks)
    assert torch.equal(M.binarize(mask), mask_condition)
    assert torch.equal(M.masked_image(P.image_to_tensor(images), mask), ref_masked)
    assert torch.equal(M.latent_mask(mask, mode="diffusers"), ref_latent)


# ----------------------------------------------------------------------------------------------- the model's mask

def dilate_ref(m: np.ndarray, r: int) -> np.ndarray:
    """Brute force: max (r > 0) or min (r < 0) over the (2|r| + 1)^2 square, ignoring outside pixels."""
    a, fill, op = abs(r), (-np.inf if r > 0 else np.inf), (np.maximum if r > 0 else np.minimum)
    p = np.pad(m.astype(np.float64), a, constant_values=fill)
    out = np.full(m.shape, fill)
    for dy in range(2 * a + 1):
        for dx in range(2 * a + 1):
            out = op(out, p[dy:dy + m.shape[0], dx:dx + m.shape[1]])
    return out


@pytest.mark.parametrize("r", [1, 3, 5, -1, -4])
def test_dilate_matches_brute_force(r):
    rng = np.random.default_rng(r + 10)
    m = random_mask(rng, 67, 45) / 255
    got = M.dilate(torch.from_numpy(m).float()[None, None], r)[0, 0].double().numpy()
    np.testing.assert_allclose(got, dilate_ref(m.astype(np.float32), r), rtol=0, atol=0)


@pytest.mark.parametrize("h,w", ODD + [(64, 48)])
@pytest.mark.parametrize("grow", [1, 2])
def test_latent_dilation_equals_image_dilation_by_8n(h, w, grow):
    rng = np.random.default_rng(h + grow)
    m = M.pad_to_multiple(M.to_repaint_mask(mask=random_mask(rng, h, w)))
    assert torch.equal(M.latent_mask(M.dilate(m, 8 * grow)), M.dilate(M.latent_mask(m), grow))


@pytest.mark.parametrize("h,w", ODD)
@pytest.mark.parametrize("seed", range(3))
def test_max_pool_never_loses_a_repaint_pixel(h, w, seed):
    rng = np.random.default_rng(seed)
    m = np.zeros((h, w), np.uint8)
    ys, xs = rng.integers(0, h, 12), rng.integers(0, w, 12)
    m[ys, xs] = rng.integers(1, 256, 12)  # isolated pixels, some barely above 0
    mask = M.pad_to_multiple(M.to_repaint_mask(mask=m))
    lat = M.latent_mask(mask)[0, 0]
    assert lat.shape == (-(-h // 8), -(-w // 8))
    assert torch.equal(lat, (F.max_pool2d(mask, 8)[0, 0] > 0).float())  # tight: no cell without a repaint pixel
    assert all(lat[y // 8, x // 8] == 1 for y, x in zip(ys, xs))
    # the same through an "only masked" crop resized to the processing size, down and up
    for size in [(32, 24), (128, 96)]:
        box = C.crop_box(mask, size, pad=3)[0]
        crop = M.latent_mask(C.crop_masks(mask, [box], size))[0, 0]
        bw, bh = box[2] - box[0], box[3] - box[1]
        for y, x in zip(ys, xs):  # adaptive pooling: pixel y of a bh-high box lies in output row floor(y h / bh)
            assert crop[(y - box[1]) * size[0] // bh // 8, (x - box[0]) * size[1] // bw // 8] == 1
    # diffusers' nearest resize samples one pixel per cell and drops the rest: why "max" is our default
    assert M.latent_mask(M.to_repaint_mask(mask=np.pad([[255]], ((3, 4), (3, 4))).astype(np.uint8)),
                         mode="diffusers").sum() == 0


# ----------------------------------------------------------------------------------------------- feathering

@pytest.mark.parametrize("sigma", [0.7, 2.0, 4.5])
def test_gaussian_blur_matches_float64_2d_reference(sigma):
    rng = np.random.default_rng(int(sigma * 10))
    m = random_mask(rng, 67, 45) / 255
    r = int(np.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k2 = np.outer(k, k) / np.outer(k, k).sum()  # the 2-D kernel, not separable passes
    p = np.pad(m, r, mode="edge")
    ref = sum(k2[dy, dx] * p[dy:dy + 67, dx:dx + 45] for dy in range(2 * r + 1) for dx in range(2 * r + 1))
    got = M.gaussian_blur(torch.from_numpy(m).float()[None, None], sigma)[0, 0].double().numpy()
    np.testing.assert_allclose(got, ref, atol=2e-6, rtol=0)


@pytest.mark.parametrize("h,w", ODD)
@pytest.mark.parametrize("sigma", [0.0, 1.5, 4.0])
def test_feather_stays_inside_the_repaint_region(h, w, sigma):
    for seed in range(3 if h < 100 else 2):
        rng = np.random.default_rng(seed)
        mask = M.to_repaint_mask(mask=[random_mask(rng, h, w, soft=bool(seed % 2)) for _ in range(2)])
        blend = M.feather(mask, sigma)
        assert torch.all(blend[mask == 0] == 0)  # exactly 0: kept pixels get nothing generated
        assert torch.all(blend <= mask) and torch.all(blend[mask > 0] > 0)
        if sigma == 0:
            assert torch.equal(blend, mask)
            continue
        binary = M.binarize(mask)
        fb = M.feather(binary, sigma)
        assert ((fb > 0) & (fb < 0.99)).any()  # it does feather
        deep = M.dilate(binary, -int(np.ceil(3 * sigma))) == 1  # farther than the kernel from any kept pixel
        assert torch.all(fb[deep] > 1 - 1e-6)


def test_feather_gives_thin_and_small_regions_their_core():
    """A region narrower than the kernel never reached full weight blurred: a 1-px line got 0.10 at sigma 4, a
    single pixel nothing visible, so the input came back where the mask asked for a repaint. The feather adapts to
    the region's width; values far past the image's size cost nothing more."""
    for rows, cols in ((slice(30, 31), slice(10, 50)), (slice(30, 32), slice(10, 50)), (slice(30, 31), slice(30, 31)),
                       (slice(20, 44), slice(20, 44))):
        m = torch.zeros(1, 1, 64, 64)
        m[0, 0, rows, cols] = 1
        for sigma in (4.0, 256.0, 1e6):
            w = M.feather(m, sigma)
            assert w.max() > 0.99 and torch.all(w[m == 0] == 0), (rows, cols, sigma)
    wide = torch.zeros(1, 1, 64, 64)
    wide[0, 0, 8:56, 8:56] = 1
    assert torch.equal(M.feather(wide, 4.0), torch.minimum(M.gaussian_blur(wide, 4.0), wide))  # as before
    t0 = time.perf_counter()
    M.dilate(wide, 10**8)
    assert time.perf_counter() - t0 < 5  # took minutes: the window was not capped at the image's size


# ----------------------------------------------------------------------------------------------- paste-back

@pytest.mark.parametrize("h,w", ODD)
@pytest.mark.parametrize("crop_pad", [None, 16])
def test_kept_pixels_are_bit_identical(h, w, crop_pad):
    size = (64, 48)
    for seed in range(4 if h < 100 else 2):
        rng = np.random.default_rng(seed)
        img = np.stack([random_image(rng, h, w) for _ in range(2)])
        mask = M.to_repaint_mask(product_mask=[255 - random_mask(rng, h, w, soft=bool(seed % 2)) for _ in range(2)],
                                 size=(h, w))
        model_mask = M.dilate(mask, 8)  # what the model repaints: larger than what paste-back takes
        if crop_pad is None:
            boxes, x = None, M.pad_to_multiple(P.image_to_tensor(img))
            y = (x + 0.3 * torch.randn_like(x)).clamp(-1.2, 1.2)  # a "decoded" image: input plus noise and a cast
            gen = P.tensor_to_uint8(M.crop_to(y, (h, w)))
        else:
            boxes = C.crop_box(model_mask, size, pad=crop_pad)
            gen = random_image(rng, *size)[None].repeat(2, 0)
        sigma, match = [0.0, 2.5][seed % 2], seed >= 1
        out = C.composite(img, gen, mask, boxes=boxes, mask_blur=sigma, match_color=match)
        assert out.shape == img.shape and out.dtype == np.uint8
        keep = (mask[:, 0] == 0).numpy()
        assert np.array_equal(out[keep], img[keep])
        full = C.uncrop(img, gen, boxes) if boxes else gen
        full = C.color_match(full, img, mask, boxes) if match else full
        blend = M.feather(mask, sigma)[:, 0].numpy()
        assert np.array_equal(out[blend >= 1], full[blend >= 1])
        mid = (blend > 0) & (blend < 1)
        lo, hi = np.minimum(img, full)[mid], np.maximum(img, full)[mid]
        assert np.all((lo <= out[mid]) & (out[mid] <= hi))


def test_color_match_removes_a_cast():
    rng = np.random.default_rng(3)
    img = rng.integers(40, 200, (1, 67, 45, 3)).astype(np.uint8)
    mask = M.to_repaint_mask(mask=random_mask(rng, 67, 45, soft=False))
    scene = np.where(mask[:, 0, :, :, None].numpy() > 0, rng.integers(40, 200, img.shape), img)
    scale, shift = np.array([0.8, 1.1, 0.95]), np.array([20.0, -10.0, 5.0])
    gen = np.clip(np.rint(scene * scale + shift), 0, 255).astype(np.uint8)  # a per-channel colour cast
    fixed = C.color_match(gen, img, mask)
    keep = (mask[:, 0] == 0).numpy()
    assert np.abs(fixed[keep].astype(int) - img[keep]).max() <= 1  # kept region back on the input's colours
    assert np.abs(fixed.astype(int) - scene).max() <= 1  # and the same correction undoes the cast everywhere
    assert np.array_equal(C.color_match(img, img, mask), img)  # no cast, no change


def test_color_match_measures_inside_the_box_and_clamps_its_scale():
    """With crop_padding the pixels outside the box are the input's (uncrop): counted, they pulled the correction
    toward none. A washed-out generation is stretched at most 2x."""
    rng = np.random.default_rng(0)
    img = rng.integers(40, 200, (1, 64, 64, 3)).astype(np.uint8)
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 24:40, 24:40] = 1
    gen = img.copy()
    gen[0, 16:48, 16:48] = np.clip(gen[0, 16:48, 16:48].astype(int) + 30, 0, 255)  # a cast inside the box only
    keep = np.zeros((64, 64), bool)
    keep[16:48, 16:48], keep[24:40, 24:40] = True, False
    assert np.abs(C.color_match(gen, img, mask, [(16, 16, 48, 48)])[0][keep].astype(int) - img[0][keep]).max() <= 1
    ramp = np.tile(np.arange(0, 256, 4, dtype=np.uint8)[None, :, None], (64, 1, 3))[None]  # std 74
    flat = ramp // 8 + 100  # std 9: a ratio of 8
    kept = (mask[0, 0] == 0).numpy()
    out = C.color_match(flat, ramp, mask)[0][kept].astype(float)
    assert out.std() == pytest.approx(2 * flat[0][kept].astype(float).std(), rel=0.05)


def test_mask_edge_cases():
    """A JPEG of a near-black mask holds 0/1 values and is no label map (a PNG of them is); a mask value at
    mask_threshold repaints (>=, as diffusers binarises): a white mask at 1.0 was returned unchanged; the blend
    rounds: 0.6 of the way from 0 to 1 is 1."""
    buf = io.BytesIO()
    Image.fromarray(np.ones((16, 16), np.uint8)).save(buf, "JPEG", quality=100)
    jpeg = Image.open(io.BytesIO(buf.getvalue()))
    assert np.asarray(jpeg).max() == 1 and M.to_repaint_mask(mask=jpeg).max() <= 1 / 255 + 1e-7
    assert M.binarize(torch.tensor([[[[0.5, 1.0]]]]), 0.5).flatten().tolist() == [1.0, 1.0]
    assert M.to_repaint_mask(mask=np.full((8, 8), 255, np.uint8), threshold=1.0).min() == 1
    assert C.paste_back(np.zeros((1, 1, 1, 3), np.uint8), np.ones((1, 1, 1, 3), np.uint8),
                        torch.full((1, 1, 1, 1), 0.6)).max() == 1


def test_full_resolution_shortcuts_equal_the_plain_computation():
    """At photo sizes the mask work is done where it matters (feather: tiles near an edge; paste-back: float maths on
    soft pixels; colour match: histograms and a table of the 256 levels; dilate: maxima by doubling), which made a
    4096x3072 inpaint 2-3x faster: each equals the plain whole-image computation (feather within float rounding).
    composite checks its batch sizes itself."""
    rng = np.random.default_rng(5)
    mask = M.to_repaint_mask(mask=[random_mask(rng, 333, 517, soft=s) for s in (False, True)])  # 2x3 tiles of 256
    g = torch.Generator().manual_seed(0)
    speckled = torch.rand(1, 1, 600, 700, generator=g) * (torch.rand(1, 1, 600, 700, generator=g) > 0.9)
    for sigma in (1.5, 4.0, 12.0, 30.0):  # tiles grow with sigma (at 30: 720 px), so margins stay under half
        for m in (mask, speckled):  # a convolution's sums round by the tensor's size: within 1e-6, not bit-equal
            assert (M.feather(m, sigma) - M._feather(m, sigma)).abs().max() <= 1e-6
    img, gen = random_image(rng, 333, 517)[None].repeat(2, 0), random_image(rng, 333, 517)[None].repeat(2, 0)
    w = M.feather(mask, 4.0)
    f_img, f_gen, f_w = img.astype(np.float32), gen.astype(np.float32), w[:, 0, :, :, None].numpy()
    plain = np.clip(np.rint(f_img + f_w * (f_gen - f_img)), 0, 255).astype(np.uint8)
    assert np.array_equal(C.paste_back(img, gen, w), np.where(f_w <= 0, img, np.where(f_w >= 1, gen, plain)))
    boxes = [(10, 20, 400, 300), (0, 0, 517, 333)]
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        keep = (mask[i, 0] == 0).numpy()
        keep[:y1], keep[y2:], keep[:, :x1], keep[:, x2:] = False, False, False, False
        g, t = gen[i][keep].astype(np.float64), img[i][keep].astype(np.float64)
        scale = np.where(g.std(0) < 1, 1.0, np.clip(t.std(0) / g.std(0), 0.5, 2.0))
        want = np.clip(np.rint((gen[i] - g.mean(0)) * scale + t.mean(0)), 0, 255)
        assert np.abs(C.color_match(gen, img, mask, boxes)[i] - want).max() <= 1e-9
    with pytest.raises(ValueError, match="composite: 2 images, 1 generated, 2 masks: give one of each per item"):
        C.composite(img, gen[:1], mask, mask_blur=4.0)
    x = torch.rand(1, 1, 40, 70)
    for r in (1, 8, 12, 100):
        ref = F.max_pool2d(F.pad(x, (r, r, r, r), value=-1.0), 2 * r + 1, stride=1)
        assert torch.equal(M.dilate(x, r), ref) and torch.equal(M.dilate(x, -r), -F.max_pool2d(
            F.pad(-x, (r, r, r, r), value=-2.0), 2 * r + 1, stride=1))


# ----------------------------------------------------------------------------------------------- crop vs diffusers

def test_crop_box_matches_diffusers_get_crop_region():
    _, mask_proc = vae_processors()
    rng = np.random.default_rng(0)
    for _ in range(150):
        H, W = rng.integers(16, 160, 2)
        m = np.zeros((H, W), np.uint8)
        y, x = rng.integers(0, H), rng.integers(0, W)
        m[y:y + rng.integers(1, H), x:x + rng.integers(1, W)] = rng.integers(1, 256)
        size = [(64, 64), (64, 96), (96, 64), (512, 384), (40, 72)][rng.integers(5)]
        pad = int(rng.integers(0, 40))
        ours = C.crop_box(M.to_repaint_mask(mask=m), size, pad=pad)[0]
        assert ours == mask_proc.get_crop_region(Image.fromarray(m), size[1], size[0], pad=pad), (H, W, size, pad)


@pytest.mark.parametrize("seed", range(4))
def test_crop_and_overlay_match_diffusers(seed):
    """padding_mask_crop end to end: diffusers' cropped init image and mask condition in, apply_overlay out."""
    image_proc, mask_proc = vae_processors()
    rng = np.random.default_rng(seed)
    H, W, size, pad = 96, 80, (64, 64), 4
    m = np.zeros((H, W), np.uint8)
    y, x = rng.integers(20, 50), rng.integers(20, 40)
    m[y:y + rng.integers(4, 24), x:x + rng.integers(4, 24)] = 255
    img, gen = Image.fromarray(random_image(rng, H, W)), Image.fromarray(random_image(rng, *size))
    mask_pil = Image.fromarray(m)
    crops = mask_proc.get_crop_region(mask_pil, size[1], size[0], pad=pad)
    mask = M.to_repaint_mask(mask=mask_pil)
    boxes = C.crop_box(mask, size, pad=pad)
    assert boxes == [crops] and crops[2] - crops[0] == crops[3] - crops[1]  # square box: "fill" == plain resize
    ref_init = image_proc.preprocess(img, height=64, width=64, crops_coords=crops, resize_mode="fill")
    ref_cond = mask_proc.preprocess(mask_pil, height=64, width=64, crops_coords=crops, resize_mode="fill")
    assert torch.equal(P.image_to_tensor(C.crop_images(P.image_to_uint8(img), boxes, size)), ref_init)
    assert torch.equal(M.binarize(C.crop_masks(mask, boxes, size, mode="diffusers")), ref_cond)
    ref_out = np.asarray(image_proc.apply_overlay(mask_pil, img, gen, crops))
    assert np.array_equal(C.composite(img, gen, mask, boxes=boxes)[0], ref_out)


# ----------------------------------------------------------------------------------------------- sizes

@pytest.mark.parametrize("h,w", ODD + [(64, 48), (9, 9)])
@pytest.mark.parametrize("mode", ["reflect", "replicate"])
def test_pad_crop_round_trip(h, w, mode):
    x = torch.rand(2, 3, h, w)
    p = M.pad_to_multiple(x, mode=mode)
    assert p.shape[-2:] == M.fit_size(h, w) and p.shape[-2] % 8 == 0 and p.shape[-1] % 8 == 0
    assert p.shape[-2] - h < 8 and p.shape[-1] - w < 8
    assert torch.equal(M.crop_to(p, (h, w)), x)
    if p.shape[-2] > h:
        src = h - 2 if mode == "reflect" else h - 1  # the first padded row mirrors (reflect) or repeats the edge
        assert torch.equal(p[..., h, :w], x[..., src, :])


def test_fit_size():
    rng = np.random.default_rng(0)
    for h, w in rng.integers(1, 2000, (200, 2)):
        H, W = M.fit_size(h, w)
        assert H % 8 == 0 and W % 8 == 0 and h <= H < h + 8 and w <= W < w + 8
        H, W = M.fit_size(h, w, side=512)
        assert max(H, W) == 512 and min(H, W) >= 8 and H % 8 == 0 and W % 8 == 0
        short = min(h, w) * 512 / max(h, w)
        assert abs(min(H, W) - short) <= 4 or (short < 4 and min(H, W) == 8)  # nearest multiple, at least one
