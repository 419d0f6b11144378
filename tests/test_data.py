"""Datasets, the resumable sharded stream and inpainting masks: folders read both caption conventions, bad files
are skipped with their path logged, image and mask get the same crop and flip, a resumed stream continues with the
very same batches, DDP shards partition each epoch, and random masks come in the advertised kinds and proportions."""
import collections
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from backdrop.diffusion.image_io import from_file
from backdrop.train.data import (MASK_KINDS, DataFileError, DataStream, ImageFolder, ShardedSampler, SyntheticDataset,
                                 collate, inpaint_mask, make_dataset, product_repaint_mask, random_mask,
                                 random_mask_with_kind)
from backdrop.train.synthetic import World


def _picture(w, h, box, colour=(255, 255, 255)):
    """A black picture with one coloured rectangle, and its mask (the same rectangle)."""
    a = np.zeros((h, w, 3), np.uint8)
    x0, y0, x1, y1 = box
    a[y0:y1, x0:x1] = colour
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = 255
    return Image.fromarray(a), Image.fromarray(m)


def test_metadata_jsonl_captions_and_masks(tmp_path):
    rows = []
    for k, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        img, mask = _picture(40, 30, (5 + k, 5, 20, 25), colour)
        img.save(tmp_path / f"img{k}.png")
        mask.save(tmp_path / f"m{k}.png")
        rows.append({"file_name": f"img{k}.png", "text": f"caption {k}",
                     ("mask_file_name" if k else "mask"): f"m{k}.png"})
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    ds = ImageFolder(tmp_path, 24)
    assert len(ds) == 3 and ds.has_masks
    item = ds[1]
    assert item["caption"] == "caption 1" and item["index"] == 1
    assert item["image"].shape == (3, 24, 24) and item["mask"].shape == (1, 24, 24)
    assert item["image"].min() == -1 and item["image"].max() == 1  # black background, pure green rectangle
    assert item["image"][1].amax() == 1 and item["image"][0].amax() == -1
    assert set(item["mask"].unique().tolist()) == {0.0, 1.0}
    same = make_dataset(str(tmp_path / "metadata.jsonl"), 24)  # a jsonl spec reads the same entries
    assert [e[:2] for e in same.entries] == [e[:2] for e in ds.entries]


def _metadata_folder(folder, rows, name="metadata.jsonl"):
    """Pictures 0.png, 1.png, ... in folder, captioned in a metadata file of rows (dicts; CSV with a header)."""
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(len(rows)):
        _picture(16, 16, (2, 2, 8 + k, 8))[0].save(folder / f"{k}.png")
    if name.endswith(".csv"):
        text = ",".join(rows[0]) + "\n" + "".join(",".join(f'"{v}"' for v in r.values()) + "\n" for r in rows)
        (folder / name).write_text(text, encoding="utf-8-sig")  # as Excel saves it, with a BOM
    else:
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_metadata_csv_and_a_train_split_folder_are_read_as_hf_imagefolder_reads_them(tmp_path):
    _metadata_folder(tmp_path / "split/train", [{"file_name": "0.png", "text": "a mug"},
                                                {"file_name": "1.png", "text": "a vase"}])
    ds = ImageFolder(tmp_path / "split", 8)  # HF's split layout: DIR/train/metadata.jsonl, paths relative to it
    assert [(e[0].name, e[1]) for e in ds.entries] == [("0.png", "a mug"), ("1.png", "a vase")]
    _picture(16, 16, (2, 2, 8, 8))[1].save(tmp_path / "m.png")
    _metadata_folder(tmp_path / "csv", [{"file_name": "0.png", "text": "a mug, red", "mask_file_name": "../m.png"},
                                        {"file_name": "1.png", "text": "a vase", "mask_file_name": "../m.png"}],
                     "metadata.csv")
    ds = ImageFolder(tmp_path / "csv", 8)
    assert [e[1] for e in ds.entries] == ["a mug, red", "a vase"] and ds.has_masks
    assert make_dataset(str(tmp_path / "csv/metadata.csv"), 8).entries == ds.entries  # a .csv spec too
    (tmp_path / "csv/metadata.csv").write_text("file_name,caption\n0.png,a mug\n")
    with pytest.raises(ValueError, match=r"metadata.csv: no 'text' column .*'caption'"):
        ImageFolder(tmp_path / "csv", 8)


def test_a_folder_of_only_empty_captions_is_refused_or_named(tmp_path, caplog):
    _metadata_folder(tmp_path / "val", [{"file_name": "0.png", "text": "a mug"}])  # a split read for no training
    _picture(16, 16, (2, 2, 8, 8))[0].save(tmp_path / "a.png")
    with pytest.raises(ValueError, match=r"none of its 2 images has a <name>.txt caption, but .*val/metadata.jsonl"):
        ImageFolder(tmp_path, 8)
    (tmp_path / "val/metadata.jsonl").unlink()
    with caplog.at_level(logging.WARNING):
        ImageFolder(tmp_path, 8)
    assert "every caption in" in caplog.text and "unconditionally" in caplog.text
    caplog.clear()
    _metadata_folder(tmp_path / "meta", [{"file_name": "0.png", "text": ""}])
    with caplog.at_level(logging.WARNING):
        ImageFolder(tmp_path / "meta", 8)
    assert "every caption in" in caplog.text and "meta/metadata.jsonl" in caplog.text


def test_txt_captions_and_mask_png_beside_the_image(tmp_path, caplog):
    (tmp_path / "sub").mkdir()
    for name in ("a", "b", "sub/c"):
        img, mask = _picture(32, 32, (4, 4, 12, 20))
        img.save(tmp_path / f"{name}.png")
        mask.save(tmp_path / f"{name}.mask.png")
    (tmp_path / "a.txt").write_text("a red mug\n")
    (tmp_path / "sub/c.txt").write_text("a teal vase \u2615", encoding="utf-8-sig")  # a Windows editor's BOM
    with caplog.at_level(logging.WARNING):
        ds = ImageFolder(tmp_path, 16)
    assert [ds[i]["caption"] for i in range(3)] == ["a red mug", "", "a teal vase \u2615"]  # b has no .txt
    assert "1 of 3 images" in caplog.text and str(tmp_path / "b.png") in caplog.text  # the warning names it
    assert ds.has_masks and ds[2]["mask"].sum() > 0
    (tmp_path / "a.txt").write_bytes("caf\xe9 cr\xe8me".encode("cp1252"))
    with pytest.raises(ValueError, match=r"a\.txt: not UTF-8 text"):
        ImageFolder(tmp_path, 16)


def test_masks_named_in_other_conventions_are_masks_never_images(tmp_path, caplog):
    for name in ("0", "1", "2"):
        img, mask = _picture(16, 16, (2, 2, 6 + 2 * int(name), 8))
        img.save(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_text(f"caption {name}")
        mask.save(tmp_path / {"0": "0_mask.png", "1": "1.mask.jpg", "2": "2.mask.png"}[name], quality=100)
    _picture(16, 16, (2, 2, 8, 8))[1].save(tmp_path / "9_mask.png")  # a mask whose image is gone
    with caplog.at_level(logging.WARNING):
        ds = ImageFolder(tmp_path, 16)
    assert [(e[0].name, e[2].name) for e in ds.entries] == [("0.png", "0_mask.png"), ("1.png", "1.mask.jpg"),
                                                             ("2.png", "2.mask.png")]
    assert [ds[i]["mask"].sum().item() for i in range(3)] == [24, 36, 48]  # each image with its own mask
    assert str(tmp_path / "9_mask.png") in caplog.text and "empty caption" not in caplog.text
    _picture(16, 16, (2, 2, 8, 8))[1].save(tmp_path / "2_mask.png")
    with pytest.raises(ValueError, match=r"2.png has 2 masks"):
        ImageFolder(tmp_path, 16)


def test_tiff_images_are_read_and_captions_without_an_image_are_named(tmp_path, caplog):
    _picture(16, 16, (2, 2, 8, 8))[0].save(tmp_path / "a.tif")
    (tmp_path / "b.svg").write_text("<svg/>")  # a format Backdrop does not read
    for name in ("a", "b"):
        (tmp_path / f"{name}.txt").write_text(f"caption {name}")
    with caplog.at_level(logging.WARNING):
        ds = ImageFolder(tmp_path, 8)
    assert [(e[0].name, e[1]) for e in ds.entries] == [("a.tif", "caption a")]
    assert "1 caption file(s)" in caplog.text and str(tmp_path / "b.txt") in caplog.text


def test_unreadable_images_are_skipped_with_their_path(tmp_path, caplog):
    for name in ("a", "b", "c"):
        _picture(32, 32, (4, 4, 12, 20))[0].save(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_text(name)
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    raw = (tmp_path / "b.png").read_bytes()
    (tmp_path / "b.png").write_bytes(raw[: len(raw) // 2])  # a good header, a truncated body: fails only on decode
    with caplog.at_level(logging.WARNING):
        ds = ImageFolder(tmp_path, 16)
    assert str(tmp_path / "bad.png") in caplog.text  # at scan time
    assert [e[0].name for e in ds.entries] == ["a.png", "b.png", "c.png"]
    with pytest.raises(DataFileError, match=r"b\.png: cannot decode it"):  # at load time: named, no stand-in
        ds[1]
    assert [ds[i]["caption"] for i in (0, 2)] == ["a", "c"]


def _rotated_jpeg(path, w, h):
    """A w x h JPEG whose EXIF says to turn it a quarter (orientation 6): h x w once upright."""
    exif = Image.Exif()
    exif[0x0112] = 6
    _picture(w, h, (2, 2, 8, 8))[0].save(path, exif=exif)


def test_files_are_read_as_inference_reads_them(tmp_path, caplog):
    Image.fromarray(np.full((16, 16), 32768, np.uint16)).save(tmp_path / "deep.png")  # 16-bit greyscale
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 2], rgba[..., 3], rgba[4:12, 4:12, 3] = 200, 255, 0  # blue, with a transparent hole
    Image.fromarray(rgba).save(tmp_path / "hole.png")
    rgba[..., 3] = 255
    Image.fromarray(rgba).save(tmp_path / "opaque.png")  # an alpha channel, but no transparent pixel
    for name in ("deep", "hole", "opaque"):
        (tmp_path / f"{name}.txt").write_text(name)
    with caplog.at_level(logging.WARNING):
        ds = ImageFolder(tmp_path, 16)
    deep = ds[0]["image"]
    assert abs(deep.mean().item() - (128 / 127.5 - 1)) < 1e-6  # scaled to 8 bits, not clipped to white
    with Image.open(tmp_path / "deep.png") as im:
        assert torch.equal(deep, torch.from_numpy(np.array(from_file(im).convert("RGB"))).permute(2, 0, 1)
                           .float() / 127.5 - 1)  # the very pixels inference reads
    assert torch.equal(ds[1]["image"][2], torch.full((16, 16), 200 / 127.5 - 1))  # its RGB, the hole too
    warnings = [r.getMessage() for r in caplog.records if "transparent" in r.getMessage()]
    assert len(warnings) == 1 and str(tmp_path / "hole.png") in warnings[0] and "opaque" not in warnings[0]


def test_image_and_mask_get_the_same_crop_and_flip(tmp_path):
    img, mask = _picture(80, 48, (30, 8, 46, 30))  # wide: crops move along x (columns 32-45 always stay in)
    img.save(tmp_path / "p.png")
    mask.save(tmp_path / "p.mask.png")
    (tmp_path / "p.txt").write_text("p")
    ds = ImageFolder(tmp_path, 48, random_crop=True, flip=True, seed=3)  # no resize: exact pixels
    seen = set()
    for epoch in range(12):
        item = ds[(0, epoch)]
        white = (item["image"] > 0).all(0).float()  # (48, 48) where the rectangle landed
        assert torch.equal(white, item["mask"][0]), epoch
        cols = torch.nonzero(white.any(0))[:, 0]
        seen.add((cols.min().item(), cols.max().item()))
        assert torch.equal(ds[(0, epoch)]["image"], item["image"])  # deterministic per (index, epoch)
    assert len(seen) >= 6  # many different crops and flips
    scaled = ImageFolder(tmp_path, 24, random_crop=True, flip=True, seed=3)  # with a 2x downscale too
    for epoch in range(6):
        item = scaled[(0, epoch)]
        white = (item["image"] > 0).all(0)
        m = item["mask"][0].bool()
        assert (white & m).sum() / (white | m).sum() > 0.85  # same place up to resampling at the edges
    centre = ImageFolder(tmp_path, 48)[0]  # no random crop: centred on the product, columns 30-45: 14 cut left
    cols = torch.nonzero(centre["mask"][0].any(0))[:, 0]
    assert (cols.min().item(), cols.max().item()) == (30 - 14, 46 - 14 - 1)
    assert torch.equal((centre["image"] > 0).all(0).float(), centre["mask"][0])


def test_a_product_at_one_end_of_a_wide_photo_stays_in_the_crop(tmp_path):
    """A centred crop of a 512x128 photo whose product sits at its left end trained on a crop without it."""
    img, mask = _picture(512, 128, (4, 40, 60, 100))
    img.save(tmp_path / "wide.png")
    mask.save(tmp_path / "wide_mask.png")
    (tmp_path / "wide.txt").write_text("a mug")
    item = ImageFolder(tmp_path, 64)[0]  # 512x128 -> 256x64, then a 64x64 crop
    assert item["mask"].mean() > 0.2 and torch.equal((item["image"] > 0).all(0).float(), item["mask"][0])


def test_metadata_names_match_files_in_either_unicode_form(tmp_path):
    import unicodedata

    _picture(16, 16, (4, 4, 12, 12))[0].save(tmp_path / unicodedata.normalize("NFD", "café.png"))  # as macOS writes
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": unicodedata.normalize("NFC", "café.png"),
                                                         "text": "a cup"}) + "\n", encoding="utf-8")
    assert [e[1] for e in ImageFolder(tmp_path, 16).entries] == ["a cup"]


def test_metadata_images_take_the_masks_beside_them(tmp_path):
    """metadata.jsonl without mask_file_name, masks named as in the .txt layout: they were ignored (and the product
    stage then said the folder had no masks)."""
    for k in range(2):
        img, mask = _picture(16, 16, (2, 2, 8 + k, 8))
        img.save(tmp_path / f"{k}.png")
        mask.save(tmp_path / f"{k}_mask.png")
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{k}.png", "text": f"item {k}"})
                                                     + "\n" for k in range(2)))
    ds = ImageFolder(tmp_path, 16)
    assert ds.has_masks and [e[2].name for e in ds.entries] == ["0_mask.png", "1_mask.png"]


def test_folder_layouts_real_catalogues_have(tmp_path, caplog):
    """Masks in masks/ beside the images (they were trained as images), captions as NAME.TXT, hidden files (macOS's
    ._name, .thumbnails/: trained, or one warning each), a symlinked subfolder (skipped), and images sharing a name;
    masks read as inference reads product masks (a cut-out's alpha, a 0/1 PNG label map were read by brightness)."""
    (tmp_path / "shoes").mkdir()
    (tmp_path / "masks/shoes").mkdir(parents=True)
    labels = np.zeros((16, 16), np.uint8)
    labels[4:12, 4:12] = 1  # a label map: 1 = product
    for name, sub in (("a", ""), ("b", "shoes/")):
        _picture(16, 16, (4, 4, 12, 12))[0].save(tmp_path / f"{sub}{name}.png")
        (tmp_path / f"{sub}{name}.TXT").write_text(f"caption {name}")
        Image.fromarray(labels).save(tmp_path / f"masks/{sub}{name}.png")
    (tmp_path / "._a.png").write_bytes(b"\0\5\22AppleDouble")
    (tmp_path / ".thumbnails").mkdir()
    _picture(16, 16, (0, 0, 4, 4))[0].save(tmp_path / ".thumbnails/a.png")
    elsewhere = tmp_path.parent / f"{tmp_path.name}-linked"
    elsewhere.mkdir()
    _picture(16, 16, (4, 4, 12, 12))[0].save(elsewhere / "c.png")
    (elsewhere / "c.txt").write_text("caption c")
    cut = np.zeros((16, 16, 4), np.uint8)
    cut[..., :3] = 255  # white everywhere, the product only in alpha: a cut-out exported as the mask
    cut[4:12, 4:12, 3] = 255
    Image.fromarray(cut, "RGBA").save(elsewhere / "c_mask.png")
    (tmp_path / "linked").symlink_to(elsewhere, target_is_directory=True)
    with caplog.at_level(logging.INFO):
        ds = ImageFolder(tmp_path, 16)
    names = [e[0].relative_to(tmp_path).as_posix() for e in ds.entries]
    assert names == ["a.png", "linked/c.png", "shoes/b.png"]
    assert [e[1] for e in ds.entries] == ["caption a", "caption c", "caption b"]
    assert "left out 2 hidden files and folders" in caplog.text and "unreadable" not in caplog.text
    want = torch.zeros(16, 16)
    want[4:12, 4:12] = 1
    for i in range(3):
        assert torch.equal(ds[i]["mask"][0], want), names[i]
    _picture(16, 16, (4, 4, 12, 12))[0].save(tmp_path / "a.jpg")  # sku.jpg beside sku.png
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        ImageFolder(tmp_path, 16)
    assert "2 images in" in caplog.text and "share their name with another" in caplog.text


def test_bad_folders_and_specs_are_refused_clearly(tmp_path):
    _picture(16, 16, (2, 2, 8, 8))[0].save(tmp_path / "a.png")
    _picture(16, 16, (2, 2, 8, 8))[0].save(tmp_path / "b.png")
    _picture(16, 16, (2, 2, 8, 8))[1].save(tmp_path / "a.mask.png")
    with pytest.raises(ValueError, match="1 of 2 images .* have a mask"):
        ImageFolder(tmp_path, 8)
    some_masks = ImageFolder(tmp_path, 8, masks=False)  # what a stage that reads no masks opens
    assert not some_masks.has_masks and len(some_masks) == 2 and "mask" not in some_masks[0]
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n{"file_name": "b.png"\n')
    with pytest.raises(ValueError, match=r"metadata.jsonl:2: not valid JSON"):
        ImageFolder(tmp_path, 8)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png"}\n')
    with pytest.raises(ValueError, match=r"metadata.jsonl:1: needs a string 'text'"):
        ImageFolder(tmp_path, 8)
    with pytest.raises(ValueError, match="positive integer"):
        make_dataset("synthetic:many", 8)
    with pytest.raises(ValueError, match="not there"):
        make_dataset(str(tmp_path / "missing"), 8)
    assert isinstance(make_dataset("synthetic:5", 16), SyntheticDataset)


def test_synthetic_dataset_items_and_collate():
    ds = make_dataset("synthetic:10", 32, seed=4)
    item = ds[3]
    s = World(4).sample(3, 32)
    assert item["caption"] == s.caption and item["index"] == 3
    assert torch.equal(item["mask"][0], torch.from_numpy(s.mask).float())
    assert torch.equal(((item["image"] + 1) * 127.5).round().byte().permute(1, 2, 0), torch.from_numpy(s.image))
    batch = collate([ds[i] for i in range(4)])
    assert batch["image"].shape == (4, 3, 32, 32) and batch["mask"].shape == (4, 1, 32, 32)
    assert batch["index"].tolist() == [0, 1, 2, 3] and len(batch["caption"]) == 4
    with pytest.raises(ValueError, match="different fields"):
        collate([ds[0], {k: v for k, v in ds[1].items() if k != "mask"}])
    with pytest.raises(IndexError):
        ds[10]


@pytest.mark.parametrize("n,world", [(10, 1), (10, 3), (11, 4), (7, 7)])
def test_ddp_shards_cover_every_index_once_per_epoch(n, world):
    per_rank = [ShardedSampler(n, seed=1, rank=r, world_size=world) for r in range(world)]
    for epoch in range(3):
        union = np.concatenate([s.shard(epoch) for s in per_rank])
        assert sorted(union.tolist()) == list(range(n))
    it, length = iter(per_rank[0]), per_rank[0].epoch_length
    keys = [next(it) for _ in range(3 * length)]  # endless: epoch after epoch, each one its shard in order
    assert keys == [(int(i), e) for e in range(3) for i in per_rank[0].shard(e)]
    if n > world:  # orders are seeded: same seed same order, next epoch another order
        assert per_rank[0].shard(0).tolist() != per_rank[0].shard(1).tolist()
        assert per_rank[0].shard(0).tolist() == ShardedSampler(n, seed=1, world_size=world).shard(0).tolist()
    later = iter(ShardedSampler(n, seed=1, rank=0, world_size=world, start=2))  # resume mid-epoch
    assert [next(later) for _ in range(3 * length - 2)] == keys[2:]
    with pytest.raises(ValueError, match="cannot be shared"):
        ShardedSampler(2, world_size=3)


def _same(a, b):
    return a["caption"] == b["caption"] and torch.equal(a["index"], b["index"]) and torch.equal(a["image"], b["image"])


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_stream_continues_exactly(workers):
    ds = SyntheticDataset(23, 16, seed=2)  # 23 items, batches of 4: the batches run across epoch boundaries
    straight = DataStream(ds, 4, seed=9, num_workers=workers)
    torch.manual_seed(0)
    first = [next(straight) for _ in range(7)]
    assert torch.equal(torch.rand(3), torch.manual_seed(0) and torch.rand(3))  # the global RNG was not touched
    state = json.loads(json.dumps(straight.state_dict()))  # what a checkpoint stores
    rest = [next(straight) for _ in range(5)]
    resumed = DataStream(ds, 4, seed=9, num_workers=workers)
    resumed.load_state_dict(state)
    assert all(_same(a, b) for a, b in zip(rest, [next(resumed) for _ in range(5)]))
    single = DataStream(ds, 4, seed=9)  # workers or not, the same batches
    assert all(_same(a, next(single)) for a in first)
    seen = torch.cat([b["index"] for b in first + rest])
    assert sorted(seen[:23].tolist()) == list(range(23))  # the first 23 items are one epoch
    assert not _same(first[0], next(DataStream(ds, 4, seed=10)))  # the seed matters
    with pytest.raises(ValueError, match="world_size=1"):
        DataStream(ds, 4, seed=9, rank=0, world_size=2).load_state_dict(state)


@pytest.mark.parametrize("n,origin,start", [(10, 0, 7), (10, 13, 0), (10, 13, 2), (10, 13, 9), (11, 25, 30)])
def test_a_sampler_from_an_origin_skips_whole_epochs_as_one_that_ran_there(n, origin, start):
    for rank in range(3):
        endless = iter(ShardedSampler(n, seed=4, rank=rank, world_size=3, origin=origin))
        keys = [next(endless) for _ in range(start + 12)]
        later = iter(ShardedSampler(n, seed=4, rank=rank, world_size=3, origin=origin, start=start))
        assert [next(later) for _ in range(12)] == keys[start:]
        # the first epoch starts at position origin % n of its order, the next ones at 0
        epoch, offset = divmod(origin, n)
        order = np.random.default_rng([4, epoch]).permutation(n)
        assert keys[0] == (int(order[offset + rank]), epoch)


@pytest.mark.parametrize("n,old,new", [(12, 2, 3), (20, 4, 1), (30, 3, 2)])
def test_a_stream_goes_on_with_another_number_of_ranks_without_repeating_or_skipping(n, old, new):
    """A checkpoint of `old` ranks resumed by `new`: over the epoch they share, every item is taken exactly once
    (exact when `old` divides n), and the next epoch is whole again."""
    ds = SyntheticDataset(n, 8, seed=0)
    before = [DataStream(ds, 2, seed=5, rank=r, world_size=old) for r in range(old)]
    taken = [next(s)["index"].tolist() for s in before for _ in range(2)]  # two batches a rank, mid-epoch
    states = json.loads(json.dumps([s.state_dict() for s in before]))
    after = [DataStream(ds, 1, seed=5, rank=r, world_size=new) for r in range(new)]
    assert {s.continue_from(states) for s in after} == {4 * old}
    left = n - 4 * old
    rest = [next(after[r])["index"].tolist() for r in range(new) for _ in range(len(range(r, left, new)))]
    assert sorted(sum(taken + rest, [])) == list(range(n))
    next_epoch = [next(after[r])["index"].tolist() for r in range(new) for _ in range(len(range(r, n, new)))]
    assert sorted(sum(next_epoch, [])) == list(range(n))
    resumed = DataStream(ds, 1, seed=5, rank=0, world_size=new)  # its own checkpoints resume as usual
    resumed.load_state_dict(json.loads(json.dumps(after[0].state_dict())))
    assert _same(next(resumed), next(after[0]))
    with pytest.raises(ValueError, match="seed=6"):
        DataStream(ds, 1, seed=6, rank=0, world_size=new).continue_from(states)


def test_ranks_of_a_stream_see_disjoint_items():
    ds = SyntheticDataset(12, 8, seed=0)
    streams = [DataStream(ds, 3, seed=5, rank=r, world_size=2) for r in range(2)]
    seen = [torch.cat([next(s)["index"] for _ in range(2)]).tolist() for s in streams]
    assert sorted(seen[0] + seen[1]) == list(range(12))


def test_random_masks_kinds_and_frequencies():
    g = torch.Generator().manual_seed(0)
    counts = collections.Counter(random_mask_with_kind(8, 8, g)[1] for _ in range(3000))
    for kind in MASK_KINDS:  # a quarter each; the binomial sd at n=3000 is 0.008
        assert abs(counts[kind] / 3000 - 0.25) < 0.03, counts
    g = torch.Generator().manual_seed(1)
    found = collections.defaultdict(int)
    for _ in range(200):
        m, kind = random_mask_with_kind(32, 48, g)
        assert m.shape == (1, 32, 48) and m.dtype == torch.float32 and set(m.unique().tolist()) <= {0.0, 1.0}
        area = m.mean().item()
        rows, cols = torch.nonzero(m[0].any(1))[:, 0], torch.nonzero(m[0].any(0))[:, 0]
        filled_bbox = m[0, rows.min():rows.max() + 1, cols.min():cols.max() + 1].all().item()
        if kind == "full":
            assert area == 1
        else:
            assert 0 < area < 1, kind
            assert filled_bbox == (kind == "box") or kind == "brush", kind  # an ellipse never fills its box
        found[kind] += 1
    assert set(found) == set(MASK_KINDS)
    a = [random_mask(16, 16, torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(a[0], a[1])


def test_inpaint_mask_keeps_the_product():
    product = World(1).sample(0, 32).mask
    pm = torch.from_numpy(product).float()[None]
    assert torch.equal(product_repaint_mask(pm), 1 - pm)
    g = torch.Generator().manual_seed(0)
    masks = [inpaint_mask(32, 32, g, pm, product_prob=0.5) for _ in range(200)]
    keep = sum(torch.equal(m, 1 - pm) for m in masks)
    assert 70 < keep < 130
    assert all(not torch.equal(inpaint_mask(32, 32, g, None), 1 - pm) for _ in range(20))
    with pytest.raises(ValueError, match="product mask is"):
        inpaint_mask(16, 16, torch.Generator().manual_seed(0), pm, product_prob=1.0)


def test_product_masks_that_train_something_else_are_named_once(tmp_path, caplog):
    """A mask with no product, all product, or inverted (white = the backdrop, as some segmentation tools export
    it) trained silently: the inverted one teaches the model to repaint the product and keep the backdrop."""
    boxes = {"empty": (0, 0, 0, 0), "full": (0, 0, 32, 32), "inverted": None, "good": (4, 4, 12, 20)}
    for name, box in boxes.items():
        img, mask = _picture(32, 32, box or (8, 8, 24, 24))
        img.save(tmp_path / f"{name}.png")
        (Image.fromarray(255 - np.asarray(mask)) if box is None else mask).save(tmp_path / f"{name}.mask.png")
    ds = ImageFolder(tmp_path, 16)
    with caplog.at_level(logging.WARNING, logger="backdrop.train.image_folder"):
        for _ in range(2):
            items = [ds[i] for i in range(len(ds))]
    said = {name: [r.message for r in caplog.records if f"{name}.mask.png" in r.message] for name in boxes}
    assert said["empty"] == [f"product mask {tmp_path / 'empty.mask.png'} has no white (no product): its item "
                             "trains as a full repaint"]
    assert "is all white (all product)" in said["full"][0] and len(said["full"]) == 1
    assert "is white on 100% of its border" in said["inverted"][0] and "inverted" in said["inverted"][0]
    assert said["good"] == [] and sum(r.message.startswith("product mask") for r in caplog.records) == 3
    assert all(torch.equal(a["mask"], b["mask"]) for a, b in zip(items, [ds[i] for i in range(len(ds))]))
