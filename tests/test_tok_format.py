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
