"""Needle-in-a-haystack: the needle lands where the builder says, and retrieval scoring works."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import DATA
from smedjan.errors import UserError
from smedjan.eval.longctx import NEEDLE, answer_tokens, build_prompt, corpus_tokens, run_longctx


@pytest.fixture(scope="module")
def corpus(tokenizer):
    return corpus_tokens(tokenizer, [str(DATA / "pretrain" / "tinyshakespeare.txt.zst")], need=4000)


@pytest.mark.parametrize("length", [64, 200, 513])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.77, 1.0])
def test_needle_sits_exactly_at_the_requested_token_depth(tokenizer, corpus, length, depth):
    p = build_prompt(tokenizer, corpus, length, depth, "48213", offset=777, snap=False)
    needle = tokenizer.encode(NEEDLE.format(key="48213"))
    question, answer = answer_tokens(tokenizer, "48213")
    assert len(p.ids) == length and p.ids[0] == tokenizer.bos_id
    assert p.ids[p.needle_pos:p.needle_pos + len(needle)] == needle and p.needle_len == len(needle)
    assert p.needle_pos - 1 == round(depth * p.haystack_len)  # haystack tokens before the needle
    assert p.actual_depth == (p.needle_pos - 1) / p.haystack_len
    assert p.ids[p.answer_start:] == answer and p.ids[p.answer_start - len(question):p.answer_start] == question
    # the haystack around the needle is the corpus, uncut and in order
    hay = p.ids[1:p.needle_pos] + p.ids[p.needle_pos + len(needle):p.answer_start - len(question)]
    assert hay == corpus[777:777 + p.haystack_len]


@pytest.mark.parametrize("depth", [0.3, 0.5, 0.9])
def test_snapped_needle_is_on_a_boundary_near_the_depth(tokenizer, corpus, depth):
    p = build_prompt(tokenizer, corpus, 400, depth, "10101", offset=123)
    i = p.needle_pos - 1
    assert abs(i - round(depth * p.haystack_len)) <= max(8, p.haystack_len // 20)
    after = tokenizer.tokens[p.ids[p.needle_pos + p.needle_len]]
    assert after[:1].isspace()  # the needle ends at a word boundary of the haystack
    assert "The secret passkey is 10101. Remember it." in tokenizer.decode(p.ids)


def test_too_short_length_and_small_corpus_are_user_errors(tokenizer, corpus):
    with pytest.raises(UserError, match="haystack tokens"):
        build_prompt(tokenizer, corpus, 20, 0.5, "12345", offset=0)
    with pytest.raises(UserError, match="corpus holds"):
        corpus_tokens(tokenizer, [str(DATA / "pretrain" / "tinyshakespeare.txt.zst")], need=10**9)


class Induction(nn.Module):
    """Predicts, at each position, the token that followed the last earlier occurrence of the
    current 3-token context: retrieval by copying, with no learned weights."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        out = torch.zeros(B, T, self.vocab)
        for b in range(B):
            row = idx[b].tolist()
            seen: dict[tuple, int] = {}
            for t in range(2, T):
                key = tuple(row[t - 2:t + 1])
                if key in seen:
                    out[b, t, row[seen[key] + 1]] = 30.0
                if t + 1 < T:
                    seen[key] = t
        return out


def test_copying_model_retrieves_every_passkey_and_lengths_beyond_context_skip(tokenizer, corpus):
    res = run_longctx(Induction(tokenizer.vocab_size), tokenizer, corpus, lengths=[96, 160, 4096],
                      depths=[0, 0.5, 1], per_cell=2, max_len=256, batch_size=3)
    assert res.lengths == [96, 160] and res.skipped == [4096]
    assert res.overall == 1.0 and all(v == 1.0 for v in res.accuracy.values())
    blank = run_longctx(Uniform(tokenizer.vocab_size), tokenizer, corpus, lengths=[96], depths=[0.5], per_cell=2,
                        max_len=256)
    assert blank.overall == 0.0  # no copying, no passkey


class Uniform(nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*idx.shape, self.vocab)


def test_same_seed_same_prompts(tokenizer, corpus):
    from smedjan.model import ModelConfig, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig.make(vocab_size=tokenizer.vocab_size, dim=32, n_layers=1, n_heads=2,
                                    max_seq_len=128)).eval()

    def cells(seed):
        return run_longctx(model, tokenizer, corpus, lengths=[80], depths=[0.2, 0.8], per_cell=2, max_len=128,
                           seed=seed).summary()["cells"]

    assert cells(3) == cells(3)
    assert cells(3) != cells(4)  # other passkeys and haystack text: other log-probs
