"""The run around the shared Trainer for `smedjan sft`, `dpo` and `distill`.

Each tool checks every input first (one-line UserError, nothing written), builds its
batch source and loss function, then calls `train_model`, which does what `smedjan train`
does: optimizer and LR schedule from the same flags, `Trainer` with state_N.bin /
best.bin / metrics.jsonl in --checkpoint-dir, `--resume` (refusing a state of another
tool, model or tokenizer), NaN/Inf skipping, SIGINT/SIGTERM, DDP under torchrun. The
finished model goes to --output (not checkpoint_dir/final.bin).

Horizon: --steps, else --epochs over the training examples (or tokens, for distill).
Warmup: --warmup steps, else 5% of the steps.

    a = PostArgs(output="sft.bin", epochs=2)
    ckpt_dir, resumed = check_common(a, "sft")
    ctx, device, amp = setup_device(a)
    result, summary = train_model("sft", a, model, tok, cfg, source, loss_fn, steps, ctx, amp, ckpt_dir, resumed)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from smedjan.console import log, warn
from smedjan.errors import UserError


@dataclass
class PostArgs:
    output: str
    checkpoint_dir: str | None = None  # None: <output stem>-checkpoints beside --output
    batch_size: int = 8
    grad_accum: int = 1
    steps: int | None = None
    epochs: float = 1.0
    lr: float = 1e-4
    min_lr: float | None = None  # None: lr / 10
    warmup: int | None = None  # None: 5% of the steps
    warmdown: float = 0.2
    lr_schedule: str = "cosine"
    optimizer: str = "adamw"
    adamw_beta2: float = 0.95
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_bad_steps: int = 8
    checkpoint_every: int = 1000
    keep: int = 3
    resume: str | None = None
    seed: int = 0
    eval_every: int | None = None
    patience: int = 0
    device: str | None = None
    precision: str = "auto"
    compile: bool = False


# Flags that may change between a run and its resumption without a warning.
_RESUME_FREE = {"resume", "device", "compile", "checkpoint_dir", "output"}


def default_checkpoint_dir(output: str | Path) -> Path:
    out = Path(output)
    return out.with_name(out.stem + "-checkpoints")


def check_common(a: PostArgs, tool: str):
    """Check the shared flags and paths; returns (checkpoint folder, loaded --resume state or None)."""
    from smedjan.io import check_output_path
    from smedjan.training.state import read_train_state

    checks = [
        (a.batch_size >= 1, f"--batch-size {a.batch_size} must be >= 1"),
        (a.grad_accum >= 1, f"--grad-accum {a.grad_accum} must be >= 1"),
        (a.steps is None or a.steps >= 1, f"--steps {a.steps} must be >= 1"),
        (a.epochs > 0 and math.isfinite(a.epochs), f"--epochs {a.epochs} must be positive"),
        (a.lr > 0, f"--lr {a.lr} must be positive"),
        (a.min_lr is None or 0 <= a.min_lr <= a.lr, f"--min-lr {a.min_lr} must be between 0 and --lr {a.lr}"),
        (a.warmup is None or a.warmup >= 0, f"--warmup {a.warmup} must be >= 0"),
        (a.checkpoint_every >= 0, f"--checkpoint-every {a.checkpoint_every} must be >= 0"),
        (a.keep >= 0, f"--keep {a.keep} must be >= 0"),
        (a.max_bad_steps >= 1, f"--max-bad-steps {a.max_bad_steps} must be >= 1"),
        (a.grad_clip >= 0, f"--grad-clip {a.grad_clip} must be >= 0"),
        (a.patience >= 0, f"--patience {a.patience} must be >= 0"),
        (a.seed >= 0, f"--seed {a.seed} must be >= 0"),
        (a.eval_every is None or a.eval_every >= 0, f"--eval-every {a.eval_every} must be >= 0"),
        (a.precision in ("auto", "fp32", "bf16"), f"--precision {a.precision!r} is not auto, fp32 or bf16"),
    ]
    for ok, msg in checks:
        if not ok:
            raise UserError(msg)
    check_output_path(a.output)
    ckpt_dir = Path(a.checkpoint_dir) if a.checkpoint_dir else default_checkpoint_dir(a.output)
    if ckpt_dir.exists() and not ckpt_dir.is_dir():
        raise UserError(f"{ckpt_dir}: --checkpoint-dir is a file, expected a folder")
    if not ckpt_dir.parent.is_dir():
        raise UserError(f"{ckpt_dir}: the folder that should hold --checkpoint-dir does not exist")
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
    return ck, tok


def setup_device(a: PostArgs):
    """(DistContext, device, autocast dtype or None) from --device and --precision."""
    from smedjan.device import pick_device
    from smedjan.training.dist import init_distributed

    ctx = init_distributed(pick_device(a.device))
    device = ctx.device
    amp = None
    if a.precision == "bf16" or (a.precision == "auto" and device.type == "cuda"):
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            if a.precision == "bf16":
                raise UserError("--precision bf16: this GPU does not support bfloat16")
        else:
            amp = torch.bfloat16
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return ctx, device, amp


def resolve_steps(a: PostArgs, units_per_step: int, n_units: int, unit: str) -> tuple[int, str]:
    """(steps, how): --steps, else --epochs x n_units / units per step (at least 1)."""
    if a.steps is not None:
        return a.steps, "--steps"
    steps = max(1, math.ceil(a.epochs * n_units / units_per_step))
    return steps, f"--epochs {a.epochs:g} over {n_units:,} {unit}"


def train_model(tool: str, a: PostArgs, model, tok, cfg, source, loss_fn, steps: int, ctx, amp, ckpt_dir: Path,
                resumed, *, evaluator=None, run_config: dict | None = None, flops_per_token: float = 0.0,
                monitor: str = "val_loss", fault_steps: frozenset = frozenset()):
    """Optimizer + schedule + Trainer; resume; fit. Returns (TrainResult, run_config)."""
    from smedjan.optim import OptimizerSettings, build_optimizer, param_groups
    from smedjan.training.loop import Trainer, TrainerConfig
    from smedjan.training.schedule import Schedule

    if a.patience and evaluator is None:
        raise UserError("--patience needs a validation set (early stopping watches the validation loss)")
    warmup = a.warmup if a.warmup is not None else round(0.05 * steps)
    min_ratio = 0.1 if a.min_lr is None else a.min_lr / a.lr
    schedule = Schedule(a.lr_schedule, total_steps=steps, warmup=warmup, min_ratio=min_ratio, warmdown=a.warmdown)
    optimizer = build_optimizer(a.optimizer, param_groups(model, a.weight_decay),
                                OptimizerSettings(lr=a.lr, beta2=a.adamw_beta2, weight_decay=a.weight_decay),
                                device=ctx.device)
    run_config = {**dataclasses.asdict(a), **(run_config or {}), "steps": steps, "warmup": warmup}
    tcfg = TrainerConfig(
        tool=tool, steps=steps, checkpoint_dir=ckpt_dir, checkpoint_every=a.checkpoint_every, keep=a.keep,
        final_path=Path(a.output), grad_accum=a.grad_accum, grad_clip=a.grad_clip, max_bad_steps=a.max_bad_steps,
        eval_every=a.eval_every or 0, patience=a.patience, monitor=monitor, amp_dtype=amp, compile=a.compile,
        flops_per_token=flops_per_token, fault_steps=fault_steps)
    trainer = Trainer(model, optimizer, schedule, source, loss_fn, tcfg, tokenizer=tok, model_config=cfg,
                      run_config=run_config, evaluator=evaluator, dist=ctx)
    if resumed is not None:
        trainer.resume(resumed)
        changed = [f"--{k.replace('_', '-')} {resumed.run_config.get(k)!r} -> {v!r}" for k, v in run_config.items()
                   if k not in _RESUME_FREE and resumed.run_config.get(k) != v]
        if changed and ctx.is_main:
            warn(f"resuming with changed flags ({'; '.join(changed)}): the run will not repeat the original exactly")
    if ctx.is_main:
        if warmup >= steps:
            warn(f"--warmup {warmup} >= {steps} steps: the learning rate never reaches --lr")
        log(f"model: {cfg.describe()}, context "
            f"{cfg.max_seq_len}: {cfg.n_params():,} parameters; device {ctx.device}"
            f"{' x ' + str(ctx.world_size) if ctx.enabled else ''}, {'bf16 autocast' if amp else 'fp32'}"
            + (f"; resuming at step {trainer.step}" if resumed is not None else ""))
    try:
        result = trainer.fit()
    finally:
        ctx.close()
    return result, run_config


def base_summary(result, a: PostArgs) -> dict:
    """The summary keys every post-training tool prints."""
    return {"reason": result.reason, "steps": result.step, "loss": result.last_loss,
            **dict(result.last_eval),
            **({"best_step": result.best.get("step")} if result.best else {}),
            "skipped_steps": result.skipped_steps, "tokens": result.tokens, "seconds": round(result.seconds, 2),
            "output": str(result.final) if result.final else None,
            "last_state": str(result.last_state) if result.last_state else None}


def finish(result, where: str) -> None:
    """A diverged run is the user's problem (exit 2, last state intact)."""
    if result.reason == "diverged":
        raise UserError(f"{where}: {result.message}")
