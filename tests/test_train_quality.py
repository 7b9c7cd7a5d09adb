"""Quality: the tiny preset, trained briefly on CPU on the shipped corpus, must model the
text clearly better than any context-free model could.

The bound. A model that ignores context can at best predict every token with the
corpus's unigram distribution p(t). Its expected cost on text from that distribution is
the unigram entropy H = -sum_t p(t) log2 p(t) bits per token; spread over the text, that
is H / (mean bytes per token) bits per byte. Both are measured on the same train.bin
the model learns from, over text tokens only (BOS counts 0 bytes and is left out, as in
val_bpb). On held-out text a unigram model does no better than H (the val split's
distribution differs slightly from train's, which only adds cost), so H / bytes-per-token
is the best bpb a context-free model can reach, and the model can reach it: the unigram
distribution is learnable through the final norm and the tied embedding.

The margin. We require val bpb < 0.85 x that bound: at least 15% fewer bits than the
best context-free predictor, which only a model that uses the preceding tokens can get
(bigram statistics alone save 20-30% on English BPE text). In development the run below
reached 0.77 x (val bpb 2.45 against a bound of 3.20), so 0.85 leaves room for platform
differences in float arithmetic without accepting a model that failed to learn context. Fixed steps, not
wall time: the result does not depend on the machine's speed.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import DATA, smedjan
from train_helpers import for_optimizer, metrics, train

MARGIN = 0.85


def unigram_bound_bpb(train_bin, tokenizer) -> tuple[float, float, float]:
    """(bound in bits/byte, H in bits/token, mean bytes/token) of a token file's text tokens."""
    from smedjan.formats.tokens import TokenFile

    tokens = np.asarray(TokenFile.open(train_bin).tokens)
    counts = np.bincount(tokens, minlength=tokenizer.vocab_size).astype(np.float64)
    lengths = tokenizer.token_byte_lengths
    counts[lengths == 0] = 0  # special tokens are not text
    p = counts / counts.sum()
    nz = p > 0
    h = float(-(p[nz] * np.log2(p[nz])).sum())
    bytes_per_token = float((counts * lengths).sum() / counts.sum())
    return h / bytes_per_token, h, bytes_per_token


# One AdamW run serves both tests below: the tiny preset, 250 steps of 16 x 128 on every
# shipped corpus file (the test tokenizer), cosine 3e-3 -> 3e-4 after 25 warmup steps.
COMMON = ["--size", "tiny", "--batch-size", "16", "--seq-len", "128", "--steps", "250", "--warmup", "25", "--lr",
          "3e-3", "--min-lr", "3e-4", "--checkpoint-every", "0", "--val-tokens", "32768", "--json"]


@pytest.fixture(scope="module")
def shipped(tmp_path_factory, tokenizer_path):
    folder = tmp_path_factory.mktemp("quality")
    train_bin, val_bin = folder / "train.bin", folder / "val.bin"
    res = smedjan("prepare", "--input", DATA / "pretrain", "-t", tokenizer_path, "-o", train_bin, "--val-output",
                  val_bin, "--val-fraction", "0.02", "--txt-split", "blank", "--json")
    assert res.code == 0, res
    assert json.loads(res.out)["val_tokens"] > 32768
    return ["--dataset", train_bin, "--val-dataset", val_bin, "--tokenizer", tokenizer_path], train_bin


@pytest.fixture(scope="module")
def adamw_run(shipped, tmp_path_factory):
    """(summary, checkpoint folder) of the AdamW run."""
    folder = tmp_path_factory.mktemp("adamw")
    res = train(*shipped[0], *COMMON, "--optimizer", "adamw", "--checkpoint-dir", folder)
    assert res.code == 0, res
    return json.loads(res.out), folder


@pytest.mark.slow
def test_tiny_beats_the_unigram_entropy_clearly(shipped, adamw_run, tokenizer):
    bound, h, bpt = unigram_bound_bpb(shipped[1], tokenizer)
    assert 2.0 < bound < 5.0 and 1.5 < bpt < 6.0  # sanity: an English BPE of 2048 tokens
    summary, folder = adamw_run
    final = [r for r in metrics(folder) if "val_bpb" in r][-1]
    assert final["step"] == 250 and summary["val_bpb"] == final["val_bpb"]
    print(f"unigram bound {bound:.4f} bits/byte (H {h:.3f} bits/token, {bpt:.3f} bytes/token); "
          f"tiny val bpb {final['val_bpb']:.4f} = {final['val_bpb'] / bound:.3f} x bound")
    assert final["val_bpb"] < MARGIN * bound


# The hybrid against AdamW at equal steps. bench/quality.py at the tiny pipeline's budget
# (480 steps of 16 x 256, vocab 4096) measured the val losses in README's Benchmarks: the
# hybrid's default recipe ends HYBRID_GAIN below AdamW's (the old tiny recipe). This test
# runs a shorter proxy (250 steps of 16 x 128 on the test tokenizer, as the test above) and
# requires a third of that gain: the gap grows with the steps (at 250 of 480 steps the bench
# runs were already past half of it), a third leaves room for the other vocabulary and
# context, and it is still a margin no run-to-run noise explains (identical seeds; float
# differences move val loss by < 0.01).
HYBRID_GAIN = 0.49  # nats; conservatively below the measured 0.61: adamw 4.90 -> hybrid 4.29 (README, Benchmarks)


@pytest.mark.slow
def test_hybrid_trains_the_tiny_model_lower_than_adamw(shipped, adamw_run, tmp_path):
    res = train(*shipped[0], *for_optimizer(COMMON, "hybrid"), "--final-lr-frac", "0.1",  # 3e-4 / 3e-3, per role
                "--optimizer", "hybrid", "--checkpoint-dir", tmp_path / "hybrid")
    assert res.code == 0, res
    val = {"adamw": adamw_run[0]["val_loss"], "hybrid": json.loads(res.out)["val_loss"]}
    print(f"val loss at 250 steps: adamw {val['adamw']:.4f}, hybrid {val['hybrid']:.4f}")
    assert val["hybrid"] < val["adamw"] - HYBRID_GAIN / 3
