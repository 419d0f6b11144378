"""The Pipeline's API as users call it: diffusers' argument names and generators (equal to diffusers' images),
mask_threshold, callbacks, progress and interrupts, long prompts, to(), loading by name, and errors that name the
argument at fault (or say what to use instead of a diffusers argument we do not take)."""
import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from backdrop.diffusion.pipeline import Pipeline, SamplingInterrupted
from backdrop.diffusion.text import clip_cut
from backdrop.nn.checkpoint import save_model
from backdrop.nn.resolve import default_dtype, parse_dtype, resolve_model, unet_width

from pipeline_helpers import PROMPTS, TOL, generators, images, max_diff, rect_masks, u8

pytestmark = [pytest.mark.usefixtures("one_thread"),  # conftest.py
              pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                         "ignore::UserWarning")]


@pytest.mark.parametrize("sampler", ["euler-a", "dpmpp-2m", "lcm"])
def test_diffusers_argument_names_and_generators_equal_diffusers(models, ref, sampler):
    """Code written for diffusers runs unchanged: num_inference_steps, generator (one for the batch, or one per
    image; euler-a and lcm draw from it at every step too) and output_type "pt" give diffusers' own images."""
    pipe = models["sd1"].pipe
    for gen in (lambda: torch.Generator().manual_seed(3), lambda: generators([3, 4])):
        ours = pipe.generate(PROMPTS, num_inference_steps=4, sampler=sampler, generator=gen(), output_type="pt",
                             progress=False)
        theirs = ref("sd1", "txt2img", sampler)(PROMPTS, num_inference_steps=4, generator=gen(), output_type="pt",
                                                height=64, width=64).images
        assert isinstance(ours.images, torch.Tensor) and ours.images.shape == theirs.shape == (2, 3, 64, 64)
        assert theirs.std() > 0.05 and max_diff(ours.images, theirs) <= TOL
    assert ours.seeds == [3, 4]  # the generators' initial seeds
    with pytest.raises(ValueError, match="seed= or generator="):
        pipe.generate("a", seed=1, generator=torch.Generator())
    with pytest.raises(ValueError, match="generator: 1 generators for 2 images"):
        pipe.generate("a", num_images_per_prompt=2, generator=[torch.Generator()])
    with pytest.raises(TypeError, match="steps= and num_inference_steps="):
        pipe.generate("a", steps=2, num_inference_steps=2)


@pytest.mark.parametrize("sampler", ["euler", "dpmpp-2m", "ddim"])
def test_callback_on_step_end_sees_and_sets_diffusers_latents(models, ref, sampler):
    """diffusers' callback_on_step_end(pipe, step, timestep, callback_kwargs): the same latents at every step as
    diffusers' loop holds them (sigma's scale for Euler, VP-scaled for the others), the same timesteps, and latents
    it returns replace ours as they replace diffusers' (the final images agree)."""
    pipe = models["sd1"].pipe
    seen = {"ours": [], "theirs": []}

    def record(who):
        def on_step_end(p, step, timestep, kwargs):
            seen[who].append((step, float(timestep), kwargs["latents"].clone()))
            return {"latents": kwargs["latents"] * 0.9} if step == 1 else {}
        return on_step_end
    ours = pipe.generate(PROMPTS[0], num_inference_steps=3, sampler=sampler, output_type="pt", progress=False,
                         generator=torch.Generator().manual_seed(5), callback_on_step_end=record("ours"))
    theirs = ref("sd1", "txt2img", sampler)(PROMPTS[0], num_inference_steps=3, output_type="pt", height=64, width=64,
                                            generator=torch.Generator().manual_seed(5),
                                            callback_on_step_end=record("theirs")).images
    assert [s[:2] for s in seen["ours"]] == [s[:2] for s in seen["theirs"]] and len(seen["ours"]) == 3
    for (_, _, a), (_, _, b) in zip(seen["ours"], seen["theirs"]):
        assert (a - b).abs().max() <= 1e-3 * max(1.0, b.abs().max())
    assert max_diff(ours.images, theirs) <= TOL


def test_diffusers_inpaint_names_equal_ours(models):
    """mask_image= is mask=, padding_mask_crop= is crop_padding=, torch_dtype= is dtype=; output_type "pt" is
    "np" as (B, 3, H, W) also when an item is returned unchanged."""
    pipe = models["sd1-inpaint"].pipe
    img, mask = images(1)[0], rect_masks(1)[0]
    ours = pipe.inpaint(img, mask, prompt="x", steps=2, seed=1, crop_padding=4, output_type="np", progress=False)
    theirs = pipe.inpaint(image=img, mask_image=mask, prompt="x", num_inference_steps=2, seed=1,
                          padding_mask_crop=4, output_type="pt", progress=False)
    assert np.array_equal(ours.images, theirs.images.permute(0, 2, 3, 1).numpy())
    empty = Image.new("L", (64, 64), 0)
    mixed = pipe.inpaint([img, img], [mask, empty], prompt="x", steps=2, seed=1, crop_padding=4, output_type="pt",
                         progress=False)
    assert mixed.unchanged == [1] and np.array_equal(mixed.images[0], theirs.images[0])
    assert np.array_equal(mixed.images[1].permute(1, 2, 0).numpy() * 255, np.asarray(img, np.float32))
    p32 = Pipeline.from_pretrained(models["sd1"].folder, device="cpu", torch_dtype=torch.float32)
    assert next(p32.backend.model.unet.parameters()).dtype == torch.float32


def test_calling_the_pipeline_picks_the_method_as_diffusers_pipelines_do(models):
    """pipe(prompt, image=, mask_image=) as code written for diffusers' pipelines calls them."""
    pipe = models["sd1-inpaint"].pipe
    img, mask = images(1)[0], rect_masks(1)[0]
    common = dict(num_inference_steps=2, seed=1, output_type="np", progress=False)
    same = lambda a, b: np.array_equal(a.images, b.images)  # noqa: E731
    assert same(pipe("x", image=img, mask_image=mask, **common), pipe.inpaint(img, mask, prompt="x", **common))
    assert same(pipe(prompt="x", image=img, product_mask=mask, **common),
                pipe.inpaint(img, product_mask=mask, prompt="x", **common))
    assert same(pipe("x", image=img, strength=0.5, **common), pipe.img2img(img, "x", strength=0.5, **common))
    assert same(pipe("x", height=32, **common), pipe.generate("x", height=32, **common))
    # wrapper code passes None for what it does not use
    assert same(pipe("x", image=img, mask=None, product_mask=None, strength=0.5, **common),
                pipe.img2img(img, "x", strength=0.5, **common))
    assert same(pipe("x", image=img, mask_image=mask, mask=None, **common), pipe.inpaint(img, mask, "x", **common))
    with pytest.raises(TypeError, match="a mask without image="):
        pipe("x", mask_image=mask)
    with pytest.raises(TypeError, match="takes the prompt first.*got a Image there: pass the image as image="):
        pipe(img, mask_image=mask)


def test_mask_threshold_keeps_a_noisy_product_mask_exact(models):
    """A JPEG-saved product mask is 252..255 on the product: unthresholded, those pixels are partly repainted
    (grey = soft mask); mask_threshold=0.5 binarises the mask first, so the whole product stays bit-identical."""
    pipe = models["sd1-inpaint"].pipe
    img = images(1)[0]
    product = np.zeros((64, 64), np.uint8)
    product[16:48, 16:48] = 255
    product[20:44, 20:44] -= np.random.default_rng(0).integers(0, 4, (24, 24)).astype(np.uint8)  # JPEG-ish noise
    keep = product > 0
    run = dict(prompt="x", steps=2, seed=1, progress=False, mask_dilate=0)
    soft = u8(pipe.inpaint(img, product_mask=Image.fromarray(product), **run).images[0])
    exact = u8(pipe.inpaint(img, product_mask=Image.fromarray(product), mask_threshold=0.5, **run).images[0])
    assert np.array_equal(exact[keep], u8(img)[keep])
    assert not np.array_equal(soft[keep], u8(img)[keep])
    with pytest.raises(ValueError, match=r"mask_threshold must be a number in \(0, 1\] or None, got 0"):
        pipe.inpaint(img, product_mask=Image.fromarray(product), mask_threshold=0, **run)


def test_diffusers_arguments_we_lack_say_what_to_use_instead(models):
    """Code written for diffusers fails before any work, naming the argument and our way to do it: diffusers'
    arguments we lack, its prompt-first order, its (step, timestep, latents) callback."""
    pipe = models["sd1"].pipe
    img, mask = images(1)[0], rect_masks(1)[0]
    refused = [(lambda: pipe.generate("x", callback_on_step_end=lambda *a: {}, callback=lambda i, x: None),
                r"generate\(\) got callback= and callback_on_step_end=; give one"),
               (lambda: pipe.generate("x", callback_on_step_end=1), r"callback_on_step_end must be callable"),
               (lambda: Pipeline.from_pretrained(models["sd1"].folder, callback_on_step_end=print),
                r"from_pretrained\(\) does not take diffusers' callback_on_step_end=: it makes no images"),
               (lambda: pipe.generate("x", cross_attention_kwargs={"scale": 0.5}), r"lora_scale="),
               (lambda: pipe.generate("x", strength=0.5), r"strength=: strength is img2img's and inpaint's"),
               (lambda: pipe.inpaint(img, mask, "x", height=64), r"inpaint\(\) does not take diffusers' height=: "
                r"the output has the input image's size"),
               (lambda: Pipeline.from_pretrained(models["sd1"].folder, safety_checker=object()), r"no safety checker"),
               (lambda: pipe.img2img("a cat", img), r"img2img\(\) takes the image first.*'a cat'.*prompt= and "
                r"image= by name"),
               (lambda: pipe.inpaint(["a cat"], img, mask), r"inpaint\(\) takes the image first"),
               (lambda: pipe.generate("x", callback=lambda step, t, latents: None), r"callback must be callable as "
                r"callback\(step, latents\).*diffusers' deprecated callback took \(step, timestep, latents\)"),
               (lambda: pipe.generate("x", callback=True), r"callback must be callable .*; got True")]
    for call, message in refused:
        with pytest.raises(TypeError, match=message):
            call()
    steps = []  # callables that take (step, latents) in any way are fine: extra defaults, *args, builtins
    pipe.generate("x", steps=2, progress=False, output_type="latent", callback=lambda *a, extra=0: steps.append(a[0]))
    assert steps == [0, 1]


def test_a_numpy_int_seed_counts_up_like_an_int(models):
    """seed=np.int64(s) (from an array of seeds, numpy's RNG) gives item m seed s + m, as seed=s does, not the same
    seed to every request."""
    from backdrop.diffusion.batching import seeds

    assert seeds(np.int64(3), 2, 2) == seeds(3, 2, 2) == [3, 4, 5, 6]
    out = models["sd1"].pipe.generate(["a", "a"], seed=np.int64(3), steps=1, progress=False, output_type="latent")
    assert out.seeds == [3, 4] and not torch.equal(out.images[0], out.images[1])
    with pytest.raises(ValueError, match="seed True must be an int"):
        seeds(True, 1, 1)


def test_inpaint_latents_are_checked_against_every_item(models):
    """latents hold one row per output item, also for items with nothing to repaint (returned as the input): a
    wrong batch is refused, not sliced, and the rows of the repainted items are the ones used."""
    pipe = models["sd1-inpaint"].pipe
    img, mask, empty = images(1)[0], rect_masks(1)[0], Image.new("L", (64, 64), 0)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    run = dict(prompt="x", steps=2, progress=False, output_type="np")
    both = pipe.inpaint([empty.convert("RGB"), img], [empty, mask], latents=noise, **run)
    alone = pipe.inpaint(img, mask, latents=noise[1:], **run)
    assert both.unchanged == [0] and np.array_equal(both.images[1], alone.images[0])
    for bad, message in ((torch.randn(3, 4, 8, 8), r"latents must have shape \(2, 4, 8, 8\) .*, got \(3, 4, 8, 8\)"),
                         ([noise], "latents must be a float tensor or array")):
        with pytest.raises(ValueError, match=message):
            pipe.inpaint([img, img], [empty, mask], latents=bad, **run)


def test_callback_progress_and_interrupt(models, capsys):
    import threading

    pipe = models["sd1"].pipe
    steps_seen = []
    pipe.generate("x", steps=4, seed=0, progress=False, output_type="latent",
                  callback=lambda i, x: steps_seen.append((i, tuple(x.shape))))
    assert steps_seen == [(i, (1, 4, 8, 8)) for i in range(4)]
    assert capsys.readouterr().err == ""
    pipe.generate("x", steps=2, seed=0, progress=True, output_type="latent")
    assert "0/2" in capsys.readouterr().err  # tqdm's bar on stderr (later refreshes are rate-limited)
    stop = threading.Event()
    with pytest.raises(SamplingInterrupted, match="before step 2"):
        pipe.generate("x", steps=5, seed=0, progress=False, interrupt=stop,
                      callback=lambda i, x: stop.set() if i == 1 else None)
    stop.clear()  # set during the last step: nothing is decoded, and the message says where it stopped
    with pytest.raises(SamplingInterrupted, match="after the last step, before decoding"):
        pipe.generate("x", steps=3, seed=0, progress=False, interrupt=stop,
                      callback=lambda i, x: stop.set() if i == 2 else None)


def test_diffusers_pipeline_switches(models, capsys):
    """The switches diffusers code calls on a pipeline: set_progress_bar_config(disable=True) sets every call's
    default (a call's own progress= still wins); the attention switches are no-ops (attention is always
    memory-efficient) and change no image; safety_checker=None asks for what we do; pipe.device / pipe.dtype are
    the backend's; what we lack is an AttributeError saying what to do instead."""
    pipe = Pipeline.from_pretrained(models["sd1"].folder, device="cpu", dtype="fp32", safety_checker=None,
                                    requires_safety_checker=False)  # its own pipeline: the switches stick
    run = dict(prompt="x", steps=2, seed=0, output_type="np")
    pipe.set_progress_bar_config(disable=True)
    plain = pipe.generate(**run).images
    assert capsys.readouterr().err == ""
    pipe.generate(**run, progress=True)
    assert "0/2" in capsys.readouterr().err
    pipe.set_progress_bar_config(disable=False)
    pipe.generate(**run)
    assert "0/2" in capsys.readouterr().err
    pipe.set_progress_bar_config(disable=None, leave=False, desc="x")  # None: tqdm's "on a terminal only"
    pipe.generate(**run)
    assert capsys.readouterr().err == ""  # pytest's captured stderr is no terminal
    log = io.StringIO()  # tqdm's options go to tqdm, as in diffusers: an app writes the bars into its own log
    pipe.set_progress_bar_config(file=log, desc="denoising", ascii=True, leave=True)
    pipe.generate(**run)
    assert "denoising: 100%|##########| 2/2" in log.getvalue() and capsys.readouterr().err == ""
    with pytest.raises(TypeError, match="tqdm takes no colour_scheme, total .it takes ascii, bar_format"):
        pipe.set_progress_bar_config(total=3, colour_scheme="red")
    for switch in (pipe.enable_xformers_memory_efficient_attention, pipe.enable_attention_slicing,
                   pipe.disable_attention_slicing, pipe.disable_xformers_memory_efficient_attention):
        switch()
    assert np.array_equal(pipe.generate(**run, progress=False).images, plain)
    with pytest.raises(TypeError, match=r"disable=\) must be True, False or None"):
        pipe.set_progress_bar_config(disable="yes")
    assert (pipe.device, pipe.dtype) == (torch.device("cpu"), torch.float32)
    torch.Generator(pipe.device).manual_seed(0)  # the diffusers docs' idiom
    with pytest.raises(AttributeError, match="no scheduler to replace .*sampler= one of .*unipc"):
        pipe.scheduler = object()
    lacking = {"scheduler": "sampler= one of", "unet": r"pipe.backend.model.unet",
               "enable_model_cpu_offload": "one device",
               "components": r"pipe.backend.model.unet"}
    for name, hint in lacking.items():
        with pytest.raises(AttributeError, match=rf"Pipeline has no {name} \(diffusers' pipelines do\): .*{hint}"):
            getattr(pipe, name)
        assert not hasattr(pipe, name)

    class Mine(Pipeline):  # an AttributeError inside a subclass's property keeps its own message
        @property
        def broken(self):
            return self.backend.no_such_thing
    with pytest.raises(AttributeError, match="no_such_thing"):
        Mine(pipe.backend).broken
    with pytest.raises(ValueError, match="is a link; Backdrop does not download"):
        Pipeline.from_single_file("https://huggingface.co/x/y.safetensors")


def test_prompts_over_77_tokens_are_cut_with_a_warning(models, caplog):
    pipe = models["sd1"].pipe
    long = " ".join(["red"] * 75 + ["ceramic", "mug"])  # BOS + 77 words + EOS: the last two do not fit
    with caplog.at_level("WARNING", logger="backdrop.diffusion.text"):
        a = pipe.generate([long, "short"], steps=1, seed=0, progress=False, output_type="latent").images
    [record] = caplog.records  # one warning, for the long prompt only
    assert "'ceramic mug'" in record.getMessage()
    cut = pipe.generate([" ".join(["red"] * 75), "short"], steps=1, seed=0, progress=False,
                        output_type="latent").images
    assert torch.equal(a, cut)  # what is kept is exactly the first 75 tokens
    # clip_cut says what is kept (the server's revised_prompt) in the tokenizer's normal form
    tok = pipe.backend.tokenizer
    assert clip_cut(tok, "A  Red mug") is None and clip_cut(tok, " ".join(["red"] * 75)) is None
    kept, dropped = clip_cut(tok, long.upper().replace(" ", "  "))
    assert (kept, dropped) == (" ".join(["red"] * 75), "ceramic mug")
    assert torch.equal(tok([kept]), tok([long]))
    caplog.clear()
    with caplog.at_level("WARNING", logger="backdrop.diffusion.text"):  # a 4000-character prompt: a line, not 4 KB
        pipe.encode_prompt(" ".join(["red"] * 75 + ["blue"] * 800))
    [record] = caplog.records
    assert len(record.getMessage()) < 200 and "(3999 characters)" in record.getMessage()


def test_to_casts_in_place_like_loading_in_that_dtype(models):
    """diffusers' pipe.to(torch.bfloat16) / pipe.to("cpu", "fp32"): the same pipeline, its weights cast in place,
    sampling as one loaded in that precision."""
    folder, run = models["sd1"].folder, dict(steps=2, seed=3, progress=False, output_type="np")
    pipe = Pipeline.from_pretrained(folder, device="cpu", dtype=torch.float32)
    assert pipe.to(torch.bfloat16) is pipe and pipe.backend.dtype == torch.bfloat16
    bf16 = Pipeline.from_pretrained(folder, device="cpu", dtype="bf16")
    assert np.array_equal(pipe.generate("a", **run).images, bf16.generate("a", **run).images)
    assert pipe.to("cpu", "fp32").backend.dtype == next(pipe.backend.model.unet.parameters()).dtype == torch.float32


def test_torch_dtype_auto_loads_as_stored(models, tmp_path):
    """diffusers' torch_dtype="auto": the precision the weights are stored in, for a folder and a single file (the
    built-in model ships fp16 weights); --dtype auto on the commands."""
    from backdrop.nn.checkpoint import load_model
    from backdrop.nn.weight_files import stored_dtype
    half = load_model(models["sd1"].folder, dtype=torch.float16)
    for layout in ("diffusers", "ldm"):
        saved = save_model(half, tmp_path / ("half" if layout == "diffusers" else "half.safetensors"), layout=layout)
        pipe = Pipeline.from_pretrained(saved, device="cpu", torch_dtype="auto")
        assert pipe.dtype == next(pipe.backend.model.unet.parameters()).dtype == torch.float16
    assert stored_dtype(models["sd1"].folder) == torch.float32 and stored_dtype("backdrop-tiny") is None
    assert stored_dtype(resolve_model("backdrop-tiny")) == torch.float16


def test_loading_single_file_names_and_defaults(models, tmp_path):
    sd1 = models["sd1"]
    single = save_model(sd1.pipe.backend.model, tmp_path / "tiny.safetensors", layout="ldm")
    a = Pipeline.from_pretrained(single, device="cpu", dtype="fp32").generate("x", steps=2, seed=1,
                                                                            progress=False, output_type="np")
    b = sd1.pipe.generate("x", steps=2, seed=1, progress=False, output_type="np")
    assert max_diff(a.images, b.images) <= 1e-5  # same weights; the LDM layout's reshaped tensors round alike
    c = Pipeline.from_single_file(single, device="cpu", torch_dtype=torch.float32)  # diffusers' spelling
    assert np.array_equal(c.generate("x", steps=2, seed=1, progress=False, output_type="np").images, a.images)
    with pytest.raises(FileNotFoundError, match="is not a file .*from_pretrained"):
        Pipeline.from_single_file(sd1.folder)
    with pytest.raises(FileNotFoundError, match=r"'no-such-model'.*not a built-in model \(built-in: "):
        resolve_model("no-such-model")
    with pytest.raises(TypeError, match="is not a Backend"):
        Pipeline(object())
    assert default_dtype("cuda") == torch.float16
    assert default_dtype("cpu") in (torch.float32, torch.bfloat16)  # bf16 where the CPU has avx512_bf16/AMX
    assert unet_width(Path(sd1.folder)) == unet_width(single) == 64  # read from config.json / file metadata
    assert default_dtype("cpu", 64) == torch.float32  # tiny models are overhead-bound: bf16 does not pay
    assert parse_dtype("bf16") == torch.bfloat16
    with pytest.raises(ValueError, match="dtype 'int8' is not one of"):
        parse_dtype("int8")


def test_bad_inputs_are_named(models):
    pipe = models["sd1-inpaint"].pipe
    img = images(1)[0]
    small = Image.new("L", (32, 32), 255)
    with pytest.raises(ValueError, match=r"mask is 32x32 \(HxW\) but the image is 64x64"):
        pipe.inpaint(img, small, prompt="x", steps=2, progress=False)
    with pytest.raises(ValueError, match="not both"):
        pipe.inpaint(img, small, product_mask=small, prompt="x", progress=False)
    with pytest.raises(ValueError, match="output_type 'jpg' is not one of pil, np, pt, latent"):
        pipe.generate("x", output_type="jpg")
    with pytest.raises(ValueError, match=r"latents must have shape \(2, 4, 8, 8\) .*, got \(1, 4, 8, 8\)"):
        pipe.generate(["a", "b"], latents=torch.zeros(1, 4, 8, 8), steps=1, progress=False)
    with pytest.raises(ValueError, match="latents must be a float tensor or array"):
        pipe.generate("a", latents=torch.zeros(1, 4, 8, 8, dtype=torch.int64), steps=1, progress=False)
    with pytest.raises(ValueError, match=r"strength must be a number in \(0, 1\], got 1.5"):
        pipe.img2img(img, "x", strength=1.5)
    with pytest.raises(ValueError, match="seed -1 must be an int"):
        pipe.generate("x", seed=-1)
    with pytest.raises(ValueError, match="prompt has 3 values and image 2: the lists of one call need one length"):
        pipe.img2img([img, img], ["a", "b", "c"])
    with pytest.raises(ValueError, match="seed has 3 values and image 2"):  # was blamed on image
        pipe.inpaint([img, img], mask=Image.new("L", img.size, 255), prompt="x", seed=[1, 2, 3])
    with pytest.raises(ValueError, match="strength has 3 values and image 2"):
        pipe.img2img([img, img], "x", strength=[1.0, 0.5, 0.5])
    with pytest.raises(ValueError, match=r"image: item 1 is 40x48 \(HxW\) .*; the items of one call share a size"):
        pipe.img2img([img, img.resize((48, 40))], "x")
    with pytest.raises(ValueError, match="unknown sampler 'plms'"):
        pipe.generate("x", sampler="plms", progress=False)
    for bad in (dict(mask_blur=-1), dict(mask_dilate=1.5), dict(mask_dilate=1.0), dict(crop_padding=-4),
                dict(crop_padding=2.5), dict(mask_mode="min"), dict(steps=True), dict(steps="2")):
        (name, value), = bad.items()
        with pytest.raises(ValueError, match=f"^{name} must be .*, got {value!r}$"):  # only the culprit is named
            pipe.inpaint(img, rect_masks(1)[0], prompt="x", progress=False, **{"steps": 1, **bad})
    for bad in (dict(height=0), dict(width=-8), dict(height=64.0)):
        (name, value), = bad.items()
        with pytest.raises(ValueError, match=f"^{name} must be an int >= 1 \\(pixels\\) or None, got {value!r}$"):
            pipe.generate("x", steps=1, progress=False, **bad)
    # numpy scalars and arrays are numbers and latents like any other
    out = pipe.generate("x", steps=np.int64(1), height=np.int64(64), guidance_scale=np.float32(7.5), seed=0,
                        latents=np.zeros((1, 4, 8, 8), np.float32), progress=False, output_type="latent")
    assert out.images.shape == (1, 4, 8, 8)
    pipe.inpaint(img, rect_masks(1)[0], prompt="x", steps=1, progress=False, mask_dilate=np.int64(1),
                 mask_blur=np.float64(2))


def test_clip_skip_out_of_range_is_named(models):
    """clip_skip is checked before any work, in every method, against this text encoder's 2 layers; None and 0
    are both the last layer (diffusers' default)."""
    pipe = models["sd1-inpaint"].pipe
    img, mask = images(1)[0], rect_masks(1)[0]
    calls = [lambda v: pipe.generate("x", steps=1, progress=False, clip_skip=v),
             lambda v: pipe.img2img(img, "x", steps=1, progress=False, clip_skip=v),
             lambda v: pipe.inpaint(img, mask, "x", steps=1, progress=False, clip_skip=v),
             lambda v: pipe.encode_prompt("x", clip_skip=v)]
    for call in calls:
        for bad in (-1, 3, 1.5, True, "1"):
            with pytest.raises(ValueError, match=rf"^clip_skip must be None or an int in \[0, 2\] \(layers of this "
                                                 rf"2-layer text encoder to skip\), got {bad!r}$"):
                call(bad)
    assert torch.equal(pipe.encode_prompt("x", clip_skip=0), pipe.encode_prompt("x", clip_skip=None))
    assert not torch.equal(pipe.encode_prompt("x", clip_skip=1), pipe.encode_prompt("x"))


def test_masks_and_results_in_diffusers_forms(models):
    """What code written for diffusers passes and expects: a 0/1 uint8 mask ((seg > 0).astype(np.uint8)) is 0/1
    (read as 0 and 1/255, a product mask repainted the product); a 3-D mask tensor (B, H, W) is B masks (was one
    colour mask for every item); return_dict=False and out[0]; torch.manual_seed(0) repeats a seedless call;
    encode_prompt's embeddings take in-place edits (prompt weighting)."""
    pipe = models["sd1-inpaint"].pipe
    imgs = images(2)
    product = np.zeros((2, 64, 64), np.uint8)
    product[0, 16:48, 16:48] = product[1, 8:40, 20:60] = 1
    run = dict(prompt="x", steps=2, seed=1, progress=False, output_type="np")
    as_bool = pipe.inpaint(imgs, product_mask=[m > 0 for m in product], **run).images
    for given in (list(product), torch.from_numpy(product), product):  # 0/1 uint8; (B, H, W) tensor and array
        assert np.array_equal(pipe.inpaint(imgs, product_mask=given, **run).images, as_bool)
    kept = product[0] > 0
    assert np.array_equal((as_bool[0][kept] * 255).round(), np.asarray(imgs[0])[kept])

    out = pipe.generate("x", steps=1, seed=3, progress=False)
    assert out[0] is out.images and out["seeds"] == [3]
    images_only, nsfw = pipe("x", steps=1, seed=3, progress=False, return_dict=False)
    assert nsfw is None and np.array_equal(np.asarray(images_only[0]), np.asarray(out.images[0]))
    assert pipe.generate("x", steps=1, seed=3, progress=False, return_dict=True).seeds == [3]
    seeds = []
    for _ in range(2):
        torch.manual_seed(0)
        seeds.append(pipe.generate("x", steps=1, progress=False, output_type="latent").seeds)
    assert seeds[0] == seeds[1]

    embeds = pipe.encode_prompt("a red mug")
    embeds[:, 3:6] *= 1.3  # inference-mode tensors refuse this
    assert not embeds.is_inference()


def test_misuses_are_named_early(models, tmp_path):
    pipe = models["sd1-inpaint"].pipe
    with pytest.raises(TypeError, match="interrupt must be a threading.Event .* got bool"):
        pipe.generate("x", steps=1, progress=False, interrupt=True)
    with pytest.raises(ValueError, match="dtype torch.int8 is not a floating-point type"):
        Pipeline.from_pretrained(models["sd1-inpaint"].folder, dtype=torch.int8)
    with pytest.raises(ValueError, match=r"mask\[0\]: float values must lie in \[0, 1\], got \[2, 2\]$"):
        pipe.inpaint(images(1)[0], mask=np.full((64, 64), 2.0), prompt="x", steps=1, progress=False)
    with pytest.raises(TypeError, match="return_dict"):
        Pipeline.from_pretrained(models["sd1-inpaint"].folder, return_dict=False)
    # torch's CPU generator keeps 32 bits of a seed: s and s + 2**32 were two "different" seeds of one image
    with pytest.raises(ValueError, match=r"seed 4294967296 must be an int in \[0, 2\*\*32 - num_images_per_prompt\]"):
        pipe.generate("x", steps=1, seed=2**32, progress=False)
    assert pipe.generate("x", steps=1, seed=2**32 - 2, num_images_per_prompt=2, progress=False,
                         output_type="latent").seeds == [2**32 - 2, 2**32 - 1]
    with pytest.raises(ValueError, match="seeds 10 and 11 with num_images_per_prompt=2 give two images the seed 11"):
        pipe.generate(["x", "y"], steps=1, seed=[10, 11], num_images_per_prompt=2, progress=False)
    assert pipe.generate(["x", "y"], steps=1, seed=[10, 10], num_images_per_prompt=2, progress=False,  # on purpose
                         output_type="latent").seeds == [10, 11, 10, 11]
    with pytest.raises(ValueError, match=r"eta must be a number in \[0, 1\]"):  # diffusers: NaN past 1
        pipe.generate("x", steps=1, sampler="ddim", eta=2, progress=False)
    opaque = np.dstack([np.asarray(images(1)[0]), np.full((64, 64), 255, np.uint8)])  # an exporter's RGBA
    with pytest.raises(ValueError, match=r"image\[0\] has no transparent pixel .* give mask= or product_mask="):
        pipe.inpaint(opaque, prompt="x", steps=1, progress=False)  # was returned unchanged; the CLI refused it


def test_an_overflowing_guidance_scale_is_said_not_left_black(models, caplog):
    pipe = models["sd1"].pipe
    with caplog.at_level("WARNING", logger="backdrop.diffusion.pipeline"):
        pipe.generate(["x", "y"], steps=1, guidance_scale=1e300, progress=False, output_type="latent", seed=0)
    assert "items [0, 1] have non-finite latents" in caplog.text and "guidance_scale 1e+300" in caplog.text
    for kind in ("np", "pil"):  # and black in every output type: NaN in "np", a numpy warning on the way to PIL
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = pipe.generate(["x", "y"], steps=1, guidance_scale=1e300, progress=False, output_type=kind,
                                seed=0).images
        assert all(np.asarray(im).max() == 0 for im in out), kind
    out = models["sd1-inpaint"].pipe.inpaint(images(1), mask=rect_masks(1), prompt="x", steps=1, seed=0,
                                             guidance_scale=1e300, paste_back=False, output_type="np", progress=False)
    assert np.asarray(out.images).max() == 0


def test_a_float64_default_dtype_in_the_host_process_changes_nothing(models):
    """torch.set_default_dtype(torch.float64) in the caller's program (notebooks do) broke every call: a buffer
    made without a dtype became float64."""
    want = {kind: call(models) for kind, call in CALLS.items()}
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        for kind, call in CALLS.items():
            assert np.array_equal(call(models), want[kind]), kind
    finally:
        torch.set_default_dtype(old)


CALLS = {
    "generate": lambda m: m["sd1"].pipe.generate("x", steps=2, seed=1, output_type="np", progress=False).images,
    "img2img": lambda m: m["sd1"].pipe.img2img(images(1), prompt="x", steps=2, seed=1, output_type="np",
                                               progress=False).images,
    "inpaint": lambda m: m["sd1-inpaint"].pipe.inpaint(images(1), mask=rect_masks(1), prompt="x", steps=2, seed=1,
                                                       output_type="np", progress=False).images,
    "generate 9ch": lambda m: m["sd1-inpaint"].pipe.generate("x", steps=2, seed=1, output_type="np",
                                                             progress=False).images,
}


def test_an_image_without_pixels_is_a_value_error_naming_it(models):
    """A 0-pixel image escaped inpaint as an IndexError from a reduction over no pixels."""
    pipe = models["sd1-inpaint"].pipe
    for call in (lambda: pipe.inpaint(np.zeros((0, 64, 3), np.uint8), mask=np.zeros((0, 64), np.uint8), prompt="x"),
                 lambda: pipe.inpaint(np.zeros((0, 64, 4), np.uint8), prompt="x"),
                 lambda: pipe.img2img(Image.new("RGB", (0, 64)), prompt="x")):
        with pytest.raises(ValueError, match=r"image\[0\]: has no pixels \(shape \("):
            call()
