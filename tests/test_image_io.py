"""Image files as a product catalogue holds them (diffusion/image_io.py, and the readers built on it): integer and
float greys keep their levels, CMYK and other modes become RGB, an RGB ICC profile travels to the outputs (CLI files,
Python API images, server PNGs: test_server.py) and other profiles do not, the Python API reads PIL images as the
CLI reads their files (upright by EXIF, any mode), masks with transparent pixels mean what their author meant or are
refused, and corrupt files of every format are one-line CLI errors.
"""
import io
import os
import random
import threading

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms

from backdrop.cli import CLIError, build_parser
from backdrop.diffusion import masks as M
from backdrop.diffusion.cli_files import read_image, read_jobs
from backdrop.diffusion.image_io import from_file, load_image, notes, rgb_icc

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

LEVELS = np.arange(0, 256, 15, dtype=np.uint8).reshape(3, 6)  # 0 ... 255
SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def saved(im: Image.Image, path, **kw):
    im.save(path, **kw)
    return path


@pytest.mark.parametrize("samples", ["uint8 in I", "uint16 in I", "I;16", "F in [0, 1]", "F in [0, 255]"])
def test_integer_and_float_greys_keep_their_levels(samples, tmp_path):
    """PIL's convert clips at 255: 16-bit white would be the only grey left, [0, 1] floats all black."""
    data = {"uint8 in I": LEVELS.astype(np.int32), "uint16 in I": LEVELS.astype(np.int32) * 257,
            "I;16": LEVELS.astype(np.uint16) * 257, "F in [0, 1]": LEVELS.astype(np.float32) / 255,
            "F in [0, 255]": LEVELS.astype(np.float32)}[samples]
    im = load_image(saved(Image.fromarray(data), tmp_path / "grey.tif"))
    assert im.mode == "L" and np.array_equal(np.asarray(im), LEVELS)


def test_a_16_bit_label_map_mask_reads_as_its_8_bit_twin(tmp_path):
    """A 0/1 label map saved from a uint16 array: its top 8 bits are all 0, so it read as all black (the product
    repainted); 16-bit samples all under 256 are 8-bit values, as in mode I, and a 0/1 mask is 0/255."""
    labels = np.zeros((8, 8), np.uint8)
    labels[2:6, 2:6] = 1
    wide = saved(Image.fromarray(labels.astype(np.uint16)), tmp_path / "labels16.png")
    assert Image.open(wide).mode == "I;16" and notes(Image.open(wide)) == ["16 bits a channel, all under 256: read "
                                                                           "as 8-bit values"]
    assert np.array_equal(M.read_mask(load_image(wide)), labels * 255)


def test_cmyk_converts_and_only_an_rgb_profile_is_kept(tmp_path):
    cmyk = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 4), dtype=np.uint8), "CMYK")
    junk = SRGB[:16] + b"CMYK" + SRGB[20:40]  # a CMYK profile ImageCms cannot use: PIL's plain conversion
    path = saved(cmyk, tmp_path / "c.tif", icc_profile=junk)
    im = load_image(path)
    assert im.mode == "RGB" and np.array_equal(np.asarray(im), np.asarray(cmyk.convert("RGB")))
    assert "icc_profile" not in im.info and rgb_icc(Image.open(path)) is None
    assert notes(Image.open(path)) == ["CMYK: converted to RGB through its ICC profile"]
    grey = load_image(saved(Image.fromarray(LEVELS), tmp_path / "g.png", icc_profile=SRGB[:16] + b"GRAY" + SRGB[20:]))
    assert "icc_profile" not in grey.info
    # an RGB profile stays through every path that makes a new image: EXIF turn, 16 bits, RGBA
    exif = Image.Exif()
    exif[0x0112] = 6
    for im in (Image.fromarray(LEVELS.astype(np.uint16) * 257), Image.new("RGBA", (6, 3))):
        out = load_image(saved(im, tmp_path / "p.png", icc_profile=SRGB, exif=exif))
        assert out.info["icc_profile"] == SRGB and out.size == (3, 6)  # turned upright: 6 wide stored, 3 shown


def test_the_api_reads_pil_images_as_the_cli_reads_their_files(tmp_path):
    """A phone photo stored sideways with an EXIF turn: the API used its stored pixels, so an upright mask did not
    fit it (or, square, landed rotated); CMYK and 16-bit PIL images were refused. Outputs carry the RGB profile."""
    from backdrop.diffusion.pipeline import Pipeline

    pipe = Pipeline.from_pretrained("backdrop-tiny", device="cpu", dtype=torch.float32)
    upright = np.random.default_rng(1).integers(0, 256, (48, 32, 3), dtype=np.uint8)  # (H, W): taller than wide
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display, as phones store portraits
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(upright, 1)))  # what the sensor wrote: 48 wide
    path = saved(stored, tmp_path / "phone.png", exif=exif, icc_profile=SRGB)
    product = np.zeros((48, 32), np.uint8)
    product[10:30, 8:24] = 255
    photo = Image.open(path)
    out = pipe.inpaint(photo, product_mask=product, prompt="a shelf", steps=2, seed=0, progress=False).images[0]
    assert out.size == (32, 48) and out.info["icc_profile"] == SRGB
    assert np.array_equal(np.asarray(out)[product > 0], upright[product > 0])
    cli = pipe.inpaint(load_image(path), product_mask=product, prompt="a shelf", steps=2, seed=0, progress=False)
    assert np.array_equal(np.asarray(out), np.asarray(cli.images[0]))
    cmyk = Image.fromarray(upright).convert("CMYK")
    out = pipe.img2img(cmyk, prompt="a shelf", steps=2, seed=0, progress=False).images[0]
    assert out.size == (32, 48) and "icc_profile" not in out.info


def _layer(opaque_luma: np.ndarray, alpha: np.ndarray) -> Image.Image:
    return Image.fromarray(np.dstack([opaque_luma] * 3 + [alpha]).astype(np.uint8), "RGBA")


def test_masks_with_transparent_pixels_mean_what_their_author_meant():
    """Painted on a transparent layer (white strokes): flattened over black, as an editor exports it. A picture with
    transparency (a cut-out) as a product mask: its alpha. The same picture as a repaint mask is OpenAI's edit mask
    (transparent = repaint), the opposite of flattening: refused (tests/test_masks.py)."""
    stroke = np.zeros((8, 8), np.uint8)
    stroke[2:5, 1:7] = 255
    layer = _layer(np.full((8, 8), 255), stroke)  # white where painted, transparent elsewhere
    assert torch.equal(M.to_repaint_mask(mask=layer)[0, 0], torch.from_numpy(stroke / 255).float())
    assert torch.equal(M.to_repaint_mask(product_mask=layer)[0, 0], torch.from_numpy(1 - stroke / 255).float())
    cutout = _layer(np.random.default_rng(2).integers(0, 256, (8, 8)), stroke)  # the product photo, cut out
    assert torch.equal(M.to_repaint_mask(product_mask=cutout)[0, 0], torch.from_numpy(1 - stroke / 255).float())
    la = Image.fromarray(np.dstack([np.full((8, 8), 255, np.uint8), stroke]), "LA")
    assert torch.equal(M.to_repaint_mask(mask=la), M.to_repaint_mask(mask=layer))
    opaque = _layer(stroke, np.full((8, 8), 255))  # an exporter's RGBA, opaque everywhere: its luma, as before
    assert torch.equal(M.to_repaint_mask(mask=opaque), M.to_repaint_mask(mask=stroke))
    assert not M.has_transparency(opaque) and M.has_transparency(layer) and not M.has_transparency(stroke)
    # a dark product's cut-out (a phone, headphones: every shade under 0.1) is no black-and-white layer: it was
    # flattened to all black, and the product repainted
    for shades in ((5, 24), (0, 3)):
        dark = _layer(np.random.default_rng(3).integers(*shades, (8, 8)), stroke)
        assert torch.equal(M.to_repaint_mask(product_mask=dark)[0, 0], torch.from_numpy(1 - stroke / 255).float())
    bw = stroke.copy()
    bw[3, 2:5] = 0  # a layer painted black and white: flattened, its black stays black
    layered = _layer(bw, np.where(stroke > 0, 255, 0))
    assert torch.equal(M.to_repaint_mask(product_mask=layered)[0, 0], torch.from_numpy(1 - bw / 255).float())


def _variants(data: bytes, n: int, rng: random.Random):
    for _ in range(n):
        b = bytearray(data)
        for _ in range(rng.randint(1, 6)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        yield bytes(b[:rng.randrange(len(b))] if rng.random() < 0.3 else b)


def test_corrupt_files_of_every_format_are_one_line_errors(tmp_path):
    """Byte flips and cuts in every format the CLI reads: a decoder's own exception (AVIF's RuntimeError, a
    SyntaxError, ...) was a traceback. Each gives a CLIError or an image."""
    picture = Image.fromarray(np.random.default_rng(3).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    formats = ["PNG", "JPEG", "WEBP", "TIFF", "GIF", "BMP"] + (["AVIF"] if "AVIF" in Image.SAVE else [])
    rng, path = random.Random(0), tmp_path / "fuzz.bin"
    for fmt in formats:
        buf = io.BytesIO()
        picture.save(buf, fmt)
        for data in _variants(buf.getvalue(), 40, rng):
            path.write_bytes(data)
            try:
                read_image(str(path), "image")
            except CLIError as e:
                assert "\n" not in str(e) and str(path) in str(e)


def test_a_decompression_bomb_is_refused_before_decoding(tmp_path):
    """97 KB of PNG can declare 100 Mpx: past Pillow's limit for untrusted files the CLI refuses it (it decoded it
    with only Pillow's warning, then ran out of memory)."""
    big = saved(Image.new("1", (10000, 10000)), tmp_path / "big.png")
    with pytest.raises(CLIError, match=r"big.png: too large to decode safely \(Image size \(100000000 pixels\)"):
        read_image(str(big), "image")


def _jobs(*argv):
    return read_jobs(build_parser().parse_args(["inpaint", *map(str, argv), "--prompt", "x"]))


def test_cli_inputs_say_what_reading_them_changed(tmp_path, capsys):
    rgb = np.random.default_rng(4).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    keep = np.zeros((16, 24), np.uint8)
    keep[4:12, 6:18] = 255
    image = saved(Image.fromarray(rgb), tmp_path / "sku.png")
    # an exporter's RGBA, opaque everywhere, and no mask: nothing marks what to repaint (it wrote the input back)
    opaque = saved(Image.fromarray(np.dstack([rgb, np.full((16, 24), 255, np.uint8)]), "RGBA"), tmp_path / "o.png")
    with pytest.raises(CLIError, match="o.png has no transparent pixel .its alpha channel is opaque everywhere."):
        _jobs(opaque)
    # a mask folder holding a GIF mask; a JPEG mask gets a note about its noise
    (tmp_path / "masks").mkdir()
    saved(Image.fromarray(keep), tmp_path / "masks/sku.gif")
    [job] = _jobs(image, "--product-mask", tmp_path / "masks")
    assert job.mask_file == str(tmp_path / "masks/sku.gif") and capsys.readouterr().err == ""
    jpeg = saved(Image.fromarray(keep), tmp_path / "sku_mask.jpg")
    _jobs(image, "--product-mask", jpeg)
    assert "sku_mask.jpg is a JPEG" in capsys.readouterr().err
    # a 16-bit photo: said once
    saved(Image.fromarray(rgb[..., 0].astype(np.uint16) * 257), tmp_path / "deep.png")
    _jobs(tmp_path / "deep.png", "--product-mask", tmp_path / "masks/sku.gif")
    assert "deep.png: 16 bits a channel" in capsys.readouterr().err
    # a photo stored turned (EXIF) with a mask that is not: both read upright, which may not be what was meant
    exif = Image.Exif()
    exif[0x0112] = 3  # turned 180 degrees: the size stays, so no size error can catch it
    turned = saved(Image.fromarray(rgb), tmp_path / "turned.jpg", exif=exif)
    _jobs(turned, "--product-mask", tmp_path / "masks/sku.gif")
    assert "turned.jpg is stored turned (EXIF orientation 3) and" in capsys.readouterr().err
    exif[0x0112] = 6
    sideways = saved(Image.fromarray(rgb), tmp_path / "side.jpg", exif=exif)
    with pytest.raises(CLIError, match="a mask must have its image's size, or its shape at another scale; "
                                       ".*side.jpg is stored turned"):
        _jobs(sideways, "--product-mask", tmp_path / "masks/sku.gif")
    assert from_file(Image.open(sideways)).size == (16, 24)


def test_cli_inputs_are_checked_then_read_again_for_their_batch(tmp_path):
    """read_jobs checks every input and keeps no pixels (a catalogue's photos held at once could fill the memory);
    each batch reads its files again, as checked, and a file changed in between is an error naming it."""
    rgb = np.random.default_rng(5).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    keep = np.zeros((16, 24), np.uint8)
    keep[4:12, 6:18] = 255
    (tmp_path / "masks").mkdir()
    for name in ("a", "b"):
        saved(Image.fromarray(rgb), tmp_path / f"{name}.png")
        saved(Image.fromarray(keep), tmp_path / f"masks/{name}.png")
    args = build_parser().parse_args(["inpaint", str(tmp_path / "a.png"), str(tmp_path / "b.png"),
                                      "--product-mask", str(tmp_path / "masks"), "--prompt", "x"])
    jobs = read_jobs(args)
    assert [j.inputs for j in jobs] == [{}, {}] and [j.size for j in jobs] == [(24, 16)] * 2
    inputs = jobs[0].load(args)
    assert np.array_equal(np.asarray(inputs["image"]), rgb) and np.array_equal(np.asarray(inputs["product_mask"]), keep)
    saved(Image.fromarray(255 - keep), tmp_path / "masks/b.png")  # replaced while the run went on, even at its size
    with pytest.raises(CLIError, match=r"image .*b.png or its mask .*masks/b.png changed while this run went on"):
        jobs[1].load(args)
    fifo = tmp_path / "mask-fifo"  # `--product-mask <(...)`: a pipe is read once, so its pixels are kept
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_bytes((tmp_path / "masks/a.png").read_bytes()))
    writer.start()
    args = build_parser().parse_args(["inpaint", str(tmp_path / "a.png"), "--product-mask", str(fifo), "--prompt", "x"])
    [job] = read_jobs(args)
    writer.join()
    assert np.array_equal(np.asarray(job.load(args)["product_mask"]), keep)


def test_a_turned_jpeg_mask_is_still_read_as_a_jpeg(tmp_path):
    """Turning a file upright makes a new image, which had no .format: a JPEG mask's 0/1 compression noise was
    then read as a 0/1 label map (repainted as white) and the CLI's JPEG note was not said."""
    exif = Image.Exif()
    exif[0x0112] = 6
    noise = np.random.default_rng(6).integers(0, 2, (16, 24), dtype=np.uint8)  # near-black, as a JPEG decodes
    turned = from_file(Image.open(saved(Image.fromarray(noise), tmp_path / "m.jpg", exif=exif, quality=95)))
    assert turned.format == "JPEG" and turned.size == (16, 24)
    assert M.read_mask(turned, "mask").max() <= 2  # luma as it is, not 0/1 scaled to 0/255
