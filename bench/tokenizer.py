"""smedjan's tokenizer against HF `tokenizers`, in one run, on the same text.

Trains both byte-level BPEs on the same ~20 MB corpus at each vocabulary size, then
measures single-thread encode speed and compression (bytes/token) on held-out text.

    python bench/tokenizer.py                  # ../shared/data/pretrain, vocab 8192 and 32768
    python bench/tokenizer.py --quick          # 3 MB, vocab 8192: a smoke run

Held out: c4_demo and wikitext-2 valid (about 1.9 MB), never seen by either trainer.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# HF encodes in a thread pool unless told otherwise; the encode column is one thread.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "lib"))

from smedjan.data.sources import expand_inputs, iter_chunks  # noqa: E402
from smedjan.formats import constants as C  # noqa: E402
from smedjan.tokenizer import train_bpe  # noqa: E402

HELD_OUT = ("c4_demo.jsonl.zst", "valid.txt.zst")


def load(corpus: Path, max_bytes: int | None) -> tuple[list[str], list[str]]:
    train, held = [], []
    size = 0
    for f in expand_inputs([corpus]):
        target = held if f.name in HELD_OUT else train
        for chunk in iter_chunks([f]):
            if target is train and max_bytes and size >= max_bytes:
                break
            target.append(chunk.text)
            if target is train:
                size += len(chunk.text.encode())
    return train, held


def train_hf(docs: list[str], vocab_size: int):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(ignore_merges=True))
    # The same split regex as ours, then byte-level mapping: a like-for-like comparison.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(C.PRETOKENIZER_PATTERNS["llama3"]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=C.SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer=trainer)
    return tok


def encode_speed(encode, docs: list[str], repeat: int = 3) -> tuple[float, int]:
    """Best-of-`repeat` MB/s of encoding `docs` one after another (one thread), and the token count."""
    nbytes = sum(len(d.encode()) for d in docs)
    best, n = float("inf"), 0
    for _ in range(repeat):
        t = time.perf_counter()
        n = sum(len(encode(d)) for d in docs)
        best = min(best, time.perf_counter() - t)
    return nbytes / best / 1e6, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=REPO.parent / "shared" / "data" / "pretrain")
    ap.add_argument("--vocab", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--quick", action="store_true", help="3 MB of training text and vocab 8192 only")
    args = ap.parse_args()
    if args.quick:
        args.vocab = [8192]
    train, held = load(args.corpus, 3_000_000 if args.quick else None)
    train_mb = sum(len(d.encode()) for d in train) / 1e6
    held_bytes = sum(len(d.encode()) for d in held)
    print(f"training text: {train_mb:.1f} MB in {len(train)} documents; held-out: {held_bytes / 1e6:.1f} MB; "
          f"{os.cpu_count()} cores", flush=True)
    rows = []
    for vocab in args.vocab:
        t = time.perf_counter()
        ours = train_bpe(train, vocab)
        t_ours = time.perf_counter() - t
        t = time.perf_counter()
        hf = train_hf(train, vocab)
        t_hf = time.perf_counter() - t
        mbs_ours, n_ours = encode_speed(ours.encode, held)
        mbs_hf, n_hf = encode_speed(lambda s: hf.encode(s, add_special_tokens=False).ids, held)
        rows.append((vocab, t_ours, t_hf, mbs_ours, mbs_hf, held_bytes / n_ours, held_bytes / n_hf))
    print()
    head = ("vocab", "train smedjan s", "train HF s", "time ratio", "encode smedjan MB/s", "encode HF MB/s",
            "bytes/tok smedjan", "bytes/tok HF", "compression vs HF")
    print(" | ".join(head))
    print(" | ".join("---" for _ in head))
    for vocab, to, th, mo, mh, bo, bh in rows:
        print(f"{vocab} | {to:.2f} | {th:.2f} | {to / th:.2f}x | {mo:.1f} | {mh:.1f} | {bo:.3f} | {bh:.3f} | "
              f"{(bo / bh - 1) * 100:+.2f}%")
    print("\ntargets: training time <= 1.5x HF; encode >= 10 MB/s on one thread; bytes/token within 1% of HF")


if __name__ == "__main__":
    main()
