"""Tokenizers in other projects' formats: GPT-2 BPE files in, tokenizer.json / tiktoken out.

- `from_gpt2_files(vocab, merges)`: HF `vocab.json` + `merges.txt`, or OpenAI's
  `encoder.json` + `vocab.bpe` (same content, `#version` header line optional).
- `to_hf_tokenizer_json(tok)`: a `tokenizer.json` for HF `tokenizers` (BPE with
  `ignore_merges`, our split regex, byte-level mapping) that encodes as we do.
- `to_tiktoken_ranks(tok)`: the `.tiktoken` text format (base64 token, rank).

    tok = from_gpt2_files("vocab.json", "merges.txt")
    json.dump(to_hf_tokenizer_json(tok), open("tokenizer.json", "w"))
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from smedjan.errors import UserError
from smedjan.formats import constants as C
from smedjan.io import check_input_file
from smedjan.tokenizer.bytelevel import str_to_token, token_to_str
from smedjan.tokenizer.core import Tokenizer


def from_gpt2_files(vocab_path: str | Path, merges_path: str | Path, chat_specials: bool = True) -> Tokenizer:
    """Build a tokenizer that encodes exactly as the GPT-2 files do."""
    vp = check_input_file(vocab_path, "vocab")
    mp = check_input_file(merges_path, "merges")
    try:
        vocab = json.loads(vp.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{vp}: not a JSON vocabulary ({e.__class__.__name__}: {e})") from None
    if not isinstance(vocab, dict) or not vocab or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in vocab.values()):
        raise UserError(f"{vp}: expected a JSON object mapping token strings to integer ids")
    n = len(vocab)
    # checked without building anything of the size an id claims
    if len(set(vocab.values())) != n or not all(0 <= v < n for v in vocab.values()):
        raise UserError(f"{vp}: token ids are not exactly 0..{n - 1}")
    merges: list[tuple[int, int]] = []
    try:
        lines = mp.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise UserError(f"{mp}: not UTF-8 text ({e})") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip() or (lineno == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise UserError(f"{mp}:{lineno}: expected two space-separated tokens, got {line[:60]!r}")
        if parts[0] not in vocab or parts[1] not in vocab:
            raise UserError(f"{mp}:{lineno}: merge {line[:60]!r} names a token missing from {vp.name}")
        merges.append((vocab[parts[0]], vocab[parts[1]]))
    # Tokens that are neither single bytes nor made by a merge are added specials
    # (GPT-2's <|endoftext|>): their text is taken literally.
    made = {vocab.get(a_s + b_s) for a_s, b_s in (line.split(" ") for line in lines
                                                 if line.strip() and not line.startswith("#version"))}
    tokens: list[bytes] = [b""] * n
    specials: dict[str, int] = {}
    for s, i in vocab.items():
        try:
            raw = str_to_token(s)
        except KeyError:
            raw = None
        if raw is not None and (len(raw) == 1 or i in made):
            tokens[i] = raw
        else:
            tokens[i] = s.encode()
            specials[s] = i
    if chat_specials:
        for s in C.SPECIAL_TOKENS:
            if s not in specials:
                specials[s] = len(tokens)
                tokens.append(s.encode())
    try:
        return Tokenizer(tokens, merges, specials, pattern="gpt2", source=f"import-bpe:{vp.name}")
    except UserError as e:
        raise UserError(f"{vp}: {e}") from None


def to_hf_tokenizer_json(tok: Tokenizer) -> dict:
    """A tokenizer.json that HF `tokenizers` loads and that encodes identically."""
    special_ids = set(tok.specials.values())
    vocab = {token_to_str(t) if i not in special_ids else t.decode(): i for i, t in enumerate(tok.tokens)}
    merges = [[token_to_str(tok.tokens[a]), token_to_str(tok.tokens[b])] for a, b in tok.merges]
    added = [
        {"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for s, i in sorted(tok.specials.items(), key=lambda kv: kv[1])
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": C.PRETOKENIZER_PATTERNS[tok.pattern]},
                 "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        },
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": True,
            "vocab": vocab,
            "merges": merges,
        },
    }


def to_tiktoken_ranks(tok: Tokenizer) -> str:
    """The `.tiktoken` format: one `base64(token bytes) rank` line per ordinary token."""
    special_ids = set(tok.specials.values())
    return "".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(tok.tokens) if i not in special_ids)
