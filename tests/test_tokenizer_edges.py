"""Mutation-testing gaps in nn/tokenizer.py and nn/tokenizer_files.py: prompt input
forms, added (textual-inversion) tokens across load/unload, and a broken vocabulary named as such."""
import json

import pytest
import torch

from backdrop.nn.tokenizer import CONTEXT_LENGTH, Tokenizer

BOS, EOS = 49406, 49407


@pytest.fixture
def tok():
    return Tokenizer.from_assets()


def test_a_tuple_of_prompts_is_a_batch_and_a_lone_surrogate_is_named(tok):
    """(T18, T17)"""
    ids = tok(("a red chair", "a cat"))
    assert ids.shape == (2, CONTEXT_LENGTH) and torch.equal(ids, tok(["a red chair", "a cat"]))
    with pytest.raises(ValueError, match=r"not valid Unicode text \(a lone surrogate at character 4\)"):
        tok(["ok", "cafe\ud800"])


def test_an_added_token_decodes_as_its_own_word(tok):
    """The first added id (the vocabulary's size) is a word of its own, not glued to the next BPE word. (T16)"""
    (x,) = tok.add_tokens([("<y>", 1)])
    assert x == tok._built_size
    assert tok.encode("a photo of <y> toy")[4] == x
    assert tok.decode(tok.encode("a photo of <y> toy")) == "a photo of <y> toy"


def test_unloading_a_multi_vector_token_forgets_its_expansion(tok):
    """After a 3-vector token is removed, a 1-vector token that gets its id is one id, not the old three (ids past
    the vocabulary: an IndexError in the text encoder). (T10)"""
    tok.add_tokens([("<a>", 3)])
    assert len(tok.encode("<a>")) == 5
    assert tok.remove_added_tokens() == 3
    (b,) = tok.add_tokens([("<b>", 1)])
    assert tok.encode("<b>") == [BOS, b, EOS]
    assert int(tok("<b>").max()) < tok.vocab_size


def test_add_tokens_refuses_a_name_twice_in_one_call(tok):
    """A 2-vector "<x>" names its second vector "<x>_1": giving "<x>_1" as well would give one word two ids. (T08)"""
    with pytest.raises(ValueError, match="token '<x>_1' is already in the vocabulary"):
        tok.add_tokens([("<x>", 2), ("<x>_1", 1)])
    assert tok.vocab_size == 49408 and "<x>" not in tok


def test_taken_by_sees_word_starts(tok):
    """"beauti" is a word start only (no "beauti</w>"): a new token "Beauti" would cut every "beautiful" in two.
    (T11)"""
    assert "beauti" in tok and "beauti</w>" not in tok
    assert tok.taken_by("Beauti") == "beauti"


def test_a_vocabulary_whose_ids_are_not_0_to_n_is_refused(tok, tmp_path):
    """vocab.json with an id twice (and so one missing) is refused by name (T19); an added token past a gap is named
    with the gap (T14)."""
    tok.save(tmp_path / "t")
    vocab = json.loads((tmp_path / "t" / "vocab.json").read_text(encoding="utf-8"))
    bad = dict(vocab, **{"a</w>": vocab["b</w>"]})
    with pytest.raises(ValueError, match=r"token ids must be exactly 0\.\.49407, each once"):
        Tokenizer(bad, [], source="vocab.json")
    (tmp_path / "t" / "added_tokens.json").write_text(json.dumps({"<cat-toy>": 49410}), encoding="utf-8")
    config = tmp_path / "t" / "tokenizer_config.json"
    c = json.loads(config.read_text(encoding="utf-8"))
    del c["added_tokens_decoder"]  # an older folder: added_tokens.json is read
    config.write_text(json.dumps(c), encoding="utf-8")
    with pytest.raises(ValueError, match="added token '<cat-toy>' has id 49410, but the vocabulary ends at 49407"):
        Tokenizer.from_folder(tmp_path / "t")


def test_a_two_vector_embedding_saved_in_the_folder_still_expands(tok, tmp_path):
    """A folder saved with a 2-vector textual inversion ("<t>", "<t>_1"): "<t>" in a prompt stands for both. (T20)"""
    ids = tok.add_tokens([("<t>", 2)])
    tok.save(tmp_path / "t")
    again = Tokenizer.from_folder(tmp_path / "t")
    assert again.encode("a <t> toy") == tok.encode("a <t> toy") == [BOS, 320, *ids, 5988, EOS]


def test_merges_without_a_version_header_lose_no_merge(tok, tmp_path):
    """merges.txt written without "#version" (converted folders): its first line is the rank-0 merge. (T21)"""
    tok.save(tmp_path / "t")
    merges = tmp_path / "t" / "merges.txt"
    lines = merges.read_text(encoding="utf-8").split("\n")
    assert lines[0].startswith("#version") and lines[1] == "i n"
    merges.write_text("\n".join(lines[1:]), encoding="utf-8")
    texts = ["in", "a painting in the inn", "the king's ring"]
    assert torch.equal(Tokenizer.from_folder(tmp_path / "t")(texts), tok(texts))


def test_a_merge_whose_result_is_not_in_the_vocabulary_is_named(tok, tmp_path):
    """(T22)"""
    tok.save(tmp_path / "t")
    vocab = json.loads((tmp_path / "t" / "vocab.json").read_text(encoding="utf-8"))
    assert "q" in vocab and "z</w>" in vocab and "qz</w>" not in vocab
    (tmp_path / "t" / "merges.txt").write_text("#version: 0.2\ni n\nq z</w>\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"merges.txt:3: merge 'q z</w>' uses 'qz</w>', which is not in the"):
        Tokenizer.from_folder(tmp_path / "t")


def test_a_gpt2_style_tokenizer_json_is_not_read_as_clip(tmp_path):
    """A byte-level BPE without CLIP's "</w>" word ends (GPT-2's, RoBERTa's) is refused by name. (T27)"""
    folder = tmp_path / "gpt2"
    folder.mkdir()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a": 2, "b": 3, "ab": 4}
    (folder / "tokenizer.json").write_text(json.dumps({"model": {
        "type": "BPE", "vocab": vocab, "merges": ["a b"], "end_of_word_suffix": None}}), encoding="utf-8")
    with pytest.raises(ValueError, match="tokenizer.json: not a CLIP tokenizer"):
        Tokenizer.from_folder(folder)


def test_an_added_tokens_decoder_that_contradicts_the_vocabulary_is_refused(tok, tmp_path):
    """tokenizer_config.json saying "<|endoftext|>" is id 5 while vocab.json says 49407 (a hand-edited or merged
    folder) is refused, naming both ids. (T26)"""
    tok.save(tmp_path / "t")
    config = tmp_path / "t" / "tokenizer_config.json"
    c = json.loads(config.read_text(encoding="utf-8"))
    c["added_tokens_decoder"]["5"] = c["added_tokens_decoder"].pop(str(EOS))
    config.write_text(json.dumps(c), encoding="utf-8")
    with pytest.raises(ValueError, match=r"added_tokens_decoder gives '<\|endoftext\|>' id 5, vocab.json gives 49407"):
        Tokenizer.from_folder(tmp_path / "t")
