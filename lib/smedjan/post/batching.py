"""Batches of whole examples for SFT and DPO: shuffled per epoch, resumable, DDP-sharded.

Examples are **padded, not packed**: each row of a batch is one example, right-padded to
the longest row of that batch with the tokenizer's `<|pad|>` id (its targets -1, ignored by
the loss). With causal attention a real token only attends to the tokens before it, and
the pads all come after, so every example is computed exactly as if it were alone: no
attention crosses examples and no document mask is needed. Padding costs compute on
uneven batches; that is the price of exactness without a varlen attention kernel.

Order: the examples form an endless stream, epoch after epoch; epoch e is the permutation
of range(N) drawn from numpy's PCG64 seeded with (seed, e). Batch k of a run holds the
stream's positions [k*B*W, (k+1)*B*W) (B = per-process batch size, W = processes), and
rank r takes the r-th B of them, so W processes together see what one process with
batch B*W sees. The state is just k (plus an identity of the data, checked on resume),
so a resumed run continues the same stream.

    batches = ShuffledBatches(len(examples), batch_size=8, seed=0, collate=lambda idx: ...,
                              identity={"examples": digest})
    x, y = batches.next_batch()
    batches.state_dict()       # {"batch": 1, "examples": ...}
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Sequence

import numpy as np
import torch

from smedjan.errors import UserError


def digest_rows(rows: Sequence[Sequence[int]]) -> str:
    """A short content hash of token rows: a resumed run refuses other data."""
    h = hashlib.blake2b(digest_size=8)
    for r in rows:
        a = np.asarray(r, dtype=np.int64)
        h.update(np.int64(len(a)).tobytes())
        h.update(a.tobytes())
    return h.hexdigest()


def pad_rows(rows: Sequence[np.ndarray], value: int) -> torch.Tensor:
    """int64 [len(rows), longest row], right-padded with `value`."""
    width = max(len(r) for r in rows)
    out = np.full((len(rows), width), value, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return torch.from_numpy(out)


def split_indices(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) example indices: a seeded shuffle puts round(fraction * n) examples in val
    (at least 1 when fraction > 0, never all of them)."""
    if not 0.0 <= fraction < 1.0:
        raise UserError(f"--val-fraction {fraction} must be in [0, 1)")
    n_val = 0 if fraction == 0 else min(n - 1, max(1, round(fraction * n)))
    if fraction > 0 and n_val < 1:
        raise UserError(f"--val-fraction {fraction}: {n} example(s) are too few to hold some out")
    perm = np.random.default_rng([seed, 0x5EED]).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


class ShuffledBatches:
    """A `BatchSource` over N examples: `collate(indices)` builds each batch."""

    def __init__(self, n: int, batch_size: int, seed: int, collate: Callable[[np.ndarray], Any],
                 rank: int = 0, world_size: int = 1, identity: dict | None = None):
        assert n > 0 and batch_size > 0 and 0 <= rank < world_size
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.collate = collate
        self.identity = {"n": n, "batch_size": batch_size, "seed": seed, **(identity or {})}
        self.batch = 0
        self._perm: dict[int, np.ndarray] = {}

    def _epoch_perm(self, e: int) -> np.ndarray:
        if e not in self._perm:
            if len(self._perm) > 2:
                self._perm.clear()
            self._perm[e] = np.random.default_rng([self.seed, e]).permutation(self.n)
        return self._perm[e]

    def indices(self, k: int) -> np.ndarray:
        """Example indices of this rank's share of batch k."""
        B = self.batch_size
        first = (k * self.world_size + self.rank) * B
        pos = np.arange(first, first + B)
        out = np.empty(B, dtype=np.int64)
        for e in np.unique(pos // self.n):
            sel = pos // self.n == e
            out[sel] = self._epoch_perm(int(e))[pos[sel] % self.n]
        return out

    @property
    def epochs(self) -> float:
        """Epochs consumed so far (all ranks together)."""
        return self.batch * self.batch_size * self.world_size / self.n

    def next_batch(self):
        idx = self.indices(self.batch)
        self.batch += 1
        return self.collate(idx)

    def state_dict(self) -> dict:
        return {"batch": self.batch, **self.identity}

    def load_state_dict(self, state: dict) -> None:
        for k, v in self.identity.items():
            if state.get(k) != v:
                raise UserError(f"the state was saved for other data or flags ({k} {state.get(k)!r}, now {v!r}); "
                                "resume with the same --data, --batch-size, --seed and --val-fraction")
        try:
            self.batch = int(state["batch"])
        except (KeyError, TypeError, ValueError):
            raise UserError("the state's data position is missing or corrupt") from None
