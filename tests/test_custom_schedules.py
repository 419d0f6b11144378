"""Custom schedules (diffusers' timesteps= / sigmas=, e.g. Align Your Steps): the same UNet calls and final latents as
the diffusers scheduler given the same list, the same images as diffusers' pipelines given it, and every bad list
named before any work."""
import numpy as np
import pytest
import torch

from backdrop.diffusion import masks as M
from backdrop.diffusion import pixels as P
from backdrop.diffusion.recipes import NAMED_SCHEDULES
from backdrop.diffusion.schedule import RECIPES, build_schedule, custom_schedule

from pipeline_helpers import PROMPTS, TOL, generators, images, latents_of, max_diff, rect_masks
from scheduler_refs import diffusers_scheduler, sched_config
from test_samplers import assert_same_run, diffusers_loop, our_loop

pytestmark = [pytest.mark.usefixtures("one_thread"),  # conftest.py
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]  # diffusers' numpy-2 __array__ notices

AYS_T, AYS_SIGMAS = list(NAMED_SCHEDULES["timesteps"]["ays"]), list(NAMED_SCHEDULES["sigmas"]["ays"])
LISTS = {"timesteps": [AYS_T, [980, 700, 421, 200, 61, 3], [999, 759, 499, 259], [500]],
         "sigmas": [AYS_SIGMAS, [10.0, 3.0, 1.0, 0.3, 0.05], [14.6, 0.0]]}  # the second ends above 0
CUSTOM = [(n, kind) for n, r in RECIPES.items() for kind in r.custom]


def test_the_named_schedules_are_diffusers_ays():
    from diffusers.schedulers import AysSchedules

    assert AYS_T == AysSchedules["StableDiffusionTimesteps"]
    assert AYS_SIGMAS == AysSchedules["StableDiffusionSigmas"]


@pytest.mark.parametrize("name,kind", CUSTOM)
def test_custom_schedule_matches_diffusers_loop(name, kind):
    cases = [(pred, False) for pred in ("epsilon", "v_prediction")]
    if RECIPES[name].zero_snr:  # a zero terminal SNR: DDPM and LCM start at sigma = inf, Euler/DPM at 4096
        cases.append(("v_prediction", True))
    for pred, zero_snr in cases:
        cfg = sched_config(timestep_spacing="trailing" if zero_snr else None, rescale_betas_zero_snr=zero_snr)
        for given in LISTS[kind]:
            n, custom = len(given) - (kind == "sigmas"), {kind: given}
            where = f"{name} {kind}={given} {pred} zero_snr={zero_snr}"
            assert_same_run(diffusers_loop(name, n, cfg, pred, custom=custom),
                            our_loop(name, None, cfg, pred, custom=custom), where)


@pytest.mark.parametrize("name,kind", CUSTOM)
def test_custom_schedule_img2img_matches_diffusers(name, kind):
    x0 = -0.4 + 0.8 * torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(3))
    given = LISTS[kind][0]
    n, custom = len(given) - (kind == "sigmas"), {kind: given}
    for strength in (0.35, 0.8):
        assert_same_run(diffusers_loop(name, n, sched_config(), "epsilon", strength=strength, x0=x0, custom=custom),
                        our_loop(name, None, sched_config(), "epsilon", strength=strength, x0=x0, custom=custom),
                        f"{name} {kind} strength={strength}")


def test_a_named_schedule_is_its_list_and_steps_is_its_length():
    by_name, by_list = build_schedule("dpmpp-2m", None, timesteps="ays"), build_schedule("dpmpp-2m", 7,
                                                                                         timesteps=AYS_T)
    assert by_name.num_steps == by_list.num_steps == 10
    assert torch.equal(by_name.timesteps, by_list.timesteps) and torch.equal(by_name.sigmas, by_list.sigmas)
    euler = build_schedule("euler", None, sigmas=np.array(AYS_SIGMAS))  # numpy arrays and tensors are lists too
    assert euler.num_steps == 10 and euler.sigmas.tolist() == torch.tensor(AYS_SIGMAS).tolist()
    assert torch.equal(build_schedule("ddpm", None, timesteps=torch.tensor([900, 10])).timesteps,
                       torch.tensor([900.0, 10.0]))


def test_samplers_whose_diffusers_scheduler_takes_no_list_refuse_one():
    for name, r in RECIPES.items():
        for kind in ("timesteps", "sigmas"):
            if kind in r.custom:
                continue
            why = "refuses them with Karras sigmas" if r.karras else "takes none with SD's config"
            with pytest.raises(ValueError, match=rf"{name} takes no custom {kind}= \(diffusers' {r.scheduler} "
                                                 rf"{why}\); samplers that do: "):
                build_schedule(name, None, **{kind: AYS_T if kind == "timesteps" else AYS_SIGMAS})
            with pytest.raises((TypeError, ValueError)):  # diffusers refuses it as well
                sch = diffusers_scheduler(name, sched_config())
                sch.set_timesteps(**{kind: AYS_T if kind == "timesteps" else AYS_SIGMAS})


@pytest.mark.parametrize("kwargs,message", [
    (dict(timesteps=AYS_T, sigmas=AYS_SIGMAS), r"give timesteps= or sigmas=, not both"),
    (dict(timesteps=[10, 500]), r"timesteps= must be strictly descending, got \[10, 500\]"),
    (dict(timesteps=[500, 500, 2]), r"strictly descending"),
    (dict(timesteps=[999.0, 500.0]), r"timesteps= must be ints in \[0, num_train_timesteps=1000\); 999.0 is not"),
    (dict(timesteps=[1000, 500]), r"1000 is not"),
    (dict(timesteps=[500, -1]), r"-1 is not"),
    (dict(timesteps=[True]), r"True is not"),
    (dict(timesteps=[]), r"timesteps= must be a list of at least one timestep"),
    (dict(timesteps=500), r"timesteps= must be a list"),
    (dict(timesteps="fast"), r"timesteps='fast': not a named schedule; give a list, or one of ays"),
    (dict(sigmas=[14.6]), r"sigmas= must be a list of at least two sigmas"),
    (dict(sigmas=[14.6, -0.1]), r"sigmas= must be finite numbers >= 0; -0.1 is not"),
    (dict(sigmas=[float("inf"), 0.0]), r"inf is not"),
    (dict(sigmas=[1.0, 2.0, 0.0]), r"sigmas= must be strictly descending"),
])
def test_bad_custom_schedules_are_named(kwargs, message):
    sampler = "euler"
    with pytest.raises(ValueError, match=message):
        custom_schedule(sampler, **kwargs)


# ---------------------------------------------------------------------------------------- pipelines, as diffusers'

@pytest.mark.parametrize("sampler,kind", [("dpmpp-2m", "timesteps"), ("euler", "sigmas")])
def test_generate_with_ays_equals_diffusers(models, ref, sampler, kind):
    pipe = models["sd1"].pipe
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = pipe.generate(PROMPTS, guidance_scale=7.5, sampler=sampler, latents=noise, output_type="np",
                         progress=False, seed=[1, 2], **{kind: "ays"})
    given = AYS_T if kind == "timesteps" else AYS_SIGMAS
    theirs = ref("sd1", "txt2img", sampler)(PROMPTS, guidance_scale=7.5, latents=noise.clone(), output_type="np",
                                            height=64, width=64, **{kind: given}).images
    assert theirs.std() > 0.05 and max_diff(ours.images, theirs) <= TOL
    steps = []
    pipe.generate(PROMPTS[0], sampler=sampler, progress=False, seed=1, callback=lambda i, x: steps.append(i),
                  **{kind: given})
    assert steps == list(range(10))


def test_img2img_and_inpaint_with_custom_timesteps_equal_diffusers(models, ref):
    pipe, imgs, seeds = models["sd1"].pipe, images(2, seed=2), [7, 8]
    ours = pipe.img2img(imgs, PROMPTS, strength=0.6, seed=seeds, timesteps=AYS_T, sampler="dpmpp-2m",
                        output_type="np", progress=False)
    theirs = ref("sd1", "img2img", "dpmpp-2m")(
        prompt=PROMPTS, image=latents_of(pipe, imgs), strength=0.6, timesteps=AYS_T, guidance_scale=7.5,
        generator=generators(seeds), output_type="np").images
    assert max_diff(ours.images, theirs) <= TOL
    inpainter, x0, masks = models["sd1-inpaint"].pipe, images(2, seed=4), rect_masks(2, seed=4)
    ours = inpainter.inpaint(x0, masks, PROMPTS, seed=seeds, timesteps=AYS_T, sampler="dpmpp-2m", mask_dilate=0,
                             paste_back=False, mask_mode="diffusers", output_type="np", progress=False)
    masked = M.masked_image(P.image_to_tensor(x0), M.to_repaint_mask(mask=masks))  # (2, 3, 64, 64)
    theirs = ref("sd1-inpaint", "inpaint", "dpmpp-2m")(
        prompt=PROMPTS, image=x0, mask_image=masks, height=64, width=64, timesteps=AYS_T, guidance_scale=7.5,
        masked_image_latents=inpainter.backend.vae_encode(masked) * inpainter.config.scaling_factor,
        generator=generators(seeds), output_type="np").images
    assert max_diff(ours.images, theirs) <= TOL


def test_pipeline_refuses_a_bad_custom_schedule_before_any_work(models, monkeypatch):
    pipe, calls = models["sd1"].pipe, []
    for part in ("encode_text", "unet", "vae_encode", "vae_decode"):
        monkeypatch.setattr(pipe.backend, part, lambda *a, part=part, **k: calls.append(part))
    for kwargs, message in [
            (dict(timesteps=AYS_T, steps=20), r"steps=20, but timesteps= has 10 steps: give one of them"),
            (dict(sigmas="ays", steps=4, sampler="euler"), r"steps=4, but sigmas= has 10 steps"),
            (dict(timesteps="ays", sampler="ddim"), r"ddim takes no custom timesteps="),
            (dict(sigmas=AYS_SIGMAS, sampler="dpmpp-2m"), r"dpmpp-2m takes no custom sigmas="),
            (dict(timesteps=[999, 1200]), r"1200 is not")]:
        with pytest.raises(ValueError, match=message):
            pipe.generate("a cat", progress=False, **kwargs)
        with pytest.raises(ValueError, match=message):
            pipe.img2img(images(1)[0], "a cat", progress=False, **kwargs)
        with pytest.raises(ValueError, match=message):
            pipe.inpaint(images(1)[0], rect_masks(1)[0], "a cat", progress=False, **kwargs)
    assert calls == []
    monkeypatch.undo()
    # steps= equal to the list's length, or left at its default, is taken
    out = pipe.generate("a cat", timesteps=AYS_T, steps=10, progress=False, output_type="latent")
    assert out.images.shape[0] == 1


def test_cli_takes_a_custom_schedule_and_records_it(models, capsys, tmp_path):
    from PIL import Image

    from backdrop.cli import main

    model, out = models["sd1"], tmp_path / "out"
    base = ["generate", "--model", model.folder, "--prompt", "a cat", "--seed", "5", "--quiet", "--out", str(out)]
    assert main(base + ["--timesteps", "ays"]) == 0
    path = capsys.readouterr().out.split()[0]
    want = model.pipe.generate("a cat", seed=5, timesteps="ays", progress=False).images[0]
    with Image.open(path) as im:
        assert np.array_equal(np.asarray(im), np.asarray(want))
        assert "\nSteps: 10, Sampler: dpmpp-2m, Schedule: timesteps ays, CFG scale" in im.info["parameters"]
    assert main(base + ["--sigmas", "14.6,3,0.5,0", "--sampler", "euler", "--overwrite"]) == 0
    with Image.open(capsys.readouterr().out.split()[0]) as im:
        assert "Steps: 3, Sampler: euler, Schedule: \"sigmas 14.6,3.0,0.5,0.0\"," in im.info["parameters"]
    for args, said in [(["--timesteps", "ays", "--steps", "20"], "--steps 20 and --timesteps ays (10 steps): give "
                        "one of them"),
                       (["--timesteps", "10,500"], "--timesteps 10,500 --sampler dpmpp-2m: timesteps= must be "
                        "strictly descending"),
                       (["--sigmas", "ays"], "--sigmas ays --sampler dpmpp-2m: dpmpp-2m takes no custom sigmas="),
                       (["--timesteps", "9.5,3"], "argument --timesteps: '9.5,3' is not a comma-separated list of "
                        "ints or a name (ays)"),
                       (["--timesteps", "ays", "--sigmas", "ays"], "not allowed with argument")]:
        try:
            code = main(base + ["--overwrite"] + args)
        except SystemExit as e:  # argparse's own errors
            code = e.code
        assert code == 2 and said in capsys.readouterr().err


def test_trailing_spacing_that_runs_n_plus_one_steps_is_no_custom_schedule(models, capsys, tmp_path):
    """Trailing spacing at N = 61 (and 103, 121, 122 of T = 1000) gives 62 timesteps, as diffusers: steps=61 ran
    (the step check took it for a custom list), and the CLI passed steps=62 on (another schedule) and recorded it."""
    from PIL import Image

    from backdrop.cli import main

    model = models["sd2"]  # trailing spacing
    assert build_schedule("euler", 61, model.pipe.config.scheduler).num_steps == 62
    calls = []
    out = model.pipe.generate("a cat", steps=61, sampler="euler", output_type="latent", progress=False, seed=1,
                              callback=lambda i, x: calls.append(i))
    assert len(calls) == 62 and out.images.shape[0] == 1
    base = ["generate", "--model", model.folder, "--prompt", "a cat", "--seed", "1", "--steps", "61", "--sampler",
            "euler", "--quiet", "--out", str(tmp_path)]
    assert main(base) == 0
    with Image.open(capsys.readouterr().out.split()[0]) as im:
        assert "\nSteps: 61, Sampler: euler," in im.info["parameters"]
        assert np.array_equal(np.asarray(im), np.asarray(model.pipe.generate(
            "a cat", steps=61, sampler="euler", seed=1, progress=False).images[0]))


def test_cli_skip_existing_knows_the_images_a_custom_schedule_made(models, capsys, tmp_path):
    from backdrop.cli import main

    base = ["generate", "--model", models["sd1"].folder, "--prompt", "a cat", "--seed", "2", "--quiet", "--out",
            str(tmp_path), "--sigmas", "14.6,2,0", "--sampler", "euler"]
    assert main(base) == 0 and len(capsys.readouterr().out.split()) == 1
    assert main(base + ["--skip-existing"]) == 0  # refused them: "not made by this command"
    assert capsys.readouterr().out.split() == []


def test_euler_sigmas_ending_above_zero_inpaint_with_a_4_channel_unet_as_diffusers(models, ref):
    """The last blend put back the VE form of VP x0, x0 * sqrt(1 + s^2); Euler's latents are VE: x0 itself."""
    pipe, x0, masks, seeds = models["sd1"].pipe, images(2, seed=1), rect_masks(2, seed=1), [5, 6]
    sig = [10.0, 3.0, 1.0, 0.6]
    ours = pipe.inpaint(x0, masks, PROMPTS, seed=seeds, sampler="euler", sigmas=sig, paste_back=False,
                        mask_mode="diffusers", mask_dilate=0, output_type="latent", progress=False).images
    lat = latents_of(pipe, x0)
    theirs = ref("sd1", "inpaint", "euler")(
        prompt=PROMPTS, image=lat, mask_image=masks, masked_image_latents=lat, height=64, width=64, sigmas=sig,
        guidance_scale=7.5, generator=generators(seeds), output_type="latent").images
    assert (ours - theirs).abs().max() <= 1e-4


def test_lcm_takes_a_custom_list_longer_than_its_distillation_as_diffusers_does():
    assert build_schedule("lcm", None, timesteps=list(range(999, 0, -16))).num_steps == 63
    with pytest.raises(ValueError, match=r"at most 50, got 63"):
        build_schedule("lcm", 63)
