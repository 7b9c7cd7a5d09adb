"""train.bin / val.bin: a token array with a smedjan header, read by numpy.memmap with no copy.

Layout, little-endian:
    MAGIC b"SMJTOKNS" | u32 version | u32 n | n bytes of JSON | zero padding | token array
The token array starts at `data_offset`, a multiple of `TOKENS_ALIGN` (4096), and holds
`n_tokens` ids of `dtype` ("uint16" when every id fits, i.e. vocab_size <= 65536, else
"uint32"). Every document starts with the BOS id and BOS appears nowhere else, so
`n_docs` equals the number of BOS tokens. The JSON header holds at least
    kind="tokens", dtype, n_tokens, n_docs, vocab_size, tokenizer_fingerprint, bos_id,
    data_offset, sha256 (of the token array's bytes)
plus what `smedjan prepare` records about how the file was made (split, sources, flags).

Writing streams: `TokenWriter` reserves the header region first (its size is known up
front because only fixed-width numbers are unknown until the end), appends tokens to a
temporary file beside the target as they come, then writes the header into the reserved
region, fsyncs and renames (`smedjan.io.atomic_path`). An error or Ctrl-C removes the
temporary file: no partial train.bin ever exists under its real name.

Reading validates magic, version, kind, header fields, and that the file holds exactly
`n_tokens` tokens after `data_offset` (truncated or padded files are refused).

    with TokenWriter("train.bin", vocab_size=tok.vocab_size, tokenizer_fingerprint=tok.fingerprint,
                     bos_id=tok.bos_id) as w:
        w.write(np.array([tok.bos_id, *tok.encode("Hello")]))
    tf = TokenFile.open("train.bin")
    tf.tokens[:10], tf.n_docs, tf.dtype        # memmap view, 1, dtype('uint16')
"""

from __future__ import annotations

import hashlib
import os
from contextlib import ExitStack
from pathlib import Path
from typing import Iterator

import numpy as np

from smedjan.errors import UserError
from smedjan.formats import constants as C
from smedjan.formats.binfile import encode_header, read_header
from smedjan.io import atomic_path

KIND = "tokens"
_REGEN = C.REGENERATE[KIND]
# Fields every token file's header must carry, with their JSON types.
_REQUIRED = {
    "dtype": str, "n_tokens": int, "n_docs": int, "vocab_size": int, "tokenizer_fingerprint": str,
    "bos_id": int, "data_offset": int, "sha256": str,
}
# Placeholder values as wide as any real value: sizing the header with them reserves
# enough room for the final header, whose counts are known only at the end.
_WIDEST = {"n_tokens": 2**64 - 1, "n_docs": 2**64 - 1, "data_offset": 2**64 - 1, "sha256": "0" * 64}
SCAN_BLOCK = 1 << 24  # tokens per step when scanning a file (64 MiB at uint32)


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32; always little-endian."""
    if not 0 < vocab_size <= 2**32:
        raise UserError(f"vocabulary size {vocab_size} cannot be stored in a token file")
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def _dtype_name(dt: np.dtype) -> str:
    return {2: "uint16", 4: "uint32"}[dt.itemsize]


def _bad(path: Path, what: str) -> UserError:
    return UserError(f"{path}: {what}; regenerate it with `{_REGEN}`")


class TokenWriter:
    """Stream tokens into a new token file; committed atomically when the `with` block ends.

    `write(ids)` appends ids (any integer array); documents are counted by their BOS ids.
    `extra` adds fields to the header (how the file was made). Leaving the block with an
    exception, or with nothing written, leaves no file behind.
    """

    def __init__(self, path: str | os.PathLike, *, vocab_size: int, tokenizer_fingerprint: str, bos_id: int,
                 extra: dict | None = None):
        self.path = Path(path)
        self.dtype = dtype_for_vocab(vocab_size)
        if not 0 <= bos_id < vocab_size:
            raise ValueError(f"bos_id {bos_id} is outside the vocabulary of {vocab_size}")
        self.vocab_size, self.bos_id = int(vocab_size), int(bos_id)
        self.meta = {
            **(extra or {}),
            "kind": KIND,
            "dtype": _dtype_name(self.dtype),
            "vocab_size": self.vocab_size,
            "tokenizer_fingerprint": str(tokenizer_fingerprint),
            "bos_id": self.bos_id,
        }
        widest = len(encode_header(C.TOKENS_MAGIC, C.TOKENS_VERSION, {**self.meta, **_WIDEST}))
        self.data_offset = -(-widest // C.TOKENS_ALIGN) * C.TOKENS_ALIGN
        self.n_tokens = 0
        self.n_docs = 0
        self._hash = hashlib.sha256()
        self._stack: ExitStack | None = None
        self._f = None

    def __enter__(self) -> "TokenWriter":
        self._stack = ExitStack()
        try:
            tmp = self._stack.enter_context(atomic_path(self.path))
            self._f = self._stack.enter_context(open(tmp, "wb"))
            # Reserve the header region; `_finish` overwrites it.
            self._f.write(b"\0" * self.data_offset)
        except BaseException:
            self._stack.close()
            raise
        return self

    def write(self, ids) -> None:
        """Append token ids. The first id of a file must be BOS (every document starts with it)."""
        arr = np.asarray(ids)
        if arr.size == 0:
            return
        if arr.dtype != self.dtype:
            # Checking range before the cast: a bug upstream must not wrap ids silently.
            if arr.min() < 0 or arr.max() >= self.vocab_size:
                raise ValueError(f"token ids out of range 0..{self.vocab_size - 1}")
            arr = arr.astype(self.dtype)
        elif arr.max() >= self.vocab_size:
            raise ValueError(f"token ids out of range 0..{self.vocab_size - 1}")
        arr = np.ascontiguousarray(arr.reshape(-1))
        if self.n_tokens == 0 and arr[0] != self.bos_id:
            raise ValueError("a token file must start with BOS")
        data = memoryview(arr).cast("B")
        self._f.write(data)
        self._hash.update(data)
        self.n_tokens += arr.size
        self.n_docs += int(np.count_nonzero(arr == self.bos_id))

    def _finish(self) -> None:
        if self.n_tokens == 0:
            raise UserError(f"{self.path}: nothing to write: the input holds no documents")
        self.meta.update(n_tokens=self.n_tokens, n_docs=self.n_docs, data_offset=self.data_offset,
                         sha256=self._hash.hexdigest())
        header = encode_header(C.TOKENS_MAGIC, C.TOKENS_VERSION, self.meta)
        assert len(header) <= self.data_offset, "the reserved header region is too small"
        self._f.seek(0)
        self._f.write(header)
        self._f.flush()
        os.fsync(self._f.fileno())

    def __exit__(self, et, ev, tb) -> bool:
        assert self._stack is not None
        if et is None:
            try:
                self._finish()
            except BaseException as e:
                # Hand the failure to atomic_path so it removes the temporary file.
                if not self._stack.__exit__(type(e), e, e.__traceback__):
                    raise
                return False
        return bool(self._stack.__exit__(et, ev, tb))


class TokenFile:
    """A validated token file. `.tokens` is a read-only memmap, created on first use;
    `.read(start, count)` uses plain file reads (no memmap), for streaming."""

    def __init__(self, path: Path, meta: dict):
        self.path = path
        self.meta = meta
        self.dtype = np.dtype("<u2") if meta["dtype"] == "uint16" else np.dtype("<u4")
        self.n_tokens: int = meta["n_tokens"]
        self.n_docs: int = meta["n_docs"]
        self.vocab_size: int = meta["vocab_size"]
        self.fingerprint: str = meta["tokenizer_fingerprint"]
        self.bos_id: int = meta["bos_id"]
        self.data_offset: int = meta["data_offset"]
        self.sha256: str = meta["sha256"]
        self._tokens: np.memmap | None = None

    @classmethod
    def open(cls, path: str | os.PathLike) -> "TokenFile":
        """Read and check the header and the file size; map nothing yet."""
        meta, header_end = read_header(path, C.TOKENS_MAGIC, C.TOKENS_VERSION, KIND)
        p = Path(path)
        for key, typ in _REQUIRED.items():
            v = meta.get(key)
            if not isinstance(v, typ) or isinstance(v, bool):
                raise _bad(p, f"header field {key!r} is missing or not a {typ.__name__}")
        if meta["dtype"] not in ("uint16", "uint32"):
            raise _bad(p, f"dtype {meta['dtype']!r} is not uint16 or uint32")
        itemsize = 2 if meta["dtype"] == "uint16" else 4
        n, docs, vocab, off = meta["n_tokens"], meta["n_docs"], meta["vocab_size"], meta["data_offset"]
        if not 0 < vocab <= 2 ** (8 * itemsize):
            raise _bad(p, f"vocabulary size {vocab} does not fit dtype {meta['dtype']}")
        if not 0 <= meta["bos_id"] < vocab:
            raise _bad(p, f"bos_id {meta['bos_id']} is outside the vocabulary of {vocab}")
        if off < header_end or off % C.TOKENS_ALIGN:
            raise _bad(p, f"data offset {off} is not a multiple of {C.TOKENS_ALIGN} after the header")
        if not 0 < docs <= n:
            raise _bad(p, f"header says {n} tokens in {docs} documents (corrupt)")
        size = p.stat().st_size
        want = off + n * itemsize
        if size < want:
            have = max(size - off, 0) // itemsize
            raise _bad(p, f"truncated: holds {have} of the {n} tokens its header promises")
        if size > want:
            raise _bad(p, f"{size - want} unexpected bytes after its {n} tokens (corrupt)")
        tf = cls(p, meta)
        if int(tf.read(0, 1)[0]) != tf.bos_id:
            raise _bad(p, "does not start with the BOS token (corrupt)")
        return tf

    # ---------------------------------------------------------------- access
    @property
    def tokens(self) -> np.memmap:
        """All tokens as a read-only memmap (pages are read on access, nothing is loaded)."""
        if self._tokens is None:
            self._tokens = np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.data_offset,
                                     shape=(self.n_tokens,))
        return self._tokens

    def read(self, start: int, count: int) -> np.ndarray:
        """Tokens [start, start+count) by a plain positioned read (no memmap)."""
        if start < 0 or count < 0 or start + count > self.n_tokens:
            raise IndexError(f"tokens [{start}, {start + count}) outside 0..{self.n_tokens}")
        nbytes = count * self.dtype.itemsize
        with open(self.path, "rb") as f:
            data = os.pread(f.fileno(), nbytes, self.data_offset + start * self.dtype.itemsize)
        if len(data) != nbytes:  # the file shrank after open()
            raise _bad(self.path, "truncated while being read")
        return np.frombuffer(data, dtype=self.dtype)

    def iter_blocks(self, block: int = SCAN_BLOCK) -> Iterator[tuple[int, np.ndarray]]:
        """(start, tokens) in order, `block` tokens at a time, by plain reads: bounded memory."""
        with open(self.path, "rb") as f:
            f.seek(self.data_offset)
            start = 0
            while start < self.n_tokens:
                count = min(block, self.n_tokens - start)
                data = f.read(count * self.dtype.itemsize)
                if len(data) != count * self.dtype.itemsize:
                    raise _bad(self.path, "truncated while being read")
                yield start, np.frombuffer(data, dtype=self.dtype)
                start += count

    def doc_starts(self) -> np.ndarray:
        """Positions of every BOS (document start), int64[n_docs]; one scan of the file."""
        out = np.empty(self.n_docs, dtype=np.int64)
        k = 0
        for start, block in self.iter_blocks():
            pos = np.flatnonzero(block == self.bos_id)
            if k + len(pos) > self.n_docs:
                raise _bad(self.path, f"holds more BOS tokens than its {self.n_docs} documents (corrupt)")
            out[k:k + len(pos)] = pos + start
            k += len(pos)
        if k != self.n_docs:
            raise _bad(self.path, f"holds {k} BOS tokens, header says {self.n_docs} documents (corrupt)")
        return out

    def verify(self) -> None:
        """Full check of the payload: checksum, ids in range, BOS count. Reads the whole file once."""
        h = hashlib.sha256()
        bos = 0
        for start, block in self.iter_blocks():
            h.update(memoryview(np.ascontiguousarray(block)).cast("B"))
            top = int(block.max())
            if top >= self.vocab_size:
                at = start + int(np.argmax(block >= self.vocab_size))
                raise _bad(self.path, f"token id {top} near position {at} is out of range for "
                                      f"vocabulary {self.vocab_size} (corrupt)")
            bos += int(np.count_nonzero(block == self.bos_id))
        if h.hexdigest() != self.sha256:
            raise _bad(self.path, "checksum mismatch: the token array is corrupt")
        if bos != self.n_docs:
            raise _bad(self.path, f"holds {bos} BOS tokens, header says {self.n_docs} documents (corrupt)")

    def check_tokenizer(self, tokenizer, tokenizer_path: str | os.PathLike | None = None) -> None:
        """Refuse a tokenizer other than the one this file was made with (one line, both files)."""
        check_tokenizer_match(self, tokenizer, tokenizer_path)

    def __repr__(self) -> str:
        return (f"TokenFile({str(self.path)!r}, {self.n_tokens} tokens, {self.n_docs} docs, {self.meta['dtype']}, "
                f"vocab {self.vocab_size}, tokenizer {self.fingerprint})")


def check_tokenizer_match(token_file: TokenFile, tokenizer, tokenizer_path: str | os.PathLike | None = None) -> None:
    """UserError naming both files when `tokenizer` is not the one `token_file` was made with."""
    if tokenizer.fingerprint != token_file.fingerprint:
        name = str(tokenizer_path) if tokenizer_path is not None else "the given tokenizer"
        raise UserError(
            f"{token_file.path}: made with tokenizer {token_file.fingerprint}, but {name} has fingerprint "
            f"{tokenizer.fingerprint}; use the tokenizer it was made with, or re-run `{_REGEN}`")
