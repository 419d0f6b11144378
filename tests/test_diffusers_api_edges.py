"""Edges of diffusion/diffusers_api.py (diffusers' pipeline switches and loaders on Pipeline) that the pipeline tests
leave open, found by mutation testing (round 4): the VAE slicing switches, save_pretrained's refusals, and what
from_single_file and load_lora_weights(weight_name=) say about links and pickles."""
import pytest
import torch

from backdrop.diffusion.pipeline import Pipeline
from backdrop.nn.checkpoint import CheckpointError, init_model, save_model

pytestmark = [pytest.mark.usefixtures("one_thread")]  # conftest.py


@pytest.fixture(scope="module")
def pipe(tmp_path_factory, one_thread):
    folder = save_model(init_model("tiny", seed=1), tmp_path_factory.mktemp("api-edges") / "model")
    return Pipeline.from_pretrained(folder, device="cpu", dtype=torch.float32)


def test_the_vae_slicing_switches_reach_the_vae(pipe):
    # mutants D08, D09: enable_vae_slicing / disable_vae_slicing did nothing (slicing changes no numbers)
    vae = pipe.backend.model.vae
    try:
        pipe.enable_vae_slicing()
        assert vae.use_slicing is True
        pipe.disable_vae_slicing()
        assert vae.use_slicing is False
    finally:
        vae.use_slicing = False


def test_save_pretrained_refuses_a_variant_and_pickles(pipe, tmp_path):
    # mutants D07, D12: variant="fp16" wrote plain names in the pipeline's dtype; safe_serialization=None was taken
    with pytest.raises(ValueError, match="save_pretrained: variant='fp16': the weights are saved under their plain "
                                         "names"):
        pipe.save_pretrained(tmp_path / "a", variant="fp16")
    with pytest.raises(ValueError, match=r"only .safetensors files are written \(safe_serialization=True\)"):
        pipe.save_pretrained(tmp_path / "b", safe_serialization=None)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_an_original_config_link_is_refused_by_name(tmp_path):
    # mutant D02: original_config="https://..." read as a local path (a FileNotFoundError about no such file)
    with pytest.raises(ValueError, match=r"original_config=https://example.com/v2-inference-v.yaml is a link; "
                                         "Backdrop does not download"):
        Pipeline.from_single_file(tmp_path / "m.safetensors", original_config="https://example.com/v2-inference-v.yaml")


def test_a_pickled_lora_by_weight_name_is_refused_without_offering_allow_pickle(pipe, tmp_path):
    # mutants D10, D10b: load_lora_weights(folder, weight_name="x.bin") offered allow_pickle=True, which it does
    # not take
    torch.save({"x": torch.zeros(1)}, tmp_path / "lora.bin")
    with pytest.raises(CheckpointError, match="pickle checkpoints can run arbitrary code") as e:
        pipe.load_lora_weights(tmp_path, weight_name="lora.bin")
    assert "allow_pickle" not in str(e.value) and pipe.get_list_adapters() == {}
