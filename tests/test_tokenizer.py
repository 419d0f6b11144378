"""The CLIP tokenizer: ids equal to transformers' CLIPTokenizer on the same vocabulary, for both pad conventions.

The oracle's vocab.json/merges.txt are built here from the shipped gz with open_clip's recipe, independently of
backdrop.nn.tokenizer, so a wrong vocabulary in our code cannot agree with it by construction.
"""
import gzip
import json
import random
import time
from importlib import resources

import pytest
import torch
import transformers
from transformers import CLIPTokenizer

from backdrop.nn.tokenizer import Tokenizer

pytestmark = pytest.mark.skipif(
    int(transformers.__version__.split(".")[0]) < 5,
    reason="the oracle is transformers 5's CLIPTokenizer (4.x's slow one differs on CJK, control chars, final sigma)")

BOS, EOS = 49406, 49407
MAX = 77

CORPUS = [
    # product backdrops, plain ASCII
    "a bottle of perfume on a marble table, soft morning light",
    "Studio photo of a red sneaker on a white background, 85mm, f/1.8",
    "luxury watch on black velvet, dramatic rim lighting, 8k, highly detailed",
    "a ceramic mug on a wooden kitchen counter next to a window",
    "minimalist podium, pastel colours, product photography",
    "sunglasses on the sand at the beach during golden hour",
    # punctuation, numbers, prices, units
    "Hello, world! How are you?? Fine... really!!!",
    "wow!!!", "!", "!!", "?!?!", "--- *** ___ ~~~", "(parentheses) [brackets] {braces} <angles>",
    "1920x1080 resolution, 3.5mm jack, 50% off, $19.99, 2024-01-31, 12:30pm",
    "x² + y² = z², ½ cup, Ⅻ o'clock, ٣ apples", "#hashtag @mention https://example.com/a?b=c&d=e",
    'quotes "double" \'single\' `backtick` back\\slash / forward/slash',
    # contractions (CLIP's regex keeps 's 't 're 've 'm 'll 'd as words)
    "it's the cat's toy", "don't, won't, can't", "we're here, they've gone, I'm fine, you'll see, she'd know",
    "IT'S UPPER CASE DON'T", "it’s a curly apostrophe", "rock 'n' roll", "'''quoted'''",
    # lower-casing and letter case
    "PhotoRealistic HDR Render", "ALL CAPS PROMPT", "İstanbul ıı ẞ straße",
    # accents and combining marks (NFC composes e + U+0301 to é)
    "café crème brûlée", "cafe\u0301 cre\u0300me", "naïve Zoë Ångström", "a\u0308o\u0308u\u0308 ÄÖÜ",
    "Ǆemal ǅ ǆ", "ﬁne ﬂour (ligatures)", "ＡＢＣ １２３ full-width",
    # scripts
    "一个红色的杯子放在桌子上", "赤いカップ と 青い皿", "빨간 컵과 파란 접시", "красная чашка на столе",
    "ΟΔΟΣ ΣΟΦΟΣ σοφός", "كوب أحمر على الطاولة", "כוס אדומה", "लाल कप मेज़ पर", "ถ้วยสีแดง",
    "mixed 中文 and English and русский",
    # emoji, ZWJ sequences, flags, skin tones, variation selectors
    "a cup of coffee ☕️ on fire 🔥🔥", "family 👨‍👩‍👧‍👦 and 👍🏽", "flags 🇫🇷🇯🇵", "❤️ love ♥ ★☆",
    # whitespace of every kind: CLIP collapses runs and strips the ends
    "tabs\tand\nnewlines\r\nand  multiple   spaces", "   leading and trailing   ", "\n\t \n",
    "no\u00a0break\u3000ideographic\u2028line\u2029para\x0bvt\x0cff\x85nel",
    # control and format characters (kept as symbols by the fast tokenizer)
    "null\x00byte", "zero\u200bwidth\u200djoiner", "soft\u00adhyphen", "bom\ufeffmark", "replacement\ufffdchar",
    # the special tokens' text inside a prompt
    "a <|endoftext|> b", "<|startoftext|>start", "a <|ENDOFTEXT|> b", "<|EndOfText|>!", "<|endoftext|",
    # html is not unescaped without ftfy
    "fish &amp; chips &lt;3",
    # the empty prompt
    "",
    # long prompts: truncated to 75 tokens + EOS
    "a beautiful product photo, " * 20,
    " ".join(f"word{i}" for i in range(120)),
    "an extremely detailed scene with " + ", ".join(["glass", "chrome", "marble", "velvet", "oak", "linen"] * 15),
    "！" * 100,
]


def _build_oracle_files(folder):
    """vocab.json + merges.txt from the gz, as open_clip's SimpleTokenizer builds its encoder (bytes, bytes</w>,
    merges, then the two special tokens), with the names transformers uses for them."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    chars = [chr(c) for c in cs]
    with resources.files("backdrop.assets").joinpath("bpe_simple_vocab_16e6.txt.gz").open("rb") as f:
        lines = gzip.decompress(f.read()).decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return vocab, [tuple(m.split()) for m in merges]


@pytest.fixture(scope="module")
def oracle_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip_vocab")
    vocab, merges = _build_oracle_files(folder)
    return folder, vocab, merges


@pytest.fixture(scope="module")
def oracles(oracle_files):
    folder = oracle_files[0]
    return {EOS: CLIPTokenizer.from_pretrained(folder), 0: CLIPTokenizer.from_pretrained(folder, pad_token="!")}


@pytest.fixture(scope="module")
def ours():
    return {EOS: Tokenizer.from_assets(), 0: Tokenizer.from_assets(pad_token_id=0)}


def _ref(oracle, texts):
    return oracle(texts, padding="max_length", max_length=MAX, truncation=True, return_tensors="pt")["input_ids"]


def _assert_same(got, want, texts):
    assert got.dtype == torch.long and got.shape == want.shape == (len(texts), MAX)
    bad = [texts[i] for i in (got != want).any(dim=1).nonzero().flatten().tolist()]
    assert not bad, f"{len(bad)} prompts differ, first: {bad[:3]!r}"


def _prompt_of(n, oracle):
    """A prompt of exactly n tokens (before BOS/EOS), counted by the oracle."""
    words = ["red", "chair", "soft", "light", "studio", "table", "glass", "wood"]  # one token each
    text = " ".join(words[i % len(words)] for i in range(n))
    assert len(oracle(text)["input_ids"]) == n + 2
    return text


def test_vocabulary_is_clips(ours, oracle_files, tmp_path):
    folder, vocab, merges = oracle_files
    tok = ours[EOS]
    assert (tok.vocab_size, tok.bos_token_id, tok.eos_token_id, tok.model_max_length) == (49408, BOS, EOS, MAX)
    assert (ours[0].pad_token_id, tok.pad_token_id) == (0, EOS)
    tok.save(tmp_path)
    assert json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8")) == vocab
    saved = (tmp_path / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert saved[0].startswith("#version") and [tuple(line.split()) for line in saved[1:]] == merges


@pytest.mark.parametrize("pad", [EOS, 0], ids=["sd1-pad-eos", "sd2-pad-0"])
def test_ids_match_transformers(pad, ours, oracles):
    tok, oracle = ours[pad], oracles[pad]
    assert len(CORPUS) >= 60
    _assert_same(tok(CORPUS), _ref(oracle, CORPUS), CORPUS)
    for text in CORPUS:  # untruncated, BOS and EOS included
        assert tok.encode(text) == oracle(text)["input_ids"], text
    assert tok("a photo").shape == (1, MAX)


@pytest.mark.parametrize("n", [75, 76, 77])
def test_context_boundary(n, ours, oracles):
    text = _prompt_of(n, oracles[EOS])
    for pad in (EOS, 0):
        row = ours[pad](text)
        _assert_same(row, _ref(oracles[pad], [text]), [text])
        full = ours[pad].encode(text)
        assert len(full) == n + 2
        assert row[0, :MAX - 1].tolist() == full[:MAX - 1] and row[0, -1].item() == EOS  # cut keeps EOS last


@pytest.mark.parametrize("pad", [EOS, 0], ids=["sd1-pad-eos", "sd2-pad-0"])
def test_random_strings_match_transformers(pad, ours, oracles):
    """Any string: random mixes of every character class the tokenizer treats differently."""
    rng = random.Random(1234 + pad)
    pools = ["abcXYZ", " \t\n\r\u00a0\u3000\u2028\x85\x0b", "!?.,'\"-()<>|/\\&;#", "0123456789²½", "éàüßçñÅØ\u0301",
             "猫犬日本語", "привет", "مرحبا", "😀👍🏽\u200d❤️\ufe0f", "Σσς", "\x00\x01\u200b\u00ad\ufeff", "ﬁ１Ａ", "İı"]
    words = ["'s", "'t", "'re", "'ll", "<|endoftext|>", "<|ENDOFTEXT|>", "<|startoftext|>", "photo", "!!!"]
    texts = []
    for _ in range(400):
        parts = [rng.choice(words) if rng.random() < 0.2 else
                 "".join(rng.choice(rng.choice(pools)) for _ in range(rng.randint(1, 5)))
                 for _ in range(rng.randint(0, 40))]
        texts.append(rng.choice(["", " "]).join(parts))
    _assert_same(ours[pad](texts), _ref(oracles[pad], texts), texts)


@pytest.mark.parametrize("pad", [EOS, 0], ids=["sd1-pad-eos", "sd2-pad-0"])
def test_save_round_trip(pad, ours, tmp_path):
    """Ours -> folder -> transformers and ours; then transformers 5's own save (tokenizer.json alone) -> ours."""
    ours[pad].save(tmp_path / "ours")
    want = ours[pad](CORPUS)
    reference = CLIPTokenizer.from_pretrained(tmp_path / "ours")
    reloaded = Tokenizer.from_folder(tmp_path / "ours")
    assert reference.pad_token_id == reloaded.pad_token_id == pad
    _assert_same(_ref(reference, CORPUS), want, CORPUS)
    _assert_same(reloaded(CORPUS), want, CORPUS)
    reference.save_pretrained(tmp_path / "hf")
    assert not (tmp_path / "hf" / "vocab.json").exists()
    from_hf = Tokenizer.from_folder(tmp_path / "hf")
    assert from_hf.pad_token_id == pad
    _assert_same(from_hf(CORPUS), want, CORPUS)
    ours[EOS if pad == 0 else 0].save(tmp_path / "hf")  # over it: the stale tokenizer.json must not win
    assert Tokenizer.from_folder(tmp_path / "hf").pad_token_id == (EOS if pad == 0 else 0)


def _flags(content, normalized, typed=False):
    tok = {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False, "single_word": False}
    return {"__type": "AddedToken", **tok} if typed else tok


# The layouts diffusers checkpoints ship. Old folders (2022): AddedToken dicts with normalized=true in both files,
# the pad token a plain string, SD2's "!" only in special_tokens_map.json. Folders saved by transformers >= 4.34
# carry `added_tokens_decoder` in tokenizer_config.json, and then special_tokens_map.json is not read at all.
_OLD_CONFIG = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
               "bos_token": _flags("<|startoftext|>", True, True), "eos_token": _flags("<|endoftext|>", True, True),
               "unk_token": _flags("<|endoftext|>", True, True), "pad_token": "<|endoftext|>"}
_OLD_MAP = {"bos_token": _flags("<|startoftext|>", True), "eos_token": _flags("<|endoftext|>", True),
            "unk_token": _flags("<|endoftext|>", True), "pad_token": "<|endoftext|>"}
LAYOUTS = {
    "sd15-old": (_OLD_MAP, _OLD_CONFIG, EOS),
    "sd21-old": ({**_OLD_MAP, "pad_token": "!"}, _OLD_CONFIG, 0),
    "sd21-saved-by-4.x": ({"pad_token": "<|endoftext|>"}, {
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "!",
        "added_tokens_decoder": {"0": {**_flags("!", False), "special": True},
                                 "49406": {**_flags("<|startoftext|>", True), "special": True},
                                 "49407": {**_flags("<|endoftext|>", True), "special": True}}}, 0),
    "vocab-and-merges-only": (None, None, EOS),
    # hand-edited: `normalized` left out defaults to `not special`, decided after transformers makes roles special
    "hand-edited-config": (None, {"bos_token": _flags("<|startoftext|>", False, True),
                                  "eos_token": {**_flags("<|endoftext|>", True, True), "special": False},
                                  "unk_token": _flags("<|endoftext|>", True, True),
                                  "pad_token": {k: v for k, v in _flags("<|endoftext|>", None, True).items()
                                                if k != "normalized"}}, EOS),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_from_folder_matches_transformers(layout, oracle_files, tmp_path):
    """The pad id and, through each special token's `normalized` flag, whether "<|ENDOFTEXT|>" is EOS."""
    token_map, config, pad = LAYOUTS[layout]
    folder = oracle_files[0]
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    for name, content in (("special_tokens_map.json", token_map), ("tokenizer_config.json", config)):
        if content is not None:
            (tmp_path / name).write_text(json.dumps(content), encoding="utf-8")
    reference, tok = CLIPTokenizer.from_pretrained(tmp_path), Tokenizer.from_folder(tmp_path)
    assert reference.pad_token_id == tok.pad_token_id == pad
    _assert_same(tok(CORPUS), _ref(reference, CORPUS), CORPUS)


def test_decode_matches_transformers(ours, oracles):
    for pad in (EOS, 0):
        for row in ours[pad](CORPUS):
            assert ours[pad].decode(row) == oracles[pad].decode(row, skip_special_tokens=True)
    assert ours[EOS].decode(ours[EOS]("A Red  Chair!")[0]) == "a red chair !"


def test_from_folder_errors_name_the_problem(ours, tmp_path):
    ours[EOS].save(tmp_path / "ok")
    missing = tmp_path / "no_merges"
    missing.mkdir()
    (missing / "vocab.json").write_bytes((tmp_path / "ok" / "vocab.json").read_bytes())
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        Tokenizer.from_folder(missing)
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        Tokenizer.from_folder(tmp_path / "ok" / "..")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_folder(tmp_path / "nowhere")

    (missing / "merges.txt").write_text("#version: 0.2\ni n\nt h e x\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"merges.txt:3"):
        Tokenizer.from_folder(missing)
    (missing / "merges.txt").write_text("#version: 0.2\ni n\n\u2603 n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="merges.txt:3: merge '\u2603 n' uses '\u2603', which is not in the vocabulary"):
        Tokenizer.from_folder(missing)

    bad = tmp_path / "ok"
    (bad / "special_tokens_map.json").unlink()
    config = json.loads((bad / "tokenizer_config.json").read_text(encoding="utf-8"))
    (bad / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 1000}), encoding="utf-8")
    with pytest.raises(ValueError, match="tokenizer_config.json: model_max_length"):
        Tokenizer.from_folder(bad)
    del config["added_tokens_decoder"]
    (bad / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": "<pad>"}), encoding="utf-8")
    with pytest.raises(ValueError, match="pad_token '<pad>' is not in the vocabulary"):
        Tokenizer.from_folder(bad)
    with pytest.raises(ValueError, match="pad_token_id"):
        Tokenizer.from_assets(pad_token_id=49408)
    (bad / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {}}}), encoding="utf-8")
    with pytest.raises(ValueError, match="tokenizer.json: not a CLIP tokenizer"):
        Tokenizer.from_folder(bad)


def test_bad_text_input(ours):
    tok = ours[EOS]
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        tok(["a photo", 3])
    with pytest.raises(TypeError, match="str or a list of str"):
        tok(None)
    assert tok([]).shape == (0, MAX)


def test_batch_of_64_is_fast(ours):
    """64 long prompts of made-up words (no BPE cache hits) in ~25 ms of CPU: the BPE runs in Rust. A Python BPE
    loop over the same words (open_clip's) takes ~250 ms. CPU time, not wall time: CI machines are shared and the
    Rust thread pool's wall time swings with their load; process_time counts all of our threads."""
    tok = ours[EOS]
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    prompts = [" ".join("".join(rng.choice(letters) for _ in range(rng.randint(3, 9))) for _ in range(60))
               for _ in range(64)]
    tok(prompts)
    best = float("inf")
    for _ in range(5):
        start = time.process_time()
        ids = tok(prompts)
        best = min(best, time.process_time() - start)
    assert ids.shape == (64, MAX) and (ids[:, -1] == EOS).all()  # every prompt is over 75 tokens
    assert best < 0.1, f"tokenizing 64 prompts took {best * 1000:.1f} ms of CPU"
