"""BPE training: against a brute-force reference trainer, determinism, inputs, errors."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import zstandard

from helpers import DATA, assert_user_error, smedjan
from smedjan.errors import UserError
from smedjan.formats import constants as C
from smedjan.tokenizer import train_bpe
from smedjan.tokenizer.train import count_pieces, learn_merges


def naive_merges(piece_counts: dict[bytes, int], n_merges: int) -> list[tuple[int, int]]:
    """Textbook BPE: recount every pair from scratch at each step (slow, obviously right)."""
    words = [(list(p), c) for p, c in piece_counts.items()]
    tokens = [bytes([b]) for b in range(256)]
    merges: list[tuple[int, int]] = []
    banned: set[tuple[int, int]] = set()
    while len(merges) < n_merges:
        pairs: Counter = Counter()
        for w, c in words:
            for p in zip(w, w[1:]):
                pairs[p] += c
        candidates = [(-c, p) for p, c in pairs.items() if p not in banned]
        if not candidates:
            break
        _, (a, b) = min(candidates)
        if tokens[a] + tokens[b] in tokens:
            banned.add((a, b))
            continue
        t = len(tokens)
        tokens.append(tokens[a] + tokens[b])
        merges.append((a, b))
        new_words = []
        for w, c in words:
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    out.append(t)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words.append((out, c))
        words = new_words
    return merges


def test_merges_equal_brute_force_reference():
    import zstandard

    raw = zstandard.ZstdDecompressor().stream_reader(open(DATA / "pretrain/tinyshakespeare.txt.zst", "rb")).read(40_000)
    text = raw.decode("utf-8", errors="replace") + " aaaa aaaaa abab ababab 1234567 ééé 日本語日本語"
    counts = count_pieces([text], workers=1)
    _, fast = learn_merges(counts, 300)
    assert fast == naive_merges(counts, 300)


def test_training_is_deterministic_across_worker_counts():
    texts = [f"document {i}: " + "the quick brown fox jumps over the lazy dog " * (i % 7 + 1) for i in range(2000)]
    a = train_bpe(texts, vocab_size=400, workers=1)
    b = train_bpe(texts, vocab_size=400, workers=2)
    assert a.fingerprint == b.fingerprint
    assert a.merges == b.merges


def test_vocabulary_layout(tokenizer):
    assert tokenizer.vocab_size == 2048
    assert [tokenizer.tokens[i] for i in range(256)] == [bytes([b]) for b in range(256)]
    assert list(tokenizer.specials) == C.SPECIAL_TOKENS
    assert sorted(tokenizer.specials.values()) == list(range(2048 - len(C.SPECIAL_TOKENS), 2048))
    assert tokenizer.has_chat_tokens
    # merges produce increasing ids, so tiktoken's rank-by-id equals merge order
    assert tokenizer._merge_result == list(range(256, 256 + tokenizer.n_merges))


def test_small_corpus_gives_a_smaller_vocabulary_not_an_error():
    tok = train_bpe(["abcabc"], vocab_size=1000)
    assert tok.n_merges < 1000 - 264
    assert tok.decode(tok.encode("abcabc")) == "abcabc"


def test_vocab_size_below_bytes_plus_specials_is_refused():
    with pytest.raises(UserError, match="too small"):
        train_bpe(["hello"], vocab_size=263)


def _write_formats(tmp_path, docs):
    """The same documents as .txt (blank-line split), .jsonl.zst and .parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "c.txt").write_text("\n\n".join(docs))
    lines = "".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)).encode()
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    pq.write_table(pa.table({"body": docs}), tmp_path / "c.parquet", row_group_size=3)


def test_every_input_format_trains_the_same_tokenizer(tmp_path):
    docs = [f"Doc {i} says hello to the world, number {i * 37}." for i in range(20)]
    _write_formats(tmp_path, docs)
    fps = set()
    for args in (["-i", tmp_path / "c.txt", "--txt-split", "blank"], ["-i", tmp_path / "c.jsonl.zst"],
                 ["-i", tmp_path / "c.parquet", "--text-column", "body"]):
        out = tmp_path / "t.bin"
        res = smedjan("tokenizer", *args, "--vocab-size", 300, "-o", out, "--json")
        assert res.code == 0, res
        summary = json.loads(res.out)
        assert summary["documents"] == 20
        fps.add(summary["fingerprint"])
        # counting works on pieces, so document boundaries inside one text do not matter here
    assert len(fps) == 1


def test_max_chars_caps_the_input(tmp_path):
    out = tmp_path / "t.bin"
    res = smedjan("tokenizer", "-i", DATA / "pretrain/tinyshakespeare.txt.zst", "--vocab-size", 300,
                  "--max-chars", 5000, "-o", out, "--json")
    assert res.code == 0, res
    assert json.loads(res.out)["chars"] == 5000


@pytest.mark.parametrize("case", ["empty", "missing", "tiny_vocab", "bad_jsonl", "no_field", "no_column",
                                  "no_folder", "bad_zst", "bad_pattern"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, case):
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = tmp_path / "tok.bin"
    args = {"empty": None, "missing": ["-i", tmp_path / "nope.txt"]}.get(case)
    needle = ""
    if case == "empty":
        (tmp_path / "e.txt").write_text("")
        args, needle = ["-i", tmp_path / "e.txt"], "empty"
    elif case == "missing":
        needle = "nope.txt"
    elif case == "tiny_vocab":
        args, needle = ["-i", DATA / "pretrain", "--vocab-size", 10], "too small"
    elif case == "bad_jsonl":
        (tmp_path / "b.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n')
        args, needle = ["-i", tmp_path / "b.jsonl"], "b.jsonl:2"
    elif case == "no_field":
        (tmp_path / "b.jsonl").write_text('{"body": "ok"}\n')
        args, needle = ["-i", tmp_path / "b.jsonl"], "'text'"
    elif case == "no_column":
        pq.write_table(pa.table({"body": ["x"]}), tmp_path / "b.parquet")
        args, needle = ["-i", tmp_path / "b.parquet"], "no column 'text'"
    elif case == "no_folder":
        args, needle = ["-i", DATA / "pretrain"], "does not exist"
        out = tmp_path / "missing" / "tok.bin"
    elif case == "bad_zst":
        (tmp_path / "b.txt.zst").write_bytes(b"\x28\xb5\x2f\xfd garbage that is not zstd")
        args, needle = ["-i", tmp_path / "b.txt.zst"], "b.txt.zst"
    elif case == "bad_pattern":
        args, needle = ["-i", DATA / "pretrain", "--pattern", "nope"], "--pattern"
    res = smedjan("tokenizer", *args, "-o", out)
    assert_user_error(res, needle)
    assert not out.exists()
    assert list(tmp_path.glob(".tok.bin*")) == []
