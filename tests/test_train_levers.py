"""The levers through the tools: `smedjan train` with all four memory levers trains the
micro model like none and resumes bit for bit; sft, dpo and distill run with them; the
flags are in --help; FP8 on this CPU is refused with one line and nothing written."""

from __future__ import annotations

import json
import shutil

import pytest

from helpers import DATA, assert_user_error, smedjan
from train_helpers import ENV1, MICRO, losses, token_files, train

LEVERS = ["--gradient-checkpointing", "--fused-ce", "--fp16-activations"]


@pytest.mark.slow
def test_all_four_levers_train_like_none_and_resume_bit_for_bit(tmp_path_factory, tokenizer_path, tmp_path):
    train_bin, _ = token_files(tmp_path_factory, tokenizer_path)
    flags = [a for a in MICRO if a not in ("--batch-size", "4")] + [
        "--dataset", train_bin, "--tokenizer", tokenizer_path, "--steps", "12", "--checkpoint-every", "6"]
    plain, accum, lev, again = (tmp_path / n for n in ("plain", "accum", "lev", "again"))
    for folder, extra in ((plain, ["--batch-size", "4"]), (accum, ["--batch-size", "2", "--grad-accum", "2"]),
                          (lev, ["--batch-size", "2", "--grad-accum", "2", *LEVERS])):
        res = train(*flags, *extra, "--checkpoint-dir", folder)
        assert res.code == 0, res
    assert "levers: checkpointing every block, fused CE, fp16 activations" in res.err
    a, b, c = losses(plain), losses(accum), losses(lev)
    assert sorted(a) == sorted(b) == sorted(c) == list(range(1, 13))
    # accumulation draws other windows than one batch of 4: the same loss within its noise
    assert c[12] == pytest.approx(a[12], rel=2e-2) and c[12] < c[1] - 0.1  # and it learns
    # against the same data, the other three levers change only roundings (fp16 storage)
    assert [c[s] for s in range(1, 13)] == pytest.approx([b[s] for s in range(1, 13)], rel=2e-3)
    again.mkdir()
    shutil.copy(lev / "state_6.bin", again / "state_6.bin")
    res = train(*flags, "--batch-size", "2", "--grad-accum", "2", *LEVERS, "--checkpoint-dir", again,
                "--resume", again / "state_6.bin")
    assert res.code == 0, res
    d = losses(again)
    assert [d[s] for s in range(7, 13)] == [c[s] for s in range(7, 13)]


@pytest.mark.slow
def test_post_training_tools_take_the_levers(tmp_path_factory, tokenizer_path, trained_checkpoint, tmp_path):
    train_bin, _ = token_files(tmp_path_factory, tokenizer_path)
    pairs = DATA / "dpo" / "instruction-data-with-preference.json.zst"
    chats = DATA / "sft" / "instruction-data.json.zst"
    quick = ["--steps", "2", "--batch-size", "2", "--warmup", "0", *LEVERS, "--json"]
    runs = {
        "sft": ["-c", trained_checkpoint, "--data", chats, "--max-len", "64", "--val-fraction", "0"],
        "dpo": ["-c", trained_checkpoint, "--data", pairs, "--max-len", "64", "--val-fraction", "0"],
        "distill": ["--teacher", trained_checkpoint, "--dataset", train_bin, "--size", "custom", "--dim", "32",
                    "--layers", "1", "--heads", "2", "--seq-len", "32"],
    }
    for tool, args in runs.items():
        res = smedjan(tool, *args, *quick, "--output", tmp_path / f"{tool}.bin", env=ENV1)
        assert res.code == 0, (tool, res)
        assert "levers: checkpointing every block, fused CE, fp16 activations" in res.err, tool
        assert json.loads(res.out)["steps"] == 2


def test_every_lever_is_in_train_help():
    res = smedjan("train", "--help", env={"COLUMNS": "200"})
    assert res.code == 0
    text = " ".join(w for w in res.out.split() if w != "│")  # the help's lines, unwrapped
    for flag in ("--gradient-checkpointing", "--checkpoint-layers", "--fused-ce", "--fp16-activations",
                 "--bf16-matmul", "--kernels", "--fp8", "--fp8-recipe", "--grad-accum"):
        assert flag in text, flag
    assert "can destabilize an otherwise-healthy run: reach for it last" in text


def test_fp8_without_a_capable_gpu_is_one_line_and_writes_nothing(tmp_path_factory, tokenizer_path, tmp_path):
    train_bin, _ = token_files(tmp_path_factory, tokenizer_path)
    out = tmp_path / "ck"
    res = train(*MICRO, "--dataset", train_bin, "--tokenizer", tokenizer_path, "--steps", "2", "--fp8",
                "--device", "cpu", "--checkpoint-dir", out)
    assert_user_error(res, "--fp8", "compute capability 8.9")
    assert not out.exists()


@pytest.mark.slow
def test_levers_under_ddp_equal_one_process(tmp_path_factory, tokenizer_path, tmp_path):
    from test_train_ddp import FLAGS, torchrun

    train_bin, _ = token_files(tmp_path_factory, tokenizer_path)
    io = ["--dataset", train_bin, "--tokenizer", tokenizer_path, "--gradient-checkpointing", "--fused-ce"]
    flags = [a for a in FLAGS if a not in ("--val-tokens", "512")]
    one, two = tmp_path / "one", tmp_path / "two"
    res = train(*io, *flags, "--batch-size", "4", "--checkpoint-dir", one)
    assert res.code == 0, res
    proc = torchrun(*io, *flags, "--batch-size", "2", "--checkpoint-dir", two)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert [b[s] for s in sorted(b)] == pytest.approx([a[s] for s in sorted(a)], rel=1e-5)
