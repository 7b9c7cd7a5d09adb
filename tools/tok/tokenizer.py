"""`smedjan tokenizer`: train a byte-level BPE tokenizer from scratch.

    smedjan tokenizer --input data/pretrain --vocab-size 8192 --output tokenizer.bin
    smedjan tokenizer --input "hf://datasets/karpathy/fineweb-edu-100b-shuffle/shard_00000.parquet" \\
        --max-chars 200000000 --output tokenizer.bin
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from smedjan.cli import (InputsOpt, JsonOpt, MaxCharsOpt, MaxDocsOpt, TextColumnOpt, TextFieldOpt, TxtSplitOpt,
                         WorkersOpt, emit, log, make_app, progress, run_app, tool, warn)
from smedjan.formats import constants as C

app = make_app()


@app.command(help=(
    "Train a byte-level BPE tokenizer on a corpus and write tokenizer.bin. "
    f"Pre-tokenization uses the Llama-3 split by default (llama.cpp's {C.GGUF_PRETOKENIZER['llama3']!r}), "
    "so exported GGUF files tokenize identically in llama.cpp. "
    f"The special tokens {', '.join(C.SPECIAL_TOKENS)} take the last ids of the vocabulary."
))
@tool("tokenizer")
def tokenizer(
    input: InputsOpt,
    output: Annotated[Path, typer.Option("--output", "-o", help="tokenizer.bin to write.")],
    vocab_size: Annotated[int, typer.Option("--vocab-size", help="Total vocabulary: 256 bytes + merges + special tokens.")] = 8192,
    pattern: Annotated[str, typer.Option("--pattern", help="Pre-tokenizer split: llama3 or gpt2.")] = C.DEFAULT_PRETOKENIZER,
    max_chars: MaxCharsOpt = None,
    max_docs: MaxDocsOpt = None,
    text_field: TextFieldOpt = "text",
    text_column: TextColumnOpt = "text",
    txt_split: TxtSplitOpt = "file",
    workers: WorkersOpt = None,
    json: JsonOpt = False,
) -> None:
    from smedjan.data.prepare import sources_meta
    from smedjan.data.sources import ReadStats, expand_inputs, iter_chunks
    from smedjan.errors import UserError
    from smedjan.io import check_output_path
    from smedjan.tokenizer.train import check_vocab_size, count_pieces, min_vocab_size, tokenizer_from_counts

    # Every check that needs no work comes first: nothing is read before flags are valid.
    check_output_path(output)
    check_vocab_size(vocab_size, C.SPECIAL_TOKENS)
    if pattern not in C.PRETOKENIZER_PATTERNS:
        raise UserError(f"--pattern {pattern!r} is unknown; choose {' or '.join(C.PRETOKENIZER_PATTERNS)}")
    if max_docs is not None and max_docs < 1:
        raise UserError(f"--max-docs must be at least 1, not {max_docs}")
    files = expand_inputs(input)
    log(f"training a {vocab_size}-token BPE ({pattern} split) on {len(files)} file(s)")
    stats = ReadStats()
    t0 = time.monotonic()
    texts = (c.text for c in iter_chunks(files, text_field=text_field, text_column=text_column,
                                          txt_split=txt_split, max_chars=max_chars, max_docs=max_docs,
                                          stats=stats))
    with progress("counting pieces", total=max_chars) as bar:
        counts = count_pieces(texts, pattern, workers, on_chars=lambda n: bar.advance(n))
    n_merges = vocab_size - min_vocab_size(C.SPECIAL_TOKENS)
    with progress("merging", total=n_merges) as bar:
        tok = tokenizer_from_counts(counts, vocab_size, pattern,
                                    on_merge=lambda k: bar.update(completed=k) if k % 64 == 0 else None)
        bar.update(completed=tok.n_merges)
    if tok.vocab_size < vocab_size:
        warn(f"the corpus supports only {tok.n_merges} merges: the vocabulary has {tok.vocab_size} tokens, "
             f"not {vocab_size}")
    if stats.replaced_bytes:
        warn(f"{stats.replaced_bytes} bytes of invalid UTF-8 were replaced by U+FFFD")
    # The header records what was read (a cap may have stopped before the last files).
    tok.corpus = {**sources_meta([f for f in files if str(f) in stats.per_file]), "chars": stats.chars,
                  "documents": stats.documents, "max_chars": max_chars, "max_docs": max_docs}
    tok.save(output)
    emit({
        "output": str(output),
        "vocab_size": tok.vocab_size,
        "merges": tok.n_merges,
        "pattern": tok.pattern,
        "fingerprint": tok.fingerprint,
        "files": stats.files,
        "documents": stats.documents,
        "chars": stats.chars,
        "seconds": round(time.monotonic() - t0, 2),
    }, json)


def main() -> None:
    run_app(app, "smedjan-tokenizer")


if __name__ == "__main__":
    main()
