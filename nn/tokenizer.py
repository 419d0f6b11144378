"""The CLIP byte-level BPE tokenizer of the SD1/SD2 text encoders, on the Rust `tokenizers` library.

Ids equal transformers 5's `CLIPTokenizer` (for 4.x see below) called with padding="max_length", max_length=77,
truncation=True, for any string. The pipeline, all of it run by the Rust library (no Python BPE loop):

  added tokens     <|startoftext|>, <|endoftext|> (and the pad token) are cut out of the raw text first and
                   map straight to their ids; their `normalized` flag says whether they are matched before
                   (False) or after (True) the normalizer, i.e. whether "<|ENDOFTEXT|>" is one as well
  normalizer       NFC, every run of whitespace -> " ", lower-case
  pre-tokenizer    CLIP's regex (openai/CLIP simple_tokenizer.py) keeps letter runs, single digits, runs of
                   other symbols and the contractions 's 't 're 've 'm 'll 'd, and drops the whitespace, which
                   is CLIP's `whitespace_clean` (collapse, strip); then GPT-2's byte-to-unicode map
  model            BPE over the bytes of each word; the last symbol of a word carries the suffix "</w>"
  post-processor   <|startoftext|> $A <|endoftext|>; truncation keeps EOS, padding with the family's pad id

What ftfy would change. openai/CLIP and open_clip (what the text encoders were trained with) and transformers 4.x's
slow `CLIPTokenizer` *with* ftfy installed clean the text with `ftfy.fix_text` + `html.unescape` twice instead of
plain NFC: curly quotes become straight ("it’s" then splits as it + 's), "&amp;" becomes "&", full-width forms
and ligatures are folded and mojibake is repaired. Without ftfy, the 4.x slow tokenizer ran BERT's BasicTokenizer
instead, which differs from us on: CJK ideographs (each one becomes its own word), control and format characters
(U+0000, vertical tab, form feed, U+0085, U+200D ZWJ, soft hyphen: dropped, so the words either side join), a
capital sigma ending a word (Python's lower() gives "ς", Rust's per-character lower-case "σ"), and upper-case
"<|ENDOFTEXT|>" (the slow tokenizer always gave EOS). 4.x's CLIPTokenizerFast differed from us only on the last
point (it registered the special tokens normalized); measured on the test corpus and 2,000 random strings with
SD1.5- and SD2.1-style folders. transformers 5.x has no slow CLIP tokenizer and never uses ftfy; its CLIPTokenizer
is what we match. Everyday prompts (printable text, no HTML entities, no special-token text) agree on every path.

The SD2 quirk: its tokenizer pads with "!" (id 0), and transformers registers the pad token as a special added
token, so every "!" in an SD2 prompt becomes id 0 on its own ("wow!!!" -> wow, 0, 0, 0), where SD1 gives one
"!!!</w>" token. We keep that, because the reference pipeline (and so the tests) does it.
"""
from __future__ import annotations

import gzip
import os
from functools import lru_cache
from importlib import resources
from typing import Sequence

import torch
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as _Backend

from .tokenizer_files import (BOS_TOKEN, EOS_TOKEN, SPECIAL_KEYS, _Added, _read_json, _read_merges, _read_specials,
                              _read_tokenizer_json, _write_json)

__all__ = ["Tokenizer", "CONTEXT_LENGTH", "BOS_TOKEN", "EOS_TOKEN", "check_texts"]

CONTEXT_LENGTH = 77          # CLIP's text context: 77 positions = BOS + 75 tokens + EOS
ASSET = "bpe_simple_vocab_16e6.txt.gz"  # openai/CLIP's merges, shipped with open_clip (assets/LICENSE-open_clip.txt)
# CLIP uses the first 49152 - 256 - 2 = 48894 merges of the file, so that bytes + merges + 2 specials = 49152;
# with the 256 "</w>" byte forms the vocabulary has 49408 ids (open_clip tokenizer.py, SimpleTokenizer.__init__).
NUM_MERGES = 49152 - 256 - 2
# openai/CLIP simple_tokenizer.py; applied after lower-casing, so its re.IGNORECASE is not needed here.
CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters (openai/gpt-2 encoder.py): printable
    Latin-1 bytes map to themselves, the other 68 to chr(256 + n). The order of this dict is the order of ids 0..255."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    shifted = (b for b in range(256) if b not in table)
    table.update({b: chr(256 + n) for n, b in enumerate(shifted)})
    return table


@lru_cache(maxsize=1)
def _asset_vocab() -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """Tokens in id order and merges in rank order, built from the shipped gz exactly as open_clip does."""
    with resources.files("backdrop.assets").joinpath(ASSET).open("rb") as f:
        lines = gzip.decompress(f.read()).decode("utf-8").split("\n")
    merges = tuple(tuple(line.split()) for line in lines[1:NUM_MERGES + 1])  # line 0 is a "#version" header
    byte_chars = list(bytes_to_unicode().values())
    tokens = (*byte_chars, *(c + "</w>" for c in byte_chars), *("".join(m) for m in merges), BOS_TOKEN, EOS_TOKEN)
    return tokens, merges


class Tokenizer:
    """CLIP tokenizer: `tok(texts)` -> (B, 77) int64 ids. Build with `from_assets` or `from_folder`."""

    model_max_length = CONTEXT_LENGTH

    def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]],
                 specials: dict[str, str] | None = None, added: Sequence[_Added] = (), source: str = "vocabulary"):
        """`vocab`: token -> id (ids 0..N-1); `merges`: BPE merges by rank; `specials`: role (bos_token, eos_token,
        unk_token, pad_token, ...) -> token, CLIPTokenizer's defaults for the roles left out; `added`: the tokens
        cut out of the text with their flags, a later one winning (a role's token not among them: special, not
        normalized)."""
        specials = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": EOS_TOKEN,
                    **(specials or {})}
        if sorted(vocab.values()) != list(range(len(vocab))):
            raise ValueError(f"{source}: token ids must be exactly 0..{len(vocab) - 1}, each once")
        for what, content in [*specials.items(), *(("added token", t.content) for t in added)]:
            if content not in vocab:
                raise ValueError(f"{source}: {what} {content!r} is not in the vocabulary (tokens beyond it, e.g. "
                                 "from textual inversion, are added later with add_tokens)")
        self._vocab = dict(vocab)
        self._merges = [tuple(m) for m in merges]
        self._specials = {k: specials[k] for k in SPECIAL_KEYS if k in specials}
        self._added = {t.content: t.resolved() for t in added}  # a token given twice keeps its last flags
        for content in self._specials.values():
            self._added.setdefault(content, _Added(content))
        self.vocab_size = len(vocab)
        self._built_size = len(vocab)  # ids from here on came from add_tokens
        self._extra: list[str] = []  # add_tokens' tokens, in id order (id = _built_size + position)
        self._expand: dict[int, tuple[int, ...]] = {}  # a multi-vector token's id -> its ids (add_tokens)
        for t in self._added:  # a textual inversion saved into the folder: T stands for T, T_1, ... as diffusers'
            n = next(i for i in range(1, len(vocab) + 1) if f"{t}_{i}" not in self._added)  # maybe_convert_prompt
            if n > 1:
                self._expand[vocab[t]] = tuple(vocab[t if i == 0 else f"{t}_{i}"] for i in range(n))
        self.bos_token_id = vocab[specials["bos_token"]]
        self.eos_token_id = vocab[specials["eos_token"]]
        self.pad_token_id = vocab[specials["pad_token"]]
        self._backend = self._build_backend()

    def _build_backend(self) -> _Backend:
        bos, eos = self._specials["bos_token"], self._specials["eos_token"]
        backend = _Backend(models.BPE(
            vocab=self._vocab, merges=self._merges, dropout=None, fuse_unk=False,
            continuing_subword_prefix="", end_of_word_suffix="</w>",  # CLIP marks word ends, not continuations
            unk_token=self._specials["unk_token"],                   # never used: all 512 byte symbols are in vocab
        ))
        backend.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            # invert=True: the regex matches are the words; what it does not match (whitespace) is removed
            pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
            # use_regex=True re-splits with GPT-2's pattern, as transformers does; a no-op on CLIP's words except
            # a lower-cased "<|endoftext|>" that was not matched as a special token: it becomes "<|", "endoftext", "|>"
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
        backend.decoder = decoders.ByteLevel()
        backend.add_tokens([AddedToken(t.content, special=t.special, normalized=t.normalized, lstrip=t.lstrip,
                                       rstrip=t.rstrip, single_word=t.single_word) for t in self._added.values()])
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A {eos}", special_tokens=[(bos, self.bos_token_id), (eos, self.eos_token_id)])
        return backend

    def add_tokens(self, groups: Sequence[tuple[str, int]]) -> list[int]:
        """Append textual inversion's tokens to the vocabulary (nn/textual_inversion.py) and return their ids.

        groups: (token, n) pairs; token, token_1, ..., token_{n-1} get the next ids, and `token` in a text stands
        for all n (diffusers' maybe_convert_prompt writes them out in the text; we do it on the ids, so "<Tok>"
        expands too). Registered as transformers' add_tokens registers a string: not special (decode keeps it),
        matched after the normalizer (so case-insensitively). remove_added_tokens() undoes every call."""
        names = [name for token, n in groups for name in [token, *(f"{token}_{i}" for i in range(1, n))]]
        taken = next((t for i, t in enumerate(names) if t in self._vocab or t in names[:i]), None)
        if taken is not None:
            raise ValueError(f"token {taken!r} is already in the vocabulary")
        ids = list(range(len(self._vocab), len(self._vocab) + len(names)))
        for name, i in zip(names, ids):
            self._vocab[name] = i
            self._added[name] = _Added(name, normalized=True, special=False)
        self._extra += names
        for token, n in groups:
            if n > 1:
                self._expand[self._vocab[token]] = tuple(range(self._vocab[token], self._vocab[token] + n))
        self.vocab_size = len(self._vocab)
        self._backend = self._build_backend()
        return ids

    def remove_added_tokens(self) -> int:
        """Drop every token add_tokens added, so the tokenizer is again as built; returns how many there were."""
        extra, self._extra = self._extra, []
        for t in extra:
            del self._vocab[t], self._added[t]
        self._expand = {i: ids for i, ids in self._expand.items() if i < self._built_size}  # the folder's stay
        self.vocab_size = len(self._vocab)
        if extra:
            self._backend = self._build_backend()
        return len(extra)

    def __contains__(self, token: str) -> bool:
        """Whether `token` (a vocabulary entry: "cat</w>" ends a word, "cat" starts one) has an id."""
        return token in self._vocab

    def taken_by(self, token: str) -> str | None:
        """The entry a new add_tokens token would shadow, or None. Added tokens are matched after the normalizer
        (case-insensitively), so "Cat" would take every "cat" of a prompt: an entry is shadowed when it equals
        the token's normalized form as a word or word start ("cat</w>", "cat") or as an added token, the folder's
        own or a loaded one ("<DOG>" and "<Dog>")."""
        def norm(t: str) -> str:
            return self._backend.normalizer.normalize_str(t)
        key = norm(token)
        return next((t for t in (key + "</w>", key) if t in self._vocab and self._vocab[t] < self._built_size),
                    next((t for t in self._added if norm(t) == key), None))

    def _expanded(self, ids: list[int]) -> list[int]:
        """ids with every multi-vector token written out as its n ids (add_tokens)."""
        return [j for i in ids for j in self._expand.get(i, (i,))] if self._expand else ids

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_assets(cls, pad_token_id: int = 49407) -> "Tokenizer":
        """The real CLIP vocabulary shipped in assets/. SD1 pads with <|endoftext|> (49407), SD2 with "!" (0)."""
        tokens, merges = _asset_vocab()
        if not isinstance(pad_token_id, int) or not 0 <= pad_token_id < len(tokens):
            raise ValueError(f"pad_token_id must be an id in [0, {len(tokens)}), got {pad_token_id!r}")
        return cls({t: i for i, t in enumerate(tokens)}, merges,
                   {"pad_token": tokens[pad_token_id]}, source=f"assets/{ASSET}")

    @classmethod
    def from_folder(cls, path: str | os.PathLike) -> "Tokenizer":
        """A diffusers `tokenizer/` folder: vocab.json + merges.txt as the published SD folders ship them, or the
        tokenizer.json that transformers 5 saves instead (preferred when present, as transformers does), plus the
        special tokens (the pad token above all) from tokenizer_config.json / special_tokens_map.json."""
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"tokenizer folder {path!r} does not exist")
        fast_file = os.path.join(path, "tokenizer.json")
        if os.path.isfile(fast_file):
            vocab, merges, file_added, past = _read_tokenizer_json(fast_file)
        else:
            for name in ("vocab.json", "merges.txt"):
                if not os.path.isfile(os.path.join(path, name)):
                    raise FileNotFoundError(f"tokenizer folder {path!r} has no {name} (a CLIP tokenizer needs "
                                            "vocab.json and merges.txt, or a tokenizer.json)")
            vocab_file = os.path.join(path, "vocab.json")
            vocab = _read_json(vocab_file)
            if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
                raise ValueError(f"{vocab_file}: expected a JSON object mapping token -> integer id")
            merges, file_added, past = _read_merges(os.path.join(path, "merges.txt"), vocab), None, {}
        config_file = os.path.join(path, "tokenizer_config.json")
        config = _read_json(config_file) if os.path.isfile(config_file) else {}
        if not isinstance(config, dict):
            raise ValueError(f"{config_file}: expected a JSON object")
        cls_name = config.get("tokenizer_class", "CLIPTokenizer")
        if cls_name not in ("CLIPTokenizer", "CLIPTokenizerFast"):
            raise ValueError(f"{config_file}: tokenizer_class {cls_name!r} is not a CLIP tokenizer")
        # int(1e30) is transformers' "no limit set" (VERY_LARGE_INTEGER), written by folders saved without one
        if config.get("model_max_length", CONTEXT_LENGTH) not in (CONTEXT_LENGTH, int(1e30)):
            raise ValueError(f"{config_file}: model_max_length is {config['model_max_length']}; the CLIP text "
                             f"encoder has {CONTEXT_LENGTH} positions")
        beyond: dict[int, str] = dict(past)  # id -> token: added past the vocabulary (a textual inversion saved in)
        specials, added = _read_specials(path, config, vocab, file_added, beyond)
        for i in sorted(beyond):
            if i != len(vocab):
                raise ValueError(f"{path}: added token {beyond[i]!r} has id {i}, but the vocabulary ends at "
                                 f"{len(vocab) - 1}: added tokens must follow it without a gap")
            vocab = {**vocab, beyond[i]: i}
        return cls(vocab, merges, specials, added, source=path)

    # ------------------------------------------------------------------ use

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        """(B, 77) int64: BOS, tokens, EOS, then pad. A prompt over 75 tokens keeps its first 75 and its EOS."""
        texts = check_texts(texts)
        ids = torch.full((len(texts), CONTEXT_LENGTH), self.pad_token_id, dtype=torch.long)  # (B, 77)
        # encode_batch runs normalization, pre-tokenization and BPE in Rust (in parallel); only the per-prompt
        # copy into the tensor is Python. Truncating after the post-processor equals transformers' truncation
        # (75 tokens, then BOS/EOS added): the first 76 ids are the same either way, and EOS closes the row.
        for row, enc in enumerate(self._backend.encode_batch(texts, add_special_tokens=True)):
            seq = self._expanded(enc.ids)
            if len(seq) > CONTEXT_LENGTH:
                seq = seq[:CONTEXT_LENGTH - 1] + [self.eos_token_id]
            ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        return ids

    def encode(self, text: str) -> list[int]:
        """All ids of one prompt, BOS and EOS included, neither truncated nor padded: more than 77 means the
        prompt will be cut (for warnings and tests)."""
        (text,) = check_texts(text)
        return self._expanded(self._backend.encode(text, add_special_tokens=True).ids)

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text back from ids, special tokens (and so padding) skipped; "</w>" ends a word."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        def bpe(run: list[int]) -> str:
            return self._backend.decode(run, skip_special_tokens=True).replace("</w>", " ").strip()
        if not self._extra:
            return bpe(ids)
        words, run = [], []  # add_tokens' tokens are words of their own: decoded apart from the BPE runs
        for i in [*ids, None]:
            if i is None or i >= self._built_size:
                words += [bpe(run)] + ([self._extra[i - self._built_size]] if i is not None else [])
                run = []
            else:
                run.append(i)
        return " ".join(w for w in words if w)

    def save(self, folder: str | os.PathLike) -> None:
        """Write vocab.json, merges.txt, special_tokens_map.json and tokenizer_config.json: a diffusers tokenizer/
        folder that transformers' CLIPTokenizer.from_pretrained and `from_folder` load to the same ids."""
        folder = os.fspath(folder)
        os.makedirs(folder, exist_ok=True)
        stale = os.path.join(folder, "tokenizer.json")  # would take precedence over the files written here
        if os.path.isfile(stale):
            os.remove(stale)
        vocab = dict(sorted(self._vocab.items(), key=lambda kv: kv[1]))
        _write_json(os.path.join(folder, "vocab.json"), vocab)
        with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self._merges))
        # As transformers >= 4.34 writes it: every added token with its flags in `added_tokens_decoder`, the roles
        # as plain strings; transformers 5 then ignores special_tokens_map.json, written for older readers.
        _write_json(os.path.join(folder, "special_tokens_map.json"),
                    {role: self._added[c].as_dict() for role, c in self._specials.items()})
        _write_json(os.path.join(folder, "tokenizer_config.json"), {
            "tokenizer_class": "CLIPTokenizer", "model_max_length": CONTEXT_LENGTH, "do_lower_case": True,
            "add_prefix_space": False, "errors": "replace",
            "added_tokens_decoder": {str(self._vocab[c]): t.as_dict() for c, t in self._added.items()},
            **self._specials,
        })

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos={self.eos_token_id}, pad={self.pad_token_id})"



def check_texts(texts) -> list[str]:
    """`texts` (a str or a list of them) as a list; TypeError for a non-str, ValueError for text that is not valid
    Unicode (a lone surrogate), which the tokenizer cannot encode."""
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, (list, tuple)):
        raise TypeError(f"texts must be a str or a list of str, got {type(texts).__name__}")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] must be a str, got {type(t).__name__}")
        try:
            t.encode("utf-8")  # lone surrogates: JSON "\ud800", or bytes a terminal's argv could not decode
        except UnicodeEncodeError as e:
            raise ValueError(f"prompt {t[:40]!r} is not valid Unicode text (a lone surrogate at character "
                             f"{e.start})") from None
    return list(texts)
