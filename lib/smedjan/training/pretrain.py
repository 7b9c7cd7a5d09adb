"""Pretraining (`smedjan train`): flags -> checked inputs -> model, optimizer, data -> Trainer.

Every input is read and checked before anything is written (bad input: one-line
UserError, nothing on disk). Precedence rules:
- model config: `--resume` or `--init` supply one; it is used as is unless `--size` is
  given, in which case the flags must describe the same model. Without either, the
  flags build it (`--size small` by default).
- horizon: `--steps`, else `--target-flops`, else `--target-param-data-ratio`
  (tokens = ratio x total parameters, Chinchilla = 20), else 50000 steps.
- context: the model's max_seq_len is --max-seq-len, else --seq-len for a new model,
  else the checkpoint's; `--yarn-scale F` multiplies it by F with YaRN RoPE scaling.

    args = TrainArgs(dataset="train.bin", tokenizer="tokenizer.bin", size="tiny", steps=200, warmup=20)
    summary, result = run(args)
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from smedjan.console import log, warn
from smedjan.errors import UserError
from smedjan.model import ModelConfig, Transformer
from smedjan.training.schedule import Schedule

DEFAULT_STEPS = 50_000
H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s of one H100 SXM


@dataclass
class TrainArgs:
    dataset: str
    tokenizer: str
    val_dataset: str | None = None
    size: str | None = None  # None: the checkpoint's config, or "small"
    dim: int | None = None
    layers: int | None = None
    heads: int | None = None
    ffn_mult: float | None = None
    kv_heads: int | None = None
    sliding_window: int | None = None
    rope_theta: float | None = None
    untied: bool | None = None
    max_seq_len: int | None = None
    yarn_scale: float = 1.0
    batch_size: int = 32
    seq_len: int = 256
    grad_accum: int = 1
    steps: int | None = None
    target_flops: float | None = None
    target_param_data_ratio: float | None = None
    lr: float = 3e-4
    min_lr: float | None = None  # None: lr / 10
    warmup: int = 2000
    warmdown: float = 0.2
    lr_schedule: str = "cosine"
    optimizer: str = "adamw"
    adamw_beta2: float = 0.95
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    max_bad_steps: int = 8
    checkpoint_dir: str = "checkpoints"
    checkpoint_every: int = 1000
    keep: int = 3
    resume: str | None = None
    init: str | None = None
    seed: int = 0
    bos_aligned: bool = False
    stream: bool = False
    val_tokens: int = 262_144
    eval_every: int | None = None
    patience: int = 0
    sample_every: int = 0
    device: str | None = None
    precision: str = "auto"
    compile: bool = False
    peak_flops: float = H100_BF16_PEAK
    run: str | None = None


# Flags that may differ between a run and its resumption without a warning.
_RESUME_FREE = {"resume", "init", "device", "compile", "run", "sample_every", "peak_flops", "checkpoint_dir"}
_ARCH_FLAGS = ("dim", "layers", "heads", "ffn_mult", "kv_heads", "sliding_window", "rope_theta", "untied",
               "max_seq_len")


def lm_loss(model: torch.nn.Module, batch) -> tuple[torch.Tensor, dict]:
    """Next-token cross-entropy over x, y int64 [B, T] (mean over the B*T targets)."""
    x, y = batch
    return model(x, y), {"tokens": x.numel()}


# ---------------------------------------------------------------------------- config
def _pre_yarn_len(cfg: ModelConfig) -> int:
    return cfg.rope.original_max_seq_len if cfg.rope.scaling == "yarn" else cfg.max_seq_len


def apply_yarn(cfg: ModelConfig, factor: float, where: str) -> ModelConfig:
    """cfg with its context extended `factor` times by YaRN (idempotent for the same factor)."""
    if factor < 1.0:
        raise UserError(f"--yarn-scale {factor} must be >= 1")
    if factor == 1.0 or (cfg.rope.scaling == "yarn" and cfg.rope.factor == factor):
        return cfg
    if cfg.rope.scaling != "none":
        raise UserError(f"{where}: the model already uses {cfg.rope.scaling} RoPE scaling (factor "
                        f"{cfg.rope.factor}); --yarn-scale cannot be stacked on it")
    return cfg.replace(rope_scaling="yarn", rope_factor=factor, rope_original_max_seq_len=cfg.max_seq_len,
                       max_seq_len=int(round(cfg.max_seq_len * factor)))


def config_from_flags(a: TrainArgs, vocab_size: int, max_seq_len: int) -> ModelConfig:
    common = dict(sliding_window=a.sliding_window or 0, rope_theta=a.rope_theta or 10000.0,
                  tie_embeddings=not a.untied, max_seq_len=max_seq_len)
    size = a.size or "small"
    if size == "custom":
        missing = [f"--{n}" for n in ("dim", "layers", "heads") if getattr(a, n) is None]
        if missing:
            raise UserError(f"--size custom needs {', '.join(missing)}")
        return ModelConfig.custom(vocab_size, dim=a.dim, n_layers=a.layers, n_heads=a.heads,
                                  ffn_mult=a.ffn_mult, n_kv_heads=a.kv_heads or 0, **common)
    shape = [f"--{n.replace('_', '-')}" for n in ("dim", "layers", "heads", "ffn_mult") if getattr(a, n) is not None]
    if shape:
        raise UserError(f"{', '.join(shape)} only apply to --size custom (--size {size} is a preset)")
    return ModelConfig.from_preset(size, vocab_size, n_kv_heads=a.kv_heads or 0, **common)


def model_config_for(a: TrainArgs, vocab_size: int, base: ModelConfig | None, base_path: str | None) -> ModelConfig:
    """The run's model config from the flags and the --init/--resume checkpoint's (`base`)."""
    if base is None:
        cfg = config_from_flags(a, vocab_size, a.max_seq_len or a.seq_len)
        cfg = apply_yarn(cfg, a.yarn_scale, "--yarn-scale")
        where = "--max-seq-len" if a.max_seq_len else "--seq-len"
    elif a.size is None:
        given = [f"--{n.replace('_', '-')}" for n in _ARCH_FLAGS if getattr(a, n) is not None]
        if given:
            raise UserError(f"{', '.join(given)} need --size when starting from {base_path} (without --size its "
                            "config is used as is)")
        cfg = apply_yarn(base, a.yarn_scale, base_path)
        where = base_path
    else:
        built = config_from_flags(a, vocab_size, a.max_seq_len or _pre_yarn_len(base))
        cfg = apply_yarn(built, a.yarn_scale, base_path)
        want = apply_yarn(base, a.yarn_scale, base_path)
        from smedjan.training.state import config_diff

        diff = config_diff(want, cfg.replace(preset=want.preset))
        if diff:
            raise UserError(f"{base_path}: its model differs from --size {a.size} and the architecture flags "
                            f"({'; '.join(diff[:3])}); leave out --size to use the checkpoint's config")
        cfg = want
        where = base_path
    if a.seq_len > cfg.max_seq_len:
        raise UserError(f"--seq-len {a.seq_len} is past the model's context of {cfg.max_seq_len} positions "
                        f"(its RoPE tables, from {where}); extend it with --yarn-scale, or use a shorter --seq-len")
    return cfg


def resolve_horizon(a: TrainArgs, cfg: ModelConfig, tokens_per_step: int) -> tuple[int, str]:
    """(steps, how): --steps > --target-flops > --target-param-data-ratio > 50000."""
    if a.steps is not None:
        if a.steps < 1:
            raise UserError(f"--steps {a.steps} must be >= 1")
        return a.steps, "--steps"
    if a.target_flops is not None:
        if not a.target_flops > 0:
            raise UserError(f"--target-flops {a.target_flops} must be positive")
        per_step = cfg.flops_per_token(a.seq_len) * tokens_per_step
        return max(1, round(a.target_flops / per_step)), f"--target-flops {a.target_flops:.3g}"
    if a.target_param_data_ratio is not None:
        if not a.target_param_data_ratio > 0:
            raise UserError(f"--target-param-data-ratio {a.target_param_data_ratio} must be positive")
        tokens = a.target_param_data_ratio * cfg.n_params()
        return max(1, math.ceil(tokens / tokens_per_step)), (
            f"--target-param-data-ratio {a.target_param_data_ratio:g} ({tokens:.3g} tokens)")
    return DEFAULT_STEPS, "default"


# ------------------------------------------------------------------------ eval, sample
def make_evaluator(val_tf, batch_size: int, seq_len: int, max_tokens: int, byte_lengths, ctx):
    """evaluator(model) -> {"val_loss": nats/token, "val_bpb": bits/byte} over the first
    `max_tokens` target tokens of val.bin, in order, sharded over ranks."""
    from smedjan.data.loader import iter_sequential
    from smedjan.metrics import NllBytes

    per_batch = batch_size * seq_len * ctx.world_size
    max_batches = max(1, max_tokens // per_batch)
    lengths = torch.as_tensor(byte_lengths, dtype=torch.int64, device=ctx.device)

    def evaluate(model) -> dict:
        acc = NllBytes()
        for x, y in iter_sequential(val_tf, batch_size, seq_len, max_batches=max_batches, rank=ctx.rank,
                                    world_size=ctx.world_size):
            if x.shape[0] == 0:
                continue
            x, y = x.to(ctx.device), y.to(ctx.device)
            acc.add(model(x), y, lengths)
        totals = acc.totals().to(ctx.device)
        acc.set(ctx.all_reduce_sum(totals))
        return {"val_loss": acc.mean_nll, "val_bpb": acc.bpb}

    return evaluate


def make_sampler(tokenizer, max_new: int = 48, temperature: float = 1.0, top_k: int = 50):
    """sampler(model, step) -> text generated from BOS (own generator seeded by the step,
    so sampling never moves the training RNG streams)."""

    def sample(model, step: int) -> str:
        dev = model.head_weight.device
        n = min(max_new, model.cfg.max_seq_len - 1)
        state = model.new_state(1, n + 1)
        gen = torch.Generator(device="cpu").manual_seed(step)
        ids = [tokenizer.bos_id]
        tok = torch.tensor([ids], device=dev)
        for pos in range(n):
            logits = model(tok, state=state, start=pos)[0, -1].float().cpu()
            v, i = torch.topk(logits / temperature, min(top_k, logits.numel()))
            nxt = int(i[torch.multinomial(torch.softmax(v, -1), 1, generator=gen)])
            ids.append(nxt)
            tok = torch.tensor([[nxt]], device=dev)
        return tokenizer.decode(ids[1:])

    return sample


class _Wandb:
    def __init__(self, name: str, config: dict):
        try:
            import wandb
        except ImportError:
            raise UserError("--run needs the wandb package (pip install wandb); leave --run unset or use "
                            "'dummy' to train without it") from None
        self._wandb = wandb
        self._run = wandb.init(project="smedjan", name=name, config=config)

    def log(self, rec: dict, step: int) -> None:
        self._wandb.log({k: v for k, v in rec.items() if isinstance(v, (int, float))}, step=step)

    def close(self) -> None:
        self._run.finish()


# -------------------------------------------------------------------------------- run
def _precision(a: TrainArgs, device: torch.device) -> torch.dtype | None:
    if a.precision not in ("auto", "fp32", "bf16"):
        raise UserError(f"--precision {a.precision!r} is not auto, fp32 or bf16")
    if a.precision == "fp32" or (a.precision == "auto" and device.type != "cuda"):
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        if a.precision == "bf16":
            raise UserError("--precision bf16: this GPU does not support bfloat16")
        return None
    return torch.bfloat16


def _check_flags(a: TrainArgs) -> None:
    checks = [
        (a.batch_size >= 1, f"--batch-size {a.batch_size} must be >= 1"),
        (a.seq_len >= 1, f"--seq-len {a.seq_len} must be >= 1"),
        (a.grad_accum >= 1, f"--grad-accum {a.grad_accum} must be >= 1"),
        (a.checkpoint_every >= 0, f"--checkpoint-every {a.checkpoint_every} must be >= 0"),
        (a.keep >= 0, f"--keep {a.keep} must be >= 0"),
        (a.max_bad_steps >= 1, f"--max-bad-steps {a.max_bad_steps} must be >= 1"),
        (a.grad_clip >= 0, f"--grad-clip {a.grad_clip} must be >= 0"),
        (a.patience >= 0, f"--patience {a.patience} must be >= 0"),
        (a.val_tokens >= 1, f"--val-tokens {a.val_tokens} must be >= 1"),
        (a.seed >= 0, f"--seed {a.seed} must be >= 0"),
        (not (a.resume and a.init), "--resume and --init exclude each other (a state already holds the weights)"),
        (a.min_lr is None or 0 <= a.min_lr <= a.lr, f"--min-lr {a.min_lr} must be between 0 and --lr {a.lr}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise UserError(msg)
    if a.patience and not a.val_dataset:
        raise UserError("--patience needs --val-dataset (early stopping watches the validation loss)")


def run(a: TrainArgs, fault_steps: frozenset = frozenset()) -> tuple[dict, "object"]:
    """Check every input, train, and return (summary, TrainResult)."""
    from smedjan.data.loader import Loader, n_sequential_batches
    from smedjan.device import pick_device
    from smedjan.formats.checkpoint import load_checkpoint
    from smedjan.formats.tokens import TokenFile, check_tokenizer_match
    from smedjan.optim import OptimizerSettings, build_optimizer, param_groups
    from smedjan.tokenizer import Tokenizer
    from smedjan.training.dist import init_distributed
    from smedjan.training.loop import Trainer, TrainerConfig
    from smedjan.training.state import load_model_weights, read_train_state

    _check_flags(a)
    tok = Tokenizer.load(a.tokenizer)
    train_tf = TokenFile.open(a.dataset)
    check_tokenizer_match(train_tf, tok, a.tokenizer)
    val_tf = None
    if a.val_dataset:
        val_tf = TokenFile.open(a.val_dataset)
        check_tokenizer_match(val_tf, tok, a.tokenizer)
    ckpt_dir = Path(a.checkpoint_dir)
    if ckpt_dir.exists() and not ckpt_dir.is_dir():
        raise UserError(f"{ckpt_dir}: --checkpoint-dir is a file, expected a folder")

    base, base_path, resumed, init_ck = None, None, None, None
    if a.resume:
        resumed = read_train_state(a.resume, "train")
        base, base_path = resumed.ck.config, a.resume
    elif a.init:
        init_ck = load_checkpoint(a.init)
        base, base_path = init_ck.config, a.init
    for path, fp in ((a.resume, resumed and resumed.ck.fingerprint), (a.init, init_ck and init_ck.fingerprint)):
        if path and not fp:
            raise UserError(f"{path}: records no tokenizer fingerprint, so it cannot be checked against {a.tokenizer}")
        if path and fp != tok.fingerprint:
            raise UserError(f"{path}: made with tokenizer {fp}, but {a.tokenizer} has fingerprint {tok.fingerprint}")
    cfg = model_config_for(a, tok.vocab_size, base, base_path)

    device = pick_device(a.device)
    ctx = init_distributed(device)
    device = ctx.device
    amp = _precision(a, device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for any matmul left in float32

    loader = Loader(train_tf, batch_size=a.batch_size, seq_len=a.seq_len, seed=a.seed, rank=ctx.rank,
                    world_size=ctx.world_size, bos_aligned=a.bos_aligned, stream=a.stream)
    if val_tf is not None:
        n_sequential_batches(val_tf, a.batch_size, a.seq_len, ctx.world_size)  # refuses a too-short val.bin
    tokens_per_step = a.batch_size * a.seq_len * a.grad_accum * ctx.world_size
    steps, how = resolve_horizon(a, cfg, tokens_per_step)
    min_ratio = 0.1 if a.min_lr is None else a.min_lr / a.lr
    schedule = Schedule(a.lr_schedule, total_steps=steps, warmup=a.warmup, min_ratio=min_ratio,
                        warmdown=a.warmdown)

    torch.manual_seed(a.seed)
    model = Transformer(cfg)
    if init_ck is not None:
        load_model_weights(model, init_ck)
    model.to(device)
    optimizer = build_optimizer(a.optimizer, param_groups(model, a.weight_decay),
                                OptimizerSettings(lr=a.lr, beta2=a.adamw_beta2, weight_decay=a.weight_decay),
                                device=device)
    run_config = {k: v for k, v in dataclasses.asdict(a).items()}
    run_config["steps"] = steps
    loggers = (_Wandb(a.run, run_config),) if (a.run and a.run != "dummy" and ctx.is_main) else ()
    evaluator = None
    if val_tf is not None:
        evaluator = make_evaluator(val_tf, a.batch_size, a.seq_len, a.val_tokens, tok.token_byte_lengths, ctx)
    tcfg = TrainerConfig(
        tool="train", steps=steps, checkpoint_dir=ckpt_dir, checkpoint_every=a.checkpoint_every, keep=a.keep,
        grad_accum=a.grad_accum, grad_clip=a.grad_clip, max_bad_steps=a.max_bad_steps,
        eval_every=a.eval_every or 0, patience=a.patience, sample_every=a.sample_every, amp_dtype=amp,
        compile=a.compile, flops_per_token=cfg.flops_per_token(a.seq_len),
        peak_flops=a.peak_flops if device.type == "cuda" else 0.0, fault_steps=fault_steps)
    trainer = Trainer(model, optimizer, schedule, loader, lm_loss, tcfg, tokenizer=tok, model_config=cfg,
                      run_config=run_config, evaluator=evaluator,
                      sampler=make_sampler(tok) if a.sample_every else None, dist=ctx, loggers=loggers)
    if resumed is not None:
        trainer.resume(resumed)
        changed = [f"--{k.replace('_', '-')} {resumed.run_config.get(k)!r} -> {v!r}" for k, v in run_config.items()
                   if k not in _RESUME_FREE and resumed.run_config.get(k) != v]
        if changed and ctx.is_main:
            warn(f"resuming with changed flags ({'; '.join(changed)}): the run will not repeat the original exactly")

    if ctx.is_main:
        if a.warmup >= steps:
            warn(f"--warmup {a.warmup} >= {steps} steps: the learning rate never reaches --lr")
        log(f"model: {cfg.preset} {cfg.describe()}, "
            f"context {cfg.max_seq_len}: {cfg.n_params():,} parameters ({cfg.n_params(embedding=False):,} "
            f"non-embedding)")
        log(f"data: {train_tf.n_tokens:,} tokens; {tokens_per_step:,} tokens/step ({a.batch_size} x {a.seq_len} x "
            f"{a.grad_accum} accum x {ctx.world_size} rank(s)); {steps:,} steps from {how}"
            + (f", resuming at step {trainer.step}" if resumed else ""))
        log(f"device: {device}{' x ' + str(ctx.world_size) if ctx.enabled else ''}, "
            f"{'bf16 autocast' if amp else 'fp32'}{', compiled' if a.compile else ''}; threads {torch.get_num_threads()}")
    try:
        result = trainer.fit()
    finally:
        ctx.close()
    summary = {
        "reason": result.reason, "steps": result.step, "loss": result.last_loss,
        **{k: v for k, v in result.last_eval.items()},
        **({"best_val_loss": result.best.get("val_loss"), "best_step": result.best.get("step")} if result.best else {}),
        "skipped_steps": result.skipped_steps, "tokens": result.tokens, "params": cfg.n_params(),
        "seconds": round(result.seconds, 2), "final": str(result.final) if result.final else None,
        "last_state": str(result.last_state) if result.last_state else None,
        "world_size": ctx.world_size, "rank": ctx.rank,
    }
    return summary, result


def fault_steps_from_env() -> frozenset:
    """SMEDJAN_FAULT_NONFINITE_STEPS="3,4,5": make those steps' loss NaN (tests, drills)."""
    raw = os.environ.get("SMEDJAN_FAULT_NONFINITE_STEPS", "").strip()
    try:
        return frozenset(int(s) for s in raw.split(",") if s.strip())
    except ValueError:
        raise UserError(f"SMEDJAN_FAULT_NONFINITE_STEPS={raw!r} must be comma-separated step numbers") from None
