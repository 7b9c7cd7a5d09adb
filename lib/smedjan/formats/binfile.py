"""The header shared by smedjan's own binary files (tokenizer.bin, train.bin).

Layout, little-endian:  MAGIC (8 bytes) | u32 version | u32 n | n bytes of UTF-8 JSON | payload

The JSON carries `kind` and every field a reader needs before touching the payload.
Readers check magic, version and kind, and say which tool regenerates a bad file.

    meta, offset = read_header(path, C.TOKENS_MAGIC, C.TOKENS_VERSION, kind="tokens")
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import BinaryIO

from smedjan.errors import UserError
from smedjan.formats import constants as C
from smedjan.io import check_input_file

_FIXED = struct.Struct("<8sII")
_KNOWN_MAGICS = {C.TOKENIZER_MAGIC: "tokenizer", C.TOKENS_MAGIC: "token (train.bin/val.bin)"}
MAX_HEADER = 1 << 20


def encode_header(magic: bytes, version: int, meta: dict) -> bytes:
    assert len(magic) == 8
    blob = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
    return _FIXED.pack(magic, version, len(blob)) + blob


def _bad(path: Path, what: str, kind: str) -> UserError:
    return UserError(f"{path}: {what}; regenerate it with `{C.REGENERATE.get(kind, 'smedjan')}`")


def read_header_from(f: BinaryIO, path: Path, magic: bytes, version: int, kind: str) -> tuple[dict, int]:
    fixed = f.read(_FIXED.size)
    if len(fixed) < _FIXED.size:
        raise _bad(path, f"truncated (only {len(fixed)} bytes), not a smedjan {kind} file", kind)
    got_magic, got_version, n = _FIXED.unpack(fixed)
    if got_magic != magic:
        other = _KNOWN_MAGICS.get(got_magic)
        if other:
            raise UserError(f"{path}: is a smedjan {other} file, not a {kind} file (wrong magic)")
        raise _bad(path, f"wrong magic {got_magic!r}, not a smedjan {kind} file", kind)
    if got_version != version:
        raise _bad(path, f"{kind} format version {got_version}, this smedjan reads version {version}", kind)
    if n > MAX_HEADER:
        raise _bad(path, f"header length {n} is implausible (corrupt file)", kind)
    blob = f.read(n)
    if len(blob) < n:
        raise _bad(path, "truncated inside its header", kind)
    try:
        meta = json.loads(blob)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _bad(path, f"corrupt header ({e.__class__.__name__})", kind) from None
    if not isinstance(meta, dict) or meta.get("kind") != kind:
        got = meta.get("kind") if isinstance(meta, dict) else None
        raise _bad(path, f"is a {got!r} file, expected {kind!r}", kind)
    return meta, _FIXED.size + n


def read_header(path: str | Path, magic: bytes, version: int, kind: str) -> tuple[dict, int]:
    """Return (metadata, payload offset) after checking magic, version and kind."""
    p = check_input_file(path, "token" if kind == "tokens" else kind)  # "train.bin: token file does not exist"
    with open(p, "rb") as f:
        return read_header_from(f, p, magic, version, kind)
