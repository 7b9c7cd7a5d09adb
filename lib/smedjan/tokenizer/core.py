"""The byte-level BPE tokenizer: tokenizer.bin format, encoding and decoding.

Semantics (identical in the reference encoder, tiktoken, HF `tokenizers` with
`ignore_merges` and llama.cpp's "llama-bpe"/"gpt-2" pre-tokenizers):
1. split the text into pieces with the pre-tokenizer regex (`C.PRETOKENIZER_PATTERNS`);
2. a piece whose bytes are a token becomes that token;
3. otherwise start from its bytes and repeatedly merge the adjacent pair of lowest
   merge rank (leftmost first) until no pair is a merge.
Merge rank i produces the token with the i-th smallest id above the bytes, so tiktoken,
which ranks pairs by the id of their concatenation, gives the same ids.

Special tokens (`<|bos|>`, the chat markers) are never produced from text: `encode`
treats their spelling as ordinary characters. `decode` never raises on valid ids:
bytes that are not valid UTF-8 (a sequence cut inside a character) become U+FFFD.

tokenizer.bin: the smedjan header (`smedjan.formats.binfile`) with JSON
{kind, pattern, vocab_size, n_merges, specials, fingerprint, payload_bytes, source, and for a
trained one `corpus`: the files it read, with hub datasets and commits}, then
  u32[vocab_size] token byte lengths | token bytes, concatenated | u32[n_merges, 2] merges
The fingerprint is the first 16 hex digits of SHA-256 over pattern, specials and
payload: every artifact made with this tokenizer records it.

    tok = Tokenizer.load("tokenizer.bin")
    ids = tok.encode("Hello world")
    assert tok.decode(ids) == "Hello world"
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import cached_property
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from smedjan.errors import UserError
from smedjan.formats import constants as C
from smedjan.formats.binfile import encode_header, read_header_from
from smedjan.io import atomic_write, check_input_file


class Tokenizer:
    """A byte-level BPE vocabulary: token bytes by id, merges by rank, special tokens."""

    def __init__(self, tokens: Sequence[bytes], merges: Sequence[tuple[int, int]], specials: dict[str, int],
                 pattern: str = C.DEFAULT_PRETOKENIZER, source: str = "trained"):
        if pattern not in C.PRETOKENIZER_PATTERNS:
            raise UserError(f"unknown pre-tokenizer {pattern!r}; known: {', '.join(C.PRETOKENIZER_PATTERNS)}")
        self.tokens: list[bytes] = list(tokens)
        self.merges: list[tuple[int, int]] = [(int(a), int(b)) for a, b in merges]
        self.specials: dict[str, int] = dict(sorted(specials.items(), key=lambda kv: kv[1]))
        self.pattern = pattern
        self.source = source
        self.corpus: dict | None = None  # what it was trained on (files, hub commits); not fingerprinted
        self._validate()

    # ----------------------------------------------------------------- structure
    def _validate(self) -> None:
        n = len(self.tokens)
        special_ids = set(self.specials.values())
        if len(special_ids) != len(self.specials) or any(not 0 <= i < n for i in special_ids):
            raise UserError("special token ids are duplicated or out of range")
        for name, i in self.specials.items():
            if self.tokens[i] != name.encode():
                raise UserError(f"special token {name!r} does not match its table entry")
        ordinary = {}
        for i, t in enumerate(self.tokens):
            if i in special_ids:
                continue
            if not t:
                raise UserError(f"token {i} is empty")
            if t in ordinary:
                raise UserError(f"tokens {ordinary[t]} and {i} have the same bytes {t!r}")
            ordinary[t] = i
        missing = [b for b in range(256) if bytes([b]) not in ordinary]
        if missing:
            raise UserError(f"byte-level vocabulary lacks {len(missing)} byte tokens (e.g. byte {missing[0]})")
        self._id_of: dict[bytes, int] = ordinary
        # merge i joins (a, b) into the token whose bytes are tokens[a] + tokens[b]
        last = -1
        rank: dict[tuple[int, int], int] = {}
        result: list[int] = []
        for r, (a, b) in enumerate(self.merges):
            if not (0 <= a < n and 0 <= b < n) or a in special_ids or b in special_ids:
                raise UserError(f"merge {r} refers to token ids out of range or special")
            t = ordinary.get(self.tokens[a] + self.tokens[b])
            if t is None:
                raise UserError(f"merge {r} ({a}, {b}) produces bytes that are not a token")
            if t <= last:
                raise UserError(f"merge {r} produces token {t}, not above the previous merge's {last}; "
                                "ids must follow merge order")
            last = t
            rank.setdefault((a, b), r)
            result.append(t)
        self._merge_rank = rank
        self._merge_result = result
        # every non-byte ordinary token must come from a merge (else BPE can never produce it)
        merged = set(result) | {ordinary[bytes([b])] for b in range(256)}
        orphans = [i for i in ordinary.values() if i not in merged]
        if orphans:
            raise UserError(f"{len(orphans)} tokens (e.g. id {orphans[0]}) are neither bytes nor merge results")
        # tiktoken ranks pieces by token id: byte tokens must rank below every merge.
        byte_ids = [ordinary[bytes([b])] for b in range(256)]
        if result and max(byte_ids) > min(result):
            raise UserError("byte tokens must have smaller ids than merged tokens")
        self.byte_ids = byte_ids

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    @property
    def n_merges(self) -> int:
        return len(self.merges)

    def special_id(self, name: str) -> int:
        try:
            return self.specials[name]
        except KeyError:
            raise UserError(f"tokenizer has no special token {name!r}; retrain it with smedjan tokenizer") from None

    @property
    def bos_id(self) -> int:
        return self.special_id(C.BOS)

    @property
    def has_chat_tokens(self) -> bool:
        return all(s in self.specials for s in (C.BOS, C.USER_START, C.USER_END, C.ASSISTANT_START, C.ASSISTANT_END))

    @cached_property
    def token_byte_lengths(self) -> np.ndarray:
        """Bytes of text each id stands for; special tokens count 0 (used for bits-per-byte)."""
        lengths = np.array([len(t) for t in self.tokens], dtype=np.int64)
        for i in self.specials.values():
            lengths[i] = 0
        return lengths

    # -------------------------------------------------------------- fingerprint
    def _payload(self) -> bytes:
        lengths = np.array([len(t) for t in self.tokens], dtype="<u4").tobytes()
        merges = np.array(self.merges, dtype="<u4").reshape(-1, 2).tobytes()
        return lengths + b"".join(self.tokens) + merges

    @staticmethod
    def _hash(pattern: str, specials: dict[str, int], payload: bytes) -> str:
        h = hashlib.sha256()
        h.update(pattern.encode() + b"\0")
        h.update(json.dumps(specials, sort_keys=True).encode() + b"\0")
        h.update(payload)
        return h.hexdigest()[:16]

    @cached_property
    def fingerprint(self) -> str:
        return self._hash(self.pattern, self.specials, self._payload())

    # --------------------------------------------------------------------- I/O
    def to_bytes(self) -> bytes:
        payload = self._payload()
        meta = {
            "kind": "tokenizer",
            "pattern": self.pattern,
            "vocab_size": self.vocab_size,
            "n_merges": self.n_merges,
            "specials": self.specials,
            "fingerprint": self._hash(self.pattern, self.specials, payload),
            "payload_bytes": len(payload),
            "source": self.source,
        }
        if self.corpus:
            meta["corpus"] = self.corpus
        return encode_header(C.TOKENIZER_MAGIC, C.TOKENIZER_VERSION, meta) + payload

    def save(self, path: str | os.PathLike) -> None:
        with atomic_write(path) as f:
            f.write(self.to_bytes())

    @classmethod
    def from_bytes(cls, data: bytes, path: str | os.PathLike = "<bytes>") -> "Tokenizer":
        """Parse tokenizer.bin bytes. Every number of the header is checked against the payload
        before it is used (the fingerprint covers the payload, not the header's counts), so a
        damaged file is one UserError naming `path` and the tool that regenerates it."""
        import io

        p = Path(path)
        bad = f"; regenerate it with `{C.REGENERATE['tokenizer']}`"

        def refuse(what: str) -> UserError:
            return UserError(f"{p}: {what} (corrupt file){bad}")

        f = io.BytesIO(data)
        meta, off = read_header_from(f, p, C.TOKENIZER_MAGIC, C.TOKENIZER_VERSION, "tokenizer")
        for key, typ in (("vocab_size", int), ("n_merges", int), ("payload_bytes", int), ("specials", dict),
                         ("pattern", str), ("fingerprint", str)):
            v = meta.get(key)
            if not isinstance(v, typ) or isinstance(v, bool):
                raise refuse(f"header field {key!r} is missing or not a{'n' if typ is int else ''} {typ.__name__}")
        n, m, size = meta["vocab_size"], meta["n_merges"], meta["payload_bytes"]
        specials, pattern, fingerprint = meta["specials"], meta["pattern"], meta["fingerprint"]
        if not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in specials.items()):
            raise refuse("header field 'specials' is not a map of names to ids")
        payload = data[off:]
        if len(payload) != size:
            raise UserError(f"{p}: payload is {len(payload)} bytes, header says {size} (truncated?){bad}")
        if cls._hash(pattern, specials, payload) != fingerprint:
            raise UserError(f"{p}: checksum mismatch, the file is corrupt{bad}")
        # The payload is u32[n] lengths | their bytes | u32[m, 2] merges: the counts must
        # account for it exactly.
        if not 256 <= n <= size // 4 or m < 0:
            raise refuse(f"vocab_size {n} or n_merges {m} is out of range for a payload of {size} bytes")
        lengths = np.frombuffer(payload, dtype="<u4", count=n)
        total = int(lengths.sum(dtype=np.uint64))
        if 4 * n + total + 8 * m != size:
            raise refuse(f"vocab_size {n} and n_merges {m} do not match the payload of {size} bytes")
        blob = payload[4 * n: 4 * n + total]
        ends = np.cumsum(lengths, dtype=np.uint64)
        starts = ends - lengths
        tokens = [blob[s:e] for s, e in zip(starts.tolist(), ends.tolist())]
        merges = np.frombuffer(payload, dtype="<u4", offset=4 * n + total, count=2 * m).reshape(-1, 2)
        source = meta.get("source", "trained")
        try:
            tok = cls(tokens, [tuple(x) for x in merges.tolist()], specials, pattern,
                      source if isinstance(source, str) else "trained")
        except UserError as e:
            raise UserError(f"{p}: {e}{bad}") from None
        tok.corpus = meta.get("corpus") if isinstance(meta.get("corpus"), dict) else None
        return tok

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        p = check_input_file(path, "tokenizer")
        return cls.from_bytes(p.read_bytes(), p)

    # ----------------------------------------------------------------- encoding
    @cached_property
    def _regex(self):
        import regex

        return regex.compile(C.PRETOKENIZER_PATTERNS[self.pattern])

    @cached_property
    def _tiktoken(self):
        import tiktoken

        ranks = {t: i for t, i in self._id_of.items()}
        return tiktoken.Encoding(
            name=f"smedjan-{self.fingerprint}",
            pat_str=C.PRETOKENIZER_PATTERNS[self.pattern],
            mergeable_ranks=ranks,
            special_tokens=dict(self.specials),
        )

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Ids of `text`. Special-token spellings are plain text unless `allow_special`,
        which turns them into their ids (as HF `tokenizers` always does)."""
        if allow_special:
            return self._tiktoken.encode(text, allowed_special="all", disallowed_special=())
        return self._tiktoken.encode_ordinary(text)

    def encode_numpy(self, text: str) -> np.ndarray:
        """`encode(text)` as a uint32 array, without building a list of Python ints."""
        try:
            return self._tiktoken.encode_to_numpy(text, disallowed_special=())
        except UnicodeEncodeError:
            return self._tiktoken.encode_to_numpy(_fix_surrogates(text), disallowed_special=())

    def encode_batch(self, texts: list[str], num_threads: int = 8) -> list[list[int]]:
        return self._tiktoken.encode_ordinary_batch(texts, num_threads=num_threads)

    @cached_property
    def _special_regex(self):
        import re

        names = sorted(self.specials, key=len, reverse=True)
        return re.compile("(" + "|".join(re.escape(n) for n in names) + ")")

    def encode_reference(self, text: str, memo: dict[str, list[int]] | None = None,
                         allow_special: bool = False) -> list[int]:
        """Plain-Python encoder that spells out the semantics in the module docstring.

        `memo` (piece -> ids) may be shared across calls to encode large corpora quickly.
        """
        text = _fix_surrogates(text)
        out: list[int] = []
        if allow_special and self.specials:
            for k, part in enumerate(self._special_regex.split(text)):
                if k % 2:
                    out.append(self.specials[part])
                else:
                    out += self.encode_reference(part, memo)
            return out
        for piece in self._regex.findall(text):
            if memo is None:
                out += self._bpe_piece(piece.encode("utf-8"))
                continue
            ids = memo.get(piece)
            if ids is None:
                ids = memo[piece] = self._bpe_piece(piece.encode("utf-8"))
            out += ids
        return out

    def _bpe_piece(self, piece: bytes) -> list[int]:
        whole = self._id_of.get(piece)
        if whole is not None:
            return [whole]
        ids = [self.byte_ids[b] for b in piece]
        rank, result = self._merge_rank, self._merge_result
        while len(ids) > 1:
            best, best_rank = -1, None
            for i in range(len(ids) - 1):
                r = rank.get((ids[i], ids[i + 1]))
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = i, r
            if best_rank is None:
                break
            ids[best: best + 2] = [result[best_rank]]
        return ids

    # ----------------------------------------------------------------- decoding
    def check_ids(self, ids: Iterable[int]) -> None:
        n = self.vocab_size
        for i in ids:
            if not 0 <= i < n:
                raise UserError(f"token id {i} is out of range for a vocabulary of {n}")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        ids = list(ids)
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            self.check_ids(ids)
        toks = self.tokens
        return b"".join([toks[i] for i in ids])

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; invalid UTF-8 (e.g. a character cut in half) becomes U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def id_to_piece(self, i: int) -> str:
        return self.tokens[i].decode("utf-8", errors="replace")


def _fix_surrogates(text: str) -> str:
    # Lone surrogates cannot be UTF-8 encoded; replace them as tiktoken does.
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
