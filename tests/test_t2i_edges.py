"""T2I-Adapter edge cases the main tests (tests/test_t2i_pipeline.py, tests/test_t2i_cli.py) leave open: a 1-channel
adapter greys RGB exactly as PIL's convert("L"); the factor window counts int(steps * factor) calls; the features
count without guidance too; adapter images per item when a call splits its items (per-item strengths, inpaint items
with nothing to repaint, num_images_per_prompt); adapter images padded (a size no multiple of 8) and cropped
(inpaint's crop_padding) as the pixels; generate's size from the adapter image, a control image's first;
pipe(prompt, image=, adapter_image=) is img2img; img2img's factor and inpaint's default scale; pipe.adapter's getter,
its casts, an adapter of fewer levels, to() moving adapters; the scale checked; on the command line one
--adapter-scale for two adapters, the parameters naming every adapter and image, a folder that is no adapter and a
file given as --adapter refused in one line."""
import numpy as np
import pytest
import torch
from PIL import Image

from backdrop.nn.t2i_adapter import T2IAdapter, T2IAdapterConfig

from pipeline_helpers import PROMPTS, TOL, images, max_diff, rect_masks
from test_t2i_cli import api, cli, files, png  # noqa: F401 (files: a fixture)
from test_t2i_pipeline import adapters, noise, sd1, sketches  # noqa: F401 (adapters, sd1: fixtures)

diffusers = pytest.importorskip("diffusers")
pytestmark = [pytest.mark.usefixtures("one_thread"),  # conftest.py
              pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")]

RUN = dict(sampler="euler", output_type="np", progress=False)


def test_a_one_channel_adapter_greys_rgb_as_pils_convert_l(sd1, adapters):
    """Any RGB (R, G, B all different, not a grey ramp) gives what its convert("L") gives: ITU-R 601-2, rounded."""
    sd1.adapter = adapters["light"][0]
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    run = dict(RUN, steps=2, latents=noise()[:1])
    got = sd1.generate(PROMPTS[1], adapter_image=rgb, **run).images
    assert np.array_equal(got, sd1.generate(PROMPTS[1], adapter_image=rgb.convert("L"), **run).images)


def test_grey_is_pils_convert_l_exactly():
    """Every 8-bit RGB value greys to PIL's "L" value / 255 (an absolute check: diffusers' tolerance misses 1/256)."""
    from backdrop.diffusion.t2i import _grey

    a = np.random.default_rng(1).integers(0, 256, (32, 64, 3), dtype=np.uint8)
    a[0, :3] = [[255, 255, 255], [0, 0, 0], [255, 0, 0]]
    x = torch.from_numpy(a.astype(np.float32) / 255.0).permute(2, 0, 1)[None]  # as control.Control.at makes it
    want = np.asarray(Image.fromarray(a).convert("L"), np.float32) / 255
    assert torch.equal(_grey(x)[0, 0], torch.from_numpy(want))


def test_the_factor_window_is_int_of_steps_times_factor(sd1, adapters):
    """5 steps: factor 0.7 gives the first int(3.5) = 3 calls the features, as 0.6 does; 0.8 gives 4."""
    sd1.adapter = adapters["full"][0]
    run = dict(RUN, steps=5, guidance_scale=7.5, latents=noise())
    out = {f: sd1.generate(PROMPTS, adapter_image=sketches(2), adapter_conditioning_factor=f, **run).images
           for f in (0.6, 0.7, 0.8)}
    assert np.array_equal(out[0.7], out[0.6]) and max_diff(out[0.8], out[0.7]) > TOL


def test_without_guidance_the_features_count(sd1, adapters):
    run = dict(RUN, steps=3, guidance_scale=1.0, latents=noise())
    plain = sd1.generate(PROMPTS, **run).images
    sd1.adapter = adapters["full"][0]
    got = sd1.generate(PROMPTS, adapter_image=sketches(2), **run).images
    assert max_diff(got, plain) > 10 * TOL


def test_items_split_by_strength_or_repeated_keep_their_adapter_images(sd1, adapters):
    """img2img runs each strength's items in their own loop; num_images_per_prompt repeats a request's image."""
    sd1.adapter = adapters["full"][0]
    x0, sk = images(2, seed=3), sketches(2, seed=12)
    run = dict(RUN, steps=3)
    both = sd1.img2img(x0, PROMPTS, strength=[0.5, 0.9], seed=[1, 2], adapter_image=sk, **run).images
    alone = sd1.img2img(x0[1], PROMPTS[1], strength=0.9, seed=2, adapter_image=sk[1], **run).images
    other = sd1.img2img(x0[1], PROMPTS[1], strength=0.9, seed=2, adapter_image=sk[0], **run).images
    assert max_diff(both[1:], alone) <= TOL < max_diff(other, alone)
    lat = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    got = sd1.generate(PROMPTS, num_images_per_prompt=2, steps=2, latents=lat, adapter_image=sk, **RUN).images
    want = sd1.generate([PROMPTS[0]] * 2 + [PROMPTS[1]] * 2, steps=2, latents=lat, adapter_image=[sk[0]] * 2 +
                        [sk[1]] * 2, **RUN).images
    assert got.shape == (4, 64, 64, 3) and max_diff(got, want) <= 1e-5


def test_inpaint_items_with_nothing_to_repaint_and_a_crop_keep_the_adapter_images(models, adapters):
    pipe = models["sd1-inpaint"].pipe
    try:
        pipe.adapter = adapters["full"][0]
        x0, masks, sk = images(2, seed=4), rect_masks(2, seed=4), sketches(2, seed=13)
        masks[0] = Image.new("L", (64, 64), 0)  # item 0: nothing to repaint, item 1 alone is sampled
        run = dict(RUN, steps=3, paste_back=False)
        batch = pipe.inpaint(x0, masks, PROMPTS, seed=[1, 2], adapter_image=sk, **run).images
        alone = pipe.inpaint(x0[1], masks[1], PROMPTS[1], seed=2, adapter_image=sk[1], **run).images
        other = pipe.inpaint(x0[1], masks[1], PROMPTS[1], seed=2, adapter_image=sk[0], **run).images
        assert max_diff(batch[1:], alone) <= TOL < max_diff(other, alone)
        default = pipe.inpaint(x0[1], masks[1], PROMPTS[1], seed=2, adapter_image=sk[1], steps=2, progress=False)
        one = pipe.inpaint(x0[1], masks[1], PROMPTS[1], seed=2, adapter_image=sk[1], steps=2, progress=False,
                           adapter_conditioning_scale=1.0)
        assert np.array_equal(np.asarray(default.images[0]), np.asarray(one.images[0]))  # inpaint's default: 1
        # crop_padding: a 96 x 80 photo worked on at 64 x 64 around its mask; the adapter image is cut as the photo
        big, mask = images(1, 96, 80, seed=5)[0], np.zeros((96, 80), np.uint8)
        mask[40:60, 30:50] = 255
        out = pipe.inpaint(big, Image.fromarray(mask), "a cat", seed=3, steps=2, crop_padding=8,
                           adapter_image=sketches(1, seed=14)[0], progress=False).images[0]
        keep = mask == 0
        assert np.asarray(out).shape == (96, 80, 3) and np.array_equal(np.asarray(out)[keep], np.asarray(big)[keep])
    finally:
        pipe.adapter = None


def test_sizes_no_multiple_of_8_and_generates_default_size(sd1, adapters, tmp_path):
    """The adapter image is padded as the pixels are; without a size generate makes the adapter image's, a
    ControlNet's control image's first."""
    from pipeline_helpers import controlnet_folder

    sd1.adapter = adapters["full"][0]
    out = {s: sd1.generate("a cat", height=60, width=52, seed=1, steps=2, adapter_image=sketches(1)[0],
                           adapter_conditioning_scale=s, **RUN).images for s in (0.0, 1.0)}
    assert out[1.0].shape == (1, 60, 52, 3) and max_diff(out[1.0], out[0.0]) > 10 * TOL
    small = sketches(1, seed=14)[0].resize((40, 48))  # 48 x 40 (H x W)
    assert sd1.generate("a cat", seed=1, steps=1, adapter_image=small, **RUN).images.shape == (1, 48, 40, 3)
    sd1.controlnet = controlnet_folder(sd1.config.unet, tmp_path / "net", 4)
    both = sd1.generate("a cat", seed=1, steps=1, control_image=sketches(1)[0].resize((56, 32)), adapter_image=small,
                        **RUN).images
    assert both.shape == (1, 32, 56, 3)


def test_pipe_call_with_image_and_adapter_image_is_img2img_and_img2img_takes_the_factor(sd1, adapters):
    sd1.adapter = adapters["full"][0]
    photo, sk = images(1, seed=6)[0], sketches(1, seed=15)[0]
    run = dict(seed=1, strength=0.6, adapter_image=sk, output_type="np", progress=False)
    called = sd1(PROMPTS[1], image=photo, num_inference_steps=3, **run).images
    assert np.array_equal(called, sd1.img2img(photo, PROMPTS[1], steps=3, **run).images)
    never = sd1.img2img(photo, PROMPTS[1], steps=3, adapter_conditioning_factor=0.0, **run).images
    zero = sd1.img2img(photo, PROMPTS[1], steps=3, adapter_conditioning_scale=0.0, **run).images
    assert np.array_equal(never, zero) and max_diff(never, called) > 10 * TOL


def test_the_adapter_property_casts_takes_fewer_levels_and_to_moves_it(models, adapters):
    from backdrop.diffusion.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(models["sd1"].folder, device="cpu", dtype=torch.float32,
                                    adapter=adapters["full"][0])
    assert isinstance(pipe.adapter, T2IAdapter)  # one: the adapter itself, as diffusers' pipe.adapter
    short = T2IAdapter(T2IAdapterConfig(3, (32, 64), 1, 8)).double()  # features for the first 2 down levels only
    pipe.adapter = [adapters["full"][0], short]
    assert isinstance(pipe.adapter, list) and len(pipe.adapter) == 2 and pipe.adapter[1] is short
    assert all(p.dtype == torch.float32 for a in pipe.adapter for p in a.parameters())  # cast in place
    with pytest.raises(TypeError, match=r"pipe.adapter takes T2IAdapters .* got Linear"):
        pipe.adapter = [short, torch.nn.Linear(1, 1)]
    assert len(pipe.adapter) == 2  # refused: unchanged
    sk = sketches(2, seed=16)
    run = dict(prompt="a cat", seed=2, steps=1, adapter_image=sk, **RUN)
    both = pipe.generate(**run).images
    assert max_diff(both, pipe.generate(**run, adapter_conditioning_scale=[1.0, 0.0]).images) > TOL
    pipe.to(torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for a in pipe.adapter for p in a.parameters())
    assert np.isfinite(pipe.generate(**run).images).all()
    pipe.adapter = None
    assert pipe.adapter is None


def test_bad_scales_are_named(sd1, adapters):
    sd1.adapter = adapters["full"][0]
    for bad in (float("nan"), float("inf"), "1", True):
        with pytest.raises(ValueError, match=r"adapter_conditioning_scale must be a finite number"):
            sd1.generate("a cat", steps=1, progress=False, adapter_image=sketches(1)[0],
                         adapter_conditioning_scale=bad)
    for bad in ("0.5", True, float("nan")):
        with pytest.raises(ValueError, match=r"adapter_conditioning_factor must be a number in \[0, 1\]"):
            sd1.generate("a cat", steps=1, progress=False, adapter_image=sketches(1)[0],
                         adapter_conditioning_factor=bad)


def test_heun_at_factor_1_equals_diffusers_adapter_pipeline(sd1, ref, adapters):
    """heun's 2N - 1 UNet calls all get the features at factor 1 (mutation round 7 found the last N - 1 without)."""
    sd1.adapter = adapters["full"][0]
    ours = sd1.generate(PROMPTS, steps=3, sampler="heun", guidance_scale=7.5, latents=noise(), output_type="np",
                        adapter_image=sketches(2), progress=False).images
    base = ref("sd1", "txt2img", "heun")
    parts = {k: v for k, v in base.components.items() if k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")}
    pipe = diffusers.StableDiffusionAdapterPipeline(**parts, adapter=adapters["full"][1], safety_checker=None,
                                                    feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(PROMPTS, image=sketches(2), num_inference_steps=3, guidance_scale=7.5, latents=noise().clone(),
                  output_type="np").images
    assert max_diff(ours, theirs) <= TOL


def test_cli_one_scale_for_two_adapters_and_the_parameters_name_each(files, capsys, tmp_path):
    a, b = files["sketch-a"], files["sketch-b"]
    code, [path], err = cli(capsys, "generate", "--seed", "4", "--adapter", files["full"], "--adapter", files["light"],
                            "--adapter-image", a, "--adapter-image", b, "--adapter-scale", "0.5", model=files["tiny"],
                            out=tmp_path)
    assert code == 0 and err == "", err
    got, text = png(path)
    want = api(files["tiny"], "generate", [files["full"], files["light"]], seed=4,
               adapter_image=[Image.open(a), Image.open(b)], adapter_conditioning_scale=0.5)[0]
    assert np.array_equal(got, want)
    assert f'T2I-Adapter: "{files["full"]}:0.5, {files["light"]}:0.5", Adapter image: "{a}, {b}"' in text, text
    code, [path], err = cli(capsys, "generate", "--seed", "4", "--adapter", files["full"], "--adapter-image", a,
                            model=files["tiny"], out=tmp_path / "default")
    assert code == 0 and f'T2I-Adapter: "{files["full"]}:1"' in png(path)[1]


def test_cli_refuses_a_folder_that_is_no_adapter_and_a_file_in_one_line(files, capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    for given, said in ((tmp_path / "empty", "not a T2I-Adapter folder (no config.json)"),
                        (files["sketch-a"], "no such folder (a diffusers T2IAdapter folder)")):
        code, _, err = cli(capsys, "generate", "--adapter", given, "--adapter-image", files["sketch-a"],
                           model=files["tiny"], out=tmp_path / "out")
        assert code == 2 and "\n" not in err and "Traceback" not in err and f"--adapter {given}: " in err, err
        assert said in err, err
