"""VAE: diffusers' AutoencoderKL holding the same random weights encodes and decodes the same way.

A tiny config with 4 levels (8x downsampling, 2 resnets a level, the single-head mid attention) and the full SD
VAE at a small image; the posterior's mean/logvar/sample/kl against diffusers' DiagonalGaussianDistribution;
the sub-pixel upsample path against interpolate + conv, values and gradients.
"""

import pytest
import torch
import torch.nn.functional as F

from backdrop.nn.config import PRESETS, VAEConfig
from backdrop.nn.testing import randomize_, rel_err
from backdrop.nn.layers import Upsample2D, upsample_conv_subpixel
from backdrop.nn.vae import VAE, DiagonalGaussian

diffusers = pytest.importorskip("diffusers")
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution  # noqa: E402

TINY = VAEConfig(block_out_channels=(32, 32, 64, 64), layers_per_block=2, norm_num_groups=8, sample_size=64)


def build_pair(cfg: VAEConfig, seed: int = 0):
    ref = diffusers.AutoencoderKL.from_config(cfg.to_diffusers()).eval()
    randomize_(ref, seed)
    ours = VAE(cfg).eval()
    diff = set(ref.state_dict()) ^ set(ours.state_dict())
    assert not diff, f"key sets differ: {sorted(diff)[:10]}"
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def images(b: int, h: int, w: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g) * 2 - 1  # [-1, 1], as the pipeline feeds it


@pytest.mark.parametrize("size", [(48, 40), (44, 37)])  # the second: not a multiple of 8 (encoder pads)
def test_encode_matches_diffusers(size):
    ours, ref = build_pair(TINY)
    x = images(2, *size)
    with torch.no_grad():
        want = ref.encode(x).latent_dist
        got = ours.encode_posterior(x)
        mean = ours.encode(x)
    assert got.mean.shape == want.mean.shape == (2, 4, size[0] // 8, size[1] // 8)  # odd sides round down
    assert rel_err(got.mean, want.mean) < 1e-4
    assert rel_err(got.logvar, want.logvar) < 1e-4
    assert torch.equal(mean, got.mean)


@pytest.mark.parametrize("subpixel", [False, True])
def test_decode_matches_diffusers(subpixel):
    ours, ref = build_pair(TINY, seed=2)
    if subpixel:  # run every upsampler through upsample_conv_subpixel, whatever its map size
        for m in ours.modules():
            if isinstance(m, Upsample2D):
                m.subpixel_min_pixels = 0
    z = torch.randn(2, 4, 5, 7, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ref.decode(z).sample
        got = ours.decode(z)
    assert got.shape == (2, 3, 40, 56)
    assert rel_err(got, want) < 1e-4


def test_forward_and_posterior_match_diffusers():
    """forward() decodes a posterior sample (same generator -> same noise as diffusers) or the mode; the
    posterior's kl/std/mode and the logvar clamp are LDM's."""
    ours, ref = build_pair(TINY, seed=4)
    x = images(2, 32, 32, seed=5)
    with torch.no_grad():
        for sample in (True, False):
            want = ref(x, sample_posterior=sample, generator=torch.Generator().manual_seed(6)).sample
            got, post = ours(x, sample_posterior=sample, generator=torch.Generator().manual_seed(6))
            assert rel_err(got, want) < 1e-4
        assert torch.equal(post.mode(), post.mean)
        ref_post = ref.encode(x).latent_dist
        assert post.kl().shape == (2,)
        assert rel_err(post.kl(), ref_post.kl()) < 1e-4
        assert rel_err(post.std, ref_post.std) < 1e-4

    # Extreme log-variances are clamped to [-30, 20] exactly as the reference does.
    moments = torch.cat([torch.randn(1, 4, 3, 3), torch.linspace(-80, 80, 36).view(1, 4, 3, 3)], dim=1)
    ours_d, ref_d = DiagonalGaussian(moments), DiagonalGaussianDistribution(moments)
    assert ours_d.logvar.min() == -30 and ours_d.logvar.max() == 20
    torch.testing.assert_close(ours_d.kl(), ref_d.kl())
    g1, g2 = torch.Generator().manual_seed(8), torch.Generator().manual_seed(8)
    torch.testing.assert_close(ours_d.sample(g1), ref_d.sample(g2))


@pytest.mark.parametrize("shape", [(2, 6, 5, 7), (1, 8, 1, 1), (1, 4, 32, 33)])
def test_subpixel_upsample_conv_equals_interpolate_then_conv(shape):
    """The folded-weight path against its definition, forward and backward (it must train identically)."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, shape[1], 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    want = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), w, b, padding=1)
    got = upsample_conv_subpixel(x, w, b)
    torch.testing.assert_close(got, want)
    gout = torch.randn_like(want)
    torch.testing.assert_close(torch.autograd.grad(got, (x, w, b), gout),
                               torch.autograd.grad(want, (x, w, b), gout))


def test_gradient_checkpointing_same_gradients():
    vae = VAE(TINY).train()
    randomize_(vae, seed=10)
    x = images(1, 32, 32, seed=11)

    def grads():
        vae.zero_grad(set_to_none=True)
        recon, post = vae(x, generator=torch.Generator().manual_seed(12))
        (recon.square().mean() + 1e-3 * post.kl().mean()).backward()
        return [p.grad.clone() for p in vae.parameters()]

    plain = grads()
    calls = []
    vae.decoder.mid_block.attentions[0].register_forward_pre_hook(lambda *_: calls.append(1))
    vae.gradient_checkpointing = True
    checkpointed = grads()
    assert len(calls) == 2  # ran again in backward: the checkpointing is real
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def test_bad_inputs_name_the_problem():
    vae = VAE(TINY).eval()
    with pytest.raises(ValueError, match=r"VAE.encode: images must be \(B, 3, H, W\), got shape \(1, 4, 16, 16\)"):
        vae.encode(torch.randn(1, 4, 16, 16))
    with pytest.raises(ValueError, match=r"VAE.decode: latents must be \(B, 4, H, W\), got shape \(4, 2, 2\)"):
        vae.decode(torch.randn(4, 2, 2))


@pytest.mark.slow
def test_full_size_sd_vae():
    """The real SD VAE layout (~84M parameters; 512-channel single-head mid attention) on a 64x64 image,
    with the sub-pixel upsampling forced on so it is checked at full width too."""
    ours, ref = build_pair(PRESETS["sd15"].vae, seed=13)
    for m in ours.modules():
        if isinstance(m, Upsample2D):
            m.subpixel_min_pixels = 0
    x = images(1, 64, 64, seed=14)
    with torch.no_grad():
        want = ref.encode(x).latent_dist
        got = ours.encode_posterior(x)
        assert rel_err(got.mean, want.mean) < 1e-4 and rel_err(got.logvar, want.logvar) < 1e-4
        z = want.mean
        assert rel_err(ours.decode(z), ref.decode(z).sample) < 1e-4


# ------------------------------------------------------------------------ mask-conditioned (asymmetric) VAEs
ASYM = [  # the tiny shape (the condition encoder's first and last widths feed two levels each), and a decoder
    # wider and deeper than its encoder (as the released asymmetric-autoencoder-kl-x-1-5 / x-2 are)
    VAEConfig(block_out_channels=(32, 32, 64, 64), layers_per_block=1, norm_num_groups=8, sample_size=64,
              mask_conditioned=True),
    VAEConfig(block_out_channels=(32, 64, 64, 64), layers_per_block=1, norm_num_groups=8, sample_size=64,
              mask_conditioned=True, decoder_block_out_channels=(48, 96, 96, 96), decoder_layers_per_block=2),
]


def asym_pair(cfg: VAEConfig, seed: int = 0):
    ref = diffusers.AsymmetricAutoencoderKL.from_config(cfg.to_diffusers()).eval()
    randomize_(ref, seed)
    ours = VAE(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


@pytest.mark.parametrize("cfg", ASYM, ids=["tiny", "wide-decoder"])
def test_mask_conditioned_decode_matches_diffusers(cfg):
    """diffusers' AsymmetricAutoencoderKL with the same weights: decode with the inpainting condition (a mask
    with both values, so both sides of every level's blend count) and without; the config round-trips."""
    ours, ref = asym_pair(cfg, seed=7)
    g = torch.Generator().manual_seed(8)
    z = torch.randn(2, 4, 5, 7, generator=g)
    image = images(2, 40, 56, seed=9)
    mask = (torch.rand(2, 1, 40, 56, generator=g) < 0.5).float()
    with torch.no_grad():
        got, want = ours.decode(z, image, mask), ref.decode(z, image=image, mask=mask).sample
        plain, plain_want = ours.decode(z), ref.decode(z).sample
        assert rel_err(got, want) < 1e-4 and rel_err(plain, plain_want) < 1e-4
        assert rel_err(got, plain) > 1e-2  # the condition changes the output
        # an all-repaint mask is plain decoding, whatever the image (what exported graphs feed for txt2img)
        torch.testing.assert_close(ours.decode(z, image, torch.ones_like(mask)), plain, rtol=0, atol=1e-6)
        rec, _ = ours(image, sample_posterior=False, mask=mask)  # forward: the image is its own condition
        torch.testing.assert_close(rec, ref(image, mask=mask).sample, rtol=1e-4, atol=1e-4)
    assert VAEConfig.from_diffusers(dict(ref.config)) == cfg


def test_mask_conditioned_decode_checks_its_condition():
    ours, plain = VAE(ASYM[0]), VAE(TINY)
    z, image, mask = torch.zeros(1, 4, 4, 4), torch.zeros(1, 3, 32, 32), torch.ones(1, 1, 32, 32)
    with pytest.raises(ValueError, match="both image and mask"):
        ours.decode(z, image)
    with pytest.raises(ValueError, match=r"mask must be \(1, 1, 32, 32\)"):
        ours.decode(z, image, torch.ones(1, 1, 16, 16))
    with pytest.raises(ValueError, match="plain AutoencoderKL"):
        plain.decode(z, image, mask)
    with pytest.raises(ValueError, match="mask_conditioned=True"):
        VAEConfig(decoder_block_out_channels=(128, 256, 512, 512))
