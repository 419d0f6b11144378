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

from backdrop.train.data import (MASK_KINDS, DataStream, ImageFolder, ShardedSampler, SyntheticDataset, collate,
                                 inpaint_mask, make_dataset, product_repaint_mask, random_mask,
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


def test_txt_captions_and_mask_png_beside_the_image(tmp_path, caplog):
    (tmp_path / "sub").mkdir()
    for name in ("a", "b", "sub/c"):
        img, mask = _picture(32, 32, (4, 4, 12, 20))
        img.save(tmp_path / f"{name}.png")
        mask.save(tmp_path / f"{name}.mask.png")
    (tmp_path / "a.txt").write_text("a red mug\n")
    (tmp_path / "sub/c.txt").write_text("a teal vase")
    with caplog.at_level(logging.WARNING):
        ds = ImageFolder(tmp_path, 16)
    assert [ds[i]["caption"] for i in range(3)] == ["a red mug", "", "a teal vase"]  # b has no .txt
    assert "1 of 3 images" in caplog.text
    assert ds.has_masks and ds[2]["mask"].sum() > 0


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
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        item = ds[1]  # at load time: reported, and the next readable image stands in
    assert str(tmp_path / "b.png") in caplog.text
    assert item["index"] == 2 and item["caption"] == "c"
    batch = collate([ds[i] for i in range(3)])  # a whole pass never raises
    assert batch["index"].tolist() == [0, 2, 2]


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
    centre = ImageFolder(tmp_path, 48)[0]  # no random crop: (80 - 48) / 2 = 16 columns cut each side
    cols = torch.nonzero(centre["mask"][0].any(0))[:, 0]
    assert (cols.min().item(), cols.max().item()) == (30 - 16, 46 - 16 - 1)


def test_bad_folders_and_specs_are_refused_clearly(tmp_path):
    _picture(16, 16, (2, 2, 8, 8))[0].save(tmp_path / "a.png")
    _picture(16, 16, (2, 2, 8, 8))[0].save(tmp_path / "b.png")
    _picture(16, 16, (2, 2, 8, 8))[1].save(tmp_path / "a.mask.png")
    with pytest.raises(ValueError, match="1 of 2 images .* have a mask"):
        ImageFolder(tmp_path, 8)
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
