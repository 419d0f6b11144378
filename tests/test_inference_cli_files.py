"""The files of `backdrop generate | img2img | inpaint` (diffusion/cli_files.py): outputs named by image stem and
seed, never replaced silently (--overwrite, --skip-existing), written atomically with A1111's `parameters` text and
the input's ICC profile; every bad input named in one error; mask folders; the progress bar on a terminal only."""
import io
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms

from backdrop import __version__
from backdrop.cli import main
from backdrop.nn.checkpoint import init_model, save_model
from test_inference_cli import fast, run

pytestmark = [pytest.mark.usefixtures("one_thread"),  # conftest.py
              pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")]


@pytest.fixture(scope="module")
def files(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("cli_files")
    model = save_model(init_model("tiny", seed=2), root / "model")
    image = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)  # HxW 40x48
    product = np.zeros((40, 48), np.uint8)
    product[8:32, 12:36] = 255  # white = the product to keep
    for name in ("sku1", "sku2"):
        Image.fromarray(image).save(root / f"{name}.png")
    Image.fromarray(product).save(root / "mask.png")
    return dict(root=root, model=str(model), image=image, product=product)


@pytest.fixture
def no_model(monkeypatch):
    """Loading the model fails the test: what is checked must be checked before it."""
    from backdrop.diffusion.pipeline import Pipeline

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(Pipeline, "from_pretrained", load)


def test_a_single_image_is_named_by_its_stem(files, capsys, tmp_path):
    """A shell loop over products, one IMAGE a run, keeps every product's file."""
    for name in ("sku1", "sku2"):
        code, paths, _ = run(capsys, "img2img", files["root"] / f"{name}.png", *fast(files, tmp_path), "--seed", "7")
        assert code == 0 and paths == [str(tmp_path / f"img2img-{name}-7.png")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img2img-sku1-7.png", "img2img-sku2-7.png"]  # no .tmp
    umask = os.umask(0)
    os.umask(umask)  # written through a private temporary file (mkstemp, 0600), then given the usual permissions
    assert all(p.stat().st_mode & 0o777 == 0o666 & ~umask for p in tmp_path.iterdir())


def test_existing_outputs_are_refused_before_the_model_loads(files, capsys, tmp_path, no_model):
    for seed in range(3, 10):  # 7 of the 8 files
        (tmp_path / f"generate-{seed}.png").write_bytes(b"earlier")
    code, paths, err = run(capsys, "generate", *fast(files, tmp_path), "--seed", "3", "--n", "8")
    assert code == 2 and paths == []
    assert err == f"backdrop generate: error: --out {tmp_path}: generate-3.png, generate-4.png, generate-5.png, " \
        "generate-6.png, generate-7.png and 2 more already exist: give --overwrite to replace existing files or " \
        "--skip-existing to make only the missing ones"
    assert all(p.read_bytes() == b"earlier" for p in tmp_path.iterdir())


def test_skip_existing_makes_only_the_missing_images_and_overwrite_replaces(files, capsys, tmp_path, monkeypatch):
    argv = ["inpaint", files["root"] / "sku1.png", files["root"] / "sku2.png", "--product-mask",
            files["root"] / "mask.png", *fast(files, tmp_path), "--seed", "5", "--n", "2"]
    loud = [a for a in argv if a != "--quiet"]  # notes show without --quiet
    code, paths, _ = run(capsys, *argv[:-1], "1")  # an earlier run of the same command made the first of each
    done = tmp_path / "inpaint-sku1-5.png"
    made = done.read_bytes()
    code, paths, err = run(capsys, *loud, "--skip-existing")
    assert code == 0 and [Path(p).name for p in paths] == ["inpaint-sku1-6.png", "inpaint-sku2-6.png"]
    assert err == f"note: --skip-existing: 2 of 4 files exist in {tmp_path}, making the rest"
    assert done.read_bytes() == made

    with monkeypatch.context() as m:  # all there: nothing to do, exit 0, no model loaded
        m.setattr("backdrop.diffusion.cli._pipeline", lambda args: pytest.fail("the model was loaded"))
        code, paths, err = run(capsys, *loud, "--skip-existing")
        assert code == 0 and paths == [] and err == f"note: --skip-existing: 4 of 4 files exist in {tmp_path}; " \
            "nothing to do"
        code, paths, err = run(capsys, *argv, "--skip-existing")  # --quiet
        assert code == 0 and paths == [] and err == ""  # a nightly rerun's cron mail stays empty
        # the rerun the out-of-memory error advises, with a smaller batch, keeps what the first run made
        code, paths, err = run(capsys, *argv, "--skip-existing", "--batch-size", "1")
        assert code == 0 and paths == [] and err == ""
        # a file of another prompt, or not an image at all, under one of the names: not kept as if made here
        code, _, err = run(capsys, *argv, "--skip-existing", "--prompt", "on grass")
        names = "inpaint-sku1-5.png, inpaint-sku1-6.png, inpaint-sku2-5.png, inpaint-sku2-6.png"
        assert code == 2 and f"{names} exist" in err
        assert "were not made by this command (another prompt" in err
        (tmp_path / "inpaint-sku2-6.png").write_bytes(b"made by an earlier run")
        code, _, err = run(capsys, *argv, "--skip-existing")
        assert code == 2 and "--skip-existing: inpaint-sku2-6.png exists in" in err and "but was not made" in err
    done.write_bytes(b"made by an earlier run")

    code, paths, _ = run(capsys, *argv, "--overwrite")
    assert code == 0 and len(paths) == 4 and Image.open(done).size == (48, 40)
    with pytest.raises(SystemExit):
        main(["generate", "--prompt", "x", "--overwrite", "--skip-existing"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_a_save_that_fails_halfway_leaves_the_earlier_file_whole(files, capsys, tmp_path, monkeypatch):
    """A kill or a full disk mid-save must not leave a truncated PNG under the final name (--skip-existing would
    keep it): the PNG is written to a temporary name and renamed, and the temporary file is removed."""
    def half(im, fp, filename, *args):
        fp.write(b"\x89PNG\r\n\x1a\n")
        raise OSError(28, "No space left on device")

    earlier = tmp_path / "generate-3.png"
    earlier.write_bytes(b"earlier")
    monkeypatch.setitem(Image.SAVE, "PNG", half)
    code, paths, err = run(capsys, "generate", *fast(files, tmp_path), "--seed", "3", "--overwrite")
    assert code == 2 and paths == [] and f"cannot write {earlier}: [Errno 28] No space left on device" in err
    assert [p.name for p in tmp_path.iterdir()] == ["generate-3.png"] and earlier.read_bytes() == b"earlier"


def test_a_png_is_on_the_disk_before_its_rename_and_the_rename_after(files, capsys, tmp_path, monkeypatch):
    """A power cut after a rename must not find an empty file (delayed allocation): the temporary file is fsynced
    before os.replace, the folder after it."""
    import backdrop.diffusion.cli_files as cli_files

    events = []
    monkeypatch.setattr(cli_files, "fsync", lambda path: events.append(("fsync", Path(path))))
    replace = os.replace
    monkeypatch.setattr(cli_files.os, "replace", lambda a, b: (events.append(("replace", Path(b))), replace(a, b)))
    code, [printed], _ = run(capsys, "generate", *fast(files, tmp_path), "--seed", "3")
    temporary, path = events[0][1], Path(printed)
    assert code == 0 and events == [("fsync", temporary), ("replace", path), ("fsync", tmp_path)]
    assert temporary.parent == tmp_path and temporary.name.startswith(".generate-3.png.") and path.is_file()


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("terminal,quiet,shown", [(False, False, False), (True, False, True), (True, True, False)])
def test_the_progress_bar_is_shown_on_a_terminal_only(files, tmp_path, monkeypatch, terminal, quiet, shown):
    """A cron log (stderr a file) gets no tqdm frames: they are \\r-separated and glue onto the paths in `2>&1`."""
    stderr = _Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    argv = [a for a in fast(files, tmp_path) if a != "--quiet"] + ["--quiet"] * quiet
    assert main([str(a) for a in ("generate", *argv, "--seed", "1")]) == 0
    assert ("\r" in stderr.getvalue()) == shown


def test_each_png_records_how_it_was_made_and_keeps_an_rgb_icc_profile(files, capsys, tmp_path):
    from backdrop.diffusion.image_io import rgb_icc

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    tagged, mask = tmp_path / "tagged.png", files["root"] / "mask.png"
    Image.fromarray(files["image"]).save(tagged, icc_profile=srgb)
    code, [path], _ = run(capsys, "inpaint", tagged, "--product-mask", mask, *fast(files, tmp_path / "out"),
                          "--seed", "4", "--negative-prompt", "blurry, text", "--clip-skip", "1",
                          "--guidance-scale", "3")
    out = Image.open(path)
    assert code == 0 and out.info["icc_profile"] == srgb
    assert out.text["parameters"] == (
        "on a marble table\nNegative prompt: blurry, text\n"
        f"Steps: 2, Sampler: dpmpp-2m, CFG scale: 3.0, Seed: 4, Size: 48x40, Model: {files['model']}, "
        "Denoising strength: 1.0, Clip skip: 2, Guidance rescale: 0.0, Eta: 0.0, Batch size: 4, "
        f"Product mask: {mask}, Mask blur: 0.0, Mask dilate: 1, Color match: False, Paste back: True, "
        f"Input: {tagged}, Backdrop: {__version__}")
    cmyk = Image.new("RGB", (1, 1))
    cmyk.info["icc_profile"] = srgb[:16] + b"CMYK" + srgb[20:]  # a CMYK JPEG's: it cannot describe RGB output
    assert rgb_icc(cmyk) is None


def test_parameters_quote_values_as_a1111_does():
    """Values holding a comma or colon are in JSON quotes (A1111's quote()); LoRAs with their scales, textual
    inversions and non-Latin-1 prompts (written as iTXt) are recorded too."""
    from backdrop.cli import build_parser
    from backdrop.diffusion.cli_files import Job, Task, parameters

    args = build_parser().parse_args(["img2img", "a, b.png", "--prompt", "tasse café ☕", "--sampler", "euler-a",
                                      "--lora", "style.safetensors:0.5", "--lora", "x.safetensors",
                                      "--textual-inversion", "emb.pt:<tok>", "--seed", "1"])
    text = parameters(args, Task(Job("a, b", "a, b.png"), 1, Path("o.png")), (64, 48))
    assert text == "tasse café ☕\nSteps: 30, Sampler: euler-a, CFG scale: 7.5, Seed: 1, Size: 64x48, " \
        "Model: backdrop-tiny, Denoising strength: 0.75, Guidance rescale: 0.0, Eta: 0.0, Batch size: 4, " \
        f'LoRA: "style.safetensors:0.5, x.safetensors:1", Textual inversion: "emb.pt:<tok>", Input: "a, b.png", ' \
        f"Backdrop: {__version__}"


def test_every_bad_input_is_named_in_one_error(files, capsys, tmp_path, no_model):
    masks = tmp_path / "masks"
    masks.mkdir()
    for name in ("sku1", "broken"):
        Image.fromarray(files["product"]).save(masks / f"{name}.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n and then nothing")
    root = files["root"]
    code, _, err = run(capsys, "inpaint", root / "sku1.png", tmp_path / "broken.png", tmp_path / "gone.png",
                       root / "sku2.png", "--product-mask", masks, *fast(files, tmp_path / "out"))
    assert code == 2 and len(err.splitlines()) == 1 and "4 problems with the inputs: " in err
    for said in (f"image {tmp_path / 'broken.png'}: cannot read it as an image", f"image {tmp_path / 'gone.png'}: "
                 "no such file", f"no mask for {tmp_path / 'gone.png'}", f"no mask for {root / 'sku2.png'}"):
        assert said in err
    assert not (tmp_path / "out").exists()


def test_a_mask_folder_beside_the_images_and_an_ambiguous_one(files, capsys, tmp_path):
    """Masks kept beside their images as NAME_mask.png, that folder given as the mask folder: the image itself is
    never its own mask. A folder with two candidate masks for one image is an error naming both."""
    beside = tmp_path / "beside"
    beside.mkdir()
    Image.fromarray(files["image"]).save(beside / "sku1.png")
    Image.fromarray(files["product"]).save(beside / "sku1_mask.png")
    code, [path], _ = run(capsys, "inpaint", beside / "sku1.png", "--product-mask", beside,
                          *fast(files, tmp_path / "out"), "--seed", "1")
    keep = files["product"] == 255
    assert code == 0 and np.array_equal(np.asarray(Image.open(path))[keep], files["image"][keep])

    stale = tmp_path / "masks"
    stale.mkdir()
    Image.fromarray(files["product"]).save(stale / "sku1.png")
    Image.fromarray(0 * files["product"]).save(stale / "sku1.jpg")  # an old, all-black one
    code, _, err = run(capsys, "inpaint", files["root"] / "sku1.png", "--product-mask", stale,
                       *fast(files, tmp_path / "out2"), "--seed", "1")
    assert code == 2 and f"--product-mask {stale}: 2 masks for {files['root'] / 'sku1.png'} ({stale / 'sku1.jpg'}, " \
        f"{stale / 'sku1.png'}); keep one" in err

    composed, decomposed = tmp_path / "caf\u00e9", tmp_path / "cafe\u0301-masks"  # a Mac's masks are named in NFD
    composed.mkdir()
    decomposed.mkdir()
    Image.fromarray(files["image"]).save(composed / "caf\u00e9.png")
    Image.fromarray(files["product"]).save(decomposed / "cafe\u0301.png")
    code, [path], err = run(capsys, "inpaint", composed / "caf\u00e9.png", "--product-mask", decomposed,
                            *fast(files, tmp_path / "out3"), "--seed", "1")
    assert code == 0 and np.array_equal(np.asarray(Image.open(path))[keep], files["image"][keep]), err


@pytest.mark.parametrize("how", ["product-mask", "alpha"])
def test_a_mask_that_keeps_no_pixel_is_warned_about(files, capsys, tmp_path, how):
    """An all-black product mask or a fully transparent cut-out repaints the product too: a failed segmentation."""
    if how == "alpha":
        image = tmp_path / "cutout.png"
        Image.fromarray(np.dstack([files["image"], np.zeros((40, 48), np.uint8)])).save(image)
        argv, what = [image], "the alpha channel"
    else:
        image, black = files["root"] / "sku1.png", tmp_path / "black.png"
        Image.new("L", (48, 40), 0).save(black)
        argv, what = [image, "--product-mask", black], f"--product-mask {black}"
    code, paths, err = run(capsys, "inpaint", *argv, *fast(files, tmp_path / "out"), "--seed", "1")
    assert code == 0 and len(paths) == 1
    assert err == f"warning: {what} keeps no pixel of {image}: the whole image is repainted, product and all"


def test_help_says_what_kept_exactly_means(capsys):
    with pytest.raises(SystemExit):
        main(["inpaint", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for said in ("after EXIF rotation", "through its ICC profile", "ICC profile is carried over",
                 "--overwrite", "--skip-existing", "'parameters'", "--batch-size 1"):
        assert said in text
