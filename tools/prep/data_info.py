"""`smedjan data-info`: what a token file (train.bin / val.bin) holds, with a few decoded samples.

    smedjan data-info train.bin --tokenizer tokenizer.bin
    smedjan data-info val.bin --samples 0 --verify --json
"""

from __future__ import annotations

import json as _json
from pathlib import Path
from typing import Annotated, Optional

import typer

from smedjan.cli import JsonOpt, emit, make_app, run_app, tool

app = make_app()

# How far past a sample's position to look for the next document start.
SEEK_TOKENS = 1 << 20


def _sample_positions(tf, n: int) -> list[tuple[int, bool]]:
    """n document starts spread over the file: (position, True); (position, False) when no
    BOS lies within SEEK_TOKENS of an even spot, which is then shown mid-document."""
    out: list[tuple[int, bool]] = []
    for i in range(n):
        spot = i * tf.n_tokens // n
        window = tf.read(spot, min(SEEK_TOKENS, tf.n_tokens - spot))
        hits = (window == tf.bos_id).nonzero()[0]
        pos = (spot + int(hits[0]), True) if len(hits) else (spot, False)
        if pos not in out:
            out.append(pos)
    return out


@app.command(help="Show a token file's tokens, documents, dtype, vocabulary size and tokenizer fingerprint, "
                  "and a few samples spread over the file: decoded with --tokenizer (which must be the one the "
                  "file was made with), else as token ids.")
@tool("data-info")
def data_info(
    file: Annotated[Path, typer.Argument(help="Token file (train.bin, val.bin) to inspect.")],
    tokenizer: Annotated[Optional[Path], typer.Option(
        "--tokenizer", "-t", help="tokenizer.bin to decode the samples with; ids are shown without it.")] = None,
    samples: Annotated[int, typer.Option("--samples", help="Number of samples to show.")] = 3,
    sample_tokens: Annotated[int, typer.Option("--sample-tokens", help="Tokens shown per sample, at most "
                                                "(a sample also stops at the next document).")] = 48,
    verify: Annotated[bool, typer.Option("--verify", help="Read the whole file: check its checksum, that every "
                                          "id is in the vocabulary, and the document count.")] = False,
    json: JsonOpt = False,
) -> None:
    from smedjan.errors import UserError
    from smedjan.formats.tokens import TokenFile

    if samples < 0 or sample_tokens < 1:
        raise UserError("--samples must be >= 0 and --sample-tokens >= 1")
    tf = TokenFile.open(file)
    tok = None
    if tokenizer is not None:
        from smedjan.tokenizer import Tokenizer

        tok = Tokenizer.load(tokenizer)
        tf.check_tokenizer(tok, tokenizer)
    if verify:
        tf.verify()
    m = tf.meta
    summary: dict = {
        "file": str(file),
        "tokens": tf.n_tokens,
        "documents": tf.n_docs,
        "tokens_per_document": round(tf.n_tokens / tf.n_docs, 1),
        "dtype": m["dtype"],
        "vocab_size": tf.vocab_size,
        "fingerprint": tf.fingerprint,
        "bos_id": tf.bos_id,
        "bytes": tf.data_offset + tf.n_tokens * tf.dtype.itemsize,
    }
    for key in ("split", "n_sources", "txt_split", "text_field", "text_column", "max_chars", "max_docs",
                "val_fraction", "val_split", "val_from_char", "seed"):
        if key in m:
            summary[key] = m[key]
    for i, rec in enumerate(m.get("hub") or []):  # hub inputs: which commit of which dataset
        summary[f"hub {i + 1}"] = f"{rec.get('input')} = {rec.get('dataset')}@{rec.get('sha')} ({rec.get('files')} files)"
    if verify:
        summary["verified"] = "ok (checksum, id range, document count)"
    shown = []
    for pos, at_doc in _sample_positions(tf, samples):
        ids = tf.read(pos, min(sample_tokens, tf.n_tokens - pos))
        # stop at the next document's BOS (the first id is this document's own BOS)
        nxt = (ids[1:] == tf.bos_id).nonzero()[0]
        ids = ids[: 1 + int(nxt[0])] if len(nxt) else ids
        entry = {"position": pos, "document_start": at_doc, "ids": [int(i) for i in ids]}
        if tok is not None:
            entry["text"] = tok.decode([int(i) for i in ids if i != tf.bos_id])
        shown.append(entry)
    if json:
        summary["samples"] = shown
        emit(summary, True)
        return
    if tok is None and shown:
        summary["samples"] = "token ids (pass --tokenizer to decode)"
    for k, e in enumerate(shown, 1):
        where = f"@{e['position']}" + ("" if e["document_start"] else " (mid-document)")
        value = _json.dumps(e["text"], ensure_ascii=False) if "text" in e else " ".join(map(str, e["ids"]))
        summary[f"sample {k} {where}"] = value
    emit(summary, False)


def main() -> None:
    run_app(app, "smedjan-data-info")


if __name__ == "__main__":
    main()
