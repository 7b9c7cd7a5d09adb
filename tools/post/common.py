"""Flags shared by `smedjan sft`, `dpo` and `distill`: the same names, meanings and help
texts as `smedjan train`'s (schedule, checkpoints, resume, device), defined once here.
Each tool picks its own defaults (fine-tuning wants a lower --lr than pretraining).

    def sft(..., lr: LrOpt = 1e-4, checkpoint_dir: CheckpointDirOpt = None, ...):
        args = SftArgs(**shared(locals()), ...)
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

OutputOpt = Annotated[Path, typer.Option("--output", "-o", help="Model checkpoint to write when training ends.")]
DataOpt = Annotated[list[Path], typer.Option(
    "--data", help="Data file (.jsonl, .json array or .parquet, optionally .zst/.gz). Repeat for several.")]
ValDataOpt = Annotated[Optional[list[Path]], typer.Option(
    "--val-data", help="Held-out data files (same formats); replaces --val-fraction.")]
ValFractionOpt = Annotated[float, typer.Option(
    "--val-fraction", help="Fraction of the records held out for validation (seeded by --seed; 0: none).")]
MaxLenOpt = Annotated[Optional[int], typer.Option(
    "--max-len", help="Longest example in tokens (input positions). Default: the model's context.")]
TooLongOpt = Annotated[str, typer.Option(
    "--too-long", help="Examples longer than --max-len: truncate or skip (both are counted in the summary).")]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", help="Examples (sequences) per step per process.")]
GradAccumOpt = Annotated[int, typer.Option(
    "--grad-accum", help="Micro-batches per step; effective batch = batch-size x grad-accum x processes.")]
StepsOpt = Annotated[Optional[int], typer.Option("--steps", help="Optimizer steps (overrides --epochs).")]
EpochsOpt = Annotated[float, typer.Option("--epochs", help="Passes over the training data, when --steps is unset.")]
LrOpt = Annotated[float, typer.Option("--lr", help="Peak learning rate.")]
MinLrOpt = Annotated[Optional[float], typer.Option(
    "--min-lr", help="Floor of the decay (cosine, wsd, trapezoid, invsqrt). Default: --lr / 10.")]
WarmupOpt = Annotated[Optional[int], typer.Option(
    "--warmup", help="Steps of linear LR warmup. Default: 5% of the steps.")]
WarmdownOpt = Annotated[float, typer.Option(
    "--warmdown", help="wsd / trapezoid: fraction of the steps spent cooling down.")]
LrScheduleOpt = Annotated[str, typer.Option("--lr-schedule", help="cosine, wsd, wso, invsqrt or trapezoid.")]
OptimizerOpt = Annotated[str, typer.Option("--optimizer", help="Optimizer (adamw).")]
Beta2Opt = Annotated[float, typer.Option("--adamw-beta2", help="AdamW second-moment decay (beta1 0.9, eps 1e-5).")]
WeightDecayOpt = Annotated[float, typer.Option(
    "--weight-decay", help="Decoupled weight decay of the hidden matrices (not embeddings, head, norms).")]
GradClipOpt = Annotated[float, typer.Option("--grad-clip", help="Clip the gradient norm to this (0: off).")]
MaxBadOpt = Annotated[int, typer.Option(
    "--max-bad-steps", help="Non-finite (skipped) steps in a row that stop the run.")]
CheckpointDirOpt = Annotated[Optional[Path], typer.Option(
    "--checkpoint-dir", help="Folder for state_N.bin, best.bin and metrics.jsonl. Default: OUTPUT-STEM-checkpoints "
    "beside --output.")]
CheckpointEveryOpt = Annotated[int, typer.Option(
    "--checkpoint-every", help="Write state_N.bin every N steps (0: only at the end).")]
KeepOpt = Annotated[int, typer.Option("--keep", help="Newest state_N.bin files kept (0: all).")]
ResumeOpt = Annotated[Optional[Path], typer.Option(
    "--resume", help="Continue from this state_N.bin of the same tool (same flags give the same losses).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the data order, the validation split and new weights.")]
EvalEveryOpt = Annotated[Optional[int], typer.Option(
    "--eval-every", help="Evaluate every N steps (default: --checkpoint-every).")]
PatienceOpt = Annotated[int, typer.Option(
    "--patience", help="Stop after this many evaluations without a lower val loss (0: never).")]
DeviceOpt = Annotated[Optional[str], typer.Option(
    "--device", help="cpu, cuda, cuda:N or mps (default: cuda > mps > cpu).")]
PrecisionOpt = Annotated[str, typer.Option(
    "--precision", help="auto (bf16 autocast on CUDA, fp32 elsewhere), fp32 or bf16.")]
CompileOpt = Annotated[bool, typer.Option("--compile", help="torch.compile the model (needs a C++ compiler on CPU).")]

SHARED = ("output", "checkpoint_dir", "batch_size", "grad_accum", "steps", "epochs", "lr", "min_lr", "warmup",
          "warmdown", "lr_schedule", "optimizer", "adamw_beta2", "weight_decay", "grad_clip", "max_bad_steps",
          "checkpoint_every", "keep", "resume", "seed", "eval_every", "patience", "device", "precision", "compile")

RUN_HELP = (
    "Same machinery as `smedjan train`: state_N.bin every --checkpoint-every steps (--resume continues bit for "
    "bit), best.bin at each validation improvement and metrics.jsonl in --checkpoint-dir; the finished model goes "
    "to --output. Horizon: --steps, else --epochs. Schedules (after a linear --warmup): cosine decays to --min-lr; "
    "wsd holds --lr then cools down with 1-sqrt over the last --warmdown fraction; trapezoid the same, linearly; "
    "wso never decays; invsqrt decays as sqrt(warmup/step). A step with a non-finite loss or gradient is skipped; "
    "--max-bad-steps in a row stop the run (exit 2). SIGTERM or Ctrl-C finish the step, write a state and exit "
    "(0 for SIGTERM, 130 for Ctrl-C). Runs DDP under `torchrun`. Every input is checked before training starts: "
    "bad input gets one line and exit 2, and nothing is written.")


def shared(values: dict) -> dict:
    """The PostArgs fields from a tool function's locals() (paths as strings)."""
    out = {}
    for k in SHARED:
        v = values[k]
        out[k] = str(v) if isinstance(v, Path) else v
    return out


def paths(values) -> tuple:
    return tuple(str(v) for v in (values or ()))
