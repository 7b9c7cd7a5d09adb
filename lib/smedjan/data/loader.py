"""The training data loader: batches of token windows from a train.bin, resumable and DDP-exact.

A batch is B windows of T+1 consecutive tokens; x is the first T of each, y the last T
(the next-token targets). Three modes:

- random windows (the default): window starts drawn uniformly from [0, n_tokens - T - 1],
  read through a read-only memmap (only the touched pages are read). Every token is
  equally likely to be seen; windows cross document boundaries (the BOS marks them).
- `bos_aligned=True`: each window starts at a document's BOS, the document drawn
  uniformly among those that start at least T+1 tokens before the end; a document
  shorter than the window runs into the next ones. Suits corpora of documents about a
  window long or shorter: of a longer document only its first T+1 tokens are ever seen.
  Finding the document starts scans the file once (8 bytes per document kept).
- `stream=True`: contiguous windows in file order, window j = tokens [j*T, j*T+T+1), read
  with plain positioned reads (no memmap, nothing held beyond the current batch); after
  the last whole window it wraps to the start (the state counts epochs).

Sampling is defined per GLOBAL batch of G = B * world_size windows, so DDP equals one
process: at step k the random modes draw G starts from numpy's
`default_rng([seed, k])`, and stream mode takes windows k*G .. k*G+G-1 (modulo the
windows per epoch); rank r takes rows [r*B, (r+1)*B). One process with batch 2B yields
exactly the rows of ranks 0 and 1 with batch B. The state is therefore the step counter
(with mode, seed, window shape and dataset identity, checked on resume): the next batch
after `load_state_dict` equals the uninterrupted run's. Since only G matters, a run may
resume on a different number of ranks if B * world_size stays the same.

    loader = Loader("train.bin", batch_size=8, seq_len=256, seed=0, rank=rank, world_size=world)
    x, y = loader.next_batch()            # int64 [8, 256] each; y[:, :-1] == x[:, 1:]
    state = loader.state_dict()           # {"step": 1, ...}: save it in the checkpoint
    loader.load_state_dict(state)         # resume: continues the same stream
    for x, y in iter_sequential("val.bin", batch_size=8, seq_len=256):   # evaluation, in order
        ...
"""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np
import torch

from smedjan.errors import UserError
from smedjan.formats.tokens import TokenFile, check_tokenizer_match

__all__ = ["Loader", "iter_sequential", "n_sequential_batches", "check_tokenizer_match", "TokenFile"]

STATE_KIND = "smedjan_loader"
STATE_VERSION = 1


def _open(path_or_tokenfile) -> TokenFile:
    if isinstance(path_or_tokenfile, TokenFile):
        return path_or_tokenfile
    return TokenFile.open(path_or_tokenfile)


def _check_shape(tf: TokenFile, batch_size: int, seq_len: int, rank: int, world_size: int) -> None:
    for name, v in (("batch_size", batch_size), ("seq_len", seq_len), ("world_size", world_size)):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise UserError(f"{name} must be a positive integer, not {v!r}")
    if not 0 <= rank < world_size:
        raise UserError(f"rank {rank} is outside 0..{world_size - 1}")
    if tf.n_tokens < seq_len + 1:
        raise UserError(f"{tf.path}: holds {tf.n_tokens} tokens, fewer than one window of seq_len+1 = "
                        f"{seq_len + 1}; use a shorter --seq-len or more data")


def _to_xy(rows: np.ndarray, tf: TokenFile) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T+1] token rows -> (x, y) int64 tensors [B, T], after an id range check."""
    if rows.size and int(rows.max()) >= tf.vocab_size:
        raise UserError(f"{tf.path}: token id {int(rows.max())} is out of range for vocabulary "
                        f"{tf.vocab_size} (corrupt); regenerate it with `smedjan prepare`")
    t = torch.from_numpy(rows.astype(np.int64))
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()


def _read_windows(tf: TokenFile, first: int, count: int, seq_len: int, fd: int | None = None) -> np.ndarray:
    """Windows first..first+count-1 of the contiguous tiling (window j = tokens [j*T, j*T+T+1)),
    as [count, T+1], with one positioned read of count*T+1 tokens (no memmap)."""
    if count == 0:
        return np.empty((0, seq_len + 1), dtype=tf.dtype)
    n = count * seq_len + 1
    nbytes = n * tf.dtype.itemsize
    offset = tf.data_offset + first * seq_len * tf.dtype.itemsize
    if fd is None:
        with open(tf.path, "rb") as f:
            data = os.pread(f.fileno(), nbytes, offset)
    else:
        data = os.pread(fd, nbytes, offset)
    if len(data) != nbytes:
        raise UserError(f"{tf.path}: truncated while being read; regenerate it with `smedjan prepare`")
    flat = np.frombuffer(data, dtype=tf.dtype)
    # Overlapping rows of T+1 with stride T: row i = flat[i*T : i*T+T+1] (a view, then copied).
    return np.lib.stride_tricks.as_strided(flat, shape=(count, seq_len + 1),
                                           strides=(seq_len * flat.itemsize, flat.itemsize)).copy()


class Loader:
    """Batches of (x, y) from a token file; see the module docstring for the modes and the state."""

    def __init__(self, path_or_tokenfile, batch_size: int, seq_len: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, bos_aligned: bool = False, stream: bool = False):
        self.tf = _open(path_or_tokenfile)
        _check_shape(self.tf, batch_size, seq_len, rank, world_size)
        if bos_aligned and stream:
            raise UserError("BOS-aligned sampling and --stream cannot be combined: stream mode reads the file in order")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise UserError(f"seed must be a non-negative integer, not {seed!r}")
        self.batch_size, self.seq_len = int(batch_size), int(seq_len)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.global_batch = self.batch_size * self.world_size
        self.mode = "stream" if stream else ("bos" if bos_aligned else "random")
        self.step = 0
        self._fd: int | None = None
        if self.mode == "bos":
            starts = self.tf.doc_starts()
            # Documents whose window would run past the end cannot start one.
            self._starts = starts[starts + self.seq_len + 1 <= self.tf.n_tokens]
        # stream mode: the whole windows of one pass; the last < T tokens are never targets.
        self.windows_per_epoch = (self.tf.n_tokens - 1) // self.seq_len

    # ------------------------------------------------------------------ batches
    @property
    def tokens_per_batch(self) -> int:
        """Target tokens per rank per step: B * T."""
        return self.batch_size * self.seq_len

    @property
    def epoch(self) -> int:
        """Stream mode: completed passes over the file before the next batch."""
        return self.step * self.global_batch // self.windows_per_epoch

    def _global_starts(self, step: int) -> np.ndarray:
        """The G window start positions of global batch `step` (random modes)."""
        rng = np.random.default_rng([self.seed, step])
        if self.mode == "random":
            return rng.integers(0, self.tf.n_tokens - self.seq_len, size=self.global_batch, dtype=np.int64)
        return self._starts[rng.integers(0, len(self._starts), size=self.global_batch, dtype=np.int64)]

    def _rows(self, step: int) -> np.ndarray:
        B, T, r = self.batch_size, self.seq_len, self.rank
        if self.mode == "stream":
            return self._stream_rows(step * self.global_batch + r * B, B)
        starts = self._global_starts(step)[r * B:(r + 1) * B]
        tokens = self.tf.tokens
        return np.stack([tokens[p:p + T + 1] for p in starts.tolist()])

    def _stream_rows(self, first: int, count: int) -> np.ndarray:
        """`count` windows from global window index `first`, wrapping at the end of the file."""
        if self._fd is None:
            self._fd = os.open(self.tf.path, os.O_RDONLY)
        nw = self.windows_per_epoch
        parts = []
        while count:
            w = first % nw
            take = min(count, nw - w)  # contiguous up to the end of this epoch
            parts.append(_read_windows(self.tf, w, take, self.seq_len, self._fd))
            first, count = first + take, count - take
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), int64 [B, T] each, of this rank; advances the step."""
        rows = self._rows(self.step)
        self.step += 1
        return _to_xy(rows, self.tf)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # -------------------------------------------------------------------- state
    def _identity(self) -> dict:
        return {"mode": self.mode, "seed": self.seed, "seq_len": self.seq_len, "global_batch": self.global_batch,
                "dataset_sha256": self.tf.sha256, "dataset_tokens": self.tf.n_tokens}

    def state_dict(self) -> dict:
        """A small JSON-serializable dict; `load_state_dict` on it continues the same stream."""
        state = {"kind": STATE_KIND, "version": STATE_VERSION, "step": self.step, **self._identity()}
        if self.mode == "stream":
            state["epoch"] = self.epoch
        return state

    def load_state_dict(self, state: dict) -> None:
        """Resume at the saved step; refuses a state of another dataset, seed, mode or window shape."""
        if not isinstance(state, dict) or state.get("kind") != STATE_KIND:
            raise UserError(f"{self.tf.path}: the saved data-loader state is not a smedjan loader state")
        if state.get("version") != STATE_VERSION:
            raise UserError(f"{self.tf.path}: data-loader state version {state.get('version')!r}, "
                            f"this smedjan reads version {STATE_VERSION}")
        mine = self._identity()
        labels = {"mode": "sampling mode", "seed": "data seed", "seq_len": "seq_len",
                  "global_batch": "global batch (batch_size x world_size)", "dataset_sha256": "dataset",
                  "dataset_tokens": "dataset size"}
        for key, label in labels.items():
            if state.get(key) != mine[key]:
                if key.startswith("dataset"):
                    raise UserError(f"{self.tf.path}: the data-loader state was saved on another dataset "
                                    f"({state.get('dataset_tokens')} tokens, sha256 {str(state.get('dataset_sha256'))[:16]}), "
                                    f"this file has {self.tf.n_tokens} tokens, sha256 {self.tf.sha256[:16]}")
                raise UserError(f"{self.tf.path}: the data-loader state has {label} {state.get(key)!r}, "
                                f"this run uses {mine[key]!r}; resume with the same settings")
        step = state.get("step")
        if not isinstance(step, int) or step < 0:
            raise UserError(f"{self.tf.path}: the data-loader state has an invalid step {step!r}")
        self.step = step


def n_sequential_batches(path_or_tokenfile, batch_size: int, seq_len: int, world_size: int = 1,
                         drop_last: bool = False) -> int:
    """How many batches `iter_sequential` yields on every rank (before max_batches)."""
    tf = _open(path_or_tokenfile)
    _check_shape(tf, batch_size, seq_len, 0, world_size)
    nw = (tf.n_tokens - 1) // seq_len
    g = batch_size * world_size
    return nw // g if drop_last else -(-nw // g)


def iter_sequential(path_or_tokenfile, batch_size: int, seq_len: int, max_batches: int | None = None,
                    rank: int = 0, world_size: int = 1,
                    drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The whole file in order, as non-overlapping windows (window j = tokens [j*T, j*T+T+1)),
    for evaluation. Global batch i holds windows i*G .. i*G+G-1, G = B * world_size; rank r
    takes rows [r*B, (r+1)*B). Plain positioned reads, no memmap.

    Every rank yields the same number of batches (see `n_sequential_batches`), so collectives
    stay in step; unless `drop_last`, the last batch may have fewer rows on a rank, even zero:
    sum losses and token counts, then all-reduce both. The final < T tokens that do not fill
    a window are never targets.
    """
    tf = _open(path_or_tokenfile)
    n = n_sequential_batches(tf, batch_size, seq_len, world_size, drop_last)
    if max_batches is not None:
        n = min(n, max_batches)
    nw = (tf.n_tokens - 1) // seq_len
    G = batch_size * world_size
    fd = os.open(tf.path, os.O_RDONLY)
    try:
        for i in range(n):
            first = min(i * G + rank * batch_size, nw)
            count = min(batch_size, nw - first)
            yield _to_xy(_read_windows(tf, first, count, seq_len, fd), tf)
    finally:
        os.close(fd)
