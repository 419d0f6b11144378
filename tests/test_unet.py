"""UNet: diffusers' UNet2DConditionModel holding the same random weights gives the same output.

Tiny SD1-shaped (1x1-conv projections, one head count) and SD2-shaped (Linear projections, per-level heads) configs
with 4 levels, 2 resnets a level and attention on three, so every layout rule runs: skip-channel bookkeeping on
the up path, head splitting, both projection orders, odd latent sides (13x10) that force the up path to land on
the skip sizes, 4- and 9-channel inputs, fractional timesteps. One test runs the full sd15-inpaint size.
"""
import os
from dataclasses import replace

import pytest
import torch

from backdrop.nn.config import PRESETS, UNetConfig
from backdrop.nn.testing import randomize_, rel_err
from backdrop.nn.unet import UNet

diffusers = pytest.importorskip("diffusers")

SD1_TINY = UNetConfig(block_out_channels=(32, 64, 64, 64), num_heads=(2, 2, 2, 2), layers_per_block=2,
                      cross_attention_dim=48, norm_num_groups=8, sample_size=16)
SD2_TINY = UNetConfig(block_out_channels=(32, 64, 64, 64), num_heads=(1, 2, 4, 4), layers_per_block=2,
                      cross_attention_dim=40, norm_num_groups=8, use_linear_projection=True, sample_size=16)
CONFIGS = {
    "sd1": SD1_TINY,
    "sd1-inpaint": replace(SD1_TINY, in_channels=9),
    "sd2": SD2_TINY,
    "sd2-inpaint": replace(SD2_TINY, in_channels=9),
}


def build_pair(cfg: UNetConfig, seed: int = 0):
    """(ours, reference) with the reference's random weights copied into ours by a strict load."""
    ref = diffusers.UNet2DConditionModel.from_config(cfg.to_diffusers()).eval()
    randomize_(ref, seed)
    ours = UNet(cfg).eval()
    missing = set(ref.state_dict()) ^ set(ours.state_dict())
    assert not missing, f"key sets differ: {sorted(missing)[:10]}"
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_diffusers(name):
    cfg = CONFIGS[name]
    ours, ref = build_pair(cfg)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, cfg.in_channels, 13, 10, generator=g)  # 13x10: neither side a multiple of 8
    ctx = torch.randn(2, 11, cfg.cross_attention_dim, generator=g)
    t = torch.tensor([3.75, 981.5])  # fractional, as Euler with linspace spacing passes
    with torch.no_grad():
        want = ref(x, t, ctx).sample
        got = ours(x, t, ctx)
    assert got.shape == (2, cfg.out_channels, 13, 10)
    assert want.abs().max() > 0.1  # the reference computes something non-trivial
    assert rel_err(got, want) < 1e-4


def test_timestep_forms():
    """Scalars (int, float, 0-dim) and (1,) broadcast over the batch exactly as a full (B,) tensor does, and a
    float scalar means the same fractional timestep to both implementations."""
    ours, ref = build_pair(SD1_TINY, seed=3)
    x, ctx = torch.randn(3, 4, 8, 8), torch.randn(3, 5, 48)
    with torch.no_grad():
        full = ours(x, torch.full((3,), 250.5), ctx)
        for t in (250.5, torch.tensor(250.5), torch.tensor([250.5])):
            assert torch.equal(ours(x, t, ctx), full)
        assert torch.equal(ours(x, 250, ctx), ours(x, torch.tensor([250, 250, 250]), ctx))
        assert rel_err(full, ref(x, 250.5, ctx).sample) < 1e-4
        assert rel_err(ours(x, 250, ctx), full) > 1e-6  # the half step is not rounded away


def test_gradient_checkpointing_same_gradients():
    cfg = SD2_TINY
    ours = UNet(cfg).train()
    randomize_(ours, seed=5)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 8, 8, generator=g, requires_grad=True)
    ctx = torch.randn(2, 6, cfg.cross_attention_dim, generator=g)
    t = torch.tensor([10.0, 700.0])

    def grads():
        ours.zero_grad(set_to_none=True)
        x.grad = None
        ours(x, t, ctx).square().mean().backward()
        return [x.grad.clone()] + [p.grad.clone() for p in ours.parameters()]

    plain = grads()
    # Count resnet calls: with checkpointing each one runs again during backward, so it truly recomputes (a
    # pre-hook: the recomputation stops early, once it has regenerated the tensors backward needs).
    calls = []
    ours.down_blocks[0].resnets[0].register_forward_pre_hook(lambda *_: calls.append(1))
    ours.gradient_checkpointing = True
    checkpointed = grads()
    assert len(calls) == 2
    assert len(plain) == len(checkpointed)
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def test_triton_kernels_take_our_layouts(monkeypatch):
    """The model hands the Triton kernels (interpreted on a CPU machine) strided q/k/v views and NCHW maps; forward
    and backward must give what the torch reference gives. A 2-level config keeps the interpreter to a few seconds."""
    cfg = UNetConfig(block_out_channels=(32, 64), num_heads=(2, 4), attention_levels=(True, True),
                     layers_per_block=1, cross_attention_dim=48, norm_num_groups=8)
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no CUDA and no TRITON_INTERPRET=1 (tests/conftest.py sets it for a whole session)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ours = UNet(cfg)
    randomize_(ours, seed=11)
    ours.to(device)
    x, ctx = torch.randn(1, 4, 6, 5, device=device), torch.randn(1, 7, 48, device=device)
    weight = torch.randn(1, 4, 6, 5, device=device)

    def run(impl):
        monkeypatch.setenv("BACKDROP_KERNELS", impl)
        ours.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        out = ours(xi, 3.5, ctx)
        (out * weight).sum().backward()
        return out.detach(), xi.grad, {n: p.grad.clone() for n, p in ours.named_parameters()}

    want, want_dx, want_grads = run("torch")
    got, got_dx, got_grads = run("triton")
    assert rel_err(got, want) < 1e-3  # fp32 on a GPU runs 3xTF32 dots; a layout bug is off by O(1)
    assert rel_err(got_dx, want_dx) < 1e-3
    worst = max(rel_err(got_grads[n], g) for n, g in want_grads.items() if g.abs().max() > 0)
    assert worst < 1e-3, f"a parameter gradient differs by {worst:.2e} between kernels on and off"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_layer_norm_under_autocast(dtype):
    """The transformer blocks' LayerNorm stays 16-bit under autocast (CUDA's would write fp32): forward and
    backward equal the fp32 LayerNorm of the same 16-bit input within the dtype's rounding."""
    from backdrop.nn.layers import LayerNorm
    g = torch.Generator().manual_seed(0)
    ours, ref = LayerNorm(64), torch.nn.LayerNorm(64)
    weight, bias = 1 + 0.3 * torch.randn(64, generator=g), 0.5 * torch.randn(64, generator=g)
    with torch.no_grad():
        for m in (ours, ref):
            m.weight.copy_(weight)
            m.bias.copy_(bias)
    x = (3.0 + torch.randn(2, 10, 64, generator=g)).to(dtype).requires_grad_()  # off-centre tokens
    dy = torch.randn(2, 10, 64, generator=g)
    with torch.autocast("cpu", dtype):
        y = ours(x)
    assert y.dtype == dtype
    (y.float() * dy).sum().backward()
    got = (y.float(), x.grad.float(), ours.weight.grad, ours.bias.grad)
    x.grad = None
    want_y = ref(x.float())
    (want_y * dy).sum().backward()
    want = (want_y, x.grad.float(), ref.weight.grad, ref.bias.grad)
    tol = {torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    for name, a, b in zip(("y", "dx", "dweight", "dbias"), got, want):
        assert rel_err(a, b) < tol, f"{name}: {rel_err(a, b):.2e}"


def test_bad_inputs_name_the_problem():
    ours = UNet(SD1_TINY).eval()
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 48)
    with pytest.raises(ValueError, match=r"sample must be \(B, 4, h, w\), got \(2, 9, 8, 8\)"):
        ours(torch.randn(2, 9, 8, 8), 1, ctx)
    with pytest.raises(ValueError, match=r"context must be \(2, L, 48\), got \(2, 5, 64\)"):
        ours(x, 1, torch.randn(2, 5, 64))
    with pytest.raises(ValueError, match=r"timestep must be .* got shape \(3,\)"):
        ours(x, torch.tensor([1, 2, 3]), ctx)


@pytest.mark.slow
def test_full_size_sd15_inpaint():
    """The real SD1.5-inpaint layout (~860M parameters, 9 input channels), random weights, at a 16x16 latent.

    Ours is built on the meta device and materialised once; diffusers' model takes the very same tensors
    (load_state_dict(assign=True)), so the two share memory and only one random fill is paid for."""
    cfg = PRESETS["sd15-inpaint"].unet
    with torch.device("meta"):
        ours = UNet(cfg)
        ref = diffusers.UNet2DConditionModel.from_config(cfg.to_diffusers())
    ours.to_empty(device="cpu").eval()
    randomize_(ours, seed=7)
    assert sum(p.numel() for p in ours.parameters()) > 850_000_000
    assert set(ours.state_dict()) == set(ref.state_dict())
    ref.load_state_dict(ours.state_dict(), strict=True, assign=True)
    ref.eval()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 9, 16, 16, generator=g)
    ctx = torch.randn(1, 77, 768, generator=g)
    with torch.no_grad():
        got = ours(x, 601, ctx)
        want = ref(x, 601, ctx).sample
    assert got.shape == (1, 4, 16, 16)
    assert rel_err(got, want) < 1e-4
