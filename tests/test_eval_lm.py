"""Loss, perplexity and bits-per-byte over a token file, against a by-hand float64 computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from smedjan.errors import UserError
from smedjan.eval.lm import evaluate_token_file
from smedjan.formats.tokens import TokenWriter
from smedjan.model import ModelConfig, Transformer

DOCS = ["The quick brown fox jumps over the lazy dog.", "To be, or not to be, that is the question:",
        "Whether 'tis nobler in the mind to suffer", "the slings and arrows of outrageous fortune. " * 3,
        "Ünïcödé bytes count too: naïve café, 東京."]


@pytest.fixture(scope="module")
def val_file(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("lm") / "val.bin"
    with TokenWriter(path, vocab_size=tokenizer.vocab_size, tokenizer_fingerprint=tokenizer.fingerprint,
                     bos_id=tokenizer.bos_id) as w:
        for d in DOCS:
            w.write(np.array([tokenizer.bos_id] + tokenizer.encode(d)))
    return path


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(1)
    return Transformer(ModelConfig.make(vocab_size=tokenizer.vocab_size, dim=32, n_layers=1, n_heads=2,
                                   max_seq_len=64)).eval()


def test_bpb_equals_hand_computation(model, tokenizer, val_file):
    T = 16
    res = evaluate_token_file(model, tokenizer, val_file, batch_size=3, seq_len=T)
    # By hand: every window j = tokens[j*T : j*T+T+1], one at a time, float64 log-softmax.
    tokens = [t for d in DOCS for t in [tokenizer.bos_id] + tokenizer.encode(d)]
    lengths = tokenizer.token_byte_lengths
    nats = byte_nats = 0.0
    n_targets = n_bytes = special_targets = 0
    for j in range((len(tokens) - 1) // T):
        w = tokens[j * T: j * T + T + 1]
        with torch.no_grad():
            logits = model(torch.tensor([w[:-1]]))[0].double()
        logp = torch.log_softmax(logits, -1)
        for t, y in enumerate(w[1:]):
            nll = -logp[t, y].item()
            nats += nll
            n_targets += 1
            if lengths[y] > 0:  # special tokens: 0 bytes, and their NLL stays out of bpb
                byte_nats += nll
                n_bytes += int(lengths[y])
            else:
                special_targets += 1
    assert special_targets > 0  # a BOS is predicted somewhere: the rule is exercised
    assert n_bytes < sum(len(d.encode()) for d in DOCS)  # the tail that fills no window is not a target
    assert res.tokens == n_targets and res.bytes == n_bytes
    assert res.loss == pytest.approx(nats / n_targets, rel=1e-6)
    assert res.perplexity == pytest.approx(math.exp(nats / n_targets), rel=1e-6)
    assert res.bits_per_byte == pytest.approx(byte_nats / math.log(2) / n_bytes, rel=1e-6)
    assert res.bits_per_byte != pytest.approx(nats / math.log(2) / n_bytes, rel=1e-6)


def test_max_tokens_caps_the_windows(model, tokenizer, val_file):
    res = evaluate_token_file(model, tokenizer, val_file, batch_size=2, seq_len=8, max_tokens=16)
    assert res.windows == 2 and res.tokens == 16


def test_token_file_of_another_tokenizer_is_refused(tmp_path, model, tokenizer):
    path = tmp_path / "other.bin"
    with TokenWriter(path, vocab_size=tokenizer.vocab_size, tokenizer_fingerprint="0123456789abcdef",
                     bos_id=tokenizer.bos_id) as w:
        w.write(np.array([tokenizer.bos_id] + tokenizer.encode("some text here") * 4))
    with pytest.raises(UserError, match="0123456789abcdef"):
        evaluate_token_file(model, tokenizer, path, batch_size=1, seq_len=4)
