"""`smedjan decode`: token ids -> text.

    smedjan decode -t tokenizer.bin 9906 1917
    smedjan encode -t tokenizer.bin "hi" | smedjan decode -t tokenizer.bin
"""

from __future__ import annotations

import json as _json
import re
import sys
from typing import Annotated, Optional

import typer

from smedjan.cli import TokenizerOpt, make_app, run_app, tool

app = make_app()


@app.command(help="Decode ids given as arguments or on stdin (space/comma separated, or a JSON list). "
                  "Bytes that are not valid UTF-8 print as U+FFFD; --bytes writes the raw bytes instead.")
@tool("decode")
def decode(
    tokenizer: TokenizerOpt,
    ids: Annotated[Optional[list[str]], typer.Argument(help="Token ids; read from stdin if absent.")] = None,
    raw_bytes: Annotated[bool, typer.Option("--bytes", help="Write the exact bytes, not replaced UTF-8.")] = False,
    skip_special: Annotated[bool, typer.Option("--skip-special", help="Leave special tokens out.")] = False,
) -> None:
    from smedjan.errors import UserError
    from smedjan.tokenizer import Tokenizer

    tok = Tokenizer.load(tokenizer)
    text = " ".join(ids) if ids else sys.stdin.read()
    stripped = text.strip()
    try:
        if stripped.startswith("["):
            values = _json.loads(stripped)
            if not all(isinstance(v, int) for v in values):
                raise ValueError("not all integers")
        else:
            values = [int(v) for v in re.split(r"[\s,]+", stripped) if v]
    except ValueError as e:
        raise UserError(f"ids must be integers (space/comma separated or a JSON list): {e}") from None
    tok.check_ids(values)
    if skip_special:
        special = set(tok.specials.values())
        values = [v for v in values if v not in special]
    if raw_bytes:
        sys.stdout.buffer.write(tok.decode_bytes(values))
        sys.stdout.flush()
    else:
        sys.stdout.write(tok.decode(values))
        if sys.stdout.isatty():
            sys.stdout.write("\n")


def main() -> None:
    run_app(app, "smedjan-decode")


if __name__ == "__main__":
    main()
