"""`smedjan import-bpe`: make a tokenizer.bin from GPT-2 style BPE files.

    smedjan import-bpe --vocab vocab.json --merges merges.txt --output gpt2.bin
    smedjan import-bpe --vocab encoder.json --merges vocab.bpe --output gpt2.bin   # OpenAI's names
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from smedjan.cli import JsonOpt, emit, make_app, run_app, tool

app = make_app()


@app.command(help=(
    "Import a GPT-2 byte-level BPE (HF vocab.json + merges.txt, or OpenAI encoder.json + vocab.bpe) "
    "as a tokenizer.bin that encodes exactly as GPT-2 does (GPT-2 split regex). "
    "smedjan's chat special tokens are appended after the vocabulary unless --no-chat-specials."
))
@tool("import-bpe")
def import_bpe(
    vocab: Annotated[Path, typer.Option("--vocab", help="vocab.json or encoder.json: token string -> id.")],
    merges: Annotated[Path, typer.Option("--merges", help="merges.txt or vocab.bpe: one merge per line, by rank.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="tokenizer.bin to write.")] = Path("tokenizer.bin"),
    chat_specials: Annotated[bool, typer.Option("--chat-specials/--no-chat-specials",
                                                help="Append smedjan's <|bos|> and chat tokens.")] = True,
    json: JsonOpt = False,
) -> None:
    from smedjan.io import check_output_path
    from smedjan.tokenizer.hf import from_gpt2_files

    check_output_path(output)
    tok = from_gpt2_files(vocab, merges, chat_specials=chat_specials)
    tok.save(output)
    emit({"output": str(output), "vocab_size": tok.vocab_size, "merges": tok.n_merges, "pattern": tok.pattern,
          "specials": len(tok.specials), "fingerprint": tok.fingerprint}, json)


def main() -> None:
    run_app(app, "smedjan-import-bpe")


if __name__ == "__main__":
    main()
