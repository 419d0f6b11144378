"""Product masks whose size is not their image's: the same shape at another scale (a segmentation model's mask of a
camera photo) is resized with its image; another aspect ratio is left out at scan time, named in one warning."""
import logging

import pytest
import torch
from PIL import Image

from backdrop.diffusion.masks import same_shape
from backdrop.train.data import ImageFolder

from test_data import _picture, _rotated_jpeg


def test_masks_of_another_shape_are_dropped_at_scan_time(tmp_path, caplog):
    for name in ("a", "b", "c"):
        img, mask = _picture(32, 32, (4, 4, 12, 20))
        img.save(tmp_path / f"{name}.png")
        (mask.resize((16, 12)) if name == "b" else mask).save(tmp_path / f"{name}.mask.png")
        (tmp_path / f"{name}.txt").write_text(name)
    _rotated_jpeg(tmp_path / "d.jpg", 32, 16)  # stored 32x16, upright 16x32 like its mask
    _picture(16, 32, (2, 2, 8, 8))[1].save(tmp_path / "d.mask.png")
    (tmp_path / "d.txt").write_text("d")
    with caplog.at_level(logging.WARNING):
        ds = ImageFolder(tmp_path, 16)
    assert [e[0].name for e in ds.entries] == ["a.png", "c.png", "d.jpg"]
    assert str(tmp_path / "b.mask.png") in caplog.text and "(16x12)" in caplog.text
    assert [ds[i]["caption"] for i in range(3)] == ["a", "c", "d"]  # each item is itself, none stands in twice
    for name in ("a", "c", "d"):
        (tmp_path / f"{name}.mask.png").unlink()
        _picture(8, 4, (2, 1, 4, 3))[1].save(tmp_path / f"{name}.mask.png")
    with pytest.raises(ValueError, match=f"{tmp_path}: no usable images"):  # a ValueError: one line in the CLI
        ImageFolder(tmp_path, 16)


def test_a_mask_at_another_scale_is_resized_with_its_image(tmp_path, caplog):
    """A segmentation model's mask is often smaller than the photo: the same shape at another scale is used as the
    full-size mask would be (same crop around the product, same flip); 1% off in aspect is a rounded size."""
    img, mask = _picture(64, 48, (8, 8, 40, 32))
    for folder, size in (("full", (64, 48)), ("small", (32, 24))):
        (tmp_path / folder).mkdir()
        img.save(tmp_path / folder / "p.png")
        mask.resize(size, Image.Resampling.NEAREST).save(tmp_path / folder / "p.mask.png")
        (tmp_path / folder / "p.txt").write_text("p")
    img.save(tmp_path / "small" / "q.png")
    mask.resize((33, 24), Image.Resampling.NEAREST).save(tmp_path / "small" / "q.mask.png")  # 3% off: another shape
    (tmp_path / "small" / "q.txt").write_text("q")
    with caplog.at_level(logging.INFO):
        full, small = ImageFolder(tmp_path / "full", 24, flip=True), ImageFolder(tmp_path / "small", 24, flip=True)
    assert [e[0].name for e in small.entries] == ["p.png"] and "q.mask.png (33x24)" in caplog.text
    assert "1 masks in" in caplog.text and "p.mask.png (32x24)" in caplog.text
    for epoch in range(4):  # flips differ by epoch: the mask follows its image's
        a, b = full[(0, epoch)], small[(0, epoch)]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    assert same_shape((1000, 751), (4000, 3000)) and not same_shape((1, 1), (4000, 3000))
