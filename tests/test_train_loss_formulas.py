"""Training and evaluation figures against their formulas written out here, not only their direction: the
evaluator's product preservation (a pixel is kept when all three channels are), CLIPScore (100 * max(cos, 0)),
the clip stage's symmetric contrastive loss (transformers' CLIPModel loss on the same weights) and the vae stage's
loss (0.16 L1 + 0.84 (1 - SSIM) + 1e-6 KL / 3HW, the module docstring's recipe). A mix-up of weights, a missing
clamp or a one-way loss still makes the loss fall, so the existing "it trains" tests pass with them."""
import numpy as np
import pytest
import torch

from backdrop.nn.checkpoint import init_model
from backdrop.nn.clip import clip_preprocess
from backdrop.train import evaluate as ev
from backdrop.train.data import collate, make_dataset
from backdrop.train.stages.clip import ClipStage, clip_score, vision_config
from backdrop.train.stages.vae import VAEStage, ssim
from test_clip import _vision_dict
from test_stages import randomize_

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def test_product_preserved_counts_a_pixel_only_when_every_channel_is_kept():
    """A generator that changes one channel (red, green or blue by item) of every pixel in the even columns: the
    product pixels kept are exactly those in odd columns. Counting a pixel as kept when any channel matches would
    report 100%."""
    kept = []

    def one_channel_off(images, masks, prompts, seeds):
        out = np.stack([np.asarray(im) for im in images])  # (n, H, W, 3) uint8
        for i, m in enumerate(masks):
            out[i, :, ::2, i % 3] ^= 1  # the lowest bit: every value changes, by one level
            product = np.asarray(m) > 127  # (H, W), white = product
            kept.append((product[:, 1::2].sum(), product.sum()))
        return out

    r = ev.evaluate_inpainting(one_channel_off, n=6, size=32, classifier=ev.AttributeClassifier.fit(n=60, size=32))
    want = sum(k for k, _ in kept) / sum(t for _, t in kept)
    assert 0.3 < want < 0.7
    assert r["product_preserved"] == pytest.approx(want, abs=1e-12)


# ------------------------------------------------------------------------------ the clip stage

@pytest.fixture(scope="module")
def clip_case():
    """A clip stage whose random vision tower (seed 0) gives some pairs a negative cosine, a batch, and
    transformers' CLIPModel holding the same weights."""
    from transformers import CLIPConfig, CLIPModel

    model = init_model("tiny", seed=0)
    vision = vision_config(64, model.config.text.projection_dim, width=64, layers=2, heads=2, patch_size=16)
    stage = ClipStage(model, vision, seed=0)
    batch = collate([make_dataset("synthetic:6", 64)[i] for i in range(6)])
    ref = CLIPModel(CLIPConfig(text_config=model.config.text.to_transformers(), vision_config=_vision_dict(vision),
                               projection_dim=vision.projection_dim)).eval()
    ref.load_state_dict(stage.clip.state_dict(), strict=True)
    with torch.no_grad():
        out = ref(input_ids=model.tokenizer(batch["caption"]), pixel_values=clip_preprocess(batch["image"], 64),
                  return_loss=True)
    return stage, batch, out


def test_clip_score_is_100_times_the_cosine_clamped_at_zero(clip_case):
    """CLIPScore without its rescaling (Hessel et al. 2021; torchmetrics' CLIPScore): 100 * max(cos, 0) of the
    projected image and caption, here from transformers' embeddings."""
    stage, batch, out = clip_case
    cos = (out.image_embeds * out.text_embeds).sum(-1)  # unit vectors: the cosine
    assert (cos < -0.01).any() and (cos > 0.001).any(), cos  # both sides of the clamp are exercised
    got = clip_score(stage.clip.eval(), stage.model.tokenizer, batch["image"], batch["caption"])
    torch.testing.assert_close(got, 100 * cos.clamp(min=0), rtol=1e-4, atol=1e-4)


def test_clip_stage_loss_is_clips_symmetric_contrastive_loss(clip_case):
    """The mean of the caption -> image and image -> caption cross-entropies (CLIP paper, Figure 3):
    transformers' CLIPModel(return_loss=True) on the same weights, one process."""
    stage, batch, out = clip_case
    with torch.no_grad():
        loss, _ = stage.loss(stage.clip, batch, torch.Generator().manual_seed(0))
    torch.testing.assert_close(loss, out.loss, rtol=1e-5, atol=1e-6)
    one_way = torch.nn.functional.cross_entropy(out.logits_per_text, torch.arange(6))
    assert abs(float(out.loss - one_way)) > 1e-4  # this batch tells the two apart


# ------------------------------------------------------------------------------ the vae stage

@pytest.mark.parametrize("kl_weight", [None, 1.0], ids=["default-weights", "kl-weight-1"])
def test_vae_stage_loss_is_the_documented_formula(kl_weight):
    """(1 - 0.84) L1 + 0.84 (1 - SSIM) + beta KL / 3HW, beta = 1e-6 by default (LDM's kl_weight on per-image
    sums; ours divides by the image's 3HW values to match per-pixel reconstruction terms). The posterior, its sample
    and its KL are diffusers' DiagonalGaussianDistribution's; SSIM is the function test_stages.py checks against
    Wang et al. eq. 13. kl_weight 1 makes the KL's normalisation visible in the loss."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    model = init_model("tiny", seed=0)
    randomize_(model.vae)
    stage = VAEStage(model) if kl_weight is None else VAEStage(model, kl_weight=kl_weight)
    x = collate([make_dataset("synthetic:2", 32)[i] for i in range(2)])["image"]  # (2, 3, 32, 32)
    with torch.no_grad():
        loss, metrics = stage.loss(stage.autoencoder, {"image": x}, torch.Generator().manual_seed(4))
        p = model.vae.encode_posterior(x)
        posterior = DiagonalGaussianDistribution(torch.cat([p.mean, p.logvar], 1))
        recon = model.vae.decode(posterior.sample(torch.Generator().manual_seed(4)))  # (2, 3, 32, 32)
        l1, s = (recon - x).abs().mean(), ssim(recon, x).mean()
        kl = posterior.kl().mean() / (3 * 32 * 32)  # per-image sums, per image value
    beta = 1e-6 if kl_weight is None else kl_weight
    want = 0.16 * l1 + 0.84 * (1 - s) + beta * kl
    assert 0.1 < float(l1) and 0.1 < float(1 - s)  # both reconstruction terms count
    torch.testing.assert_close(metrics["kl"], kl, rtol=1e-5, atol=0)
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=0)
