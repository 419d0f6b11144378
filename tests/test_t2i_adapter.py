"""T2I-Adapter (nn/t2i_adapter.py, UNet.forward's down_intrablock_additional_residuals): diffusers' T2IAdapter saved
with random weights loads strictly and gives the same features, and diffusers' UNet2DConditionModel on the same
weights gives the same output with them (alone, with ControlNet residuals too, odd latent sizes, fewer features
than levels, levels with and without cross-attention); every bad input is named."""
from dataclasses import replace

import pytest
import torch

from backdrop.nn.config import UNetConfig
from backdrop.nn.ldm_keys import CheckpointError, MissingFile
from backdrop.nn.t2i_adapter import T2IAdapter, T2IAdapterConfig, load_t2i_adapter
from backdrop.nn.testing import randomize_, rel_err
from backdrop.nn.unet import UNet

diffusers = pytest.importorskip("diffusers")
pytestmark = [pytest.mark.usefixtures("one_thread"),  # conftest.py
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

SD1 = UNetConfig(block_out_channels=(32, 64, 64, 64), num_heads=(2, 2, 2, 2), layers_per_block=2,
                 cross_attention_dim=48, norm_num_groups=8, sample_size=16)
SD2 = replace(SD1, num_heads=(1, 2, 4, 4), cross_attention_dim=40, use_linear_projection=True)
# no cross-attention in level 0 (it has a downsampler) nor 3: both of diffusers' placements, before and after one
MIXED = replace(SD1, attention_levels=(False, True, True, False))
FULL = T2IAdapterConfig(3, (32, 64, 64, 64), 2, 8, "full_adapter")
LIGHT = T2IAdapterConfig(1, (32, 64, 64), 3, 8, "light_adapter")  # 1 channel, as the canny / sketch adapters
KINDS = {"full": FULL, "light": LIGHT}


def diffusers_adapter(cfg: T2IAdapterConfig, seed: int = 0):
    ref = diffusers.T2IAdapter(cfg.in_channels, list(cfg.channels), cfg.num_res_blocks, cfg.downscale_factor,
                               cfg.adapter_type).eval()
    randomize_(ref, seed)
    return ref


def unet_pair(cfg: UNetConfig, seed: int = 3):
    """diffusers' UNet with random weights, and ours holding them (as tests/test_controlnet.py)."""
    ref = diffusers.UNet2DConditionModel.from_config(cfg.to_diffusers()).eval()
    randomize_(ref, seed)
    ours = UNet(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def unet_inputs(cfg: UNetConfig, h: int = 13, w: int = 10, b: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 4, h, w, generator=g), torch.tensor([3.75, 981.5])[:b], \
        torch.randn(b, 11, cfg.cross_attention_dim, generator=g)


def control(cfg: T2IAdapterConfig, h: int = 13, w: int = 10, b: int = 2, seed: int = 2):
    return torch.rand(b, cfg.in_channels, 8 * h, 8 * w, generator=torch.Generator().manual_seed(seed))


def skip_shapes(unet: UNet, x, t, ctx):
    """(the mid block output's shape, the skips' shapes): what ControlNet residuals must have."""
    from backdrop.nn.unet import encode, time_embedding
    mid, skips = encode(unet.down_blocks, unet.mid_block, unet.conv_in(x), time_embedding(unet, t, x), ctx, False)
    return mid.shape, [s.shape for s in skips]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{kind: (folder, diffusers T2IAdapter)}, saved with diffusers' save_pretrained."""
    out = {}
    for i, (kind, cfg) in enumerate(KINDS.items()):
        ref = diffusers_adapter(cfg, seed=10 + i)
        folder = tmp_path_factory.mktemp(f"adapter-{kind}")
        ref.save_pretrained(folder)
        out[kind] = (folder, ref)
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_features_equal_diffusers(saved, kind):
    folder, ref = saved[kind]
    ours = load_t2i_adapter(folder)
    assert ours.cfg == KINDS[kind] and not ours.training
    assert set(ours.state_dict()) == set(ref.state_dict())
    x = control(KINDS[kind])  # 104x80: odd halvings from 13x10 on (AvgPool's ceil_mode)
    with torch.no_grad():
        want, got = ref(x), ours(x)
    assert [tuple(f.shape) for f in got] == [tuple(f.shape) for f in want] == [
        (2, c, s, t) for c, (s, t) in zip(KINDS[kind].feature_channels, [(13, 10), (7, 5), (4, 3), (2, 2)])]
    assert max(rel_err(a, b) for a, b in zip(got, want)) < 1e-5


@pytest.mark.parametrize("unet_name,kind,count,controlnet", [
    ("sd1", "full", 4, False), ("sd1", "light", 4, True), ("sd1", "full", 2, False), ("sd2", "light", 4, False)])
def test_unet_with_adapter_features_equals_diffusers(saved, unet_name, kind, count, controlnet):
    """13x10 latents; the first `count` features only (diffusers pops them in order); optionally with ControlNet
    residuals as well."""
    cfg = SD2 if unet_name == "sd2" else SD1
    unet, ref = unet_pair(cfg)
    x, t, ctx = unet_inputs(cfg)
    with torch.no_grad():
        features = [f * 0.8 for f in load_t2i_adapter(saved[kind][0])(control(KINDS[kind]))][:count]
        extra = {}
        if controlnet:
            g = torch.Generator().manual_seed(4)
            mid, skips = skip_shapes(unet, x, t, ctx)
            extra = dict(down_block_additional_residuals=[torch.randn(s, generator=g) * 0.5 for s in skips],
                         mid_block_additional_residual=torch.randn(mid, generator=g) * 0.5)
        want = ref(x, t, ctx, down_intrablock_additional_residuals=[f.clone() for f in features], **extra).sample
        got = unet(x, t, ctx, down_intrablock_additional_residuals=features, **extra)
        plain = unet(x, t, ctx, **extra)
    assert rel_err(got, want) < 1e-4 and rel_err(plain, want) > 1e-2
    assert len(features) == count  # ours does not consume the caller's list as diffusers does


@pytest.mark.parametrize("count", [4, 1])
@pytest.mark.parametrize("controlnet", [False, True])
def test_levels_without_cross_attention_equal_diffusers(count, controlnet):
    """MIXED level 0 has no cross-attention but a downsampler: its residual is added after it, at half size
    (which no adapter's feature 0 has: diffusers fails there too, as ours refuses it by name)."""
    unet, ref = unet_pair(MIXED)
    x, t, ctx = unet_inputs(MIXED)
    g = torch.Generator().manual_seed(5)
    residuals = [torch.randn(s, generator=g) for s in [(2, 32, 7, 5), (2, 64, 7, 5), (2, 64, 4, 3), (2, 64, 2, 2)]]
    residuals = residuals[:count]
    extra = {}
    if controlnet:
        mid, skips = skip_shapes(unet, x, t, ctx)
        extra = dict(down_block_additional_residuals=[torch.randn(s, generator=g) * 0.5 for s in skips],
                     mid_block_additional_residual=torch.randn(mid, generator=g) * 0.5)
    with torch.no_grad():
        want = ref(x, t, ctx, down_intrablock_additional_residuals=list(residuals), **extra).sample
        got = unet(x, t, ctx, down_intrablock_additional_residuals=tuple(residuals), **extra)
        plain = unet(x, t, ctx, **extra)
    assert rel_err(got, want) < 1e-4 and rel_err(plain, want) > 1e-2


def test_where_encode_adds_the_features():
    """Level 1 (cross-attention): to its last (resnet, attention) output, which is kept as a skip and downsampled.
    Level 3 (none, no downsampler): to its output, and so to its last skip, the same tensor (diffusers adds it in
    place; the parity tests above fail without it)."""
    from backdrop.nn.unet import encode, time_embedding

    unet = UNet(SD1).eval()
    x, t, ctx = unet_inputs(SD1)
    g = torch.Generator().manual_seed(6)
    r1, r3 = torch.randn(2, 64, 7, 5, generator=g), torch.randn(2, 64, 2, 2, generator=g)
    with torch.no_grad():
        emb, h0 = time_embedding(unet, t, x), unet.conv_in(x)
        mid0, plain = encode(unet.down_blocks, unet.mid_block, h0, emb, ctx, False)
        _, at1 = encode(unet.down_blocks, unet.mid_block, h0, emb, ctx, False, [torch.zeros(2, 32, 13, 10), r1])
        mid3, at3 = encode(unet.down_blocks, unet.mid_block, h0, emb, ctx, False, [torch.zeros(2, 32, 13, 10),
                           torch.zeros(2, 64, 7, 5), torch.zeros(2, 64, 4, 3), r3])
    # skips: conv_in, level 0's two (resnet, attention) and its downsampler, level 1's (at 4, 5, 6), ...
    assert all(torch.equal(a, b) for a, b in zip(at1[:5], plain[:5])) and torch.equal(at1[5], plain[5] + r1)
    assert rel_err(at1[6], plain[6]) > 1e-2
    assert all(torch.equal(a, b) for a, b in zip(at3[:-1], plain[:-1])) and torch.equal(at3[-1], plain[-1] + r3)
    assert rel_err(mid3, mid0) > 1e-2


# ------------------------------------------------------------------------------------------------- bad inputs

def test_configs_refused_by_name():
    base = diffusers.T2IAdapter(3, [32, 64], 1, 8).config
    cfg = dict(base, _class_name="T2IAdapter")
    assert T2IAdapterConfig.from_diffusers(cfg) == T2IAdapterConfig(3, (32, 64), 1, 8)
    with pytest.raises(ValueError, match=r"a/config.json: .*'full_adapter_xl' is an SDXL T2I-Adapter: not supported"):
        T2IAdapterConfig.from_diffusers(dict(cfg, adapter_type="full_adapter_xl"), "a/config.json")
    with pytest.raises(ValueError, match=r"a/config.json: .*adapter_type 'medium_adapter' is not supported"):
        T2IAdapterConfig.from_diffusers(dict(cfg, adapter_type="medium_adapter"), "a/config.json")
    with pytest.raises(ValueError, match=r"a/config.json: _class_name 'MultiAdapter': give each adapter's own "
                                         r"T2IAdapter folder"):
        T2IAdapterConfig.from_diffusers(dict(cfg, _class_name="MultiAdapter"), "a/config.json")
    with pytest.raises(ValueError, match=r"a/config.json: _class_name 'ControlNetModel': not a T2IAdapter"):
        T2IAdapterConfig.from_diffusers(dict(cfg, _class_name="ControlNetModel"), "a/config.json")
    with pytest.raises(ValueError, match=r"a/config.json: T2IAdapterConfig: num_res_blocks = 'two' is not"):
        T2IAdapterConfig.from_diffusers(dict(cfg, num_res_blocks="two"), "a/config.json")


def test_load_refuses_bad_folders_and_files(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "adapter"
    diffusers_adapter(T2IAdapterConfig(3, (32, 64), 1, 8)).save_pretrained(folder)
    assert load_t2i_adapter(tmp_path).cfg.channels == (32, 64)  # a model folder with adapter/ inside
    weights = folder / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    save_file({k: v for k, v in state.items() if k != "adapter.body.1.in_conv.bias"}, str(weights))
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model.safetensors.*does not match a T2IAdapter of "
                                              r"its config.json: 1 missing: adapter.body.1.in_conv.bias"):
        load_t2i_adapter(folder)
    save_file(dict(state, **{"adapter.conv_in.weight": torch.zeros(32, 192, 1, 1)}), str(weights))
    with pytest.raises(CheckpointError, match=r"1 with the wrong shape: adapter.conv_in.weight"):
        load_t2i_adapter(folder)
    config = folder / "config.json"
    config.write_text(config.read_text().replace('"full_adapter"', '"full_adapter_xl"'))
    with pytest.raises(CheckpointError, match=r"adapter/config.json: .*SDXL T2I-Adapter: not supported"):
        load_t2i_adapter(folder)
    pth = tmp_path / "t2iadapter_canny_sd14v1.pth"
    pth.write_bytes(b"\x80\x02not really a pickle")
    with pytest.raises(CheckpointError, match=r"t2iadapter_canny_sd14v1.pth: a single file; .*diffusers T2IAdapter "
                                              r"folder .*TencentARC/t2iadapter_canny_sd15v2"):
        load_t2i_adapter(pth)
    with pytest.raises(MissingFile, match=r"gone: no such T2I-Adapter folder"):
        load_t2i_adapter(tmp_path / "gone")
    with pytest.raises(MissingFile, match=r"empty: not a T2I-Adapter folder \(no config.json\)"):
        (tmp_path / "empty").mkdir()
        load_t2i_adapter(tmp_path / "empty")
    config.write_text(config.read_text().replace('"full_adapter_xl"', '"full_adapter"'))
    weights.rename(folder / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model.bin: pickle checkpoints") as e:
        load_t2i_adapter(folder)
    assert "allow_pickle" not in str(e.value)  # no such option here


def test_forward_refuses_bad_sizes_and_residuals():
    adapter = T2IAdapter(T2IAdapterConfig(3, (32, 64, 64, 64), 1, 8))
    with pytest.raises(ValueError, match=r"the control image's size 100x80 \(HxW\) is not a multiple of the "
                                         r"adapter's downscale_factor 8"):
        adapter(torch.rand(1, 3, 100, 80))
    with pytest.raises(ValueError, match=r"the control image must be \(B, 3, H, W\), got \(1, 1, 104, 80\)"):
        adapter(torch.rand(1, 1, 104, 80))
    unet = UNet(SD1).eval()
    x, t, ctx = unet_inputs(SD1)
    good = [torch.zeros(2, 32, 13, 10), torch.zeros(2, 64, 7, 5), torch.zeros(2, 64, 4, 3), torch.zeros(2, 64, 2, 2)]
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"down_intrablock_additional_residuals\[1\] must have down level 1's "
                                             r"output shape \(2, 64, 7, 5\), got \(2, 64, 7, 6\)"):
            unet(x, t, ctx, down_intrablock_additional_residuals=[good[0], torch.zeros(2, 64, 7, 6)])
        with pytest.raises(ValueError, match=r"\[0\] must have down level 0's output shape \(2, 32, 13, 10\), got "
                                             r"\(1, 32, 13, 10\)"):
            unet(x, t, ctx, down_intrablock_additional_residuals=[good[0][:1]])
        with pytest.raises(ValueError, match=r"at most one per down level \(4\), got 5"):
            unet(x, t, ctx, down_intrablock_additional_residuals=good + good[-1:])
        with pytest.raises(ValueError, match=r"must be a list of tensors, one per down level from the first, got "
                                             r"Tensor"):
            unet(x, t, ctx, down_intrablock_additional_residuals=good[0])
        with pytest.raises(ValueError, match=r"must be a list of tensors, .*got a list of Tensor, float"):
            unet(x, t, ctx, down_intrablock_additional_residuals=[good[0], 0.5])
