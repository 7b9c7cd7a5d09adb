"""`smedjan sft`: supervised fine-tuning of a pretrained checkpoint on conversations.

    smedjan sft --checkpoint final.bin --data data/sft/instruction-data.json.zst \\
        --data data/sft/dolly_hhrlhf_train_small.jsonl.zst --epochs 2 --lr 1e-4 --output sft.bin
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

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
    "Fine-tune a checkpoint on conversations, with the loss on assistant tokens only (each reply and its "
    "<|assistant_end|>), in smedjan's one chat format. Formats, detected per file from its first record (or forced "
    "with --format): messages ({messages: [{role, content}]}), sharegpt ({conversations: [{from, value}]}, "
    "human/gpt/system), alpaca ({instruction, input, output}) and prompt-response ({prompt, response}; the prompt "
    "is the user turn verbatim). Examples are padded per example, not packed: no attention crosses examples. "
    "A malformed record stops the run with its file:line; a conversation with no assistant turn or an empty reply "
    "is skipped and counted (refused only when none is usable). " + RUN_HELP)


@app.command(help=_HELP)
@tool("sft")
def sft(
    checkpoint: Annotated[Path, typer.Option(
        "--checkpoint", "-c", help="Pretrained model (final.bin or a state_N.bin); its tokenizer needs chat tokens.")],
    data: DataOpt,
    output: OutputOpt,
    format: Annotated[str, typer.Option(
        "--format", help="auto, messages, sharegpt, alpaca or prompt-response.")] = "auto",
    val_data: ValDataOpt = None,
    val_fraction: ValFractionOpt = 0.05,
    max_len: MaxLenOpt = None,
    too_long: TooLongOpt = "truncate",
    batch_size: BatchSizeOpt = 8,
    grad_accum: GradAccumOpt = 1,
    steps: StepsOpt = None,
    epochs: EpochsOpt = 1.0,
    lr: LrOpt = 1e-4,
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
    from smedjan.post.run import finish
    from smedjan.post.sft import SftArgs, run
    from smedjan.training.pretrain import fault_steps_from_env

    args = SftArgs(**shared(locals()), checkpoint=str(checkpoint), data=paths(data), format=format,
                   val_data=paths(val_data), val_fraction=val_fraction, max_len=max_len, too_long=too_long)
    summary, result = run(args, fault_steps=fault_steps_from_env())
    finish(result, str(output))
    if summary.pop("rank") == 0:
        emit(summary, json)
    if result.reason == "interrupted":
        raise typer.Exit(130)


def main() -> None:
    run_app(app, "smedjan-sft")


if __name__ == "__main__":
    main()
