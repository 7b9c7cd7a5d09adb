"""`smedjan eval` end to end on the micro checkpoint, and its one-line errors for bad task files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import DATA, assert_user_error, smedjan
from smedjan.errors import UserError
from smedjan.eval.tasks import CORE_BY_LABEL, load_task


def test_core_tasks_end_to_end(trained_checkpoint, shared_data, tmp_path):
    out = tmp_path / "eval.json"
    res = smedjan("eval", "-c", trained_checkpoint, "--tasks", "arc_easy,copa", "--tasks", "winograd,lambada_openai",
                  "--max-per-task", 5, "--batch-size", 8, "--data-dir", shared_data / "eval",
                  "--output-json", out, "--json")
    assert res.code == 0, res
    summary = json.loads(res.out)  # stdout is the JSON summary alone; the table went to stderr
    assert summary["tasks"] == 4 and summary["examples"] == 20 and summary["examples_per_s"] > 0
    assert set(summary["accuracy"]) == {"arc_easy", "copa", "winograd", "lambada_openai"}
    assert "CORE" in res.err and "centered" in res.err
    report = json.loads(out.read_text())
    rows = {t["label"]: t for t in report["tasks"]}
    assert all(t["n"] == 5 and 0 <= t["accuracy"] <= 1 for t in rows.values())
    assert rows["copa"]["baseline"] == 0.5 and rows["arc_easy"]["num_fewshot"] == 10
    assert rows["arc_easy"]["truncated"] == 5  # 10 shots do not fit a 256-token context
    centered = [t["centered"] for t in rows.values()]
    assert report["core"]["score"] == pytest.approx(sum(centered) / 4)
    assert summary["core"] == pytest.approx(report["core"]["score"])

    chat = smedjan("eval", "-c", trained_checkpoint, "--tasks", "copa", "--max-per-task", 3, "--chat",
                   "--data-dir", shared_data / "eval")
    assert chat.code == 0, chat
    assert "copa" in chat.out and "examples_per_s" in chat.out


def test_bpb_and_longctx_end_to_end(trained_checkpoint, tokenizer, tmp_path):
    from smedjan.formats.tokens import TokenWriter

    val = tmp_path / "val.bin"
    with TokenWriter(val, vocab_size=tokenizer.vocab_size, tokenizer_fingerprint=tokenizer.fingerprint,
                     bos_id=tokenizer.bos_id) as w:
        for line in ["To be, or not to be, that is the question.", "All the world's a stage."] * 40:
            w.write(np.array([tokenizer.bos_id] + tokenizer.encode(line)))
    png, out = tmp_path / "niah.png", tmp_path / "r.json"
    res = smedjan("eval", "-c", trained_checkpoint, "--dataset", val, "--longctx",
                  "--haystack", DATA / "pretrain" / "tinyshakespeare.txt.zst", "--lengths", "64,128,512",
                  "--depths", "0,1", "--needles-per-cell", 1, "--heatmap", png, "--output-json", out)
    assert res.code == 0, res
    assert "passkey retrieval accuracy" in res.out and "skipped (longer than the model's context): 512" in res.out
    assert "bits_per_byte" in res.out and "length 512 is longer" in res.err
    report = json.loads(out.read_text())
    assert 0 < report["lm"]["bits_per_byte"] < 20 and report["lm"]["tokens"] > 0
    assert [c["length"] for c in report["longctx"]["cells"]] == [64, 64, 128, 128]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- bad task files
def _copa(tmp_path, body: bytes, name: str = "copa.jsonl"):
    folder = tmp_path / "core" / "commonsense_reasoning"
    folder.mkdir(parents=True)
    (folder / name).write_bytes(body)
    return tmp_path


GOOD = b'{"query": "It rained, therefore", "choices": ["the grass was wet.", "the sun set."], "gold": 0}\n'


@pytest.mark.parametrize("body,name,needles", [
    (GOOD + b'{"query": "x", "choices": ["a", "b"], "gold": 0\n', "copa.jsonl", ["copa.jsonl:2", "malformed JSON"]),
    (b'{"query": "x", "choices": ["a", "b"]}\n', "copa.jsonl", ["copa.jsonl:1", "missing key 'gold'"]),
    (b'{"query": "x", "choices": ["a", "b"], "gold": 2}\n', "copa.jsonl", ["copa.jsonl:1", "out of range"]),
    (b'{"query": "x", "choices": "ab", "gold": 0}\n', "copa.jsonl", ["copa.jsonl:1", "'choices'"]),
    (b'[1, 2]\n', "copa.jsonl", ["copa.jsonl:1", "JSON object"]),
    (b"\n\n", "copa.jsonl", ["copa.jsonl", "no examples"]),
    (b"\x28\xb5\x2f\xfd garbage", "copa.jsonl.zst", ["copa.jsonl.zst", "zstd"]),
])
def test_bad_task_file_is_one_line_naming_the_file(tmp_path, body, name, needles):
    ddir = _copa(tmp_path, body, name)
    with pytest.raises(UserError) as e:
        load_task(CORE_BY_LABEL["copa"], ddir)
    assert "\n" not in str(e.value)
    for n in needles:
        assert n in str(e.value)


def test_missing_task_file_or_folder(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_task(CORE_BY_LABEL["copa"], tmp_path / "nope")
    with pytest.raises(UserError, match=r"core/commonsense_reasoning/copa\.jsonl: task file"):
        load_task(CORE_BY_LABEL["copa"], tmp_path)
    assert load_task(CORE_BY_LABEL["squad"], tmp_path) is None  # optional in the core suite


def test_cli_bad_input_exits_2_with_one_line(tmp_path):
    ddir = _copa(tmp_path, GOOD + b"{oops\n")
    # The task files are checked before the checkpoint is even opened.
    assert_user_error(smedjan("eval", "-c", tmp_path / "none.bin", "--tasks", "copa", "--data-dir", ddir),
                      "copa.jsonl:2", "malformed JSON")
    assert_user_error(smedjan("eval", "-c", tmp_path / "none.bin", "--tasks", "copa", "--data-dir", tmp_path / "x"),
                      "does not exist")
    assert_user_error(smedjan("eval", "-c", tmp_path / "none.bin"), "nothing to do")
    assert_user_error(smedjan("eval", "-c", tmp_path / "none.bin", "--tasks", "nosuchtask"), "nosuchtask")
