"""Mutation-testing gaps in nn/textual_inversion.py: an empty embedding, a model
whose tokenizer and embedding disagree, and the dtype and trainability of the grown token embedding."""
import pytest
import torch

from backdrop.nn.checkpoint import CheckpointError, init_model
from backdrop.nn.config import PRESETS
from backdrop.nn.textual_inversion import load_textual_inversion, unload_textual_inversion

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def model():
    return init_model(PRESETS["tiny"], seed=0)


def _emb(model):
    return model.text_encoder.text_model.embeddings.token_embedding


def test_an_embedding_of_no_vectors_is_refused(model):
    """(0, C): one token with no row would misalign every later id with its row. (X02)"""
    width, vocab = _emb(model).embedding_dim, model.tokenizer.vocab_size
    with pytest.raises(CheckpointError, match=rf"the tensor has shape \(0, {width}\)"):
        load_textual_inversion(model, torch.zeros(0, width), token="<none>")
    assert model.tokenizer.vocab_size == vocab == _emb(model).num_embeddings


def test_a_tokenizer_ahead_of_its_embedding_is_refused(model):
    """A token added to the tokenizer alone (an earlier load half undone): appending to both would give the new
    token the row of another. (X07)"""
    model.tokenizer.add_tokens([("<stray>", 1)])
    try:
        with pytest.raises(ValueError, match="token embeddings but the tokenizer .* they must be equal"):
            load_textual_inversion(model, torch.zeros(_emb(model).embedding_dim), token="<new>")
    finally:
        model.tokenizer.remove_added_tokens()


@pytest.mark.parametrize("trainable", [True, False])
def test_the_grown_embedding_keeps_dtype_and_trainability(trainable):
    """A float32 file loaded into a bfloat16 text encoder is cast to bfloat16 (X08); the embedding stays as
    trainable as it was (a textual-inversion run trains it) (X09), after unload too."""
    m = init_model(PRESETS["tiny"], seed=0)
    m.text_encoder.to(torch.bfloat16)
    _emb(m).weight.requires_grad_(trainable)
    vec = torch.randn(2, _emb(m).embedding_dim, generator=torch.Generator().manual_seed(0))
    load_textual_inversion(m, vec, token="<two>")
    w = _emb(m).weight
    assert w.dtype == torch.bfloat16 and w.requires_grad == trainable
    assert torch.equal(w[-2:].detach(), vec.to(torch.bfloat16))
    unload_textual_inversion(m)
    assert _emb(m).weight.dtype == torch.bfloat16 and _emb(m).weight.requires_grad == trainable


def test_token_picks_one_tensor_of_a_file_with_several(model, tmp_path):
    """A file of several embeddings loads the one token= names, with that token. (X13)"""
    from safetensors.torch import save_file

    width = _emb(model).embedding_dim
    a, b = torch.full((width,), 0.25), torch.full((1, width), -0.5)
    save_file({"<a>": a, "<b>": b}, tmp_path / "two.safetensors")
    try:
        assert load_textual_inversion(model, str(tmp_path / "two.safetensors"), token="<b>") == ["<b>"]
        assert torch.equal(_emb(model).weight[-1].detach(), b[0]) and "<b>" in model.tokenizer
        assert "<a>" not in model.tokenizer
    finally:
        unload_textual_inversion(model)


def test_a_pickle_named_by_weight_name_gets_the_embedding_conversion(tmp_path):
    """load_textual_inversion(folder, weight_name="x.pt") refused A1111's .pt with the model checkpoints' advice:
    pass allow_pickle (which it does not take), and a conversion of the top-level tensors only, which makes A1111's
    nested {"string_to_param": {"*": ...}} an empty file. By path, the same file got the right advice."""
    from backdrop.diffusion.pipeline import Pipeline
    from backdrop.nn.checkpoint import save_model

    pipe = Pipeline.from_pretrained(save_model(init_model("tiny", seed=1), tmp_path / "m"), device="cpu",
                                    dtype=torch.float32)
    (tmp_path / "emb").mkdir()
    torch.save({"string_to_param": {"*": torch.zeros(1, 64)}, "name": "old"}, tmp_path / "emb" / "old.pt")
    for call in (lambda: pipe.load_textual_inversion(tmp_path / "emb" / "old.pt"),
                 lambda: pipe.load_textual_inversion(tmp_path / "emb", weight_name="old.pt")):
        with pytest.raises(CheckpointError, match=r"old.pt: a pickle file") as info:
            call()
        assert "string_to_param" in str(info.value) and "allow_pickle" not in str(info.value)
