"""Named LoRA adapters (diffusion/adapters.py): load_lora_weights(adapter_name=), set_adapters, delete_adapters,
disable_lora / enable_lora, fuse_lora / unfuse_lora and unload_lora_weights, call for call against diffusers'
pipeline as the oracle. diffusers adds each LoRA at run time; ours are merged into the weights, so after every call
the text encoder's and the UNet's outputs must agree, and the base weights must come back bit-exactly."""
import logging

import numpy as np
import pytest
import torch

from backdrop.diffusion.pipeline import Pipeline
from test_lora import assert_same, lora_files, peft_file, random_lora, state

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning"),
              pytest.mark.usefixtures("one_thread")]  # tests/conftest.py

PROMPT = "a red bottle"


@pytest.fixture(scope="module")
def files(tmp_path_factory, one_thread):
    from backdrop.nn.checkpoint import load_model
    files = lora_files(tmp_path_factory.mktemp("adapters"))
    files.other = peft_file(random_lora(load_model(files.folder), seed=5), files.root / "other.safetensors")
    return files


def outputs(pipe, ids) -> tuple[torch.Tensor, torch.Tensor]:
    """(text encoder output, UNet output) of ours (a Pipeline) or diffusers' pipeline, for one noisy latent."""
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500])
    with torch.no_grad():
        if isinstance(pipe, Pipeline):
            context = pipe.backend.model.text_encoder(ids)
            return context, pipe.backend.model.unet(x, t, context)
        context = pipe.text_encoder(ids)[0]
        return context, pipe.unet(x, t, encoder_hidden_states=context).sample


def agree(ours, theirs, base=None) -> None:
    ids = ours.backend.tokenizer([PROMPT])
    a, b = outputs(ours, ids), outputs(theirs, ids)
    assert (a[0] - b[0]).abs().max() <= 1e-4 and (a[1] - b[1]).abs().max() <= 1e-4
    if base is not None:  # the LoRAs at work: the test has teeth
        assert (a[1] - base[1]).abs().max() > 1e-2


@pytest.fixture
def both(files):
    import diffusers
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(files.folder, safety_checker=None,
                                                               feature_extractor=None, requires_safety_checker=False)
    return Pipeline.from_pretrained(files.folder, device="cpu", dtype=torch.float32), theirs


def test_adapter_calls_give_diffusers_outputs_and_names(files, both):
    ours, theirs = both
    base, weights = outputs(ours, ours.backend.tokenizer([PROMPT])), state(ours.backend.model)

    def call(method, *args, **kwargs):
        for pipe in (ours, theirs):
            getattr(pipe, method)(*args, **kwargs)
        assert ours.get_active_adapters() == theirs.get_active_adapters()

    call("load_lora_weights", str(files.peft), adapter_name="style")
    call("load_lora_weights", str(files.other))  # default_1; diffusers makes it the only active adapter
    assert ours.get_active_adapters() == ["default_1"]
    agree(ours, theirs, base)
    call("set_adapters", ["style", "default_1"], adapter_weights=[0.5, 1.2])
    agree(ours, theirs, base)
    call("set_adapters", "style", 0.8)
    agree(ours, theirs, base)
    call("disable_lora")
    agree(ours, theirs)
    assert_same(state(ours.backend.model), weights)
    call("enable_lora")
    agree(ours, theirs, base)
    call("set_adapters", ["style", "default_1"])
    call("delete_adapters", "style")
    assert ours.get_list_adapters() == theirs.get_list_adapters() == {"unet": ["default_1"],
                                                                      "text_encoder": ["default_1"]}
    agree(ours, theirs, base)
    call("disable_lora")
    call("load_lora_weights", str(files.peft), adapter_name="style")  # loaded while disabled: not merged yet
    agree(ours, theirs)
    call("enable_lora")
    agree(ours, theirs, base)
    call("set_adapters", ["default_1", "style"], [0.7, -0.4])
    unfused = state(ours.backend.model)
    call("fuse_lora", components=["unet"], lora_scale=0.5)  # the text encoder's LoRAs stay at their weights
    agree(ours, theirs, base)
    # diffusers 0.42's unfuse_lora leaves fuse_lora's lora_scale applied (PEFT's scale_layer is never undone:
    # an adapter fused at 0.5 then unfused runs at 0.5); ours goes back to what was there before fuse_lora
    ours.unfuse_lora()
    assert_same(state(ours.backend.model), unfused)


def test_fuse_then_unload_keeps_the_fused_loras_as_diffusers(files, both):
    """diffusers' recipe for speed: fuse_lora, then unload_lora_weights; the fused LoRAs stay in the weights."""
    ours, theirs = both
    base = outputs(ours, ours.backend.tokenizer([PROMPT]))
    for pipe in (ours, theirs):
        pipe.load_lora_weights(str(files.peft), adapter_name="style")
        pipe.load_lora_weights(str(files.other), adapter_name="other")
        pipe.set_adapters(["style", "other"], [0.8, 0.3])
        pipe.fuse_lora(lora_scale=0.6, adapter_names=["style"])
        pipe.unload_lora_weights()
    agree(ours, theirs, base)
    assert ours.get_list_adapters() == {} and not ours._adapters.merged  # nothing left to undo: no copies kept


def test_unload_restores_the_base_weights_bit_exactly_after_any_calls(files):
    pipe = Pipeline.from_pretrained(files.folder, device="cpu", dtype=torch.float32)
    base = state(pipe.backend.model)
    pipe.load_lora_weights(files.peft, lora_scale=0.7)
    pipe.load_lora_weights(files.other, adapter_name="b", lora_scale=-0.3)
    pipe.set_adapters(["default_0", "b"], [1.5, 0.5])
    pipe.fuse_lora(lora_scale=2.0)
    pipe.unfuse_lora()
    pipe.disable_lora()
    pipe.enable_lora()
    pipe.delete_adapters(["b"])
    pipe.unload_lora_weights()
    assert_same(state(pipe.backend.model), base)


def test_lora_scale_times_weight_is_what_is_merged(files):
    """Our lora_scale (diffusers has none at load) multiplies set_adapters' weight: 0.5 x 1.4 = 0.7 x 1."""
    a = Pipeline.from_pretrained(files.folder, device="cpu", dtype=torch.float32)
    b = Pipeline.from_pretrained(files.folder, device="cpu", dtype=torch.float32)
    a.load_lora_weights(files.peft, lora_scale=0.5)
    a.set_adapters("default_0", 1.4)
    b.load_lora_weights(files.peft, lora_scale=0.7)
    got, want = state(a.backend.model), state(b.backend.model)
    assert all((got[k] - want[k]).abs().max() <= 1e-6 for k in want)


def test_bad_adapter_calls_are_named_and_change_nothing(files):
    pipe = Pipeline.from_pretrained(files.folder, device="cpu", dtype=torch.float32)
    pipe.load_lora_weights(files.peft, adapter_name="a")
    pipe.load_lora_weights(files.other, adapter_name="b")
    pipe.set_adapters(["a", "b"])
    merged = state(pipe.backend.model)
    bad = [(lambda: pipe.load_lora_weights(files.other, adapter_name="a"), ValueError, "adapter name a is already "
            "in use"),
           (lambda: pipe.set_adapters(["a", "c"]), ValueError, "set_adapters: no adapter c; loaded: a, b"),
           (lambda: pipe.set_adapters(["a", "b"], [1.0]), ValueError, "2 adapter names but 1 adapter_weights"),
           (lambda: pipe.set_adapters("a", {"unet": 1.0}), ValueError, "weight of a is a dict"),
           (lambda: pipe.set_adapters("a", float("nan")), ValueError, "weight of a must be a finite number"),
           (lambda: pipe.set_adapters(["a", "a"]), ValueError, "names an adapter twice"),
           (lambda: pipe.delete_adapters("zz"), ValueError, "delete_adapters: no adapter zz"),
           (lambda: pipe.fuse_lora(components=["vae"]), ValueError, "components .'vae'.: LoRAs change unet and"),
           (lambda: pipe.load_lora_weights(files.peft, lora_scale="x"), ValueError, "lora_scale must be a finite"),
           (lambda: pipe.set_adapters(["a", "b"], [1.0, 1e38]), ValueError, "inf/NaN")]  # fp32 overflow
    for call, error, message in bad:
        with pytest.raises(error, match=message):
            call()
        assert_same(state(pipe.backend.model), merged)
        assert pipe.get_active_adapters() == ["a", "b"]
    pipe.fuse_lora(lora_scale=0.5)
    for change in (lambda: pipe.set_adapters("a"), lambda: pipe.delete_adapters("a"), pipe.disable_lora,
                   lambda: pipe.load_lora_weights(files.peft, adapter_name="c")):
        with pytest.raises(ValueError, match=r"call unfuse_lora\(\) first"):
            change()
    pipe.unfuse_lora()
    assert_same(state(pipe.backend.model), merged)


def test_an_adapter_whose_file_is_gone_leaves_plain_weights(files, tmp_path, caplog):
    """Every change merges the active adapters again from their files: one deleted meanwhile fails the change,
    and when the previous state cannot be merged again either, no adapter stays active (and the log says so)."""
    pipe = Pipeline.from_pretrained(files.folder, device="cpu", dtype=torch.float32)
    base = state(pipe.backend.model)
    gone = tmp_path / "gone.safetensors"
    gone.write_bytes(files.other.read_bytes())
    pipe.load_lora_weights(files.peft, adapter_name="a")
    pipe.load_lora_weights(gone, adapter_name="b")
    pipe.set_adapters(["a", "b"])
    gone.unlink()
    with caplog.at_level(logging.ERROR, logger="backdrop.diffusion.adapters"), \
            pytest.raises(FileNotFoundError, match="gone.safetensors: no such file"):
        pipe.set_adapters(["a", "b"], [0.5, 0.5])
    assert "could not be merged again" in caplog.text and pipe.get_active_adapters() == []
    assert_same(state(pipe.backend.model), base)
    pipe.set_adapters("a")  # the others still work
    pipe.delete_adapters("b")
    pipe.unload_lora_weights()
    assert_same(state(pipe.backend.model), base)


def test_weight_name_picks_the_file_in_a_folder(files, tmp_path):
    """diffusers' load_lora_weights(folder, weight_name=...) and load_textual_inversion(folder, weight_name=...)."""
    import shutil

    from safetensors.torch import save_file
    folder = tmp_path / "loras"
    folder.mkdir()
    shutil.copy(files.other, folder / "style.safetensors")
    a, b = (Pipeline.from_pretrained(files.folder, device="cpu", dtype=torch.float32) for _ in range(2))
    a.load_lora_weights(folder, weight_name="style.safetensors")
    b.load_lora_weights(files.other)
    assert_same(state(a.backend.model), state(b.backend.model))
    with pytest.raises(FileNotFoundError, match="a folder without nope.safetensors .it holds style.safetensors"):
        a.load_lora_weights(folder, weight_name="nope.safetensors")
    with pytest.raises(TypeError, match="weight_name='x' names a file in a folder or hub repo; the LoRA given is a "
                                        "dict"):
        a.load_lora_weights({}, weight_name="x")
    save_file({"<cat>": torch.randn(1, 64)}, str(folder / "cat.safetensors"))  # the tiny text encoder's width
    assert a.load_textual_inversion(folder, weight_name="cat.safetensors") == ["<cat>"]


def test_cli_stacks_every_lora_and_images_match_set_adapters(files, tmp_path, capsys):
    from PIL import Image

    from backdrop.cli import main
    argv = ["generate", "--model", files.folder, "--steps", "2", "--quiet", "--seed", "3", "--prompt", "a lamp",
            "--out", tmp_path, "--lora", f"{files.peft}:0.6", "--lora", f"{files.other}:-0.5"]
    assert main([str(a) for a in argv]) == 0
    got = np.asarray(Image.open(capsys.readouterr().out.split()[0]))
    pipe = Pipeline.from_pretrained(files.folder, device="cpu")
    pipe.load_lora_weights(files.peft, adapter_name="x")
    pipe.load_lora_weights(files.other, adapter_name="y")
    pipe.set_adapters(["x", "y"], [0.6, -0.5])
    assert np.array_equal(got, np.asarray(pipe.generate("a lamp", steps=2, seed=3, progress=False).images[0]))


def test_save_pretrained_writes_what_diffusers_opens_with_fused_loras_merged(files, tmp_path):
    """diffusers' recipe for baking a LoRA into a checkpoint: load, fuse_lora, unload_lora_weights, save_pretrained."""
    import diffusers
    pipe = Pipeline.from_pretrained(files.folder, device="cpu", dtype=torch.float32)
    pipe.load_lora_weights(files.peft, adapter_name="style")
    with pytest.raises(ValueError, match=r"LoRA adapters style are loaded, merged into the weights: "
                                         r"unload_lora_weights\(\) first, or fuse_lora\(\) then"):
        pipe.save_pretrained(tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    pipe.fuse_lora(lora_scale=0.5)
    pipe.unload_lora_weights()
    with pytest.raises(ValueError, match="only .safetensors"):
        pipe.save_pretrained(tmp_path / "out", safe_serialization=False)
    saved = pipe.save_pretrained(tmp_path / "out")
    again = Pipeline.from_pretrained(saved, device="cpu", dtype=torch.float32)
    assert_same(state(again.backend.model), state(pipe.backend.model))
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(saved, safety_checker=None, feature_extractor=None,
                                                               requires_safety_checker=False)
    agree(pipe, theirs, outputs(Pipeline.from_pretrained(files.folder, device="cpu", dtype=torch.float32),
                                pipe.backend.tokenizer([PROMPT])))
