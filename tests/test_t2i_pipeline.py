"""T2I-Adapter in the pipelines (diffusion/t2i.py): random adapters in diffusers' layout give the images diffusers'
StableDiffusionAdapterPipeline gives (one adapter, a 1-channel one fed an "L" or an RGB image, two as its
MultiAdapter; scales and adapter_conditioning_factor); scale 0 is the plain UNet bit for bit; img2img and inpaint
take it (kept pixels exact, a seed's image alone or in a batch); a ControlNet and an adapter run together; every bad
call is named."""
import numpy as np
import pytest
import torch
from PIL import Image

from backdrop.nn.t2i_adapter import T2IAdapterConfig
from backdrop.nn.testing import randomize_

from pipeline_helpers import PROMPTS, TOL, images, max_diff, rect_masks

diffusers = pytest.importorskip("diffusers")
pytestmark = [pytest.mark.usefixtures("one_thread"),  # conftest.py
              pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")]

# the tiny SD1's down levels are 32, 64, 64, 64 channels wide (nn/config.py's "tiny" preset)
FULL = T2IAdapterConfig(3, (32, 64, 64, 64), 1, 8, "full_adapter")
LIGHT = T2IAdapterConfig(1, (32, 64, 64), 1, 8, "light_adapter")  # 1 channel, as the canny / sketch adapters


def adapter_folder(cfg: T2IAdapterConfig, folder, seed: int) -> tuple[str, object]:
    """A random diffusers T2IAdapter saved to `folder`: (its path, the diffusers module). Weights scaled up so that
    the features move the tiny model's images clearly."""
    ref = diffusers.T2IAdapter(cfg.in_channels, list(cfg.channels), cfg.num_res_blocks, cfg.downscale_factor,
                               cfg.adapter_type).eval()
    randomize_(ref, seed)
    with torch.no_grad():
        for p in ref.parameters():
            p.mul_(3)
    ref.save_pretrained(folder)
    return str(folder), ref


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    return {name: adapter_folder(cfg, tmp_path_factory.mktemp(f"t2i-{name}"), seed)
            for name, cfg, seed in (("full", FULL, 1), ("light", LIGHT, 2), ("other", FULL, 3))}


def sketches(n: int, seed: int = 5, mode: str = "RGB") -> list[Image.Image]:
    """Line drawings: white strokes on black."""
    rng, out = np.random.default_rng(seed), []
    for _ in range(n):
        a = np.zeros((64, 64), np.uint8)
        for _ in range(5):
            a[rng.integers(0, 64), :] = 255
            a[:, rng.integers(0, 64)] = rng.integers(100, 256)
        out.append(Image.fromarray(a).convert(mode))
    return out


def theirs(ref, adapter, noise, image, steps=5, **options):
    """diffusers' StableDiffusionAdapterPipeline (euler, guidance 7.5) on the tiny SD1 with `adapter`."""
    base = ref("sd1", "txt2img", "euler")
    parts = {k: v for k, v in base.components.items() if k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")}
    pipe = diffusers.StableDiffusionAdapterPipeline(**parts, adapter=adapter, safety_checker=None,
                                                    feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPTS, image=image, num_inference_steps=steps, guidance_scale=7.5, latents=noise.clone(),
                output_type="np", **options).images


@pytest.fixture
def sd1(models):
    pipe = models["sd1"].pipe
    yield pipe
    pipe.adapter = None
    pipe.controlnet = None


def noise(seed=0):
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_generate_equals_diffusers_adapter_pipeline(sd1, ref, adapters):
    run = dict(steps=5, sampler="euler", guidance_scale=7.5, latents=noise(), output_type="np", progress=False)
    plain = sd1.generate(PROMPTS, **run).images
    sd1.adapter = adapters["full"][0]
    ours = sd1.generate(PROMPTS, adapter_image=sketches(2), adapter_conditioning_scale=0.7, **run).images
    assert max_diff(ours, theirs(ref, adapters["full"][1], noise(), sketches(2), adapter_conditioning_scale=0.7)) \
        <= TOL
    full = sd1.generate(PROMPTS, adapter_image=sketches(2), **run).images
    assert max_diff(full, plain) > 10 * TOL and max_diff(full, ours) > 10 * TOL  # the scale counts
    assert max_diff(full, theirs(ref, adapters["full"][1], noise(), sketches(2))) <= TOL
    zero = sd1.generate(PROMPTS, adapter_image=sketches(1)[0], adapter_conditioning_scale=0.0, **run).images
    assert np.array_equal(zero, plain)  # scale 0 adds zeros: the plain UNet bit for bit
    never = sd1.generate(PROMPTS, adapter_image=sketches(2), adapter_conditioning_factor=0.0, **run).images
    assert np.array_equal(never, plain)  # factor 0: no step gets the features
    early = sd1.generate(PROMPTS, adapter_image=sketches(2), adapter_conditioning_factor=0.4, **run).images
    assert max_diff(early, full) > 2 * TOL and max_diff(early, plain) > 2 * TOL  # the first 2 of 5 steps only
    called = sd1(PROMPTS, image=sketches(2), num_inference_steps=5, sampler="euler", guidance_scale=7.5,
                 latents=noise(), output_type="np", progress=False).images  # diffusers' image= of the adapter pipe
    assert np.array_equal(called, full)
    other = sd1.generate(PROMPTS, adapter_image=sketches(2, seed=9), **run).images
    assert max_diff(other, full) > 10 * TOL  # the image counts


def test_a_one_channel_adapter_reads_grey_images_and_two_adapters_sum(sd1, ref, adapters):
    run = dict(steps=4, sampler="euler", guidance_scale=7.5, latents=noise(1), output_type="np", progress=False)
    sd1.adapter = adapters["light"][0]
    grey = sketches(2, seed=6, mode="L")
    ours = sd1.generate(PROMPTS, adapter_image=grey, **run).images
    assert max_diff(ours, theirs(ref, adapters["light"][1], noise(1), grey, steps=4)) <= TOL
    rgb = [Image.merge("RGB", (g, g.point(lambda v: v // 2), g)) for g in grey]  # made grey as PIL's convert("L")
    assert max_diff(sd1.generate(PROMPTS, adapter_image=rgb, **run).images,
                    theirs(ref, adapters["light"][1], noise(1), [g.convert("L") for g in rgb], steps=4)) <= TOL

    sd1.adapter = [adapters["full"][0], adapters["other"][0]]
    scales = dict(adapter_conditioning_scale=[0.5, 1.2])
    images_ = [sketches(1, seed=7)[0], sketches(1, seed=8)[0]]  # one per adapter, for both prompts
    ours = sd1.generate(PROMPTS, adapter_image=images_, **run, **scales).images
    multi = diffusers.MultiAdapter([adapters["full"][1], adapters["other"][1]])
    per_adapter = [[im] * 2 for im in images_]  # diffusers: each adapter's batch, one image per prompt
    assert max_diff(ours, theirs(ref, multi, noise(1), per_adapter, steps=4, **scales)) <= TOL


def test_img2img_and_inpaint_take_an_adapter_and_keep_the_product(models, adapters):
    inpainter, img2img = models["sd1-inpaint"].pipe, models["sd1"].pipe
    try:
        img2img.adapter = adapters["full"][0]
        run = dict(steps=4, progress=False, output_type="np")
        with_adapter = img2img.img2img(images(2, seed=3), PROMPTS, strength=0.7, seed=[1, 2], adapter_image=sketches(2),
                                       **run).images
        alone = img2img.img2img(images(2, seed=3)[1], PROMPTS[1], strength=0.7, seed=2, adapter_image=sketches(2)[1],
                                **run).images
        assert max_diff(with_adapter[1:], alone) <= TOL
        inpainter.adapter = adapters["full"][0]
        x0, masks = images(2, seed=4), rect_masks(2, seed=4)
        out = inpainter.inpaint(x0, masks, PROMPTS, seed=[7, 8], steps=4, adapter_image=sketches(2), progress=False)
        plain = inpainter.inpaint(x0, masks, PROMPTS, seed=[7, 8], steps=4, adapter_image=sketches(2), progress=False,
                                  adapter_conditioning_scale=0.0)
        for got, base, img, mask in zip(out.images, plain.images, x0, masks):
            keep = np.asarray(mask) == 0
            assert np.array_equal(np.asarray(got)[keep], np.asarray(img)[keep])  # the product's pixels, exact
            assert np.abs(np.asarray(got).astype(int) - np.asarray(base).astype(int)).max() > 10
    finally:
        img2img.adapter = inpainter.adapter = None


def test_a_controlnet_and_an_adapter_run_together(sd1, adapters, tmp_path):
    from dataclasses import replace

    from pipeline_helpers import controlnet_folder

    run = dict(steps=3, sampler="euler", latents=noise(2), output_type="np", progress=False)
    sd1.controlnet = controlnet_folder(replace(sd1.config.unet), tmp_path / "net", 4)
    control = sketches(1, seed=11)[0]
    net_only = sd1.generate(PROMPTS, control_image=control, **run).images
    sd1.adapter = adapters["full"][0]
    both = sd1.generate(PROMPTS, control_image=control, adapter_image=sketches(2), **run).images
    no_net = sd1.generate(PROMPTS, control_image=control, controlnet_conditioning_scale=0.0,
                          adapter_image=sketches(2), **run).images
    sd1.controlnet = None
    adapter_only = sd1.generate(PROMPTS, adapter_image=sketches(2), **run).images
    assert np.array_equal(no_net, adapter_only)
    assert max_diff(both, net_only) > 10 * TOL and max_diff(both, adapter_only) > 10 * TOL


def test_bad_adapter_calls_are_named(sd1, models, adapters, tmp_path):
    from backdrop.diffusion.pipeline import Pipeline

    with pytest.raises(ValueError, match=r"adapter_image= needs a T2I-Adapter: Pipeline.from_pretrained\(\.\.\., "
                                         r"adapter=path\), or set pipe.adapter"):
        sd1.generate("a cat", steps=1, progress=False, adapter_image=sketches(1)[0])
    sd1.adapter = adapters["full"][0]
    for call, message in [
            (dict(), r"1 T2I-Adapter loaded: give adapter_image="),
            (dict(adapter_image=sketches(1)[0], adapter_conditioning_factor=1.5),
             r"adapter_conditioning_factor must be a number in \[0, 1\]"),
            (dict(adapter_image=sketches(1)[0], adapter_conditioning_scale=[1.0, 2.0]),
             r"adapter_conditioning_scale: 2 values for the 1 T2I-Adapters loaded"),
            (dict(adapter_image="sketch.png"), r"adapter_image: a path string")]:
        with pytest.raises((ValueError, TypeError), match=message):
            sd1.generate("a cat", steps=1, progress=False, **call)
    sd1.adapter = [adapters["full"][0], adapters["other"][0]]
    with pytest.raises(ValueError, match=r"adapter_image: 3 adapter images for the 2 T2I-Adapters loaded"):
        sd1.generate("a cat", steps=1, progress=False, adapter_image=sketches(3))
    with pytest.raises(ValueError, match=r"save_pretrained: a T2I-Adapter is set"):
        sd1.save_pretrained(tmp_path / "saved")
    from backdrop.nn.t2i_adapter import T2IAdapter
    with pytest.raises(ValueError, match=r"T2I-Adapter 0: features of \[48, 64\] channels do not fit this UNet's "
                                         r"down levels \(\[32, 64, 64, 64\]\): an adapter for another base model"):
        sd1.adapter = T2IAdapter(T2IAdapterConfig(3, (48, 64), 1, 8))
    with pytest.raises(TypeError, match=r"pipe.adapter takes T2IAdapters \(nn/t2i_adapter.py\) or their folders, "
                                        r"got int"):
        sd1.adapter = 12
    assert len(sd1._t2i) == 2  # a refused setting leaves the adapters as they were
    from backdrop.nn.controlnet import load_controlnet
    from backdrop.nn.ldm_keys import CheckpointError
    with pytest.raises(CheckpointError, match=r"_class_name 'T2IAdapter': not a ControlNetModel .*; a T2IAdapter is "
                                              r"given as adapter= \(pipe.adapter\), not as a ControlNet"):
        load_controlnet(adapters["full"][0])
    with pytest.raises(ValueError, match=r"adapter= needs the torch backend, not onnxruntime"):
        Pipeline.from_pretrained(models["sd1"].folder, backend="onnxruntime", adapter=adapters["full"][0])
