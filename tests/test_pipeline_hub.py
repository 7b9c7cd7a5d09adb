"""doit with a corpus on the hub (through tests/hub_mock.py): the commit is locked, so the same
revision is up to date without a single request; a new revision (asked for) or another glob
re-runs tokenizer and prepare; offline or without the hub, one line says why."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import DATA, REPO, hub_env
from hub_mock import MockHub
from smedjan.data.sources import iter_chunks

SHA1, SHA2 = "a" * 40, "b" * 40
DATASET = "smedjan-test/web"
TOML = """
[corpus]
input = ["hf://datasets/{dataset}/data/*.parquet"]

[tokenizer]
vocab_size = 300

[prepare]
val_fraction = 0.1

[train]
size = "custom"
dim = 32
layers = 1
heads = 2
steps = 2

[export]
quant = ["q8_0"]
"""


def shard(texts: list[str]) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": texts}), buf, row_group_size=8)
    return buf.getvalue()


def doit(root, env, *args):
    env = {**os.environ, **env, "SMEDJAN_PIPELINES": str(root / "pipelines"), "SMEDJAN_RUNS": str(root / "runs"),
           "SMEDJAN_PLAIN_PROGRESS": "1"}
    return subprocess.run([sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"), "--dir", str(root), *args],
                          capture_output=True, text=True, env=env, timeout=600)


def ran(proc) -> set[str]:
    return {m.group(1) for m in re.finditer(r"^\.  (\w+):web$", proc.stdout, re.M)}


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return [c.text for c in iter_chunks([DATA / "pretrain" / "tinyshakespeare.txt.zst"], txt_split="blank",
                                        max_chars=60_000)]


@pytest.mark.slow
def test_hub_corpus_is_locked_and_reruns_only_on_a_new_revision_or_glob(tmp_path, texts):
    root = tmp_path / "proj"
    (root / "pipelines").mkdir(parents=True)
    toml = root / "pipelines" / "web.toml"
    toml.write_text(TOML.format(dataset=DATASET))
    hub = MockHub()
    hub.add(DATASET, SHA1, {"data/part-0.parquet": shard(texts[:100]), "data/part-1.parquet": shard(texts[100:200]),
                            "README.md": b"# web\n"})
    with hub:
        env = {**hub_env(tmp_path / "hf", offline=False), "HF_ENDPOINT": hub.url}
        first = doit(root, env, "prepare:web")
        assert first.returncode == 0, first.stdout + first.stderr
        assert ran(first) == {"corpus", "tokenizer", "prepare"}
        # what it downloads, said before it does
        plan = [ln for ln in first.stderr.splitlines() if "[web:corpus]" in ln]
        assert len(plan) == 1 and "2 files" in plan[0] and "to download" in plan[0], first.stderr
        assert plan[0].index("[web:corpus]") < first.stderr.index("downloading")
        lock = json.loads((root / "runs/web/corpus.lock.json").read_text())
        assert lock["inputs"][f"hf://datasets/{DATASET}/data/*.parquet"]["sha"] == SHA1
        train = root / "runs/web/train.bin"
        from smedjan.formats.tokens import TokenFile

        assert TokenFile.open(train).meta["hub"][0]["sha"] == SHA1
        # the same revision: up to date, and the hub is not asked anything
        hub.requests.clear()
        again = doit(root, env, "prepare:web")
        assert again.returncode == 0 and ran(again) == {"corpus"}, again.stdout + again.stderr
        assert hub.requests == []
        assert "all in the hub cache" in again.stderr
        # the branch moves upstream: the lock keeps the pipeline on what it was built from ...
        hub.add(DATASET, SHA2, {"data/part-0.parquet": shard(texts[:150]), "data/part-1.parquet": shard(texts[150:])})
        assert ran(doit(root, env, "prepare:web")) == {"corpus"} and hub.requests == []
        # ... until asked: then the new commit re-runs tokenizer and prepare, once
        moved = doit(root, {**env, "SMEDJAN_HUB_UPDATE": "1"}, "prepare:web")
        assert moved.returncode == 0 and ran(moved) == {"corpus", "tokenizer", "prepare"}, moved.stderr
        assert TokenFile.open(train).meta["hub"][0]["sha"] == SHA2
        assert ran(doit(root, env, "prepare:web")) == {"corpus"}
        # another glob (one file fewer) re-runs them too
        toml.write_text(toml.read_text().replace("data/*.parquet", "data/part-0.parquet"))
        changed = doit(root, env, "prepare:web")
        assert changed.returncode == 0 and ran(changed) == {"corpus", "tokenizer", "prepare"}, changed.stderr
        assert TokenFile.open(train).meta["n_sources"] == 1
    # the hub gone and HF_HUB_OFFLINE set: what is locked and cached is still up to date
    offline = {**hub_env(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    proc = doit(root, offline, "prepare:web")
    assert proc.returncode == 0 and ran(proc) == {"corpus"}, proc.stdout + proc.stderr
    # a file the stage needs is gone from the cache: one line says why before the tool starts
    for p in (tmp_path / "hf/hub").glob("datasets--*/snapshots/*/data/part-0.parquet"):
        p.unlink()
    (root / "runs/web/train.bin").unlink()
    proc = doit(root, offline, "prepare:web")
    assert proc.returncode != 0
    lines = [ln for ln in proc.stdout.splitlines() if "pipeline 'web'" in ln]
    assert len(lines) == 1 and "HF_HUB_OFFLINE is set" in lines[0] and "part-0.parquet" in lines[0], proc.stdout


def test_no_network_no_cache_stops_with_one_line(tmp_path):
    root = tmp_path / "proj"
    (root / "pipelines").mkdir(parents=True)
    (root / "pipelines" / "web.toml").write_text(TOML.format(dataset=DATASET))
    for env, why in (({**hub_env(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9"}, "offline"),
                     ({**hub_env(tmp_path / "hf", offline=False), "HF_ENDPOINT": "http://127.0.0.1:9"},
                      "cannot reach the hub")):
        listed = doit(root, env, "list", "--all")
        assert listed.returncode == 0 and "corpus:web" in listed.stdout and "tokenizer:web" in listed.stdout
        proc = doit(root, env, "pipeline:web")
        assert proc.returncode != 0
        lines = [ln for ln in proc.stdout.splitlines() if "pipeline 'web'" in ln]
        assert len(lines) == 1 and why in lines[0] and DATASET in lines[0], proc.stdout + proc.stderr
        assert "Traceback" not in proc.stdout + proc.stderr
        assert not (root / "runs/web/tokenizer.bin").exists()
