"""`smedjan train`: pretrain a model on a token file (train.bin) from `smedjan prepare`.

    smedjan train --dataset train.bin --tokenizer tokenizer.bin --size medium \\
        --batch-size 4 --seq-len 512 --steps 50000 --lr 3e-4 --warmup 2000 \\
        --lr-schedule cosine --checkpoint-dir checkpoints/ --val-dataset val.bin
    torchrun --standalone --nproc-per-node 8 -m smedjan_tools.cli train ...   # DDP
"""

from __future__ import annotations

import typer

from smedjan.cli import JsonOpt, emit, make_app, run_app, tool
from smedjan.training.pretrain import TrainArgs

app = make_app()

_HELP = (
    "Pretrain a decoder-only transformer on a token file. Writes state_N.bin every --checkpoint-every steps "
    "(model, optimizer, RNG and data position: --resume continues bit for bit), final.bin (weights + config + "
    "tokenizer) at the end, best.bin at each validation improvement, and metrics.jsonl, all in --checkpoint-dir. "
    "Horizon: --steps, else --target-flops, else --target-param-data-ratio, else 50000 steps. "
    "Schedules (after a linear --warmup): cosine decays to --min-lr; wsd holds --lr then cools down over the "
    "last --warmdown fraction with 1-sqrt; trapezoid the same with a linear cooldown; wso holds --lr, no decay; "
    "invsqrt decays as sqrt(warmup/step) down to --min-lr. A step with a non-finite loss or gradient is skipped "
    "and counted; --max-bad-steps in a row stop the run (exit 2) with the last state intact. SIGTERM or Ctrl-C "
    "finish the step, write a state and exit (0 for SIGTERM, 130 for Ctrl-C). Under `torchrun --nproc-per-node N` "
    "it runs DDP (NCCL on GPU, gloo on CPU): --batch-size is per process, data is sharded by rank, rank 0 writes."
)


@app.command(help=_HELP)
@tool("train", TrainArgs)
def train(args: TrainArgs, json: JsonOpt = False) -> None:
    from smedjan.errors import UserError
    from smedjan.training.pretrain import fault_steps_from_env, run

    summary, result = run(args, fault_steps=fault_steps_from_env())
    if result.reason == "diverged":
        raise UserError(f"{args.dataset}: {result.message}")
    if summary.pop("rank") == 0:
        emit(summary, json)
    if result.reason == "interrupted":
        raise typer.Exit(130)


def main() -> None:
    run_app(app, "smedjan-train")


if __name__ == "__main__":
    main()
