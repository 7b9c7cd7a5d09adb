"""`smedjan merge`: weight-space average of checkpoints of one model.

    smedjan merge run1/final.bin run2/final.bin run3/final.bin --output merged.bin
    smedjan merge a.bin b.bin --weights 0.7 --weights 0.3 --output merged.bin
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from smedjan.cli import JsonOpt, emit, log, make_app, run_app, tool

app = make_app()


@app.command(help=(
    "Average the weights of two or more checkpoints (model soup / checkpoint averaging): sum_i w_i * theta_i "
    "with the weights normalised to sum to 1 (default: equal). Every checkpoint must have the same model config "
    "and tokenizer; the first difference is refused, naming the field, before anything is written. The average is "
    "computed in float64 and stored in the first checkpoint's dtype; the output carries the config and tokenizer. "
    "Training states (state_N.bin) count by their model weights."))
@tool("merge")
def merge(
    checkpoints: Annotated[list[Path], typer.Argument(help="Checkpoints to average (two or more).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Merged model checkpoint to write.")],
    weights: Annotated[Optional[list[float]], typer.Option(
        "--weights", "-w", help="Weight of each checkpoint, in order (repeat once per checkpoint); normalised to "
        "sum 1. Default: equal.")] = None,
    json: JsonOpt = False,
) -> None:
    from smedjan.post.merge import merge_checkpoints

    log(f"merging {len(checkpoints)} checkpoints")
    emit(merge_checkpoints([str(p) for p in checkpoints], str(output), weights), json)


def main() -> None:
    run_app(app, "smedjan-merge")


if __name__ == "__main__":
    main()
