"""The one training driver of `train`, `sft`, `dpo` and `distill`.

Each tool checks its own inputs and builds its model, batch source, loss and evaluator;
everything else is here, once: the checks of the shared flags (`check_run`), the device
and precision policy (`setup`: bf16 autocast and TF32 matmuls on CUDA, fp32 elsewhere,
`--precision bf16` forcing autocast anywhere), the optimizer from role-tagged groups, the
LR schedule, the `Trainer` (checkpoints, resume, NaN skipping, signals, DDP), the
warnings on resuming with changed flags, and the run's summary.

    check_run(o)
    ctx, device, amp = setup(o)
    result, run_config = fit("sft", o, model, tok, cfg, source, loss_fn, steps, ctx, amp, ckpt_dir, resumed,
                             evaluator=evaluator, flops_per_token=cfg.flops_per_token(512))
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Callable

import torch

from smedjan.console import log, warn
from smedjan.errors import UserError
from smedjan.training.levers import apply_levers, check_device, levers_of
from smedjan.training.options import RESUME_FREE, RunOptions
from smedjan.training.regularisers import prepare as prepare_regularisers
from smedjan.training.regularisers import regularisers_of
from smedjan.training.relora import attach as attach_relora
from smedjan.training.relora import lowrank_of

PRECISIONS = ("auto", "fp32", "bf16")


def check_run(o: RunOptions) -> None:
    """One-line errors for shared flags out of range (nothing is read or written yet)."""
    checks = [
        (o.batch_size >= 1, f"`batch_size` {o.batch_size} must be >= 1"),
        (o.grad_accum >= 1, f"`grad_accum` {o.grad_accum} must be >= 1"),
        (o.steps is None or o.steps >= 1, f"`steps` {o.steps} must be >= 1"),
        (o.lr > 0 and math.isfinite(o.lr), f"`lr` {o.lr} must be positive"),
        (o.min_lr is None or 0 <= o.min_lr <= o.lr, f"`min_lr` {o.min_lr} must be between 0 and `lr` {o.lr}"),
        (o.warmup is None or o.warmup >= 0, f"`warmup` {o.warmup} must be >= 0"),
        (0 <= o.warmdown <= 1, f"`warmdown` {o.warmdown} must be a fraction in [0, 1]"),
        (o.checkpoint_every >= 0, f"`checkpoint_every` {o.checkpoint_every} must be >= 0"),
        (o.keep >= 0, f"`keep` {o.keep} must be >= 0"),
        (o.max_bad_steps >= 1, f"`max_bad_steps` {o.max_bad_steps} must be >= 1"),
        (o.grad_clip >= 0, f"`grad_clip` {o.grad_clip} must be >= 0"),
        (o.weight_decay >= 0, f"`weight_decay` {o.weight_decay} must be >= 0"),
        (o.patience >= 0, f"`patience` {o.patience} must be >= 0"),
        (o.seed >= 0, f"`seed` {o.seed} must be >= 0"),
        (o.eval_every is None or o.eval_every >= 0, f"`eval_every` {o.eval_every} must be >= 0"),
        (o.precision in PRECISIONS, f"`precision` {o.precision!r} is not auto, fp32 or bf16"),
        (o.warmup_ratio is None or 0 <= o.warmup_ratio <= 1, f"`warmup_ratio` {o.warmup_ratio} must be in [0, 1]"),
        (o.final_lr_frac is None or 0 <= o.final_lr_frac <= 1, f"`final_lr_frac` {o.final_lr_frac} must be in [0, 1]"),
        (o.final_lr_frac is None or o.min_lr is None, "`final_lr_frac` and `min_lr` exclude each other"),
        (o.total_batch_size is None or o.total_batch_size >= 1 or o.total_batch_size == -1,
         f"`total_batch_size` {o.total_batch_size} must be a number of tokens or -1"),
    ]
    for ok, msg in checks:
        if not ok:
            raise UserError(msg)
    from smedjan.optim.registry import canonical, check_settings

    name = canonical(o.optimizer)
    if name == "hybrid":  # every role has its own rate: a global one would be ignored
        if o.lr != type(o).__dataclass_fields__["lr"].default:
            raise UserError("`lr` does not apply to `optimizer` hybrid: each role has its own rate (`matrix_lr`, "
                            "`embedding_lr`, `unembedding_lr`, `scalar_lr`)")
        if o.min_lr is not None:
            raise UserError("`min_lr` does not apply to `optimizer` hybrid (its roles have different rates): use "
                            "`final_lr_frac`")
    check_settings(name, optimizer_settings(o))
    levers_of(o)
    regularisers_of(o)
    lowrank_of(o)


def optimizer_settings(o: RunOptions, width: int = 768, lr_schedule=None, lr_scale: float = 1.0):
    """The optimizer's settings from the shared flags (`width`: the model's, for the hybrid's rates)."""
    from smedjan.optim import OptimizerSettings

    return OptimizerSettings(
        lr=o.lr, beta1=o.adam_beta1, beta2=o.adamw_beta2, weight_decay=o.weight_decay,
        role_lr={k: getattr(o, k) for k in ("embedding_lr", "unembedding_lr", "matrix_lr", "scalar_lr")},
        width=width, lr_scale=lr_scale, muon_momentum=o.muon_momentum, muon_momentum_start=o.momentum_start,
        muon_momentum_end=o.momentum_end, muon_momentum_warmup=o.momentum_warmup, normuon=o.normuon,
        cautious=o.cautious, cautious_wd=o.cautious_wd, sophia_rho=o.sophia_rho, hessian_interval=o.hessian_interval,
        wd_schedule=o.wd_schedule, lr_schedule=lr_schedule, seed=o.seed)


def resolve_warmup(o: RunOptions, steps: int) -> int:
    """Warmup steps: `warmup_ratio` x steps when given (refused beside an explicit `warmup`),
    else `warmup`, else 5% of the steps."""
    if o.warmup_ratio is not None:
        default = type(o).__dataclass_fields__["warmup"].default
        if o.warmup is not None and o.warmup != default:
            raise UserError("`warmup_ratio` and `warmup` exclude each other")
        return round(o.warmup_ratio * steps)
    return o.warmup if o.warmup is not None else round(0.05 * steps)


B_REF = 2 ** 19  # nanochat's reference batch in tokens (its d12 optimum)


def resolve_total_batch(o: RunOptions, seq_len: int, world_size: int,
                        horizon: tuple[float, float] | None = None) -> float:
    """With `total_batch_size`: set `grad_accum` (and the resolved size) in `o` and return the
    rates' scale sqrt(B / 2^19); without it, 1. -1 needs `horizon` = (tokens of this run, tokens
    of nanochat's d12 reference at the same ratio): B = 2^round(log2(2^19 (D / D_ref)^0.383))."""
    B = o.total_batch_size
    if B is None:
        return 1.0
    if B == -1:
        if horizon is None:
            raise UserError("`total_batch_size` -1 derives the batch from the horizon in tokens: give "
                            "`target_param_data_ratio` or `target_flops` instead of `steps`")
        D, D_ref = horizon
        B = 2 ** round(math.log2(B_REF * (D / D_ref) ** 0.383))
    per = o.batch_size * seq_len * world_size
    if B % per:
        raise UserError(f"`total_batch_size` {B} is not a multiple of `batch_size` x `seq_len` x processes "
                        f"= {per} tokens")
    if o.grad_accum not in (1, B // per):
        raise UserError(f"`grad_accum` {o.grad_accum} and `total_batch_size` {B} disagree (it sets `grad_accum` "
                        f"{B // per}); give one")
    o.grad_accum, o.total_batch_size = B // per, B
    return math.sqrt(B / B_REF)


def check_folder(path: str | os.PathLike) -> Path:
    """The checkpoint folder, refused when it is a file or its parent does not exist."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder}: `checkpoint_dir` is a file, expected a folder")
    if not folder.parent.is_dir():
        raise UserError(f"{folder}: the folder that should hold `checkpoint_dir` does not exist")
    return folder


def precision_policy(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None: plain fp32). auto: bf16 on a CUDA device that has it."""
    if precision not in PRECISIONS:
        raise UserError(f"`precision` {precision!r} is not auto, fp32 or bf16")
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        if precision == "bf16":
            raise UserError("`precision` bf16: this GPU does not support bfloat16")
        return None
    return torch.bfloat16


def setup(o: RunOptions):
    """(DistContext, device, autocast dtype or None): the device (and DDP under torchrun) and
    the precision policy. On CUDA, matmuls left in float32 use TF32."""
    from smedjan.device import pick_device
    from smedjan.training.dist import env_world_size, init_distributed

    device = pick_device(o.device)
    check_device(levers_of(o), device, compiled=o.compile)
    from smedjan.training.fsdp import check_fsdp

    check_fsdp(o.fsdp, o.optimizer, env_world_size())  # before joining a process group or writing anything
    ctx = init_distributed(device)
    amp = None if o.bf16_matmul else precision_policy(o.precision, ctx.device)
    if ctx.device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for matmuls
        torch.backends.cudnn.allow_tf32 = True
    return ctx, ctx.device, amp


def fit(tool: str, o: RunOptions, model, tok, cfg, source, loss_fn: Callable, steps: int, ctx, amp,
        ckpt_dir: Path, resumed, *, evaluator=None, sampler=None, run_config: dict | None = None,
        flops_per_token: float = 0.0, peak_flops: float = 0.0, monitor: str = "val_loss",
        final_path: Path | None = None, loggers: tuple = (), fault_steps: frozenset = frozenset(),
        note: str = "", lr_scale: float | None = None) -> tuple[Any, dict]:
    """Optimizer, schedule and Trainer from the shared flags; resume; fit. Returns
    (TrainResult, the run config recorded in every state). `lr_scale`: from
    `resolve_total_batch`, by the tools whose batches are fixed-length token windows."""
    from smedjan.optim import build_optimizer, param_groups
    from smedjan.training.loop import Trainer, TrainerConfig
    from smedjan.training.schedule import Schedule

    if o.patience and evaluator is None:
        raise UserError("`patience` needs a validation set (early stopping watches the validation loss)")
    if o.total_batch_size is not None and lr_scale is None:
        raise UserError(f"`total_batch_size` counts tokens of fixed-length sequences; smedjan {tool} batches "
                        "examples: set `batch_size` and `grad_accum`")
    warmup = resolve_warmup(o, steps)
    min_ratio = o.final_lr_frac if o.final_lr_frac is not None else 0.1 if o.min_lr is None else o.min_lr / o.lr
    lowrank = lowrank_of(o)  # ReLoRA (smedjan.training.relora): its merges re-warm the LR
    schedule = Schedule(o.lr_schedule, total_steps=steps, warmup=warmup, min_ratio=min_ratio, warmdown=o.warmdown,
                        **(lowrank.schedule() if lowrank else {}))
    settings = optimizer_settings(o, cfg.dim, schedule, lr_scale or 1.0)
    extras = prepare_regularisers(model, regularisers_of(o), cfg)  # freezes before the optimizer sees the weights
    extras.relora = attach_relora(model, lowrank)  # freezes the adapted matrices, adds their adapters
    levers = levers_of(o)
    kernels = None
    if o.fsdp:  # FSDP (smedjan.training.fsdp): levers, then fully_shard, then the optimizer over the shards
        from smedjan.training.fsdp import shard_model

        kernels = apply_levers(model, levers, ctx.device, compiled=o.compile)
        shard_model(model, ctx.device, amp)
        extras.track(model)  # the EMA of the shards
    optimizer = build_optimizer(o.optimizer, param_groups(model, o.weight_decay, extras.trainable()), settings,
                                device=ctx.device)
    from smedjan.model.mup import scale_rates

    scale_rates(optimizer, cfg, o.optimizer)  # µP: the hidden matrices' rates / width_mult
    run_config = {**dataclasses.asdict(o), **(run_config or {}), "steps": steps, "warmup": warmup}
    kernels = kernels or apply_levers(model, levers, ctx.device, compiled=o.compile)
    extras.wrap(model)  # dropout, drop-path: around the levers' blocks
    tcfg = TrainerConfig(
        tool=tool, steps=steps, checkpoint_dir=ckpt_dir, checkpoint_every=o.checkpoint_every, keep=o.keep,
        final_path=final_path, grad_accum=o.grad_accum, grad_clip=o.grad_clip, max_bad_steps=o.max_bad_steps,
        eval_every=o.eval_every or 0, patience=o.patience, monitor=monitor, amp_dtype=amp, compile=o.compile,
        flops_per_token=flops_per_token, peak_flops=peak_flops if ctx.device.type == "cuda" else 0.0,
        sample_every=getattr(o, "sample_every", 0), fault_steps=fault_steps, fsdp=o.fsdp)
    from smedjan.model.moe import with_router_losses

    loss_fn = with_router_losses(model, loss_fn)  # MoE: + the router's load-balancing and z-losses
    trainer = Trainer(model, optimizer, schedule, source, loss_fn, tcfg, tokenizer=tok, model_config=cfg,
                      run_config=run_config, evaluator=evaluator, sampler=sampler, dist=ctx, loggers=loggers,
                      extras=extras)
    if resumed is not None:
        trainer.resume(resumed)
        changed = [f"`{k}` {resumed.run_config.get(k)!r} -> {v!r}" for k, v in run_config.items()
                   if k not in RESUME_FREE and resumed.run_config.get(k) != v]
        if changed and ctx.is_main:
            warn(f"resuming with changed flags ({'; '.join(changed)}): the run will not repeat the original exactly")
    if ctx.is_main:
        if warmup >= steps:
            warn(f"`warmup` {warmup} >= {steps} steps: the learning rate never reaches `lr`")
        log(f"model: {cfg.preset} {cfg.describe()}, context {cfg.max_seq_len}: {cfg.n_params():,} parameters "
            f"({cfg.n_params(embedding=False):,} non-embedding)")
        log(f"device: {ctx.device}{' x ' + str(ctx.world_size) if ctx.enabled else ''}, "
            f"{'bf16 autocast' if amp else 'bf16 matmuls' if o.bf16_matmul else 'fp32'}"
            f"{', compiled' if o.compile else ''}; threads "
            f"{torch.get_num_threads()}" + (f"; resuming at step {trainer.step}" if resumed is not None else "")
            + note)
        rates = ", ".join(f"{g['role']} {g.get('kind', '')} {g['peak_lr']:.3g}".replace("  ", " ")
                          for g in optimizer.param_groups)
        log(f"optimizer: {o.optimizer} ({rates})" + (f"; {optimizer.note}" if hasattr(optimizer, "note") else ""))
        log(f"levers: {levers.describe() or 'none'}; kernels: {kernels.name}")
        if extras.describe():
            log(f"regularisers: {extras.describe()}")
    try:
        result = trainer.fit()
    finally:
        ctx.close()
    return result, run_config


def summary_of(result) -> dict:
    """The summary keys every training tool prints."""
    return {"reason": result.reason, "steps": result.step, "loss": result.last_loss,
            **dict(result.last_eval),
            **({"best_val_loss": result.best.get("val_loss"), "best_step": result.best.get("step")}
               if result.best else {}),
            "skipped_steps": result.skipped_steps, "tokens": result.tokens, "seconds": round(result.seconds, 2),
            "last_state": str(result.last_state) if result.last_state else None}


def fault_steps_from_env() -> frozenset:
    """SMEDJAN_FAULT_NONFINITE_STEPS="3,4,5": make those steps' loss NaN (tests, drills)."""
    raw = os.environ.get("SMEDJAN_FAULT_NONFINITE_STEPS", "").strip()
    try:
        return frozenset(int(s) for s in raw.split(",") if s.strip())
    except ValueError:
        raise UserError(f"SMEDJAN_FAULT_NONFINITE_STEPS={raw!r} must be comma-separated step numbers") from None
