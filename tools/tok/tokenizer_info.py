"""`smedjan tokenizer-info`: what a tokenizer.bin holds, and how well it compresses a text.

    smedjan tokenizer-info tokenizer.bin --input data/pretrain/tinyshakespeare.txt.zst
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from smedjan.cli import JsonOpt, MaxCharsOpt, TextColumnOpt, TextFieldOpt, emit, make_app, run_app, tool

app = make_app()


@app.command(help="Show vocabulary size, fingerprint, pre-tokenizer and special tokens; with --input, "
                  "also bytes/token and chars/token on that text.")
@tool("tokenizer-info")
def tokenizer_info(
    tokenizer: Annotated[Path, typer.Argument(help="tokenizer.bin to inspect.")],
    input: Annotated[Optional[list[str]], typer.Option("--input", "-i", help="Text to measure compression on "
                                                        "(file, folder or glob; repeatable).")] = None,
    max_chars: MaxCharsOpt = 10_000_000,
    text_field: TextFieldOpt = "text",
    text_column: TextColumnOpt = "text",
    json: JsonOpt = False,
) -> None:
    from smedjan.data.sources import iter_chunks
    from smedjan.formats import constants as C
    from smedjan.tokenizer import Tokenizer

    tok = Tokenizer.load(tokenizer)
    summary = {
        "file": str(tokenizer),
        "vocab_size": tok.vocab_size,
        "merges": tok.n_merges,
        "pattern": tok.pattern,
        "llama_cpp_pre": C.GGUF_PRETOKENIZER[tok.pattern],
        "fingerprint": tok.fingerprint,
        "source": tok.source,
        "specials": ", ".join(f"{s}={i}" for s, i in sorted(tok.specials.items(), key=lambda kv: kv[1])),
        "chat_capable": tok.has_chat_tokens,
    }
    if input:
        n_bytes = n_chars = n_tokens = 0
        for chunk in iter_chunks(input, text_field=text_field, text_column=text_column, max_chars=max_chars):
            n_chars += len(chunk.text)
            n_bytes += len(chunk.text.encode("utf-8", "surrogatepass"))
            n_tokens += len(tok.encode(chunk.text))
        summary.update({
            "text_bytes": n_bytes,
            "text_tokens": n_tokens,
            "bytes_per_token": round(n_bytes / max(n_tokens, 1), 4),
            "chars_per_token": round(n_chars / max(n_tokens, 1), 4),
        })
    emit(summary, json)


def main() -> None:
    run_app(app, "smedjan-tokenizer-info")


if __name__ == "__main__":
    main()
