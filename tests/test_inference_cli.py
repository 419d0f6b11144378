"""`backdrop generate | img2img | inpaint`: each writes OUT/<kind>[-<image name>]-<seed>.png and prints the paths;
user errors (a mask of another size too) are one line on stderr with exit status 2 (no traceback); an all-black
mask writes the input with a note; --help works. Output files, input checks and metadata:
test_inference_cli_files.py."""
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from backdrop.cli import build_parser, main
from backdrop.nn.checkpoint import init_model, save_model

pytestmark = [pytest.mark.usefixtures("one_thread"),  # conftest.py
              pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")]


@pytest.fixture(scope="module")
def files(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("cli")
    model = save_model(init_model("tiny", seed=2), root / "model")
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (45, 67, 3), dtype=np.uint8)  # HxW 45x67: not multiples of 8
    Image.fromarray(image).save(root / "product.png")
    product = np.zeros((45, 67), np.uint8)
    product[10:35, 20:45] = 255  # white = the product to keep
    Image.fromarray(product).save(root / "product-mask.png")
    Image.fromarray(product).resize((134, 90)).save(root / "big-mask.png")  # 2x the image size
    Image.fromarray(product).resize((134, 45)).save(root / "wide-mask.png")  # another shape
    Image.new("L", (67, 45), 0).save(root / "black.png")
    (root / "not-an-image.png").write_text("hello")
    return dict(root=root, model=str(model), image=image, product=product)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out.split(), out.err.strip()


def fast(files, out):
    return ["--model", files["model"], "--steps", "2", "--quiet", "--out", out, "--prompt", "on a marble table"]


def test_generate_writes_pngs_named_by_seed(files, capsys, tmp_path):
    code, paths, err = run(capsys, "generate", *fast(files, tmp_path), "--n", "2", "--seed", "7", "--height", "40",
                           "--width", "56")
    assert code == 0 and err == ""
    assert paths == [str(tmp_path / "generate-7.png"), str(tmp_path / "generate-8.png")]
    assert all(Image.open(p).size == (56, 40) for p in paths)


def test_sampling_options_reach_the_pipeline(files, capsys, tmp_path):
    from backdrop.diffusion.pipeline import Pipeline

    options = dict(steps=3, sampler="ddim", eta=0.5, guidance_scale=3.0, guidance_rescale=0.7, seed=4,
                   negative_prompt="blurry")
    argv = [a for k, v in options.items() for a in (f"--{k.replace('_', '-')}", v)]
    code, [path], _ = run(capsys, "generate", "--model", files["model"], "--quiet", "--out", tmp_path, "--prompt",
                          "a lamp", *argv)
    pipe = Pipeline.from_pretrained(files["model"], device="cpu")
    want = pipe.generate("a lamp", progress=False, **options).images[0]
    assert code == 0 and np.array_equal(np.asarray(Image.open(path)), np.asarray(want))
    plain = pipe.generate("a lamp", steps=3, seed=4, progress=False).images[0]
    assert not np.array_equal(np.asarray(plain), np.asarray(want))  # the options changed the image


@pytest.mark.parametrize("kind", ["generate", "img2img"])
def test_clip_skip_reaches_the_pipeline(files, capsys, tmp_path, kind):
    from backdrop.diffusion.pipeline import Pipeline

    image = [files["root"] / "product.png"] if kind == "img2img" else []
    code, [path], _ = run(capsys, kind, *image, *fast(files, tmp_path), "--seed", "4", "--clip-skip", "1")
    pipe = Pipeline.from_pretrained(files["model"], device="cpu")
    call = getattr(pipe, kind)
    args = [Image.fromarray(files["image"])] if kind == "img2img" else []
    want = call(*args, prompt="on a marble table", steps=2, seed=4, clip_skip=1, progress=False).images[0]
    assert code == 0 and np.array_equal(np.asarray(Image.open(path)), np.asarray(want))
    plain = call(*args, prompt="on a marble table", steps=2, seed=4, progress=False).images[0]
    assert not np.array_equal(np.asarray(plain), np.asarray(want))  # --clip-skip changed the image


def test_img2img_keeps_the_input_size(files, capsys, tmp_path):
    code, paths, _ = run(capsys, "img2img", files["root"] / "product.png", *fast(files, tmp_path), "--seed", "3",
                         "--strength", "0.5", "--sampler", "euler-a")
    assert code == 0 and paths == [str(tmp_path / "img2img-product-3.png")]
    assert Image.open(paths[0]).size == (67, 45)


def test_img2img_and_inpaint_keep_their_own_default_strength():
    parser = build_parser()  # both share one option definition; each must keep its own default
    assert parser.parse_args(["img2img", "x.png", "--prompt", "a"]).strength == 0.75
    assert parser.parse_args(["inpaint", "x.png", "--mask", "m.png", "--prompt", "a"]).strength == 1.0


def test_a_16_bit_image_is_scaled_not_clipped(files, tmp_path):
    from backdrop.diffusion.cli_files import read_image

    grey = np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)
    Image.fromarray(grey).save(tmp_path / "grey16.png")  # opens as I;16 / I
    im = read_image(str(tmp_path / "grey16.png"), "image")
    assert np.array_equal(np.asarray(im.convert("L")), (grey >> 8).astype(np.uint8))


def test_an_exif_rotated_photo_is_read_upright(tmp_path):
    from backdrop.diffusion.cli_files import read_image

    stored = np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8)  # HxW 48x64 on disk
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display, as phones store portraits
    Image.fromarray(stored).save(tmp_path / "phone.png", exif=exif)
    assert np.array_equal(np.asarray(read_image(str(tmp_path / "phone.png"), "image")), np.rot90(stored, -1))


def test_inpaint_keeps_the_product_pixels(files, capsys, tmp_path):
    code, paths, _ = run(capsys, "inpaint", files["root"] / "product.png", "--product-mask",
                         files["root"] / "product-mask.png", *fast(files, tmp_path), "--n", "2", "--seed", "5",
                         "--crop-padding", "4", "--color-match")
    assert code == 0 and paths == [str(tmp_path / "inpaint-product-5.png"), str(tmp_path / "inpaint-product-6.png")]
    keep = files["product"] == 255
    for p in paths:
        out = np.asarray(Image.open(p))
        assert out.shape == files["image"].shape
        assert np.array_equal(out[keep], files["image"][keep])
        assert np.abs(out[~keep].astype(int) - files["image"][~keep]).mean() > 5


def test_a_catalogue_of_products_with_a_mask_folder(files, capsys, tmp_path):
    """Several IMAGEs and --product-mask naming a folder of masks by file name (any image extension): every product
    kept exactly, each with the seeds SEED.. (files <kind>-<name>-<seed>.png), images of one size batched together,
    and each image as a run of it alone."""
    products, masks = tmp_path / "products", tmp_path / "masks"
    products.mkdir()
    masks.mkdir()
    rng = np.random.default_rng(1)
    small = np.zeros((40, 56), np.uint8)
    small[8:30, 10:40] = 255
    inputs = {"a": (files["image"], files["product"]), "b": (255 - files["image"], files["product"]),
              "c": (rng.integers(0, 256, (40, 56, 3), dtype=np.uint8), small)}
    for name, (image, mask) in inputs.items():
        Image.fromarray(image).save(products / f"{name}.png")
        Image.fromarray(mask).save(masks / f"{name}{'.bmp' if name == 'c' else '.png'}")
    code, paths, err = run(capsys, "inpaint", *sorted(products.iterdir()), "--product-mask", masks,
                         *fast(files, tmp_path / "out"), "--n", "2", "--seed", "5", "--batch-size", "3")
    assert code == 0 and sorted(p.rsplit("/", 1)[1] for p in paths) == [
        f"inpaint-{n}-{s}.png" for n in "abc" for s in (5, 6)], err
    for name, (image, mask) in inputs.items():
        for s in (5, 6):
            out = np.asarray(Image.open(tmp_path / f"out/inpaint-{name}-{s}.png"))
            assert out.shape == image.shape and np.array_equal(out[mask == 255], image[mask == 255])
    _, [alone], _ = run(capsys, "inpaint", products / "c.png", "--product-mask", masks / "c.bmp",
                        *fast(files, tmp_path / "alone"), "--seed", "5")
    together = np.asarray(Image.open(tmp_path / "out/inpaint-c-5.png"), int)
    assert np.abs(together - np.asarray(Image.open(alone), int)).max() <= 2  # 2/255
    (masks / "b.png").unlink()
    code, _, err = run(capsys, "inpaint", products / "a.png", products / "b.png", "--product-mask", masks,
                       *fast(files, tmp_path / "err"))
    assert code == 2 and f"no mask for {products / 'b.png'}" in err
    (tmp_path / "again").mkdir()
    (tmp_path / "again/a.png").write_bytes((products / "a.png").read_bytes())
    code, _, err = run(capsys, "inpaint", products / "a.png", tmp_path / "again/a.png", "--product-mask", masks,
                       *fast(files, tmp_path / "err"))
    assert code == 2 and "two IMAGEs are named 'a'" in err


def test_a_mask_of_another_shape_is_an_error_naming_both_files(files, capsys, tmp_path):
    """Most likely another photo's mask: stretched to the image, it would move the product's edge."""
    image, mask = files["root"] / "product.png", files["root"] / "wide-mask.png"
    code, paths, err = run(capsys, "inpaint", image, "--product-mask", mask, *fast(files, tmp_path), "--seed", "1")
    assert code == 2 and paths == [] and not list(tmp_path.iterdir())
    assert f"--product-mask {mask} is 134x45 but image {image} is 67x45 (WxH): a mask must have its image's size, " \
           "or its shape at another scale" in err


def test_a_mask_at_another_scale_is_resized_with_a_warning(files, capsys, tmp_path):
    """A segmentation model's mask at 2x the photo: resized to it (bilinear), said once, and the image is the one
    made with that resized mask given, its kept pixels exact."""
    image, mask = files["root"] / "product.png", files["root"] / "big-mask.png"
    code, paths, err = run(capsys, "inpaint", image, "--product-mask", mask, *fast(files, tmp_path / "a"),
                           "--seed", "1")
    assert code == 0 and f"--product-mask {mask} is 134x90, image {image} 67x45: the mask is resized" in err
    fitted = Image.open(mask).resize((67, 45), Image.Resampling.BILINEAR)
    fitted.save(tmp_path / "fitted.png")
    _, want, _ = run(capsys, "inpaint", image, "--product-mask", tmp_path / "fitted.png", *fast(files, tmp_path / "b"),
                     "--seed", "1")
    got = np.asarray(Image.open(paths[0]))
    assert np.array_equal(got, np.asarray(Image.open(want[0])))
    kept = np.asarray(fitted) == 255
    assert kept.sum() > 400 and np.array_equal(got[kept], files["image"][kept])


def test_inpaint_all_black_mask_writes_the_input(files, capsys, tmp_path):
    code, paths, err = run(capsys, "inpaint", files["root"] / "product.png", "--mask", files["root"] / "black.png",
                           *fast(files, tmp_path), "--seed", "1")
    assert code == 0 and "nothing to repaint" in err
    assert np.array_equal(np.asarray(Image.open(paths[0])), files["image"])


@pytest.mark.parametrize("args,message", [
    (["inpaint", "{root}/missing.png", "--mask", "{root}/black.png"], "missing.png: no such file"),
    (["inpaint", "{root}/not-an-image.png", "--mask", "{root}/black.png"], "cannot read it as an image"),
    (["inpaint", "{root}/product.png"], "has no transparent pixel: give --mask"),
    (["img2img", "{root}/product.png", "--strength", "1.5"], "--strength 1.5 must be in (0, 1]"),
    (["generate", "--steps", "0"], "--steps 0 must be at least 1"),
    (["generate", "--n", "0"], "--n 0 must be in [1, 1000]"),
    (["generate", "--n", "100000000000"], "--n 100000000000 must be in [1, 1000]"),
    (["generate", "--guidance-scale", "inf"], "--guidance-scale inf must be finite and >= 0"),
    (["inpaint", "{root}/product.png", "--mask", "{root}/black.png", "--mask-blur", "inf"],
     "--mask-blur inf must be finite and >= 0"),
    (["generate", "--seed", "4294967296"], "--seed 4294967296 must be in [0, 2**32 - N]"),
    (["generate", "--skip-existing"], "--skip-existing needs the --seed of the run to complete"),
    (["generate", "--sampler", "ddim", "--eta", "1.5"], "--eta 1.5 must be in [0, 1]"),
    (["generate", "--prompt", "a \udcff lamp"], "not valid Unicode text"),  # argv bytes that are not UTF-8
    (["generate", "--eta", "0.5"], "--eta is DDIM's noise: it applies to --sampler ddim only, not dpmpp-2m"),
    (["generate", "--steps", "5000"], "--steps 5000 --sampler dpmpp-2m: steps must be an int in [1, "),
    (["generate", "--batch-size", "0"], "--batch-size 0 must be at least 1"),
    # named as typed: an alias (--num-images-per-prompt for --n), diffusers' spelling
    (["generate", "--num-images-per-prompt=0"], "--num-images-per-prompt 0 must be in [1, "),
    (["generate", "--num_inference_steps", "5000"], "--num_inference_steps 5000 --sampler dpmpp-2m: steps must be"),
    (["generate", "--num_inference_steps", "5", "--steps", "0"], "--steps 0 must be at least 1"),  # the last wins
    (["generate", "--num-inf", "0"], "--num-inf 0 must be at least 1"),  # an abbreviation argparse took
    (["generate", "--out", "{root}/product.png"], "product.png is a file: give a folder"),
    (["generate", "--out", "{root}/scene.jpg"], "scene.jpg looks like a file name: --out is a folder"),
    (["generate", "--out", ""], "--out is empty: give a folder"),  # an unset shell variable, not the cwd
    (["inpaint", "{root}/product.png", "--mask", "{root}/black.png", "--mask-threshold", "0"],
     "--mask-threshold 0 must be in (0, 1]"),  # numbers as typed, not as parsed (0.0)
    (["generate", "--guidance-rescale", "2"], "--guidance-rescale 2 must be in [0, 1]"),
    (["img2img", "{root}/product.png", "--strength=-1"], "--strength -1 must be in (0, 1]"),
    (["generate", "--guidance_scale", "-2.50"], "--guidance_scale -2.50 must be finite and >= 0"),
    (["inpaint", "{root}/product.png", "--mask", "{root}/black.png", "--mask-dilate", "-1"],
     "--mask-dilate -1 must be >= 0"),
    (["generate", "--model", "no-such-model"], "not a built-in model (built-in:"),
    (["generate", "--device", "gpu"], "--device 'gpu' is not a device name"),
    (["img2img", "{root}/product.png", "--strength", "0.1", "--steps", "5"], "leaves no step to run"),
    (["generate", "--clip-skip", "-1"], "--clip-skip -1 must be >= 0"),
    (["inpaint", "{root}/product.png", "--mask", "{root}/black.png", "--clip-skip", "3"],
     "--clip-skip 3: give 0 to 2 (this model's text encoder has 2 layers)"),
    (["generate", "--textual-inversion", "{root}/missing.safetensors:<x>"],
     "--textual-inversion: {root}/missing.safetensors: no such file"),
])
def test_bad_inputs_exit_2_with_one_line(files, capsys, tmp_path, args, message):
    argv, message = [a.format(root=files["root"]) for a in args], message.format(root=files["root"])
    argv[1:1] = fast(files, tmp_path / "out")  # a later --out or --steps wins
    if "--model" in args:  # the test's own --model comes last and wins
        argv += ["--model", "no-such-model"]
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err
    assert not list(tmp_path.glob("out/*.png"))


def test_n_runs_in_batches_with_the_same_seeds(files, capsys, tmp_path):
    """--n 3 --batch-size 2 is two Pipeline calls (seeds 7, 8 then 9) whose images are those of one call."""
    code, paths, _ = run(capsys, "generate", *fast(files, tmp_path / "a"), "--n", "3", "--batch-size", "2",
                         "--seed", "7")
    assert code == 0 and [p.rsplit("/", 1)[1] for p in paths] == ["generate-7.png", "generate-8.png",
                                                                   "generate-9.png"]
    _, together, _ = run(capsys, "generate", *fast(files, tmp_path / "b"), "--n", "3", "--batch-size", "3",
                         "--seed", "7")
    for a, b in zip(paths, together):
        assert np.abs(np.asarray(Image.open(a), int) - np.asarray(Image.open(b), int)).max() <= 2  # 2/255


def test_mask_threshold_keeps_a_noisy_product_mask_exact(files, capsys, tmp_path):
    """A product mask saved as JPEG is 252..255 on the product; --mask-threshold 0.5 keeps all of it exact."""
    noisy = files["product"].copy()
    noisy[15:30, 25:40] -= np.random.default_rng(0).integers(0, 4, (15, 15)).astype(np.uint8)
    Image.fromarray(noisy).save(tmp_path / "noisy.png")
    argv = ["inpaint", files["root"] / "product.png", "--product-mask", tmp_path / "noisy.png", "--seed", "5",
            "--mask-dilate", "0"]
    keep = noisy > 0
    _, [soft], _ = run(capsys, *argv, *fast(files, tmp_path / "soft"))
    _, [exact], _ = run(capsys, *argv, *fast(files, tmp_path / "exact"), "--mask-threshold", "0.5")
    assert np.array_equal(np.asarray(Image.open(exact))[keep], files["image"][keep])
    assert not np.array_equal(np.asarray(Image.open(soft))[keep], files["image"][keep])


def test_out_of_memory_is_one_line(files, capsys, tmp_path, monkeypatch):
    from backdrop.diffusion.pipeline import Pipeline

    def allocate(self, **kwargs):  # what torch's CPU allocator raises when a batch does not fit
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(Pipeline, "generate", allocate)
    code, _, err = run(capsys, "generate", *fast(files, tmp_path), "--n", "8")
    assert code == 2 and err == "backdrop generate: error: out of memory making 4 image(s) at once at this size: " \
        "lower --batch-size or use --height/--width"
    code, _, err = run(capsys, "generate", *fast(files, tmp_path), "--n", "1", "--overwrite")
    assert err.endswith("making 1 image(s) at once at this size: use --height/--width")  # --batch-size 1 cannot help


@pytest.mark.parametrize("argv", [["generate", "--prompt", "x", "--sampler", "foo"], ["inpaint", "--prompt", "x"],
                                  ["train", "vae", "--steps", "x"], ["frob"]])
def test_usage_errors_are_one_line(capsys, argv):
    """argparse's own refusals too: one line saying where help is, not the usage block."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and err.endswith("--help)"), err


@pytest.mark.parametrize("argv,command,unknown", [
    (["generate", "--prompt", "x", "--strength", "0.5"], "backdrop generate", "--strength 0.5"),
    (["img2img", "a.png", "--prompt", "x", "--mask-threshold", "0.5"], "backdrop img2img", "--mask-threshold 0.5"),
    (["train", "vae", "--data", "d", "--out", "o", "--frob"], "backdrop train vae", "--frob")])
def test_an_unknown_option_is_blamed_on_its_subcommand(capsys, argv, command, unknown):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err == f"{command}: error: unrecognized arguments: {unknown} (see {command} --help)"


@pytest.mark.parametrize("argv,said", [
    (["generate", "--num_inference_steps", "abc"], "argument --num_inference_steps: invalid int value: 'abc'"),
    (["generate", "--steps", "abc"], "argument --steps: invalid int value: 'abc'"),
    (["generate", "--prompt", "x", "--frob_x", "1"], "unrecognized arguments: --frob_x 1"),
    (["train", "pretrain", "--data", "d", "--out", "o", "--lr_scheduler", "cosine"],
     "--lr_scheduler (diffusers' option) is not taken")])
def test_usage_errors_name_options_as_typed(capsys, argv, said):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and said in capsys.readouterr().err


def test_options_as_diffusers_spells_them_and_values_untouched():
    """--guidance_scale is --guidance-scale (diffusers' scripts' spelling); a value that only looks like an option
    (a prompt with a space, after --) keeps its underscores."""
    from backdrop.cli import build_parser

    args = build_parser().parse_args(["generate", "--prompt", "a_b", "--guidance_scale=3", "--negative-prompt",
                                      "--ugly_hands --bad_anatomy", "--out", "/tmp/o_1", "--num_inference_steps=7",
                                      "--num_images_per_prompt", "2"])
    assert (args.prompt, args.guidance_scale, args.negative_prompt, args.out, args.steps, args.n) == \
        ("a_b", 3.0, "--ugly_hands --bad_anatomy", "/tmp/o_1", 7, 2)
    args = build_parser().parse_args(["inpaint", "p.png", "--prompt", "x", "--mask_image", "m.png"])
    assert args.mask == "m.png"


@pytest.mark.parametrize("command", ["generate", "img2img", "inpaint"])
def test_help(capsys, command):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert f"usage: backdrop {command}" in text and "--prompt" in text and "--model" in text


def test_the_installed_command_reports_errors_without_a_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "backdrop", "generate", "--prompt", "x", "--model",
                        str(tmp_path / "nowhere")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "nowhere" in r.stderr


def test_catalogue_inputs_from_a_folder_a_list_or_stdin(files, capsys, tmp_path, monkeypatch):
    """Past a shell's argument-list limit: IMAGE may be a folder (its images, masks and hidden files aside), @LIST
    (paths one a line) or - (paths on stdin)."""
    import io

    shop = tmp_path / "shop"
    shop.mkdir()
    for name in ("a", "b"):
        Image.fromarray(files["image"]).save(shop / f"{name}.png")
    Image.fromarray(files["product"]).save(shop / "a_mask.png")  # named like a mask: not an input
    (shop / "._a.png").write_bytes(b"AppleDouble")
    argv = ("inpaint", "--product-mask", files["root"] / "product-mask.png", "--seed", "1")
    code, paths, _ = run(capsys, *argv, shop, *fast(files, tmp_path / "o1"))
    assert code == 0 and [p.rsplit("/", 1)[1] for p in paths] == ["inpaint-a-1.png", "inpaint-b-1.png"]
    (tmp_path / "list.txt").write_text(f"{shop / 'b.png'}\n\n{shop / 'a.png'}\n")
    code, paths, _ = run(capsys, *argv, f"@{tmp_path / 'list.txt'}", *fast(files, tmp_path / "o2"))
    assert code == 0 and [p.rsplit("/", 1)[1] for p in paths] == ["inpaint-b-1.png", "inpaint-a-1.png"]
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{shop / 'a.png'}\n"))
    code, paths, _ = run(capsys, *argv, "-", *fast(files, tmp_path / "o3"))
    assert code == 0 and [p.rsplit("/", 1)[1] for p in paths] == ["inpaint-a-1.png"]


def test_one_run_writes_a_folder_at_a_time_and_clears_what_killed_runs_left(files, capsys, tmp_path):
    """Two runs into one --out mixed their images, both exiting 0; a run killed mid-save left a hidden .tmp that no
    rerun removed. A name whose bytes are not UTF-8 is written (it crashed the PNG text after the model loaded)."""
    from backdrop.fsio import FolderLock

    out = tmp_path / "out"
    out.mkdir()
    held = FolderLock(out)  # a run still going
    code, _, err = run(capsys, "generate", *fast(files, out), "--seed", "1")
    assert code == 2 and "is in use by another backdrop run (pid " in err
    held.release()
    (out / ".generate-1.png.x8f2k.tmp").write_bytes(b"half a png")
    code, paths, _ = run(capsys, "generate", *fast(files, out), "--seed", "1")
    assert code == 0 and not list(out.glob(".*.tmp")) and not (out / ".lock").exists()
    odd = os.fsdecode(b"sku\xff.png")
    Image.fromarray(files["image"]).save(tmp_path / odd)
    code, paths, err = run(capsys, "img2img", tmp_path / odd, *fast(files, out), "--seed", "1")
    assert code == 0, err
    assert "\\xff" in Image.open(out / os.fsdecode(b"img2img-sku\xff-1.png")).text["parameters"]


def test_a_killed_or_piped_command_dies_by_its_signal(files, tmp_path):
    """A shell loop over `backdrop` stops at Ctrl-C only if backdrop dies by SIGINT (exit status 130 does not stop
    it); `| head -1` gave a BrokenPipeError traceback; SIGTERM printed nothing and left the .tmp of a save."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "backdrop", "generate", "--model", files["model"], "--steps", "2", "--quiet",
           "--prompt", "x", "--seed", "1", "--batch-size", "1"]
    piped = subprocess.run(f"{' '.join(cmd)} --n 6 --out {tmp_path / 'p'} | head -1", shell=True, env=env,
                           capture_output=True, text=True, timeout=300, executable="/bin/bash")
    assert piped.stdout.count("\n") == 1 and "Traceback" not in piped.stderr, piped.stderr
    proc = subprocess.Popen(cmd + ["--n", "1000", "--out", str(tmp_path / "t")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline()  # the first image is written: it is in its loop
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGTERM and err.strip().endswith("terminated"), err
    assert not list((tmp_path / "t").glob(".*.tmp"))


def test_the_command_lines_default_to_the_pipelines_defaults():
    """`backdrop generate / img2img / inpaint` and `backdrop serve` take steps, guidance and sampler from one table
    (recipes.SAMPLING_DEFAULTS, no torch needed for --help); it must say what the Pipeline's signatures say."""
    import inspect

    from backdrop.diffusion.pipeline import Pipeline
    from backdrop.diffusion.recipes import SAMPLING_DEFAULTS

    for method in (Pipeline.generate, Pipeline.img2img, Pipeline.inpaint):
        params = inspect.signature(method).parameters
        assert {k: params[k].default for k in SAMPLING_DEFAULTS} == SAMPLING_DEFAULTS, method.__name__
    for argv in (["generate", "--prompt", "x"], ["inpaint", "a.png", "--prompt", "x"], ["serve", "m"]):
        args = build_parser().parse_args(argv)
        assert {k: getattr(args, k) for k in SAMPLING_DEFAULTS} == SAMPLING_DEFAULTS, argv[0]
