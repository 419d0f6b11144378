"""Edges of the named LoRA adapters (diffusion/adapters.py) that the diffusers-parity tests in test_lora_adapters.py
leave open, each found by mutation testing (round 4): names and weights given in other forms, what a later change
re-reads (a state dict, a relative path), partial fuse/unfuse, and the one CPU copy of each weight."""
import logging

import pytest
import torch
from safetensors.torch import load_file

from backdrop.diffusion.pipeline import Pipeline
from backdrop.nn.checkpoint import load_model
from test_lora import assert_same, lora_files, peft_file, random_lora, state

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning"),
              pytest.mark.usefixtures("one_thread")]  # tests/conftest.py


@pytest.fixture(scope="module")
def files(tmp_path_factory, one_thread):
    files = lora_files(tmp_path_factory.mktemp("adapter-edges"))
    files.other = peft_file(random_lora(load_model(files.folder), seed=5), files.root / "other.safetensors")
    return files


@pytest.fixture(scope="module")
def shared(files):
    return Pipeline.from_pretrained(files.folder, device="cpu", dtype=torch.float32)


@pytest.fixture
def pipe(shared):
    """The module's Pipeline, its base weights checked back after each test (unfused and unloaded)."""
    base = state(shared.backend.model)
    yield shared
    if shared._adapters.state.fused:
        shared.unfuse_lora()
    shared.unload_lora_weights()
    assert_same(state(shared.backend.model), base)


def split(weights: dict) -> tuple[dict, dict]:
    """(the UNet's, the text encoder's) tensors of a state()."""
    return ({k: v for k, v in weights.items() if k.startswith("unet.")},
            {k: v for k, v in weights.items() if k.startswith("text_encoder.")})


def test_an_empty_adapter_name_is_refused(pipe, files):
    # mutant A08: adapter_name="" accepted (only non-strings refused)
    with pytest.raises(ValueError, match="adapter_name must be a non-empty string, got ''"):
        pipe.load_lora_weights(files.peft, adapter_name="")
    assert pipe.get_list_adapters() == {}


def test_a_state_dict_changed_after_loading_does_not_change_the_adapter(pipe, files):
    # mutant A11: the state dict kept by reference, so a later set_adapters re-merges the caller's edited dict
    sd = load_file(str(files.peft))
    pipe.load_lora_weights(sd, adapter_name="sd")
    loaded = state(pipe.backend.model)
    sd.clear()
    pipe.set_adapters("sd", 1.0)  # merged again from what was given at load
    assert_same(state(pipe.backend.model), loaded)


def test_a_relative_path_is_read_again_after_the_working_directory_changes(pipe, files, tmp_path, monkeypatch):
    # mutant A12: the relative path kept as given: set_adapters after a chdir cannot find the file
    monkeypatch.chdir(files.root)
    pipe.load_lora_weights(files.peft.name, adapter_name="rel")
    loaded = state(pipe.backend.model)
    monkeypatch.chdir(tmp_path)
    pipe.set_adapters("rel", 0.5)
    pipe.set_adapters("rel", 1.0)
    assert_same(state(pipe.backend.model), loaded)


def test_tuples_of_names_and_weights_work_like_lists(pipe, files):
    # mutant A14: a tuple of adapter_weights taken as one weight for every adapter (and refused)
    pipe.load_lora_weights(files.peft, adapter_name="a")
    pipe.load_lora_weights(files.other, adapter_name="b")
    pipe.set_adapters(["a", "b"], [0.5, -0.25])
    as_list = state(pipe.backend.model)
    pipe.set_adapters("a")
    pipe.set_adapters(("a", "b"), (0.5, -0.25))
    assert_same(state(pipe.backend.model), as_list)


def test_a_bool_weight_is_refused(pipe, files):
    # mutant A32: set_adapters(name, True) merged at weight 1
    pipe.load_lora_weights(files.peft, adapter_name="a")
    with pytest.raises(ValueError, match="the weight of a must be a finite number, got True"):
        pipe.set_adapters("a", True)


def test_fuse_lora_with_no_components_is_refused(pipe, files):
    # mutant A19: fuse_lora(components=[]) accepted as a silent no-op
    pipe.load_lora_weights(files.peft, adapter_name="a")
    with pytest.raises(ValueError, match="fuse_lora: components= is empty"):
        pipe.fuse_lora(components=[])
    pipe.set_adapters("a", 0.5)  # nothing was fused: changes are still allowed


def test_fuse_lora_fuses_the_active_adapters_only(pipe, files):
    # mutant A20: fuse_lora() fused every loaded adapter, so with none active set_adapters was refused after it
    pipe.load_lora_weights(files.peft, adapter_name="a")
    pipe.set_adapters([])
    pipe.fuse_lora()
    pipe.set_adapters("a", 0.5)
    assert pipe.get_active_adapters() == ["a"]


def test_fusing_again_at_another_scale_keeps_the_first(pipe, files, caplog):
    # mutant A21: a second fuse_lora replaced the first one's lora_scale instead of leaving it (with a warning)
    pipe.load_lora_weights(files.peft, adapter_name="a")
    pipe.fuse_lora(lora_scale=0.5)
    once = state(pipe.backend.model)
    with caplog.at_level(logging.WARNING, logger="backdrop.diffusion.adapters"):
        pipe.fuse_lora(lora_scale=2.0)
    assert "fused already (at lora_scale 0.5)" in caplog.text
    assert_same(state(pipe.backend.model), once)


def test_unfusing_one_component_keeps_the_other_fused(pipe, files):
    # mutant A23: unfuse_lora(components=["text_encoder"]) unfused the UNet too
    pipe.load_lora_weights(files.peft, adapter_name="a")
    unet_before, text_before = split(state(pipe.backend.model))
    pipe.fuse_lora(lora_scale=0.5)
    unet_fused, text_fused = split(state(pipe.backend.model))
    assert any(not torch.equal(unet_fused[k], unet_before[k]) for k in unet_before)
    pipe.unfuse_lora(components=["text_encoder"])
    unet_now, text_now = split(state(pipe.backend.model))
    assert_same(unet_now, unet_fused)
    assert_same(text_now, text_before)
    with pytest.raises(ValueError, match=r"call unfuse_lora\(\) first"):  # the UNet's is still fused
        pipe.set_adapters("a", 0.3)


def test_stacked_adapters_keep_one_cpu_copy_of_each_weight(pipe, files):
    # mutant A30: each merged LoRA saved its own copy of weights an earlier one had saved (twice the memory)
    pipe.load_lora_weights(files.peft, adapter_name="a")
    pipe.load_lora_weights(files.other, adapter_name="b")
    pipe.set_adapters(["a", "b"], [0.5, 0.5])
    merged = pipe._adapters.merged
    targets = {t for f in merged for t in f.targets}
    assert len(merged) == 2 and sum(len(f.saved) for f in merged) == len(targets)


def test_get_list_adapters_lists_inactive_adapters_too(pipe, files, tmp_path):
    # mutant A31: only the active adapters listed (and save_pretrained then wrote inactive adapters' weights)
    pipe.load_lora_weights(files.peft, adapter_name="a")
    pipe.load_lora_weights(files.other, adapter_name="b")  # only b is active now, as in diffusers
    assert pipe.get_active_adapters() == ["b"]
    assert pipe.get_list_adapters() == {"unet": ["a", "b"], "text_encoder": ["a", "b"]}
    pipe.set_adapters([])
    with pytest.raises(ValueError, match="LoRA adapters a, b are loaded"):
        pipe.save_pretrained(tmp_path / "out")
