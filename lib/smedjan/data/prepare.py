"""Corpus -> train.bin (and val.bin): stream, encode in parallel, write atomically.

The pipeline, for a corpus of any size in bounded memory:
1. The main process reads documents as chunks (`smedjan.data.sources.iter_chunks`:
   streaming .txt/.jsonl/.parquet, .zst/.gz) and numbers the documents 0, 1, 2, ...
   in input order.
2. Each document goes to train or val. With `val_fraction`, document i goes to val
   when blake2b-64(seed, i) / 2**64 < val_fraction (two little-endian u64 hashed): a
   function of the seed and the document's index only, so the split is the same for
   any worker count and on every re-run. With `val_inputs`, val is those files instead.
3. Chunks are grouped into jobs of about `JOB_CHARS` characters (a size that does not
   depend on the worker count) and encoded by a pool of worker processes; each job
   comes back as one token array per output, BOS placed before each document's first
   chunk. Results are consumed in submission order with at most 2 jobs per worker in
   flight, so output order is fixed and memory stays bounded (`smedjan.parallel.ordered_map`,
   which stops at once and leaves no worker behind on Ctrl-C, SIGTERM or a killed worker).
4. Each output is a `TokenWriter` streaming to a temporary file; both are committed
   (header written, fsync, rename) only after the whole corpus encoded without error.
Chunks of one document are cut only where the pre-tokenizer splits anyway, so the file
holds exactly, per document, [BOS] + tokenizer.encode(document).

Processes, not threads: tiktoken releases the GIL while encoding, but the per-chunk
bookkeeping around it does not, and the main thread also needs the GIL to read and parse
the corpus. Measured on the 20 MB shared pretrain set with 2 workers (2 cores), a
process pool was as fast or faster than a thread pool and used less CPU in total
(1.5-1.9 vs 1.8-2.1 CPU seconds), and it scales with no GIL in the way.

    result = prepare(["data/pretrain"], tok, "train.bin", val_output="val.bin", val_fraction=0.01)
    result.outputs["train"].n_tokens
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from smedjan.data.sources import TEXT_SUFFIXES, Chunk, ReadStats, base_suffix, expand_inputs, iter_chunks
from smedjan.errors import UserError
from smedjan.formats.tokens import TokenWriter, dtype_for_vocab
from smedjan.io import check_output_path
from smedjan.parallel import fork_context, ordered_map

# Characters of text per encode job: large enough to amortize the hand-off to a worker,
# small enough that 2 jobs per worker in flight stay a few MB. SMEDJAN_PREP_JOB_CHARS
# overrides it (tests use small jobs to interleave workers on a small corpus); the output
# does not depend on it.
JOB_CHARS = int(os.environ.get("SMEDJAN_PREP_JOB_CHARS", 1 << 20))
MAX_SOURCES_RECORDED = 64  # the header lists at most this many input files (and hashes all)
TRAIN, VAL = 0, 1


def default_workers() -> int:
    """The cores this process may run on (respects affinity masks and container limits)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def is_val_doc(seed: int, doc_index: int, fraction: float) -> bool:
    """Whether document `doc_index` goes to val: blake2b-64 of (seed, index), as a fraction of 2**64."""
    h = hashlib.blake2b(struct.pack("<QQ", seed, doc_index), digest_size=8).digest()
    return int.from_bytes(h, "little") < fraction * 2.0**64


# ---------------------------------------------------------------- encoding workers
# Per-process state: (encode function, bos id, output dtype). Set in the parent before a
# fork (inherited), or rebuilt from the tokenizer's bytes under spawn.
_state: tuple | None = None


def _make_state(tok, dtype: np.dtype) -> tuple:
    # encode_numpy hands back a buffer, not a list of Python ints.
    return tok.encode_numpy, tok.bos_id, dtype


def _init_worker(tok_bytes: bytes | None, dtype_str: str) -> None:
    global _state
    if tok_bytes is not None:  # spawn: nothing was inherited
        from smedjan.tokenizer import Tokenizer

        _state = _make_state(Tokenizer.from_bytes(tok_bytes), np.dtype(dtype_str))


def _encode_job(items: list[tuple[str, bool, int]]) -> tuple[np.ndarray, np.ndarray]:
    """[(text, starts a document, output)] -> (train tokens, val tokens), in item order."""
    encode, bos_id, dtype = _state
    bos = np.array([bos_id], dtype=np.uint32)
    parts: tuple[list, list] = ([], [])
    for text, new_doc, dest in items:
        if new_doc:
            parts[dest].append(bos)
        parts[dest].append(encode(text))
    return tuple(np.concatenate(p).astype(dtype) if p else np.empty(0, dtype) for p in parts)  # type: ignore


def encode_jobs(jobs: Iterable[list], tok, dtype: np.dtype, workers: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Encode jobs in order: inline for one worker, else in worker processes, 2 jobs per worker in flight."""
    global _state
    if workers <= 1:
        _state = _make_state(tok, dtype)
        for job in jobs:
            yield _encode_job(job)
        return
    if fork_context().get_start_method() == "fork":
        # workers inherit the ready tokenizer; they only run the encoder.
        tok_bytes = None
        _state = _make_state(tok, dtype)
    else:
        tok_bytes = tok.to_bytes()
    yield from ordered_map(_encode_job, jobs, workers, _init_worker, (tok_bytes, dtype.str))


# ---------------------------------------------------------------- the whole stage
@dataclass
class OutputInfo:
    path: str
    n_tokens: int = 0
    n_docs: int = 0
    n_chars: int = 0
    dtype: str = ""


@dataclass
class PrepareResult:
    outputs: dict[str, OutputInfo] = field(default_factory=dict)
    files: int = 0
    chars: int = 0
    replaced_bytes: int = 0
    skipped_empty: int = 0
    val_split: str | None = None  # "hash" or "tail" (too few documents), None without --val-fraction


def sources_meta(files: list) -> dict:
    """How an artifact records the files it was made from: the first names, their count and a
    hash of them all; for hub inputs also the dataset, the revision asked for and its commit."""
    from smedjan.data.hub import records

    names = [str(p) for p in files]
    meta = {
        "sources": names[:MAX_SOURCES_RECORDED],
        "n_sources": len(names),
        "sources_sha256": hashlib.sha256("\n".join(names).encode("utf-8", "surrogateescape")).hexdigest(),
    }
    hub = records(files)
    if hub:
        meta["hub"] = hub
    return meta


class _SplitFailed(Exception):
    """The hash draw left a split empty; raised inside the writers, so nothing is committed."""

    def __init__(self, chars: int, docs: int, to_val: int):
        self.chars, self.docs, self.to_val = chars, docs, to_val


def _tail_split(chunks: Iterator[Chunk], target: int, cut: list[int]) -> Iterator[tuple[str, bool, int]]:
    """(text, new_doc, output) with every character from the first line start at or after
    character `target` (counted over the corpus in order) in VAL, the rest in TRAIN. A
    document's start is a line start; with none left, the cut is at the first whitespace at
    or after `target`, else at `target`. The document the cut falls in ends there in TRAIN
    and its rest is a document of VAL. The absolute cut is left in `cut[0]`."""
    off = 0
    it = iter(chunks)
    cur = next(it, None)
    while cur is not None:
        nxt = next(it, None)  # one chunk of lookahead: is there any text after this one?
        text, new_doc = cur.text, cur.new_doc
        if cut:
            yield text, new_doc, VAL
        elif off >= target:  # a chunk starts a document or a line (chunks are cut after newlines)
            cut.append(off)
            yield text, True, VAL
        elif off + len(text) > target:
            lo = target - off
            nl = text.find("\n", max(lo - 1, 0))
            if nl != -1 and nl + 1 < len(text):
                p = nl + 1
            elif nxt is not None:
                p = len(text)  # the next chunk starts the next line
            else:
                p = next((j for j in range(lo, len(text)) if text[j].isspace()), lo)
            if p > 0:
                yield text[:p], new_doc, TRAIN
            if p < len(text):
                cut.append(off + p)
                yield text[p:], True, VAL
        else:
            yield text, new_doc, TRAIN
        off += len(text)
        cur = nxt


def prepare(inputs: list, tok, output: str | os.PathLike, *,
            val_output: str | os.PathLike | None = None, val_fraction: float | None = None,
            val_inputs: list | None = None, seed: int = 0,
            text_field: str = "text", text_column: str = "text", txt_split: str = "file",
            max_chars: int | None = None, max_docs: int | None = None, workers: int | None = None,
            on_chars: Callable[[int], None] | None = None,
            on_warning: Callable[[str], None] | None = None) -> PrepareResult:
    """Encode `inputs` with `tok` into `output` (and `val_output`); see the module docstring.

    With `val_output`, val gets `val_inputs` if given, else a `val_fraction` (default 0.01)
    of the documents: by the hash of each document's index, or, when the corpus has too few
    documents for that (the draw leaves val or train empty), the last `val_fraction` of its
    text from a line boundary on, said through `on_warning`. `max_chars` and `max_docs` cap
    each of the two corpora (inputs, val_inputs). Raises UserError, leaving no file, on bad
    input or an empty result.
    """
    # --- every check that needs no reading comes first
    out = check_output_path(output)
    vout = check_output_path(val_output) if val_output is not None else None
    if vout is None and (val_fraction is not None or val_inputs):
        raise UserError("--val-fraction and --val-input need --val-output")
    if val_fraction is not None and val_inputs:
        raise UserError("give --val-fraction or --val-input, not both")
    if vout is not None and not val_inputs:
        val_fraction = 0.01 if val_fraction is None else val_fraction
        if not 0.0 < val_fraction < 1.0:
            raise UserError(f"--val-fraction must be between 0 and 1 (exclusive), not {val_fraction}")
    if vout is not None and vout.resolve() == out.resolve():
        raise UserError(f"{out}: --output and --val-output name the same file")
    if not 0 <= seed < 2**64:
        raise UserError(f"--seed must be in 0..2**64-1, not {seed}")
    if workers is not None and workers < 1:
        raise UserError(f"--workers must be at least 1, not {workers}")
    if max_docs is not None and max_docs < 1:
        raise UserError(f"--max-docs must be at least 1, not {max_docs}")
    if txt_split not in ("file", "blank", "line"):
        raise UserError(f"--txt-split must be file, blank or line, not {txt_split!r}")
    workers = default_workers() if workers is None else workers
    files = expand_inputs(inputs)
    val_files = expand_inputs(val_inputs) if val_inputs else []
    targets = {out.resolve(): out}
    if vout is not None:
        targets[vout.resolve()] = vout
    for f in files + val_files:
        if isinstance(f, Path) and f.resolve() in targets:
            raise UserError(f"{targets[f.resolve()]}: output would overwrite an input")
    bos_id = tok.bos_id  # a tokenizer without <|bos|> is refused here, before any work
    dtype = dtype_for_vocab(tok.vocab_size)
    common = dict(text_field=text_field, text_column=text_column, txt_split=txt_split, max_chars=max_chars,
                  max_docs=max_docs)
    what = " ".join(str(x) for x in inputs)
    warn = on_warning or (lambda message: None)
    by_hash = vout is not None and not val_inputs
    advice = "--txt-split blank or line makes a document of each paragraph or line; --val-input takes val from other files"

    def encode(tail_at: int | None) -> PrepareResult:
        """One pass over the corpus: val by hash (tail_at None) or from character tail_at on."""
        stats, val_stats = ReadStats(), ReadStats()
        result = PrepareResult()
        names = {TRAIN: "train", VAL: "val"}
        infos = {TRAIN: OutputInfo(str(out), dtype=dtype.name)}
        if vout is not None:
            infos[VAL] = OutputInfo(str(vout), dtype=dtype.name)
        cut: list[int] = []
        flags = {"text_field": text_field, "text_column": text_column, "txt_split": txt_split,
                 "max_chars": max_chars, "max_docs": max_docs, "seed": seed,
                 "val_fraction": val_fraction if by_hash else None,
                 "val_split": ("tail" if tail_at is not None else "hash") if by_hash else None}
        if tail_at is not None:
            flags["val_from_char"] = 2**64 - 1  # reserves header room; the cut is known at the end

        def chunks() -> Iterator[tuple[str, bool, int]]:
            """(text, new_doc, output) for every chunk of the corpus, in input order."""
            if tail_at is not None:
                yield from _tail_split(iter_chunks(files, stats=stats, **common), tail_at, cut)
                return
            doc = -1
            dest = TRAIN
            for c in iter_chunks(files, stats=stats, **common):
                if c.new_doc:
                    doc += 1
                    dest = VAL if by_hash and is_val_doc(seed, doc, val_fraction) else TRAIN
                yield c.text, c.new_doc, dest
            for c in (iter_chunks(val_files, stats=val_stats, **common) if val_files else ()):
                yield c.text, c.new_doc, VAL

        def jobs() -> Iterator[list]:
            job: list = []
            size = 0
            for item in chunks():
                job.append(item)
                size += len(item[0])
                infos[item[2]].n_chars += len(item[0])
                if size >= JOB_CHARS:
                    if on_chars:
                        on_chars(size)
                    yield job
                    job, size = [], 0
            if job:
                if on_chars:
                    on_chars(size)
                yield job

        def writer(dest: int, path: Path, sources: list) -> TokenWriter:
            extra = {"split": names[dest], "created_by": "smedjan prepare", "tokenizer_pattern": tok.pattern,
                     **sources_meta(sources), **flags}
            return TokenWriter(path, vocab_size=tok.vocab_size, tokenizer_fingerprint=tok.fingerprint,
                               bos_id=bos_id, extra=extra)

        from contextlib import ExitStack

        with ExitStack() as stack:
            writers = {TRAIN: stack.enter_context(writer(TRAIN, out, files))}
            if vout is not None:
                writers[VAL] = stack.enter_context(writer(VAL, vout, val_files or files))
            for parts in encode_jobs(jobs(), tok, dtype, workers):
                for dest, w in writers.items():
                    w.write(parts[dest])
            # Empty results are refused inside the `with`: nothing gets committed.
            n_train, n_val = writers[TRAIN].n_docs, (writers[VAL].n_docs if vout is not None else 0)
            if by_hash and tail_at is None and n_train + n_val and not (n_train and n_val):
                raise _SplitFailed(stats.chars, n_train + n_val, n_val)
            if by_hash and tail_at is not None and not (n_train and n_val):
                raise UserError(f"{what}: {stats.chars} characters are too few to split off --val-fraction "
                                f"{val_fraction} for {vout}; give more text, or {advice}")
            if n_train == 0:
                raise UserError(f"{what}: no text to prepare (every document is empty)")
            if vout is not None and n_val == 0:
                raise UserError(f"{' '.join(map(str, val_inputs or []))}: no text to prepare for --val-output "
                                "(every document is empty)")
            if cut:  # where val begins, in characters of the corpus
                writers[TRAIN].meta["val_from_char"] = writers[VAL].meta["val_from_char"] = cut[0]
            for dest, w in writers.items():
                infos[dest].n_tokens, infos[dest].n_docs = w.n_tokens, w.n_docs
        result.outputs = {names[d]: i for d, i in infos.items()}
        result.files = stats.files + val_stats.files
        result.chars = stats.chars + val_stats.chars
        result.replaced_bytes = stats.replaced_bytes + val_stats.replaced_bytes
        result.skipped_empty = stats.skipped_empty + val_stats.skipped_empty
        result.val_split = flags["val_split"]
        return result

    def tail_target(chars: int) -> int:
        return chars - max(1, round(val_fraction * chars))

    pct = f"{val_fraction * 100:g}%" if by_hash else ""
    if by_hash and txt_split == "file" and all(isinstance(f, Path) and base_suffix(f) in TEXT_SUFFIXES
                                               for f in files):
        # Each file is one document: when no index below the file count is drawn, the hash
        # split cannot give val anything; count the text (no encoding) and cut its tail.
        if not any(is_val_doc(seed, i, val_fraction) for i in range(len(files))):
            n = len(files)
            warn(f"{what}: {n} .txt file{'s are' if n > 1 else ' is'} at most {n} document{'s' * (n > 1)} with "
                 f"--txt-split file, too few for --val-fraction {val_fraction}: {vout} gets the last {pct} of the "
                 f"text instead, from a line boundary on ({advice})")
            chars = sum(len(c.text) for c in iter_chunks(files, **common))
            return encode(tail_target(chars))
    try:
        return encode(None)
    except _SplitFailed as e:
        warn(f"{what}: {e.docs} document(s) are too few for --val-fraction {val_fraction}: the hash draw put "
             f"{'all' if e.to_val else 'none'} of them in val, so {vout} gets the last {pct} of the text instead, "
             f"from a line boundary on ({advice})")
        return encode(tail_target(e.chars))
