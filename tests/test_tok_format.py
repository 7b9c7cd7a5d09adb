"""tokenizer.bin: round trip, fingerprint, and every kind of corrupt file."""

from __future__ import annotations

import struct

import pytest

from helpers import assert_user_error, smedjan
from smedjan.errors import UserError
from smedjan.formats import constants as C
from smedjan.tokenizer import Tokenizer


def test_save_load_round_trip(tokenizer, tmp_path):
    path = tmp_path / "t.bin"
    tokenizer.save(path)
    again = Tokenizer.load(path)
    assert again.tokens == tokenizer.tokens
    assert again.merges == tokenizer.merges
    assert again.specials == tokenizer.specials
    assert again.pattern == tokenizer.pattern
    assert again.fingerprint == tokenizer.fingerprint
    assert path.read_bytes() == tokenizer.to_bytes()


def test_fingerprint_depends_on_content(tokenizer):
    other = Tokenizer(tokenizer.tokens, tokenizer.merges, tokenizer.specials, pattern="gpt2")
    assert other.fingerprint != tokenizer.fingerprint
    fewer = Tokenizer(tokenizer.tokens[:-1], tokenizer.merges,
                      {k: v for k, v in tokenizer.specials.items() if v < tokenizer.vocab_size - 1})
    assert fewer.fingerprint != tokenizer.fingerprint


def _corrupt(data: bytes, how: str) -> bytes:
    if how == "wrong_magic":
        return b"NOTATOKN" + data[8:]
    if how == "wrong_version":
        return data[:8] + struct.pack("<I", C.TOKENIZER_VERSION + 1) + data[12:]
    if how == "truncated_header":
        return data[:30]
    if how == "truncated_payload":
        return data[:-100]
    if how == "tiny":
        return data[:5]
    if how == "flipped_byte":
        b = bytearray(data)
        b[len(b) // 2] ^= 0xFF
        return bytes(b)
    if how == "garbage_json":
        n = struct.unpack("<I", data[12:16])[0]
        return data[:16] + b"{" * n + data[16 + n:]
    if how == "empty":
        return b""
    raise AssertionError(how)


CASES = {"wrong_magic": "wrong magic", "wrong_version": "version", "truncated_header": "truncated",
         "truncated_payload": "truncated", "tiny": "truncated", "flipped_byte": "", "garbage_json": "corrupt header",
         "empty": "truncated"}


@pytest.mark.parametrize("how", sorted(CASES))
def test_corrupt_tokenizer_is_refused(tokenizer, tmp_path, how):
    path = tmp_path / "bad.bin"
    path.write_bytes(_corrupt(tokenizer.to_bytes(), how))
    with pytest.raises(UserError) as e:
        Tokenizer.load(path)
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg
    assert CASES[how] in msg
    assert "smedjan tokenizer" in msg  # says which tool regenerates it
    res = smedjan("tokenizer-info", path)
    assert_user_error(res, str(path))


def test_a_token_file_is_not_a_tokenizer(tmp_path):
    from smedjan.formats.binfile import encode_header

    path = tmp_path / "train.bin"
    path.write_bytes(encode_header(C.TOKENS_MAGIC, C.TOKENS_VERSION, {"kind": "tokens"}))
    with pytest.raises(UserError, match="is a smedjan token .* file, not a tokenizer file"):
        Tokenizer.load(path)


def test_missing_and_folder_paths(tmp_path):
    assert_user_error(smedjan("tokenizer-info", tmp_path / "nope.bin"), "does not exist")
    assert_user_error(smedjan("tokenizer-info", tmp_path), "folder")


def _with_header(data: bytes, **changes) -> bytes:
    """tokenizer.bin bytes with header fields changed (None deletes one), framing kept valid."""
    import json

    n = struct.unpack("<I", data[12:16])[0]
    meta = json.loads(data[16:16 + n])
    for k, v in changes.items():
        if v is None:
            meta.pop(k, None)
        else:
            meta[k] = v
    blob = json.dumps(meta).encode()
    return data[:12] + struct.pack("<I", len(blob)) + blob + data[16 + n:]


HEADER_CASES = [
    {"vocab_size": "+1"}, {"vocab_size": "-1"}, {"n_merges": "+1"}, {"n_merges": "-1"},  # one-bit-ish changes
    {"vocab_size": 2**40}, {"vocab_size": -5}, {"n_merges": -1}, {"n_merges": 2**62}, {"vocab_size": 0},
    {"vocab_size": "4096"}, {"vocab_size": 2048.0}, {"vocab_size": True}, {"n_merges": None},
    {"payload_bytes": None}, {"specials": [1, 2]}, {"specials": {"<|bos|>": "x"}}, {"specials": None},
    {"pattern": 7}, {"pattern": "nonesuch"}, {"fingerprint": None}, {"vocab_size": None},
]


@pytest.mark.parametrize("case", HEADER_CASES, ids=[str(c) for c in HEADER_CASES])
def test_every_header_number_is_checked_before_use(tokenizer, tmp_path, case):
    """Issue 20 item 4: the fingerprint does not cover vocab_size and n_merges; 4096 -> 4097
    passed the checksum and crashed every tool with a traceback."""
    data = tokenizer.to_bytes()
    changes = {k: (getattr(tokenizer, k) + int(v) if isinstance(v, str) and v[0] in "+-" else v)
               for k, v in case.items()}
    path = tmp_path / "tokenizer.bin"
    path.write_bytes(_with_header(data, **changes))
    with pytest.raises(UserError) as e:
        Tokenizer.load(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and "\n" not in msg and "smedjan tokenizer" in msg, msg


def test_one_more_token_in_the_header_is_one_line_from_every_tool(tokenizer, tmp_path):
    path = tmp_path / "tokenizer.bin"
    path.write_bytes(_with_header(tokenizer.to_bytes(), vocab_size=tokenizer.vocab_size + 1))
    for args in (("tokenizer-info", path), ("encode", "-t", path, "hello")):
        assert_user_error(smedjan(*args), str(path), "vocab_size")
