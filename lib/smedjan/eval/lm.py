"""Loss, perplexity and bits-per-byte of a model over a token file (val.bin).

The file is read in order as non-overlapping windows of `seq_len + 1` tokens
(`smedjan.data.loader.iter_sequential`); every token after a window's first is a target.

- loss = mean next-token cross-entropy (nats) over all targets; perplexity = exp(loss).
- bits-per-byte = (sum of the targets' NLL in nats) / ln 2 / (sum of the targets' UTF-8
  byte lengths), where a token's byte length comes from the tokenizer and special tokens
  (BOS, chat markers) count 0 bytes. As in nanochat's `evaluate_bpb`, the NLL of a
  zero-byte target (predicting the BOS that opens the next document) is left out of the
  numerator too: bpb measures the cost of the text's bytes, so it is independent of the
  vocabulary and comparable with nanochat's val_bpb on the same text.

The sums are `smedjan.metrics.NllBytes` (float64), the same accumulator training uses for
its val bpb, so both report the same number. Logits are computed a chunk of positions at
a time (only [chunk, vocab] is ever materialized), so long windows and large vocabularies fit.

    r = evaluate_token_file(model, tok, "val.bin", batch_size=8, seq_len=1024)
    r.loss, r.perplexity, r.bits_per_byte
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from smedjan.errors import UserError
from smedjan.metrics import NllBytes

LOGIT_CHUNK = 8192  # positions whose logits are materialized at once


def _accumulate(acc: NllBytes, model, x: torch.Tensor, y: torch.Tensor, token_bytes: torch.Tensor) -> None:
    """Add the targets y [B, T] after inputs x [B, T] to `acc`. With a smedjan Transformer the
    head runs on LOGIT_CHUNK positions at a time ([chunk, V] logits, never [B, T, V])."""
    if hasattr(model, "hidden") and hasattr(model, "logits"):
        h = model.hidden(x).reshape(-1, model.cfg.dim)  # [B*T, dim]
        yf = y.reshape(-1)
        for i in range(0, h.shape[0], LOGIT_CHUNK):
            acc.add(model.logits(h[i:i + LOGIT_CHUNK]), yf[i:i + LOGIT_CHUNK], token_bytes)
    else:
        acc.add(model(x), y, token_bytes)


@dataclass
class LMResult:
    file: str
    windows: int
    tokens: int
    bytes: int
    loss: float
    perplexity: float
    bits_per_byte: float
    seq_len: int
    seconds: float
    tokens_per_s: float

    def summary(self) -> dict:
        return asdict(self)


@torch.no_grad()
def evaluate_token_file(model, tokenizer, path, *, batch_size: int, seq_len: int, max_tokens: int | None = None,
                        device="cpu", on_batch: Callable[[int], None] | None = None) -> LMResult:
    """Loss, perplexity and bits-per-byte of `model` over the token file at `path`."""
    from smedjan.data.loader import TokenFile, check_tokenizer_match, iter_sequential

    tf = TokenFile.open(path)
    check_tokenizer_match(tf, tokenizer, "the checkpoint's tokenizer")
    if tf.vocab_size > tokenizer.vocab_size:
        raise UserError(f"{path}: vocabulary {tf.vocab_size} exceeds the model's {tokenizer.vocab_size}")
    if seq_len < 1 or batch_size < 1:
        raise UserError("--seq-len and --batch-size must be positive")
    max_batches = None
    if max_tokens is not None:
        if max_tokens < seq_len:
            raise UserError(f"--max-tokens {max_tokens} is less than one window of --seq-len {seq_len}")
        max_batches = max(1, max_tokens // (batch_size * seq_len))
    token_bytes = torch.as_tensor(tokenizer.token_byte_lengths, dtype=torch.int64).to(device)  # [V]
    acc = NllBytes()
    windows = 0
    t0 = time.monotonic()
    for x, y in iter_sequential(tf, batch_size, seq_len, max_batches=max_batches):
        _accumulate(acc, model, x.to(device), y.to(device), token_bytes)
        windows += x.shape[0]
        if on_batch is not None:
            on_batch(1)
    seconds = time.monotonic() - t0
    _, n_targets, _, n_bytes = acc.totals().tolist()
    if n_targets == 0:
        raise UserError(f"{path}: no whole window of {seq_len + 1} tokens to evaluate")
    loss = acc.mean_nll
    return LMResult(str(path), windows, int(n_targets), int(n_bytes), loss,
                    math.exp(loss) if loss < 700 else float("inf"), acc.bpb, seq_len, round(seconds, 3),
                    round(n_targets / seconds, 1) if seconds > 0 else float("inf"))
