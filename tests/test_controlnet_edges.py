"""ControlNet edge cases the main tests (tests/test_controlnet.py) leave open: control images per item when a call
splits its items (per-item strengths, inpaint items with nothing to repaint, num_images_per_prompt), float control
images rounded as 8-bit ones, generate's size from the first ControlNet's first image, img2img at a size that is no
multiple of 8, the setter's checks and casts, a 4x conditioning embedding and diffusers' config defaults (diffusers'
ControlNetModel as the oracle), strict loading of an extra tensor, a variant and a dtype, and the argument checks
that name the value at fault."""
import json
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from backdrop.nn.controlnet import ControlNet, ControlNetConfig, load_controlnet, saved_controlnets
from backdrop.nn.ldm_keys import CheckpointError
from backdrop.nn.testing import rel_err
from backdrop.nn.unet import UNet

from pipeline_helpers import PROMPTS, TOL, images, max_diff, rect_masks
from test_controlnet import EMBED, SD1, control_images, diffusers_pipe, inputs, pair, reference

diffusers = pytest.importorskip("diffusers")
pytestmark = [pytest.mark.usefixtures("one_thread"),  # conftest.py
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]  # diffusers' numpy-2 __array__ notices


@pytest.fixture(scope="module")
def nets(models, tmp_path_factory):
    """{"a": (folder, diffusers ControlNetModel)}: a random ControlNet for the tiny SD1 models, its control image
    embedding made to count (test_controlnet.diffusers_pipe's form)."""
    folder = tmp_path_factory.mktemp("controlnet-edges")
    ref = reference(ControlNetConfig(models["sd1"].pipe.backend.model.unet.cfg, EMBED), 5, sensitive=True)
    ref.save_pretrained(folder)
    return {"a": (str(folder), ref)}


@pytest.fixture(scope="module")
def net(nets):
    return nets["a"][0]


@pytest.fixture
def controlled(models, net):
    for m in ("sd1", "sd1-inpaint"):
        models[m].pipe.controlnet = net
    yield models
    for m in ("sd1", "sd1-inpaint"):
        models[m].pipe.controlnet = None


RUN = dict(output_type="np", progress=False)


def own_image(batch: np.ndarray, alone: np.ndarray, other: np.ndarray) -> None:
    """batch (an item of a batched call) is `alone` (the item's own call), not `other` (the same call with its
    neighbour's control image): a random ControlNet's images depend little on the control image, batching less."""
    assert max_diff(batch, alone) * 20 < max_diff(other, alone), (max_diff(batch, alone), max_diff(other, alone))


def test_per_item_strengths_keep_each_items_control_image(controlled):
    """img2img runs each strength's items in their own sampling loop: each keeps its own control image."""
    pipe, imgs, (c1, c2) = controlled["sd1"].pipe, images(2, seed=2), control_images(2, seed=4)
    run = dict(steps=4, sampler="euler", **RUN)
    batch = pipe.img2img(imgs, PROMPTS, strength=[0.9, 0.6], seed=[7, 8], control_image=[c1, c2], **run).images
    alone = pipe.img2img(imgs[1], PROMPTS[1], strength=0.6, seed=8, control_image=c2, **run).images
    other = pipe.img2img(imgs[1], PROMPTS[1], strength=0.6, seed=8, control_image=c1, **run).images
    own_image(batch[1:], alone, other)


def test_inpaint_items_with_nothing_to_repaint_keep_the_others_control_images(controlled):
    pipe, x0, masks, (c1, c2) = controlled["sd1-inpaint"].pipe, images(2, seed=4), rect_masks(2, seed=4), \
        control_images(2, seed=6)
    masks[0] = Image.new("L", (64, 64), 0)  # item 0: nothing to repaint, item 1 alone is sampled
    run = dict(steps=3, sampler="euler", paste_back=False, **RUN)
    batch = pipe.inpaint(x0, masks, PROMPTS, seed=[1, 2], control_image=[c1, c2], **run).images
    alone = pipe.inpaint(x0[1], masks[1], PROMPTS[1], seed=2, control_image=c2, **run).images
    other = pipe.inpaint(x0[1], masks[1], PROMPTS[1], seed=2, control_image=c1, **run).images
    own_image(batch[1:], alone, other)


def test_num_images_per_prompt_repeats_each_requests_control_image(controlled):
    pipe, (c1, c2) = controlled["sd1"].pipe, control_images(2, seed=7)
    noise = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    got = pipe.generate(PROMPTS, num_images_per_prompt=3, steps=2, sampler="euler", latents=noise,
                        control_image=[c1, c2], **RUN).images
    want = pipe.generate([PROMPTS[0]] * 3 + [PROMPTS[1]] * 3, steps=2, sampler="euler", latents=noise,
                         control_image=[c1] * 3 + [c2] * 3, **RUN).images
    assert got.shape == (6, 64, 64, 3) and max_diff(got, want) <= 1e-5


def test_a_heun_window_ending_between_its_calls_equals_diffusers(controlled, ref, nets):
    """heun's 4 steps are 7 UNet calls (diffusers' window counts calls): end 0.5 keeps calls 0..2 of 7 (3.5 / 7),
    where 8 would keep 0..3."""
    pipe, noise = controlled["sd1"].pipe, torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    theirs = diffusers_pipe(controlled, ref, nets, "sd1", "txt2img", "heun")(
        PROMPTS, image=control_images(2), num_inference_steps=4, guidance_scale=7.5, latents=noise.clone(),
        output_type="np", control_guidance_end=0.5).images
    ours = pipe.generate(PROMPTS, steps=4, sampler="heun", latents=noise, control_image=control_images(2),
                         control_guidance_end=0.5, **RUN).images
    assert max_diff(ours, theirs) <= TOL


def test_an_ip_adapter_beside_a_controlnet_equals_diffusers(controlled, ref, nets, tmp_path):
    """The ControlNet reads the text alone, not the IP-Adapter's image tokens the UNet reads after it (diffusers'
    controlnet_prompt_embeds)."""
    from test_ip_adapter import ip_adapter_folder, loaded, style_image

    pipe, noise = controlled["sd1"].pipe, torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    folder = ip_adapter_folder(tmp_path, pipe.backend.model.unet)
    theirs_pipe = loaded(diffusers_pipe(controlled, ref, nets, "sd1", "txt2img", "euler"), folder)
    try:
        theirs = theirs_pipe(PROMPTS, image=control_images(2), num_inference_steps=3, guidance_scale=7.5,
                             latents=noise.clone(), ip_adapter_image=style_image(), output_type="np").images
    finally:
        theirs_pipe.unload_ip_adapter()
    loaded(pipe, folder)
    try:
        ours = pipe.generate(PROMPTS, steps=3, sampler="euler", latents=noise, control_image=control_images(2),
                             ip_adapter_image=style_image(), **RUN).images
    finally:
        pipe.unload_ip_adapter()
    assert max_diff(ours, theirs) <= TOL


def test_two_controlnets_add_their_residuals(controlled, net):
    """Two copies of one ControlNet at scale s each are that ControlNet at 2 s, down and mid residuals alike
    (s r + s r = 2 s r exactly in binary floating point)."""
    pipe, noise = controlled["sd1"].pipe, torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    run = dict(prompt="a cat", steps=2, sampler="euler", latents=noise, output_type="latent", progress=False)
    once = pipe.generate(control_image=control_images(1)[0], controlnet_conditioning_scale=0.8, **run).images
    pipe.controlnet = [net, net]
    twice = pipe.generate(control_image=control_images(1) * 2, controlnet_conditioning_scale=0.4, **run).images
    assert torch.equal(once, twice)


def test_float_control_images_are_rounded_to_8_bits(controlled):
    """A float control image is read as image= is: v * 255 rounded (not truncated) to the 8-bit image."""
    pipe, rng = controlled["sd1"].pipe, np.random.default_rng(0)
    u8 = rng.integers(1, 256, (64, 64, 3)).astype(np.uint8)
    run = dict(prompt="a cat", steps=1, seed=0, **RUN)
    want = pipe.generate(control_image=u8, **run).images
    assert np.array_equal(pipe.generate(control_image=(u8 - 0.3) / 255, **run).images, want)


def test_generate_takes_its_size_from_the_first_controlnets_first_image(controlled, net):
    pipe = controlled["sd1"].pipe
    pipe.controlnet = [net, net]
    a, b = control_images(2, seed=8)
    given = [[a.resize((96, 48)), b], [a, b]]  # per request: (ControlNet 0's, ControlNet 1's)
    out = pipe.generate(PROMPTS, steps=1, seed=[0, 1], control_image=given, **RUN).images
    assert out.shape == (2, 48, 96, 3)


def test_img2img_at_a_size_no_multiple_of_8(controlled):
    pipe = controlled["sd1"].pipe
    out = pipe.img2img(images(1, 60, 44)[0], "a cat", strength=0.5, steps=2, seed=0,
                       control_image=control_images(1)[0], **RUN).images
    assert out.shape == (1, 60, 44, 3) and np.isfinite(out).all()


def test_the_setter_casts_the_controlnet_and_refuses_other_shapes_by_name(models, net):
    from backdrop.diffusion.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(models["sd1"].folder, device="cpu", dtype=torch.bfloat16)
    pipe.controlnet = load_controlnet(net)  # float32
    assert {p.dtype for p in pipe.controlnet.parameters()} == {torch.bfloat16}
    run = dict(prompt="a cat", steps=2, seed=0, output_type="latent", progress=False)
    zero = pipe.generate(control_image=control_images(1)[0], controlnet_conditioning_scale=0.0, **run).images
    before = pipe.controlnet
    pipe.controlnet = None
    assert torch.equal(zero, pipe.generate(**run).images)  # scale 0 in bfloat16 too: the plain UNet bit for bit
    pipe.controlnet = before
    unet = pipe.backend.model.unet.cfg
    wider = (*unet.block_out_channels[:-1], 2 * unet.block_out_channels[-1])
    for name, value in [("layers_per_block", unet.layers_per_block + 1), ("block_out_channels", wider)]:
        message = f"controlnet[0] does not fit this model: its {name} is {value}, the UNet's {getattr(unet, name)}"
        with pytest.raises(ValueError, match=re.escape(message)):
            pipe.controlnet = ControlNet(ControlNetConfig(replace(unet, **{name: value}), EMBED))
    with pytest.raises(ValueError, match=r"controlnet\[0\] reads control images at 1/4 of the pixels, this model's "
                                         r"latents are 1/8"):
        pipe.controlnet = ControlNet(ControlNetConfig(unet, EMBED[:3]))
    assert pipe.controlnet is before  # a refused one changes nothing


def test_bad_control_arguments_name_the_value(controlled, net):
    pipe, img = controlled["sd1"].pipe, control_images(1)[0]
    for kwargs, error, message in [
            ({"prompt": PROMPTS, "control_image": [img, "edges.png"]}, TypeError,
             r"^control_image\[1\]: a path string"),
            ({"control_image": b"edges.png"}, TypeError, r"^control_image: a path string"),
            ({"control_image": img, "control_guidance_start": -0.1}, ValueError,
             r"control_guidance_start must be a number in \[0, 1\]")]:
        with pytest.raises(error, match=message):
            pipe.generate(**{"prompt": "a cat", **kwargs}, steps=1, progress=False)
    run = dict(prompt="a cat", steps=1, seed=0, control_image=img, **RUN)
    assert np.array_equal(pipe.generate(guess_mode=np.bool_(True), **run).images,
                          pipe.generate(guess_mode=True, **run).images)
    negative = pipe.generate(controlnet_conditioning_scale=-0.5, **run).images  # diffusers takes any float
    assert max_diff(negative, pipe.generate(controlnet_conditioning_scale=0.5, **run).images) > 0
    pipe.controlnet = [net, net]
    for given, message in [([], r"control_image: 2 ControlNets take a list"),
                           ([[img, img, img]], r"a request's list must hold one image for each of the 2 ControlNets")]:
        with pytest.raises(ValueError, match=message):
            pipe.generate("a cat", steps=1, progress=False, control_image=given)


# ------------------------------------------------------------------------------------------------- the network

def test_a_4x_conditioning_embedding_matches_diffusers():
    """Three widths: two stride-2 convs, a control image at 4x the latents (diffusers takes any count)."""
    cfg = ControlNetConfig(SD1, EMBED[:3])
    assert cfg.downsample_factor == 4
    ours, ref = pair(cfg)
    x, t, ctx, _ = inputs(cfg)
    cond = torch.rand(2, 3, 4 * x.shape[2], 4 * x.shape[3], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        down, mid = ref(x, t, ctx, cond, return_dict=False)
        got_down, got_mid = ours(x, t, ctx, cond)
    assert max(rel_err(a, b) for a, b in zip(got_down, down)) < 1e-4 and rel_err(got_mid, mid) < 1e-4


def test_a_config_without_the_optional_fields_is_diffusers_defaults():
    full = ControlNetConfig(SD1, EMBED).to_diffusers()
    given = {k: v for k, v in full.items() if k not in (
        "down_block_types", "conditioning_embedding_out_channels", "conditioning_channels",
        "controlnet_conditioning_channel_order", "global_pool_conditions")}
    ref = diffusers.ControlNetModel.from_config(given)
    cfg = ControlNetConfig.from_diffusers(given)
    for ours, theirs in [(cfg.channel_order, ref.config.controlnet_conditioning_channel_order),
                         (cfg.global_pool_conditions, ref.config.global_pool_conditions),
                         (cfg.conditioning_channels, ref.config.conditioning_channels),
                         (list(cfg.conditioning_embedding_out_channels),
                          list(ref.config.conditioning_embedding_out_channels))]:
        assert ours == theirs
    with torch.device("meta"):
        ours = ControlNet(cfg)
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {
        k: tuple(v.shape) for k, v in ref.state_dict().items()}


def test_config_values_out_of_range_are_refused():
    for options, message in [(dict(conditioning_embedding_out_channels=(8, 0, 16, 32)),
                              "conditioning_embedding_out_channels and conditioning_channels must be positive"),
                             (dict(channel_order="rbg"), "controlnet_conditioning_channel_order 'rbg'"),
                             (dict(conditioning_channels=17), "conditioning_channels")]:
        with pytest.raises(ValueError, match=message):
            ControlNetConfig(SD1, **{"conditioning_embedding_out_channels": EMBED, **options})


def test_forward_refuses_other_latents_and_text_by_name():
    cfg = ControlNetConfig(SD1, EMBED)
    net = ControlNet(cfg)
    x, t, ctx, cond = inputs(cfg)
    with pytest.raises(ValueError, match=r"ControlNet.forward: sample must be \(B, 4, h, w\), got \(2, 9, 13, 10\)"):
        net(torch.cat([x, x, x[:, :1]], 1), t, ctx, cond)
    with pytest.raises(ValueError, match=r"ControlNet.forward"):
        net(x, t, ctx[..., :40], cond)
    with torch.no_grad():
        down, _ = net(x, t, ctx, cond)
    with pytest.raises(ValueError, match=r"12 down residuals and a mid one, one per skip, got 12 and no mid one"):
        UNet(SD1)(x, t, ctx, down, None)


def test_loading_refuses_an_extra_tensor_and_reads_a_variant_and_a_dtype(models, tmp_path):
    from safetensors.torch import load_file, save_file

    cfg = ControlNetConfig(models["sd1"].pipe.backend.model.unet.cfg, EMBED)  # the tiny SD1's
    ref = reference(cfg)
    ref.save_pretrained(tmp_path / "full")
    net = load_controlnet(tmp_path / "full", dtype=torch.bfloat16)
    assert {p.dtype for p in net.parameters()} == {torch.bfloat16}
    other = reference(cfg, seed=1)
    ref.save_pretrained(tmp_path / "both")
    other.save_pretrained(tmp_path / "both", variant="fp16")  # beside the full weights: variant= picks it
    for variant, want in ((None, ref), ("fp16", other)):
        net = load_controlnet(tmp_path / "both", variant=variant)
        assert net.controlnet_mid_block.bias.tolist() == want.controlnet_mid_block.bias.tolist()
    from backdrop.diffusion.pipeline import Pipeline  # its variant= reaches the ControlNet (the model has none)
    pipe = Pipeline.from_pretrained(models["sd1"].folder, device="cpu", dtype=torch.float32, variant="fp16",
                                    controlnet=str(tmp_path / "both"))
    assert pipe.controlnet.controlnet_mid_block.bias.tolist() == other.controlnet_mid_block.bias.tolist()
    weights = tmp_path / "full" / "diffusion_pytorch_model.safetensors"
    save_file(load_file(str(weights)) | {"extra.weight": torch.zeros(2)}, str(weights))
    with pytest.raises(CheckpointError, match=r"1 unexpected: extra.weight"):
        load_controlnet(tmp_path / "full")


def test_a_pickled_folder_loads_with_allow_pickle_only(tmp_path):
    """diffusers' save_pretrained(safe_serialization=False) writes diffusion_pytorch_model.bin: refused, and read
    when allow_pickle=True (the folder's reader was once opened without it, refusing the file it had listed)."""
    ref = reference(ControlNetConfig(SD1, EMBED))
    ref.save_pretrained(tmp_path, safe_serialization=False)
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model.bin"):
        load_controlnet(tmp_path)
    net = load_controlnet(tmp_path, allow_pickle=True)
    assert net.controlnet_mid_block.bias.tolist() == ref.controlnet_mid_block.bias.tolist()


def test_an_original_file_with_a_one_channel_hint_reads_its_channels(tmp_path):
    """cldm.py's input_hint_block reads as many channels as its first conv takes (diffusers' conditioning_channels)."""
    from safetensors.torch import save_file
    from test_controlnet_ldm import tiny, to_ldm

    cfg = replace(tiny("sd1"), conditioning_channels=1)
    ref = reference(cfg)
    save_file({k: v.contiguous() for k, v in to_ldm(ref.state_dict(), cfg).items()}, str(tmp_path / "c.safetensors"))
    net = load_controlnet(tmp_path / "c.safetensors")
    assert net.cfg == cfg
    g = torch.Generator().manual_seed(1)
    x, cond, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.rand(1, 1, 64, 64, generator=g), torch.randn(1, 5, 48)
    with torch.no_grad():
        assert rel_err(net(x, torch.tensor([10]), ctx, cond)[1],
                       ref(x, torch.tensor([10]), ctx, cond, return_dict=False)[1]) < 1e-4


def test_saved_controlnets_only_where_model_index_names_one(tmp_path):
    (tmp_path / "controlnet").mkdir()
    index = tmp_path / "model_index.json"
    index.write_text(json.dumps({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet"]}))
    assert saved_controlnets(tmp_path) == []  # a stray folder, not a ControlNet pipeline's
    index.write_text(json.dumps({"_class_name": "StableDiffusionControlNetPipeline",
                                 "controlnet": ["diffusers", "ControlNetModel"]}))
    assert saved_controlnets(tmp_path) == [tmp_path / "controlnet"]
