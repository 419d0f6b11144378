"""Textual inversion (nn/textual_inversion.py, Pipeline.load_textual_inversion): the same embedding files loaded
into our pipeline and into diffusers' StableDiffusionPipeline over the same tiny random weights give the same token
ids and prompt embeddings (diffusers' and A1111's formats, multi-vector, lists, tensors); unload restores the
tokenizer and text encoder bit-exactly; every refusal names the file, key or token at fault and changes nothing;
exported backends refuse textual inversion and clip_skip by name; the --textual-inversion option."""
import shlex
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from backdrop.cli import main, textual_inversion_spec
from backdrop.diffusion.pipeline import Pipeline
from backdrop.nn.checkpoint import init_model, load_model, save_model

pytestmark = [pytest.mark.usefixtures("one_thread"),  # conftest.py
              pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                         "ignore::UserWarning")]

C = 64  # the tiny text encoder's hidden size
VOCAB = 49408  # CLIP's
PROMPTS = ["a photo of <cat-toy>", "<multi> on a table, <Cat-Toy>", "charturner, a woman", "a photo of a cat",
           "<multi> " * 30]  # the last expands to 90 tokens: cut as diffusers cuts it


def vectors(*shape, seed=0):
    return 0.3 * torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) - 0.05  # off-centre


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("embeddings")
    contents = {
        "cat-toy": {"<cat-toy>": vectors(C, seed=1)},  # diffusers' learned_embeds: (C,)
        "multi": {"<multi>": vectors(3, C, seed=2)},  # diffusers' multi-vector: (n, C)
        "charturner": {"emb_params": vectors(2, C, seed=3)},  # A1111's
        "two": {"<a>": vectors(C, seed=4), "<b>": vectors(C, seed=5)},
        "wide": {"<wide>": vectors(1, 1024, seed=6)},  # an SD2 embedding
        "sdxl": {"clip_l": vectors(1, 768), "clip_g": vectors(1, 1280)},
        "lora": {"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": vectors(4, C),
                 "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": vectors(C, 4)},
        "ints": {"<int>": torch.ones(1, C, dtype=torch.int64)},
        "cube": {"<cube>": vectors(1, 2, C)},
        "empty": {},
    }
    out = {}
    for name, tensors in contents.items():
        save_file(tensors, root / f"{name}.safetensors")
        out[name] = str(root / f"{name}.safetensors")
    (root / "folder").mkdir()
    save_file(contents["cat-toy"], root / "folder" / "learned_embeds.safetensors")
    out["folder"] = str(root / "folder")
    torch.save({"string_to_param": {"*": vectors(1, C)}, "name": "old"}, root / "old.pt")  # A1111's pickle format
    out["old"] = str(root / "old.pt")
    return out


@pytest.fixture
def pipe(models):
    """Our tiny SD1 pipeline; whatever a test loads is unloaded after it."""
    p = models["sd1"].pipe
    yield p
    p.unload_textual_inversion()


@pytest.fixture
def theirs(models):
    """A fresh diffusers pipeline over the same folder (load_textual_inversion changes its tokenizer and encoder)."""
    import diffusers
    return diffusers.StableDiffusionPipeline.from_pretrained(models["sd1"].folder, safety_checker=None,
                                                             feature_extractor=None, requires_safety_checker=False)


def their_ids(d, prompts):
    """The ids diffusers' encode_prompt encodes: the prompt with multi-vector tokens written out, then tokenized."""
    return d.tokenizer(d.maybe_convert_prompt(prompts, d.tokenizer), padding="max_length", max_length=77,
                       truncation=True, return_tensors="pt").input_ids


def token_rows(pipe) -> torch.Tensor:
    return pipe.backend.model.text_encoder.text_model.embeddings.token_embedding.weight


@pytest.mark.parametrize("how", ["files", "list", "tensors"])
def test_embeddings_equal_diffusers(pipe, theirs, files, how):
    """One vector, three vectors (<multi>, <multi>_1, <multi>_2: diffusers' names) and A1111's emb_params, given as
    three loads, one list with a token each, or tensors: the same ids and embeddings as diffusers'."""
    paths, tokens = [files["cat-toy"], files["multi"], files["charturner"]], ["<cat-toy>", "<multi>", "charturner"]
    if how == "files":
        for path, token in zip(paths, [None, None, "charturner"]):  # diffusers names an A1111 file "emb_params"
            pipe.load_textual_inversion(path, token=token)
            theirs.load_textual_inversion(path, token=token)
    elif how == "list":
        pipe.load_textual_inversion(paths, token=tokens)
        theirs.load_textual_inversion(paths, token=tokens)
    else:
        rows = [vectors(C, seed=1)[None], vectors(3, C, seed=2), vectors(2, C, seed=3)]
        for row, token in zip(rows, tokens):
            pipe.load_textual_inversion(row, token=token)
            theirs.load_textual_inversion(row.clone(), token=token)
    ids = pipe.backend.tokenizer(PROMPTS)
    assert torch.equal(ids, their_ids(theirs, PROMPTS))
    assert ids[0, 4] == VOCAB and ids[1, 1:4].tolist() == [VOCAB + 1, VOCAB + 2, VOCAB + 3]  # the new ids
    assert ids[2, 1:3].tolist() == [VOCAB + 4, VOCAB + 5]
    with torch.no_grad():
        want = theirs.encode_prompt(PROMPTS, "cpu", 1, False)[0]
    assert (pipe.encode_prompt(PROMPTS) - want).abs().max() <= 1e-5


def test_one_tensor_of_n_rows_gives_n_tokens(pipe, theirs):
    """diffusers' special case: one (n, C) tensor with a list of n tokens is n single-vector embeddings."""
    rows = vectors(2, C, seed=7)
    pipe.load_textual_inversion(rows, token=["<x>", "<y>"])
    theirs.load_textual_inversion(rows.clone(), token=["<x>", "<y>"])
    prompts = ["<y> and <x>"]
    assert torch.equal(pipe.backend.tokenizer(prompts), their_ids(theirs, prompts))
    with torch.no_grad():
        assert (pipe.encode_prompt(prompts) - theirs.encode_prompt(prompts, "cpu", 1, False)[0]).abs().max() <= 1e-5


@pytest.mark.parametrize("layout", ["tokenizer.json", "added_tokens.json"])
def test_a_model_saved_with_its_embeddings_loads_them(theirs, files, tmp_path, layout):
    """diffusers' save_pretrained after load_textual_inversion: the tokens follow the vocabulary in the tokenizer
    (transformers 5's tokenizer.json; transformers 4's added_tokens.json, as concept-library exports have it) and
    the text encoder has their rows. The old layout loaded with the tokens split into BPE pieces, their rows never
    used; now both give diffusers' ids (multi-vector tokens written out) and prompt embeddings, and unload leaves
    the folder's own tokens."""
    import json

    from backdrop.nn.tokenizer import Tokenizer

    theirs.load_textual_inversion([files["cat-toy"], files["multi"]])
    theirs.save_pretrained(tmp_path / "model")
    tok = tmp_path / "model" / "tokenizer"
    if layout == "added_tokens.json":
        for f in tok.iterdir():
            f.unlink()
        Tokenizer.from_assets().save(tok)  # vocab.json + merges.txt, then the tokens as transformers 4 listed them
        config = json.loads((tok / "tokenizer_config.json").read_text())
        del config["added_tokens_decoder"]
        (tok / "tokenizer_config.json").write_text(json.dumps(config))
        (tok / "added_tokens.json").write_text(json.dumps({"<cat-toy>": VOCAB, "<multi>": VOCAB + 1,
                                                           "<multi>_1": VOCAB + 2, "<multi>_2": VOCAB + 3}))
    ours = Pipeline.from_pretrained(tmp_path / "model", device="cpu", dtype=torch.float32)
    assert torch.equal(ours.backend.tokenizer(PROMPTS), their_ids(theirs, PROMPTS))
    with torch.no_grad():
        want = theirs.encode_prompt(PROMPTS, "cpu", 1, False)[0]
    assert (ours.encode_prompt(PROMPTS) - want).abs().max() <= 1e-5
    ours.unload_textual_inversion()  # nothing loaded at run time: the folder's tokens stay
    assert torch.equal(ours.backend.tokenizer(PROMPTS), their_ids(theirs, PROMPTS))
    with pytest.raises(ValueError, match="4 tokens beyond CLIP's 49408 .* an LDM single file cannot record"):
        save_model(ours.backend.model, tmp_path / "model.safetensors", layout="ldm")  # they loaded as plain words
    (tok / ("tokenizer.json" if layout == "tokenizer.json" else "added_tokens.json")).unlink()
    if layout == "tokenizer.json":
        Tokenizer.from_assets().save(tok)
    with pytest.raises(ValueError, match=r"text_encoder/config.json: vocab_size 49412, but the tokenizer has 49408"):
        Pipeline.from_pretrained(tmp_path / "model")


def test_a_token_differing_only_in_case_from_a_folders_own_is_refused(tmp_path, caplog):
    """Prompts match added tokens case-insensitively: a loaded "<DOG>" over a folder's "<Dog>" was accepted and its
    rows never reached ("<CAT>" over "<cat>" was refused). A single file whose text encoder has rows past CLIP's
    vocabulary (a folder's tokens, saved elsewhere) says they are out of reach."""
    from backdrop.nn.tokenizer import Tokenizer, _asset_vocab
    from backdrop.nn.tokenizer_files import _Added

    tokens, merges = _asset_vocab()
    tok = Tokenizer({**{t: i for i, t in enumerate(tokens)}, "<Dog>": VOCAB}, merges,
                    added=[_Added("<Dog>", normalized=True, special=False)])
    assert tok.taken_by("<DOG>") == "<Dog>" and tok.taken_by("<cow>") is None
    model = init_model("tiny", seed=0)
    embeddings = model.text_encoder.text_model.embeddings
    embeddings.token_embedding = torch.nn.Embedding(VOCAB + 2, embeddings.token_embedding.embedding_dim)
    model = replace(model, config=replace(model.config, text=replace(model.config.text, vocab_size=VOCAB + 2)))
    with caplog.at_level("WARNING", logger="backdrop.nn.checkpoint"):
        load_model(save_model(model, tmp_path / "m.safetensors", layout="ldm"))
    assert "its text encoder has 49410 token rows, CLIP's vocabulary 49408 ids" in caplog.text


def test_unload_restores_tokenizer_and_embeddings_bit_exactly(pipe, files, tmp_path):
    from backdrop.nn.checkpoint import save_model

    plain = ["a photo of a cat", "a photo of <cat-toy>, <multi>"]
    ids, emb, rows = pipe.backend.tokenizer(plain), pipe.encode_prompt(plain), token_rows(pipe).clone()
    pipe.load_textual_inversion(files["cat-toy"])
    pipe.load_textual_inversion(files["multi"])  # stacked
    assert token_rows(pipe).shape == (VOCAB + 4, C)
    with pytest.raises(ValueError, match=r"textual inversion embeddings loaded \(4 added"):  # no folder records them
        save_model(pipe.backend.model, tmp_path / "saved")
    assert not (tmp_path / "saved").exists()
    assert torch.equal(pipe.encode_prompt(plain)[0], emb[0]) and not torch.equal(pipe.encode_prompt(plain), emb)
    pipe.unload_textual_inversion()
    assert pipe.backend.tokenizer.vocab_size == VOCAB and torch.equal(token_rows(pipe), rows)
    assert torch.equal(pipe.backend.tokenizer(plain), ids)  # "<cat-toy>" is BPE'd into pieces again
    assert torch.equal(pipe.encode_prompt(plain), emb)
    pipe.load_textual_inversion(files["folder"])  # diffusers' folder, the same token again: loads after unload
    assert pipe.backend.tokenizer(["<cat-toy>"])[0, 1] == VOCAB


def test_an_a1111_file_is_named_after_itself(pipe, files):
    """A1111 users write an embedding's file name in prompts; token= still wins."""
    pipe.load_textual_inversion(files["charturner"])
    pipe.load_textual_inversion(files["charturner"], token="<turner>")
    assert pipe.backend.tokenizer(["charturner <turner>"])[0, 1:5].tolist() == [VOCAB, VOCAB + 1, VOCAB + 2,
                                                                                  VOCAB + 3]


@pytest.mark.parametrize("load,match", [
    (lambda f: [(f["cat-toy"], None), (f["cat-toy"], None)],
     r"cat-toy.safetensors: token '<cat-toy>' would take the vocabulary's '<cat-toy>' \(a word of it, or an "
     r"embedding loaded before"),
    (lambda f: [(f["cat-toy"], "cat")], r"cat-toy.safetensors: token 'cat' would take the vocabulary's 'cat</w>'"),
    # prompts match added tokens case-insensitively: "Background" would take every "background"
    (lambda f: [(f["cat-toy"], "Background")], r"token 'Background' would take the vocabulary's 'background</w>'"),
    (lambda f: [(f["cat-toy"], "<Toy>"), (f["multi"], "<TOY>")], r"token '<TOY>' would take the vocabulary's "
                                                                  r"'<Toy>'"),
    (lambda f: [([f["cat-toy"], f["multi"]], ["<x>", "<X>"])], r"token '<X>' is given twice"),
    (lambda f: [({"<nan>": torch.full((C,), float("nan"))}, None)], r"the state dict: tensor '<nan>' holds NaN"),
    (lambda f: [(f["wide"], None)], r"wide.safetensors: tensor '<wide>' has shape \(1, 1024\): vectors 1024 wide, "
                                    r"but this text encoder's token embeddings are 64 wide"),
    (lambda f: [(f["two"], None)], r"two.safetensors: holds 2 tensors \('<a>', '<b>'\), where an embedding file "
                                   r"holds one; give token= naming the one to load"),
    (lambda f: [(f["two"], "<c>")], r"two.safetensors: holds 2 tensors .*none is named '<c>'"),
    (lambda f: [(f["sdxl"], None)], r"sdxl.safetensors: .*clip_l and clip_g make an SDXL embedding"),
    (lambda f: [(f["lora"], None)], r"lora.safetensors: a LoRA file \('lora_unet_mid.*not a textual-inversion "
                                    r"embedding; load it with Pipeline.load_lora_weights \(the CLI's --lora\)"),
    (lambda f: [(f["old"], None)], r"old.pt: a pickle file, which Backdrop does not load: unpickling can run "
                                   r"arbitrary code"),
    (lambda f: [(f["old"] + "x", None)], r"old.ptx: no such file"),
    (lambda f: [(f["ints"], None)], r"ints.safetensors: tensor '<int>' is torch.int64"),
    (lambda f: [(f["cube"], None)], r"cube.safetensors: tensor '<cube>' has shape \(1, 2, 64\); an embedding is"),
    (lambda f: [(f["empty"], None)], r"empty.safetensors: holds no tensors"),
    (lambda f: [(vectors(C), None)], r"a tensor embedding needs token="),
    (lambda f: [(vectors(C), "")], r"token must be a non-empty string"),
    (lambda f: [([f["cat-toy"], f["multi"]], ["<x>"])], r"2 embeddings and 1 tokens"),
    (lambda f: [([f["cat-toy"], f["multi"]], ["<x>", "<x>"])], r"multi.safetensors: token '<x>' is given twice "
                                                                r"\(also by .*cat-toy.safetensors;"),
    (lambda f: [([f["multi"], vectors(C)], ["<m>", "<m>_2"])], r"the tensor: token '<m>_2' is given twice"),
    (lambda f: [([f["cat-toy"], f["wide"]], None)], r"wide.safetensors: tensor '<wide>' has shape"),  # 2nd of a list
])
def test_refusals_name_the_culprit_and_change_nothing(pipe, files, load, match):
    calls = load(files)
    for path, token in calls[:-1]:
        pipe.load_textual_inversion(path, token=token)
    vocab, rows = pipe.backend.tokenizer.vocab_size, token_rows(pipe).clone()
    with pytest.raises(ValueError, match=match):
        pipe.load_textual_inversion(*calls[-1])
    assert pipe.backend.tokenizer.vocab_size == vocab and torch.equal(token_rows(pipe), rows)


def test_the_pickle_refusal_says_how_to_convert_and_that_works(pipe, files, tmp_path):
    """The command the refusal of A1111's .pt gives writes a .safetensors that loads (named after the file)."""
    old = tmp_path / "my-style.pt"
    old.write_bytes(Path(files["old"]).read_bytes())
    with pytest.raises(ValueError) as e:
        pipe.load_textual_inversion(old)
    command = str(e.value).split("python -c ", 1)[1]
    subprocess.run([sys.executable, "-c", shlex.split(command)[0]], check=True, timeout=120)
    pipe.load_textual_inversion(tmp_path / "my-style.safetensors")
    assert pipe.backend.tokenizer(["a my-style cat"])[0, 2] == VOCAB


def test_an_export_backend_refuses_textual_inversion_and_clip_skip(tmp_path):
    """An ONNX text encoder has a fixed vocabulary and ends at its last layer: both are errors naming the backend
    and the way round (prompt_embeds from a torch pipeline), not silently ignored."""
    pytest.importorskip("onnxruntime")
    from backdrop.export.onnx import export_onnx
    from backdrop.nn.checkpoint import init_model

    model = init_model("tiny", seed=1)
    onnx = Pipeline.from_pretrained(export_onnx(model, tmp_path / "onnx", progress=False), device="cpu",
                                    backend="onnxruntime")
    with pytest.raises(ValueError, match=r"^textual inversion needs the torch backend, not onnxruntime: .*"
                                         r"prompt_embeds="):
        onnx.load_textual_inversion(vectors(C), token="<x>")
    for call in (lambda: onnx.encode_prompt("x", clip_skip=1),
                 lambda: onnx.generate("x", steps=1, progress=False, clip_skip=1)):
        with pytest.raises(ValueError, match=r"^clip_skip=1 needs the torch backend, not onnxruntime: an exported "
                                             r"text encoder gives its last layer's output only.*prompt_embeds="):
            call()
    assert onnx.encode_prompt("x", clip_skip=0).shape == (1, 77, C)


def test_cli_textual_inversion_option(pipe, models, files, capsys, tmp_path):
    """--textual-inversion PATH[:TOKEN], repeatable, gives the image the API gives; a bad file is one line."""
    argv = ["generate", "--model", models["sd1"].folder, "--steps", "2", "--seed", "3", "--quiet", "--dtype", "fp32",
            "--prompt", "<multi> and <toy>", "--textual-inversion", files["multi"], "--textual-inversion",
            f"{files['cat-toy']}:<toy>"]
    assert main(argv + ["--out", str(tmp_path)]) == 0
    out = capsys.readouterr()
    [path] = out.out.split()
    assert f"--textual-inversion {files['multi']}: prompts use '<multi>'" in out.err  # the file named the word
    assert pipe.load_textual_inversion([files["multi"], files["cat-toy"]], token=[None, "<toy>"]) == \
        ["<multi>", "<toy>"]
    assert pipe.backend.tokenizer.decode(pipe.backend.tokenizer(["<multi> and <toy>"])[0]) == \
        "<multi> <multi>_1 <multi>_2 and <toy>"  # added tokens decode as words (the truncation warning's text)
    want = pipe.generate("<multi> and <toy>", steps=2, seed=3, progress=False).images[0]
    assert np.array_equal(np.asarray(Image.open(path)), np.asarray(want))
    assert main(argv[:-1] + [files["old"], "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the line naming <multi>'s word
    assert err.startswith("backdrop generate: error: --textual-inversion: ") and "old.pt: a pickle file" in err
    assert not list(tmp_path.glob("bad/*.png"))


def test_textual_inversion_spec_splits_a_token_off_paths_with_colons(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "style:v2.safetensors").write_bytes(b"")  # an existing file's whole name is a path
    assert [textual_inversion_spec(t) for t in ("x.safetensors:<cat-toy>", "C:/x.safetensors", "style:v2.safetensors",
                                                "dir:a/x.safetensors:tok", "x.safetensors")] == [
        ("x.safetensors", "<cat-toy>"), ("C:/x.safetensors", None), ("style:v2.safetensors", None),
        ("dir:a/x.safetensors", "tok"), ("x.safetensors", None)]
