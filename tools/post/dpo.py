"""`smedjan dpo`: direct preference optimisation of a (fine-tuned) checkpoint on preference pairs.

    smedjan dpo --checkpoint sft.bin --data data/dpo/instruction-data-with-preference.json.zst \\
        --beta 0.1 --loss sigmoid --output dpo.bin
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from smedjan.cli import JsonOpt, emit, make_app, run_app, tool
from smedjan_tools.post.common import (RUN_HELP, BatchSizeOpt, Beta2Opt, CheckpointDirOpt, CheckpointEveryOpt,
                                       CompileOpt, DataOpt, DeviceOpt, EpochsOpt, EvalEveryOpt, GradAccumOpt,
                                       GradClipOpt, KeepOpt, LrOpt, LrScheduleOpt, MaxBadOpt, MaxLenOpt, MinLrOpt,
                                       OptimizerOpt, OutputOpt, PatienceOpt, PrecisionOpt, ResumeOpt, SeedOpt,
                                       StepsOpt, TooLongOpt, ValDataOpt, ValFractionOpt, WarmdownOpt, WarmupOpt,
                                       WeightDecayOpt, paths, shared)

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
@tool("dpo")
def dpo(
    checkpoint: Annotated[Path, typer.Option(
        "--checkpoint", "-c", help="Model to train (sft.bin); also the reference unless --ref-checkpoint.")],
    data: DataOpt,
    output: OutputOpt,
    ref_checkpoint: Annotated[Optional[Path], typer.Option(
        "--ref-checkpoint", help="Reference model for the log-prob ratios (default: --checkpoint); same tokenizer.")
    ] = None,
    beta: Annotated[float, typer.Option("--beta", help="Strength of the KL pull towards the reference.")] = 0.1,
    loss: Annotated[str, typer.Option("--loss", help="sigmoid, ipo, hinge or robust.")] = "sigmoid",
    label_smoothing: Annotated[float, typer.Option(
        "--label-smoothing", help="Assumed fraction of flipped labels, in [0, 0.5) (sigmoid and robust).")] = 0.0,
    format: Annotated[str, typer.Option("--format", help="auto, prompt, hh-rlhf, alpaca or sharegpt.")] = "auto",
    val_data: ValDataOpt = None,
    val_fraction: ValFractionOpt = 0.05,
    max_len: MaxLenOpt = None,
    max_prompt_len: Annotated[Optional[int], typer.Option(
        "--max-prompt-len", help="Truncation keeps at least this many prompt tokens (default: --max-len / 2).")
    ] = None,
    too_long: TooLongOpt = "truncate",
    batch_size: BatchSizeOpt = 8,
    grad_accum: GradAccumOpt = 1,
    steps: StepsOpt = None,
    epochs: EpochsOpt = 1.0,
    lr: LrOpt = 5e-6,
    min_lr: MinLrOpt = None,
    warmup: WarmupOpt = None,
    warmdown: WarmdownOpt = 0.2,
    lr_schedule: LrScheduleOpt = "cosine",
    optimizer: OptimizerOpt = "adamw",
    adamw_beta2: Beta2Opt = 0.95,
    weight_decay: WeightDecayOpt = 0.0,
    grad_clip: GradClipOpt = 1.0,
    max_bad_steps: MaxBadOpt = 8,
    checkpoint_dir: CheckpointDirOpt = None,
    checkpoint_every: CheckpointEveryOpt = 1000,
    keep: KeepOpt = 3,
    resume: ResumeOpt = None,
    seed: SeedOpt = 0,
    eval_every: EvalEveryOpt = None,
    patience: PatienceOpt = 0,
    device: DeviceOpt = None,
    precision: PrecisionOpt = "auto",
    compile: CompileOpt = False,
    json: JsonOpt = False,
) -> None:
    from smedjan.post.dpo import DpoArgs, run
    from smedjan.post.run import finish
    from smedjan.training.pretrain import fault_steps_from_env

    args = DpoArgs(**shared(locals()), checkpoint=str(checkpoint),
                   ref_checkpoint=str(ref_checkpoint) if ref_checkpoint else None, data=paths(data), format=format,
                   val_data=paths(val_data), val_fraction=val_fraction, max_len=max_len,
                   max_prompt_len=max_prompt_len, too_long=too_long, beta=beta, loss=loss,
                   label_smoothing=label_smoothing)
    summary, result = run(args, fault_steps=fault_steps_from_env())
    finish(result, str(output))
    if summary.pop("rank") == 0:
        emit(summary, json)
    if result.reason == "interrupted":
        raise typer.Exit(130)


def main() -> None:
    run_app(app, "smedjan-dpo")


if __name__ == "__main__":
    main()
