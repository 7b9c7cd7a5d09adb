"""`smedjan prepare`: encode a corpus into train.bin (and val.bin) for training.

    smedjan prepare --input data/pretrain --tokenizer tokenizer.bin --output train.bin \\
        --val-output val.bin --val-fraction 0.01
    smedjan prepare --input "hf://datasets/karpathy/fineweb-edu-100b-shuffle/shard_00000.parquet" \\
        --max-docs 100 --tokenizer tokenizer.bin --output train.bin
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from smedjan.cli import (InputsOpt, JsonOpt, MaxCharsOpt, MaxDocsOpt, TextColumnOpt, TextFieldOpt, TokenizerOpt,
                         TxtSplitOpt, WorkersOpt, emit, log, make_app, progress, run_app, tool, warn)

app = make_app()


@app.command(help=(
    "Encode a corpus with a tokenizer into a token file (train.bin) for training, and optionally a "
    "validation file. Each document becomes <|bos|> followed by its tokens; ids are stored as uint16 "
    "when the vocabulary fits (<= 65536 tokens), else uint32. Documents: a .txt file is one document "
    "(--txt-split), a .jsonl line or a .parquet row is one document; hf://datasets/... inputs are read from "
    "the Hugging Face hub cache, each file downloaded when it is reached. With --val-output, a document goes "
    "to val when a hash of (--seed, its index) falls under --val-fraction (default 0.01), or val is "
    "--val-input; a corpus with too few documents for the fraction (one .txt file) gives val the last "
    "--val-fraction of its text instead, from a line boundary on, and says so. The output is byte-identical for any --workers and on every re-run. Memory stays "
    "bounded: the corpus is streamed in and the tokens are streamed out."
))
@tool("prepare")
def prepare(
    input: InputsOpt,
    tokenizer: TokenizerOpt,
    output: Annotated[Path, typer.Option("--output", "-o", help="Token file to write (train.bin).")],
    val_output: Annotated[Optional[Path], typer.Option(
        "--val-output", help="Validation token file to write (val.bin); none if unset.")] = None,
    val_fraction: Annotated[Optional[float], typer.Option(
        "--val-fraction", help="Fraction of documents, drawn by a hash of (--seed, document index), that go "
                               "to --val-output. Default 0.01 when --val-output is given without --val-input.")] = None,
    val_input: Annotated[Optional[list[str]], typer.Option(
        "--val-input", help="Corpus for --val-output instead of a fraction of --input (file, folder or glob; "
                            "repeatable).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the train/val split.")] = 0,
    text_field: TextFieldOpt = "text",
    text_column: TextColumnOpt = "text",
    txt_split: TxtSplitOpt = "file",
    max_chars: MaxCharsOpt = None,
    max_docs: MaxDocsOpt = None,
    workers: WorkersOpt = None,
    json: JsonOpt = False,
) -> None:
    from smedjan.data import prepare as P
    from smedjan.io import check_output_path
    from smedjan.tokenizer import Tokenizer

    check_output_path(output)
    if val_output is not None:
        check_output_path(val_output)
    tok = Tokenizer.load(tokenizer)
    n_workers = P.default_workers() if workers is None else workers
    log(f"preparing {', '.join(map(str, input))} with {tokenizer} ({tok.vocab_size} tokens) on {n_workers} worker(s)")
    t0 = time.monotonic()
    with progress("encoding characters", total=max_chars) as bar:
        res = P.prepare(input, tok, output, val_output=val_output, val_fraction=val_fraction, val_inputs=val_input,
                        seed=seed, text_field=text_field, text_column=text_column, txt_split=txt_split,
                        max_chars=max_chars, max_docs=max_docs, workers=n_workers,
                        on_chars=lambda n: bar.advance(n), on_warning=warn)
    seconds = time.monotonic() - t0
    if res.replaced_bytes:
        warn(f"{res.replaced_bytes} bytes of invalid UTF-8 were replaced by U+FFFD")
    train = res.outputs["train"]
    summary = {
        "output": train.path,
        "tokens": train.n_tokens,
        "documents": train.n_docs,
        "dtype": train.dtype,
    }
    if "val" in res.outputs:
        val = res.outputs["val"]
        summary.update({"val_output": val.path, "val_tokens": val.n_tokens, "val_documents": val.n_docs,
                        "val_split": res.val_split or "input"})
    summary.update({
        "vocab_size": tok.vocab_size,
        "fingerprint": tok.fingerprint,
        "files": res.files,
        "chars": res.chars,
        "skipped_empty": res.skipped_empty,
        "workers": n_workers,
        "seconds": round(seconds, 2),
        "chars_per_second": round(res.chars / max(seconds, 1e-9)),
    })
    emit(summary, json)


def main() -> None:
    run_app(app, "smedjan-prepare")


if __name__ == "__main__":
    main()
