"""The umbrella command: `smedjan <tool> ...`.

Subcommands load lazily, so `smedjan tokenizer` never imports torch. To add a tool,
give its module an `app` (see `smedjan.cli.make_app`) and list it in COMMANDS.

    $ smedjan --help
    $ smedjan tokenizer --input data/ --vocab-size 8192 --output tokenizer.bin
"""

from __future__ import annotations

import importlib

import typer
from typer.core import TyperCommand, TyperGroup

from smedjan import __version__

# name -> (module, one-line help); the stage order of the pipeline.
COMMANDS: dict[str, tuple[str, str]] = {
    "tokenizer": ("smedjan_tools.tok.tokenizer", "Train a byte-level BPE tokenizer on a corpus."),
    "import-bpe": ("smedjan_tools.tok.import_bpe", "Import GPT-2 BPE files (vocab.json+merges.txt) as tokenizer.bin."),
    "tokenizer-export": ("smedjan_tools.tok.tokenizer_export", "Write a tokenizer.bin as HF tokenizer.json or tiktoken ranks."),
    "tokenizer-info": ("smedjan_tools.tok.tokenizer_info", "Show a tokenizer's vocabulary, fingerprint and compression."),
    "encode": ("smedjan_tools.tok.encode", "Encode text to token ids."),
    "decode": ("smedjan_tools.tok.decode", "Decode token ids to text."),
    "prepare": ("smedjan_tools.prep.prepare", "Encode a corpus into train.bin (and val.bin) for training."),
    "data-info": ("smedjan_tools.prep.data_info", "Show what a train.bin/val.bin holds, with decoded samples."),
    "train": ("smedjan_tools.train.train", "Pretrain a model on a token file (checkpoints, resume, DDP)."),
    "sizes": ("smedjan_tools.train.sizes", "Print exact parameter counts and FLOPs/token of every preset."),
    "bench": ("smedjan_tools.train.bench", "Measure forward and training tokens/s of a preset."),
    "sft": ("smedjan_tools.post.sft", "Fine-tune a checkpoint on conversations (loss on assistant tokens)."),
    "dpo": ("smedjan_tools.post.dpo", "Train a checkpoint on preference pairs with DPO (sigmoid, ipo, hinge, robust)."),
    "distill": ("smedjan_tools.post.distill", "Distil a teacher's logits into a (smaller) student on a token file."),
    "merge": ("smedjan_tools.post.merge", "Average the weights of checkpoints of one model."),
    "grow": ("smedjan_tools.post.grow", "Expand a trained model into a larger one computing the same function."),
    "export-gguf": ("smedjan_tools.export.export_gguf", "Write a checkpoint (or HF Llama folder) as a GGUF for llama.cpp."),
    "import-hf": ("smedjan_tools.export.import_hf", "Import a Hugging Face Llama folder as a smedjan checkpoint."),
    "export-hf": ("smedjan_tools.export.export_hf", "Write a checkpoint as a Hugging Face LlamaForCausalLM folder."),
    "generate": ("smedjan_tools.serve.generate", "Generate text from a checkpoint, streamed to stdout."),
    "chat": ("smedjan_tools.serve.chat", "Chat with a checkpoint in the terminal."),
    "serve": ("smedjan_tools.serve.serve", "Serve a checkpoint over an OpenAI-compatible HTTP API, with a web chat page."),
    "eval": ("smedjan_tools.eval.eval", "Evaluate a checkpoint: val loss/bpb, CORE tasks, HellaSwag, MMLU, long context."),
}


class LazyGroup(TyperGroup):
    """A typer group whose subcommands are imported only when one is run."""

    _listing = False

    def list_commands(self, ctx) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx, name: str):
        if name not in COMMANDS:
            return None
        if self._listing:
            # `smedjan --help` needs only names and one-line helps: no imports.
            return TyperCommand(name=name, help=COMMANDS[name][1])
        module = importlib.import_module(COMMANDS[name][0])
        cmd = typer.main.get_command(module.app)
        cmd.name = name
        return cmd

    def format_help(self, ctx, formatter) -> None:
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False


app = typer.Typer(cls=LazyGroup, add_completion=False, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]})


def _version(value: bool) -> None:
    if value:
        print(f"smedjan {__version__}")
        raise typer.Exit()


@app.callback()
def root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the version and exit.")) -> None:
    """smedjan: a smithy for small language models.

    corpus -> tokenizer -> prepare -> train -> sft -> dpo -> export-gguf -> serve.
    Run `smedjan TOOL --help` for a tool's flags and defaults.
    """


def main() -> None:
    app(prog_name="smedjan")


if __name__ == "__main__":
    main()
