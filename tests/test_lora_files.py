"""LoRA sources, file forms and failure modes beyond tests/test_lora.py (whose tiny model, random LoRA and helpers
this reuses): non-finite merges refused, one host copy per weight for a stack, hub repo ids, state dicts, UNet keys
without a prefix, LDM block names, SDXL and LyCORIS files named as such, bad alphas and rank-0 modules, `export onnx
--lora`, and the warnings (A1111 prompt tags, alpha 0, the same file twice, a pickle named .safetensors)."""
import hashlib
import json
import logging
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from backdrop.cli import main
from backdrop.diffusion import text
from backdrop.diffusion.pipeline import Pipeline
from backdrop.nn.checkpoint import CheckpointError, MissingFile, load_model
from backdrop.nn.ldm_keys import UNET, ldm_names
from backdrop.nn.lora import fuse_lora, unfuse_lora
from backdrop.nn.textual_inversion import load_textual_inversion
from test_hub_folders import hub_cache
from test_lora import SCALE, assert_same, lora_files, merged, state

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning"),
              pytest.mark.usefixtures("one_thread")]  # tests/conftest.py


@pytest.fixture(scope="module")
def files(tmp_path_factory, one_thread):
    return lora_files(tmp_path_factory.mktemp("lora-files"))


def kohya_tensors(files) -> dict[str, torch.Tensor]:
    return load_file(str(files.kohya))


def refused(model, source, *phrases, scale: float = SCALE) -> str:
    """fuse_lora's CheckpointError for `source`, checked to hold every phrase and to leave the model unchanged."""
    before = state(model)
    with pytest.raises(CheckpointError) as e:
        fuse_lora(model, source, scale)
    assert all(p in str(e.value) for p in phrases), str(e.value)
    assert_same(state(model), before)
    return str(e.value)


# ------------------------------------------------------------------------------- 1. non-finite merges

def test_a_non_finite_merge_is_refused_naming_keys_and_cause(files, tmp_path):
    """An inf in a file (an fp16 training overflow) made every later image black; so does a finite LoRA whose
    merge leaves fp16's range. The inf sits in the last module merged, so the refusal must undo earlier merges."""
    model = load_model(files.folder)
    last = fuse_lora(load_model(files.folder), files.kohya).targets[-1]  # "unet.<param>" of the last merge
    flat = "lora_" + ("unet_" if last.startswith("unet.") else "te_") + \
        last.partition(".")[2].removesuffix(".weight").replace(".", "_")
    tensors = kohya_tensors(files)
    tensors[f"{flat}.lora_up.weight"][0, 0] = math.inf
    save_file(tensors, str(tmp_path / "inf.safetensors"))
    refused(model, tmp_path / "inf.safetensors", "inf.safetensors: ", f"{flat}.lora_down.weight and "
            f"{flat}.lora_up.weight would make {last} inf/NaN (inf/NaN in the file")
    half = load_model(files.folder, dtype=torch.float16)
    refused(half, files.kohya, "kohya.safetensors: ", "inf/NaN (out of float16 range at scale 100000",
            scale=1e5)
    fuse_lora(half, files.kohya, 1e-3)  # a sane scale still merges


# ------------------------------------------------------------------------------- 2. one copy per weight

def test_a_stack_keeps_one_copy_of_each_weight_and_unloads_bit_exactly(files, tmp_path):
    """Each load kept a CPU copy of every weight it touched, so three LoCon LoRAs on SD1.5 held ~5 GB of copies of
    the same originals. Now the second LoRA over the same layers saves nothing but the weights new to the stack."""
    pipe = Pipeline.from_pretrained(files.folder, device="cpu", dtype=torch.float32)
    before, fc1 = state(pipe.backend.model), "text_model.encoder.layers.0.mlp.fc1.weight"  # one weight more
    out, width = pipe.backend.model.text_encoder.get_parameter(fc1).shape
    flat = "lora_te_text_model_encoder_layers_0_mlp_fc1"
    extra = {**kohya_tensors(files), f"{flat}.lora_down.weight": torch.randn(2, width),
             f"{flat}.lora_up.weight": torch.randn(out, 2) * 0.01}
    save_file(extra, str(tmp_path / "more.safetensors"))
    pipe.load_lora_weights(files.peft, lora_scale=SCALE)
    pipe.load_lora_weights(tmp_path / "more.safetensors", lora_scale=-0.3)
    pipe.set_adapters(["default_0", "default_1"])
    first, second = pipe._adapters.merged
    assert len(first.saved) == len(first.targets) == len(files.lora)
    assert sorted(second.borrowed) == sorted(first.targets)
    assert len(second.saved) == 1 and second.saved[0][0] is pipe.backend.model.text_encoder.get_parameter(fc1)
    copies = [id(w) for f in pipe._adapters.merged for w, _ in f.saved]
    assert len(copies) == len(set(copies)) == len(files.lora) + 1
    assert pipe.get_active_adapters() == ["default_0", "default_1"]  # diffusers' names without adapter_name=
    assert pipe.get_list_adapters() == {"unet": ["default_0", "default_1"],
                                        "text_encoder": ["default_0", "default_1"]}
    pipe.unload_lora_weights()
    assert_same(state(pipe.backend.model), before)
    assert pipe.get_active_adapters() == [] and pipe.get_list_adapters() == {}


def test_unfuse_lora_keeps_its_contract(files):
    """Fused without after=, each FusedLora undoes itself, newest first. Fused with after=, one that borrows a copy
    is refused alone (nothing changes) and undone with the LoRAs it borrows from."""
    model = load_model(files.folder)
    base = state(model)
    a = fuse_lora(model, files.peft, SCALE)
    after_a = state(model)
    b = fuse_lora(model, files.kohya, -0.3)
    unfuse_lora(b)
    assert_same(state(model), after_a)
    unfuse_lora(a)
    assert_same(state(model), base)
    a = fuse_lora(model, files.peft, SCALE)
    b = fuse_lora(model, files.kohya, -0.3, after=[a])
    assert not b.saved and len(b.borrowed) == len(files.lora)
    stacked = state(model)
    with pytest.raises(ValueError, match="kohya.safetensors was fused after= others and keeps no copy of"):
        unfuse_lora(b)
    assert_same(state(model), stacked)
    unfuse_lora([a, b])
    assert_same(state(model), base)


# ------------------------------------------------------------------------------- 3, 4. where a LoRA comes from

def test_a_hub_repo_id_or_cache_entry_names_its_lora(files, tmp_path, monkeypatch):
    """pipe.load_lora_weights("latent-consistency/lcm-lora-sdv1-5") said 'no such file' though the README names it
    and models resolve repo ids from the local cache. Textual inversion goes through the same lookup."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "pytorch_lora_weights.safetensors").write_bytes(files.kohya.read_bytes())
    save_file({"<cat-toy>": torch.randn(64)}, str(repo / "learned_embeds.safetensors"))
    entry = hub_cache(repo, tmp_path / "hub", "models--acme--style-lora")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    want = load_model(files.folder)
    fuse_lora(want, files.kohya, SCALE)
    for source in ("acme/style-lora", entry):
        model = load_model(files.folder)
        fused = fuse_lora(model, source, SCALE)
        assert_same(state(model), state(want))
        assert fused.path == entry / "snapshots" / "0123abc" / "pytorch_lora_weights.safetensors"
    assert load_textual_inversion(load_model(files.folder), "acme/style-lora") == ["<cat-toy>"]
    with pytest.raises(MissingFile, match="acme/other: no such file, nor a repo id in the local Hugging Face cache"):
        fuse_lora(model, "acme/other")


def test_a_state_dict_and_diffusers_keyword_load(files):
    """diffusers takes load_lora_weights(state_dict) and pretrained_model_name_or_path_or_dict=; both were raw
    TypeErrors. (A kohya dict: its alphas are tensors; a PEFT file's alphas live in its header, not its tensors.)"""
    want = load_model(files.folder)
    fuse_lora(want, files.kohya, SCALE)
    for how in ("dict", "keyword"):
        pipe = Pipeline.from_pretrained(files.folder, device="cpu", dtype=torch.float32)
        if how == "dict":
            pipe.load_lora_weights(kohya_tensors(files), lora_scale=SCALE)
            assert pipe._adapters.merged[0].path is None
        else:
            pipe.load_lora_weights(pretrained_model_name_or_path_or_dict=files.kohya, lora_scale=SCALE)
        assert_same(state(pipe.backend.model), state(want))
    model = load_model(files.folder)
    refused(model, {**kohya_tensors(files), "lora_te_x.alpha": 2.0}, "the LoRA state dict: its entry 'lora_te_x.alpha' "
            "is a float")
    with pytest.raises(TypeError, match="a LoRA is a .safetensors file, .* or a state dict of tensors, got a list"):
        fuse_lora(model, [files.kohya])


# ------------------------------------------------------------------------------- 5, 9. key forms

def test_unet_keys_without_a_prefix_merge_as_diffusers_unet_loader_reads_them(files, tmp_path):
    """What UNet2DConditionModel.save_lora_adapter (lora_A/B) and save_attn_procs (.lora.down/up) write: no
    `unet.` prefix. Refused before as 'not a LoRA file'; diffusers' unet.load_lora_adapter(prefix=None) reads them."""
    from diffusers import UNet2DConditionModel

    unet = [replace(m, alpha=m.down.shape[0]) for m in files.lora if m.component == "unet"]  # no alphas: factor 1
    forms = {"lora_A_B": ("lora_A", "lora_B"), "lora_down_up": ("lora.down", "lora.up")}
    model = load_model(files.folder)
    want = merged(model, unet, 1.0)
    for name, (down, up) in forms.items():
        path = tmp_path / f"{name}.safetensors"
        save_file({k: v for m in unet for k, v in ((f"{m.name}.{down}.weight", m.down),
                                                   (f"{m.name}.{up}.weight", m.up))}, str(path))
        model = load_model(files.folder)
        fuse_lora(model, path)
        got = state(model)
        assert all((got[k] - w).abs().max() <= 1e-6 for k, w in want.items()), name
    theirs = UNet2DConditionModel.from_pretrained(files.folder / "unet")
    theirs.load_lora_adapter(str(tmp_path / "lora_A_B.safetensors"), prefix=None, adapter_name="x")
    theirs.fuse_lora(lora_scale=1.0)
    weights = {f"unet.{k.replace('.base_layer', '')}": v for k, v in theirs.state_dict().items() if ".lora_" not in k}
    assert all((weights[k] - got[k]).abs().max() <= 1e-6 for k in want)


def test_kohya_ldm_block_names_merge_as_diffusers_names(files, tmp_path):
    """lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q...: the original LDM UNet names, which A1111 and
    ComfyUI read, were refused. They give the same weights as the diffusers-named file."""
    model = load_model(files.folder)
    ours = [m.name + ".weight" for m in files.lora if m.component == "unet"]
    ldm = ldm_names(model.config, {"unet": ours, "vae": [], "text_encoder": []})["unet"]
    tensors = {}
    for key, t in kohya_tensors(files).items():
        module, _, role = key.partition(".")
        name = next((n for n in ours if module == "lora_unet_" + n.removesuffix(".weight").replace(".", "_")), None)
        if name is not None:
            module = "lora_unet_" + ldm[name].key.removeprefix(UNET).removesuffix(".weight").replace(".", "_")
        tensors[f"{module}.{role}"] = t
    assert {"lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight",
            "lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight"} <= tensors.keys()  # attention; resnet conv1
    save_file(tensors, str(tmp_path / "ldm.safetensors"))
    fuse_lora(model, tmp_path / "ldm.safetensors", SCALE)
    want = load_model(files.folder)
    fuse_lora(want, files.kohya, SCALE)
    assert_same(state(model), state(want))


# ------------------------------------------------------------------------------- 6, 7, 8. refusals

def test_sdxl_and_lycoris_files_are_named(files, tmp_path):
    model = load_model(files.folder)
    good = kohya_tensors(files)
    for key in ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
                "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"):
        save_file({**good, key: torch.zeros(4, 1280)}, str(tmp_path / "xl.safetensors"))
        refused(model, tmp_path / "xl.safetensors", "xl.safetensors: an SDXL LoRA", "this model is SD 1.x/2.x")
    for key, kind in (("lora_unet_down_blocks_0_attentions_0_norm.w_norm", "LyCORIS norm weight"),
                      ("lora_unet_down_blocks_0_attentions_0_norm.b_norm", "LyCORIS norm weight"),
                      ("lora_unet_down_blocks_0_resnets_0_conv1.diff", "LyCORIS full diff"),
                      ("lora_unet_down_blocks_0_resnets_0_conv1.diff_b", "LyCORIS full diff")):
        save_file({**good, key: torch.zeros(4)}, str(tmp_path / "lyco.safetensors"))
        message = refused(model, tmp_path / "lyco.safetensors", f"{key} (not a plain LoRA: a {kind}, not supported)")
        assert "SD 1.x/2.x" not in message
    save_file({"lora_unet_conv_in.hada_w1_a": torch.zeros(4, 4)}, str(tmp_path / "loha.safetensors"))
    refused(model, tmp_path / "loha.safetensors", "not a LoRA file", "it is a LyCORIS LoHa, not a plain LoRA")


def test_a_bad_alpha_and_a_rank_0_module_are_named_as_such(files, tmp_path, capsys):
    model = load_model(files.folder)
    flat = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    tensors = {**kohya_tensors(files), f"{flat}.alpha": torch.tensor(math.nan)}
    save_file(tensors, str(tmp_path / "nan.safetensors"))
    message = refused(model, tmp_path / "nan.safetensors", f"1 with a bad alpha: {flat}.alpha: an alpha is one "
                      "finite number")
    assert "another base model" not in message and "wrong shape" not in message
    tensors = kohya_tensors(files)
    width = tensors[f"{flat}.lora_down.weight"].shape[1]  # to_q: (width, width)
    tensors |= {f"{flat}.lora_down.weight": torch.zeros(0, width), f"{flat}.lora_up.weight": torch.zeros(width, 0)}
    save_file(tensors, str(tmp_path / "rank0.safetensors"))
    message = refused(model, tmp_path / "rank0.safetensors", f"{flat}.lora_down.weight (0, {width}) and "
                      f"{flat}.lora_up.weight ({width}, 0): rank 0")
    assert "another base model" not in message
    argv = ["generate", "--model", files.folder, "--prompt", "x", "--out", tmp_path, "--lora",
            tmp_path / "rank0.safetensors"]
    assert main([str(a) for a in argv]) == 2  # was a ZeroDivisionError traceback, exit 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "rank 0" in err


# ------------------------------------------------------------------------------- 10. export onnx --lora

def test_export_onnx_merges_lora_first(files, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    out = tmp_path / "onnx"
    command = ["export", "onnx", str(files.folder), "--components", "text_encoder", "--quiet"]
    assert main(command + ["--out", str(out), "--lora", f"{files.kohya}:{SCALE}"]) == 0
    model, base = load_model(files.folder), load_model(files.folder)
    fuse_lora(model, files.kohya, SCALE)
    ids = torch.randint(0, model.config.text.vocab_size, (2, 77), generator=torch.Generator().manual_seed(0))
    session = ort.InferenceSession(str(out / "text_encoder" / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input_ids": ids.numpy()})[0]
    with torch.no_grad():
        want, before = model.text_encoder(ids).numpy(), base.text_encoder(ids).numpy()
    assert np.abs(got - want).max() <= 1e-4 and np.abs(got - before).max() > 1e-2  # merged, and it mattered
    manifest = json.loads((out / "backdrop_export.json").read_text())  # the export says which LoRA it holds
    assert manifest["merged"] == [{"lora": str(files.kohya), "scale": SCALE,
                                   "sha256": hashlib.sha256(files.kohya.read_bytes()).hexdigest()}]
    capsys.readouterr()
    assert main(command + ["--out", str(tmp_path / "x"), "--lora", str(tmp_path / "missing.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--lora: " in err and "missing.safetensors: no such file" in err


# ------------------------------------------------------------------------------- 11. warnings and small things

def test_an_a1111_lora_tag_in_a_prompt_is_warned_about_once(files, caplog):
    pipe = Pipeline.from_pretrained(files.folder, device="cpu", dtype=torch.float32)
    text._warn_a1111_lora.cache_clear()
    with caplog.at_level(logging.WARNING, logger="backdrop.diffusion.text"):
        text.embed(pipe.backend, ["a red bottle"])
        assert "A1111" not in caplog.text
        for _ in range(2):
            text.embed(pipe.backend, ["a red bottle <lora:brand-style:0.8>"])
    assert caplog.text.count("A1111's <lora:NAME:WEIGHT> syntax, which loads nothing here") == 1
    assert "pipe.load_lora_weights(path, lora_scale=WEIGHT) (the CLI's --lora PATH:WEIGHT)" in caplog.text


def test_alpha_0_merges_nothing_with_a_warning(files, tmp_path, caplog):
    flat = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({**kohya_tensors(files), f"{flat}.alpha": torch.tensor(0.0)}, str(tmp_path / "zero.safetensors"))
    model = load_model(files.folder)
    before = state(model)
    with caplog.at_level(logging.WARNING, logger="backdrop.nn.lora"):
        fuse_lora(model, tmp_path / "zero.safetensors")
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    assert torch.equal(state(model)[key], before[key])  # diffusers' arithmetic: alpha / rank = 0
    assert f"zero.safetensors: alpha 0 for 1 of its {len(files.lora)} modules ({flat}.lora_down.weight)" \
        in caplog.text and "kohya's sd-scripts reads alpha 0 as alpha = rank" in caplog.text
    caplog.clear()
    pipe = Pipeline.from_pretrained(files.folder, device="cpu", dtype=torch.float32)
    with caplog.at_level(logging.WARNING, logger="backdrop.nn.lora"):  # read once, merged again at every change
        pipe.load_lora_weights(tmp_path / "zero.safetensors")
        pipe.set_adapters("default_0", 0.5)
    assert caplog.text.count("alpha 0 for 1 of its") == 1


def test_a_pickle_named_safetensors_gets_the_conversion(files, tmp_path):
    model = load_model(files.folder)
    for zipped in (True, False):  # torch.save's zip format (PK\x03\x04) and its legacy one (a pickle: \x80)
        path = tmp_path / f"zipped-{zipped}.safetensors"
        torch.save(kohya_tensors(files), path, _use_new_zipfile_serialization=zipped)
        refused(model, path, f"{path}: a pickle (torch.save) file under a .safetensors name: pickle checkpoints "
                "can run arbitrary code", f"zipped-{zipped}-converted.safetensors")
