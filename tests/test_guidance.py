"""Denoiser / CFGDenoiser: one batched UNet call for cond + uncond, the CFG formula, per-item scales, diffusers'
rescale_noise_cfg, 9-channel inpainting inputs; and end to end, our samplers + wrappers + latent helpers driving
a small random diffusers UNet give the latents of diffusers' own txt2img, img2img and inpaint pipelines."""
import pytest
import torch

from backdrop.diffusion.guidance import CFGDenoiser, Denoiser, rescale_noise_cfg
from backdrop.diffusion.latents import (blend_known_region, default_noise_sampler, initial_latents, noised_latents,
                                        output_latents, per_item_randn)
from backdrop.diffusion.samplers import sample
from backdrop.diffusion.schedule import RECIPES, build_schedule

from scheduler_refs import diffusers_scheduler

pytestmark = [pytest.mark.usefixtures("one_thread"),  # conftest.py
              pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")]

B, L, C = 4, 7, 16  # batch, context tokens, context width


def context_unet(calls=None):
    """Deterministic `unet(x_vp, t, context)` whose output depends on all three (and on extra input channels)."""
    def unet(x, t, context):
        if calls is not None:
            calls.append((x.clone(), t.clone(), context.clone()))
        t = t.reshape(-1, 1, 1, 1) / 1000  # (B, 1, 1, 1)
        ctx = context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
        out = torch.tanh(x[:, :4] * (0.5 + t)) + ctx * x[:, :4] + 0.3 * ctx
        return out + x[:, 4:].sum(dim=1, keepdim=True) * 0.1 if x.shape[1] > 4 else out
    return unet


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 4, 6, 5, generator=g) * 3
    ctx, neg = torch.randn(B, L, C, generator=g), torch.randn(B, L, C, generator=g) - 0.5
    return x, ctx, neg


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_cfg_is_one_batched_call_with_uncond_first(inputs, pred):
    x, ctx, neg = inputs
    schedule = build_schedule("euler", 10)
    sigma = schedule.sigmas[3].item()
    calls = []
    out = CFGDenoiser(context_unet(calls), schedule, pred)(x, sigma, context=ctx, uncond_context=neg,
                                                           guidance_scale=7.5)
    assert len(calls) == 1
    x_in, t_in, ctx_in = calls[0]
    assert x_in.shape[0] == 2 * B and torch.equal(ctx_in, torch.cat([neg, ctx]))  # diffusers' [uncond, cond]
    assert torch.equal(t_in, torch.full((2 * B,), schedule.timesteps[3].item()))
    plain = Denoiser(context_unet(), schedule, pred)
    x_vp = plain.scale_input(x, sigma)
    unet = context_unet()
    guided = unet(x_vp, t_in[:B], neg) + 7.5 * (unet(x_vp, t_in[:B], ctx) - unet(x_vp, t_in[:B], neg))
    assert torch.allclose(out, plain.to_denoised(x, sigma, guided), atol=1e-5)


def test_per_item_scales_skip_uncond_where_scale_le_1(inputs):
    x, ctx, neg = inputs
    schedule = build_schedule("dpmpp-2m", 10)
    sigma = schedule.sigmas[2].item()
    scales = torch.tensor([1.0, 7.5, 0.5, 3.0])
    calls = []
    out = CFGDenoiser(context_unet(calls), schedule)(x, sigma, context=ctx, uncond_context=neg,
                                                     guidance_scale=scales)
    assert len(calls) == 1 and calls[0][0].shape[0] == 2 + B  # uncond passes only for items 1 and 3
    assert torch.equal(calls[0][2][:2], neg[[1, 3]])
    for i, s in enumerate(scales.tolist()):  # each item as if alone with its own float scale
        alone = CFGDenoiser(context_unet(), schedule)(x[i:i + 1], sigma, context=ctx[i:i + 1],
                                                      uncond_context=neg[i:i + 1], guidance_scale=s)
        assert torch.allclose(out[i:i + 1], alone, atol=1e-5)
    calls.clear()  # guidance <= 1 everywhere: conditional pass only, no uncond_context needed
    out = CFGDenoiser(context_unet(calls), schedule)(x, sigma, context=ctx, guidance_scale=1.0)
    assert calls[0][0].shape[0] == B and torch.equal(out, Denoiser(context_unet(), schedule)(x, sigma, context=ctx))


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_guidance_rescale_is_diffusers_rescale_noise_cfg(inputs, pred):
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg as reference

    x, ctx, neg = inputs
    g = torch.Generator().manual_seed(1)
    guided, cond = torch.randn(B, 4, 6, 5, generator=g) * 2, torch.randn(B, 4, 6, 5, generator=g)
    assert torch.allclose(rescale_noise_cfg(guided, cond, 0.7), reference(guided, cond, 0.7), atol=1e-6)
    schedule = build_schedule("euler-a", 10)
    sigma = schedule.sigmas[1].item()
    out = CFGDenoiser(context_unet(), schedule, pred)(x, sigma, context=ctx, uncond_context=neg,
                                                      guidance_scale=9.0, guidance_rescale=0.7)
    plain = Denoiser(context_unet(), schedule, pred)
    t = torch.full((B,), schedule.timesteps[1].item())
    x_vp, unet = plain.scale_input(x, sigma), context_unet()
    u, c = unet(x_vp, t, neg), unet(x_vp, t, ctx)
    # applied to the raw UNet output (eps or v), where diffusers applies it
    assert torch.allclose(out, plain.to_denoised(x, sigma, reference(u + 9.0 * (c - u), c, 0.7)), atol=1e-5)
    per_item = CFGDenoiser(context_unet(), schedule, pred)(x, sigma, context=ctx, uncond_context=neg,
                                                           guidance_scale=9.0, guidance_rescale=torch.full((B,), 0.7))
    assert torch.allclose(per_item, out, atol=1e-6)


def test_inpaint_channels_follow_the_scaled_latents(inputs):
    x, ctx, neg = inputs
    schedule = build_schedule("ddim", 10)
    sigma = schedule.sigmas[0].item()
    c_concat = torch.rand(B, 5, 6, 5)  # mask (1) + masked-image latents (4)
    calls = []
    CFGDenoiser(context_unet(calls), schedule)(x, sigma, context=ctx, uncond_context=neg, guidance_scale=5.0,
                                               c_concat=c_concat)
    x_in = calls[0][0]
    x_vp = Denoiser(context_unet(), schedule).scale_input(x, sigma)
    assert x_in.shape == (2 * B, 9, 6, 5)
    assert torch.equal(x_in, torch.cat([x_vp, c_concat], dim=1).repeat(2, 1, 1, 1))
    with pytest.raises(ValueError, match=r"c_concat \(4, 5, 3, 5\) must be \(B, C, h, w\) matching"):
        Denoiser(context_unet(), schedule)(x, sigma, context=ctx, c_concat=torch.rand(B, 5, 3, 5))


def test_per_item_sigmas_equal_scalar_calls(inputs):
    x, ctx, _ = inputs
    for pred in ("epsilon", "v_prediction"):
        schedule = build_schedule("euler", 10)
        model = Denoiser(context_unet(), schedule, pred)
        levels = schedule.sigmas[[0, 3, 5, 9]]
        out = model(x, levels, context=ctx)
        for i, s in enumerate(levels.tolist()):
            assert torch.allclose(out[i:i + 1], model(x[i:i + 1], s, context=ctx[i:i + 1]), atol=1e-5)


def test_errors_are_named(inputs):
    x, ctx, neg = inputs
    schedule = build_schedule("euler", 10)
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        Denoiser(context_unet(), schedule, "sample")
    with pytest.raises(ValueError, match="needs uncond_context"):
        CFGDenoiser(context_unet(), schedule)(x, 1.0, context=ctx, guidance_scale=7.5)
    with pytest.raises(ValueError, match=r"uncond_context \(4, 3, 16\) must have the shape of context"):
        CFGDenoiser(context_unet(), schedule)(x, 1.0, context=ctx, uncond_context=neg[:, :3])
    with pytest.raises(ValueError, match=r"guidance_scale tensor \(3,\) must be \(B,\)"):
        CFGDenoiser(context_unet(), schedule)(x, 1.0, context=ctx, uncond_context=neg,
                                              guidance_scale=torch.ones(3))
    from backdrop.nn.config import SchedulerConfig
    zero_snr = build_schedule("ddim", 10, SchedulerConfig(rescale_betas_zero_snr=True, timestep_spacing="trailing"))
    with pytest.raises(ValueError, match="v_prediction"):
        Denoiser(context_unet(), zero_snr, "epsilon")


# ------------------------------------------------------------------------------------ end to end vs diffusers

@pytest.fixture(scope="module")
def tiny():
    """Small random diffusers UNets (4 and 9 input channels) and a VAE the pipelines need but never run (we give
    latents in and ask for latents out). conv_out is scaled down so v-predictions are O(1), as a trained model's."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from backdrop.nn.config import UNetConfig

    torch.manual_seed(0)
    unets = {}
    for cin in (4, 9):
        cfg = UNetConfig(in_channels=cin, block_out_channels=(8, 16), attention_levels=(True, False),
                         num_heads=(2, 2), layers_per_block=1, cross_attention_dim=C, norm_num_groups=4,
                         sample_size=8)
        unet = UNet2DConditionModel.from_config(cfg.to_diffusers()).eval()
        with torch.no_grad():
            unet.conv_out.weight.mul_(0.1)
        unets[cin] = unet
    vae = AutoencoderKL(block_out_channels=(4, 4, 4, 4), down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, norm_num_groups=4, layers_per_block=1)
    return unets, vae


def run_pipeline(kind, name, tiny, pred, steps, **kw):
    import diffusers

    from backdrop.nn.config import SchedulerConfig

    unets, vae = tiny
    cls = {"txt2img": diffusers.StableDiffusionPipeline, "img2img": diffusers.StableDiffusionImg2ImgPipeline,
           "inpaint": diffusers.StableDiffusionInpaintPipeline}[kind]
    unet = unets[9 if kw.pop("nine", False) else 4]
    scheduler = diffusers_scheduler(name, SchedulerConfig(), pred)  # what a pipeline builds from SD's config
    pipe = cls(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler, safety_checker=None,
               feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(num_inference_steps=steps, output_type="latent", height=64, width=64, **kw).images


def our_unet(unet):
    def call(x, t, context):
        return unet(x, t, encoder_hidden_states=context).sample
    return call


E2E = [("euler-a", "epsilon"), ("ddim", "v_prediction"), ("dpmpp-2m-karras", "v_prediction"), ("lcm", "epsilon"),
       ("unipc", "v_prediction"), ("dpmpp-2m-sde", "epsilon"), ("heun", "v_prediction"), ("pndm", "v_prediction")]


@pytest.fixture(scope="module")
def request_tensors():
    g = torch.Generator().manual_seed(42)
    return dict(ctx=torch.randn(2, L, C, generator=g), neg=torch.randn(2, L, C, generator=g),
                x0=torch.randn(2, 4, 8, 8, generator=g), noise=torch.randn(2, 4, 8, 8, generator=g),
                mask=(torch.rand(2, 1, 64, 64, generator=g) > 0.5).float())


def gens():
    return [torch.Generator().manual_seed(s) for s in (7, 8)]


@pytest.mark.parametrize("name,pred", E2E)
def test_txt2img_equals_diffusers_pipeline(tiny, request_tensors, name, pred):
    r = request_tensors
    ref = run_pipeline("txt2img", name, tiny, pred, 6, prompt_embeds=r["ctx"], negative_prompt_embeds=r["neg"],
                       latents=r["noise"].clone(), guidance_scale=6.0, guidance_rescale=0.5, generator=gens())
    schedule = build_schedule(name, 6)
    x = initial_latents(r["noise"], schedule)
    x = sample(CFGDenoiser(our_unet(tiny[0][4]), schedule, pred), x, schedule, disable=True,
               extra_args=dict(context=r["ctx"], uncond_context=r["neg"], guidance_scale=6.0, guidance_rescale=0.5),
               noise_sampler=default_noise_sampler(x, gens()))
    assert (output_latents(x, schedule) - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name,pred", E2E[:5])
def test_img2img_equals_diffusers_pipeline(tiny, request_tensors, name, pred):
    r = request_tensors
    ref = run_pipeline("img2img", name, tiny, pred, 10, prompt_embeds=r["ctx"], negative_prompt_embeds=r["neg"],
                       image=r["x0"], strength=0.75, guidance_scale=4.0, generator=gens())
    schedule = build_schedule(name, 10).img2img(0.75)
    g = gens()  # the pipeline draws the img2img noise first, then the sampler's
    x = noised_latents(r["x0"], per_item_randn(r["x0"].shape, g), schedule)
    x = sample(CFGDenoiser(our_unet(tiny[0][4]), schedule, pred), x, schedule, disable=True,
               extra_args=dict(context=r["ctx"], uncond_context=r["neg"], guidance_scale=4.0),
               noise_sampler=default_noise_sampler(x, g))
    assert (output_latents(x, schedule) - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name,pred", E2E[:5])
@pytest.mark.parametrize("channels", [9, 4])
def test_inpaint_equals_diffusers_pipeline(tiny, request_tensors, name, pred, channels):
    """9 channels: mask + masked-image latents ride along as c_concat. 4 channels: the known region is blended
    back after every step (blend_known_region). diffusers resizes the mask to latent size with nearest."""
    r = request_tensors
    strength = 1.0 if channels == 9 else 0.75
    masked = r["x0"] * 0.5  # stands in for the VAE latents of the masked image
    ref = run_pipeline("inpaint", name, tiny, pred, 8, prompt_embeds=r["ctx"], negative_prompt_embeds=r["neg"],
                       image=r["x0"], mask_image=r["mask"], masked_image_latents=masked, strength=strength,
                       guidance_scale=5.0, generator=gens(), nine=channels == 9)
    mask = torch.nn.functional.interpolate(r["mask"], size=(8, 8))  # (2, 1, 8, 8)
    schedule = build_schedule(name, 8).img2img(strength)
    g = gens()
    noise = per_item_randn(r["x0"].shape, g)
    args = dict(context=r["ctx"], uncond_context=r["neg"], guidance_scale=5.0)
    callback = None
    if channels == 9:  # strength 1: pure noise, as txt2img
        x = initial_latents(noise, schedule)
        args["c_concat"] = torch.cat([mask, masked], dim=1)  # (2, 5, 8, 8)
    else:
        x = noised_latents(r["x0"], noise, schedule)
        callback = blend_known_region(r["x0"], noise, mask, schedule)
    x = sample(CFGDenoiser(our_unet(tiny[0][channels]), schedule, pred), x, schedule, extra_args=args,
               callback=callback, noise_sampler=default_noise_sampler(x, g), disable=True)
    assert (output_latents(x, schedule) - ref).abs().max().item() <= 1e-4
    assert RECIPES[name].order == 1  # (Heun's diffusers loop also blends its predictor point: not compared)
