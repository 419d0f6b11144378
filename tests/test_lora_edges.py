"""Mutation-testing gaps in nn/lora.py."""
import pytest
import torch

from backdrop.nn.checkpoint import CheckpointError, init_model
from backdrop.nn.config import PRESETS
from backdrop.nn.lora import fuse_lora

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

CONV = "down_blocks.0.resnets.0.conv1"  # a 3x3 conv of the tiny UNet


@pytest.fixture(scope="module")
def model():
    return init_model(PRESETS["tiny"], seed=0)


def test_a_linear_lora_for_a_3x3_conv_is_a_shape_error_naming_its_keys(model):
    """A LoRA pair without the conv's 3x3 kernel (a Linear's (rank, in) down) does not fit it: one CheckpointError
    naming the keys, not a torch view error from the merge. (L03)"""
    w = model.unet.get_parameter(f"{CONV}.weight")
    assert w.shape[2:] == (3, 3)
    before = w.detach().clone()
    sd = {f"unet.{CONV}.lora_A.weight": torch.randn(4, w.shape[1]),
          f"unet.{CONV}.lora_B.weight": torch.randn(w.shape[0], 4)}
    shape = rf"1 with the wrong shape: unet.{CONV}.lora_A.weight \(4, {w.shape[1]}\)"
    with pytest.raises(CheckpointError, match=shape):
        fuse_lora(model, sd)
    assert torch.equal(w, before)


def test_one_file_with_two_loras_for_one_weight_is_refused(model):
    """The same weight under its diffusers and its kohya name in one file (a botched conversion) would merge twice:
    refused, naming the weight and both keys. (L07)"""
    w = model.unet.get_parameter(f"{CONV}.weight")
    before = w.detach().clone()
    down, up = torch.randn(4, w.shape[1], 3, 3), torch.randn(w.shape[0], 4, 1, 1)
    flat = CONV.replace(".", "_")
    sd = {f"unet.{CONV}.lora_A.weight": down, f"unet.{CONV}.lora_B.weight": up,
          f"lora_unet_{flat}.lora_down.weight": down, f"lora_unet_{flat}.lora_up.weight": up}
    with pytest.raises(CheckpointError, match=rf"a second LoRA for unet.{CONV}.weight, after "):
        fuse_lora(model, sd)
    assert torch.equal(w, before)


def test_an_alpha_pattern_matches_whole_dotted_names_only(model, tmp_path):
    """PEFT's alpha_pattern key "in" names modules called `in` (or ending in `.in`), not `proj_in`: that one keeps
    lora_alpha (get_pattern_key's (.*\\.)?key$). (L13)"""
    import json

    from safetensors.torch import save_file

    name = "mid_block.attentions.0.proj_in"
    w = model.unet.get_parameter(f"{name}.weight")
    before = w.detach().clone()
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(4, w.shape[1], generator=g), torch.randn(w.shape[0], 4, generator=g)
    meta = {"lora_adapter_metadata": json.dumps({"unet.lora_alpha": 4, "unet.alpha_pattern": {"in": 16}})}
    save_file({f"unet.{name}.lora_A.weight": down, f"unet.{name}.lora_B.weight": up}, tmp_path / "l.safetensors",
              metadata=meta)
    from backdrop.nn.lora import unfuse_lora

    fused = fuse_lora(model, str(tmp_path / "l.safetensors"))
    try:
        want = before.float() + (up @ down).view(w.shape) * (4 / 4)
        torch.testing.assert_close(w.detach().float(), want)
    finally:
        unfuse_lora(fused)
    assert torch.equal(w, before)
