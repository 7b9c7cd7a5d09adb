"""`smedjan prepare` end to end against HF `tokenizers` encode_batch, in one run, on the same text.

smedjan: read the corpus files (.jsonl.zst, .txt, ...), encode on all cores, write train.bin
(atomic, fsynced): the whole stage, in-process. HF: `Tokenizer.encode_batch` (its Rayon
thread pool on all cores) of the same documents, already in memory, then their ids with a
BOS per document into one numpy array. HF is not charged for reading or writing files,
so the ratio is conservative. Both use the same vocabulary: the HF tokenizer is built from
our tokenizer.bin (`to_hf_tokenizer_json`), and the run checks that both produce the same ids.

    python bench/prepare.py                 # all of ../shared/data/pretrain (~20 MB), best of 3
    python bench/prepare.py --quick         # 3 MB, one repeat: a smoke run
    python bench/prepare.py --tokenizer runs/medium/tokenizer.bin --corpus data/pretrain
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

# encode_batch parallelizes only when allowed; set before `tokenizers` is imported.
os.environ["TOKENIZERS_PARALLELISM"] = "true"

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "lib"))

import numpy as np  # noqa: E402

from smedjan.data.prepare import default_workers, prepare  # noqa: E402
from smedjan.data.sources import iter_chunks  # noqa: E402
from smedjan.formats.tokens import TokenFile  # noqa: E402
from smedjan.tokenizer import Tokenizer, train_bpe  # noqa: E402
from smedjan.tokenizer.hf import to_hf_tokenizer_json  # noqa: E402


def hf_encode(hf, chunks: list[tuple[str, bool]], bos_id: int) -> np.ndarray:
    """What prepare computes, with HF: BOS + ids per document, as one uint16/uint32 array."""
    encs = hf.encode_batch([t for t, _ in chunks], add_special_tokens=False)
    bos = np.array([bos_id], dtype=np.uint32)
    parts = []
    for (_, new_doc), e in zip(chunks, encs):
        if new_doc:
            parts.append(bos)
        parts.append(np.asarray(e.ids, dtype=np.uint32))
    return np.concatenate(parts)


def best_of(repeat: int, fn) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=REPO.parent / "shared" / "data" / "pretrain")
    ap.add_argument("--tokenizer", type=Path, help="tokenizer.bin (default: train an 8192-token BPE on the corpus)")
    ap.add_argument("--workers", type=int, default=default_workers(), help="smedjan workers (default: all cores)")
    ap.add_argument("--repeat", type=int, default=3, help="best of this many runs per engine")
    ap.add_argument("--quick", action="store_true", help="3 MB of text, one repeat")
    args = ap.parse_args()
    max_chars = 3_000_000 if args.quick else None
    repeat = 1 if args.quick else args.repeat

    if args.tokenizer:
        tok = Tokenizer.load(args.tokenizer)
    else:
        texts = (c.text for c in iter_chunks([args.corpus], max_chars=3_000_000))
        tok = train_bpe(texts, vocab_size=8192)
    import tokenizers

    hf = tokenizers.Tokenizer.from_str(json.dumps(to_hf_tokenizer_json(tok)))

    # The same documents, in memory, for HF (the chunks smedjan encodes; long ones are cut
    # only where the pre-tokenizer splits, so the ids are the same as whole documents').
    chunks = [(c.text, c.new_doc) for c in iter_chunks([args.corpus], max_chars=max_chars)]
    nbytes = sum(len(t.encode("utf-8", "surrogatepass")) for t, _ in chunks)
    n_docs = sum(n for _, n in chunks)
    print(f"corpus: {args.corpus} ({nbytes / 1e6:.1f} MB of UTF-8 text, {n_docs} documents); "
          f"vocab {tok.vocab_size}; {os.cpu_count()} cores, smedjan workers {args.workers}; best of {repeat}",
          flush=True)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "train.bin"
        for workers in sorted({args.workers, 1}, reverse=True):
            t, _ = best_of(repeat, lambda: prepare([args.corpus], tok, out, max_chars=max_chars, workers=workers))
            rows.append((f"smedjan prepare (read+encode+write), {workers} worker(s)", t))
        ours = np.asarray(TokenFile.open(out).tokens)
        t, theirs = best_of(repeat, lambda: hf_encode(hf, chunks, tok.bos_id))
        rows.append(("HF tokenizers encode_batch -> numpy (text in memory), all threads", t))
    same = np.array_equal(ours, theirs)

    hf_mbs = nbytes / rows[-1][1] / 1e6
    print()
    print("engine | seconds | MB/s | vs HF")
    print("--- | --- | --- | ---")
    for name, t in rows:
        mbs = nbytes / t / 1e6
        print(f"{name} | {t:.2f} | {mbs:.1f} | {mbs / hf_mbs:.2f}x")
    print(f"\nsame ids from both: {same} ({len(ours)} tokens)")
    print("target: smedjan prepare (all workers) >= 1.0x HF")
    if not same:
        sys.exit("smedjan and HF produced different ids: the comparison is void")


if __name__ == "__main__":
    main()
