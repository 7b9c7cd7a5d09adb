"""A smedjan Tokenizer from a Hugging Face tokenizer.json (byte-level BPE with the GPT-2 or
one of our split regexes: what `smedjan.tokenizer.hf.to_hf_tokenizer_json` writes).

    tok = tokenizer_from_hf_json("tiny-random-llama/tokenizer.json")
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from smedjan.errors import UserError
from smedjan.formats import constants as C


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: malformed {what} ({e.__class__.__name__}: {e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: {what} is not a JSON object")
    return data


def tokenizer_from_hf_json(path: str | os.PathLike):
    """A smedjan Tokenizer from a byte-level BPE tokenizer.json whose pre-tokenizer is the
    GPT-2 split or one of our split regexes (what `to_hf_tokenizer_json` writes). Every
    part is type-checked before use: anything else is a UserError (a one-line reason)."""
    from smedjan.tokenizer import Tokenizer
    from smedjan.tokenizer.bytelevel import str_to_token

    def table(x, what: str) -> dict:
        if x is None:
            return {}
        if not isinstance(x, dict):
            raise UserError(f"{what} is {type(x).__name__}, expected an object")
        return x

    def index(i) -> bool:
        return isinstance(i, int) and not isinstance(i, bool)

    p = Path(path)
    data = _read_json(p, "tokenizer.json")
    model = table(data.get("model"), "model")
    if model.get("type") != "BPE":
        raise UserError(f"model.type {model.get('type')!r} is not a byte-level BPE")
    if model.get("byte_fallback") or data.get("normalizer"):
        raise UserError("byte_fallback or a normalizer (SentencePiece-style BPE) is not supported")
    pt = table(data.get("pre_tokenizer"), "pre_tokenizer")
    pattern = None
    steps = pt.get("pretokenizers")
    if pt.get("type") == "ByteLevel" and pt.get("use_regex", True) and not pt.get("add_prefix_space"):
        pattern = "gpt2"  # HF's ByteLevel regex is GPT-2's split
    elif (pt.get("type") == "Sequence" and isinstance(steps, list) and len(steps) == 2
          and all(isinstance(x, dict) for x in steps)):
        split, bl = steps
        regex = table(split.get("pattern"), "pre_tokenizer pattern").get("Regex")
        names = {v: k for k, v in C.PRETOKENIZER_PATTERNS.items()}
        if (split.get("type") == "Split" and isinstance(regex, str) and regex in names
                and split.get("behavior") == "Isolated" and not split.get("invert")
                and bl.get("type") == "ByteLevel" and not bl.get("use_regex", True)):
            pattern = names[regex]
    if pattern is None:
        raise UserError("pre_tokenizer is neither the GPT-2 nor the Llama-3 split")
    vocab, merges = model.get("vocab"), model.get("merges")
    if not isinstance(vocab, dict) or not isinstance(merges, list) or not all(index(i) for i in vocab.values()):
        raise UserError("model.vocab / model.merges are missing or malformed")
    added_list = data.get("added_tokens") or []
    if not isinstance(added_list, list) or not all(
            isinstance(t, dict) and isinstance(t.get("content"), str) and index(t.get("id")) for t in added_list):
        raise UserError("added_tokens is not a list of {content, id}")
    added = {t["content"]: t["id"] for t in added_list}
    both = {**vocab, **added}
    n = len(both)
    # ids exactly 0..n-1: checked without building anything of the size an id claims
    if len(set(both.values())) != n or not all(0 <= i < n for i in both.values()):
        raise UserError(f"token ids are not exactly 0..{n - 1}")
    tokens: list[bytes] = [b""] * n
    for s, i in both.items():
        if s in added:
            try:
                tokens[i] = s.encode()
            except UnicodeEncodeError:  # a lone surrogate
                raise UserError(f"added token {s!r} is not valid Unicode") from None
            continue
        try:
            tokens[i] = str_to_token(s)
        except KeyError:
            raise UserError(f"token {s!r} is not in byte-level form") from None
    pairs = []
    for m in merges:
        parts = m.split(" ", 1) if isinstance(m, str) else m
        if not (isinstance(parts, list) and len(parts) == 2 and all(isinstance(x, str) for x in parts)):
            raise UserError(f"merge {m!r} is not two tokens")
        a, b = parts
        if a not in vocab or b not in vocab:
            raise UserError(f"merge {m!r} names a token missing from the vocabulary")
        pairs.append((vocab[a], vocab[b]))
    return Tokenizer(tokens, pairs, added, pattern=pattern, source=f"hf:{p.name}")
