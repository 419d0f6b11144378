"""Mutation-testing gaps in nn/resolve.py: which snapshot of a Hugging Face cache
entry is opened, which cache variable wins, and the default dtype / dtype parsing."""
import pytest
import torch

from backdrop.nn import resolve
from backdrop.nn.ldm_keys import MissingFile


def _entry(cache, name="models--acme--m", snapshots=("0123abc",), ref="0123abc"):
    entry = cache / name
    for s in snapshots:
        (entry / "snapshots" / s).mkdir(parents=True)
    if ref is not None:
        (entry / "refs").mkdir()
        (entry / "refs" / "main").write_text(ref)
    return entry


def test_a_ref_never_leads_out_of_the_snapshots(tmp_path):
    """refs/main holding a path ("../../elsewhere", a damaged or planted ref) is no commit: the one snapshot is
    used, never the path it points to. (R02)"""
    (tmp_path / "elsewhere").mkdir()
    entry = _entry(tmp_path / "hub", ref="0123abc/../../../../elsewhere")
    assert resolve.hub_snapshot(entry) == entry / "snapshots" / "0123abc"


def test_several_snapshots_and_no_ref_is_an_error_not_a_guess(tmp_path):
    """(R03)"""
    entry = _entry(tmp_path / "hub", snapshots=("aaa", "bbb"), ref=None)
    with pytest.raises(MissingFile, match=r"without a snapshot refs/main names \(2 in snapshots/\)"):
        resolve.hub_snapshot(entry)


def test_hf_hub_cache_wins_over_the_legacy_variable(tmp_path, monkeypatch):
    """huggingface_hub's order: HF_HUB_CACHE, then HUGGINGFACE_HUB_CACHE. (R04)"""
    new = _entry(tmp_path / "new")
    _entry(tmp_path / "old")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "new"))
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(tmp_path / "old"))
    assert resolve.resolve_model("acme/m") == new / "snapshots" / "0123abc"


def test_default_dtype_on_a_cpu_with_native_bf16(monkeypatch):
    """bf16 from SD's width (320) up, fp32 below it (overhead-bound tiny models) and without native bf16. (R06)"""
    monkeypatch.setattr(resolve, "_cpu_has_native_bf16", lambda: True)
    assert resolve.default_dtype("cpu", resolve.SMALL_UNET_WIDTH) == torch.bfloat16
    assert resolve.default_dtype("cpu", None) == torch.bfloat16
    assert resolve.default_dtype("cpu", resolve.SMALL_UNET_WIDTH - 1) == torch.float32
    monkeypatch.setattr(resolve, "_cpu_has_native_bf16", lambda: False)
    assert resolve.default_dtype("cpu", 1280) == torch.float32


def test_parse_dtype_refuses_integer_torch_dtypes():
    """(R07)"""
    with pytest.raises(ValueError, match="dtype torch.int8 is not a floating-point type"):
        resolve.parse_dtype(torch.int8)
    assert resolve.parse_dtype(torch.float16) == torch.float16 and resolve.parse_dtype(None) is None


def test_a_cache_entry_given_as_a_path_resolves_to_its_snapshot(tmp_path):
    """resolve_model(models--org--name) is the snapshot (unet_width and the default dtype read its config). (R08)"""
    entry = _entry(tmp_path / "hub")
    assert resolve.resolve_model(entry) == entry / "snapshots" / "0123abc"


def test_unet_width_is_the_widest_level(tmp_path):
    """A UNet narrow at its first level but SD-wide deeper is a full-size model for the default dtype. (R09)"""
    import json

    (tmp_path / "m" / "unet").mkdir(parents=True)
    (tmp_path / "m" / "unet" / "config.json").write_text(json.dumps({"block_out_channels": [256, 512, 1024]}))
    assert resolve.unet_width(tmp_path / "m") == 1024
