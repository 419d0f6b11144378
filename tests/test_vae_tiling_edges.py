"""Edges of VAE tiling and slicing (nn/vae.py) that test_vae_tiling.py leaves open, found by mutation testing
(round 4): an image larger than one tile along one side only, the switches' arguments and their undoing, and
slicing's one-image-at-a-time calls (same numbers, less memory: only the calls show it)."""
import pytest
import torch

from backdrop.nn.checkpoint import init_model, load_model, save_model

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def vaes(tmp_path_factory, one_thread):
    from diffusers import AutoencoderKL
    folder = save_model(init_model("tiny", seed=2), tmp_path_factory.mktemp("tiling-edges") / "model")
    return load_model(folder).vae.eval(), AutoencoderKL.from_pretrained(folder / "vae").eval()


def off_centre(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.6 + 0.1


@pytest.mark.parametrize("tall", [False, True])
def test_one_side_over_a_tile_is_tiled_as_in_diffusers(vaes, tall):
    # mutants V15, V24: tiling only when both sides exceed sample_size (diffusers tiles when either does)
    ours, theirs = vaes
    images, latents = off_centre(1, 3, 48, 136, seed=2), off_centre(1, 4, 6, 17, seed=3)  # 64 px / 8 latents a tile
    if tall:
        images, latents = images.transpose(2, 3), latents.transpose(2, 3)
    with torch.no_grad():
        plain = ours.encode(images), ours.decode(latents)
        ours.use_tiling = theirs.use_tiling = True
        try:
            got = ours.encode(images), ours.decode(latents)
            want = theirs.encode(images).latent_dist.mean, theirs.decode(latents).sample
        finally:
            ours.use_tiling = theirs.use_tiling = False
    for g, w, p in zip(got, want, plain):
        assert g.shape == w.shape == p.shape
        assert (g - w).abs().max() <= 1e-4 and (g - p).abs().max() > 1e-3


def test_the_switches_take_their_argument_and_undo(vaes):
    # mutants V21, V22: enable_tiling(False) switched tiling on; disable_slicing() left slicing on
    vae, _ = vaes
    try:
        vae.enable_tiling(False)  # diffusers' older AutoencoderKL.enable_tiling(use_tiling=True) signature
        assert vae.use_tiling is False
        vae.enable_tiling()
        vae.enable_slicing()
        assert vae.use_tiling and vae.use_slicing
        vae.disable_slicing()
        assert vae.use_slicing is False and vae.use_tiling
    finally:
        vae.use_tiling = vae.use_slicing = False


def test_slicing_runs_the_encoder_and_decoder_one_image_at_a_time(vaes):
    # mutant V29: a batch of 2 decoded whole under use_slicing (slicing from 3 images only)
    vae, _ = vaes
    batches = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: batches.append(args[0].shape[0]))
             for m in (vae.encoder, vae.decoder)]
    try:
        with torch.no_grad():
            vae.use_slicing = True
            vae.decode(off_centre(2, 4, 8, 8))
            vae.encode(off_centre(2, 3, 64, 64))
    finally:
        vae.use_slicing = False
        for h in hooks:
            h.remove()
    assert batches == [1, 1, 1, 1]
