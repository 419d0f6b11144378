"""A tokenizer/ folder's files as transformers reads them (nn/tokenizer.py builds the Tokenizer): vocab.json +
merges.txt or tokenizer.json, the special tokens of tokenizer_config.json / special_tokens_map.json, and the tokens
added past the vocabulary (a textual inversion saved into the folder: added_tokens.json, added_tokens_decoder,
tokenizer.json's added_tokens), with the flags each token is registered with."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"  # also CLIP's unknown token and SD1's pad token
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


@dataclass(frozen=True)
class _Added:
    """A token cut out of the raw text before BPE (tokenizers' AddedToken). It is looked for before the normalizer
    unless `normalized`, so only with normalized=True is "<|ENDOFTEXT|>" EOS too; decode skips `special` ones."""
    content: str
    normalized: bool | None = False
    lstrip: bool = False
    rstrip: bool = False
    single_word: bool = False
    special: bool = True

    @classmethod
    def parse(cls, value, where: str, special: bool | None = None) -> "_Added | str":
        """A token string stays a string; an AddedToken dict becomes an _Added (`special` forced when given, else
        the dict's, else False). A missing `normalized` stays None: tokenizers resolves it to `not special` only
        when the token is registered, after transformers may have made it special."""
        if isinstance(value, str):
            return value
        if not (isinstance(value, dict) and isinstance(value.get("content"), str)):
            raise ValueError(f"{where}: expected a token string or an AddedToken dict with 'content', got {value!r}")
        normalized = value.get("normalized")
        return cls(value["content"], normalized=None if normalized is None else bool(normalized),
                   lstrip=bool(value.get("lstrip", False)), rstrip=bool(value.get("rstrip", False)),
                   single_word=bool(value.get("single_word", False)),
                   special=bool(value.get("special", False)) if special is None else special)

    def resolved(self) -> "_Added":
        return self if self.normalized is not None else replace(self, normalized=not self.special)

    def as_dict(self) -> dict:  # AddedToken's JSON form, as in tokenizer_config.json
        return asdict(self)


def _read_json(file: str):
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None


def _write_json(file: str, obj) -> None:
    with open(file, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=2 if len(obj) < 100 else None)
        f.write("\n")


def _read_merges(file: str, vocab: dict[str, int]) -> list[tuple[str, str]]:
    """merges.txt: one "left right" pair a line by rank, after an optional "#version" header."""
    with open(file, encoding="utf-8") as f:
        lines = f.read().split("\n")
    start = 1 if lines and lines[0].startswith("#version") else 0
    numbered = [(n, line.split()) for n, line in enumerate(lines[start:], start=start + 1) if line.strip()]
    for n, pair in numbered:
        _check_merge(pair, vocab, f"{file}:{n}")
    return [(a, b) for _, (a, b) in numbered]


def _check_merge(pair: list[str], vocab: dict[str, int], where: str) -> None:
    """Both sides of a merge and their concatenation must be tokens of the vocabulary."""
    if len(pair) != 2:
        raise ValueError(f"{where}: expected two symbols separated by a space, got {' '.join(pair)!r}")
    a, b = pair
    if a not in vocab or b not in vocab or a + b not in vocab:
        sym = next(s for s in (a, b, a + b) if s not in vocab)
        raise ValueError(f"{where}: merge '{a} {b}' uses {sym!r}, which is not in the vocabulary")


def _read_tokenizer_json(file: str) -> tuple[dict[str, int], list[tuple[str, str]], list[_Added], dict[int, str]]:
    """The vocabulary, merges and added tokens of a `tokenizers` file (what transformers 5 saves), and those of the
    added tokens past the vocabulary (id -> token). Its normalizer and pre-tokenizer are ignored, as transformers'
    CLIPTokenizer ignores them: they are CLIP's by definition."""
    data = _read_json(file)
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE" or model.get("end_of_word_suffix") != "</w>":
        raise ValueError(f"{file}: not a CLIP tokenizer (expected model.type 'BPE' with end_of_word_suffix '</w>')")
    vocab, merges = model.get("vocab"), model.get("merges")
    if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
        raise ValueError(f"{file}: model.vocab must map token -> integer id")
    if not isinstance(merges, list):
        raise ValueError(f"{file}: model.merges must be a list")
    merges = [m.split(" ") if isinstance(m, str) else list(m) for m in merges]  # "a b" (older files) or [a, b]
    for i, pair in enumerate(merges):
        _check_merge(pair, vocab, f"{file}: model.merges[{i}]")
    added = []
    for i, entry in enumerate(data.get("added_tokens") or []):
        tok = _Added.parse(entry, f"{file}: added_tokens[{i}]")
        beyond = not isinstance(tok, str) and tok.content not in vocab and isinstance(entry.get("id"), int) \
            and entry["id"] >= len(vocab)  # a textual inversion saved into the folder (from_folder checks ids)
        if isinstance(tok, str) or (vocab.get(tok.content) != entry.get("id") and not beyond):
            raise ValueError(f"{file}: added_tokens[{i}] {entry!r} is neither a token of model.vocab with that id "
                             "nor one past its end")
        added.append((entry["id"], tok))
    return vocab, [tuple(m) for m in merges], [tok for _, tok in sorted(added, key=lambda it: it[0])], \
        {i: tok.content for i, tok in added if tok.content not in vocab}


def _added_tokens_json(path: str, vocab: dict[str, int], beyond: dict[int, str] | None) -> list[_Added]:
    """added_tokens.json, {token: id}, as transformers 4.x saved the tokens add_tokens added (a textual inversion
    saved with its model): registered as add_tokens registers them (not special, matched after the normalizer)."""
    file = os.path.join(path, "added_tokens.json")
    if not os.path.isfile(file):
        return []
    data = _read_json(file)
    if not isinstance(data, dict) or not all(isinstance(i, int) for i in data.values()):
        raise ValueError(f"{file}: expected a JSON object mapping token -> integer id")
    out = []
    for token, i in sorted(data.items(), key=lambda kv: kv[1]):
        if token not in vocab and i >= len(vocab) and beyond is not None:
            beyond[i] = token
        elif vocab.get(token) != i:
            raise ValueError(f"{file}: {token!r} has id {i}, the vocabulary gives {vocab.get(token)}")
        out.append(_Added(token, normalized=None, special=False))
    return out


def _read_specials(path: str, config: dict, vocab: dict[str, int], file_added: list[_Added] | None = None,
                   beyond: dict[int, str] | None = None) -> tuple[dict[str, str], list[_Added]]:
    """The special tokens by role and every added token with its flags (those past the vocabulary also put in
    `beyond`, id -> token), as transformers 5.x's CLIPTokenizer.from_pretrained resolves them
    (tokenization_utils_base.from_pretrained, TokenizersBackend.__init__).

    Where the roles come from: a tokenizer_config.json with `added_tokens_decoder` (transformers >= 4.34 writes
    one) is the only source; in older folders special_tokens_map.json wins over tokenizer_config.json. SD2's old
    folders name the pad token "!" in special_tokens_map.json only, so this order decides SD2's pad id.
    Which flags a token gets: the decoder's entries (else a tokenizer.json's added tokens and added_tokens.json's)
    are registered first; then each role in SPECIAL_KEYS order, unless its token is a decoder entry or an equal
    value was queued already; plain strings are special and not normalized, and the last registration of a token
    wins. So in SD1.5's old folder (eos_token and unk_token normalized, pad_token the plain string "<|endoftext|>")
    EOS ends up not normalized: "<|ENDOFTEXT|>" is BPE'd.
    """
    config_file = os.path.join(path, "tokenizer_config.json")
    decoder = config.get("added_tokens_decoder")
    roles: dict[str, _Added | str] = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN,
                                      "pad_token": EOS_TOKEN}  # CLIPTokenizer.__init__'s defaults
    queue: list[_Added | str] = []
    if decoder is not None:
        if not isinstance(decoder, dict):
            raise ValueError(f"{config_file}: added_tokens_decoder must be an object id -> token")
        if not all(str(k).isdigit() for k in decoder):
            raise ValueError(f"{config_file}: added_tokens_decoder keys must be token ids")
        for idx, value in sorted(decoder.items(), key=lambda kv: int(kv[0])):
            tok = _Added.parse(value, f"{config_file}: added_tokens_decoder[{idx}]")
            tok = _Added(tok) if isinstance(tok, str) else tok
            if tok.content not in vocab and int(idx) >= len(vocab) and beyond is not None:
                beyond[int(idx)] = tok.content  # past the vocabulary: a textual inversion saved into the folder
            elif str(vocab.get(tok.content)) != str(idx):
                raise ValueError(f"{config_file}: added_tokens_decoder gives {tok.content!r} id {idx}, vocab.json "
                                 f"gives {vocab.get(tok.content)}")
            queue.append(tok)
        roles.update({k: _Added.parse(config[k], f"{config_file}: {k}") for k in SPECIAL_KEYS
                      if config.get(k) is not None})
    else:
        queue.extend(file_added or [])
        queue.extend(_added_tokens_json(path, vocab, beyond))
        map_file = os.path.join(path, "special_tokens_map.json")
        token_map = _read_json(map_file) if os.path.isfile(map_file) else {}
        if not isinstance(token_map, dict):
            raise ValueError(f"{map_file}: expected a JSON object")
        for k in SPECIAL_KEYS:
            if token_map.get(k) is not None:
                roles[k] = _Added.parse(token_map[k], f"{map_file}: {k}", special=True)
            elif config.get(k) is not None:
                roles[k] = _Added.parse(config[k], f"{config_file}: {k}")
    from_decoder = {t.content for t in queue}
    for k in SPECIAL_KEYS:
        v = roles.get(k)
        if v is not None and getattr(v, "content", v) not in from_decoder and not any(_same(v, q) for q in queue):
            queue.append(v)
    specials = {k: getattr(v, "content", v) for k, v in roles.items()}
    named = set(specials.values())
    added = []
    for tok in queue:  # transformers makes every role's token special; then the normalized default applies
        tok = _Added(tok) if isinstance(tok, str) else replace(tok, special=tok.special or tok.content in named)
        added.append(tok.resolved())
    return specials, added


def _same(a: _Added | str, b: _Added | str) -> bool:
    """Python's AddedToken equality, which decides whether transformers queues a role's token again: all flags
    compared, a missing `normalized` read as `not special`; a plain string equals only the same string."""
    if isinstance(a, _Added) and isinstance(b, _Added):
        return a.resolved() == b.resolved()
    return a == b
