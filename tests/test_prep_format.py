"""train.bin format: round trip, dtype rule, atomic streaming writes, and every kind of corrupt file."""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest

from helpers import assert_user_error, smedjan
from smedjan.errors import UserError
from smedjan.formats import constants as C
from smedjan.formats.binfile import encode_header
from smedjan.formats.tokens import TokenFile, TokenWriter, check_tokenizer_match, dtype_for_vocab

BOS = 999


def _docs(seed: int = 0, n: int = 40) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.concatenate([[BOS], rng.integers(0, BOS, size=rng.integers(0, 300))]) for _ in range(n)]


def write_file(path, docs, vocab_size=1000, bos_id=BOS, fingerprint="f" * 16, **extra):
    with TokenWriter(path, vocab_size=vocab_size, tokenizer_fingerprint=fingerprint, bos_id=bos_id,
                     extra=extra) as w:
        for d in docs:
            w.write(d)
    return path


def test_round_trip_streams_and_aligns(tmp_path):
    docs = _docs()
    path = write_file(tmp_path / "train.bin", docs, note="hello")
    tf = TokenFile.open(path)
    flat = np.concatenate(docs)
    assert tf.n_tokens == len(flat) and tf.n_docs == len(docs)
    assert tf.dtype == np.dtype("<u2") and tf.meta["dtype"] == "uint16"
    assert tf.data_offset % C.TOKENS_ALIGN == 0 and tf.meta["note"] == "hello"
    assert np.array_equal(tf.tokens, flat)
    assert not tf.tokens.flags.writeable
    assert np.array_equal(tf.read(5, 100), flat[5:105])
    assert tf.sha256 == hashlib.sha256(flat.astype("<u2").tobytes()).hexdigest()
    assert np.array_equal(tf.doc_starts(), np.flatnonzero(flat == BOS))
    tf.verify()
    # the raw layout: header, zero padding, then the little-endian array
    raw = path.read_bytes()
    assert raw[:8] == C.TOKENS_MAGIC
    assert raw[tf.data_offset:] == flat.astype("<u2").tobytes()


def test_dtype_rule():
    assert dtype_for_vocab(50265) == np.dtype("<u2")
    assert dtype_for_vocab(65536) == np.dtype("<u2")  # ids 0..65535 fit
    assert dtype_for_vocab(65537) == np.dtype("<u4")
    with pytest.raises(UserError):
        dtype_for_vocab(0)


def test_uint32_file_keeps_large_ids(tmp_path):
    big_bos = 70_000
    docs = [np.array([big_bos, 65_535, 65_536, 69_999, 3]), np.array([big_bos, 66_000])]
    tf = TokenFile.open(write_file(tmp_path / "big.bin", docs, vocab_size=70_001, bos_id=big_bos))
    assert tf.meta["dtype"] == "uint32" and tf.dtype.itemsize == 4
    assert tf.tokens.tolist() == [70_000, 65_535, 65_536, 69_999, 3, 70_000, 66_000]
    tf.verify()


def test_writer_refuses_out_of_range_and_missing_bos(tmp_path):
    with pytest.raises(ValueError):
        write_file(tmp_path / "a.bin", [np.array([BOS, 1000])])
    with pytest.raises(ValueError):
        write_file(tmp_path / "b.bin", [np.array([BOS, -1])])
    with pytest.raises(ValueError):
        write_file(tmp_path / "c.bin", [np.array([1, BOS])])
    assert list(tmp_path.iterdir()) == []  # no file, no temporary left


def test_empty_or_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(UserError, match="no documents"):
        write_file(tmp_path / "empty.bin", [])
    with pytest.raises(RuntimeError):
        with TokenWriter(tmp_path / "x.bin", vocab_size=1000, tokenizer_fingerprint="f", bos_id=BOS) as w:
            w.write(np.array([BOS, 1, 2]))
            raise RuntimeError("crash in the middle")
    assert list(tmp_path.iterdir()) == []
    # an existing file survives a failed rewrite untouched
    good = write_file(tmp_path / "keep.bin", _docs())
    before = good.read_bytes()
    with pytest.raises(RuntimeError):
        with TokenWriter(good, vocab_size=1000, tokenizer_fingerprint="f", bos_id=BOS) as w:
            w.write(np.array([BOS, 1]))
            raise RuntimeError
    assert good.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["keep.bin"]


def test_many_sources_fit_the_reserved_header(tmp_path):
    extra = {"sources": [f"/some/long/path/to/shard-{i:06d}.jsonl.zst" for i in range(2000)]}
    tf = TokenFile.open(write_file(tmp_path / "t.bin", _docs(n=3), **extra))
    assert len(tf.meta["sources"]) == 2000 and tf.data_offset % C.TOKENS_ALIGN == 0


# ------------------------------------------------------------------ corrupt files
def _rewrite_header(data: bytes, **changes) -> bytes:
    """Same payload at offset 4096, header fields changed (None deletes a field)."""
    n = struct.unpack("<I", data[12:16])[0]
    meta = json.loads(data[16:16 + n])
    meta.update(changes)
    meta = {k: v for k, v in meta.items() if v is not None}
    header = encode_header(C.TOKENS_MAGIC, C.TOKENS_VERSION, meta)
    assert len(header) <= 4096
    return header + b"\0" * (4096 - len(header)) + data[4096:]


def _corrupt(data: bytes, how: str) -> bytes:
    if how == "wrong_magic":
        return b"NOTTOKNS" + data[8:]
    if how == "wrong_version":
        return data[:8] + struct.pack("<I", C.TOKENS_VERSION + 1) + data[12:]
    if how == "wrong_kind":
        return _rewrite_header(data, kind="tokenizer")
    if how == "truncated_payload":
        return data[:-7]
    if how == "truncated_header":
        return data[:40]
    if how == "empty":
        return b""
    if how == "trailing_bytes":
        return data + b"\0\0"
    if how == "bad_dtype":
        return _rewrite_header(data, dtype="int8")
    if how == "missing_count":
        return _rewrite_header(data, n_tokens=None)
    if how == "bad_offset":
        return _rewrite_header(data, data_offset=100)
    if how == "bos_out_of_vocab":
        return _rewrite_header(data, bos_id=5000)
    if how == "no_leading_bos":
        b = bytearray(data)
        b[4096:4098] = b"\x01\x00"
        return bytes(b)
    raise AssertionError(how)


CASES = {"wrong_magic": "wrong magic", "wrong_version": "version", "wrong_kind": "expected 'tokens'",
         "truncated_payload": "truncated", "truncated_header": "truncated", "empty": "truncated",
         "trailing_bytes": "unexpected bytes", "bad_dtype": "dtype", "missing_count": "n_tokens",
         "bad_offset": "offset", "bos_out_of_vocab": "bos_id", "no_leading_bos": "BOS"}


@pytest.fixture(scope="module")
def good_bytes(tmp_path_factory) -> bytes:
    path = write_file(tmp_path_factory.mktemp("good") / "t.bin", _docs())
    assert TokenFile.open(path).data_offset == 4096  # _corrupt's byte offsets rely on it
    return path.read_bytes()


@pytest.mark.parametrize("how", list(CASES))
def test_corrupt_files_are_refused_with_one_line(good_bytes, tmp_path, how):
    path = tmp_path / "bad.bin"
    path.write_bytes(_corrupt(good_bytes, how))
    with pytest.raises(UserError) as e:
        TokenFile.open(path)
    msg = str(e.value)
    assert str(path) in msg and CASES[how] in msg and "smedjan prepare" in msg and "\n" not in msg


@pytest.mark.parametrize("how", ["wrong_magic", "wrong_version", "truncated_payload"])
def test_data_info_refuses_corrupt_files(good_bytes, tmp_path, how):
    path = tmp_path / "bad.bin"
    path.write_bytes(_corrupt(good_bytes, how))
    assert_user_error(smedjan("data-info", path), str(path), CASES[how])


def test_verify_finds_payload_damage(good_bytes, tmp_path):
    path = tmp_path / "t.bin"
    b = bytearray(good_bytes)
    b[5000] ^= 0x01  # the header still matches: only a full read can tell
    path.write_bytes(bytes(b))
    tf = TokenFile.open(path)
    with pytest.raises(UserError, match="checksum"):
        tf.verify()
    assert_user_error(smedjan("data-info", path, "--verify"), str(path), "checksum")
    # an id beyond the vocabulary
    b = bytearray(good_bytes)
    b[4096 + 20: 4096 + 22] = struct.pack("<H", 1500)
    path.write_bytes(bytes(b))
    with pytest.raises(UserError, match="out of range"):
        TokenFile.open(path).verify()


def test_tokenizer_mismatch_names_both_files(tokenizer, tmp_path):
    path = write_file(tmp_path / "t.bin", _docs(n=2))
    tf = TokenFile.open(path)
    with pytest.raises(UserError) as e:
        check_tokenizer_match(tf, tokenizer, "tok.bin")
    assert str(path) in str(e.value) and "tok.bin" in str(e.value) and tokenizer.fingerprint in str(e.value)
