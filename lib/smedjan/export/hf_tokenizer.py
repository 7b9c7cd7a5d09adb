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
    GPT-2 split or one of our split regexes (what `to_hf_tokenizer_json` writes)."""
    from smedjan.tokenizer import Tokenizer
    from smedjan.tokenizer.bytelevel import str_to_token

    p = Path(path)
    data = _read_json(p, "tokenizer.json")
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise UserError(f"model.type {model.get('type')!r} is not a byte-level BPE")
    if model.get("byte_fallback") or data.get("normalizer"):
        raise UserError("byte_fallback or a normalizer (SentencePiece-style BPE) is not supported")
    pt = data.get("pre_tokenizer") or {}
    pattern = None
    if pt.get("type") == "ByteLevel" and pt.get("use_regex", True) and not pt.get("add_prefix_space"):
        pattern = "gpt2"  # HF's ByteLevel regex is GPT-2's split
    elif pt.get("type") == "Sequence" and len(pt.get("pretokenizers", [])) == 2:
        split, bl = pt["pretokenizers"]
        regex = (split.get("pattern") or {}).get("Regex")
        names = {v: k for k, v in C.PRETOKENIZER_PATTERNS.items()}
        if (split.get("type") == "Split" and regex in names and split.get("behavior") == "Isolated"
                and not split.get("invert") and bl.get("type") == "ByteLevel" and not bl.get("use_regex", True)):
            pattern = names[regex]
    if pattern is None:
        raise UserError("pre_tokenizer is neither the GPT-2 nor the Llama-3 split")
    vocab, merges = model.get("vocab"), model.get("merges")
    if not isinstance(vocab, dict) or not isinstance(merges, list):
        raise UserError("model.vocab / model.merges are missing or malformed")
    added = {t["content"]: int(t["id"]) for t in data.get("added_tokens") or []}
    table = {**vocab, **added}
    n = max(table.values()) + 1
    if sorted(set(table.values())) != list(range(n)):
        raise UserError(f"token ids are not exactly 0..{n - 1}")
    tokens: list[bytes] = [b""] * n
    for s, i in table.items():
        if s in added:
            tokens[i] = s.encode()
            continue
        try:
            tokens[i] = str_to_token(s)
        except KeyError:
            raise UserError(f"token {s!r} is not in byte-level form") from None
    pairs = []
    for m in merges:
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        if a not in vocab or b not in vocab:
            raise UserError(f"merge {m!r} names a token missing from the vocabulary")
        pairs.append((vocab[a], vocab[b]))
    return Tokenizer(tokens, pairs, added, pattern=pattern, source=f"hf:{p.name}")


