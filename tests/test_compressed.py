"""Compressed inputs (.zst, .gz): every reader refuses an incomplete stream with one line, and
reads every frame of a complete one (issue 20 item 3: a .txt.zst cut in half was read up to
the cut, exit 0)."""

from __future__ import annotations

import gzip
import io
import json

import pytest
import zstandard

from helpers import assert_user_error, smedjan
from smedjan.data.sources import iter_chunks
from smedjan.errors import UserError
from smedjan.eval.tasks import iter_jsonl
from smedjan.post.formats import load_conversations

TEXT = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(4000))
RECORDS = [{"text": f"doc {i} " + "lorem ipsum " * 20, "messages": [{"role": "user", "content": f"q{i}"},
                                                                      {"role": "assistant", "content": f"a{i}"}]}
           for i in range(800)]


def _compress(data: bytes, kind: str) -> bytes:
    return zstandard.ZstdCompressor().compress(data) if kind == "zst" else gzip.compress(data)


def _parquet_bytes() -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table({"text": [r["text"] for r in RECORDS]}), buf)
    return buf.getvalue()


def _payload(base: str) -> bytes:
    if base == "txt":
        return TEXT.encode()
    if base == "jsonl":
        return "".join(json.dumps(r) + "\n" for r in RECORDS).encode()
    if base == "json":
        return json.dumps(RECORDS).encode()
    return _parquet_bytes()


def _read_all(path, base: str, split: str = "file") -> None:
    if base in ("txt", "jsonl", "parquet"):
        for _ in iter_chunks([path], txt_split=split):
            pass
    if base in ("jsonl", "json"):
        load_conversations([path])
    if base == "jsonl":
        list(iter_jsonl(path))


CASES = [("txt", "file"), ("txt", "line"), ("txt", "blank"), ("jsonl", "file"), ("json", "file"),
         ("parquet", "file")]


@pytest.mark.parametrize("kind", ["zst", "gz"])
@pytest.mark.parametrize("base, split", CASES)
@pytest.mark.parametrize("cut", [0.5, 0.9, -1])
def test_every_reader_refuses_a_truncated_stream(tmp_path, kind, base, split, cut):
    whole = _compress(_payload(base), kind)
    path = tmp_path / f"data.{base}.{kind}"
    path.write_bytes(whole)
    _read_all(path, base, split)  # the complete file reads
    n = len(whole) - 1 if cut == -1 else int(len(whole) * cut)
    path.write_bytes(whole[:n])
    with pytest.raises(UserError, match=f"{path}: truncated compressed file"):
        _read_all(path, base, split)


@pytest.mark.parametrize("kind", ["zst", "gz"])
def test_an_empty_compressed_file_is_refused(tmp_path, kind):
    path = tmp_path / f"empty.txt.{kind}"
    path.write_bytes(b"")
    with pytest.raises(UserError, match="empty"):
        list(iter_chunks([path]))


def test_every_frame_of_a_multi_frame_zst_is_read(tmp_path):
    # `cat a.zst b.zst` and pzstd write several frames; the old reader stopped after the first
    path = tmp_path / "two.txt.zst"
    c = zstandard.ZstdCompressor()
    path.write_bytes(c.compress(b"first frame\n") + c.compress(b"second frame\n"))
    assert "".join(ch.text for ch in iter_chunks([path])) == "first frame\nsecond frame\n"
    path.write_bytes(c.compress(b"first frame\n") + c.compress(b"second frame\n")[:-3])
    with pytest.raises(UserError, match="truncated"):
        list(iter_chunks([path]))
    path.write_bytes(c.compress(b"first frame\n") + b"garbage after the frame")
    with pytest.raises(UserError, match="corrupt zstd stream"):
        list(iter_chunks([path]))


def test_the_tools_refuse_a_truncated_corpus_and_write_nothing(tmp_path, tokenizer_path):
    cut = tmp_path / "corpus.txt.zst"
    whole = _compress(TEXT.encode() * 4, "zst")
    cut.write_bytes(whole[: len(whole) // 2])
    out = tmp_path / "out"
    out.mkdir()
    for args in (("tokenizer", "--input", cut, "--vocab-size", "300", "--output", out / "tok.bin"),
                 ("prepare", "--input", cut, "-t", tokenizer_path, "-o", out / "train.bin", "--workers", "2"),
                 ("tokenizer-info", tokenizer_path, "--input", cut)):
        res = smedjan(*args)
        assert_user_error(res, str(cut), "truncated compressed file")
        assert list(out.iterdir()) == [], args
