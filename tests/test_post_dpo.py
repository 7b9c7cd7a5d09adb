"""DPO: each loss equals a float64 reference of its formula on random log-probs; sequence
log-probs score the reply only; a tiny model trained on a handful of pairs raises its
reward accuracy and margins on them; reference log-probs are checked on --resume; bad
input gets one line, exit 2 and no file."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from helpers import DATA, assert_user_error, smedjan
from test_post_sft import ENV1, no_chat_checkpoint, other_tokenizer_checkpoint

from smedjan.errors import UserError
from smedjan.formats import constants as C
from smedjan.post.dpo import dpo_loss, make_dpo_loss, sequence_logps

PREF = DATA / "dpo" / "instruction-data-with-preference.json.zst"


def logsig(z: float) -> float:
    return -math.log1p(math.exp(-z)) if z > 0 else z - math.log1p(math.exp(z))


def reference(loss: str, h: float, beta: float, eps: float) -> float:
    if loss == "sigmoid":
        return -(1 - eps) * logsig(beta * h) - eps * logsig(-beta * h)
    if loss == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    if loss == "hinge":
        return max(0.0, 1 - beta * h)
    assert loss == "robust"
    return (-(1 - eps) * logsig(beta * h) + eps * logsig(-beta * h)) / (1 - 2 * eps)


@pytest.mark.parametrize("loss,eps", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0), ("hinge", 0.0),
                                      ("robust", 0.1)])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_losses_equal_their_float64_formulas(loss, eps, beta):
    rng = np.random.default_rng(hash((loss, eps, beta)) % 2**32)
    pc, pr, rc, rr = (rng.uniform(-120, -1, 256) for _ in range(4))
    got, chosen, rejected = dpo_loss(*(torch.tensor(a, dtype=torch.float64) for a in (pc, pr, rc, rr)), beta, loss, eps)
    h = (pc - pr) - (rc - rr)
    want = np.array([reference(loss, float(x), beta, eps) for x in h])
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(chosen.numpy(), beta * (pc - rc), rtol=1e-12)
    np.testing.assert_allclose(rejected.numpy(), beta * (pr - rr), rtol=1e-12)
    # float32 inputs (what training uses) stay within float32 rounding of the same values
    got32, _, _ = dpo_loss(*(torch.tensor(a, dtype=torch.float32) for a in (pc, pr, rc, rr)), beta, loss, eps)
    np.testing.assert_allclose(got32.double().numpy(), want, rtol=1e-3, atol=2e-3)


def test_sigmoid_loss_is_ln2_at_the_reference_and_hinge_is_1():
    z = torch.full((3,), -5.0, dtype=torch.float64)
    assert torch.allclose(dpo_loss(z, z, z, z, 0.1, "sigmoid")[0], torch.full((3,), math.log(2), dtype=torch.float64))
    assert torch.equal(dpo_loss(z, z, z, z, 0.1, "hinge")[0], torch.ones(3, dtype=torch.float64))


def test_sequence_logps_score_the_reply_tokens_only():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    y = torch.tensor([[-1, -1, 3, 4, -1], [-1, 7, 1, 2, 0]])
    lp = torch.log_softmax(logits.double(), -1)
    want = [lp[0, 2, 3] + lp[0, 3, 4], lp[1, 1, 7] + lp[1, 2, 1] + lp[1, 3, 2] + lp[1, 4, 0]]
    torch.testing.assert_close(sequence_logps(logits, y).double(), torch.stack(want), rtol=1e-6, atol=1e-5)


def test_ipo_uses_per_token_averages():
    torch.manual_seed(1)
    logits = torch.randn(4, 6, 9)  # rows: chosen 0, chosen 1, rejected 0, rejected 1
    y = torch.tensor([[-1, 1, 2, -1, -1, -1], [-1, -1, 3, 3, 3, -1], [-1, 4, -1, -1, -1, -1], [-1, 5, 6, 7, 8, 0]])
    counts = (y >= 0).sum(1).double()
    ref = torch.tensor([-3.0, -9.0, -2.0, -12.0], dtype=torch.float64)
    loss, metrics = make_dpo_loss(0.5, "ipo", 0.0)(lambda x: logits, (None, y, counts, ref, 24))
    avg = sequence_logps(logits, y).double() / counts
    r = ref / counts
    h = (avg[:2] - avg[2:]) - (r[:2] - r[2:])
    assert float(loss) == pytest.approx(float(((h - 1.0) ** 2).mean()), rel=1e-5)
    assert float(metrics["rewards/margins"]) == pytest.approx(float(0.5 * h.mean()), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("beta,loss,eps,needle", [(0.0, "sigmoid", 0, "--beta"), (0.1, "kto", 0, "--loss 'kto'"),
                                                  (0.1, "sigmoid", 0.5, "[0, 0.5)"), (0.1, "hinge", 0.1, "not hinge")])
def test_bad_loss_flags(beta, loss, eps, needle):
    with pytest.raises(UserError, match=needle.replace("[", r"\[").replace(")", r"\)")):
        make_dpo_loss(beta, loss, eps)


def test_pair_tokens_and_truncation(tokenizer):
    from smedjan.chat import render
    from smedjan.post.dpo import tokenize_pairs
    from smedjan.post.formats import LoadReport, Pair

    sp = tokenizer.specials
    long_prompt = " ".join(f"word{i}" for i in range(200))
    pairs = [Pair([{"role": "user", "content": "Q"}], "good", "bad", "a"),
             Pair([{"role": "user", "content": long_prompt}], "good answer", "bad", "b")]
    report = LoadReport()
    out = tokenize_pairs(tokenizer, pairs, max_len=64, max_prompt_len=32, too_long="truncate", report=report)
    assert report.truncated == 1 and len(out) == 2
    full = render(tokenizer, pairs[0].prompt + [{"role": "assistant", "content": "good"}]).ids
    assert out[0].prompt.tolist() + out[0].chosen.tolist() == full
    assert out[0].chosen.tolist() == tokenizer.encode("good") + [sp[C.ASSISTANT_END]]
    t = out[1]
    assert t.prompt[0] == sp[C.BOS] and t.prompt[-1] == sp[C.ASSISTANT_START]
    assert len(t.prompt) + max(len(t.chosen), len(t.rejected)) - 1 <= 64
    assert t.chosen.tolist() == tokenizer.encode("good answer") + [sp[C.ASSISTANT_END]]  # replies fit whole
    report = LoadReport()
    out = tokenize_pairs(tokenizer, pairs, max_len=64, max_prompt_len=32, too_long="skip", report=report)
    assert len(out) == 1 and sum(report.skipped.values()) == 1


# ------------------------------------------------------------------------ end to end
N_PAIRS = 8


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    recs = json.loads(__import__("zstandard").ZstdDecompressor().stream_reader(open(PREF, "rb")).read())
    recs = [r for r in recs if r["chosen"] != r["rejected"] and len(r["chosen"]) + len(r["rejected"]) < 300]
    path = tmp_path_factory.mktemp("pairs") / "pairs.json"
    path.write_text(json.dumps(recs[:N_PAIRS]))
    return path


def scores(ckpt, pairs_path):
    """float64 [N, 2] summed log-probs of chosen/rejected under `ckpt`, and the tokenized pairs."""
    from smedjan.model import load_model
    from smedjan.post.dpo import pair_logps, tokenize_pairs
    from smedjan.post.formats import load_pairs

    model, tok, _ = load_model(ckpt)
    pairs, report = load_pairs([pairs_path])
    tp = tokenize_pairs(tok, pairs, 256, 128, "truncate", report)
    return pair_logps(model, tp, 8, torch.device("cpu")), tp


@pytest.fixture(scope="module")
def trained(tmp_path_factory, trained_checkpoint, pairs_file):
    folder = tmp_path_factory.mktemp("dpo")
    res = smedjan("dpo", "-c", trained_checkpoint, "--data", pairs_file, "--output", folder / "dpo.bin", "--steps",
                  "16", "--batch-size", "4", "--lr", "2e-3", "--warmup", "2", "--val-fraction", "0",
                  "--checkpoint-every", "8", "--json", env=ENV1)
    assert res.code == 0, res
    return folder, json.loads(res.out)


def test_dpo_raises_reward_accuracy_on_its_pairs(trained, trained_checkpoint, pairs_file):
    from smedjan.post.dpo import pair_metrics, reply_counts

    folder, summary = trained
    assert summary["reason"] == "done" and summary["pairs"] == N_PAIRS and summary["loss_type"] == "sigmoid"
    # the summary's rewards: means over the last 10 steps' batches, from metrics.jsonl
    assert summary["rewards/accuracies"] > 0.8 and summary["rewards/margins"] > 0.5
    ref, tp = scores(trained_checkpoint, pairs_file)
    after, _ = scores(folder / "dpo.bin", pairs_file)
    counts = reply_counts(tp)
    before_m = pair_metrics(ref, ref, counts, 0.1, "sigmoid", 0.0)
    after_m = pair_metrics(after, ref, counts, 0.1, "sigmoid", 0.0)
    # before training the policy is the reference: every reward is 0, no pair is won
    assert before_m["rewards/accuracies"] == 0 and before_m["rewards/margins"] == 0
    assert after_m["rewards/accuracies"] >= 7 / 8 and after_m["rewards/margins"] > 0.5, after_m
    assert after_m["loss"] < math.log(2) - 0.1
    # the policy's own preference (not relative to the reference) moves towards the chosen replies
    raw_before = float((ref[:, 0] - ref[:, 1] > 0).double().mean())
    raw_after = float((after[:, 0] - after[:, 1] > 0).double().mean())
    assert raw_after > raw_before
    rec = [json.loads(x) for x in (folder / "dpo-checkpoints" / "metrics.jsonl").read_text().splitlines()]
    keys = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
    assert all(k in r for r in rec for k in keys)
    assert rec[0]["rewards/accuracies"] == 0 and np.mean([r["rewards/margins"] for r in rec[-4:]]) > 0.3


def test_dpo_resume_checks_the_reference(trained, pairs_file, tmp_path, tokenizer):
    """Resuming with another --checkpoint (so other reference log-probs) is refused."""
    folder, _ = trained
    res = smedjan("dpo", "-c", folder / "dpo.bin", "--data", pairs_file, "--output", tmp_path / "x.bin",
                  "--steps", "16", "--batch-size", "4", "--lr", "2e-3", "--warmup", "2", "--val-fraction", "0",
                  "--resume", folder / "dpo-checkpoints" / "state_8.bin", env=ENV1)
    assert_user_error(res, "reference log-probs", "differ")
    assert not (tmp_path / "x.bin").exists()


def test_a_state_is_resumed_only_by_its_tool(trained, trained_checkpoint, tmp_path):
    folder, _ = trained
    res = smedjan("sft", "-c", trained_checkpoint, "--data", DATA / "sft" / "instruction-data.json.zst",
                  "--output", tmp_path / "sft.bin", "--resume", folder / "dpo-checkpoints" / "state_8.bin")
    assert_user_error(res, "state of `smedjan dpo`", "not of `smedjan sft`")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case", ["no_chat_tokens", "empty_replies", "ref_tokenizer", "smoothing_hinge", "max_len"])
def test_dpo_bad_input(case, trained_checkpoint, tokenizer, tmp_path, pairs_file):
    out = tmp_path / "out" / "dpo.bin"
    out.parent.mkdir()
    ckpt, data, extra = trained_checkpoint, pairs_file, []
    if case == "no_chat_tokens":
        ckpt, needles = no_chat_checkpoint(tokenizer, tmp_path / "plain.bin"), ["plain.bin", "no chat tokens"]
    elif case == "empty_replies":
        data = tmp_path / "p.jsonl"
        data.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": ""}) + "\n"
                        + json.dumps({"prompt": "q", "chosen": " ", "rejected": "b"}) + "\n")
        needles = ["no usable preference records", "2 empty chosen or rejected reply (first: ", "p.jsonl:1"]
    elif case == "ref_tokenizer":
        extra = ["--ref-checkpoint", other_tokenizer_checkpoint(tokenizer, tmp_path / "other.bin")]
        needles = ["other.bin", "the reference must share the tokenizer"]
    elif case == "smoothing_hinge":
        extra, needles = ["--loss", "hinge", "--label-smoothing", "0.1"], ["--label-smoothing", "not hinge"]
    else:
        extra, needles = ["--max-len", "999"], ["--max-len 999", "context of 256"]
    res = smedjan("dpo", "-c", ckpt, "--data", data, "--output", out, "--steps", "2", "--val-fraction", "0", *extra,
                  env=ENV1)
    assert_user_error(res, *needles)
    assert list(out.parent.iterdir()) == []


def test_two_gloo_processes_equal_one_with_the_global_batch(trained_checkpoint, pairs_file, tmp_path):
    """DDP: sharded batches, reference scoring and validation give one process's numbers."""
    import os
    import subprocess
    import sys

    flags = ["-c", trained_checkpoint, "--data", pairs_file, "--steps", "6", "--lr", "2e-3", "--warmup", "1",
             "--val-fraction", "0.25", "--checkpoint-every", "3", "--json"]
    res = smedjan("dpo", *flags, "--batch-size", "4", "--output", tmp_path / "one.bin", env=ENV1)
    assert res.code == 0, res
    env = {**os.environ, "SMEDJAN_PLAIN_PROGRESS": "1", **ENV1}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "smedjan_tools.cli", "dpo", *map(str, flags), "--batch-size", "2", "--output",
                           tmp_path / "two.bin"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [two] = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    one = json.loads(res.out)
    for k in ("loss", "val_loss", "val_rewards/margins", "rewards/margins"):
        assert two[k] == pytest.approx(one[k], rel=1e-4, abs=1e-6), k
    rec = {p: [json.loads(x) for x in (tmp_path / f"{p}-checkpoints" / "metrics.jsonl").read_text().splitlines()]
           for p in ("one", "two")}
    assert [r["loss"] for r in rec["two"] if "loss" in r] == pytest.approx(
        [r["loss"] for r in rec["one"] if "loss" in r], rel=1e-5)
