"""`smedjan encode`: text -> token ids, for use by hand and in shell pipes.

    smedjan encode -t tokenizer.bin "Hello world"          # 9906 1917
    echo "Hello" | smedjan encode -t tokenizer.bin --json   # [9906, 198]
"""

from __future__ import annotations

import json as _json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from smedjan.cli import JsonOpt, TokenizerOpt, make_app, run_app, tool

app = make_app()


@app.command(help="Encode TEXT (or --input FILE, or standard input) and print the ids, space-separated "
                  "(a JSON list with --json). Special-token spellings in the text are encoded as plain text.")
@tool("encode")
def encode(
    tokenizer: TokenizerOpt,
    text: Annotated[Optional[str], typer.Argument(help="Text to encode; read from --input or stdin if absent.")] = None,
    input: Annotated[Optional[Path], typer.Option("--input", "-i", help="UTF-8 text file to encode.")] = None,
    bos: Annotated[bool, typer.Option("--bos", help="Prepend the <|bos|> id.")] = False,
    json: JsonOpt = False,
) -> None:
    from smedjan.errors import UserError
    from smedjan.io import check_input_file
    from smedjan.tokenizer import Tokenizer

    tok = Tokenizer.load(tokenizer)
    if text is not None and input is not None:
        raise UserError("give TEXT or --input, not both")
    if input is not None:
        raw = check_input_file(input).read_bytes()
        text = raw.decode("utf-8", errors="replace")
    elif text is None:
        text = sys.stdin.read()
    ids = ([tok.bos_id] if bos else []) + tok.encode(text)
    print(_json.dumps(ids) if json else " ".join(map(str, ids)))


def main() -> None:
    run_app(app, "smedjan-encode")


if __name__ == "__main__":
    main()
