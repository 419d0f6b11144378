"""Model folders as the Hugging Face hub and its cache hold them (nn/checkpoint.py, nn/resolve.py, nn/weight_files.py):
another model family is refused by its name, parts of a folder that are not used and an LCM scheduler are said, a
cache entry or repo id opens its snapshot, a link whose blob is gone is named, and the diffusers loading snippet
works as far as it asks for what Backdrop does."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from backdrop.diffusion.pipeline import Pipeline
from backdrop.nn.checkpoint import CheckpointError, MissingFile, init_model, load_model, save_model


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_model(init_model("tiny", seed=3), tmp_path_factory.mktemp("hub") / "model")


def copied(folder, to, index=None, scheduler=None):
    shutil.copytree(folder, to)
    for name, change in (("model_index.json", index), ("scheduler/scheduler_config.json", scheduler)):
        if change:
            data = json.loads((to / name).read_text())
            (to / name).write_text(json.dumps({**data, **change}))
    return to


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.unet.state_dict().values(), b.unet.state_dict().values()))


def test_other_families_are_refused_by_name_and_unused_parts_said(folder, tmp_path, caplog):
    """An SDXL folder was refused on its first unsupported config key ('addition_embed_type ... implements None'),
    a Kandinsky one as 'has no vae/' (a broken download?); a ControlNet pipeline's folder loaded with its
    controlnet/ silently unused (Pipeline.from_pretrained loads it now: tests/test_controlnet.py), an IP-Adapter's
    image_encoder/ too, and an LCM folder ran dpmpp-2m at 30 steps, with no hint."""
    for name, what in (("StableDiffusionXLPipeline", "an SDXL model"), ("KandinskyV22Pipeline", "a Kandinsky model"),
                       ("StableDiffusionUpscalePipeline", "an upscaler")):
        bad = copied(folder, tmp_path / name, index={"_class_name": name})
        with pytest.raises(CheckpointError, match=rf"{what} \({name}, model_index.json\); Backdrop runs Stable "
                                                  r"Diffusion 1.x/2.x"):
            load_model(bad)
    extra = copied(folder, tmp_path / "controlnet", index={"_class_name": "StableDiffusionControlNetPipeline",
                                                           "controlnet": ["diffusers", "ControlNetModel"],
                                                           "image_encoder": ["transformers", "CLIPVisionModel"],
                                                           "feature_extractor": [None, None]},
                   scheduler={"_class_name": "LCMScheduler"})
    with caplog.at_level("WARNING", logger="backdrop.nn.checkpoint"):
        assert same(load_model(extra), load_model(folder))
    assert "image_encoder/ not used (Backdrop runs the UNet, VAE and text encoder of " \
        "StableDiffusionControlNetPipeline)" in caplog.text and "controlnet/" not in caplog.text
    assert 'its scheduler is LCMScheduler: an LCM model wants sampler="lcm"' in caplog.text


def hub_cache(folder, cache, name="models--acme--product-sd15"):
    """The layout huggingface_hub writes: blobs/ by hash, snapshots/<commit>/ of relative links, refs/main."""
    entry = cache / name
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            blob = entry / "blobs" / f"{abs(hash(path.read_bytes())):x}"
            blob.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, blob)
            link = entry / "snapshots" / "0123abc" / path.relative_to(folder)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("0123abc")
    return entry


def test_a_hub_cache_entry_or_repo_id_opens_its_snapshot(folder, tmp_path, monkeypatch):
    """The cache entry models--org--name (what `huggingface-cli download` prints) said 'not a model folder', the
    repo id 'no such file'; both are the snapshot refs/main names. A link whose blob was deleted is named."""
    entry = hub_cache(folder, tmp_path / "hub")
    want = load_model(folder)
    assert same(load_model(entry), want)
    (entry / "refs" / "main").write_text("")  # an empty ref: the one snapshot there (it named snapshots/ itself)
    assert same(load_model(entry), want)
    monkeypatch.setenv("SCRATCH", str(tmp_path))
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", "$SCRATCH/hub")  # the older variable, from an env file: expanded
    pipe = Pipeline.from_pretrained("acme/product-sd15", device="cpu", dtype="fp32")
    assert same(pipe.backend.model, want)
    with pytest.raises(MissingFile, match="'acme/other': no such file or folder, and not a built-in model"):
        Pipeline.from_pretrained("acme/other")  # a CheckpointError and a FileNotFoundError, as from load_model
    hub_cache(folder / "vae", tmp_path / "hub", "models--acme--vae-ft")  # a VAE-only repo, opened by its id
    assert load_model(folder, vae="acme/vae-ft").vae.cfg == want.vae.cfg  # was 'no such file or folder (the VAE)'
    with pytest.raises(CheckpointError, match="the VAE: model 'acme/vae-ft2': no such file or folder"):
        load_model(folder, vae="acme/vae-ft2")
    unet = entry / "snapshots" / "0123abc" / "unet" / "diffusion_pytorch_model.safetensors"
    unet.resolve().unlink()
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model.safetensors: a link whose target is gone"):
        load_model(entry)
    unet.unlink()  # a partial download
    with pytest.raises(MissingFile, match=r"unet: no weights: expected diffusion_pytorch_model.safetensors"):
        load_model(entry)


def test_the_model_card_snippet_and_an_fp16_variant_beside_full_pickles(folder, tmp_path, caplog):
    """from_pretrained(..., use_safetensors=True) asks for what Backdrop does: taken (variant=: see
    test_checkpoint_conventions). An fp16 variant read where the full-precision weights are a pickle (diffusers
    would read that) is said."""
    pipe = Pipeline.from_pretrained(folder, device="cpu", torch_dtype=torch.float32, use_safetensors=True)
    assert same(pipe.backend.model, load_model(folder))
    mixed = copied(folder, tmp_path / "mixed")
    unet = mixed / "unet"
    weights = load_file(unet / "diffusion_pytorch_model.safetensors")
    torch.save(weights, unet / "diffusion_pytorch_model.bin")
    save_model(init_model("tiny", seed=3, dtype=torch.float16), tmp_path / "half")
    shutil.copy(tmp_path / "half" / "unet" / "diffusion_pytorch_model.safetensors",
                unet / "diffusion_pytorch_model.fp16.safetensors")
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    with caplog.at_level("WARNING", logger="backdrop.nn.weight_files"):
        load_model(mixed)
    assert "reading the fp16 variant diffusion_pytorch_model.fp16.safetensors; the full-precision weights are in " \
           "diffusion_pytorch_model.bin, a pickle" in caplog.text


def test_a_folder_with_a_tensor_the_model_does_not_have_is_refused(folder, tmp_path):
    """Strict as single files are: a bigger or other UNet's extra blocks were dropped without a word."""
    extra = copied(folder, tmp_path / "extra")
    weights = extra / "unet" / "diffusion_pytorch_model.safetensors"
    save_file({**load_file(weights), "down_blocks.9.extra.weight": torch.zeros(3)}, str(weights))
    with pytest.raises(CheckpointError, match=r"1 unexpected: .*down_blocks\.9\.extra\.weight"):
        load_model(extra)
