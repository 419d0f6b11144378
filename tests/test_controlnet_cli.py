"""`backdrop generate | img2img | inpaint --controlnet PATH --control-image IMAGE ...`: the PNG the command writes is
the image the Pipeline makes with the same ControlNets and options (one ControlNet or two, scales, guidance windows,
guess mode, the command's own default scale), its `parameters` record them, and every misuse is one line on stderr
with exit status 2 (no traceback)."""
import inspect
import json
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from backdrop.cli import build_parser, main
from backdrop.nn.config import PRESETS

from pipeline_helpers import cli_files, controlnet_folder, edges

diffusers = pytest.importorskip("diffusers")
pytestmark = [pytest.mark.usefixtures("one_thread"),  # conftest.py
              pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")]

PROMPT = "a bottle on a marble table"


@pytest.fixture(scope="module")
def files(tmp_path_factory, one_thread):
    """The tiny SD1 and SD1-inpainting models, two ControlNets that fit both, one that does not, control images (one
    not of the output's size), a product photo and its mask."""
    root = tmp_path_factory.mktemp("controlnet-cli")
    out = cli_files(root)
    unet = PRESETS["tiny"].unet
    out |= {"a": controlnet_folder(unet, root / "net-a", 5), "b": controlnet_folder(unet, root / "net-b", 6),
            "wrong": controlnet_folder(replace(unet, cross_attention_dim=48), root / "net-wrong", 7)}
    for name, seed, size in (("edges-a", 1, (64, 64)), ("edges-b", 2, (40, 56))):
        edges(seed, *size).save(root / f"{name}.png")
        out[name] = str(root / f"{name}.png")
    (root / "not-an-image.png").write_text("hello")
    return out


@pytest.fixture(scope="module")
def pipes(files):
    """The Pipelines the CLI's images are compared with, as the CLI loads them (--device cpu --dtype fp32)."""
    from backdrop.diffusion.pipeline import Pipeline

    return {name: Pipeline.from_pretrained(files[name], device="cpu", dtype=torch.float32)
            for name in ("tiny", "tiny-inpaint")}


def cli(capsys, kind: str, *argv, model: str | None = None, files=None, out=None):
    """Run `backdrop KIND ...` in-process: (exit status, output paths, stderr)."""
    base = ["--model", model, "--device", "cpu", "--dtype", "fp32", "--steps", "3", "--quiet", "--prompt", PROMPT,
            "--out", str(out)] if model else []
    code = main([kind, *map(str, argv), *base])
    said = capsys.readouterr()
    return code, said.out.split(), said.err.strip()


def png(path) -> tuple[np.ndarray, str]:
    with Image.open(path) as im:
        return np.asarray(im), im.info["parameters"]


def api(pipe, kind: str, nets: list[str], *args, **kwargs) -> list[np.ndarray]:
    """The Pipeline's images with `nets` set (taken off again afterwards)."""
    pipe.controlnet = nets or None
    try:
        out = getattr(pipe, kind)(*args, prompt=PROMPT, steps=3, progress=False, **kwargs).images
    finally:
        pipe.controlnet = None
    return [np.asarray(im) for im in out]


def test_generate_with_one_controlnet_is_the_pipelines_image(files, pipes, capsys, tmp_path):
    """A scale and a guidance end given once; the control image (40x56) is resized to the output's 64x64."""
    code, [path], err = cli(capsys, "generate", "--seed", "5", "--controlnet", files["a"], "--control-image",
                            files["edges-b"], "--controlnet-scale", "0.7", "--control-guidance-end", "0.8",
                            model=files["tiny"], out=tmp_path)
    assert code == 0 and err == ""
    got, text = png(path)
    control = Image.open(files["edges-b"])
    want = api(pipes["tiny"], "generate", [files["a"]], seed=5, control_image=control,
               controlnet_conditioning_scale=0.7, control_guidance_end=0.8)[0]
    assert np.array_equal(got, want)
    plain = api(pipes["tiny"], "generate", [], seed=5)[0]
    full = api(pipes["tiny"], "generate", [files["a"]], seed=5, control_image=control)[0]
    assert not np.array_equal(got, plain) and not np.array_equal(got, full)  # the ControlNet and its options count
    assert re.search(rf', ControlNet: "{re.escape(files["a"])}:0.7", Control image: {re.escape(files["edges-b"])}, '
                     r"Control guidance: 0-0\.8, Backdrop: [^,]*$", text), text  # no Guess mode: not given


def test_generate_with_two_controlnets_and_guess_mode_is_the_pipelines_batch(files, pipes, capsys, tmp_path):
    """Two ControlNets in order, one scale each, a guidance start each, guess mode; two images in one batch."""
    code, paths, _ = cli(capsys, "generate", "--seed", "5", "--n", "2", "--controlnet", files["a"], "--controlnet",
                         files["b"], "--control-image", files["edges-a"], "--control-image", files["edges-b"],
                         "--controlnet-scale", "0.6", "--controlnet-scale", "1.1", "--control-guidance-start", "0",
                         "--control-guidance-start", "0.4", "--guess-mode", "--guidance-scale", "4",
                         model=files["tiny"], out=tmp_path)
    assert code == 0 and len(paths) == 2
    controls = [Image.open(files["edges-a"]), Image.open(files["edges-b"])]
    args = dict(seed=[5, 6], guidance_scale=4.0, controlnet_conditioning_scale=[0.6, 1.1],
                control_guidance_start=[0.0, 0.4])
    want = api(pipes["tiny"], "generate", [files["a"], files["b"]], control_image=controls, guess_mode=True, **args)
    for path, image in zip(paths, want):
        assert np.array_equal(png(path)[0], image)
    swapped = api(pipes["tiny"], "generate", [files["a"], files["b"]], control_image=controls, guess_mode=True,
                  **dict(args, controlnet_conditioning_scale=[1.1, 0.6]))
    no_guess = api(pipes["tiny"], "generate", [files["a"], files["b"]], control_image=controls, **args)
    assert not np.array_equal(want[0], swapped[0]) and not np.array_equal(want[0], no_guess[0])  # they count
    text = png(paths[1])[1]
    assert f'ControlNet: "{files["a"]}:0.6, {files["b"]}:1.1", Control image: "{files["edges-a"]}, ' \
           f'{files["edges-b"]}", Control guidance: "0-1, 0.4-1", Guess mode: True, ' in text, text


def test_inpaint_with_one_controlnet_keeps_inpaints_default_scale(files, pipes, capsys, tmp_path):
    """No --controlnet-scale: the Pipeline's default for inpaint (diffusers': 0.5) runs, and is recorded."""
    code, [path], _ = cli(capsys, "inpaint", files["product"], "--product-mask", files["mask"], "--seed", "3",
                          "--controlnet", files["a"], "--control-image", files["edges-a"],
                          model=files["tiny-inpaint"], out=tmp_path)
    assert code == 0
    got, text = png(path)
    product, mask, control = (Image.open(files[k]) for k in ("product", "mask", "edges-a"))
    want = api(pipes["tiny-inpaint"], "inpaint", [files["a"]], product, product_mask=mask, seed=3,
               control_image=control)[0]
    assert np.array_equal(got, want)
    full = api(pipes["tiny-inpaint"], "inpaint", [files["a"]], product, product_mask=mask, seed=3,
               control_image=control, controlnet_conditioning_scale=1.0)[0]
    assert not np.array_equal(got, full)
    assert f'ControlNet: "{files["a"]}:0.5", Control image: {files["edges-a"]}, Product mask: ' in text, text


def test_inpaint_with_two_controlnets_and_crop_padding_is_the_pipelines_image(files, pipes, capsys, tmp_path):
    """One scale for both, one guidance end for both; the control images are cropped as the image is."""
    code, [path], _ = cli(capsys, "inpaint", files["product"], "--product-mask", files["mask"], "--seed", "3",
                          "--crop-padding", "8", "--controlnet", files["a"], "--controlnet", files["b"],
                          "--control-image", files["edges-a"], "--control-image", files["edges-b"],
                          "--controlnet-scale", "0.9", "--control-guidance-end", "0.7",
                          model=files["tiny-inpaint"], out=tmp_path)
    assert code == 0
    got, text = png(path)
    product, mask = Image.open(files["product"]), Image.open(files["mask"])
    controls = [Image.open(files["edges-a"]), Image.open(files["edges-b"])]
    run = dict(product_mask=mask, seed=3, crop_padding=8, control_image=controls)
    want = api(pipes["tiny-inpaint"], "inpaint", [files["a"], files["b"]], product,
               controlnet_conditioning_scale=0.9, control_guidance_end=0.7, **run)[0]
    assert np.array_equal(got, want)
    one = api(pipes["tiny-inpaint"], "inpaint", [files["a"]], product,
              **dict(run, control_image=controls[0]), controlnet_conditioning_scale=0.9, control_guidance_end=0.7)[0]
    assert not np.array_equal(got, one)  # the second ControlNet counts
    assert f'ControlNet: "{files["a"]}:0.9, {files["b"]}:0.9", Control image: "{files["edges-a"]}, ' \
           f'{files["edges-b"]}", Control guidance: "0-0.7, 0-0.7", Product mask: ' in text, text


def test_the_help_states_the_pipelines_default_scales(capsys):
    from backdrop.diffusion.pipeline import Pipeline

    for kind in ("generate", "img2img", "inpaint"):
        default = inspect.signature(getattr(Pipeline, kind)).parameters["controlnet_conditioning_scale"].default
        with pytest.raises(SystemExit):
            main([kind, "--help"])
        help_text = " ".join(capsys.readouterr().out.split())
        assert f"{default:g} for {kind}" in help_text, kind
        assert "--control-image IMAGE" in help_text and "resized to the output's size" in help_text
    args = build_parser().parse_args(["generate", "--prompt", "a", "--controlnet", "x", "--control-image", "y.png"])
    assert args.controlnet_scale is None and args.control_guidance_start is None  # not given: not passed


def test_misuse_is_one_line_with_status_2(files, capsys, tmp_path):
    a, b, image = files["a"], files["b"], files["edges-a"]
    broken = files["root"] / "net-broken"
    broken.mkdir(exist_ok=True)
    (broken / "config.json").write_text(json.dumps({"_class_name": "ControlNetXSAdapter"}))
    cases = [
        (["--controlnet", a], "--controlnet needs --control-image: a ControlNet follows a control image"),
        (["--control-image", image], "--control-image needs --controlnet"),
        (["--controlnet", a, "--controlnet", b, "--control-image", image],
         "2 --controlnet and 1 --control-image: give one control image for each ControlNet, in the same order"),
        (["--controlnet", a, "--control-image", image, "--control-image", image],
         "1 --controlnet and 2 --control-image"),
        (["--controlnet", a, "--controlnet", b, "--control-image", image, "--control-image", image,
          *["--controlnet-scale", "1"] * 3],
         "--controlnet-scale is given 3 times for 2 --controlnet: give it once for all of them, or once for each"),
        (["--controlnet", a, "--control-image", image, *["--control-guidance-end", "1"] * 2],
         "--control-guidance-end is given 2 times for 1 --controlnet"),
        (["--controlnet", a, "--control-image", image, "--controlnet-scale", "nan"], "--controlnet-scale nan must be "
                                                                                     "finite"),
        (["--controlnet", a, "--control-image", image, "--control-guidance-end", "1.5"],
         "--control-guidance-end 1.5 must be in [0, 1]"),
        (["--controlnet", a, "--control-image", image, "--control-guidance-start", "0.5", "--control-guidance-end",
          "0.5"], "--control-guidance-start 0.5 must be below --control-guidance-end 0.5"),
        (["--guess-mode"], "--guess-mode is an option of --controlnet, which is not given"),
        (["--controlnet-scale", "0.5"], "--controlnet-scale is an option of --controlnet"),
        (["--controlnet", a, "--control-image", files["root"] / "gone.png"],
         f"--control-image {files['root'] / 'gone.png'}: no such file"),
        (["--controlnet", a, "--control-image", files["root"] / "not-an-image.png"],
         f"--control-image {files['root'] / 'not-an-image.png'}: cannot read it as an image"),
        (["--controlnet", files["root"] / "gone", "--control-image", image],
         f"--controlnet {files['root'] / 'gone'}: no such file or folder (a diffusers ControlNetModel folder"),
        (["--controlnet", a, "--controlnet", files["wrong"], "--control-image", image, "--control-image", image],
         f"--controlnet {files['wrong']}: controlnet[1] does not fit this model: its cross_attention_dim is 48, "
         "the UNet's 64"),
        (["--controlnet", broken, "--control-image", image],
         f"--controlnet {broken}: {broken / 'config.json'}: _class_name 'ControlNetXSAdapter': not a ControlNetModel"),
    ]
    for argv, said in cases:
        code, paths, err = cli(capsys, "generate", *argv, model=files["tiny"], out=tmp_path / "out")
        assert (code, paths) == (2, []), (argv, err)
        assert err.startswith("backdrop generate: error: ") and said in err and "\n" not in err, (argv, err)
    assert not list((tmp_path / "out").glob("*.png"))
