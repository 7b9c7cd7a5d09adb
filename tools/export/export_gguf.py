"""`smedjan export-gguf`: a checkpoint (or an HF Llama folder) -> a GGUF file llama.cpp runs.

    smedjan export-gguf --checkpoint final.bin --output model-q4_0.gguf --quant q4_0
    smedjan export-gguf --checkpoint ../shared/data/model/tiny-random-llama --output m.gguf --no-vocab
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from smedjan.cli import JsonOpt, emit, make_app, progress, run_app, tool, warn

app = make_app()


@app.command(help=(
    "Write a GGUF v3 file (architecture llama) that llama.cpp loads and runs with no other file: "
    "hyperparameters, the tokenizer (gpt2 BPE with our split regex, specials as CONTROL tokens, "
    "bos=<|bos|>, eos=<|assistant_end|> and every other token smedjan stops at in llama.cpp's end-of-generation "
    "keys, add_bos_token=true) and the chat template (Jinja). A model with a part llama.cpp's llama "
    "architecture lacks (QK-norm, ReLU^2, MLA, block-sparse or sliding-window attention, logit soft-capping) "
    "is refused with one line naming it. "
    "--quant f32 keeps every tensor f32; q8_0 and q4_0 quantize the matrices as ggml does, bit for bit. "
    "Norm gains always stay f32. With q4_0 the output head (the token embedding, when tied) is q8_0 "
    "unless --pure. A matrix whose rows are not a multiple of 32 values stays f16 (f32 beyond f16's "
    "range), with a warning. --checkpoint may also be a Hugging Face LlamaForCausalLM folder "
    "(config.json + safetensors); without a tokenizer.json there, pass --tokenizer or --no-vocab."
))
@tool("export-gguf")
def export_gguf(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", "-c", help="smedjan checkpoint (final.bin, sft.bin, "
                                             "...) or a Hugging Face model folder.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="GGUF file to write.")],
    quant: Annotated[str, typer.Option("--quant", "-q", help="Tensor type of the matrices: f32, q8_0 or q4_0.")] = "f32",
    tokenizer: Annotated[Optional[Path], typer.Option(
        "--tokenizer", "-t", help="tokenizer.bin to embed when the source has none (its vocabulary size must "
                                  "equal the model's); for a checkpoint it must equal the embedded one.")] = None,
    no_vocab: Annotated[bool, typer.Option(
        "--no-vocab", help="Write no tokenizer (tokenizer.ggml.model=none): llama.cpp loads the file and runs "
                           "it on token ids only.")] = False,
    pure: Annotated[bool, typer.Option("--pure", help="q4_0: quantize the output head as q4_0 too.")] = False,
    json: JsonOpt = False,
) -> None:
    from smedjan.export.gguf import export_gguf as run
    from smedjan.export.gguf import gguf_tensors
    from smedjan.export.load import load_source
    from smedjan.io import check_output_path

    check_output_path(output)
    src = load_source(checkpoint, tokenizer)
    with progress("writing tensors", total=len(gguf_tensors(src.config, str(checkpoint)))) as bar:
        summary = run(src, output, quant=quant, no_vocab=no_vocab, pure=pure,
                      on_tensor=lambda name: bar.advance(1), warn=warn)
    summary["fallback"] = ", ".join(summary["fallback"]) or "none"
    emit(summary, json)


def main() -> None:
    run_app(app, "smedjan-export-gguf")


if __name__ == "__main__":
    main()
