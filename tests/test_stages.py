"""The training stages on the tiny preset: the diffusion loss is diffusers' train_text_to_image loss option for option
(same weights, same draws), each stage overfits a fixed batch and writes a final/ that load_model (and diffusers /
transformers) open, the 9-channel conversion is exact, the inpainting inputs are the diffusers pipeline's, resume
equals a straight run, and the latent cache gives the losses on-the-fly encoding gives."""
import dataclasses
import json
import math
import os

import pytest
import torch

from backdrop.nn.checkpoint import init_model, load_model
from backdrop.train.cache import LatentCache, build_cache, fingerprint
from backdrop.train.core import TrainConfig, Trainer
from backdrop.train.data import DataStream, collate, make_dataset
from backdrop.train.stages.clip import ClipStage, clip_score, load_clip, vision_config
from backdrop.train.stages.common import DiffusionOptions, NoiseSchedule, sample_posterior
from backdrop.train.stages.inpaint import InpaintStage, to_inpaint_unet
from backdrop.train.stages.pretrain import PretrainStage
from backdrop.train.stages.vae import VAEStage, ssim

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

diffusers = pytest.importorskip("diffusers")


def tiny(seed=0, **changes):
    model = init_model("tiny", seed=seed)
    if changes:
        model = dataclasses.replace(model, config=dataclasses.replace(model.config, **changes))
    return model


def randomize_(module, seed=0):
    """Perturb every parameter (zero-initialised ones would hide mistakes), keeping activations O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * r if p.dim() == 1 and "norm" in name and name.endswith("weight")
                    else 0.1 * r if p.dim() == 1 else r / math.sqrt(p[0].numel()))


def batch_of(n, size=64, start=0):
    data = make_dataset(f"synthetic:{start + n}", size)
    return collate([data[i] for i in range(start, start + n)])


def fit(stage, data, tmp_path, steps, lr, batch_size=8):
    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, lr_schedule="constant", log_every=steps)
    trainer = Trainer(stage, DataStream(data, batch_size), cfg, tmp_path, progress=False)
    trainer.fit()
    return trainer


def fixed_loss(stage, module, batch, seed=123, metric=None):
    """The loss (or one of its metrics) on `batch` with fixed random draws, so before/after compare like for like."""
    with torch.no_grad():
        loss, metrics = stage.loss(module, batch, torch.Generator().manual_seed(seed))
    return float(loss if metric is None else metrics[metric])


# ------------------------------------------------------------------------------ the loss vs diffusers' example

def reference_loss(unet, scheduler, batch, empty, opts, sf, g):
    """diffusers examples/text_to_image/train_text_to_image.py's loss, drawing from `g` in Backdrop's order."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from diffusers.training_utils import compute_snr

    n = batch["moments"].shape[0]
    drop = torch.rand(n, generator=g) < opts.caption_dropout
    context = torch.where(drop[:, None, None], empty, batch["context"])
    latents = DiagonalGaussianDistribution(batch["moments"]).sample(g) * sf
    noise = torch.randn(latents.shape, generator=g)
    if opts.noise_offset:
        noise += opts.noise_offset * torch.randn((n, latents.shape[1], 1, 1), generator=g)
    new_noise = noise + opts.input_perturbation * torch.randn(noise.shape, generator=g) \
        if opts.input_perturbation else noise
    t = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=g)
    noisy = scheduler.add_noise(latents, new_noise, t)
    target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, t)
    pred = unet(noisy, t, context).sample
    if not opts.snr_gamma:
        return torch.nn.functional.mse_loss(pred.float(), target.float())
    snr = compute_snr(scheduler, t)
    w = torch.stack([snr, opts.snr_gamma * torch.ones_like(t)], dim=1).min(dim=1)[0]
    w = w / snr if scheduler.config.prediction_type == "epsilon" else w / (snr + 1)
    loss = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="none")
    return (loss.mean(dim=list(range(1, loss.dim()))) * w).mean()


@pytest.mark.parametrize("opts", [
    DiffusionOptions(caption_dropout=0.0),
    DiffusionOptions(snr_gamma=5.0, noise_offset=0.1, input_perturbation=0.1, caption_dropout=0.5),
    DiffusionOptions(prediction_type="v_prediction", snr_gamma=5.0, zero_terminal_snr=True, caption_dropout=0.5),
], ids=["eps", "eps-minsnr-offset-perturb-dropout", "v-minsnr-zerosnr"])
def test_loss_equals_diffusers_example(opts):
    model = tiny()
    randomize_(model.unet)
    stage = PretrainStage(model, opts)
    cfg = stage.config
    ref_unet = diffusers.UNet2DConditionModel.from_config(cfg.unet.to_diffusers())
    ref_unet.load_state_dict(model.unet.state_dict(), strict=True)
    scheduler = diffusers.DDPMScheduler.from_config(cfg.scheduler.to_diffusers(cfg.prediction_type))
    g = torch.Generator().manual_seed(7)
    batch = {"moments": torch.cat([torch.randn(6, 4, 8, 8, generator=g), -3 + torch.randn(6, 4, 8, 8, generator=g)], 1),
             "context": torch.randn(6, 77, 64, generator=g), "index": torch.arange(6)}
    ours, _ = stage.loss(model.unet, batch, torch.Generator().manual_seed(1))
    ref = reference_loss(ref_unet, scheduler, batch, stage.empty_context, opts, cfg.scaling_factor,
                         torch.Generator().manual_seed(1))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_min_snr_weights_and_velocity_match_diffusers():
    from diffusers.training_utils import compute_snr

    for zero_snr in (False, True):
        cfg = dataclasses.replace(tiny().config, prediction_type="v_prediction")
        cfg = DiffusionOptions(zero_terminal_snr=zero_snr).apply(cfg)
        ours = NoiseSchedule(cfg)
        ref = diffusers.DDPMScheduler.from_config(cfg.scheduler.to_diffusers(cfg.prediction_type))
        t = torch.tensor([0, 1, 10, 250, 500, 900, 998] + ([] if zero_snr else [999]))
        snr = compute_snr(ref, t)
        for prediction, divisor in (("epsilon", snr), ("v_prediction", snr + 1)):
            want = torch.stack([snr, 5.0 * torch.ones_like(t)], dim=1).min(dim=1)[0] / divisor
            torch.testing.assert_close(ours.min_snr_weights(t, 5.0, prediction), want, rtol=1e-6, atol=0)
        x0, noise = torch.randn(8, 4, 8, 8), torch.randn(8, 4, 8, 8)
        t = torch.tensor([0, 1, 10, 250, 500, 900, 998, 999])
        assert torch.equal(ours.velocity(x0, noise, t), ref.get_velocity(x0, noise, t))
        assert torch.equal(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t))


def test_zero_terminal_snr_needs_v_prediction():
    with pytest.raises(ValueError, match="v-prediction"):
        PretrainStage(tiny(), DiffusionOptions(zero_terminal_snr=True))


def test_caption_dropout_rate():
    model = tiny()
    for p in (0.0, 0.3, 1.0):
        stage = PretrainStage(model, DiffusionOptions(caption_dropout=p))
        context = torch.randn(1000, 77, 64)
        batch = {"moments": torch.zeros(1000, 8, 1, 1), "context": context}
        _, got = stage.condition(batch, torch.Generator().manual_seed(3))
        dropped = (got == stage.empty_context).flatten(1).all(1)  # (1000,)
        kept = (got == context).flatten(1).all(1)
        assert bool((dropped ^ kept).all())
        assert abs(dropped.float().mean().item() - p) < 0.045  # 3 sigma of a binomial(1000, 0.3) rate is 0.043
    # on the fly: a dropped caption is encoded as the empty prompt
    stage = PretrainStage(model, DiffusionOptions(caption_dropout=0.5))
    batch = batch_of(8)
    _, ctx = stage.condition(batch, torch.Generator().manual_seed(0))
    drop = torch.rand(8, generator=torch.Generator().manual_seed(0)) < 0.5
    assert 0 < int(drop.sum()) < 8
    torch.testing.assert_close(ctx[drop], stage.empty_context.expand(int(drop.sum()), -1, -1))
    assert not torch.allclose(ctx[~drop][0], stage.empty_context[0])


# ------------------------------------------------------------------------------ stages overfit a fixed batch

def test_pretrain_overfits_resumes_and_saves(tmp_path):
    model = tiny()
    data = make_dataset("synthetic:8", 32)
    opts = DiffusionOptions(snr_gamma=5.0, noise_offset=0.05, input_perturbation=0.1, caption_dropout=0.2)
    stage = PretrainStage(model, opts)
    batch = collate([data[i] for i in range(8)])
    before = fixed_loss(stage, model.unet, batch)
    trainer = fit(stage, data, tmp_path / "run", steps=30, lr=2e-3)
    after = fixed_loss(stage, trainer.module, batch)
    assert after < 0.6 * before, (before, after)

    final = trainer.save_final()
    loaded = load_model(final)
    assert torch.equal(loaded.unet.conv_in.weight, trainer.module.conv_in.weight)
    assert torch.equal(loaded.vae.encoder.conv_in.weight, model.vae.encoder.conv_in.weight)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(final, safety_checker=None)
    ids = loaded.tokenizer(["a red mug on sand", "a lamp"])
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = pipe.unet(x, 500, pipe.text_encoder(ids).last_hidden_state).sample
        ours = loaded.unet(x, 500, loaded.text_encoder(ids))
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_pretrain_resume_equals_straight_run(tmp_path):
    opts = DiffusionOptions(snr_gamma=5.0, noise_offset=0.05, input_perturbation=0.1, caption_dropout=0.5)
    data = make_dataset("synthetic:12", 32)
    cfg = TrainConfig(steps=4, batch_size=4, lr=1e-3, ema_decay=0.9, save_every=2, keep_last=0, log_every=1)
    straight = Trainer(PretrainStage(tiny(), opts), DataStream(data, 4, seed=1), cfg, tmp_path / "a", progress=False)
    straight.fit()
    # a fresh process's view: new model, stage and stream, state from the step-2 checkpoint of the run
    resumed = Trainer(PretrainStage(tiny(), opts), DataStream(data, 4, seed=1), cfg, tmp_path / "b", progress=False)
    resumed.resume(tmp_path / "a" / "checkpoints" / "step-00000002")
    assert resumed.step == 2
    resumed.fit()
    for (k, a), b in zip(straight.module.state_dict().items(), resumed.module.state_dict().values()):
        assert torch.equal(a, b), k
    assert all(torch.equal(straight.ema.shadow[k], resumed.ema.shadow[k]) for k in straight.ema.shadow)


def test_inpaint_conversion_is_exact_and_stage_overfits(tmp_path):
    model = tiny()
    randomize_(model.unet)
    unet9 = to_inpaint_unet(model.unet)
    assert unet9.cfg.in_channels == 9 and to_inpaint_unet(unet9) is unet9
    x, extra = torch.randn(3, 4, 8, 8), 5 * torch.randn(3, 5, 8, 8)
    t, ctx = torch.tensor([1, 400, 999]), torch.randn(3, 77, 64)
    with torch.no_grad():
        assert torch.equal(unet9(torch.cat([x, extra], 1), t, ctx), model.unet(x, t, ctx))

    model = tiny()
    stage = InpaintStage(model, DiffusionOptions(caption_dropout=0.1), masks="random")
    data = make_dataset("synthetic:8", 32)
    batch = collate([data[i] for i in range(8)])
    before = fixed_loss(stage, stage.model.unet, batch)
    trainer = fit(stage, data, tmp_path / "run", steps=30, lr=2e-3)
    after = fixed_loss(stage, trainer.module, batch)
    assert after < 0.6 * before, (before, after)
    loaded = load_model(trainer.save_final())
    assert loaded.config.unet.in_channels == 9
    assert torch.equal(loaded.unet.conv_in.weight, trainer.module.conv_in.weight)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a host sync only exists with a GPU")
@pytest.mark.parametrize("stage_cls", [PretrainStage, InpaintStage, VAEStage])
def test_cuda_train_steps_never_wait_for_the_gpu(stage_cls, tmp_path):
    """A bf16 training step on CUDA queues all its work without a host sync, so the loop's host work for the next
    step (masks, noise, Python) overlaps the GPU's work on this one. torch's sync debug mode raises on any: a
    blocking host->device copy (torch synchronizes the stream after one), .item(), a device nonzero. The first
    step runs outside it: it fills one-time caches (the schedule on the device, grey latents, kernel autotuning)."""
    model = tiny()
    stage = (VAEStage(model, device="cuda") if stage_cls is VAEStage else
             stage_cls(model, DiffusionOptions(snr_gamma=5.0, caption_dropout=0.2, noise_offset=0.05), "cuda"))
    data = make_dataset("synthetic:16", 64)
    cfg = TrainConfig(steps=3, batch_size=8, lr=1e-4, precision="bf16", ema_decay=0.99)
    trainer = Trainer(stage, DataStream(data, 8), cfg, tmp_path, device="cuda", progress=False)
    trainer.train_step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        metrics = trainer.train_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert math.isfinite(float(metrics["loss"]))


@pytest.mark.parametrize("masks", ["random", "product"])
def test_inpaint_inputs_are_the_diffusers_pipelines(masks):
    """The UNet's 5 extra channels: diffusers' prepare_mask_latents mask (binarise, nearest resize) and the latents
    of image * (mask < 0.5) from diffusers' AutoencoderKL holding the same weights (posterior mean, scaled)."""
    model = tiny()
    randomize_(model.vae)
    stage = InpaintStage(model, masks=masks, latent_mask="diffusers")
    seen = {}

    def unet(x, t, ctx):
        seen["x"] = x
        return x[:, :4]

    batch = batch_of(4)
    stage.loss(unet, batch, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    torch.rand(4, generator=g)  # caption dropout
    torch.randn(4, 4, 8, 8, generator=g)  # posterior sample
    if masks == "random":
        from backdrop.train.data import random_mask
        mask = torch.stack([random_mask(64, 64, g) for _ in range(4)])
    else:
        mask = 1 - batch["mask"]
    ref_vae = diffusers.AutoencoderKL.from_config(stage.config.vae.to_diffusers())
    ref_vae.load_state_dict(model.vae.state_dict(), strict=True)
    with torch.no_grad():
        masked = ref_vae.encode(batch["image"] * (mask < 0.5)).latent_dist.mean * stage.config.scaling_factor
    lat_mask = torch.nn.functional.interpolate((mask >= 0.5).float(), size=(8, 8))
    assert torch.equal(seen["x"][:, 4:5], lat_mask)
    torch.testing.assert_close(seen["x"][:, 5:], masked, rtol=1e-4, atol=1e-5)


def test_full_masks_reuse_the_grey_latents():
    model = tiny()
    randomize_(model.vae)
    stage = InpaintStage(model)
    image, sf = batch_of(3)["image"], stage.config.scaling_factor
    for rows in ([0], [0, 1, 2], []):  # some, all and no items fully masked
        mask = torch.zeros(3, 1, 64, 64)
        mask[:, :, :20] = 1
        mask[rows] = 1
        with torch.no_grad():
            want = model.vae.encode(image * (mask < 0.5)) * sf
            full = torch.tensor([i in rows for i in range(3)])
            torch.testing.assert_close(stage._masked_latents(image, mask, full), want, rtol=1e-4, atol=1e-5)


def test_vae_overfits_and_measures_scaling_factor(tmp_path):
    model = tiny()
    data = make_dataset("synthetic:8", 32)
    batch = collate([data[i] for i in range(8)])
    stage = VAEStage(model, calibration=batch["image"])
    before = [fixed_loss(stage, stage.trainable(), batch, metric=m) for m in (None, "l1")]
    trainer = fit(stage, data, tmp_path / "run", steps=30, lr=2e-3)
    after = [fixed_loss(stage, trainer.module, batch, metric=m) for m in (None, "l1")]
    # measured 0.92 -> 0.67 (L1 0.55 -> 0.33); SSIM, 84% of the loss, climbs slowly from a random start
    assert after[0] < 0.8 * before[0] and after[1] < 0.75 * before[1], (before, after)
    loaded = load_model(trainer.save_final())
    with torch.no_grad():
        z = sample_posterior(torch.cat([(p := loaded.vae.encode_posterior(batch["image"])).mean, p.logvar], 1),
                             torch.Generator().manual_seed(0))
    assert loaded.config.vae.scaling_factor == pytest.approx(1 / z.std().item(), rel=1e-4)


def test_vae_decoder_only_keeps_the_latent_space(tmp_path):
    model = tiny()
    randomize_(model.vae)
    data = make_dataset("synthetic:8", 32)
    batch = collate([data[i] for i in range(8)])
    stage = VAEStage(model, decoder_only=True)
    before = {k: v.clone() for k, v in model.vae.state_dict().items()}
    l1_before = fixed_loss(stage, stage.trainable(), batch, metric="l1")
    trainer = fit(stage, data, tmp_path / "run", steps=20, lr=2e-3)
    assert fixed_loss(stage, trainer.module, batch, metric="l1") < 0.9 * l1_before
    loaded = load_model(trainer.save_final()).vae.state_dict()
    changed = {k for k, v in loaded.items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith(("decoder.", "post_quant_conv.")) for k in changed), sorted(changed)
    assert not any(k.startswith("decoder.") for k in set(before) - changed)  # every decoder tensor trained
    with pytest.raises(ValueError, match="decoder_only"):
        VAEStage(tiny(), decoder_only=True, calibration=batch["image"])


def test_vae_mask_conditioned_decoder(tmp_path):
    """--mask-conditioned: the converted VAE decodes as before without a condition (the new condition encoder
    is only read with one), trains its decoder with per-item repaint masks (product masks where the data has
    them), and saves as an AsymmetricAutoencoderKL folder that loads back conditioned."""
    model = tiny()
    randomize_(model.vae)
    data = make_dataset("synthetic:8", 32)
    batch = collate([data[i] for i in range(8)])
    stage = VAEStage(model, decoder_only=True, mask_conditioned=True, product_prob=1.0)
    vae = stage.model.vae
    assert vae.cfg.mask_conditioned and not model.config.vae.mask_conditioned
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(vae.decode(z), model.vae.decode(z), rtol=0, atol=0)
    masks = stage._repaint_masks(batch, torch.Generator().manual_seed(0), "cpu")
    torch.testing.assert_close(masks, 1 - batch["mask"])  # product_prob 1: keep each product
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    l1_before = fixed_loss(stage, stage.trainable(), batch, metric="l1")
    trainer = fit(stage, data, tmp_path / "run", steps=20, lr=2e-3)
    assert fixed_loss(stage, trainer.module, batch, metric="l1") < 0.9 * l1_before
    loaded = load_model(trainer.save_final())
    assert loaded.config.vae.mask_conditioned
    changed = {k for k, v in loaded.vae.state_dict().items() if not torch.equal(v, before[k])}
    assert any(k.startswith("decoder.condition_encoder.") for k in changed)
    assert all(k.startswith(("decoder.", "post_quant_conv.")) for k in changed), sorted(changed)
    with pytest.raises(ValueError, match="decoder-only"):
        VAEStage(tiny(), mask_conditioned=True)


def test_ssim():
    """On an 11x11 image SSIM is one window: Wang et al. eq. 13 with Gaussian-weighted (sigma 1.5) statistics,
    written out here in float64 without the separable blur."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(3, 3, 11, 11, generator=g) * 2 - 1, torch.rand(3, 3, 11, 11, generator=g) * 2 - 1
    y = 0.6 * x + 0.4 * y  # correlated, so every term matters
    r = torch.arange(11, dtype=torch.float64) - 5
    w = torch.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * 1.5 ** 2))
    w = w / w.sum()  # (11, 11)
    xd, yd = x.double(), y.double()
    mx, my = (xd * w).sum((-2, -1)), (yd * w).sum((-2, -1))  # (3, 3)
    vx = (w * (xd - mx[..., None, None]) ** 2).sum((-2, -1))
    vy = (w * (yd - my[..., None, None]) ** 2).sum((-2, -1))
    cov = (w * (xd - mx[..., None, None]) * (yd - my[..., None, None])).sum((-2, -1))
    c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2
    want = ((2 * mx * my + c1) * (2 * cov + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))).mean(1)  # (3,)
    torch.testing.assert_close(ssim(x, y).double(), want, rtol=1e-4, atol=1e-5)
    big = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    assert torch.allclose(ssim(big, big), torch.ones(2))
    noisy = [ssim(big + s * torch.randn(big.shape, generator=g), big).mean().item() for s in (0.05, 0.2, 0.8)]
    assert noisy[0] < 1, noisy                         # any noise lowers SSIM below that of identical images
    assert noisy[0] > noisy[1] > noisy[2], noisy       # and more noise lowers it further (0.05 -> 0.2 -> 0.8)


def test_clip_overfits_and_writes_image_encoder(tmp_path):
    from transformers import CLIPVisionModelWithProjection

    model = tiny()
    data = make_dataset("synthetic:8", 64)
    batch = collate([data[i] for i in range(8)])
    vision = vision_config(64, 64, width=64, layers=2, heads=2, patch_size=16)
    stage = ClipStage(model, vision)
    for seed, same in ((0, True), (1, False)):  # --seed decides the new vision tower (it drew from the global RNG)
        other = ClipStage(model, vision, seed=seed).clip.state_dict()
        assert all(torch.equal(v, other[k]) for k, v in stage.clip.state_dict().items()) is same
    before = fixed_loss(stage, stage.trainable(), batch)
    trainer = fit(stage, data, tmp_path / "run", steps=30, lr=2e-3)
    after = fixed_loss(stage, trainer.module, batch)
    assert after < 0.5 * before, (before, after)
    final = trainer.save_final()

    loaded = load_model(final)  # image_encoder/ is ignored by the loader
    ids = loaded.tokenizer(batch["caption"])
    with torch.no_grad():
        torch.testing.assert_close(loaded.text_encoder(ids), trainer.module.text_model(ids))
        clip = load_clip(final, loaded)
        ref = CLIPVisionModelWithProjection.from_pretrained(final / "image_encoder").eval()
        from backdrop.nn.clip import clip_preprocess
        pixels = clip_preprocess(batch["image"], 64)
        torch.testing.assert_close(ref(pixel_values=pixels).image_embeds,
                                   clip.visual_projection(clip.vision_model(pixels)[1]), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(clip(ids, pixels)[0], trainer.module(ids, pixels)[0])
        scores = clip_score(clip, loaded.tokenizer, batch["image"], batch["caption"])
        shuffled = clip_score(clip, loaded.tokenizer, batch["image"], batch["caption"][1:] + batch["caption"][:1])
    assert scores.mean() > shuffled.mean()  # the trained pairs score higher than mismatched ones
    # a second clip run from this folder continues the saved vision tower
    again = ClipStage(loaded, None, init=final)
    assert all(torch.equal(a, b) for a, b in zip(again.clip.state_dict().values(), clip.state_dict().values()))


def test_cache_progress_off_a_terminal_is_plain_lines(tmp_path, capsys):
    """A job's log gets a line at every tenth of the items, not tqdm's \\r frames."""
    build_cache(tiny(), make_dataset("synthetic:20", 32), tmp_path / "c", batch_size=3, progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err
    counts = [line.split(" items")[0] for line in err.splitlines()]
    assert counts == [f"cache: {k}/20" for k in (3, 6, 9, 12, 15, 18, 20)]  # batches of 3 reach a tenth each



# ------------------------------------------------------------------------------ the latent cache

@pytest.mark.parametrize("stage_cls", [PretrainStage, InpaintStage])
def test_cache_gives_the_on_the_fly_loss(stage_cls, tmp_path):
    model = tiny()
    randomize_(model.vae, 1)
    data = make_dataset("synthetic:10", 64)
    cache = LatentCache(build_cache(model, data, tmp_path / "cache", batch_size=4, shard_size=3, progress=False))
    cache.check(model, 64)
    assert len(cache) == 10 and len(cache.manifest["shards"]) == 4
    opts = DiffusionOptions(caption_dropout=0.5, snr_gamma=5.0, noise_offset=0.05)
    kwargs = {"masks": "product", "product_prob": 0.5} if stage_cls is InpaintStage else {}
    stage = stage_cls(model, opts, **kwargs)
    a, b = DataStream(data, 5, seed=3), DataStream(cache, 5, seed=3)
    for _ in range(3):  # crosses an epoch boundary
        ba, bb = next(a), next(b)
        assert torch.equal(ba["index"], bb["index"]) and torch.equal(ba["image"], bb["image"])
        la = fixed_loss(stage, stage.model.unet, ba, seed=11)
        lb = fixed_loss(stage, stage.model.unet, bb, seed=11)
        assert la == pytest.approx(lb, rel=1e-5, abs=1e-6)


def test_product_latents_cache_trains_inpaint_without_images_or_the_vae(tmp_path):
    """A cache of a dataset with product masks holds each item's product-kept masked-image latents: inpaint
    --masks product --product-prob 1 then needs neither the pixels (a --no-images cache) nor the VAE encoder, and
    its loss equals on-the-fly encoding's. Random masks still need the pixels: a clear error without them."""
    model = tiny()
    randomize_(model.vae, 1)
    data = make_dataset("synthetic:6", 64)
    cache = LatentCache(build_cache(model, data, tmp_path / "cache", batch_size=4, images=False, progress=False))
    assert cache.has_product_latents and not cache.has_images and "image" not in cache[0]
    stage = InpaintStage(model, DiffusionOptions(caption_dropout=0.5), masks="product", product_prob=1.0)
    calls = []
    stage.model.vae.encoder.register_forward_hook(lambda *a: calls.append(1))
    a, b = next(DataStream(data, 6, seed=3)), next(DataStream(cache, 6, seed=3))
    lb = fixed_loss(stage, stage.model.unet, b, seed=11)
    assert calls == []  # no VAE encoder call for the cached batch
    la = fixed_loss(stage, stage.model.unet, a, seed=11)
    assert la == pytest.approx(lb, rel=1e-5, abs=1e-6)
    mixed = InpaintStage(model, masks="product", product_prob=0.5)
    with pytest.raises(ValueError, match="random masks, and this latent cache was built with --no-images"):
        fixed_loss(mixed, mixed.model.unet, b, seed=11)


def test_cache_refuses_other_encoders_and_sizes(tmp_path):
    model = tiny()
    killed = tmp_path / ".c.tmp-999999999"  # a build killed by SIGTERM / SIGKILL: no cleanup ran (no such pid)
    killed.mkdir()
    running = tmp_path / f".c.tmp-{os.getppid()}"  # another build's, still running: kept
    running.mkdir()
    cache = LatentCache(build_cache(model, make_dataset("synthetic:2", 64), tmp_path / "c", num_workers=1,
                                    init="models/tiny", progress=False))
    assert not killed.exists() and running.exists()
    with pytest.raises(ValueError, match="different vae encoder .*; train with --init models/tiny, the model it"):
        cache.check(tiny(seed=1), 64)
    new_decoder = tiny()
    with torch.no_grad():
        new_decoder.vae.decoder.conv_out.weight.add_(0.1)
    cache.check(new_decoder, 64)  # the moments come from the encoder: a decoder fine-tune keeps the cache
    # a cache from before that rule holds the whole VAE's fingerprint and is checked against the whole VAE
    manifest = json.loads((tmp_path / "c/cache.json").read_text())
    manifest["fingerprint"] = {"vae": fingerprint(model.vae), "text_encoder": fingerprint(model.text_encoder)}
    (tmp_path / "c/cache.json").write_text(json.dumps(manifest))
    LatentCache(tmp_path / "c").check(model, 64)
    with pytest.raises(ValueError, match="different vae "):
        LatentCache(tmp_path / "c").check(new_decoder, 64)
    with pytest.raises(ValueError, match="cached at 64 px"):
        cache.check(model, 128)
    with pytest.raises(ValueError, match="not empty"):
        build_cache(model, make_dataset("synthetic:2", 64), tmp_path / "c", progress=False)
