"""The shared OpenWebText (.jsonl.zst), C4 (.jsonl.zst, and as .parquet) and Gutenberg (.txt, .txt.zst)
sets prepare completely, and each file holds exactly [BOS] + encode(document) per document."""

from __future__ import annotations

import io
import json

import numpy as np
import zstandard

from helpers import smedjan
from smedjan.formats.tokens import TokenFile


def read_jsonl_zst(path) -> list[str]:
    """The documents, read independently of smedjan's readers."""
    with open(path, "rb") as f:
        text = zstandard.ZstdDecompressor().stream_reader(f).read().decode("utf-8")
    return [json.loads(line)["text"] for line in text.splitlines() if line.strip()]


def read_txt(path) -> str:
    raw = path.read_bytes()
    if path.name.endswith(".zst"):
        raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw)).read()
    return raw.decode("utf-8", errors="replace")


def expected_tokens(tokenizer, docs: list[str]) -> np.ndarray:
    ids: list[int] = []
    for d in docs:
        if d:  # empty documents are skipped
            ids.append(tokenizer.bos_id)
            ids += tokenizer.encode(d)
    return np.array(ids)


def prepare(tmp_path, tokenizer_path, *args) -> TokenFile:
    out = tmp_path / "train.bin"
    res = smedjan("prepare", *args, "-t", tokenizer_path, "-o", out, "--json")
    assert res.code == 0, res
    tf = TokenFile.open(out)
    assert json.loads(res.out)["tokens"] == tf.n_tokens
    tf.verify()
    return tf


def test_openwebtext_jsonl_zst_full(shared_data, tokenizer, tokenizer_path, tmp_path):
    path = shared_data / "pretrain" / "openwebtext_1000.jsonl.zst"
    docs = read_jsonl_zst(path)
    tf = prepare(tmp_path, tokenizer_path, "-i", path)
    want = expected_tokens(tokenizer, docs)
    assert tf.n_docs == sum(1 for d in docs if d) and tf.n_tokens == len(want)
    assert np.array_equal(tf.tokens, want)
    # the training loader's in-order pass reads back exactly these tokens
    from smedjan.data.loader import iter_sequential

    T = 512
    xs = np.concatenate([x.numpy().ravel() for x, _ in iter_sequential(tf, batch_size=16, seq_len=T)])
    assert np.array_equal(xs, want[: len(xs)]) and len(xs) == (len(want) - 1) // T * T


def test_c4_jsonl_zst_and_parquet_give_the_same_tokens(shared_data, tokenizer, tokenizer_path, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = shared_data / "pretrain" / "c4_demo.jsonl.zst"
    docs = read_jsonl_zst(src)
    want = expected_tokens(tokenizer, docs)
    from_jsonl = prepare(tmp_path, tokenizer_path, "-i", src)
    assert np.array_equal(from_jsonl.tokens, want)
    # the same documents as parquet, several row groups, plus a column that is not read
    pq_path = tmp_path / "c4.parquet"
    pq.write_table(pa.table({"url": [f"u{i}" for i in range(len(docs))], "content": docs}), pq_path,
                   row_group_size=64)
    (tmp_path / "pq").mkdir()
    from_parquet = prepare(tmp_path / "pq", tokenizer_path, "-i", pq_path, "--text-column", "content")
    assert from_parquet.sha256 == from_jsonl.sha256 and from_parquet.n_docs == from_jsonl.n_docs
    # and compressed: .parquet.zst
    zst = tmp_path / "c4.parquet.zst"
    zst.write_bytes(zstandard.ZstdCompressor().compress(pq_path.read_bytes()))
    (tmp_path / "pqz").mkdir()
    from_zst = prepare(tmp_path / "pqz", tokenizer_path, "-i", zst, "--text-column", "content")
    assert from_zst.sha256 == from_jsonl.sha256


def test_gutenberg_txt_folder_full(shared_data, tokenizer, tokenizer_path, tmp_path):
    folder = shared_data / "pretrain" / "gutenberg_nltk"
    books = sorted(p for p in folder.iterdir() if p.name.endswith((".txt", ".txt.zst")))
    assert len(books) == 13
    tf = prepare(tmp_path, tokenizer_path, "-i", folder, "--workers", "2")
    # .txt: one document per file, books are long (cut into chunks), mixed plain and .zst
    want = expected_tokens(tokenizer, [read_txt(p) for p in books])
    assert tf.n_docs == 13 and tf.n_tokens == len(want)
    assert np.array_equal(tf.tokens, want)


def test_whole_pretrain_folder_with_val_split(shared_data, tokenizer_path, tmp_path):
    """Every format at once (globs of .jsonl.zst, .txt, .txt.zst), capped for time, split 5%."""
    pre = shared_data / "pretrain"
    t, v = tmp_path / "t.bin", tmp_path / "v.bin"
    res = smedjan("prepare", "-i", str(pre / "*.jsonl.zst"), "-i", pre / "gutenberg_nltk", "-i",
                  pre / "tinyshakespeare.txt", "-t", tokenizer_path, "-o", t, "--val-output", v,
                  "--val-fraction", "0.05", "--max-chars", "3000000", "--json")
    assert res.code == 0, res
    s = json.loads(res.out)
    tt, vv = TokenFile.open(t), TokenFile.open(v)
    assert s["chars"] == 3_000_000
    assert (tt.n_docs, vv.n_docs) == (s["documents"], s["val_documents"]) and vv.n_docs > 0
    assert tt.meta["n_sources"] == vv.meta["n_sources"] == 2 + 13 + 1


def test_gpt2_vocabulary_of_50265_stays_uint16(shared_data, tmp_path):
    gpt2 = shared_data / "tokenizer" / "gpt2_hf"
    tok_path = tmp_path / "gpt2.bin"
    res = smedjan("import-bpe", "--vocab", gpt2 / "vocab.json", "--merges", gpt2 / "merges.txt", "-o", tok_path)
    assert res.code == 0, res
    from smedjan.tokenizer import Tokenizer

    tok = Tokenizer.load(tok_path)
    assert tok.vocab_size == 50265
    src = shared_data / "pretrain" / "c4_demo.jsonl.zst"
    tf = prepare(tmp_path, tok_path, "-i", src, "--max-chars", "200000")
    assert tf.meta["dtype"] == "uint16" and tf.bos_id == tok.bos_id > 50000
    docs = read_jsonl_zst(src)
    # --max-chars cut the corpus: the file is a prefix of the full expected token stream,
    # except for the last (truncated) document, which we compare by re-encoding its prefix.
    starts = np.flatnonzero(np.asarray(tf.tokens) == tok.bos_id)
    full = expected_tokens(tok, docs[: len(starts) - 1])
    assert np.array_equal(tf.tokens[: starts[-1]], full)
