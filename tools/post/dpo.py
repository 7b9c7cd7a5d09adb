"""`smedjan dpo`: direct preference optimisation of a (fine-tuned) checkpoint on preference pairs.

    smedjan dpo --checkpoint sft.bin --data data/dpo/instruction-data-with-preference.json.zst \\
        --beta 0.1 --loss sigmoid --output dpo.bin
"""

from __future__ import annotations

import typer

from smedjan.cli import JsonOpt, emit, make_app, run_app, tool
from smedjan.post.dpo import DpoArgs
from smedjan.post.run import RUN_HELP

app = make_app()

_HELP = (
    "Train a checkpoint on preference pairs with DPO. Losses (h = policy log-ratio of chosen over rejected minus "
    "the reference's): sigmoid -(1-e) log s(beta h) - e log s(-beta h) (e = --label-smoothing, cDPO); ipo "
    "(h - 1/(2 beta))^2 on per-token average log-probs; hinge max(0, 1 - beta h); robust (rDPO). The reference "
    "log-probs (the starting --checkpoint, or --ref-checkpoint) are computed once before training, so no reference "
    "model stays in memory; --resume recomputes and checks them. Logs rewards/chosen, rewards/rejected, "
    "rewards/margins and rewards/accuracies per step (the summary gives their means over the last 10 steps). "
    "Formats, detected per file (or --format): prompt ({prompt, chosen, "
    "rejected}), hh-rlhf ({chosen, rejected} full Human/Assistant transcripts; the shared part is the prompt), "
    "alpaca ({instruction, input, chosen, rejected}) and sharegpt ({conversations, chosen: {from, value}, "
    "rejected}). Empty or identical replies are skipped and counted; pairs longer than --max-len are truncated "
    "(prompt from the left, keeping <|bos|>, then the replies) or skipped, and counted. " + RUN_HELP)


@app.command(help=_HELP)
@tool("dpo", DpoArgs)
def dpo(args: DpoArgs, json: JsonOpt = False) -> None:
    from smedjan.post.dpo import run
    from smedjan.post.run import finish
    from smedjan.training.driver import fault_steps_from_env

    summary, result = run(args, fault_steps=fault_steps_from_env())
    finish(result, str(args.output))
    if summary.pop("rank") == 0:
        emit(summary, json)
    if result.reason == "interrupted":
        raise typer.Exit(130)


def main() -> None:
    run_app(app, "smedjan-dpo")


if __name__ == "__main__":
    main()
