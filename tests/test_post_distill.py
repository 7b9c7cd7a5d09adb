"""Distillation: the loss equals a float64 reference of alpha * T^2 * KL(teacher || student) +
(1 - alpha) * CE; a short run pulls a new student towards the teacher; teacher, student and
dataset must share a tokenizer."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from helpers import assert_user_error, smedjan
from test_post_sft import ENV1, other_tokenizer_checkpoint
from train_helpers import token_files

from smedjan.post.distill import distill_loss


def reference(s: np.ndarray, t: np.ndarray, y: np.ndarray, T: float, alpha: float) -> float:
    """float64 numpy: s, t [N, V] logits, y [N]."""
    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    lps, lpt = log_softmax(s / T), log_softmax(t / T)
    kl = (np.exp(lpt) * (lpt - lps)).sum(-1).mean() * T * T
    ce = -log_softmax(s)[np.arange(len(y)), y].mean()
    return alpha * kl + (1 - alpha) * ce


@pytest.mark.parametrize("T,alpha", [(1.0, 0.5), (2.0, 0.5), (4.0, 1.0), (2.0, 0.0), (0.5, 0.3)])
def test_loss_equals_its_float64_formula(T, alpha):
    rng = np.random.default_rng(7)
    s, t = rng.normal(0, 3, (2, 5, 17)), rng.normal(0, 3, (2, 5, 17))
    y = rng.integers(0, 17, (2, 5))
    loss, kl, ce = distill_loss(torch.tensor(s), torch.tensor(t), torch.tensor(y), T, alpha)
    want = reference(s.reshape(-1, 17), t.reshape(-1, 17), y.reshape(-1), T, alpha)
    assert float(loss) == pytest.approx(want, rel=1e-5)  # the loss computes in float32
    assert float(alpha * kl + (1 - alpha) * ce) == pytest.approx(float(loss), rel=1e-6)
    if alpha == 0:
        assert float(loss) == pytest.approx(float(torch.nn.functional.cross_entropy(
            torch.tensor(s).reshape(-1, 17), torch.tensor(y).reshape(-1))), rel=1e-5)


def test_kl_is_zero_for_the_teacher_itself_and_grads_reach_only_the_student():
    t = torch.randn(3, 4, 9)
    s = t.clone().requires_grad_(True)
    teacher = t.clone().requires_grad_(True)
    loss, kl, _ = distill_loss(s, teacher, torch.zeros(3, 4, dtype=torch.long), 2.0, 1.0)
    assert abs(float(kl)) < 1e-6
    loss.backward()
    assert teacher.grad is None and s.grad is not None


@pytest.fixture(scope="module")
def tokens(tmp_path_factory, tokenizer_path):
    return token_files(tmp_path_factory, tokenizer_path)


STUDENT = ["--size", "custom", "--dim", "32", "--layers", "1", "--heads", "2", "--batch-size", "4", "--seq-len", "32",
           "--warmup", "2", "--lr", "3e-3", "--val-tokens", "2048"]


def test_distill_pulls_the_student_towards_the_teacher(tokens, trained_checkpoint, tmp_path, tokenizer):
    from smedjan.formats.checkpoint import load_checkpoint

    train, val = tokens
    res = smedjan("distill", "--teacher", trained_checkpoint, "--dataset", train, "--val-dataset", val, *STUDENT,
                  "--steps", "40", "--output", tmp_path / "student.bin", "--json", env=ENV1)
    assert res.code == 0, res
    s = json.loads(res.out)
    assert s["reason"] == "done" and s["student_params"] < s["teacher_params"]
    rec = [json.loads(x) for x in (tmp_path / "student-checkpoints" / "metrics.jsonl").read_text().splitlines()]
    kl = [r["kl"] for r in rec if "kl" in r]
    assert len(kl) == 40 and np.mean(kl[-5:]) < 0.7 * np.mean(kl[:5])
    assert s["val_loss"] < math.log(2048) - 1.0  # far below a random model's loss
    ck = load_checkpoint(tmp_path / "student.bin")
    assert ck.fingerprint == tokenizer.fingerprint and ck.config.dim == 32 and ck.meta["tool"] == "distill"


def other_token_file(tokenizer, path):
    from smedjan.formats.tokens import TokenWriter
    from smedjan.tokenizer import Tokenizer

    other = Tokenizer(tokenizer.tokens, tokenizer.merges, tokenizer.specials, pattern="gpt2")
    with TokenWriter(path, vocab_size=other.vocab_size, tokenizer_fingerprint=other.fingerprint,
                     bos_id=other.bos_id) as w:
        w.write(np.array([other.bos_id] + list(range(100, 400)), dtype=np.int64))
    return path


@pytest.mark.parametrize("case", ["init_tokenizer", "dataset_tokenizer", "temperature", "alpha", "seq_len",
                                  "custom_dims", "init_with_size"])
def test_distill_bad_input(case, tokens, trained_checkpoint, tokenizer, tmp_path):
    train, _ = tokens
    out = tmp_path / "out" / "student.bin"
    out.parent.mkdir()
    args = ["--teacher", trained_checkpoint, "--dataset", train, "--output", out, "--steps", "2", "--seq-len", "32"]
    if case == "init_tokenizer":
        args += ["--init", other_tokenizer_checkpoint(tokenizer, tmp_path / "other.bin")]
        needles = ["other.bin", "teacher and student must share a tokenizer"]
    elif case == "dataset_tokenizer":
        args[3] = other_token_file(tokenizer, tmp_path / "other.tokens")
        needles = ["other.tokens", "made with tokenizer", "the teacher"]
    elif case == "temperature":
        args += ["--temperature", "0"]
        needles = ["--temperature 0"]
    elif case == "alpha":
        args += ["--alpha", "1.5"]
        needles = ["--alpha 1.5"]
    elif case == "seq_len":
        args += ["--seq-len", "512"]
        needles = ["--seq-len 512", "teacher's context of 256"]
    elif case == "custom_dims":
        args += ["--size", "custom", "--dim", "32"]
        needles = ["--size custom needs --layers, --heads"]
    else:
        args += ["--init", trained_checkpoint, "--size", "tiny"]
        needles = ["--size cannot be combined with --init"]
    assert_user_error(smedjan("distill", *args, env=ENV1), *needles)
    assert list(out.parent.iterdir()) == []
