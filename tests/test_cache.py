"""The latent cache's record of its data folder (train/cache.py folder_state): a cache built from a folder that has
since gained, lost or changed data files says so, whatever folder a later run starts in."""
import json

import pytest

from backdrop.cli import main
from backdrop.nn.checkpoint import init_model
from backdrop.train.cache import LatentCache, build_cache, folder_state
from backdrop.train.image_folder import ImageFolder
from test_data import _picture


def test_a_cache_says_when_its_folder_changed(tmp_path):
    """A cache built from a folder that has since gained, lost or changed files trained on the old data silently."""
    folder = tmp_path / "data"
    folder.mkdir()
    for k in range(3):
        _picture(16, 16, (2, 2, 8 + k, 8))[0].save(folder / f"{k}.png")
        (folder / f"{k}.txt").write_text(f"item {k}")
    out = build_cache(init_model("tiny", seed=0), ImageFolder(folder, 16), tmp_path / "cache", batch_size=3,
                      source=str(folder), progress=False)
    assert LatentCache(out).source_changed() is None
    (folder / ".DS_Store").write_bytes(b"x")  # hidden files do not count, nor files that are no data
    (folder / "runs").mkdir()
    (folder / "runs/log.jsonl").write_text("{}\n")
    (folder / "notes.md").write_text("to do")
    assert LatentCache(out).source_changed() is None
    _picture(16, 16, (1, 1, 5, 5))[0].save(folder / "3.png")
    assert "has changed since (6 files then, 7 now" in LatentCache(out).source_changed()
    # the folder as the dataset scanned it: a file added during the build (a sync still copying) is a change
    dataset = ImageFolder(folder, 16)
    state = folder_state(str(folder))
    (folder / "4.txt").write_text("a caption that came late")
    out = build_cache(init_model("tiny", seed=0), dataset, tmp_path / "cache2", batch_size=4, source=str(folder),
                      source_state=state, progress=False)
    assert "has changed since (7 files then, 8 now" in LatentCache(out).source_changed()


def test_the_cache_command_records_its_folder_absolute(tmp_path, monkeypatch):
    """--data as typed (relative) was recorded: a run started elsewhere compared nothing, or another folder."""
    folder = tmp_path / "data"
    folder.mkdir()
    for k in range(2):
        _picture(32, 32, (2, 2, 20, 20))[0].save(folder / f"{k}.png")
        (folder / f"{k}.txt").write_text(f"item {k}")
    monkeypatch.chdir(tmp_path)
    assert main(["train", "cache", "--data", "data", "--out", "cache", "--size", "32", "--quiet"]) == 0
    assert json.loads((tmp_path / "cache/cache.json").read_text())["source"] == str(folder)
    monkeypatch.chdir(folder)
    _picture(32, 32, (1, 1, 5, 5))[0].save(folder / "2.png")
    assert f"made from {folder}, which has changed since" in LatentCache(tmp_path / "cache").source_changed()


def test_a_metadata_file_as_the_data_and_files_it_names_outside_its_folder_are_followed(tmp_path):
    """--data DIR/metadata.jsonl recorded no state, and an image it names in ../shared was not part of the state:
    either changed, the cache trained on the old data without a word."""
    folder, shared = tmp_path / "data", tmp_path / "shared"
    folder.mkdir(), shared.mkdir()
    _picture(16, 16, (2, 2, 8, 8))[0].save(folder / "0.png")
    _picture(16, 16, (2, 2, 9, 9))[0].save(shared / "a.png")
    meta = folder / "metadata.jsonl"
    meta.write_text('{"file_name": "0.png", "text": "a mug"}\n{"file_name": "../shared/a.png", "text": "a vase"}\n')
    out = build_cache(init_model("tiny", seed=0), ImageFolder(folder, 16, metadata=meta), tmp_path / "cache",
                      batch_size=2, source=str(meta), progress=False)
    assert LatentCache(out).source_changed() is None
    _picture(16, 16, (1, 1, 12, 12))[0].save(shared / "a.png")
    assert "which has changed since (3 files then, 3 now" in LatentCache(out).source_changed()


def test_a_damaged_shard_is_refused_when_the_cache_opens(tmp_path, capsys):
    """A truncated shard (an interrupted copy) failed the run when first reached, naming no file. A cache of a
    random model says the --preset and --seed it was made with when another model is trained on it."""
    folder = tmp_path / "data"
    folder.mkdir()
    for k in range(3):
        _picture(32, 32, (2, 2, 20, 20))[0].save(folder / f"{k}.png")
    assert main(["train", "cache", "--data", str(folder), "--out", str(tmp_path / "c"), "--size", "32", "--seed", "2",
                 "--shard-size", "2", "--quiet"]) == 0
    assert main(["train", "pretrain", "--data", str(tmp_path / "c"), "--out", str(tmp_path / "run"), "--size", "32",
                 "--steps", "1", "--quiet"]) == 2
    assert "made from random weights (--preset tiny --seed 2): train with those" in capsys.readouterr().err
    shard = tmp_path / "c" / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"shard shard-00001.safetensors is damaged \(.*\); rebuild the cache"):
        LatentCache(tmp_path / "c")
