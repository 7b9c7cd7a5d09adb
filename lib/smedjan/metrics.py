"""Loss-derived metrics shared by training and evaluation: per-token NLL and bits per byte.

Bits per byte (bpb) = sum of per-token NLL in nats / ln 2 / the UTF-8 bytes those
target tokens stand for. Unlike loss per token it does not depend on the tokenizer, so
models with different vocabularies compare. Byte lengths come from
`Tokenizer.token_byte_lengths` (special tokens count 0 bytes). Targets of 0 bytes (the
BOS that opens the next document, other specials) are left out of the NLL sum too, as
nanochat does: they are not text, and counting their NLL against no bytes would make
bpb depend on document length.

    acc = NllBytes()
    acc.add(logits, y, byte_lengths)            # logits [B, T, V], y [B, T]
    acc.bpb, acc.mean_nll                       # bits/byte over text tokens; nats/token over all
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LN2 = math.log(2.0)


def bits_per_byte(nll_nats: float, n_bytes: int) -> float:
    """Total NLL in nats over targets spanning `n_bytes` bytes -> bits per byte."""
    return nll_nats / LN2 / n_bytes if n_bytes else float("nan")


def token_nll(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -1) -> torch.Tensor:
    """Per-token NLL in nats, float32, shape of `targets` ([B, T]); 0 where ignored."""
    flat = logits.reshape(-1, logits.size(-1))
    nll = F.cross_entropy(flat.float() if flat.dtype != torch.float64 else flat, targets.reshape(-1),
                          ignore_index=ignore_index, reduction="none")
    return nll.view(targets.shape)


class NllBytes:
    """Accumulates NLL sums and byte counts over batches (on the logits' device, no syncs)."""

    def __init__(self):
        # [4] float64 running sums: nats over all targets, their count, nats over the
        # targets of > 0 bytes, and those bytes.
        self._t: torch.Tensor | None = None

    def add(self, logits: torch.Tensor, targets: torch.Tensor, byte_lengths: torch.Tensor,
            ignore_index: int = -1) -> None:
        """logits [B, T, V], targets [B, T] (ignore_index = no target), byte_lengths [V] int64."""
        nll = token_nll(logits, targets, ignore_index).double()
        valid = targets != ignore_index
        nbytes = byte_lengths[targets.clamp_min(0)] * valid  # [B, T]
        text = nbytes > 0
        sums = torch.stack([nll.sum(), valid.sum().double(), (nll * text).sum(), nbytes.sum().double()])
        self._t = sums if self._t is None else self._t + sums

    def totals(self) -> torch.Tensor:
        """[nll_all, n_tokens, nll_text, n_bytes] as float64 (all-reduce it under DDP, then `set`)."""
        return self._t if self._t is not None else torch.zeros(4, dtype=torch.float64)

    def set(self, totals: torch.Tensor) -> "NllBytes":
        self._t = totals
        return self

    @property
    def mean_nll(self) -> float:
        nll, n, _, _ = self.totals().tolist()
        return nll / n if n else float("nan")

    @property
    def bpb(self) -> float:
        _, _, nll_text, nbytes = self.totals().tolist()
        return bits_per_byte(nll_text, int(nbytes))
