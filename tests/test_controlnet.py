"""ControlNet (nn/controlnet.py, diffusion/control.py): diffusers' ControlNetModel holding the same random weights gives
the same residuals, diffusers' UNet the same output with them, and diffusers' StableDiffusionControlNet{,Img2Img,
Inpaint}Pipeline the same images (one ControlNet or two, conditioning scales, guidance windows, guess mode); a
diffusers folder loads strictly, and every bad call is named."""
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from backdrop.nn.config import UNetConfig
from backdrop.nn.controlnet import ControlNet, ControlNetConfig, load_controlnet
from backdrop.nn.ldm_keys import CheckpointError
from backdrop.nn.testing import randomize_, rel_err
from backdrop.nn.unet import UNet

from pipeline_helpers import PROMPTS, TOL, generators, images, latents_of, max_diff, rect_masks

diffusers = pytest.importorskip("diffusers")
pytestmark = [pytest.mark.usefixtures("one_thread"),  # conftest.py
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]  # diffusers' numpy-2 __array__ notices

SD1 = UNetConfig(block_out_channels=(32, 64, 64, 64), num_heads=(2, 2, 2, 2), layers_per_block=2,
                 cross_attention_dim=48, norm_num_groups=8, sample_size=16)
SD2 = replace(SD1, num_heads=(1, 2, 4, 4), cross_attention_dim=40, use_linear_projection=True)
EMBED = (8, 16, 16, 32)  # the conditioning embedding's widths: three stride-2 convs, 8x as the real (16, 32, 96, 256)


def reference(cfg: ControlNetConfig, seed: int = 0, sensitive: bool = False):
    """diffusers' ControlNetModel with random weights (its zero convs too: they would hide every bug). sensitive:
    the control image's embedding outweighs the latents' (random weights barely look at the image otherwise, and a
    flipped or misplaced control image would pass unseen)."""
    ref = diffusers.ControlNetModel.from_config(cfg.to_diffusers()).eval()
    randomize_(ref, seed)
    if sensitive:
        with torch.no_grad():
            ref.controlnet_cond_embedding.conv_out.weight *= 30
    return ref


def pair(cfg: ControlNetConfig, seed: int = 0):
    ref, ours = reference(cfg, seed), ControlNet(cfg).eval()
    assert set(ref.state_dict()) == set(ours.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def inputs(cfg: ControlNetConfig, b: int = 2, h: int = 13, w: int = 10, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 4, h, w, generator=g), torch.tensor([3.75, 981.5])[:b],
            torch.randn(b, 11, cfg.unet.cross_attention_dim, generator=g), torch.rand(b, 3, 8 * h, 8 * w, generator=g))


@pytest.mark.parametrize("name,options", [("sd1", {}), ("sd2", {}), ("sd1-bgr", {"channel_order": "bgr"}),
                                          ("sd1-pooled", {"global_pool_conditions": True})])
@pytest.mark.parametrize("guess_mode", [False, True])
def test_residuals_and_controlled_unet_match_diffusers(name, options, guess_mode):
    """13x10 latents (no side a multiple of 8), fractional timesteps; then the UNet with the residuals."""
    cfg = ControlNetConfig(SD2 if name == "sd2" else SD1, EMBED, **options)
    ours, ref = pair(cfg)
    x, t, ctx, cond = inputs(cfg)
    with torch.no_grad():
        down, mid = ref(x, t, ctx, cond, conditioning_scale=0.7, guess_mode=guess_mode, return_dict=False)
        got_down, got_mid = ours(x, t, ctx, cond, 0.7, guess_mode)
    assert len(got_down) == len(down) == 12
    assert max(rel_err(a, b) for a, b in zip(got_down, down)) < 1e-4 and rel_err(got_mid, mid) < 1e-4
    assert mid.abs().max() > 0.1
    unet_ref = diffusers.UNet2DConditionModel.from_config(cfg.unet.to_diffusers()).eval()
    randomize_(unet_ref, 3)
    unet = UNet(cfg.unet).eval()
    unet.load_state_dict(unet_ref.state_dict())
    with torch.no_grad():
        want = unet_ref(x, t, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        got = unet(x, t, ctx, got_down, got_mid)
        plain = unet(x, t, ctx)
    assert rel_err(got, want) < 1e-4 and rel_err(plain, want) > 1e-2


def test_forward_refuses_a_control_image_of_the_wrong_size_and_residual_counts():
    cfg = ControlNetConfig(SD1, EMBED)
    net, unet = ControlNet(cfg), UNet(SD1)
    x, t, ctx, cond = inputs(cfg)
    with pytest.raises(ValueError, match=r"the control image must be \(2, 3, 104, 80\) \(the latents' size times "
                                         r"8\), got \(2, 3, 100, 80\)"):
        net(x, t, ctx, cond[..., :100, :])
    with torch.no_grad():
        down, mid = net(x, t, ctx, cond)
    with pytest.raises(ValueError, match=r"12 down residuals and a mid one, one per skip, got 11 and a mid one"):
        unet(x, t, ctx, down[1:], mid)


def test_load_controlnet_from_a_diffusers_folder_strictly(tmp_path):
    cfg = ControlNetConfig(SD1, EMBED)
    ref = reference(cfg)
    ref.save_pretrained(tmp_path / "model" / "controlnet")
    x, t, ctx, cond = inputs(cfg)
    for path in (tmp_path / "model" / "controlnet", tmp_path / "model"):  # the folder, or a model with one inside
        net = load_controlnet(path)
        assert net.cfg == replace(cfg, unet=replace(cfg.unet, sample_size=64))  # diffusers' has no sample_size
        with torch.no_grad():
            assert rel_err(net(x, t, ctx, cond)[1], ref(x, t, ctx, cond, return_dict=False)[1]) < 1e-4
    from safetensors.torch import load_file, save_file

    weights = tmp_path / "model" / "controlnet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    save_file({k: v for k, v in state.items() if k != "controlnet_mid_block.bias"}, str(weights))
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model.safetensors.*does not match a ControlNetModel"
                                              r" of its config.json: 1 missing: controlnet_mid_block.bias"):
        load_controlnet(tmp_path / "model")
    config = tmp_path / "model" / "controlnet" / "config.json"
    config.write_text(config.read_text().replace('"ControlNetModel"', '"ControlNetXSAdapter"'))
    with pytest.raises(CheckpointError, match=r"config.json: _class_name 'ControlNetXSAdapter': not a ControlNetModel"):
        load_controlnet(tmp_path / "model")
    with pytest.raises(FileNotFoundError, match=r"gone: no such ControlNet folder"):
        load_controlnet(tmp_path / "gone")


# ------------------------------------------------------------------------------------------------- pipelines

@pytest.fixture(scope="module")
def nets(models, tmp_path_factory):
    """{name: (folder, diffusers ControlNetModel)}: two random ControlNets for the tiny models, saved as folders."""
    out = {}
    for name, seed, pooled in (("a", 5, False), ("b", 6, False), ("shuffle", 7, True)):
        cfg = ControlNetConfig(models["sd1"].pipe.backend.model.unet.cfg, EMBED, global_pool_conditions=pooled)
        ref = reference(cfg, seed, sensitive=True)
        folder = tmp_path_factory.mktemp(f"controlnet-{name}")
        ref.save_pretrained(folder)
        out[name] = (str(folder), ref)
    return out


def control_images(n: int, seed: int = 3) -> list[Image.Image]:
    """Edge-map-like control images: white lines on black."""
    rng, out = np.random.default_rng(seed), []
    for _ in range(n):
        a = np.zeros((64, 64, 3), np.uint8)
        for _ in range(4):
            a[rng.integers(0, 64), :] = 255
            a[:, rng.integers(0, 64)] = 255
        out.append(Image.fromarray(a))
    return out


def diffusers_pipe(models, ref, nets, model: str, kind: str, sampler: str, names=("a",)):
    cls = {"txt2img": diffusers.StableDiffusionControlNetPipeline,
           "img2img": diffusers.StableDiffusionControlNetImg2ImgPipeline,
           "inpaint": diffusers.StableDiffusionControlNetInpaintPipeline}[kind]
    base = ref(model, kind, sampler)
    controlnet = nets[names[0]][1] if len(names) == 1 else [nets[n][1] for n in names]
    parts = {k: v for k, v in base.components.items() if k in ("vae", "text_encoder", "tokenizer", "unet",
                                                                 "scheduler", "safety_checker", "feature_extractor")}
    pipe = cls(**parts, controlnet=controlnet, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def controlled(models, nets):
    """models' pipelines with ControlNet "a" set; taken off afterwards."""
    for m in ("sd1", "sd1-inpaint"):
        models[m].pipe.controlnet = nets["a"][0]
    yield models
    for m in ("sd1", "sd1-inpaint"):
        models[m].pipe.controlnet = None


def test_generate_equals_diffusers(controlled, ref, nets):
    pipe, noise = controlled["sd1"].pipe, torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    run = dict(steps=5, guidance_scale=7.5, latents=noise, output_type="np")
    window = dict(controlnet_conditioning_scale=0.7, control_guidance_start=0.2, control_guidance_end=0.8)
    theirs = diffusers_pipe(controlled, ref, nets, "sd1", "txt2img", "euler")(
        PROMPTS, image=control_images(2), num_inference_steps=5, guidance_scale=7.5, latents=noise.clone(),
        output_type="np", **window).images
    ours = pipe.generate(PROMPTS, sampler="euler", control_image=control_images(2), progress=False, **run, **window)
    assert max_diff(ours.images, theirs) <= TOL
    full = pipe.generate(PROMPTS, sampler="euler", control_image=control_images(2), progress=False, **run).images
    pipe.controlnet = None
    plain = pipe.generate(PROMPTS, sampler="euler", progress=False, **run).images
    assert max_diff(full, plain) > 10 * TOL and max_diff(full, ours.images) > 10 * TOL  # the window counts
    pipe.controlnet = nets["a"][0]
    zero = pipe.generate(PROMPTS, sampler="euler", control_image=control_images(1)[0], progress=False,
                         controlnet_conditioning_scale=0.0, **run).images
    assert np.array_equal(zero, plain)  # scale 0 adds zeros: the plain UNet bit for bit
    called = pipe(PROMPTS, image=control_images(2), num_inference_steps=5, sampler="euler", guidance_scale=7.5,
                  latents=noise, output_type="np", progress=False).images  # diffusers' image= of the ControlNet pipe
    assert np.array_equal(called, full)


def test_img2img_and_inpaint_equal_diffusers(controlled, ref, nets):
    pipe, imgs, seeds = controlled["sd1"].pipe, images(2, seed=2), [7, 8]
    ours = pipe.img2img(imgs, PROMPTS, strength=0.6, seed=seeds, steps=6, sampler="dpmpp-2m", output_type="np",
                        control_image=control_images(2), progress=False)  # diffusers' default scales: 0.8, inpaint 0.5
    theirs = diffusers_pipe(controlled, ref, nets, "sd1", "img2img", "dpmpp-2m")(
        PROMPTS, image=latents_of(pipe, imgs), control_image=control_images(2), strength=0.6, num_inference_steps=6,
        guidance_scale=7.5, generator=generators(seeds), output_type="np").images
    assert max_diff(ours.images, theirs) <= TOL
    inpainter, x0, masks = controlled["sd1-inpaint"].pipe, images(2, seed=4), rect_masks(2, seed=4)
    ours = inpainter.inpaint(x0, masks, PROMPTS, seed=seeds, steps=5, sampler="dpmpp-2m", mask_dilate=0,
                             paste_back=False, mask_mode="diffusers", output_type="np", progress=False,
                             control_image=control_images(1, seed=8)[0], control_guidance_end=0.6)
    theirs_pipe = diffusers_pipe(controlled, ref, nets, "sd1-inpaint", "inpaint", "dpmpp-2m")
    # It takes no masked_image_latents= (diffusers' plain inpaint pipeline does): give it our posterior mean
    theirs_pipe._encode_vae_image = lambda image, generator: inpainter.backend.vae_encode(
        image) * inpainter.config.scaling_factor
    theirs = theirs_pipe(
        prompt=PROMPTS, image=x0, mask_image=masks, control_image=control_images(1, seed=8)[0], height=64, width=64,
        num_inference_steps=5, control_guidance_end=0.6, guidance_scale=7.5, generator=generators(seeds),
        output_type="np").images
    assert max_diff(ours.images, theirs) <= TOL
    kept = inpainter.inpaint(x0, masks, PROMPTS, seed=seeds, steps=3, progress=False, crop_padding=8,
                             control_image=control_images(2, seed=8))
    for out, img, mask in zip(kept.images, x0, masks):  # the product's pixels are kept, crop or not
        keep = np.asarray(mask) == 0
        assert out.size == img.size and np.array_equal(np.asarray(out)[keep], np.asarray(img)[keep])


def test_two_controlnets_and_guess_mode_equal_diffusers(controlled, ref, nets):
    pipe, noise = controlled["sd1"].pipe, torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    pipe.controlnet = [nets["a"][0], nets["b"][0]]
    assert len(pipe.controlnet) == 2
    a, b = control_images(2, seed=1), control_images(2, seed=2)
    given = [[a[0], b[0]], [a[1], b[1]]]  # diffusers' nested form: per request, one image per ControlNet
    for guess in (False, True):
        args = dict(controlnet_conditioning_scale=[0.6, 1.1], control_guidance_start=[0.0, 0.4], guess_mode=guess)
        theirs = diffusers_pipe(controlled, ref, nets, "sd1", "txt2img", "euler", names=("a", "b"))(
            PROMPTS, image=given, num_inference_steps=4, guidance_scale=7.5, latents=noise.clone(),
            output_type="np", **args).images
        ours = pipe.generate(PROMPTS, steps=4, sampler="euler", latents=noise, output_type="np", progress=False,
                             control_image=given, **args).images
        assert max_diff(ours, theirs) <= TOL, guess


@pytest.mark.parametrize("sampler,net", [("heun", "a"), ("pndm", "a"), ("euler", "shuffle")])
def test_guidance_windows_of_multi_call_samplers_and_a_shuffle_controlnet_equal_diffusers(controlled, ref, nets,
                                                                                          sampler, net):
    """heun calls the UNet twice a step (but the last), pndm once more in all: diffusers' window counts calls. A
    global_pool_conditions ControlNet ("shuffle") always runs in guess mode, as diffusers forces it."""
    pipe, noise = controlled["sd1"].pipe, torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    pipe.controlnet = nets[net][0]
    window = dict(control_guidance_start=0.15, control_guidance_end=0.6)
    theirs = diffusers_pipe(controlled, ref, nets, "sd1", "txt2img", sampler, names=(net,))(
        PROMPTS, image=control_images(2), num_inference_steps=4, guidance_scale=7.5, latents=noise.clone(),
        output_type="np", **window).images
    ours = pipe.generate(PROMPTS, steps=4, sampler=sampler, latents=noise, output_type="np", progress=False,
                         control_image=control_images(2), **window).images
    assert max_diff(ours, theirs) <= TOL


def test_a_seed_gives_its_image_alone_or_in_a_batch_of_other_controls(controlled):
    pipe = controlled["sd1"].pipe
    run = dict(steps=5, sampler="euler", output_type="np", progress=False)
    batch = pipe.generate(PROMPTS, seed=[11, 12], control_image=control_images(2, seed=5), **run).images
    alone = pipe.generate(PROMPTS[1], seed=12, control_image=control_images(2, seed=5)[1], **run).images
    assert max_diff(batch[1:], alone) <= 2 / 255
    mixed = pipe.generate(PROMPTS, seed=[11, 12], control_image=[images(1)[0], control_images(2, seed=5)[1]],
                          **run).images
    other = pipe.generate(PROMPTS[1], seed=12, control_image=images(1)[0], **run).images
    # the item's own control image, not its neighbour's: a random ControlNet's images hardly depend on the control
    # image's content (~1e-3 here), batching far less (~1e-6)
    assert max_diff(mixed[1:], alone) * 100 < max_diff(other, alone)


def test_bad_controlnet_calls_are_named(models, nets, tmp_path):
    pipe = models["sd1"].pipe
    with pytest.raises(ValueError, match=r"control_image= needs a ControlNet: Pipeline.from_pretrained\(\.\.\., "
                                         r"controlnet=path\)"):
        pipe.generate("a cat", steps=1, progress=False, control_image=control_images(1)[0])
    sd2 = ControlNetConfig(replace(pipe.backend.model.unet.cfg, cross_attention_dim=1024), EMBED)  # else the same
    with pytest.raises(ValueError, match=r"controlnet\[0\] does not fit this model: its cross_attention_dim is 1024, "
                                         r"the UNet's 64 \(a ControlNet for another base model\?\)"):
        pipe.controlnet = ControlNet(sd2)
    with pytest.raises(TypeError, match=r"controlnet\[1\]: a backdrop.nn.controlnet.ControlNet or the path of one, "
                                        r"got a dict"):
        pipe.controlnet = [nets["a"][0], {}]
    assert pipe.controlnet is None  # nothing half-set
    pipe.controlnet = nets["a"][0]
    try:
        for kwargs, error, message in [
                ({}, ValueError, r"1 ControlNet loaded: give control_image="),
                ({"control_image": control_images(3)}, ValueError, r"control_image: 3 values for 1 requests"),
                ({"control_image": control_images(1), "control_guidance_start": 0.5, "control_guidance_end": 0.5},
                 ValueError, r"control_guidance_start 0.5 must be below control_guidance_end 0.5"),
                ({"control_image": control_images(1), "controlnet_conditioning_scale": [1.0, 1.0]}, ValueError,
                 r"controlnet_conditioning_scale: 2 values for the 1 ControlNets loaded"),
                ({"control_image": control_images(1), "control_guidance_end": 1.5}, ValueError,
                 r"control_guidance_end must be a number in \[0, 1\]"),
                ({"control_image": "edges.png"}, TypeError, r"control_image: a path string; give the image"),
                ({"control_image": control_images(1), "guess_mode": "yes"}, TypeError,
                 r"guess_mode must be True or False")]:
            with pytest.raises(error, match=message):
                pipe.generate("a cat", steps=1, progress=False, **kwargs)
        pipe.controlnet = [nets["a"][0], nets["b"][0]]
        for given, message in [(control_images(1)[0], r"control_image: 2 ControlNets take a list: one control "),
                               (control_images(3), r"control_image: 3 control images for the 2 ControlNets"),
                               ([control_images(2), control_images(1)], r"a request's list must hold one image for "
                                                                        r"each of the 2 ControlNets")]:
            with pytest.raises(ValueError, match=message):
                pipe.generate("a cat", steps=1, progress=False, control_image=given)
        one = pipe.generate("a cat", steps=1, progress=False, seed=0, control_image=control_images(2)).images
        both = pipe.generate("a cat", steps=1, progress=False, seed=0, control_image=[control_images(2)]).images
        assert np.array_equal(np.asarray(one[0]), np.asarray(both[0]))  # [a, b] is [[a, b]] for one request
    finally:
        pipe.controlnet = None
    with pytest.raises(ValueError, match=r"controlnet= needs the torch backend, not onnxruntime"):
        type(pipe).from_pretrained(models["sd1"].folder, backend="onnxruntime", controlnet=nets["a"][0])


def test_to_moves_the_controlnet_and_a_resized_control_image_runs(models, nets):
    from backdrop.diffusion.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(models["sd1"].folder, device="cpu", dtype=torch.float32, controlnet=nets["a"][0])
    pipe.to(torch.bfloat16)
    assert {p.dtype for p in pipe.controlnet.parameters()} == {torch.bfloat16}
    wide = control_images(1)[0].resize((90, 45))  # resized to the output's 60x44 (HxW), which pads to 64x48
    out = pipe.generate("a cat", height=60, width=44, steps=2, progress=False, output_type="np",
                        control_image=wide).images
    assert out.shape == (1, 60, 44, 3) and np.isfinite(out).all()


def test_without_a_size_generate_makes_the_control_images_and_inpaint_crops_it_as_diffusers(controlled, ref, nets,
                                                                                         monkeypatch):
    """diffusers' ControlNet pipeline samples at the control image's size; its inpaint pipeline crops the control
    image with padding_mask_crop's box (both posterior means: diffusers' retrieve_latents patched)."""
    import diffusers.pipelines.controlnet.pipeline_controlnet_inpaint as inpainting

    pipe, edges = controlled["sd1"].pipe, control_images(1, seed=6)[0].resize((96, 48))  # 48x96 (HxW)
    noise = torch.randn(1, 4, 6, 12, generator=torch.Generator().manual_seed(5))
    theirs = diffusers_pipe(controlled, ref, nets, "sd1", "txt2img", "euler")(
        "a cat", image=edges, num_inference_steps=3, latents=noise.clone(), output_type="np").images
    ours = pipe("a cat", image=edges, steps=3, sampler="euler", latents=noise, output_type="np", progress=False)
    assert ours.images.shape == theirs.shape == (1, 48, 96, 3) and max_diff(ours.images, theirs) <= TOL
    monkeypatch.setattr(inpainting, "retrieve_latents", lambda out, **_: out.latent_dist.mode())
    inpainter, image, last = controlled["sd1-inpaint"].pipe, images(1, seed=7)[0], {}
    mask = np.zeros((64, 64), np.uint8)
    mask[24:40, 20:36] = 255
    mask, control = Image.fromarray(mask), control_images(1, seed=9)[0]
    diffusers_pipe(controlled, ref, nets, "sd1-inpaint", "inpaint", "euler")(
        prompt="a cat", image=image, mask_image=mask, control_image=control, padding_mask_crop=4, height=64,
        width=64, num_inference_steps=4, generator=generators([3]),
        callback_on_step_end=lambda p, i, t, kw: last.update(latents=kw["latents"]) or kw)
    ours = inpainter.inpaint(image, mask=mask, prompt="a cat", control_image=control, crop_padding=4, steps=4,
                             sampler="euler", seed=3, output_type="latent", paste_back=False, mask_mode="diffusers",
                             mask_dilate=0, progress=False)
    assert max_diff(ours.images, last["latents"]) <= 1e-3


def test_loading_options_reach_the_controlnet_and_a_saved_controlnet_pipeline_brings_its_own(models, nets, ref,
                                                                                            tmp_path):
    from test_controlnet_ldm import to_ldm

    from backdrop.diffusion.pipeline import Pipeline

    folder, net = models["sd1"].folder, nets["a"][1]
    torch.save(to_ldm(net.state_dict(), load_controlnet(nets["a"][0]).cfg), tmp_path / "control.ckpt")
    with pytest.raises(CheckpointError, match=r"control.ckpt.*pickle"):
        Pipeline.from_pretrained(folder, device="cpu", controlnet=str(tmp_path / "control.ckpt"))
    pipe = Pipeline.from_pretrained(folder, device="cpu", allow_pickle=True, controlnet=str(tmp_path / "control.ckpt"))
    assert isinstance(pipe.controlnet, ControlNet)
    base = ref("sd1", "txt2img", "euler")
    parts = {k: v for k, v in base.components.items() if k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")}
    for names in (["a"], ["a", "b"]):
        saved = tmp_path / "-".join(names)
        controlnet = nets[names[0]][1] if len(names) == 1 else [nets[n][1] for n in names]
        diffusers.StableDiffusionControlNetPipeline(**parts, controlnet=controlnet, safety_checker=None,
                                                    feature_extractor=None, requires_safety_checker=False
                                                    ).save_pretrained(saved)
        pipe = Pipeline.from_pretrained(saved, device="cpu", dtype=torch.float32)
        got = pipe.controlnet if len(names) > 1 else [pipe.controlnet]
        assert [n.controlnet_mid_block.bias.tolist() for n in got] == [
            nets[n][1].controlnet_mid_block.bias.tolist() for n in names]


def test_config_values_are_checked_and_name_the_file(tmp_path):
    reference(ControlNetConfig(SD1, EMBED)).save_pretrained(tmp_path)
    config = tmp_path / "config.json"
    text = config.read_text()
    config.write_text(text.replace('"global_pool_conditions": false', '"global_pool_conditions": "false"'))
    with pytest.raises(CheckpointError, match=r"config.json: ControlNetConfig: global_pool_conditions = 'false' is "
                                              r"not a bool"):
        load_controlnet(tmp_path)


def test_save_pretrained_writes_the_controlnets_as_diffusers_does(models, nets, tmp_path):
    """A ControlNet pipeline saved here opens in diffusers' StableDiffusionControlNetPipeline (and its inpainting
    one) with the same ControlNet weights, and here again with them; an LDM file cannot hold one."""
    from backdrop.diffusion.pipeline import Pipeline
    from backdrop.nn.checkpoint import save_model

    for model, names, cls in (("sd1", ["a"], diffusers.StableDiffusionControlNetPipeline),
                              ("sd1-inpaint", ["a", "b"], diffusers.StableDiffusionControlNetInpaintPipeline)):
        pipe = Pipeline.from_pretrained(models[model].folder, device="cpu", dtype=torch.float32,
                                        controlnet=[nets[n][0] for n in names])
        folder = pipe.save_pretrained(tmp_path / model)
        theirs = cls.from_pretrained(folder, safety_checker=None, feature_extractor=None)
        loaded = theirs.controlnet.nets if len(names) > 1 else [theirs.controlnet]
        ours = Pipeline.from_pretrained(folder, device="cpu", dtype=torch.float32).controlnet
        ours = ours if len(names) > 1 else [ours]
        for name, diffusers_net, our_net in zip(names, loaded, ours, strict=True):
            want = nets[name][1].state_dict()
            assert all(torch.equal(diffusers_net.state_dict()[k], v) for k, v in want.items())
            assert all(torch.equal(our_net.state_dict()[k], v) for k, v in want.items())
    with pytest.raises(ValueError, match=r"an LDM single file holds no ControlNet"):
        save_model(pipe.backend.model, tmp_path / "m.safetensors", layout="ldm", controlnets=pipe._controlnets)
