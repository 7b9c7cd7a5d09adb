"""`smedjan prepare` and `smedjan data-info` from the command line: contents, determinism, the
train/val split, and every kind of bad input (one line, exit 2, no file left behind)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from helpers import DATA, assert_user_error, smedjan
from smedjan.data.prepare import is_val_doc
from smedjan.data.sources import iter_chunks
from smedjan.formats.tokens import TokenFile


def split_docs(path) -> list[list[int]]:
    """The documents of a token file, each starting with its BOS."""
    tf = TokenFile.open(path)
    tokens = np.asarray(tf.tokens)
    starts = list(np.flatnonzero(tokens == tf.bos_id)) + [len(tokens)]
    return [tokens[a:b].tolist() for a, b in zip(starts, starts[1:])]


def leftovers(folder, keep) -> list[str]:
    """Files in `folder` other than `keep`: outputs or temporary files that must not exist."""
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


@pytest.fixture(scope="module")
def docs() -> list[str]:
    # ~150 real documents: tinyshakespeare split at blank lines, plus a few unicode oddities.
    texts = [c.text for c in iter_chunks([DATA / "pretrain" / "tinyshakespeare.txt.zst"], txt_split="blank",
                                         max_chars=60_000)]
    return texts + ["日本語のテキスト 😀", "special spelling <|bos|> stays text", "x"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, docs):
    folder = tmp_path_factory.mktemp("corpus")
    with open(folder / "docs.jsonl", "w") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": i, "text": d}) + "\n")
    return folder / "docs.jsonl"


def test_tokens_are_bos_plus_each_document(corpus, docs, tokenizer, tokenizer_path, tmp_path):
    out = tmp_path / "train.bin"
    res = smedjan("prepare", "-i", corpus, "-t", tokenizer_path, "-o", out, "--workers", "2", "--json")
    assert res.code == 0, res
    summary = json.loads(res.out)
    expected = [[tokenizer.bos_id] + tokenizer.encode(d) for d in docs]
    assert split_docs(out) == expected
    tf = TokenFile.open(out)
    assert tf.n_tokens == sum(len(e) for e in expected) == summary["tokens"]
    assert tf.n_docs == len(docs) == summary["documents"]
    assert tf.meta["dtype"] == summary["dtype"] == "uint16"
    assert tf.fingerprint == tokenizer.fingerprint and tf.vocab_size == tokenizer.vocab_size
    assert tf.meta["split"] == "train" and tf.meta["sources"] == [str(corpus)]
    assert leftovers(tmp_path, {"train.bin"}) == []


def test_output_is_identical_for_any_worker_count_and_rerun(corpus, tokenizer_path, tmp_path, monkeypatch):
    # Small jobs so that two workers really interleave on this small corpus.
    outs = []
    for i, workers in enumerate(["1", "2", "2"]):
        t, v = tmp_path / f"t{i}.bin", tmp_path / f"v{i}.bin"
        res = smedjan("prepare", "-i", corpus, "-t", tokenizer_path, "-o", t, "--val-output", v,
                      "--val-fraction", "0.2", "--workers", workers, env={"SMEDJAN_PREP_JOB_CHARS": "2000"})
        assert res.code == 0, res
        outs.append((t.read_bytes(), v.read_bytes()))
    assert outs[0] == outs[1] == outs[2]


def test_val_split_is_deterministic_and_disjoint(corpus, docs, tokenizer, tokenizer_path, tmp_path):
    expected = [[tokenizer.bos_id] + tokenizer.encode(d) for d in docs]
    for seed in (0, 7):
        t, v = tmp_path / f"t{seed}.bin", tmp_path / f"v{seed}.bin"
        res = smedjan("prepare", "-i", corpus, "-t", tokenizer_path, "-o", t, "--val-output", v,
                      "--val-fraction", "0.25", "--seed", seed)
        assert res.code == 0, res
        is_val = [is_val_doc(seed, i, 0.25) for i in range(len(docs))]
        # every document lands in exactly one file, in corpus order, as the hash says
        assert split_docs(v) == [e for e, b in zip(expected, is_val) if b]
        assert split_docs(t) == [e for e, b in zip(expected, is_val) if not b]
        assert 0.1 < sum(is_val) / len(docs) < 0.4
        assert TokenFile.open(v).meta["split"] == "val"
    assert split_docs(tmp_path / "v0.bin") != split_docs(tmp_path / "v7.bin")


def test_val_input_and_default_fraction(corpus, docs, tokenizer, tokenizer_path, tmp_path):
    other = tmp_path / "held.txt"
    other.write_text("A held-out document.\n")
    t, v = tmp_path / "t.bin", tmp_path / "v.bin"
    res = smedjan("prepare", "-i", corpus, "-t", tokenizer_path, "-o", t, "--val-output", v, "--val-input", other)
    assert res.code == 0, res
    assert split_docs(v) == [[tokenizer.bos_id] + tokenizer.encode("A held-out document.\n")]
    assert len(split_docs(t)) == len(docs)
    # --val-output alone: 1% of the documents by default
    res = smedjan("prepare", "-i", corpus, "-t", tokenizer_path, "-o", t, "--val-output", v, "--json")
    assert res.code == 0, res
    n_val = sum(is_val_doc(0, i, 0.01) for i in range(len(docs)))
    if n_val:
        assert json.loads(res.out)["val_documents"] == n_val and json.loads(res.out)["val_split"] == "hash"
    else:  # too few documents for 1%: the tail of the text instead, said on stderr
        assert json.loads(res.out)["val_split"] == "tail" and "--txt-split" in res.err


def test_one_text_file_gets_its_tail_as_val(tokenizer, tokenizer_path, tmp_path):
    # The newcomer's first command: one .txt file is one document, too few for any fraction.
    text = "".join(c.text for c in iter_chunks([DATA / "pretrain" / "tinyshakespeare.txt.zst"], max_chars=200_000))
    f = tmp_path / "tinyshakespeare.txt"
    f.write_text(text)
    outs = []
    for workers in ("1", "2"):
        t, v = tmp_path / f"t{workers}.bin", tmp_path / f"v{workers}.bin"
        res = smedjan("prepare", "--input", f, "-t", tokenizer_path, "--output", t, "--val-output", v,
                      "--val-fraction", "0.05", "--workers", workers, "--json",
                      env={"SMEDJAN_PREP_JOB_CHARS": "5000"})
        assert res.code == 0, res
        warning = [ln for ln in res.err.splitlines() if "warning:" in ln]
        assert len(warning) == 1 and "--txt-split" in warning[0] and "last 5%" in warning[0], res.err
        outs.append((t.read_bytes(), v.read_bytes()))
    assert outs[0] == outs[1]  # byte-identical for any worker count
    (train,), (val,) = split_docs(t), split_docs(v)
    cut = TokenFile.open(v).meta["val_from_char"]
    head, tail = text[:cut], text[cut:]
    assert train == [tokenizer.bos_id] + tokenizer.encode(head) and val == [tokenizer.bos_id] + tokenizer.encode(tail)
    assert head.endswith("\n") and not tail.startswith("\n")  # cut at a line start
    assert 0.04 * len(text) < len(tail) <= 0.05 * len(text)
    assert TokenFile.open(t).meta["val_split"] == "tail" and json.loads(res.out)["val_split"] == "tail"
    # A corpus of a few documents: the hash draws none for val, the tail is cut the same way and
    # the document the cut falls in is split there.
    docs = tmp_path / "few.jsonl"
    docs.write_text("".join(json.dumps({"text": text[i:i + 50_000]}) + "\n" for i in range(0, 200_000, 50_000)))
    assert not any(is_val_doc(0, i, 0.05) for i in range(4))
    res = smedjan("prepare", "-i", docs, "-t", tokenizer_path, "-o", t, "--val-output", v, "--val-fraction", "0.05")
    assert res.code == 0 and "4 document(s) are too few" in res.err and "--txt-split" in res.err, res
    assert len(split_docs(t)) == 4 and len(split_docs(v)) == 1
    assert split_docs(v) == [[tokenizer.bos_id] + tokenizer.encode(text[TokenFile.open(v).meta["val_from_char"]:])]
    # Text too short to split at all: one line, naming what helps.
    f.write_text("x")
    res = smedjan("prepare", "--input", f, "-t", tokenizer_path, "--output", t, "--val-output", v)
    assert_user_error(res, "too few", "--val-input", "--txt-split")


def test_txt_split_and_max_chars(tokenizer, tokenizer_path, tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("First para.\nStill first.\n\nSecond para.\n\n\nThird.\n")
    out = tmp_path / "t.bin"
    assert smedjan("prepare", "-i", f, "-t", tokenizer_path, "-o", out).code == 0
    assert len(split_docs(out)) == 1  # a .txt file is one document by default
    assert smedjan("prepare", "-i", f, "-t", tokenizer_path, "-o", out, "--txt-split", "blank").code == 0
    assert split_docs(out) == [[tokenizer.bos_id] + tokenizer.encode(d)
                               for d in ["First para.\nStill first.", "Second para.", "Third."]]
    assert smedjan("prepare", "-i", f, "-t", tokenizer_path, "-o", out, "--max-chars", "5").code == 0
    assert split_docs(out) == [[tokenizer.bos_id] + tokenizer.encode("First")]


def test_data_info_shows_counts_and_samples(corpus, tokenizer, tokenizer_path, tmp_path):
    out = tmp_path / "t.bin"
    assert smedjan("prepare", "-i", corpus, "-t", tokenizer_path, "-o", out).code == 0
    tf = TokenFile.open(out)
    res = smedjan("data-info", out, "--tokenizer", tokenizer_path, "--json", "--verify")
    assert res.code == 0, res
    info = json.loads(res.out)
    assert info["tokens"] == tf.n_tokens and info["documents"] == tf.n_docs
    assert info["dtype"] == "uint16" and info["fingerprint"] == tokenizer.fingerprint
    assert info["vocab_size"] == tokenizer.vocab_size and len(info["samples"]) == 3
    first = info["samples"][0]
    assert first["position"] == 0 and first["ids"][0] == tokenizer.bos_id
    assert first["text"] == tokenizer.decode(first["ids"][1:])
    res = smedjan("data-info", out)  # no tokenizer: ids, and a hint
    assert res.code == 0 and "pass --tokenizer" in res.out and str(tokenizer.bos_id) in res.out


def test_data_info_refuses_another_tokenizer(corpus, tokenizer_path, tmp_path):
    from smedjan.tokenizer import train_bpe

    other = tmp_path / "other.bin"
    train_bpe(["a tiny corpus for another tokenizer"] * 3, vocab_size=300, workers=1).save(other)
    out = tmp_path / "t.bin"
    assert smedjan("prepare", "-i", corpus, "-t", tokenizer_path, "-o", out).code == 0
    assert_user_error(smedjan("data-info", out, "-t", other), str(out), str(other), "fingerprint")


# ------------------------------------------------------------------ bad input
def _bad_inputs(folder, corpus):
    """name -> (extra args, needles in the error line)."""
    (folder / "bad.jsonl").write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": oops}\n')
    (folder / "nofield.jsonl").write_text('{"text": "fine"}\n{"body": "no text"}\n')
    (folder / "empty.jsonl").write_text('{"text": ""}\n\n{"text": ""}\n')
    (folder / "corrupt.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd" + b"garbage" * 20)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["a", "b"]}), folder / "nocol.parquet")
    (folder / "notparquet.parquet").write_bytes(b"PAR1 not really")
    (folder / "one.txt").write_text("a")
    return {
        "malformed_json": (["-i", folder / "bad.jsonl"], [f"{folder / 'bad.jsonl'}:3", "malformed JSON"]),
        "missing_field": (["-i", folder / "nofield.jsonl"], [f"{folder / 'nofield.jsonl'}:2", "'text'"]),
        "missing_column": (["-i", folder / "nocol.parquet"], [str(folder / "nocol.parquet"), "column 'text'"]),
        "not_parquet": (["-i", folder / "notparquet.parquet"], [str(folder / "notparquet.parquet"), "parquet"]),
        "corrupt_zstd": (["-i", folder / "corrupt.jsonl.zst"], [str(folder / "corrupt.jsonl.zst"), "zstd"]),
        "missing_file": (["-i", folder / "nope.jsonl"], [str(folder / "nope.jsonl"), "does not exist"]),
        "empty_corpus": (["-i", folder / "empty.jsonl"], [str(folder / "empty.jsonl"), "no text"]),
        "bad_glob": (["-i", str(folder / "*.nothing")], ["matches no"]),
        "val_without_output": (["-i", corpus, "--val-fraction", "0.1"], ["--val-output"]),
        "fraction_out_of_range": (["-i", corpus, "--val-output", folder / "v.bin", "--val-fraction", "1.5"],
                                  ["--val-fraction"]),
        "empty_val_split": (["-i", folder / "one.txt", "--val-output", folder / "v.bin"],
                            ["too few", "--val-fraction", "--txt-split"]),
        "bad_txt_split": (["-i", corpus, "--txt-split", "words"], ["--txt-split"]),
        "zero_workers": (["-i", corpus, "--workers", "0"], ["--workers"]),
    }


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory, corpus):
    folder = tmp_path_factory.mktemp("bad")
    return folder, _bad_inputs(folder, corpus)


@pytest.mark.parametrize("case", ["malformed_json", "missing_field", "missing_column", "not_parquet", "corrupt_zstd",
                                  "missing_file", "empty_corpus", "bad_glob", "val_without_output",
                                  "fraction_out_of_range", "empty_val_split", "bad_txt_split", "zero_workers"])
def test_bad_input_one_line_exit_2_nothing_written(bad_folder, tokenizer_path, tmp_path, case):
    folder, cases = bad_folder
    before = sorted(p.name for p in folder.iterdir())
    args, needles = cases[case]
    out = tmp_path / "train.bin"
    assert_user_error(smedjan("prepare", "--workers", "2", *args, "-t", tokenizer_path, "-o", out), *needles)
    assert leftovers(tmp_path, set()) == []
    assert sorted(p.name for p in folder.iterdir()) == before  # no val.bin, no temporary


def test_error_after_tokens_were_written_leaves_nothing(tokenizer_path, tmp_path, docs):
    # Many good documents first, so jobs were encoded and written before the bad line.
    corpus = tmp_path / "in" / "late.jsonl"
    corpus.parent.mkdir()
    with open(corpus, "w") as f:
        for _ in range(20):
            for d in docs:
                f.write(json.dumps({"text": d}) + "\n")
        f.write("{not json\n")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    res = smedjan("prepare", "-i", corpus, "-t", tokenizer_path, "-o", out_dir / "train.bin", "--val-output",
                  out_dir / "val.bin", "--workers", "2", env={"SMEDJAN_PREP_JOB_CHARS": "5000"})
    assert_user_error(res, f"{corpus}:{20 * len(docs) + 1}", "malformed JSON")
    assert leftovers(out_dir, set()) == []


def test_existing_output_survives_a_failed_run(corpus, tokenizer_path, tmp_path):
    out = tmp_path / "train.bin"
    assert smedjan("prepare", "-i", corpus, "-t", tokenizer_path, "-o", out).code == 0
    before = out.read_bytes()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n[1, 2]\n')
    assert_user_error(smedjan("prepare", "-i", bad, "-t", tokenizer_path, "-o", out), f"{bad}:2")
    assert out.read_bytes() == before and leftovers(tmp_path, {"train.bin", "bad.jsonl"}) == []


def test_bad_tokenizer_and_output_paths(corpus, tokenizer_path, tmp_path):
    out = tmp_path / "train.bin"
    assert smedjan("prepare", "-i", corpus, "-t", tokenizer_path, "-o", out).code == 0
    # a token file is not a tokenizer
    assert_user_error(smedjan("prepare", "-i", corpus, "-t", out, "-o", tmp_path / "x.bin"), str(out), "magic")
    assert_user_error(smedjan("prepare", "-i", corpus, "-t", tmp_path / "none.bin", "-o", tmp_path / "x.bin"),
                      "none.bin", "does not exist")
    assert_user_error(smedjan("prepare", "-i", corpus, "-t", tokenizer_path, "-o", tmp_path / "no" / "x.bin"),
                      "does not exist")
    assert_user_error(smedjan("prepare", "-i", corpus, "-t", tokenizer_path, "-o", out, "--val-output", out),
                      "same file")
    assert_user_error(smedjan("prepare", "-i", corpus, "-t", tokenizer_path, "-o", corpus), "overwrite an input")
    assert leftovers(tmp_path, {"train.bin"}) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file(tokenizer_path, tmp_path):
    f = tmp_path / "secret.txt"
    f.write_text("hidden")
    f.chmod(0)
    assert_user_error(smedjan("prepare", "-i", f, "-t", tokenizer_path, "-o", tmp_path / "t.bin"), str(f), "readable")
    assert leftovers(tmp_path, {"secret.txt"}) == []


def test_help_lists_defaults():
    res = smedjan("prepare", "--help", env={"COLUMNS": "250"})
    assert res.code == 0
    for flag in ("--input", "--tokenizer", "--output", "--val-output", "--val-fraction", "--val-input", "--seed",
                 "--text-field", "--text-column", "--txt-split", "--max-chars", "--workers", "--json"):
        assert flag in res.out
    assert "default: text" in res.out and "default: file" in res.out and "0.01" in res.out
    res = smedjan("data-info", "--help", env={"COLUMNS": "250"})
    assert res.code == 0 and "--tokenizer" in res.out and "default: 3" in res.out


def test_vocabulary_over_65536_is_stored_as_uint32(tmp_path):
    """A synthetic tokenizer with every byte pair merged: 256 + 65536 + 8 specials = 65800 ids."""
    from smedjan.formats import constants as C
    from smedjan.tokenizer import Tokenizer

    tokens = [bytes([b]) for b in range(256)] + [bytes([a, b]) for a in range(256) for b in range(256)]
    merges = [(a, b) for a in range(256) for b in range(256)]
    specials = {s: len(tokens) + i for i, s in enumerate(C.SPECIAL_TOKENS)}
    tok = Tokenizer(tokens + [s.encode() for s in C.SPECIAL_TOKENS], merges, specials)
    tok.save(tmp_path / "big.bin")
    assert tok.vocab_size == 65800 and tok.bos_id > 65535
    (tmp_path / "a.jsonl").write_text('{"text": "hello world"}\n{"text": "\u00ff\u00fe high bytes"}\n')
    out = tmp_path / "t.bin"
    res = smedjan("prepare", "-i", tmp_path / "a.jsonl", "-t", tmp_path / "big.bin", "-o", out, "--json")
    assert res.code == 0, res
    assert json.loads(res.out)["dtype"] == "uint32"
    tf = TokenFile.open(out)
    assert tf.dtype.itemsize == 4 and tf.bos_id == tok.bos_id
    assert split_docs(out) == [[tok.bos_id] + tok.encode("hello world"), [tok.bos_id] + tok.encode("\u00ff\u00fe high bytes")]
    assert max(tf.tokens) > 65535


def test_ctrl_c_mid_run_leaves_nothing(tokenizer_path, tmp_path):
    """Interrupted while reading (a FIFO input blocks until we write): exit 130, no temporary file."""
    import signal
    import subprocess
    import sys
    import time

    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    env = {**os.environ, "SMEDJAN_PLAIN_PROGRESS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "smedjan_tools.cli", "prepare", "-i", str(fifo), "-t",
                             str(tokenizer_path), "-o", str(out_dir / "train.bin"), "--workers", "2"],
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        with open(fifo, "w") as w:  # blocks until prepare opens the FIFO for reading
            w.write("some text\n" * 1000)
            w.flush()
            deadline = time.monotonic() + 60
            while not list(out_dir.iterdir()) and time.monotonic() < deadline:
                time.sleep(0.05)  # wait for the temporary output to exist
            assert [p.name.endswith(".tmp") for p in out_dir.iterdir()] == [True]
            proc.send_signal(signal.SIGINT)
            err = proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err
    assert leftovers(out_dir, set()) == []


def test_a_bad_input_found_mid_progress_ends_stderr_with_the_error_alone(tokenizer_path, tmp_path):
    """The progress display printed its last line right before the error line (82 bad-input
    cases): the error line must be the last, and no progress line is written for a failed stage."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": 5}\n')
    for tool_args in (("prepare", "-i", bad, "-t", tokenizer_path, "-o", tmp_path / "t.bin"),
                      ("tokenizer", "-i", bad, "--vocab-size", "300", "-o", tmp_path / "tok.bin")):
        res = smedjan(*tool_args)
        assert_user_error(res, f"{bad}:2")
        assert not [ln for ln in res.err.splitlines() if " elapsed" in ln], res
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]
