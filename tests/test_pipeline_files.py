"""The pipelines that ship in pipelines/: on a fresh clone (no ../shared beside it) each loads,
`doit list` shows all of them, every flag each sets is one its tool accepts, and a hub corpus
says what it will download, or why it cannot, before anything runs."""

from __future__ import annotations

import importlib
import io
import os
import shutil
import subprocess
import sys

import pytest
import typer

from helpers import REPO, hub_env
from hub_mock import MockHub
from smedjan.pipeline import load_pipeline
from smedjan_tools.cli import COMMANDS

SHIPPED = sorted((REPO / "pipelines").glob("*.toml"))


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """What a user's clone has: pipelines/ and data/, and nothing beside it."""
    root = tmp_path_factory.mktemp("fresh") / "smedjan"
    root.mkdir()
    shutil.copytree(REPO / "pipelines", root / "pipelines")
    (root / "data").symlink_to(REPO / "data")
    assert not (root.parent / "shared").exists()
    return root


def run_doit(clone, runs, extra_env, *args):
    env = {k: v for k, v in os.environ.items() if k != "SMEDJAN_SHARED_DATA"}
    env.update({"SMEDJAN_PIPELINES": str(clone / "pipelines"), "SMEDJAN_RUNS": str(runs),
                "SMEDJAN_PLAIN_PROGRESS": "1", **extra_env})
    return subprocess.run([sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"), "--dir", str(clone), *args],
                          capture_output=True, text=True, env=env, timeout=300)


def test_the_four_pipelines_of_the_design_ship():
    assert {p.stem for p in SHIPPED} >= {"tiny", "small", "medium", "large"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_stage_command_parses(path, clone, tmp_path):
    assert "../shared" not in path.read_text()  # a user's clone has no ../shared
    pipe = load_pipeline(clone / "pipelines" / path.name, runs=tmp_path, base=clone)
    assert [s.name for s in pipe.stages][:3] == ["tokenizer", "prepare", "train"]
    for stage in pipe.stages:
        for args in stage.command:
            tool, *rest = args
            cmd = typer.main.get_command(importlib.import_module(COMMANDS[tool][0]).app)
            try:
                cmd.make_context(tool, list(rest))  # parses and type-checks, runs nothing
            except Exception as e:  # typer vendors click: its UsageError is not click's
                msg = e.format_message() if hasattr(e, "format_message") else repr(e)
                pytest.fail(f"{path.name} [{stage.name}]: {msg}")


def test_doit_lists_every_pipeline_on_a_fresh_clone(clone, tmp_path):
    proc = run_doit(clone, tmp_path / "runs", hub_env(tmp_path / "hf"), "list", "--all")
    assert proc.returncode == 0, proc.stderr
    assert "skipping" not in proc.stderr, proc.stderr
    for path in SHIPPED:
        for stage in ("tokenizer", "prepare", "train", "export", "pipeline"):
            assert f"{stage}:{path.stem}" in proc.stdout, (stage, path.stem)
    for name in ("small", "medium", "large"):  # the corpora are on the hub
        assert f"corpus:{name}" in proc.stdout


def test_medium_says_what_it_downloads_or_why_it_cannot(clone, tmp_path):
    runs = tmp_path / "runs"
    # offline with an empty hub cache: one line, nothing made
    proc = run_doit(clone, runs, hub_env(tmp_path / "hf"), "pipeline:medium")
    assert proc.returncode != 0
    lines = [ln for ln in proc.stdout.splitlines() if "pipeline 'medium'" in ln]
    assert len(lines) == 1 and "offline" in lines[0] and "fineweb-edu-100b-shuffle" in lines[0], proc.stdout
    assert not (runs / "medium" / "tokenizer.bin").exists()
    # a stand-in for the hub with the two shards: the plan comes first, with files and size
    import pyarrow as pa
    import pyarrow.parquet as pq

    shards = {}
    for i in range(3):
        buf = io.BytesIO()
        pq.write_table(pa.table({"text": [f"shard {i} document {j}" for j in range(50)]}), buf)
        shards[f"shard_{i:05d}.parquet"] = buf.getvalue()
    hub = MockHub()
    hub.add("karpathy/fineweb-edu-100b-shuffle", "c" * 40, shards)
    with hub:
        env = {**hub_env(tmp_path / "hf", offline=False), "HF_ENDPOINT": hub.url}
        proc = run_doit(clone, runs, env, "corpus:medium")
    assert proc.returncode == 0, proc.stderr
    size = sum(len(shards[f"shard_0000{i}.parquet"]) for i in range(2))
    from smedjan.data.hub import human_bytes

    plan = [ln for ln in proc.stderr.splitlines() if "[medium:corpus]" in ln]
    assert len(plan) == 1 and "2 files" in plan[0] and f"up to {human_bytes(size)}" in plan[0], proc.stderr
    assert (runs / "medium" / "corpus.lock.json").exists() and not any(r.endswith(".parquet") and "resolve" in r
                                                                       for r in hub.requests)


def test_core_eval_runs_where_its_data_is_and_is_skipped_with_a_note_elsewhere(clone, tmp_path):
    pipe = load_pipeline(clone / "pipelines" / "small.toml", runs=tmp_path, base=clone)
    ev = pipe.stage("eval")
    assert "--tasks" not in ev.command[0] and "--data-dir" not in ev.command[0] and "--dataset" in ev.command[0]
    assert len(ev.notes) == 1 and "core" in ev.notes[0] and "data/eval" in ev.notes[0]
    base = tmp_path / "with-eval"
    (base / "data" / "eval").mkdir(parents=True)
    for sub in ("sft", "dpo"):
        (base / "data" / sub).symlink_to(REPO / "data" / sub)
    pipe = load_pipeline(clone / "pipelines" / "small.toml", runs=tmp_path, base=base)
    cmd = pipe.stage("eval").command[0]
    assert cmd[cmd.index("--tasks") + 1] == "core" and cmd[cmd.index("--data-dir") + 1] == str(base / "data/eval")
    assert pipe.stage("eval").notes == []
