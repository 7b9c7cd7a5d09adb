"""`smedjan sft`: supervised fine-tuning of a pretrained checkpoint on conversations.

    smedjan sft --checkpoint final.bin --data data/sft/instruction-data.json.zst \\
        --data data/sft/dolly_hhrlhf_train_small.jsonl.zst --epochs 2 --lr 1e-4 --output sft.bin
"""

from __future__ import annotations

import typer

from smedjan.cli import JsonOpt, emit, make_app, run_app, tool
from smedjan.post.sft import SftArgs
from smedjan.post.run import RUN_HELP

app = make_app()

_HELP = (
    "Fine-tune a checkpoint on conversations, with the loss on assistant tokens only (each reply and its "
    "<|assistant_end|>), in smedjan's one chat format. Formats, detected per file from its first record (or forced "
    "with --format): messages ({messages: [{role, content}]}), sharegpt ({conversations: [{from, value}]}, "
    "human/gpt/system), alpaca ({instruction, input, output}) and prompt-response ({prompt, response}; the prompt "
    "is the user turn verbatim). Examples are padded per example, not packed: no attention crosses examples. "
    "A malformed record stops the run with its file:line; a conversation with no assistant turn or an empty reply "
    "is skipped and counted (refused only when none is usable). " + RUN_HELP)


@app.command(help=_HELP)
@tool("sft", SftArgs)
def sft(args: SftArgs, json: JsonOpt = False) -> None:
    from smedjan.post.sft import run
    from smedjan.post.run import finish
    from smedjan.training.driver import fault_steps_from_env

    summary, result = run(args, fault_steps=fault_steps_from_env())
    finish(result, str(args.output))
    if summary.pop("rank") == 0:
        emit(summary, json)
    if result.reason == "interrupted":
        raise typer.Exit(130)


def main() -> None:
    run_app(app, "smedjan-sft")


if __name__ == "__main__":
    main()
