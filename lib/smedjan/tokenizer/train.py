"""Train a byte-level BPE vocabulary from scratch.

Two phases:
1. Count pre-tokenizer pieces. Text is cut into fixed ~2 MB jobs (independent of the
   worker count, so the counts and hence the vocabulary are identical for any
   `workers`) and counted in a process pool.
2. Learn merges on the unique pieces. Pair counts are kept incrementally: a merge
   rewrites only the words that contain its pair (an inverted index finds them) and
   adjusts the counts of the pairs around each occurrence; a max-heap with lazy
   invalidation yields the next most frequent pair. Ties go to the smallest
   (left id, right id), so training is deterministic.
A pair whose bytes already form a token (reachable by two different merges) is
skipped: token bytes stay unique, which the tiktoken engine requires.

    tok = train_bpe(["the cat sat", "on the mat"], vocab_size=300)
"""

from __future__ import annotations

import gc
import heapq
import os
from collections import Counter, defaultdict
from typing import Callable, Iterable

from smedjan.errors import UserError
from smedjan.formats import constants as C
from smedjan.parallel import ordered_map
from smedjan.tokenizer.core import Tokenizer

JOB_CHARS = 2_000_000

_worker_regex = None


def _init_worker(pattern: str) -> None:
    global _worker_regex
    import regex

    _worker_regex = regex.compile(C.PRETOKENIZER_PATTERNS[pattern])


def _count_job(texts: list[str]) -> dict[bytes, int]:
    counts: Counter[str] = Counter()
    findall = _worker_regex.findall
    for t in texts:
        counts.update(findall(t))
    return {k.encode("utf-8", "surrogatepass"): v for k, v in counts.items()}


def _jobs(texts: Iterable[str]) -> Iterable[list[str]]:
    job: list[str] = []
    size = 0
    for t in texts:
        job.append(t)
        size += len(t)
        if size >= JOB_CHARS:
            yield job
            job, size = [], 0
    if job:
        yield job


def count_pieces(texts: Iterable[str], pattern: str = C.DEFAULT_PRETOKENIZER, workers: int | None = None,
                 on_chars: Callable[[int], None] | None = None) -> Counter[bytes]:
    """Count the pre-tokenizer pieces of `texts` (as UTF-8 bytes)."""
    workers = workers or os.cpu_count() or 1
    total: Counter[bytes] = Counter()

    def jobs_with_progress():
        for job in _jobs(texts):
            if on_chars:
                on_chars(sum(len(t) for t in job))
            yield job

    if workers <= 1:
        _init_worker(pattern)
        for job in jobs_with_progress():
            total.update(_count_job(job))
        return total
    for part in ordered_map(_count_job, jobs_with_progress(), workers, _init_worker, (pattern,)):
        total.update(part)
    return total


def learn_merges(piece_counts: dict[bytes, int], n_merges: int,
                 on_merge: Callable[[int], None] | None = None) -> tuple[list[bytes], list[tuple[int, int]]]:
    """BPE merges over weighted pieces. Returns (token bytes by id, merges by rank)."""
    # Millions of small tuples and lists, none of them cyclic: the cyclic garbage
    # collector would only re-scan them over and over.
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _learn_merges(piece_counts, n_merges, on_merge)
    finally:
        if enabled:
            gc.enable()


def _learn_merges(piece_counts: dict[bytes, int], n_merges: int,
                  on_merge: Callable[[int], None] | None) -> tuple[list[bytes], list[tuple[int, int]]]:
    words: list[list[int]] = []
    counts: list[int] = []
    for piece, c in piece_counts.items():
        if len(piece) >= 2:
            words.append(list(piece))
            counts.append(c)

    pair_counts: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)
    for wi, w in enumerate(words):
        c = counts[wi]
        for p in zip(w, w[1:]):
            pair_counts[p] += c
            where[p].add(wi)
    heap = [(-c, p) for p, c in pair_counts.items()]
    heapq.heapify(heap)

    tokens = [bytes([b]) for b in range(256)]
    token_set = set(tokens)
    merges: list[tuple[int, int]] = []
    skipped: set[tuple[int, int]] = set()

    while len(merges) < n_merges and heap:
        negc, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -negc or pair in skipped:
            continue  # stale heap entry
        a, b = pair
        new_bytes = tokens[a] + tokens[b]
        if new_bytes in token_set:
            skipped.add(pair)
            continue
        t = len(tokens)
        tokens.append(new_bytes)
        token_set.add(new_bytes)
        merges.append(pair)

        delta: dict[tuple[int, int], int] = defaultdict(int)
        for wi in where.pop(pair):
            w = words[wi]
            n = len(w)
            i = 0
            new: list[int] = []
            found = False
            while i < n:
                if i + 1 < n and w[i] == a and w[i + 1] == b:
                    new.append(t)
                    i += 2
                    found = True
                else:
                    new.append(w[i])
                    i += 1
            if not found:
                continue
            c = counts[wi]
            for p in zip(w, w[1:]):
                delta[p] -= c
            for p in zip(new, new[1:]):
                delta[p] += c
                if t in p:
                    where[p].add(wi)
            words[wi] = new
        for p, d in delta.items():
            if d == 0:
                continue
            c = pair_counts[p] + d
            if c > 0:
                pair_counts[p] = c
                heapq.heappush(heap, (-c, p))
            else:
                pair_counts.pop(p, None)
                where.pop(p, None) if p == pair else None
        pair_counts.pop(pair, None)
        if on_merge:
            on_merge(len(merges))
    return tokens, merges


def min_vocab_size(specials: list[str]) -> int:
    return 256 + len(specials)


def check_vocab_size(vocab_size: int, specials: list[str]) -> None:
    if vocab_size < min_vocab_size(specials):
        raise UserError(f"--vocab-size {vocab_size} is too small: the 256 bytes and {len(specials)} special "
                        f"tokens need at least {min_vocab_size(specials)}")


def tokenizer_from_counts(counts: dict[bytes, int], vocab_size: int, pattern: str = C.DEFAULT_PRETOKENIZER,
                          specials: list[str] | None = None,
                          on_merge: Callable[[int], None] | None = None) -> Tokenizer:
    """Learn merges on piece counts and append the special tokens."""
    specials = list(C.SPECIAL_TOKENS if specials is None else specials)
    check_vocab_size(vocab_size, specials)
    if not counts:
        raise UserError("the corpus is empty: no text to train on")
    tokens, merges = learn_merges(counts, vocab_size - min_vocab_size(specials), on_merge)
    special_ids = {}
    for s in specials:
        special_ids[s] = len(tokens)
        tokens.append(s.encode())
    return Tokenizer(tokens, merges, special_ids, pattern, source="trained")


def train_bpe(texts: Iterable[str], vocab_size: int, pattern: str = C.DEFAULT_PRETOKENIZER,
              specials: list[str] | None = None, workers: int | None = None) -> Tokenizer:
    """Train a tokenizer of at most `vocab_size` tokens (bytes + merges + specials)."""
    check_vocab_size(vocab_size, list(C.SPECIAL_TOKENS if specials is None else specials))
    if pattern not in C.PRETOKENIZER_PATTERNS:
        raise UserError(f"unknown pre-tokenizer {pattern!r}; known: {', '.join(C.PRETOKENIZER_PATTERNS)}")
    return tokenizer_from_counts(count_pieces(texts, pattern, workers), vocab_size, pattern, specials)
