"""Long documents from .jsonl/.parquet/line/blank sources arrive as chunks that encode like the whole."""

from __future__ import annotations

import json

import pytest

from helpers import DATA
from smedjan.data import sources
from smedjan.data.sources import iter_chunks


@pytest.fixture(scope="module")
def book() -> str:
    # ~1.2 MB of real prose with ordinary line structure
    return "".join(c.text for c in iter_chunks([DATA / "pretrain" / "gutenberg"], max_chars=1_200_000))


def test_long_jsonl_document_is_cut_at_safe_places(tmp_path, tokenizer, book, monkeypatch):
    monkeypatch.setattr(sources, "DOC_CHUNK", 100_000)  # many cuts in a small test
    nasty = "x" * 150_000 + "\n  indented\n\nnext\n" + "y" * 50_000  # a stretch with no safe place
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"text": book}) + "\n" + json.dumps({"text": nasty}) + "\n")
    chunks = list(iter_chunks([path]))
    docs: list[list[str]] = []
    for c in chunks:
        if c.new_doc:
            docs.append([])
        docs[-1].append(c.text)
    assert ["".join(d) for d in docs] == [book, nasty]
    assert len(docs[0]) >= 12 and all(len(t) <= 100_000 for t in docs[0])
    assert len(docs[1]) == 2  # cut at the first safe place after the limit
    for whole, parts in zip([book, nasty], docs):
        assert sum((tokenizer.encode(p) for p in parts), []) == tokenizer.encode(whole)


def test_short_documents_are_untouched(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "one\\ntwo"}\n{"text": "three"}\n')
    assert [(c.text, c.new_doc) for c in iter_chunks([path])] == [("one\ntwo", True), ("three", True)]


@pytest.mark.parametrize("name, split", [("c.txt", "file"), ("c.txt", "line"), ("c.txt", "blank"),
                                         ("c.jsonl", "file"), ("c.jsonl.zst", "file")])
def test_invalid_utf8_is_replaced_and_counted_in_every_corpus_reader(tmp_path, name, split):
    """README: 'Invalid UTF-8 in a corpus is replaced and counted' (a .jsonl line with a bad
    byte used to abort the read, and the .txt line/blank splits replaced without counting)."""
    import zstandard

    bad = b"caf\xe9 ok \xff\xfe end \xef\xbf\xbd kept"  # 3 invalid bytes, one real U+FFFD
    raw = json.dumps({"text": "X"}).encode().replace(b"X", bad) + b"\n" if ".jsonl" in name else bad + b"\n"
    if name.endswith(".zst"):
        raw = zstandard.ZstdCompressor().compress(raw)
    (tmp_path / name).write_bytes(raw)
    stats = sources.ReadStats()
    text = "".join(c.text for c in iter_chunks([tmp_path / name], txt_split=split, stats=stats))
    assert text.rstrip("\n") == "caf\ufffd ok \ufffd\ufffd end \ufffd kept"
    assert stats.replaced_bytes == 3


def test_invalid_utf8_in_data_records_is_one_line_naming_the_line(tmp_path):
    from smedjan.errors import UserError
    from smedjan.post.formats import load_conversations

    p = tmp_path / "sft.jsonl"
    p.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "caf\xe9", "response": "b"}\n')
    with pytest.raises(UserError, match=f"{p}:2: not valid UTF-8"):
        load_conversations([p])
