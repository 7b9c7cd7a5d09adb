"""`smedjan distill`: train a (smaller) student on a teacher's logits over a token file.

    smedjan distill --teacher final.bin --size small --dataset train.bin --val-dataset val.bin \\
        --temperature 2 --alpha 0.5 --steps 5000 --output student.bin
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from smedjan.cli import JsonOpt, emit, make_app, run_app, tool
from smedjan_tools.post.common import (RUN_HELP, BatchSizeOpt, Beta2Opt, CheckpointDirOpt, CheckpointEveryOpt,
                                       CompileOpt, DeviceOpt, EpochsOpt, EvalEveryOpt, GradAccumOpt, GradClipOpt,
                                       KeepOpt, LrOpt, LrScheduleOpt, MaxBadOpt, MinLrOpt, OptimizerOpt, OutputOpt,
                                       PatienceOpt, PrecisionOpt, ResumeOpt, SeedOpt, StepsOpt, WarmdownOpt,
                                       WarmupOpt, WeightDecayOpt, shared)

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
@tool("distill")
def distill(
    teacher: Annotated[Path, typer.Option("--teacher", help="Teacher model checkpoint (carries the tokenizer).")],
    dataset: Annotated[Path, typer.Option("--dataset", help="Token file to distil on (made with the teacher's "
                                                             "tokenizer).")],
    output: OutputOpt,
    size: Annotated[Optional[str], typer.Option(
        "--size", help="Student size: tiny, small, medium, large, max or custom (default small; not with --init).")
    ] = None,
    dim: Annotated[Optional[int], typer.Option("--dim", help="Student width (--size custom).")] = None,
    layers: Annotated[Optional[int], typer.Option("--layers", help="Student blocks (--size custom).")] = None,
    heads: Annotated[Optional[int], typer.Option("--heads", help="Student attention heads (--size custom).")] = None,
    ffn_mult: Annotated[Optional[float], typer.Option(
        "--ffn-mult", help="SwiGLU hidden = ffn-mult x dim, rounded up to 256 (--size custom; default 8/3).")] = None,
    kv_heads: Annotated[Optional[int], typer.Option(
        "--kv-heads", help="Student key/value heads (default: = heads).")] = None,
    max_seq_len: Annotated[Optional[int], typer.Option(
        "--max-seq-len", help="Student context (RoPE tables). Default: --seq-len.")] = None,
    init: Annotated[Optional[Path], typer.Option(
        "--init", help="Start the student from this checkpoint (same tokenizer as the teacher).")] = None,
    temperature: Annotated[float, typer.Option("--temperature", help="Softmax temperature T of the KL term.")] = 2.0,
    alpha: Annotated[float, typer.Option("--alpha", help="Weight of the KL term; 1 - alpha weighs the CE.")] = 0.5,
    val_dataset: Annotated[Optional[Path], typer.Option(
        "--val-dataset", help="Held-out token file: student (and teacher) val loss and bits per byte.")] = None,
    val_tokens: Annotated[int, typer.Option(
        "--val-tokens", help="Validation target tokens per evaluation (from the start of --val-dataset).")] = 262_144,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per sequence.")] = 256,
    bos_aligned: Annotated[bool, typer.Option(
        "--bos-aligned", help="Start every sequence at a document's BOS (default: random windows).")] = False,
    batch_size: BatchSizeOpt = 32,
    grad_accum: GradAccumOpt = 1,
    steps: StepsOpt = None,
    epochs: EpochsOpt = 1.0,
    lr: LrOpt = 3e-4,
    min_lr: MinLrOpt = None,
    warmup: WarmupOpt = None,
    warmdown: WarmdownOpt = 0.2,
    lr_schedule: LrScheduleOpt = "cosine",
    optimizer: OptimizerOpt = "adamw",
    adamw_beta2: Beta2Opt = 0.95,
    weight_decay: WeightDecayOpt = 0.1,
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
    from smedjan.post.distill import DistillArgs, run
    from smedjan.post.run import finish
    from smedjan.training.pretrain import fault_steps_from_env

    args = DistillArgs(**shared(locals()), teacher=str(teacher), dataset=str(dataset),
                       val_dataset=str(val_dataset) if val_dataset else None, init=str(init) if init else None,
                       size=size, dim=dim, layers=layers, heads=heads, ffn_mult=ffn_mult, kv_heads=kv_heads,
                       max_seq_len=max_seq_len, seq_len=seq_len, temperature=temperature, alpha=alpha,
                       val_tokens=val_tokens, bos_aligned=bos_aligned)
    summary, result = run(args, fault_steps=fault_steps_from_env())
    finish(result, str(output))
    if summary.pop("rank") == 0:
        emit(summary, json)
    if result.reason == "interrupted":
        raise typer.Exit(130)


def main() -> None:
    run_app(app, "smedjan-distill")


if __name__ == "__main__":
    main()
