"""VAE tiling and slicing (nn/vae.py use_tiling / use_slicing; Pipeline.enable_vae_tiling / enable_vae_slicing)
against diffusers' AutoencoderKL.enable_tiling / enable_slicing with the same weights. The tiny VAE's sample_size
is 64, so its tiles are 64 px / 8 latents, starting every 48 px / 6 latents: sizes up to 64 are one tile,
104 x 136 px is 3 x 3 tiles, the last ones ragged."""
import numpy as np
import pytest
import torch

from backdrop.diffusion.pipeline import Pipeline
from backdrop.nn.checkpoint import init_model, load_model, save_model

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def folder(tmp_path_factory, one_thread):
    return save_model(init_model("tiny", seed=2), tmp_path_factory.mktemp("tiling") / "model")


@pytest.fixture(scope="module")
def vaes(folder):
    from diffusers import AutoencoderKL
    ours, theirs = load_model(folder).vae.eval(), AutoencoderKL.from_pretrained(folder / "vae").eval()
    return ours, theirs


def off_centre(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.6 + 0.1


@pytest.mark.parametrize("slicing", [False, True])
def test_tiled_encode_and_decode_equal_diffusers(vaes, slicing):
    ours, theirs = vaes
    images, latents = off_centre(2, 3, 104, 136), off_centre(2, 4, 13, 17, seed=1)  # ragged last tiles both ways
    with torch.no_grad():
        plain = ours.encode(images), ours.decode(latents)
        ours.use_tiling = theirs.use_tiling = True
        ours.use_slicing = theirs.use_slicing = slicing
        try:
            got = ours.encode(images), ours.decode(latents)
            want = theirs.encode(images).latent_dist.mean, theirs.decode(latents).sample
        finally:
            ours.use_tiling = theirs.use_tiling = ours.use_slicing = theirs.use_slicing = False
    for g, w, p in zip(got, want, plain):
        assert g.shape == w.shape == p.shape
        assert (g - w).abs().max() <= 1e-4
        assert (g - p).abs().max() > 1e-3  # tiles were made and blended: the test has teeth


def test_slicing_alone_changes_nothing_and_one_tile_is_not_tiled(vaes):
    ours, _ = vaes
    images, latents = off_centre(3, 3, 64, 48), off_centre(3, 4, 8, 6, seed=1)  # one tile each
    with torch.no_grad():
        plain = ours.encode(images), ours.decode(latents)
        ours.use_tiling = ours.use_slicing = True
        try:
            got = ours.encode(images), ours.decode(latents)
        finally:
            ours.use_tiling = ours.use_slicing = False
    assert all((g - p).abs().max() <= 1e-5 for g, p in zip(got, plain))


def test_a_last_window_under_8_px_is_left_out_of_a_tiled_encode(vaes):
    """100 px: windows at 0, 48 and 96; the last, 4 px, adds no latent row (100 // 8 = 12 = 2 x 6 kept); diffusers
    encodes it anyway and fails ("Kernel size can't be greater than actual input size")."""
    ours, theirs = vaes
    images = off_centre(1, 3, 100, 136)
    with torch.no_grad():
        plain = ours.encode(images)
        ours.use_tiling = theirs.use_tiling = True
        try:
            got = ours.encode(images)
            with pytest.raises(RuntimeError, match="Kernel size can't be greater than actual input size"):
                theirs.encode(images)
        finally:
            ours.use_tiling = theirs.use_tiling = False
    assert got.shape == plain.shape == (1, 4, 12, 17) and torch.isfinite(got).all()


def test_pipeline_switches_give_diffusers_images(folder):
    import diffusers
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, feature_extractor=None,
                                                               requires_safety_checker=False)
    theirs.scheduler = diffusers.DDIMScheduler.from_config(theirs.scheduler.config)
    theirs.set_progress_bar_config(disable=True)
    theirs.vae.enable_tiling()
    pipe = Pipeline.from_pretrained(folder, device="cpu", dtype=torch.float32)
    vae = pipe.backend.model.vae
    vae.enable_tiling()  # diffusers' AutoencoderKL switches, on ours
    vae.enable_slicing()
    assert vae.use_tiling and vae.use_slicing
    vae.disable_tiling()
    vae.disable_slicing()
    noise = off_centre(1, 4, 12, 16, seed=3)
    run = dict(steps=3, sampler="ddim", latents=noise, height=96, width=128, output_type="np", progress=False)
    plain = pipe.generate("a lamp on a table", **run).images
    pipe.enable_vae_tiling()
    pipe.enable_vae_slicing()
    tiled = pipe.generate("a lamp on a table", **run).images
    want = theirs("a lamp on a table", num_inference_steps=3, latents=noise.clone(), height=96, width=128,
                  output_type="np").images
    assert np.abs(tiled - want).max() <= 2e-3 and np.abs(tiled - plain).max() > 1e-3
    pipe.disable_vae_tiling()
    pipe.disable_vae_slicing()
    assert np.array_equal(pipe.generate("a lamp on a table", **run).images, plain)


def test_a_mask_conditioned_decode_gives_each_tile_its_own_part_of_the_condition():
    """AsymmetricAutoencoderKL's decoder also reads the image and mask: each tile must get the pixels under it. The
    second tile of the first row starts at latent column 6 = pixel 48; its columns past the blend (16 px) land
    unblended in the output."""
    from test_vae import ASYM

    from backdrop.nn.vae import VAE
    torch.manual_seed(0)
    vae = VAE(ASYM[0]).eval()
    z, image = off_centre(2, 4, 13, 17, seed=4), off_centre(2, 3, 104, 136, seed=5).clamp(-1, 1)
    mask = (off_centre(2, 1, 104, 136, seed=6) > 0.1).float()
    with torch.no_grad():
        vae.use_tiling = vae.use_slicing = True
        try:
            got = vae.decode(z, image, mask)
            repaint_all = vae.decode(z, image, torch.ones_like(mask))
            vae.use_slicing = False
            plain_tiled = vae.decode(z)
        finally:
            vae.use_tiling = vae.use_slicing = False
        second = vae.decode(z[:, :, 0:8, 6:14], image[:, :, 0:64, 48:112], mask[:, :, 0:64, 48:112])
    assert got.shape == (2, 3, 104, 136)
    assert (got[:, :, :48, 64:96] - second[:, :, :48, 16:48]).abs().max() <= 1e-5
    assert (repaint_all - plain_tiled).abs().max() <= 1e-5  # an all-repaint mask is plain decoding, tiled too
