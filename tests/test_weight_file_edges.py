"""Edges of nn/weight_files.py that the loading tests leave open, found by mutation testing (round 4): which file of
a component folder is read (a sharded variant, pickles beside variants), what a refusal tells the user to convert
to, and which path an add-on's name (a LoRA, an embedding) means."""
import logging

import pytest
import torch
from safetensors.torch import save_file

from backdrop.nn.checkpoint import CheckpointError, MissingFile, init_model, load_model, save_model
from backdrop.nn.ldm_keys import folder_key
from backdrop.nn.weight_files import PickleRefused, _weight_files, adapter_file

pytestmark = [pytest.mark.usefixtures("one_thread"),  # conftest.py
              pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")]

STEM = "diffusion_pytorch_model"


def touch(folder, *names):
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        (folder / n).write_bytes(b"")
    return folder


def test_a_sharded_variant_is_read_as_diffusers_reads_it(tmp_path):
    # mutants W02, W24: the sharded variant's index looked up as <stem>.fp16.safetensors.index.json (diffusers
    # writes <stem>.safetensors.index.fp16.json), or its index read as a weight file
    from diffusers import UNet2DConditionModel
    folder = save_model(init_model("tiny", seed=1), tmp_path / "m")
    other = UNet2DConditionModel.from_pretrained(save_model(init_model("tiny", seed=2), tmp_path / "o") / "unet")
    other.half().save_pretrained(folder / "unet", variant="fp16", max_shard_size="2MB")  # diffusers' own names
    assert len(list((folder / "unet").glob(f"{STEM}.fp16-0000*-of-*.safetensors"))) > 1
    want = UNet2DConditionModel.from_pretrained(folder / "unet", variant="fp16").state_dict()
    got = load_model(folder, variant="fp16").unet.state_dict()
    assert all(torch.equal(v.half(), want[folder_key("unet", k)]) for k, v in got.items())


def test_an_fp16_variant_beside_a_transformers_pickle_is_said(tmp_path, caplog):
    # mutant W07: pytorch_model.bin (transformers' name) not seen as the full-precision weights: no warning
    folder = touch(tmp_path / "text_encoder", "pytorch_model.bin", "model.fp16.safetensors")
    with caplog.at_level(logging.WARNING, logger="backdrop.nn.weight_files"):
        assert _weight_files(folder, "model", False) == [folder / "model.fp16.safetensors"]
    assert "the full-precision weights are in pytorch_model.bin, a pickle" in caplog.text


def test_an_fp16_pickle_is_converted_to_the_fp16_name(tmp_path):
    # mutant W08: the refusal of <stem>.fp16.bin said to convert it to <stem>.safetensors (the full-precision name)
    folder = touch(tmp_path / "unet", f"{STEM}.fp16.bin")
    with pytest.raises(PickleRefused) as e:
        _weight_files(folder, STEM, False)
    assert e.value.files == [(folder / f"{STEM}.fp16.bin", folder / f"{STEM}.fp16.safetensors")]


def test_the_full_precision_pickle_wins_over_the_fp16_one(tmp_path):
    # mutant W09: with allow_pickle, <stem>.fp16.bin read before <stem>.bin (diffusers reads the full one)
    folder = touch(tmp_path / "unet", f"{STEM}.fp16.bin", f"{STEM}.bin")
    assert _weight_files(folder, STEM, True) == [folder / f"{STEM}.bin"]
    folder = touch(tmp_path / "text_encoder", "pytorch_model.fp16.bin", "pytorch_model.bin")
    assert _weight_files(folder, "model", True) == [folder / "pytorch_model.bin"]


def test_a_local_folder_wins_over_a_cached_repo_of_the_same_name(tmp_path, monkeypatch):
    # mutant W12: "org/name" looked up in the hub cache even when a local folder of that name exists
    cache = tmp_path / "hub" / "models--acme--style" / "snapshots" / "0123abc"
    touch(cache, "pytorch_lora_weights.safetensors")
    (tmp_path / "hub" / "models--acme--style" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--style" / "refs" / "main").write_text("0123abc")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    local = touch(tmp_path / "acme" / "style", "pytorch_lora_weights.safetensors")
    from pathlib import Path
    found = adapter_file(Path("acme/style"), "pytorch_lora_weights.safetensors", "LoRA")
    assert found.resolve() == (local / "pytorch_lora_weights.safetensors").resolve()


def test_a_missing_file_path_is_not_called_a_repo_id(tmp_path, monkeypatch):
    # mutant W13: a missing "dir/file.safetensors" was looked up (and named) as a hub repo id
    from pathlib import Path
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MissingFile) as e:
        adapter_file(Path("loras/style.safetensors"), "pytorch_lora_weights.safetensors", "LoRA")
    assert "no such file" in str(e.value) and "repo id" not in str(e.value)


@pytest.mark.parametrize("name", ["lora.bin", "lora.pt"])
def test_a_pickled_lora_is_refused_without_offering_allow_pickle(tmp_path, name):
    # mutants W14, W15: the LoRA's pickle refusal offered allow_pickle=True, which LoRA loading does not take
    from backdrop.nn.lora import fuse_lora
    path = tmp_path / name
    torch.save({"x": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError) as e:
        fuse_lora(init_model("tiny", seed=1), path)
    message = str(e.value)
    assert message.startswith(f"{path}: pickle checkpoints can run arbitrary code") and "allow_pickle" not in message
    assert "lora.safetensors" in message  # the conversion's output, the name to load instead


def test_an_a1111_pickle_embedding_gets_its_own_conversion(tmp_path):
    # mutant W14: an embedding's .pt reached the generic refusal (its conversion ignores A1111's string_to_param)
    from backdrop.nn.textual_inversion import load_textual_inversion
    path = tmp_path / "old.pt"
    torch.save({"string_to_param": {"*": torch.zeros(1, 64)}}, path)
    with pytest.raises(CheckpointError, match="a pickle file, which Backdrop does not load") as e:
        load_textual_inversion(init_model("tiny", seed=1), path)
    assert "string_to_param" in str(e.value)


def test_a_single_files_stored_dtype_is_its_unets(tmp_path):
    # mutant W19: torch_dtype="auto" read the file's first tensor (the text encoder's, fp32 here), not the UNet's
    from safetensors.torch import load_file

    from backdrop.nn.weight_files import stored_dtype
    path = save_model(init_model("tiny", seed=1, dtype=torch.float16), tmp_path / "m.safetensors", layout="ldm")
    tensors = load_file(path)
    save_file({k: v if k.startswith("model.diffusion_model.") else v.float() for k, v in tensors.items()}, str(path))
    assert stored_dtype(path) == torch.float16


def test_a_folder_named_like_the_file_is_not_the_file(tmp_path):
    # mutant W21: a folder holding a directory named pytorch_lora_weights.safetensors took it for the file
    from pathlib import Path
    (tmp_path / "lora" / "pytorch_lora_weights.safetensors").mkdir(parents=True)
    with pytest.raises(MissingFile, match="a folder without pytorch_lora_weights.safetensors"):
        adapter_file(Path(tmp_path / "lora"), "pytorch_lora_weights.safetensors", "LoRA")


def test_a_header_whose_byte_span_disagrees_with_the_shape_is_named(tmp_path):
    # mutant W22: a tensor spanning more bytes than its shape holds was read (a reshape error deep in loading)
    import json
    import struct

    from backdrop.nn.weight_files import _Reader
    header = json.dumps({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 12]}}).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(12))
    with pytest.raises(CheckpointError, match=r"bad.safetensors: corrupt: tensor 'x' F32 \(2,\) spans 12 bytes"):
        _Reader([path])
