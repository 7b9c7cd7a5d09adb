"""`smedjan import-hf`: a Hugging Face Llama folder -> a smedjan model checkpoint.

    smedjan import-hf --model-dir ../shared/data/model/tiny-random-llama --output llama.bin
    smedjan import-hf --model-dir my-llama/ --tokenizer tokenizer.bin --output llama.bin
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from smedjan.cli import JsonOpt, emit, log, make_app, run_app, tool, warn

app = make_app()


@app.command(help=(
    "Import a Hugging Face LlamaForCausalLM (or MistralForCausalLM) folder: config.json and "
    "model.safetensors or the shards of model.safetensors.index.json, in F32, BF16 or F16. Tied or untied "
    "head, grouped-query attention, rope_theta, rope_scaling (linear, dynamic, yarn, llama3) and head_dim "
    "are mapped onto smedjan's model; weights keep their dtype, so bf16 stays exact. The tokenizer comes "
    "from --tokenizer, else from the folder's tokenizer.json when it is a byte-level BPE smedjan encodes "
    "exactly; otherwise the checkpoint is written without one (later tools then need --tokenizer)."
))
@tool("import-hf")
def import_hf(
    model_dir: Annotated[Path, typer.Option("--model-dir", "-m", help="Hugging Face model folder.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Checkpoint to write (model.bin).")],
    tokenizer: Annotated[Optional[Path], typer.Option(
        "--tokenizer", "-t", help="tokenizer.bin to embed; its vocabulary size must equal the model's.")] = None,
    json: JsonOpt = False,
) -> None:
    from smedjan.export.hf_write import import_hf as run

    log(f"importing {model_dir}")
    summary, warnings = run(model_dir, output, tokenizer)
    for w in warnings:
        warn(w)
    emit(summary, json)


def main() -> None:
    run_app(app, "smedjan-import-hf")


if __name__ == "__main__":
    main()
