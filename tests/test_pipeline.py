"""Pipeline end to end on tiny random models saved in the diffusers layout and loaded by both sides.

Parity: generate (with clip_skip too) / img2img / inpaint (9- and 4-channel UNets) equal diffusers'
StableDiffusion{,Img2Img,Inpaint}Pipeline on the same folder, the same initial noise (per-item generators) and, where
diffusers would draw a VAE posterior sample, the same image latents (we use the posterior mean and hand it over).
Properties: kept pixels are bit-identical after paste-back at odd sizes and with crops, seeds give the same image
alone or in a batch, mixed strengths equal separate calls, and the 4-channel loop keeps the known latents. The API
as users call it (diffusers' names, errors): test_pipeline_api.py; shared models and helpers: pipeline_helpers.py
and conftest.py.
"""
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from backdrop.diffusion import masks as M
from backdrop.diffusion import pixels as P
from backdrop.diffusion.pipeline import Output, Pipeline
from backdrop.diffusion.latents import per_item_randn
from backdrop.diffusion.output import decoded
from backdrop.diffusion.schedule import build_schedule
from backdrop.export.backends import TorchBackend
from backdrop.nn.checkpoint import init_model, save_model
from backdrop.nn.config import PRESETS
from backdrop.nn.resolve import builtin_models, resolve_model

from pipeline_helpers import PROMPTS, TOL, generators, images, latents_of, max_diff, rect_masks, u8

pytestmark = [pytest.mark.usefixtures("one_thread"),  # conftest.py
              pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                         "ignore::UserWarning")]


# ---------------------------------------------------------------------------------------------- parity with diffusers

def test_diffusers_reads_our_text_encoder_folder(models, ref):
    """transformers 5 saves CLIPTextModel without the `text_model.` key level; our folder must still load into
    transformers with every weight (a missing one would be randomly initialised and differ)."""
    pipe = models["sd2"].pipe
    d = ref("sd2", "txt2img", "ddim")
    ids = pipe.backend.tokenizer(PROMPTS + ["wow!!!"])
    assert torch.equal(ids, d.tokenizer(PROMPTS + ["wow!!!"], padding="max_length", max_length=77,
                                        truncation=True, return_tensors="pt").input_ids)
    with torch.no_grad():
        assert torch.allclose(pipe.backend.encode_text(ids), d.text_encoder(ids)[0], atol=1e-5)


@pytest.mark.parametrize("model,sampler", [("sd1", "ddim"), ("sd1", "euler"), ("sd1", "dpmpp-2m"),
                                           ("sd1", "unipc"), ("sd1", "pndm"), ("sd2", "euler"), ("sd2", "ddim"),
                                           ("sd2", "unipc")])
def test_generate_equals_diffusers(models, ref, model, sampler):
    """A batch of two prompts, guidance 7.5, the same initial latents; sd2 also checks v-prediction and that the
    folder's scheduler config (zero SNR, trailing spacing) is honoured as diffusers honours it."""
    pipe = models[model].pipe
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = pipe.generate(PROMPTS, negative_prompt="blurry", steps=5, sampler=sampler, guidance_scale=7.5,
                         latents=noise, output_type="np", progress=False, seed=[1, 2])
    theirs = ref(model, "txt2img", sampler)(PROMPTS, negative_prompt=["blurry"] * 2, num_inference_steps=5,
                                            guidance_scale=7.5, latents=noise.clone(), output_type="np",
                                            height=64, width=64).images
    assert ours.images.shape == theirs.shape == (2, 64, 64, 3) and ours.images.dtype == np.float32
    assert theirs.std() > 0.05  # a real picture, not a clamped constant
    assert max_diff(ours.images, theirs) <= TOL


def _diffusers_clip_skip_on_transformers_5(text_encoder) -> None:
    """diffusers 0.42's clip_skip path calls text_encoder.text_model.final_layer_norm, which transformers 5's
    CLIPTextModel no longer has (its modules moved up a level): point that name at the same LayerNorm, unregistered
    (no module cycle), so the oracle runs its own code unchanged."""
    if not hasattr(text_encoder, "text_model"):
        object.__setattr__(text_encoder, "text_model", SimpleNamespace(final_layer_norm=text_encoder.final_layer_norm))


@pytest.mark.parametrize("clip_skip", [1, 2])  # 2: the tiny text encoder's 2 layers skipped, its embeddings
def test_clip_skip_equals_diffusers(models, ref, clip_skip):
    """clip_skip=k conditions on the text encoder's output k layers before the last, as diffusers' clip_skip=k,
    for the negative prompt too: diffusers 0.42 encodes that at the last layer (diffusion/text.py says why we do
    not), so it gets its own clip_skip=k encoding of the negative prompt as negative_prompt_embeds."""
    pipe, d = models["sd1"].pipe, ref("sd1", "txt2img", "euler")
    _diffusers_clip_skip_on_transformers_5(d.text_encoder)
    with torch.no_grad():
        cond, uncond = (d.encode_prompt(p, "cpu", 1, False, clip_skip=clip_skip)[0] for p in (PROMPTS, ["blurry"] * 2))
    assert torch.allclose(pipe.encode_prompt(PROMPTS, clip_skip=clip_skip), cond, atol=1e-5)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    run = dict(negative_prompt="blurry", steps=5, sampler="euler", guidance_scale=7.5, latents=noise,
               output_type="np", progress=False)
    ours = pipe.generate(PROMPTS, clip_skip=clip_skip, **run).images
    theirs = d(PROMPTS, negative_prompt_embeds=uncond, num_inference_steps=5, guidance_scale=7.5,
               latents=noise.clone(), output_type="np", height=64, width=64, clip_skip=clip_skip).images
    assert theirs.std() > 0.05 and max_diff(ours, theirs) <= TOL
    assert max_diff(ours, pipe.generate(PROMPTS, **run).images) > 0.05  # skipping layers changed the image


def test_ddim_eta_equals_diffusers_and_bad_settings_are_named(models, ref):
    """eta > 0: DDIM draws fresh noise every step from each item's generator, as diffusers does from a list."""
    pipe = models["sd1"].pipe
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = pipe.generate(PROMPTS, steps=5, sampler="ddim", eta=0.7, latents=noise, output_type="np",
                         progress=False, seed=[1, 2])
    theirs = ref("sd1", "txt2img", "ddim")(PROMPTS, num_inference_steps=5, eta=0.7, latents=noise.clone(),
                                           generator=generators([1, 2]), output_type="np", height=64,
                                           width=64).images
    assert max_diff(ours.images, theirs) <= TOL
    plain = pipe.generate(PROMPTS, steps=5, sampler="ddim", latents=noise, output_type="np", progress=False)
    assert max_diff(ours.images, plain.images) > 0.01  # the noise did something
    with pytest.raises(ValueError, match="sampler='ddim' only, not 'euler'"):
        pipe.generate("a", steps=1, sampler="euler", eta=0.5)
    for bad in (dict(guidance_scale=float("nan")), dict(guidance_scale=-1), dict(guidance_rescale=1.5)):
        with pytest.raises(ValueError, match=f"{next(iter(bad))} must be a finite number"):
            pipe.generate("a", steps=1, **bad)  # diffusers runs these silently (no guidance, or extrapolated)
    with pytest.raises(ValueError, match=r"eta must be a number in \[0, 1\]"):
        pipe.inpaint(images(1)[0], mask=rect_masks(1)[0], prompt="a", steps=1, sampler="ddim", eta=-1)


def test_prompt_embeds_equal_text_and_diffusers(models, ref):
    """encode_prompt's embeddings in place of the text give the same images, and the same as diffusers given those
    embeddings; one (L, C) row broadcasts to every request, and an unconditional row may be any shared length."""
    pipe = models["sd1"].pipe
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    common = dict(steps=4, sampler="euler", latents=noise, output_type="np", progress=False, seed=[1, 2])
    text = pipe.generate(PROMPTS, negative_prompt="blurry", **common).images
    cond, uncond = pipe.encode_prompt(PROMPTS), pipe.encode_prompt("blurry")  # (2, 77, C), (1, 77, C)
    assert cond.shape == (2, 77, pipe.config.unet.cross_attention_dim) and cond.dtype == torch.float32
    ours = pipe.generate(prompt_embeds=cond, negative_prompt_embeds=uncond[0], **common).images
    np.testing.assert_array_equal(ours, text)
    theirs = ref("sd1", "txt2img", "euler")(prompt_embeds=cond, negative_prompt_embeds=uncond.expand(2, -1, -1),
                                            num_inference_steps=4, latents=noise.clone(), output_type="np",
                                            height=64, width=64).images
    assert max_diff(ours, theirs) <= TOL
    # embeddings of another length (e.g. two concatenated 77-token windows), for both: what diffusers takes too
    long = torch.cat([cond, cond], 1)
    two = pipe.generate(prompt_embeds=long, negative_prompt_embeds=torch.cat([uncond, uncond], 1), **common)
    assert two.images.shape == (2, 64, 64, 3) and np.isfinite(two.images).all()
    for call, match in [
        (dict(prompt="a", prompt_embeds=cond), "give prompt or prompt_embeds, not both"),
        (dict(prompt_embeds=cond[..., :-1]), r"prompt_embeds must be a float tensor \(n, L, 64\)"),
        (dict(prompt_embeds=long), r"need one shape \(L, C\)"),  # text negative prompt "": 77 tokens
    ]:
        with pytest.raises(ValueError, match=match):
            pipe.generate(steps=1, progress=False, **call)


@pytest.mark.parametrize("sampler", ["euler", "dpmpp-2m"])
def test_inpaint_9_channels_equals_diffusers(models, ref, sampler):
    """Paste-back off and diffusers' mask conventions (binarise at 0.5, nearest resize, no dilation): the same
    output as StableDiffusionInpaintPipeline given our masked-image latents, which equal its VAE's posterior mean
    (diffusers itself would draw a posterior sample from the generator)."""
    pipe = models["sd1-inpaint"].pipe
    imgs, masks, seeds = images(2), rect_masks(2), [3, 4]
    ours = pipe.inpaint(imgs, masks, prompt=PROMPTS, seed=seeds, steps=5, sampler=sampler, paste_back=False,
                        mask_mode="diffusers", mask_dilate=0, output_type="np", progress=False)
    d = ref("sd1-inpaint", "inpaint", sampler)
    masked = M.masked_image(P.image_to_tensor(imgs), M.to_repaint_mask(mask=masks))  # (2, 3, 64, 64)
    masked_latents = pipe.backend.vae_encode(masked) * pipe.config.scaling_factor
    with torch.no_grad():
        mean = d.vae.encode(masked).latent_dist.mean * d.vae.config.scaling_factor
    assert torch.allclose(masked_latents, mean, atol=1e-4)
    theirs = d(prompt=PROMPTS, image=imgs, mask_image=masks, masked_image_latents=masked_latents, height=64,
               width=64, num_inference_steps=5, guidance_scale=7.5, generator=generators(seeds), strength=1.0,
               output_type="np").images
    assert theirs.std() > 0.05
    assert max_diff(ours.images, theirs) <= TOL


@pytest.mark.parametrize("soft", [False, True])
def test_inpaint_of_a_crop_equals_diffusers_padding_mask_crop(models, ref, monkeypatch, soft):
    """padding_mask_crop at the model's size (the image's here): the same box, and with mask_mode "diffusers" the
    crop's mask Lanczos-resized and binarised as its mask processor does (it was max-pooled: 0.25 off in latents).
    diffusers encodes the masked image with a posterior sample: its mean here, as ours."""
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint as inpainting

    monkeypatch.setattr(inpainting, "retrieve_latents", lambda out, **_: out.latent_dist.mode())
    pipe, image = models["sd1-inpaint"].pipe, images(1, seed=7)[0]
    mask = np.zeros((64, 64), np.uint8)
    mask[24:40, 20:36] = 255
    if soft:
        mask[23, 20:36], mask[24:40, 19] = 200, 100
    mask = Image.fromarray(mask)
    last = {}
    ref("sd1-inpaint", "inpaint", "euler")(
        prompt=PROMPTS[0], image=image, mask_image=mask, padding_mask_crop=4, height=64, width=64,
        num_inference_steps=5, generator=generators([3]),  # PIL only, with a crop: the last step's latents
        callback_on_step_end=lambda p, i, t, kw: last.update(latents=kw["latents"]) or kw)
    ours = pipe.inpaint(image, mask=mask, prompt=PROMPTS[0], crop_padding=4, steps=5, sampler="euler", seed=3,
                        output_type="latent", paste_back=False, mask_mode="diffusers", mask_dilate=0, progress=False)
    assert max_diff(ours.images, last["latents"]) <= 1e-3


@pytest.mark.parametrize("sampler,strength", [("ddim", 0.8), ("euler", 1.0), ("heun", 1.0), ("heun", 0.5),
                                             ("pndm", 1.0)])
def test_inpaint_4_channels_equals_diffusers(models, ref, sampler, strength):
    """A plain 4-channel UNet: the known region is blended back after every step, as diffusers does, and for heun
    and pndm also at the point between a step's two model calls (diffusers blends after every scheduler step call;
    without it heun was 0.07-0.46 off). diffusers gets the image as latents (our posterior mean), so neither side
    draws a posterior sample. (pndm below strength 1 differs on purpose: README.)"""
    pipe = models["sd1"].pipe
    imgs, masks, seeds = images(2, seed=1), rect_masks(2, seed=1), [5, 6]
    ours = pipe.inpaint(imgs, masks, prompt=PROMPTS, seed=seeds, steps=6, sampler=sampler, strength=strength,
                        paste_back=False, mask_mode="diffusers", mask_dilate=0, output_type="np", progress=False)
    x0 = latents_of(pipe, imgs)
    theirs = ref("sd1", "inpaint", sampler)(
        prompt=PROMPTS, image=x0, mask_image=masks, masked_image_latents=x0, height=64, width=64,
        num_inference_steps=6, guidance_scale=7.5, generator=generators(seeds), strength=strength,
        output_type="np").images
    assert max_diff(ours.images, theirs) <= TOL


def test_img2img_equals_diffusers(models, ref):
    pipe = models["sd1"].pipe
    imgs, seeds = images(2, seed=2), [7, 8]
    ours = pipe.img2img(imgs, PROMPTS, strength=0.6, seed=seeds, steps=10, sampler="dpmpp-2m", output_type="np",
                        progress=False)
    theirs = ref("sd1", "img2img", "dpmpp-2m")(
        prompt=PROMPTS, image=latents_of(pipe, imgs), strength=0.6, num_inference_steps=10, guidance_scale=7.5,
        generator=generators(seeds), output_type="np").images
    assert max_diff(ours.images, theirs) <= TOL


# --------------------------------------------------------------------------------------------------------- properties

def test_mixed_strengths_equal_separate_calls(models):
    pipe = models["sd1"].pipe
    imgs, strengths, seeds = images(3, seed=3), [0.5, 0.9, 0.5], [11, 12, 13]
    prompts = PROMPTS + ["a vase"]
    both = pipe.img2img(imgs, prompts, strength=strengths, seed=seeds, steps=6, sampler="euler-a",
                        output_type="np", progress=False)
    assert both.seeds == seeds
    for i in range(3):
        alone = pipe.img2img(imgs[i], prompts[i], strength=strengths[i], seed=seeds[i], steps=6, sampler="euler-a",
                             output_type="np", progress=False)
        assert max_diff(both.images[i], alone.images[0]) <= TOL
    assert max_diff(both.images[0], both.images[2]) > 0.05  # the items really differ


def test_seed_gives_the_same_image_alone_or_in_a_batch(models):
    pipe = models["sd1"].pipe
    prompts = PROMPTS + ["a vase"]
    batch = pipe.generate(prompts, seed=[5, 6, 7], steps=4, sampler="euler-a", progress=False)
    for i, p in enumerate(prompts):
        alone = pipe.generate(p, seed=5 + i, steps=4, sampler="euler-a", progress=False)
        assert np.abs(u8(batch.images[i]) - u8(alone.images[0])).max() <= 2  # 2/255
    # num_images_per_prompt k: seeds s, s+1, ...; an int seed over n prompts gives item m the seed s + m
    two = pipe.generate(prompts[0], seed=40, num_images_per_prompt=2, steps=4, sampler="euler-a", progress=False)
    assert two.seeds == [40, 41]
    second = pipe.generate(prompts[0], seed=41, steps=4, sampler="euler-a", progress=False)
    assert np.abs(u8(two.images[1]) - u8(second.images[0])).max() <= 2
    assert pipe.generate(prompts[:2], seed=9, num_images_per_prompt=2, steps=1, progress=False,
                         output_type="latent").seeds == [9, 10, 11, 12]
    drawn = pipe.generate(prompts[0], steps=3, progress=False)  # seed None: random, reported back
    again = pipe.generate(prompts[0], seed=drawn.seeds[0], steps=3, progress=False)
    assert np.array_equal(u8(drawn.images[0]), u8(again.images[0]))


@pytest.mark.parametrize("model", ["sd1", "sd1-inpaint"])
@pytest.mark.parametrize("crop_padding,color_match", [(None, False), (6, True)])
def test_paste_back_keeps_kept_pixels_bit_identical(models, model, crop_padding, color_match):
    """67x45 (HxW, not multiples of 8), a product mask with a soft edge, feathering, optional crop + colour match:
    every pixel outside the repaint mask is the input's, bit for bit; the output has the input's size."""
    pipe = models[model].pipe
    img = images(1, 67, 45, seed=4)[0]
    product = 255 - np.asarray(rect_masks(1, 67, 45, seed=4)[0])  # white = the product to keep
    product[30:34, 5:40] = 255  # a thin shelf: repaint region only a few pixels tall between product parts
    out = pipe.inpaint(img, product_mask=Image.fromarray(product), prompt="on a beach", seed=3, steps=3,
                       crop_padding=crop_padding, color_match=color_match, mask_blur=4, progress=False)
    res, src = u8(out.images[0]), u8(img)
    assert res.shape == src.shape == (67, 45, 3)
    kept = product == 255  # repaint mask == 0
    assert np.array_equal(res[kept], src[kept])
    assert np.abs(res[~kept] - src[~kept]).mean() > 5  # the background really was repainted


def test_four_channel_loop_keeps_the_known_region(models):
    """After every step the known latents (latent mask 0) are the image latents noised to the next level with the
    item's own initial noise, and clean image latents at the end (latents.blend_known_region)."""
    pipe = models["sd1"].pipe
    img, mask, seed, steps = images(1, seed=5), rect_masks(1, seed=5, soft=False), 21, 5
    seen = []
    out = pipe.inpaint(img, mask, prompt="x", seed=seed, steps=steps, sampler="dpmpp-2m", output_type="latent",
                       mask_dilate=1, progress=False, callback=lambda i, x: seen.append(x.clone()))
    x0 = latents_of(pipe, img)
    noise = per_item_randn(x0.shape, [torch.Generator().manual_seed(seed)])
    known = M.latent_mask(M.dilate(M.to_repaint_mask(mask=mask), 8)) == 0  # (1, 1, 8, 8)
    known = known.expand_as(x0)
    assert 0 < known.float().mean() < 1 and len(seen) == steps
    sigmas = build_schedule("dpmpp-2m", steps, pipe.config.scheduler).sigmas.tolist()
    for i, x in enumerate(seen[:-1]):
        assert torch.allclose(x[known], (x0 + noise * sigmas[i + 1])[known], atol=1e-5)
    assert torch.allclose(out.images[known], x0[known], atol=1e-5)
    assert (out.images[~known] - x0[~known]).abs().mean() > 0.1  # the repaint region moved


def test_rgba_alpha_convention_equals_explicit_mask(models):
    """OpenAI's convention (alpha 0 = repaint) gives the same result as the equivalent white-is-repaint mask with
    no feathering (the default blur for cutouts and product masks is 0)."""
    pipe = models["sd1-inpaint"].pipe
    rgb = images(1, seed=6)[0]
    alpha = 255 - np.asarray(rect_masks(1, seed=6)[0])
    rgba = Image.fromarray(np.dstack([np.asarray(rgb), alpha]), "RGBA")
    a = pipe.inpaint(rgba, prompt="x", seed=2, steps=3, progress=False, output_type="np")
    b = pipe.inpaint(rgb, Image.fromarray(255 - alpha), prompt="x", seed=2, steps=3, mask_blur=0, progress=False,
                     output_type="np")
    assert np.array_equal(a.images, b.images)
    # a product mask's default is no feather too (its edge is the product's own); an SD mask's is 4 px
    c = pipe.inpaint(rgb, product_mask=Image.fromarray(alpha), prompt="x", seed=2, steps=3, progress=False,
                     output_type="np")
    assert np.array_equal(a.images, c.images)
    d = pipe.inpaint(rgb, Image.fromarray(255 - alpha), prompt="x", seed=2, steps=3, progress=False, output_type="np")
    e = pipe.inpaint(rgb, Image.fromarray(255 - alpha), prompt="x", seed=2, steps=3, mask_blur=4, progress=False,
                     output_type="np")
    assert np.array_equal(d.images, e.images) and not np.array_equal(d.images, a.images)
    with pytest.raises(ValueError, match="no mask: give mask="):
        pipe.inpaint(rgb, prompt="x", steps=2, progress=False)


def test_all_black_mask_returns_the_input(models):
    pipe = models["sd1-inpaint"].pipe
    imgs, masks = images(2, seed=7), rect_masks(2, seed=7)
    black = Image.new("L", (64, 64), 0)
    out = pipe.inpaint(imgs, [masks[0], black], prompt="x", seed=[1, 2], steps=2, progress=False)
    assert out.unchanged == [1] and out.seeds == [1, 2]
    assert np.array_equal(np.asarray(out.images[1]), np.asarray(imgs[1]))
    alone = pipe.inpaint(imgs[0], masks[0], prompt="x", seed=1, steps=2, progress=False)
    assert np.array_equal(u8(out.images[0]), u8(alone.images[0]))  # the same 1-item batch: bit-identical
    only = pipe.inpaint(imgs[1], black, prompt="x", steps=2, progress=False, output_type="np")
    assert only.unchanged == [0] and np.array_equal((only.images[0] * 255).round().astype(np.uint8),
                                                    np.asarray(imgs[1]))
    with pytest.raises(ValueError, match="nothing to repaint; output_type='latent'"):
        pipe.inpaint(imgs[1], black, prompt="x", steps=2, progress=False, output_type="latent")


def test_output_types_sizes_and_nine_channel_generate(models):
    pipe = models["sd1-inpaint"].pipe  # generate on an inpainting UNet: mask 1, grey masked image
    pil = pipe.generate("x", height=45, width=67, steps=2, seed=0, progress=False)
    assert isinstance(pil, Output) and [im.size for im in pil.images] == [(67, 45)]
    arr = pipe.generate("x", height=45, width=67, steps=2, seed=0, progress=False, output_type="np")
    assert arr.images.shape == (1, 45, 67, 3) and 0 <= arr.images.min() and arr.images.max() <= 1
    assert np.abs(u8(pil.images[0]) - (arr.images[0] * 255).round()).max() <= 1
    lat = pipe.generate("x", height=45, width=67, steps=2, seed=0, progress=False, output_type="latent")
    assert lat.images.shape == (1, 4, 6, 9)  # 45x67 sampled at 48x72
    assert pipe.generate("x", steps=1, progress=False, output_type="np").images.shape == (1, 64, 64, 3)
    odd = pipe.inpaint(images(1, 67, 45)[0], rect_masks(1, 67, 45)[0], prompt="x", steps=1, progress=False,
                       paste_back=False, color_match=True, output_type="np")
    assert odd.images.shape == (1, 67, 45, 3)


def test_text_is_encoded_once_per_distinct_prompt(models):
    calls = []
    backend = models["sd1"].pipe.backend

    class Counting(TorchBackend):
        def __init__(self):  # share the loaded model; count what reaches the text encoder
            self.__dict__.update(backend.__dict__)

        def encode_text(self, input_ids):
            calls.append(input_ids.shape[0])
            return super().encode_text(input_ids)

    pipe = Pipeline(Counting())
    pipe.generate(["a", "b", "a"], negative_prompt="", num_images_per_prompt=2, steps=1, progress=False,
                  output_type="latent")
    assert calls == [3]  # "a", "b" and the negative "", in one call
    calls.clear()
    pipe.generate(["a", "b"], guidance_scale=1.0, steps=1, progress=False, output_type="latent")
    assert calls == [2]  # no guidance: no negative prompt to encode


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a host sync only exists with a GPU")
@pytest.mark.parametrize("model,sampler,eta", [("sd1-inpaint", "dpmpp-2m", 0.0), ("sd1-inpaint", "euler-a", 0.0),
                                               ("sd1", "ddim", 0.5), ("sd1", "heun", 0.0), ("sd1", "unipc", 0.0),
                                               ("sd1-inpaint", "lcm", 0.0), ("sd1", "pndm", 0.0)])
def test_cuda_sampling_steps_never_wait_for_the_gpu(models, model, sampler, eta):
    """From the end of the first step to the last, the sampling loop on CUDA only queues work (9-channel and
    4-channel inpainting with its per-step blend, deterministic and stochastic samplers, guidance): torch's sync
    debug mode raises on any host sync (a blocking host->device copy, .item(), a device nonzero)."""
    pipe = Pipeline.from_pretrained(models[model].folder, device="cuda", dtype=torch.float16)
    steps = 5

    def strict_between(i, latents):  # runs after step i
        torch.cuda.set_sync_debug_mode("error" if i < steps - 1 else "default")
    try:
        out = pipe.inpaint(images(2), mask=rect_masks(2), prompt=PROMPTS, steps=steps, sampler=sampler, eta=eta,
                           seed=0, callback=strict_between, progress=False, output_type="np")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert np.isfinite(out.images).all()


def test_a_backends_latent_multiple_is_honoured(models):
    """Exported UNets (export/ort_backend.py) need latent sides that are multiples of `latent_multiple`: the
    pipeline pads images to 8 * that (replicate where reflection cannot reach) and crops back."""
    backend = models["sd1"].pipe.backend

    class Coarse(TorchBackend):
        latent_multiple = 4  # 32 px

        def __init__(self):
            self.__dict__.update(backend.__dict__)

        def unet(self, latents, t, context):
            assert latents.shape[-2] % 4 == 0 and latents.shape[-1] % 4 == 0, latents.shape
            return super().unet(latents, t, context)

    pipe = Pipeline(Coarse())
    lat = pipe.generate("x", height=45, width=67, steps=1, seed=0, progress=False, output_type="latent")
    assert lat.images.shape == (1, 4, 8, 12)  # 45x67 sampled at 64x96
    hole = np.zeros((20, 13), np.uint8)
    hole[5:12, 3:9] = 255
    small = pipe.inpaint(images(1, 20, 13)[0], Image.fromarray(hole), prompt="x", steps=1, progress=False)
    assert small.images[0].size == (13, 20)
    with pytest.raises(ValueError, match=r"to\(\) moves the torch backend's weights"):
        pipe.to("cpu")  # a backend built otherwise (an export, CUDA graphs) is not silently replaced


def test_builtin_model_opens_by_name_and_keeps_the_example_product():
    """The shipped backdrop-tiny (assets/) opens by name and repaints around the example product, keeping every
    product pixel; the files `make demo` uses are in the package."""
    from importlib import resources

    assets = Path(str(resources.files("backdrop.assets")))
    assert "backdrop-tiny" in builtin_models()
    assert resolve_model("backdrop-tiny") == assets / "backdrop-tiny"
    pipe = Pipeline.from_pretrained("backdrop-tiny", device="cpu")
    assert pipe.config.unet.in_channels == 9 and pipe.backend.dtype == torch.float32  # fp16 on disk, fp32 here
    image = Image.open(assets / "example-product.png")
    product = np.asarray(Image.open(assets / "example-mask.png")) > 127
    out = pipe.inpaint(image, product_mask=Image.fromarray(product), prompt="on the grass in front of a night sky",
                       steps=4, seed=3, progress=False, output_type="np")
    got = (out.images[0] * 255).round().astype(np.uint8)
    assert got.shape == np.asarray(image).shape and product.any()
    assert (got[product] == np.asarray(image)[product]).all()  # the product, bit-identical
    assert np.abs(got[~product].astype(int) - np.asarray(image)[~product]).mean() > 10  # the backdrop, repainted


def test_inpaint_decodes_with_the_known_pixels_on_a_mask_conditioned_vae(tmp_path, one_thread):
    """A mask-conditioned VAE (AsymmetricAutoencoderKL) gets the image and the user's binarized repaint mask (not
    the one grown by mask_dilate for the UNet) at decode, as diffusers' inpaint pipeline passes them; the kept
    pixels are still pasted back exactly."""
    cfg = PRESETS["tiny-inpaint"]
    cfg = replace(cfg, vae=replace(cfg.vae, mask_conditioned=True))
    pipe = Pipeline.from_pretrained(save_model(init_model(cfg, seed=3), tmp_path / "m"), device="cpu",
                                    dtype=torch.float32)
    img, mask = images(2, seed=4), rect_masks(2, seed=5)
    kw = dict(prompt=PROMPTS, seed=[1, 2], steps=3, mask_dilate=1, progress=False)
    lat = pipe.inpaint(img, mask, output_type="latent", **kw).images
    got = pipe.inpaint(img, mask, output_type="np", paste_back=False, **kw).images
    x = P.image_to_tensor(img)  # (2, 3, 64, 64) in [-1, 1]
    m = torch.stack([torch.from_numpy(np.asarray(k) / 255.0).float()[None] for k in mask]) >= 0.5
    with torch.no_grad():
        y = pipe.backend.vae_decode(lat / cfg.vae.scaling_factor, image=x, mask=m.float())
        plain = pipe.backend.vae_decode(lat / cfg.vae.scaling_factor)
    want = (y * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.abs((plain * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy() - want).max() > 1e-2
    kept = np.stack([np.asarray(k) == 0 for k in mask])  # (2, 64, 64)
    out = pipe.inpaint(img, mask, output_type="np", mask_blur=0, **kw).images  # pasted back: kept pixels exact
    np.testing.assert_array_equal((out * 255).round().astype(np.uint8)[kept],
                                  np.stack([np.asarray(i) for i in img])[kept])


def test_an_fp16_vae_that_overflows_on_finite_latents_gives_black_said_not_nan(caplog):
    """SD's VAE in fp16 overflows on ordinary latents: the item's NaN pixels went out in "np", with no log line."""
    backend = TorchBackend(init_model("tiny", seed=3), device="cpu", dtype=torch.float16)
    lat = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    lat[1] = lat[1].clamp(-1, 1) * 60000  # finite in fp16 (max 65504); the decoder's sums are not
    with caplog.at_level("WARNING", logger="backdrop.diffusion.output"):
        y = decoded(backend, lat, 1.0, rows=[1, 2])  # the call's items 1 and 2 (its item 0 had nothing to repaint)
    assert torch.isfinite(y).all() and (y[1] == -1).all() and (y[0] > -1).any()
    assert "items [2]: the VAE's output is not finite, though their latents are (run it in float32" in caplog.text
