"""Sequence-length warmup (`smedjan train --curriculum N`): Li, Zhang and He 2022, "The
Stability-Efficiency Dilemma: Investigating Sequence Length Warmup for Training GPT
Models" (DeepSpeed's curriculum learning, `seqlen` metric, `fixed_linear` schedule).

Over the first N optimizer steps the training windows grow linearly from START tokens to
`--seq-len`, in multiples of MULTIPLE (DeepSpeed's difficulty_step, for tensor-core
friendly shapes), by truncation: at step t every sequence of the batch is cut to

    L(t) = min(T, max(START, floor((START + (T - START) t / N) / MULTIPLE) MULTIPLE))

tokens (the paper's "seqtru"), so the windows, their order and the data position are the
loader's own and L depends on the step alone: a resumed run and every DDP rank see the
same batches as the uninterrupted one. Early steps carry fewer tokens (tok/s and the
token count say so); validation always runs at the full length.

    source = CurriculumSource(loader, warmup_steps=200, seq_len=256, grad_accum=1)
    x, y = source.next_batch()      # [B, 8] at step 0, [B, 256] from step 200 on
"""

from __future__ import annotations

START = 8  # the paper's and DeepSpeed's starting length
MULTIPLE = 8


def length_at(step: int, warmup_steps: int, seq_len: int) -> int:
    """L(step): the window length at optimizer step `step` (0-based)."""
    start = min(START, seq_len)
    if warmup_steps <= 0 or step >= warmup_steps:
        return seq_len
    grown = start + (seq_len - start) * step / warmup_steps
    return min(seq_len, max(start, int(grown) // MULTIPLE * MULTIPLE))


class CurriculumSource:
    """A `Loader`'s (x, y) windows, truncated to `length_at` the current optimizer step (the
    loader's micro-batch count / grad_accum); its state is the loader's."""

    def __init__(self, loader, warmup_steps: int, seq_len: int, grad_accum: int):
        self.loader, self.warmup_steps, self.seq_len, self.grad_accum = loader, warmup_steps, seq_len, grad_accum

    def next_batch(self):
        L = length_at(self.loader.step // self.grad_accum, self.warmup_steps, self.seq_len)
        x, y = self.loader.next_batch()
        return x[:, :L].contiguous(), y[:, :L].contiguous()

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)
