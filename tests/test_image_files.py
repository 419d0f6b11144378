"""Mutation-testing gaps in diffusion/image_io.py and diffusion/cli_files.py."""
import numpy as np
from PIL import Image

from backdrop.cli import build_parser
from backdrop.diffusion import masks as M
from backdrop.diffusion.cli_files import read_jobs
from backdrop.diffusion.image_io import from_file, load_image, notes


def saved(im: Image.Image, path, **kw):
    im.save(path, **kw)
    return path


def _jobs(*argv):
    return read_jobs(build_parser().parse_args(["inpaint", *map(str, argv), "--prompt", "x"]))


def test_a_mirrored_exif_photo_is_read_mirrored_back(tmp_path):
    """EXIF orientation 2 (a front camera's selfie, stored mirrored) is undone like the turned ones. (I02)"""
    rgb = np.random.default_rng(0).integers(0, 256, (6, 9, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 2
    im = load_image(saved(Image.fromarray(rgb), tmp_path / "selfie.png", exif=exif))
    assert np.array_equal(np.asarray(im), rgb[:, ::-1])


def test_a_palette_image_with_alpha_keeps_its_alpha():
    """A PA image (palette + alpha, what some GIF/PNG tools hand over) is read as RGBA, so its transparent pixels
    still mark what to repaint. (I09)"""
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    rgba[:2, :, 3] = 0
    pa = Image.fromarray(rgba, "RGBA").convert("PA")
    assert pa.mode == "PA"
    got = from_file(pa)
    assert got.mode == "RGBA" and np.array_equal(np.asarray(got)[..., 3], rgba[..., 3])
    assert M.to_repaint_mask(image=pa)[0, 0, :2].eq(1).all()


def test_premultiplied_and_palette_alpha_is_alpha_to_the_api():
    """PIL's premultiplied modes name their alpha band "a" (RGBa: a cut-out premultiplied before resizing; La):
    from_file dropped RGBa's alpha and failed on La ("conversion from La to L not supported"), and has_alpha, which
    looked at the mode, said no for RGBa, La and PA, so inpaint(image) without a mask was refused for them."""
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = 200, 255
    rgba[:2, :, 3], rgba[2, 0, 3] = 0, 128  # the top half transparent, one pixel half
    want = 1 - rgba[..., 3] / np.float32(255)  # repaint: 1 - alpha
    grey = Image.merge("La", [Image.fromarray(np.full((4, 4), 100, np.uint8)), Image.fromarray(rgba[..., 3])])
    for im in (Image.fromarray(rgba, "RGBA").convert("RGBa"), grey, Image.fromarray(rgba, "RGBA").convert("PA")):
        assert M.has_alpha(im), im.mode
        got = from_file(im)
        assert got.mode in ("RGBA", "LA") and np.array_equal(np.asarray(got)[..., -1], rgba[..., 3]), im.mode
        assert np.abs(M.to_repaint_mask(image=im)[0, 0].numpy() - want).max() <= 1e-6, im.mode
        assert M.convention(None, None, im) is not None  # what Pipeline.inpaint(image) asks first: no refusal
    assert np.asarray(from_file(grey))[2, 0, 0] == 199  # un-premultiplied: 100 * 255 / 128


def test_16_bit_samples_up_to_255_are_said_as_8_bit_values():
    """notes' boundary: a 16-bit image whose brightest sample is 255 holds 8-bit values. (I10)"""
    a = np.zeros((4, 4), np.uint16)
    a[0, 0] = 255
    assert notes(Image.fromarray(a)) == ["16 bits a channel, all under 256: read as 8-bit values"]
    a[0, 0] = 256
    assert notes(Image.fromarray(a)) == ["16 bits a channel: read as its top 8 bits (the output is an 8-bit PNG)"]


def test_a_jpeg_mask_at_another_scale_still_gets_the_jpeg_note(tmp_path, capsys):
    """Resizing a mask to its photo makes a new image: it must stay a JPEG, for the note and for masks.py, which
    reads a JPEG's 0/1 noise as noise rather than as a label map. (F02)"""
    rgb = np.random.default_rng(4).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    keep = np.zeros((32, 48), np.uint8)
    keep[8:24, 12:36] = 255
    image = saved(Image.fromarray(rgb), tmp_path / "sku.png")
    mask = saved(Image.fromarray(keep), tmp_path / "sku_mask.jpg", quality=95)
    [job] = _jobs(image, "--product-mask", mask)
    err = capsys.readouterr().err
    assert "the mask is resized" in err and "sku_mask.jpg is a JPEG" in err


def test_a_piped_mask_at_another_scale_is_kept_resized(tmp_path):
    """A mask given through a pipe (`--product-mask <(...)`) is read once and kept as checked: at another scale it
    must be kept resized to its photo, or the batch gets a mask of the wrong size. (F04)"""
    import os
    import threading

    rgb = np.random.default_rng(5).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    keep = np.zeros((32, 48), np.uint8)
    keep[8:24, 12:36] = 255
    image = saved(Image.fromarray(rgb), tmp_path / "a.png")
    big = saved(Image.fromarray(keep), tmp_path / "big.png")
    fifo = tmp_path / "mask-fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_bytes(big.read_bytes()))
    writer.start()
    args = build_parser().parse_args(["inpaint", str(image), "--product-mask", str(fifo), "--prompt", "x"])
    [job] = read_jobs(args)
    writer.join()
    assert job.load(args)["product_mask"].size == (24, 16)
