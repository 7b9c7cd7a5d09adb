"""`smedjan tokenizer-export`: write a tokenizer.bin in another project's format.

    smedjan tokenizer-export --tokenizer tokenizer.bin --format hf --output tokenizer.json
"""

from __future__ import annotations

import json as _json
from pathlib import Path
from typing import Annotated

import typer

from smedjan.cli import JsonOpt, TokenizerOpt, emit, make_app, run_app, tool

app = make_app()


@app.command(help=(
    "Export a tokenizer: --format hf writes a tokenizer.json that HF `tokenizers` loads and that encodes "
    "identically; --format tiktoken writes tiktoken's rank file (base64 token, rank per line)."
))
@tool("tokenizer-export")
def tokenizer_export(
    tokenizer: TokenizerOpt,
    output: Annotated[Path, typer.Option("--output", "-o", help="File to write.")],
    format: Annotated[str, typer.Option("--format", help="hf (tokenizer.json) or tiktoken.")] = "hf",
    json: JsonOpt = False,
) -> None:
    from smedjan.errors import UserError
    from smedjan.io import atomic_write, check_output_path
    from smedjan.tokenizer import Tokenizer
    from smedjan.tokenizer.hf import to_hf_tokenizer_json, to_tiktoken_ranks

    if format not in ("hf", "tiktoken"):
        raise UserError(f"--format {format!r} is unknown; choose hf or tiktoken")
    check_output_path(output)
    tok = Tokenizer.load(tokenizer)
    if format == "hf":
        text = _json.dumps(to_hf_tokenizer_json(tok), ensure_ascii=False, indent=1)
    else:
        text = to_tiktoken_ranks(tok)
    with atomic_write(output, "w", encoding="utf-8") as f:
        f.write(text)
    emit({"output": str(output), "format": format, "vocab_size": tok.vocab_size, "fingerprint": tok.fingerprint}, json)


def main() -> None:
    run_app(app, "smedjan-tokenizer-export")


if __name__ == "__main__":
    main()
