"""Long-context retrieval: needle-in-a-haystack passkeys at several depths and lengths.

For every length L, depth d and needle j one prompt is built, all in token space:

    BOS | haystack[:i] | needle | haystack[i:] | question | answer

- haystack: H consecutive tokens of the corpus (the `--haystack` texts, encoded and
  joined by blank lines), from an offset drawn per (L, j), so the depths of one length
  share their text;
- needle: " The secret passkey is NNNNN. Remember it." with a 5-digit passkey drawn per
  (L, d, j);
- question: "\\nWhat is the secret passkey? The secret passkey is"; answer: " NNNNN",
  tokenized together with the question and split at the question's tokens;
- L counts every token the model reads, answer included, so H = L - 1 - needle - question
  - answer; a length above the model's context is skipped with a note;
- i, the needle's position among the H haystack tokens, is round(d * H) snapped to the
  nearest sentence boundary (a token ending in . ! ? followed by one that starts with
  whitespace) within max(8, H/20) tokens, else to the nearest whitespace boundary, else
  kept; the depth actually used (i / H) is reported beside the requested one.

Score: correct iff greedy decoding reproduces the answer tokens exactly (every answer
position's argmax is the passkey's token), the same rule as CORE's language-modeling
tasks; the mean log-prob per answer token is reported too, a graded signal for models that
never get the digits right.

    corpus = corpus_tokens(tok, ["gutenberg/"], need=4096)
    res = run_longctx(model, tok, corpus, lengths=[256, 1024], depths=[0, 0.5, 1], per_cell=4, max_len=2048)
    res.accuracy[(1024, 0.5)]
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Callable

from smedjan.errors import UserError
from smedjan.eval.core import Seq, score_sequences

NEEDLE = " The secret passkey is {key}. Remember it."
QUESTION = "\nWhat is the secret passkey? The secret passkey is"
MIN_HAYSTACK = 8  # haystack tokens a length must leave room for


@dataclass
class Prompt:
    ids: list[int]  # BOS + haystack with needle + question + answer; len == the requested length
    needle_pos: int  # ids[needle_pos:needle_pos + needle_len] are the needle's tokens
    needle_len: int
    haystack_len: int  # H: haystack tokens, needle excluded
    depth: float  # requested
    actual_depth: float  # haystack tokens before the needle / H
    passkey: str
    answer_start: int  # the answer is ids[answer_start:]


def corpus_tokens(tok, paths: list[str], need: int) -> list[int]:
    """Token ids of the corpus files (documents joined by blank lines), read until `need`
    tokens are there; a smaller corpus is a UserError naming the files."""
    from smedjan.data.sources import expand_inputs, iter_chunks

    files = expand_inputs(paths)
    sep = tok.encode("\n\n")
    ids: list[int] = []
    for chunk in iter_chunks(files):
        if chunk.new_doc and ids:
            ids += sep
        ids += tok.encode(chunk.text)
        if len(ids) >= need:
            return ids
    names = ", ".join(str(f) for f in files[:3]) + (" ..." if len(files) > 3 else "")
    raise UserError(f"{names}: the haystack corpus holds {len(ids)} tokens, the longest length needs {need}; "
                    "give more --haystack text or shorter --lengths")


def _starts_with_space(tok, t: int) -> bool:
    b = tok.tokens[t]
    return bool(b) and b[:1] in (b" ", b"\n", b"\t", b"\r")


def _ends_sentence(tok, t: int) -> bool:
    return tok.tokens[t].rstrip(b"\"')]").endswith((b".", b"!", b"?"))


def needle_index(tok, hay: list[int], target: int, snap: bool = True) -> int:
    """Where among the haystack tokens the needle goes: `target`, or the nearest boundary."""
    H = len(hay)
    if not snap or target in (0, H):
        return target
    radius = max(8, H // 20)
    window = sorted(range(max(0, target - radius), min(H, target + radius) + 1), key=lambda i: (abs(i - target), i))

    def space_at(i: int) -> bool:  # the needle (which starts with a space) may go before token i
        return i in (0, H) or _starts_with_space(tok, hay[i])

    for i in window:
        if space_at(i) and (i in (0, H) or _ends_sentence(tok, hay[i - 1])):
            return i
    for i in window:
        if space_at(i):
            return i
    return target


def answer_tokens(tok, passkey: str) -> tuple[list[int], list[int]]:
    """(question ids, answer ids): the answer as it tokenizes right after the question."""
    q = tok.encode(QUESTION)
    qa = tok.encode(QUESTION + " " + passkey)
    if qa[:len(q)] == q and len(qa) > len(q):
        return q, qa[len(q):]
    return q, tok.encode(" " + passkey)


def build_prompt(tok, corpus: list[int], length: int, depth: float, passkey: str, offset: int,
                 snap: bool = True) -> Prompt:
    """The prompt of one cell (see the module docstring); `offset` picks the haystack text."""
    if not 0.0 <= depth <= 1.0:
        raise UserError(f"depth {depth} is outside 0..1")
    needle = tok.encode(NEEDLE.format(key=passkey))
    question, answer = answer_tokens(tok, passkey)
    H = length - 1 - len(needle) - len(question) - len(answer)
    if H < MIN_HAYSTACK:
        raise UserError(f"length {length} leaves {H} haystack tokens beside the needle and question; "
                        f"use lengths of at least {length - H + MIN_HAYSTACK}")
    if H > len(corpus):
        raise UserError(f"length {length} needs {H} haystack tokens, the corpus holds {len(corpus)}")
    offset = offset % (len(corpus) - H + 1)
    hay = corpus[offset:offset + H]
    i = needle_index(tok, hay, round(depth * H), snap)
    ids = [tok.bos_id] + hay[:i] + needle + hay[i:] + question + answer
    assert len(ids) == length
    return Prompt(ids, 1 + i, len(needle), H, depth, i / H, passkey, length - len(answer))


@dataclass
class LongCtxResult:
    lengths: list[int]  # those run
    depths: list[float]
    per_cell: int
    skipped: list[int]  # lengths above the model's context
    accuracy: dict[tuple[int, float], float] = field(default_factory=dict)
    actual_depth: dict[tuple[int, float], float] = field(default_factory=dict)  # mean over the cell's needles
    answer_logprob: dict[tuple[int, float], float] = field(default_factory=dict)  # mean per answer token
    overall: float = float("nan")
    seconds: float = 0.0
    prompts_per_s: float = 0.0

    def summary(self) -> dict:
        cells = [{"length": L, "depth": d, "accuracy": self.accuracy[(L, d)],
                  "actual_depth": round(self.actual_depth[(L, d)], 4),
                  "answer_logprob": round(self.answer_logprob[(L, d)], 4)}
                 for L in self.lengths for d in self.depths]
        return {"lengths": self.lengths, "depths": self.depths, "needles_per_cell": self.per_cell,
                "skipped_lengths": self.skipped, "accuracy": self.overall, "cells": cells,
                "seconds": self.seconds, "prompts_per_s": self.prompts_per_s}


def run_longctx(model, tok, corpus: list[int], *, lengths: list[int], depths: list[float], per_cell: int,
                max_len: int, seed: int = 0, batch_size: int = 4, device="cpu", snap: bool = True,
                on_prompts: Callable[[int], None] | None = None) -> LongCtxResult:
    """Passkey retrieval accuracy by length x depth (lengths above `max_len` are skipped)."""
    if per_cell < 1:
        raise UserError("--needles-per-cell must be at least 1")
    run = sorted({L for L in lengths if L <= max_len})
    res = LongCtxResult(run, sorted(set(depths)), per_cell, sorted({L for L in lengths if L > max_len}))
    t0 = time.monotonic()
    n_prompts = 0
    for L in run:  # one length at a time: its prompts batch together without padding
        prompts = []
        for j in range(per_cell):
            offset = random.Random(f"{seed}:{L}:{j}").randrange(len(corpus))
            for d in res.depths:
                key = str(random.Random(f"{seed}:{L}:{d}:{j}").randint(10000, 99999))
                prompts.append(build_prompt(tok, corpus, L, d, key, offset, snap))
        seqs = [Seq(p.ids, p.answer_start, len(p.ids)) for p in prompts]
        scores = score_sequences(model, seqs, batch_size=batch_size, device=device, pad_id=tok.bos_id)
        for d in res.depths:
            cell = [(p, s) for p, s in zip(prompts, scores) if p.depth == d]
            res.accuracy[(L, d)] = sum(s.greedy for _, s in cell) / len(cell)
            res.actual_depth[(L, d)] = sum(p.actual_depth for p, _ in cell) / len(cell)
            res.answer_logprob[(L, d)] = sum(s.mean for _, s in cell) / len(cell)
        n_prompts += len(prompts)
        if on_prompts is not None:
            on_prompts(len(prompts))
    res.seconds = round(time.monotonic() - t0, 3)
    if res.accuracy:
        res.overall = sum(res.accuracy.values()) / len(res.accuracy)
    res.prompts_per_s = round(n_prompts / res.seconds, 2) if res.seconds > 0 else float("inf")
    return res
