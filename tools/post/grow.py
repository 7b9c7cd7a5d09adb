"""`smedjan grow`: expand a trained model into a larger one that computes the same function.

    smedjan grow --checkpoint small.bin --size medium --output grown.bin
    smedjan grow --checkpoint final.bin --size custom --layers 8 --output deeper.bin
    smedjan train --init grown.bin --dataset train.bin --tokenizer tokenizer.bin ...
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from smedjan.cli import JsonOpt, emit, log, make_app, run_app, tool

app = make_app()


@app.command(help=(
    "Grow a trained checkpoint into a larger architecture whose logits at step 0 equal the original's (up to float "
    "rounding); continue training it with `smedjan train --init`. Width: new residual dimensions start at zero "
    "(zero embedding columns and zero rows in every wo/w2), readers get small random weights there, and the "
    "grown model's norm_eps is eps x dim/dim' with the norm gains scaled by sqrt(dim/dim'), which keeps RMSNorm "
    "exact. New heads and FFN units get random inputs and zero outputs. Depth: old layers keep their order, each "
    "new layer copies the one before it with wo and w2 zeroed (an identity block). Refused (one line, nothing "
    "written): any smaller dimension, another head_dim (dim / heads), fewer query heads per key/value head, "
    "other RoPE frequencies, or no change at all. With --size custom, unset --dim/--layers/--heads keep the "
    "checkpoint's; --kv-heads defaults to keeping its grouping."))
@tool("grow")
def grow(
    checkpoint: Annotated[Path, typer.Option(
        "--checkpoint", "-c", help="Trained model (final.bin, sft.bin, a state).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Grown model checkpoint to write.")],
    size: Annotated[str, typer.Option(
        "--size", help="Target: tiny, small, medium, large, max (presets) or custom.")] = "custom",
    dim: Annotated[Optional[int], typer.Option("--dim", help="Target width (--size custom).")] = None,
    layers: Annotated[Optional[int], typer.Option("--layers", help="Target number of blocks (--size custom).")] = None,
    heads: Annotated[Optional[int], typer.Option("--heads", help="Target attention heads (--size custom).")] = None,
    ffn_mult: Annotated[Optional[float], typer.Option(
        "--ffn-mult", help="SwiGLU hidden = ffn-mult x dim, rounded up to 256 (default: 8/3, or the checkpoint's "
        "hidden size when dim is unchanged).")] = None,
    kv_heads: Annotated[Optional[int], typer.Option(
        "--kv-heads", help="Target key/value heads (default: keep the checkpoint's query heads per kv head).")] = None,
    max_seq_len: Annotated[Optional[int], typer.Option(
        "--max-seq-len", help="Target context (default: the checkpoint's; RoPE frequencies must not change).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the new (random) reader weights.")] = 0,
    json: JsonOpt = False,
) -> None:
    from smedjan.post.grow import grow_checkpoint

    log(f"growing {checkpoint}")
    emit(grow_checkpoint(str(checkpoint), str(output), size=size, dim=dim, layers=layers, heads=heads,
                         ffn_mult=ffn_mult, kv_heads=kv_heads, max_seq_len=max_seq_len, seed=seed), json)


def main() -> None:
    run_app(app, "smedjan-grow")


if __name__ == "__main__":
    main()
