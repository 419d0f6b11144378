"""Original (lllyasviel cldm.py) ControlNet single files, read by nn/controlnet_ldm.py through load_controlnet.

- The original layout is written by a rename of this file's own, and proven the real one by diffusers' converter
  (convert_controlnet_checkpoint of the file gives back diffusers' state dict).
- Loaded from it, bare or under `control_model.` beside a full ControlLDM's other models, the ControlNet has the
  config the file was made from and computes what diffusers' ControlNetModel computes (SD1 and SD2 shapes).
- Bad input: one CheckpointError naming the file and the key.
"""
import re

import pytest
import torch
from safetensors.torch import save_file

from backdrop.nn.checkpoint import CheckpointError
from backdrop.nn.config import UNetConfig
from backdrop.nn.controlnet import ControlNetConfig, load_controlnet
from backdrop.nn.testing import randomize_, rel_err

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

# Tiny, but in the real layouts: 4 levels, 2 resnets a level, attention on 3, a 4-width hint encoder (8 convs,
# input_hint_block.0..14, as SD's). The file cannot say heads nor GroupNorm groups, so they are the family's: SD1
# (any cross-attention width but OpenCLIP's 1024) 8 heads a level and 1x1-conv proj_in; SD2 64-wide heads and
# Linear proj_in; 32 groups.


def tiny(family: str) -> ControlNetConfig:
    sd2 = family == "sd2"
    unet = UNetConfig(block_out_channels=(64, 128, 128, 128) if sd2 else (32, 64, 64, 64),
                      num_heads=(1, 2, 2, 2) if sd2 else (8, 8, 8, 8), layers_per_block=2,
                      cross_attention_dim=1024 if sd2 else 48, use_linear_projection=sd2)
    return ControlNetConfig(unet, conditioning_embedding_out_channels=(8, 16, 16, 32))


_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def to_ldm(sd: dict, cfg: ControlNetConfig) -> dict:
    """diffusers' ControlNetModel state dict -> cldm.py's names (openaimodel.py's flat input_blocks)."""
    per, last = cfg.unet.layers_per_block + 1, 4 * len(cfg.conditioning_embedding_out_channels) - 2
    rules = [
        (r"time_embedding\.linear_(\d)", lambda m: f"time_embed.{2 * int(m[1]) - 2}"),
        (r"conv_in", lambda m: "input_blocks.0.0"),
        (r"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)",
         lambda m: f"input_blocks.{1 + int(m[1]) * per + int(m[2])}.0.{_RESNET[m[3]]}"),
        (r"down_blocks\.(\d+)\.attentions\.(\d+)", lambda m: f"input_blocks.{1 + int(m[1]) * per + int(m[2])}.1"),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.conv", lambda m: f"input_blocks.{(int(m[1]) + 1) * per}.0.op"),
        (r"mid_block\.resnets\.(\d)\.(\w+)", lambda m: f"middle_block.{2 * int(m[1])}.{_RESNET[m[2]]}"),
        (r"mid_block\.attentions\.0", lambda m: "middle_block.1"),
        (r"controlnet_down_blocks\.(\d+)", lambda m: f"zero_convs.{m[1]}.0"),
        (r"controlnet_mid_block", lambda m: "middle_block_out.0"),
        (r"controlnet_cond_embedding\.conv_in", lambda m: "input_hint_block.0"),
        (r"controlnet_cond_embedding\.blocks\.(\d+)", lambda m: f"input_hint_block.{2 * int(m[1]) + 2}"),
        (r"controlnet_cond_embedding\.conv_out", lambda m: f"input_hint_block.{last}"),
    ]
    out = {}
    for key, t in sd.items():
        m, rename = next((m, f) for pattern, f in rules if (m := re.match(pattern + r"\.", key)))
        out[rename(m) + key[m.end() - 1:]] = t
    return out


_REFS = {}


def reference(family: str):
    """(config, diffusers' ControlNetModel with random weights, its state dict in cldm.py's names)."""
    if family not in _REFS:
        from diffusers import ControlNetModel
        cfg = tiny(family)
        ref = ControlNetModel.from_config(cfg.to_diffusers()).eval()
        randomize_(ref)
        _REFS[family] = cfg, ref, to_ldm(ref.state_dict(), cfg)
    return _REFS[family]


def write(tmp_path, tensors: dict, name: str = "control.safetensors"):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / name))
    return tmp_path / name


def cldm(ldm: dict) -> dict:
    """A full ControlLDM checkpoint: the ControlNet under control_model., beside (a few keys of) the SD model it
    was trained with and the DDPM buffers."""
    junk = {"model.diffusion_model.input_blocks.0.0.weight": torch.randn(32, 4, 3, 3),
            "first_stage_model.encoder.conv_in.weight": torch.randn(8, 3, 3, 3),
            "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None],
            "betas": torch.rand(1000), "alphas_cumprod": torch.rand(1000)}
    return {"control_model." + k: t for k, t in ldm.items()} | junk


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_the_written_layout_is_diffusers_converters(family):
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
    cfg, ref, ldm = reference(family)
    want = ref.state_dict()
    for ckpt in (ldm, {"control_model." + k: t for k, t in ldm.items()}):
        got = convert_controlnet_checkpoint(dict(ckpt), cfg.to_diffusers())
        assert sorted(got) == sorted(want)
        assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("family,layout", [("sd1", "bare"), ("sd1", "cldm"), ("sd2", "bare"), ("sd2", "cldm")])
def test_loads_and_matches_diffusers(tmp_path, family, layout):
    cfg, ref, ldm = reference(family)
    net = load_controlnet(write(tmp_path, ldm if layout == "bare" else cldm(ldm)))
    assert net.cfg == cfg
    g = torch.Generator().manual_seed(1)
    x, cond = torch.randn(2, 4, 16, 16, generator=g), torch.rand(2, 3, 128, 128, generator=g)
    ctx, t = torch.randn(2, 7, cfg.unet.cross_attention_dim, generator=g), torch.tensor([10, 700])
    with torch.no_grad():
        down, mid = net(x, t, ctx, cond, conditioning_scale=0.7)
        want_down, want_mid = ref(x, t, ctx, cond, conditioning_scale=0.7, return_dict=False)
    assert len(down) == len(want_down) == 12
    for a, b in zip([*down, mid], [*want_down, want_mid]):
        assert rel_err(a, b) < 1e-4


def test_pickle_refused_unless_allowed(tmp_path):
    cfg, ref, ldm = reference("sd1")
    path = tmp_path / "control_sd15_canny.pth"
    torch.save({"state_dict": cldm(ldm)}, path)  # a Lightning checkpoint, as the original training wrote
    with pytest.raises(CheckpointError, match="(?s)" + re.escape(f"{path}: pickle") + ".*allow_pickle=True"):
        load_controlnet(path)
    net = load_controlnet(path, dtype=torch.float64, allow_pickle=True)
    assert net.cfg == cfg and net.controlnet_mid_block.weight.dtype == torch.float64
    assert torch.equal(net.controlnet_mid_block.weight.float(), ref.controlnet_mid_block.weight)


def _error(tmp_path, tensors) -> str:
    path = write(tmp_path, tensors)
    with pytest.raises(CheckpointError) as e:
        load_controlnet(path)
    assert str(e.value).startswith(str(path))
    return str(e.value)


def test_missing_key(tmp_path):
    full = cldm(reference("sd1")[2])
    del full["control_model.zero_convs.3.0.weight"]
    assert re.search(r"1 missing: control_model\.zero_convs\.3\.0\.weight($|;)", _error(tmp_path, full))


def test_unexpected_keys(tmp_path):
    full = cldm(reference("sd1")[2]) | {"control_model.zero_convs.12.0.weight": torch.zeros(64, 64, 1, 1),
                                        "lora_unet_x.alpha": torch.ones(())}  # only known models' keys are skipped
    msg = _error(tmp_path, full)
    assert "2 unexpected" in msg and "control_model.zero_convs.12.0.weight" in msg and "lora_unet_x.alpha" in msg


def test_wrong_shape(tmp_path):
    ldm = dict(reference("sd1")[2])
    ldm["middle_block_out.0.weight"] = torch.zeros(64, 32, 1, 1)
    msg = _error(tmp_path, ldm)
    assert "wrong shape: middle_block_out.0.weight: file (64, 32, 1, 1) vs model (64, 64, 1, 1)" in msg


def test_bad_hint_block(tmp_path):
    ldm = {k: t for k, t in reference("sd1")[2].items() if not k.startswith("input_hint_block.14.")}
    assert "input_hint_block convs [0, 2, 4, 6, 8, 10, 12]" in _error(tmp_path, ldm)


@pytest.mark.parametrize("what,tensors", [
    ("a UNet", {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3),
                "model.diffusion_model.out.2.weight": torch.zeros(4, 32, 3, 3)}),
    ("a LoRA", {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)}),
    ("a diffusers ControlNetModel's weights", {"controlnet_cond_embedding.conv_in.weight": torch.zeros(8, 3, 3, 3),
                                               "conv_in.weight": torch.zeros(32, 4, 3, 3)}),
])
def test_not_a_controlnet(tmp_path, what, tensors):
    msg = _error(tmp_path, tensors)
    assert "not a ControlNet: it has no input_hint_block.0.weight" in msg and f"it holds {what}" in msg
