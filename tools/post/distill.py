"""`smedjan distill`: train a (smaller) student on a teacher's logits over a token file.

    smedjan distill --teacher final.bin --size small --dataset train.bin --val-dataset val.bin \\
        --temperature 2 --alpha 0.5 --steps 5000 --output student.bin
"""

from __future__ import annotations

import typer

from smedjan.cli import JsonOpt, emit, make_app, run_app, tool
from smedjan.post.distill import DistillArgs
from smedjan.post.run import RUN_HELP

app = make_app()

_HELP = (
    "Logit distillation: the student minimises alpha * T^2 * KL(teacher || student) at temperature T "
    "(--temperature) plus (1 - alpha) * cross-entropy on the next token (--alpha), over windows of a token file "
    "(train.bin from `smedjan prepare`). The student is new (--size, or --size custom with --dim/--layers/--heads, "
    "at the teacher's vocabulary) or --init's model. Teacher, student and dataset must share a tokenizer; a "
    "mismatch is refused before any work. With --val-dataset the student's val loss and bits per byte are "
    "evaluated (the teacher's too, once, for comparison). " + RUN_HELP.replace("--epochs", "--epochs (over the "
                                                                               "dataset's tokens)", 1))


@app.command(help=_HELP)
@tool("distill", DistillArgs)
def distill(args: DistillArgs, json: JsonOpt = False) -> None:
    from smedjan.post.distill import run
    from smedjan.post.run import finish
    from smedjan.training.driver import fault_steps_from_env

    summary, result = run(args, fault_steps=fault_steps_from_env())
    finish(result, str(args.output))
    if summary.pop("rank") == 0:
        emit(summary, json)
    if result.reason == "interrupted":
        raise typer.Exit(130)


def main() -> None:
    run_app(app, "smedjan-distill")


if __name__ == "__main__":
    main()
