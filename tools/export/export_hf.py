"""`smedjan export-hf`: a checkpoint -> a Hugging Face LlamaForCausalLM folder.

    smedjan export-hf --checkpoint final.bin --output hf-model/
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from smedjan.cli import JsonOpt, emit, make_app, run_app, tool, warn

app = make_app()


@app.command(help=(
    "Write a folder that transformers' AutoModelForCausalLM and AutoTokenizer load: config.json "
    "(LlamaForCausalLM, rope_scaling mapped back), model.safetensors (HF tensor names, the checkpoint's "
    "dtype), tokenizer.json, tokenizer_config.json (with the chat template) and generation_config.json. "
    "An existing folder is replaced only once the new one is complete."
))
@tool("export-hf")
def export_hf(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", "-c", help="smedjan checkpoint (final.bin, ...).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder to write.")],
    tokenizer: Annotated[Optional[Path], typer.Option(
        "--tokenizer", "-t", help="tokenizer.bin, for a checkpoint that carries none.")] = None,
    json: JsonOpt = False,
) -> None:
    from smedjan.errors import UserError
    from smedjan.export.hf_write import export_hf as run
    from smedjan.export.load import load_source

    parent = output.parent if str(output.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"{output}: output folder {parent} does not exist")
    if output.exists() and not output.is_dir():
        raise UserError(f"{output}: exists and is not a folder")
    src = load_source(checkpoint, tokenizer)
    for w in src.warnings:
        warn(w)
    emit(run(src, output), json)


def main() -> None:
    run_app(app, "smedjan-export-hf")


if __name__ == "__main__":
    main()
