"""The run around the shared Trainer for `smedjan sft`, `dpo` and `distill`.

Each tool checks every input first (one-line UserError, nothing written), builds its
batch source and loss function, then calls `train_model`, which does what `smedjan train`
does: optimizer and LR schedule from the same flags, `Trainer` with state_N.bin /
best.bin / metrics.jsonl in --checkpoint-dir, `--resume` (refusing a state of another
tool, model or tokenizer), NaN/Inf skipping, SIGINT/SIGTERM, DDP under torchrun. The
finished model goes to --output (not checkpoint_dir/final.bin).

Horizon: --steps, else --epochs over the training examples (or tokens, for distill).
Warmup: --warmup steps, else 5% of the steps.

    a = SftArgs(output="sft.bin", checkpoint="final.bin", data=["chats.jsonl"], epochs=2)
    ckpt_dir, resumed = check_common(a, "sft")
    ctx, device, amp = setup(a)                        # smedjan.training.driver
    result, run_config = train_model("sft", a, model, tok, cfg, source, loss_fn, steps, ctx, amp, ckpt_dir, resumed)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from smedjan.errors import UserError
from smedjan.options import option, retitled
from smedjan.training.driver import check_folder, check_run, fit, summary_of
from smedjan.training.options import RunOptions

RUN_HELP = (
    "Same machinery as `smedjan train`: state_N.bin every --checkpoint-every steps (--resume continues bit for "
    "bit), best.bin at each validation improvement and metrics.jsonl in --checkpoint-dir; the finished model goes "
    "to --output. Horizon: --steps, else --epochs. Schedules (after a linear --warmup): cosine decays to --min-lr; "
    "wsd holds --lr then cools down with 1-sqrt over the last --warmdown fraction; trapezoid the same, linearly; "
    "wso never decays; invsqrt decays as sqrt(warmup/step). A step with a non-finite loss or gradient is skipped; "
    "--max-bad-steps in a row stop the run (exit 2). SIGTERM or Ctrl-C finish the step, write a state and exit "
    "(0 for SIGTERM, 130 for Ctrl-C). Runs DDP under `torchrun`. Every input is checked before training starts: "
    "bad input gets one line and exit 2, and nothing is written.")


@dataclass(kw_only=True)
class PostArgs(RunOptions):
    output: str = option(help="Model checkpoint to write when training ends.", short="-o")
    checkpoint_dir: str | None = retitled(RunOptions, "checkpoint_dir", None, help="Folder for state_N.bin, "
                                          "best.bin and metrics.jsonl. Default: OUTPUT-STEM-checkpoints beside "
                                          "--output.")
    batch_size: int = retitled(RunOptions, "batch_size", 8, help="Examples (sequences) per step per process.")
    steps: int | None = retitled(RunOptions, "steps", None, help="Optimizer steps (overrides --epochs).")
    epochs: float = option(1.0, "Passes over the training data, when --steps is unset.")
    lr: float = retitled(RunOptions, "lr", 1e-4)
    weight_decay: float = retitled(RunOptions, "weight_decay", 0.0)


@dataclass(kw_only=True)
class ChatDataArgs:
    """Flags of the tools that read conversations or preference pairs (sft, dpo)."""

    checkpoint: str = option(help="Model to train (final.bin, sft.bin or a state_N.bin); its tokenizer needs chat "
                                  "tokens.", short="-c")
    data: list[str] = option(help="Data file (.jsonl, .json array or .parquet, optionally .zst/.gz). Repeat for "
                                  "several.")
    val_data: list[str] | None = option(None, "Held-out data files (same formats); replaces --val-fraction.")
    val_fraction: float = option(0.05, "Fraction of the records held out for validation (seeded by --seed; 0: "
                                       "none).")
    max_len: int | None = option(None, "Longest example in tokens (input positions). Default: the model's context.")
    too_long: str = option("truncate", "Examples longer than --max-len: truncate or skip (both are counted in the "
                                       "summary).")


def default_checkpoint_dir(output: str | Path) -> Path:
    out = Path(output)
    return out.with_name(out.stem + "-checkpoints")


def check_common(a: PostArgs, tool: str):
    """Check the shared flags and paths; returns (checkpoint folder, loaded --resume state or None)."""
    from smedjan.io import check_output_path
    from smedjan.training.state import read_train_state

    check_run(a)
    if not (a.epochs > 0 and math.isfinite(a.epochs)):
        raise UserError(f"`epochs` {a.epochs} must be positive")
    check_output_path(a.output)
    ckpt_dir = check_folder(a.checkpoint_dir if a.checkpoint_dir else default_checkpoint_dir(a.output))
    resumed = read_train_state(a.resume, tool) if a.resume else None
    return ckpt_dir, resumed


def load_chat_model_checkpoint(path: str):
    """The Checkpoint of --checkpoint, refusing one whose tokenizer cannot render chats."""
    from smedjan.formats.checkpoint import load_checkpoint

    ck = load_checkpoint(path)
    try:
        tok = ck.tokenizer
    except UserError:
        raise UserError(f"{path}: carries no tokenizer; post-training renders chats with the checkpoint's own "
                        "tokenizer (import it with `smedjan import-hf --tokenizer`)") from None
    if not tok.has_chat_tokens:
        raise UserError(f"{path}: its tokenizer has no chat tokens (<|user_start|>, <|assistant_start|>, ...); "
                        "post-training needs a tokenizer made by `smedjan tokenizer`")
    if tok.vocab_size != ck.config.vocab_size:
        raise UserError(f"{path}: tokenizer has {tok.vocab_size} tokens, the model {ck.config.vocab_size}")
    from smedjan.model.mtp import checkpoint_without_mtp

    return checkpoint_without_mtp(ck), tok  # post-training trains (and writes) the model without MTP modules


def resolve_steps(a: PostArgs, units_per_step: int, n_units: int, unit: str) -> tuple[int, str]:
    """(steps, how): --steps, else --epochs x n_units / units per step (at least 1)."""
    if a.steps is not None:
        return a.steps, "`steps`"
    steps = max(1, math.ceil(a.epochs * n_units / units_per_step))
    return steps, f"`epochs` {a.epochs:g} over {n_units:,} {unit}"


def train_model(tool: str, a: PostArgs, model, tok, cfg, source, loss_fn, steps: int, ctx, amp, ckpt_dir: Path,
                resumed, **kw):
    """The driver's `fit`, writing the finished model to --output."""
    return fit(tool, a, model, tok, cfg, source, loss_fn, steps, ctx, amp, ckpt_dir, resumed,
               final_path=Path(a.output), **kw)


def base_summary(result, a: PostArgs) -> dict:
    """The summary keys every post-training tool prints."""
    out = summary_of(result)
    out.pop("best_val_loss", None)
    out["output"] = str(result.final) if result.final else None
    return out


def finish(result, where: str) -> None:
    """A diverged run is the user's problem (exit 2, last state intact)."""
    if result.reason == "diverged":
        raise UserError(f"{where}: {result.message}")
