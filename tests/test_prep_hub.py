"""hf://datasets/... inputs of `smedjan tokenizer` and `smedjan prepare`: read from a hub cache
laid out as huggingface_hub lays it out (offline), or through a local stand-in for the hub
(tests/hub_mock.py); the same bytes as the local file, pinned commits, caps, and one-line errors."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import DATA, assert_user_error, hub_cache_dataset, hub_env, smedjan
from hub_mock import MockHub
from smedjan.data.hub import glob_regex, parse
from smedjan.data.sources import iter_chunks
from smedjan.errors import UserError
from smedjan.formats.tokens import TokenFile
from smedjan.tokenizer import Tokenizer

SHA1, SHA2 = "1" * 40, "2" * 40
REPO = "smedjan-test/corpus"


def parquet_bytes(texts: list[str], row_group: int = 16) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), buf, row_group_size=row_group)
    return buf.getvalue()


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return [c.text for c in iter_chunks([DATA / "pretrain" / "tinyshakespeare.txt.zst"], txt_split="blank",
                                        max_chars=40_000)]


@pytest.fixture(scope="module")
def local(tmp_path_factory, texts):
    path = tmp_path_factory.mktemp("local") / "train-00000.parquet"
    path.write_bytes(parquet_bytes(texts))
    return path


@pytest.fixture
def hf_home(tmp_path, local):
    home = tmp_path / "hf"
    hub_cache_dataset(home, REPO, SHA1, {"data/train-00000.parquet": local.read_bytes(), "README.md": b"# corpus\n"})
    return home


def tokens(path) -> np.ndarray:
    return np.asarray(TokenFile.open(path).tokens)


def test_hub_input_offline_gives_the_same_tokens_as_the_local_file(hf_home, local, tokenizer_path, tmp_path):
    env = hub_env(hf_home)
    args = ["-t", tokenizer_path, "--val-fraction", "0.2", "--workers", "2"]
    ref = smedjan("prepare", "-i", local, "-o", tmp_path / "a.bin", "--val-output", tmp_path / "av.bin", *args)
    assert ref.code == 0, ref
    for i, url in enumerate([f"hf://datasets/{REPO}/data/*.parquet", f"hf://datasets/{REPO}@main/data",
                             f"hf://datasets/{REPO}@{SHA1}/**/train-*.parquet"]):
        res = smedjan("prepare", "-i", url, "-o", tmp_path / f"h{i}.bin", "--val-output", tmp_path / f"hv{i}.bin",
                      *args, env=env)
        assert res.code == 0, res
        assert np.array_equal(tokens(tmp_path / f"h{i}.bin"), tokens(tmp_path / "a.bin"))
        assert np.array_equal(tokens(tmp_path / f"hv{i}.bin"), tokens(tmp_path / "av.bin"))
        meta = TokenFile.open(tmp_path / f"h{i}.bin").meta
        # the header records the dataset, the commit it resolved to and the file
        assert meta["sources"] == [f"hf://datasets/{REPO}@{SHA1}/data/train-00000.parquet"]
        assert meta["hub"] == [{"input": url, "dataset": REPO, "revision": url.split("@")[1].split("/")[0]
                                if "@" in url else "main", "sha": SHA1, "files": 1,
                                "bytes": local.stat().st_size}]


def test_tokenizer_from_the_hub_matches_and_records_its_corpus(hf_home, local, tmp_path):
    url = f"hf://datasets/{REPO}/data/*.parquet"
    a = smedjan("tokenizer", "-i", local, "--vocab-size", "300", "-o", tmp_path / "a.bin", "--workers", "1")
    b = smedjan("tokenizer", "-i", url, "--vocab-size", "300", "-o", tmp_path / "b.bin", "--workers", "1",
                env=hub_env(hf_home))
    assert a.code == 0 and b.code == 0, (a, b)
    ta, tb = Tokenizer.load(tmp_path / "a.bin"), Tokenizer.load(tmp_path / "b.bin")
    assert ta.fingerprint == tb.fingerprint
    assert tb.corpus["sources"] == [f"hf://datasets/{REPO}@{SHA1}/data/train-00000.parquet"]
    assert tb.corpus["hub"][0]["sha"] == SHA1 and tb.corpus["hub"][0]["dataset"] == REPO
    assert ta.corpus["sources"] == [str(local)]


def test_max_docs_reads_and_fetches_only_what_it_needs(hf_home, local, texts, tokenizer, tokenizer_path, tmp_path):
    # The commit lists a second file that is not in the cache (as after an earlier capped run
    # online): offline, a cap that stops before it lets the run succeed, none fails.
    size = local.stat().st_size
    code = (f"from smedjan.data.hub import remember_listing; remember_listing({REPO!r}, {SHA1!r}, 'data', "
            f"{{'data/train-00000.parquet': {size}, 'data/train-00001.parquet': 123}})")
    subprocess.run([sys.executable, "-c", code], env={**os.environ, **hub_env(hf_home)}, check=True)
    url = f"hf://datasets/{REPO}/data/*.parquet"
    out = tmp_path / "t.bin"
    res = smedjan("prepare", "-i", url, "-t", tokenizer_path, "-o", out, "--max-docs", "7", "--json",
                  env=hub_env(hf_home))
    assert res.code == 0, res
    assert json.loads(res.out)["documents"] == 7
    assert tokens(out).tolist() == [i for t in texts[:7] for i in [tokenizer.bos_id, *tokenizer.encode(t)]]
    res = smedjan("prepare", "-i", url, "-t", tokenizer_path, "-o", out.with_name("u.bin"), env=hub_env(hf_home))
    assert_user_error(res, "train-00001.parquet", "offline", "not in the hub cache")
    assert not out.with_name("u.bin").exists()


@pytest.mark.parametrize("case", ["uncached_dataset", "uncached_revision", "empty_glob", "malformed", "models",
                                  "no_extra"])
def test_hub_errors_are_one_line_exit_2_nothing_written(case, hf_home, tokenizer_path, tmp_path):
    env = hub_env(hf_home)
    url, needles = {
        "uncached_dataset": ("hf://datasets/nobody/nothing/*.parquet", ["nobody/nothing", "offline", "hub cache"]),
        "uncached_revision": (f"hf://datasets/{REPO}@v2/data", ["'v2'", "offline"]),
        "empty_glob": (f"hf://datasets/{REPO}/data/*.jsonl", ["matches no", SHA1[:12]]),
        "malformed": ("hf://datasets/only-owner", ["malformed", "hf://datasets/OWNER/NAME"]),
        "models": ("hf://gpt2/config.json", ["only datasets"]),
        "no_extra": (f"hf://datasets/{REPO}/data/*.parquet", ["huggingface_hub", ".[hub]"]),
    }[case]
    if case == "no_extra":  # as if the extra were not installed: the import fails
        fake = tmp_path / "fake"
        fake.mkdir()
        (fake / "huggingface_hub.py").write_text("raise ImportError('No module named huggingface_hub')\n")
        env["PYTHONPATH"] = str(fake)
    out = tmp_path / "out"
    out.mkdir()
    for tool, extra in (("prepare", ["-t", tokenizer_path, "--val-output", out / "val.bin"]), ("tokenizer", [])):
        res = smedjan(tool, "-i", url, "-o", out / "train.bin", *extra, env=env)
        assert_user_error(res, *needles)
        assert list(out.iterdir()) == []


@pytest.mark.slow
def test_online_through_a_stand_in_hub(local, tokenizer_path, tmp_path):
    """Resolve a branch, download into the cache, then run again without asking for anything
    but the branch; pinned to the commit, not even that. Unknown datasets and an unreachable
    hub are one line each."""
    home = tmp_path / "hf"
    hub = MockHub()
    hub.add(REPO, SHA1, {"data/train-00000.parquet": local.read_bytes()})
    url = f"hf://datasets/{REPO}/data/*.parquet"
    with hub:
        env = {**hub_env(home, offline=False), "HF_ENDPOINT": hub.url}
        res = smedjan("prepare", "-i", url, "-t", tokenizer_path, "-o", tmp_path / "a.bin", env=env)
        assert res.code == 0, res
        assert "downloading" in res.err and any("/resolve/" in r for r in hub.requests)
        assert (home / "hub" / f"datasets--{REPO.replace('/', '--')}" / "refs" / "main").read_text() == SHA1
        hub.requests.clear()
        res = smedjan("prepare", "-i", url, "-t", tokenizer_path, "-o", tmp_path / "b.bin", env=env)
        assert res.code == 0, res
        assert hub.requests == [f"/api/datasets/{REPO}/revision/main"]  # listing and file come from the cache
        hub.requests.clear()
        res = smedjan("prepare", "-i", f"hf://datasets/{REPO}@{SHA1}/data/*.parquet", "-t", tokenizer_path,
                      "-o", tmp_path / "c.bin", env=env)
        assert res.code == 0 and hub.requests == [], res
        assert tokens(tmp_path / "a.bin").tolist() == tokens(tmp_path / "c.bin").tolist()
        res = smedjan("prepare", "-i", "hf://datasets/nobody/nothing", "-t", tokenizer_path, "-o",
                      tmp_path / "d.bin", env=env)
        assert_user_error(res, "no dataset 'nobody/nothing'")
        res = smedjan("prepare", "-i", f"hf://datasets/{REPO}@nope/data", "-t", tokenizer_path, "-o",
                      tmp_path / "d.bin", env=env)
        assert_user_error(res, "no revision 'nope'")
        assert not (tmp_path / "d.bin").exists()
    # the hub is gone: a branch falls back to the commit cached for it, with a note; an
    # uncached dataset is one line
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"
    res = smedjan("prepare", "-i", url, "-t", tokenizer_path, "-o", tmp_path / "e.bin", env=env)
    assert res.code == 0 and "unreachable" in res.err and SHA1[:12] in res.err, res
    res = smedjan("prepare", "-i", "hf://datasets/nobody/nothing", "-t", tokenizer_path, "-o", tmp_path / "f.bin",
                  env=env)
    assert_user_error(res, "cannot reach the hub", "nobody/nothing")


@pytest.mark.slow
def test_a_download_cut_off_resumes_where_it_stopped(tokenizer_path, tmp_path):
    """The connection drops mid-file: huggingface_hub asks for the rest only (it keeps what it
    received in whole chunks of DOWNLOAD_CHUNK_SIZE, so the file is larger than one chunk)."""
    import hashlib

    from huggingface_hub import constants

    rng = np.random.default_rng(0)
    texts = [rng.bytes(4000).hex() for _ in range(3000)]  # 24 MB that does not compress
    local = tmp_path / "big.parquet"
    pq.write_table(pa.table({"text": texts}), local, compression="none", row_group_size=64)
    data = local.read_bytes()
    assert len(data) > constants.DOWNLOAD_CHUNK_SIZE + 2_000_000
    home = tmp_path / "hf"
    hub = MockHub()
    hub.add(REPO, SHA1, {"data/train-00000.parquet": data})
    hub.cut_after = cut = constants.DOWNLOAD_CHUNK_SIZE + 1_000_000
    with hub:
        env = {**hub_env(home, offline=False), "HF_ENDPOINT": hub.url}
        res = smedjan("prepare", "-i", f"hf://datasets/{REPO}/data/*.parquet", "-t", tokenizer_path, "-o",
                      tmp_path / "t.bin", "--max-docs", "3", env=env)
    assert res.code == 0, res
    assert len(hub.ranges) == 1, (hub.ranges, res.err)
    start = int(hub.ranges[0].removeprefix("bytes=").split("-")[0])
    assert 0 < start <= cut  # only the rest was asked for again
    blob = home / "hub" / f"datasets--{REPO.replace('/', '--')}" / "blobs" / hashlib.sha256(data).hexdigest()
    assert blob.read_bytes() == data
    ref = smedjan("prepare", "-i", local, "-t", tokenizer_path, "-o", tmp_path / "r.bin", "--max-docs", "3")
    assert ref.code == 0 and tokens(tmp_path / "t.bin").tolist() == tokens(tmp_path / "r.bin").tolist()


def test_parse_and_glob():
    u = parse("hf://datasets/HuggingFaceFW/fineweb-edu@refs%2Fconvert%2Fparquet/sample/10BT/*.parquet")
    assert (u.repo_id, u.revision, u.glob) == ("HuggingFaceFW/fineweb-edu", "refs/convert/parquet",
                                              "sample/10BT/*.parquet")
    assert parse("hf://datasets/a/b").glob == "" and parse("hf://datasets/a/b").ref == "main"
    assert parse(f"hf://datasets/a/b@{SHA2}/x").pinned and not parse("hf://datasets/a/b@main/x").pinned
    assert parse("hf://datasets/a/b@v1/x/").at(SHA2) == f"hf://datasets/a/b@{SHA2}/x"
    cases = {
        "*.parquet": (["a.parquet"], ["d/a.parquet"]),
        "d/*.parquet": (["d/a.parquet"], ["d/e/a.parquet", "a.parquet"]),
        "**/*.parquet": (["a.parquet", "d/e/a.parquet"], ["a.jsonl"]),
        "d/**": (["d/a", "d/e/f"], ["e/a"]),
        "shard_0000[0-1].parquet": (["shard_00000.parquet", "shard_00001.parquet"], ["shard_00002.parquet"]),
        "shard_?.txt": (["shard_1.txt"], ["shard_12.txt", "shard_/.txt"]),
        "[!a]*": (["b"], ["a", "b/c"]),
    }
    for glob, (yes, no) in cases.items():
        rx = glob_regex(glob)
        assert all(rx.match(p) for p in yes), (glob, yes)
        assert not any(rx.match(p) for p in no), (glob, no)
    for bad in ("hf://datasets/a/b/../c", "hf://datasets/a/b@/c", "hf://datasets/-a/b"):
        with pytest.raises(UserError):
            parse(bad)
