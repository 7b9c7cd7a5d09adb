"""doit pipelines: run everything, then re-run only what is stale (tests/pipelines/micro.toml)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import zstandard

from helpers import DATA, REPO

pytestmark = pytest.mark.slow


def doit(root, *args, check=True):
    env = {**os.environ, "SMEDJAN_PIPELINES": str(root / "pipelines"), "SMEDJAN_RUNS": str(root / "runs"),
           "SMEDJAN_PLAIN_PROGRESS": "1"}
    proc = subprocess.run([sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"), "--dir", str(root), *args],
                          capture_output=True, text=True, env=env, timeout=900)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def ran(proc) -> set[str]:
    """Stages doit executed (".  stage:micro"), as opposed to up to date ("-- stage:micro")."""
    return {m.group(1) for m in re.finditer(r"^\.  (\w+):micro$", proc.stdout, re.M)} - {"pipeline"}


ALL = {"tokenizer", "prepare", "train", "sft", "dpo", "export", "eval", "report"}


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    corpus = root / "corpus"
    corpus.mkdir()
    raw = zstandard.ZstdDecompressor().stream_reader(open(DATA / "pretrain/tinyshakespeare.txt.zst", "rb")).read()
    (corpus / "a.txt").write_bytes(raw[:600_000])
    (corpus / "b.txt").write_bytes(raw[600_000:])
    (root / "pipelines").mkdir()
    toml = (REPO / "tests/pipelines/micro.toml").read_text().replace("CORPUS", str(corpus)).replace("DATA", str(DATA))
    (root / "pipelines/micro.toml").write_text(toml)
    first = doit(root, "pipeline:micro")
    return root, first


def set_flag(root, section, key, value):
    path = root / "pipelines/micro.toml"
    text = path.read_text()
    new, n = re.subn(rf"(\[{section}\][^\[]*?\n){key} = [^\n]*\n", rf"\g<1>{key} = {value}\n", text, flags=re.S)
    assert n == 1, (section, key)
    path.write_text(new)


def test_first_run_builds_every_artifact(pipe):
    root, first = pipe
    assert ran(first) == ALL
    run = root / "runs/micro"
    for name in ("tokenizer.bin", "train.bin", "val.bin", "checkpoints/final.bin", "sft.bin", "dpo.bin", "model-q8_0.gguf",
                 "model-f32.gguf", "eval.json", "report.md"):
        assert (run / name).exists(), name
    report = (run / "report.md").read_text()
    for stage in ("tokenizer", "prepare", "train", "sft", "dpo", "export", "eval"):
        assert f"## {stage}" in report
    assert "smedjan chat --checkpoint" in report and "llama-cli -m" in report
    assert "Chat with the result" in first.stdout
    # headline figures come from the stages' own outputs
    bpb = json.loads((run / "eval.json").read_text())["lm"]["bits_per_byte"]
    eval_row = next(ln for ln in report.splitlines() if ln.startswith("| eval |"))
    assert f"bits_per_byte {bpb:.4g}" in eval_row, eval_row
    assert "val_bpb" in report and "rewards/accuracies" in report and "bytes/token" in report


def test_second_run_does_nothing(pipe):
    root, _ = pipe
    again = doit(root, "pipeline:micro")
    assert ran(again) == set()
    assert "all stages up to date, nothing ran" in again.stdout


def test_changed_flag_reruns_that_stage_and_downstream_only(pipe):
    root, _ = pipe
    set_flag(root, "train", "steps", 12)
    proc = doit(root, "pipeline:micro")
    assert ran(proc) == {"train", "sft", "dpo", "export", "eval", "report"}
    log = json.loads((root / "runs/micro/logs/train.json").read_text())
    assert "--steps" in log["runs"][0]["command"] and log["runs"][0]["summary"]


def test_interrupted_training_resumes_from_its_last_state(pipe):
    root, _ = pipe
    ck = root / "runs/micro/checkpoints"
    before = [json.loads(x) for x in (ck / "metrics.jsonl").read_text().splitlines()]
    # a crash after state_5: final.bin and later states never got written
    for p in ck.glob("state_*.bin"):
        if p.name != "state_5.bin":
            p.unlink()
    (ck / "final.bin").unlink()
    proc = doit(root, "train:micro")
    assert "resuming the interrupted run from" in proc.stderr and "state_5.bin" in proc.stderr
    after = [json.loads(x) for x in (ck / "metrics.jsonl").read_text().splitlines()]
    losses = lambda rows: [(r["step"], r["loss"]) for r in rows if "loss" in r]  # noqa: E731
    assert losses(after) == losses(before)  # bit for bit on CPU


def test_deleted_artifact_rebuilds_only_what_is_needed(pipe):
    root, _ = pipe
    doit(root, "pipeline:micro")  # catch up after the previous test's lone train:micro
    (root / "runs/micro/model-q8_0.gguf").unlink()
    assert ran(doit(root, "pipeline:micro")) == {"export", "report"}
    # prepare is deterministic: rebuilding train.bin gives the same bytes, so nothing
    # after it has to run again (doit compares content, not times).
    (root / "runs/micro/train.bin").unlink()
    assert ran(doit(root, "pipeline:micro")) == {"prepare", "report"}


def test_changed_corpus_reruns_everything(pipe):
    root, _ = pipe
    with open(root / "corpus/b.txt", "a") as f:
        f.write("\n\nA new paragraph that changes the corpus.\n")
    assert ran(doit(root, "pipeline:micro")) == ALL


def test_failing_stage_is_named_and_earlier_artifacts_stay_valid(pipe):
    root, _ = pipe
    text = (root / "pipelines/micro.toml").read_text()
    try:
        (root / "pipelines/micro.toml").write_text(text.replace("[eval]\n", "[eval]\ntasks = \"no_such_task\"\n"))
        proc = doit(root, "pipeline:micro", check=False)
        assert proc.returncode != 0
        out = proc.stdout + proc.stderr
        assert "stage 'eval' of pipeline 'micro' failed" in out
        from smedjan.model import load_model

        load_model(root / "runs/micro/checkpoints/final.bin")  # still a valid checkpoint
    finally:
        (root / "pipelines/micro.toml").write_text(text)


def test_clean_removes_the_pipeline_artifacts(pipe):
    root, _ = pipe
    doit(root, "clean", "pipeline:micro")
    assert not (root / "runs/micro").exists()
    assert (root / "pipelines/micro.toml").exists() and (root / "corpus/a.txt").exists()
    listed = doit(root, "list", "--all").stdout
    assert "train:micro" in listed  # the pipeline itself is still there, ready to run again


def test_broken_pipeline_file_is_reported_not_fatal(tmp_path):
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines/bad.toml").write_text("[corpus\ninput = 3")
    proc = doit(tmp_path, "list", check=False)
    assert proc.returncode == 0
    assert "skipping pipeline 'bad'" in proc.stderr and "malformed TOML" in proc.stderr
