"""FreeU (nn/unet.py): the Fourier filter equals diffusers', a FreeU'd UNet equals diffusers' UNet after its
enable_freeu on the same weights, and Pipeline.enable_freeu gives diffusers' StableDiffusionPipeline's images."""
import numpy as np
import pytest
import torch

from backdrop import __version__
from backdrop.nn.testing import rel_err
from backdrop.nn.unet import FreeU, fourier_filter

from pipeline_helpers import PROMPTS, TOL, max_diff
from test_unet import CONFIGS, build_pair

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

SD1_FREEU = dict(s1=0.9, s2=0.2, b1=1.5, b2=1.6)  # the FreeU authors' SD1.x values


@pytest.mark.parametrize("hw", [(1, 1), (2, 3), (5, 4), (8, 8), (13, 10)])  # powers of two or not, tiny sides
def test_fourier_filter_equals_diffusers(hw):
    from diffusers.utils.torch_utils import fourier_filter as theirs

    x = torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(0)) + 0.5  # a mean: a DC term to scale
    for scale in (0.2, 0.9, 1.7):
        got = fourier_filter(x, scale)
        assert got.dtype == x.dtype and torch.allclose(got, theirs(x, threshold=1, scale=scale), atol=1e-6)
    assert torch.allclose(fourier_filter(x, 1.0), x, atol=1e-6)  # scale 1: the identity
    if hw == (8, 8):  # the mean (DC term) is scaled; a zero-mean, high-frequency pattern is not touched
        assert torch.allclose(fourier_filter(x, 0.5).mean((-2, -1)), 0.5 * x.mean((-2, -1)), atol=1e-5)
        checker = (torch.arange(8)[:, None] + torch.arange(8)).remainder(2).float().expand(1, 1, 8, 8) - 0.5
        assert torch.allclose(fourier_filter(checker, 0.1), checker, atol=1e-6)
    half = fourier_filter(x.half(), 0.5)  # low precision in, the FFT in float32, the same dtype out
    assert half.dtype == torch.float16 and torch.equal(half, fourier_filter(x.half().float(), 0.5).half())


@pytest.mark.parametrize("name", ["sd1", "sd2-inpaint"])
def test_freeu_unet_equals_diffusers(name):
    cfg = CONFIGS[name]
    ours, ref = build_pair(cfg, seed=4)
    g = torch.Generator().manual_seed(1)
    ctx = torch.randn(2, 7, cfg.cross_attention_dim, generator=g)
    t = torch.tensor([3.75, 801.0])
    for hw in ((13, 10), (16, 16)):  # FFTs of non-power-of-two and power-of-two sides
        x = torch.randn(2, cfg.in_channels, *hw, generator=g)
        with torch.no_grad():
            plain = ours(x, t, ctx)
            ref.enable_freeu(**SD1_FREEU)
            ours.freeu = FreeU(**SD1_FREEU)
            want, got = ref(x, t, ctx).sample, ours(x, t, ctx)
            ref.disable_freeu()
            ours.freeu = None
            assert torch.equal(ours(x, t, ctx), plain)  # off again: untouched
        assert rel_err(got, want) < 1e-4, hw
        assert rel_err(got, plain) > 1e-2  # FreeU changed the output


def test_freeu_takes_only_positive_finite_scales():
    for bad in (0, -0.5, float("inf"), float("nan"), True, "1.5", None):
        with pytest.raises(ValueError, match=r"FreeU b1 must be a finite number > 0, got "):
            FreeU(s1=0.9, s2=0.2, b1=bad, b2=1.6)


def test_pipeline_enable_freeu_equals_diffusers(models, ref):
    pipe = models["sd1"].pipe
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def ours():
        return pipe.generate(PROMPTS, steps=4, sampler="euler", latents=noise, output_type="np", progress=False,
                             seed=[1, 2]).images

    plain = ours()
    pipe.enable_freeu(**SD1_FREEU)
    try:
        freeu = ours()
    finally:
        pipe.disable_freeu()
    diffusers_pipe = ref("sd1", "txt2img", "euler")
    diffusers_pipe.enable_freeu(**SD1_FREEU)
    try:
        theirs = diffusers_pipe(PROMPTS, num_inference_steps=4, guidance_scale=7.5, latents=noise.clone(),
                                output_type="np", height=64, width=64).images
    finally:
        diffusers_pipe.disable_freeu()
    assert max_diff(freeu, theirs) <= TOL and max_diff(freeu, plain) > 10 * TOL
    assert np.array_equal(ours(), plain)  # disable_freeu restores the plain UNet
    with pytest.raises(ValueError, match=r"FreeU s2 must be a finite number > 0, got 0"):
        pipe.enable_freeu(s1=0.9, s2=0, b1=1.5, b2=1.6)
    assert pipe.backend.model.unet.freeu is None  # a refused call changes nothing


def test_cli_freeu(models, capsys, tmp_path):
    from PIL import Image

    from backdrop.cli import main

    model = models["sd1"]
    base = ["generate", "--model", model.folder, "--prompt", "a cat", "--seed", "5", "--steps", "3", "--quiet",
            "--out", str(tmp_path), "--overwrite"]
    assert main(base + ["--freeu", "sd1"]) == 0
    model.pipe.enable_freeu(**SD1_FREEU)
    try:
        want = model.pipe.generate("a cat", seed=5, steps=3, progress=False).images[0]
    finally:
        model.pipe.disable_freeu()
    with Image.open(capsys.readouterr().out.split()[0]) as im:
        assert np.array_equal(np.asarray(im), np.asarray(want))
        assert im.info["parameters"].endswith(f'FreeU: "0.9,0.2,1.5,1.6", Backdrop: {__version__}')
    assert main(base + ["--freeu", "0.9,0,1.5,1.6"]) == 2
    assert "--freeu 0.9,0,1.5,1.6: FreeU s2 must be a finite number > 0, got 0.0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(base + ["--freeu", "1,2,3"])
    assert info.value.code == 2
    assert "'1,2,3' is not four comma-separated numbers S1,S2,B1,B2, sd1 or sd2" in capsys.readouterr().err


def test_freeu_takes_numpy_scales():
    assert FreeU(np.float32(0.9), np.float64(0.2), np.int64(2), 1.6).b1 == 2


def test_serve_takes_freeu_as_the_generating_commands_do(models):
    from backdrop.cli import apply_model_options, build_parser
    from backdrop.nn.unet import FreeU

    pipe = models["sd1"].pipe
    args = build_parser().parse_args(["serve", models["sd1"].folder, "--freeu", "0.8,0.3,1.2,1.4"])
    try:
        apply_model_options(pipe, args)  # what `backdrop serve` runs before warming up (and capturing CUDA graphs)
        assert pipe.backend.model.unet.freeu == FreeU(0.8, 0.3, 1.2, 1.4)
    finally:
        pipe.disable_freeu()
