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

import functools
import math
from dataclasses import dataclass

import torch

from smedjan.console import log
from smedjan.errors import UserError
from smedjan.model import ModelConfig, Transformer
from smedjan.options import option, retitled
from smedjan.training.curriculum import CurriculumSource
from smedjan.training.driver import (check_folder, check_run, fault_steps_from_env, fit, resolve_total_batch, setup,
                                     summary_of)
from smedjan.training import mtp
from smedjan.training.heads import FusedCE
from smedjan.training.options import ARCH_FLAGS, ModelOptions, RunOptions, described_by, model_config

__all__ = ["TrainArgs", "run", "lm_loss", "make_evaluator", "make_sampler", "fault_steps_from_env"]

DEFAULT_STEPS = 50_000
H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s of one H100 SXM
VAL_TOKENS = 262_144


@dataclass(kw_only=True)
class TrainArgs(RunOptions, ModelOptions):
    dataset: str = option(help="Token file to train on (train.bin from `smedjan prepare`).")
    tokenizer: str = option(help="tokenizer.bin the dataset was made with.", short="-t")
    val_dataset: str | None = option(None, "Held-out token file: val loss and bits-per-byte at every --eval-every "
                                           "steps.")
    seq_len: int = option(256, "Tokens per sequence.")
    steps: int | None = retitled(RunOptions, "steps", None, help="Optimizer steps. Default 50000 unless "
                                 "--target-flops or --target-param-data-ratio.")
    target_flops: float | None = option(None, "Train for this many FLOPs (as `smedjan sizes` counts them per "
                                              "token); sets the steps.")
    target_param_data_ratio: float | None = option(None, "Train on ratio x parameters tokens (Chinchilla: 20); "
                                                         "sets the steps.")
    warmup: int = retitled(RunOptions, "warmup", 2000, help="Steps of linear LR warmup.")
    checkpoint_dir: str = retitled(RunOptions, "checkpoint_dir", "checkpoints", help="Folder for state_N.bin, "
                                   "final.bin, best.bin and metrics.jsonl.")
    init: str | None = option(None, "Start from this checkpoint's weights (final.bin or a state) with a fresh "
                                    "optimizer at step 0. Its config is used unless --size or --depth is given, "
                                    "which must then describe the same model.")
    bos_aligned: bool = option(False, "Start every sequence at a document's BOS (default: random windows).")
    stream: bool = option(False, "Read the dataset in order, window after window, instead of random windows.")
    val_tokens: int = option(VAL_TOKENS, "Validation target tokens per evaluation (from the start of --val-dataset; "
                                      "needs --val-dataset).")
    eval_every: int | None = retitled(RunOptions, "eval_every", None, help="Evaluate every N steps (default: "
                                      "--checkpoint-every; needs --val-dataset).")
    sample_every: int = option(0, "Print a short sample every N steps (0: never).")
    peak_flops: float = option(H100_BF16_PEAK, "Peak FLOP/s of one GPU for MFU (H100 bf16 dense).")
    run: str | None = option(None, "Weights & Biases run name (needs wandb); unset or 'dummy' disables it.")
    # Sequence-length warmup (smedjan.training.curriculum)
    curriculum: int = option(0, "Sequence-length warmup (Li et al. 2022): over the first N steps the training "
                                "windows grow linearly from 8 tokens to --seq-len, in multiples of 8, by truncating "
                                "each batch's windows (0: off; the paper warms up over a few times the LR warmup).")
    # Multi-token prediction (smedjan.training.mtp, smedjan.model.mtp)
    n_predict: int | None = option(None, "Tokens predicted at each position: the next one plus N-1 more through "
                                         "DeepSeek-V3's sequential multi-token-prediction modules (each one block "
                                         "sharing the embedding and head; dropped at export, kept in final.bin for "
                                         "`generate --speculative`). Default 1 (no modules) for a new model, the "
                                         "checkpoint's with --init or --resume; --init may add or drop modules.")
    mtp_weight: float = option(0.3, "With --n-predict >= 2: loss = next-token CE + λ / (N-1) x the sum of the MTP "
                                    "depths' CEs, λ = this for the first 10/14.8 of the steps (DeepSeek-V3: 0.3 "
                                    "for its first 10T of 14.8T tokens).")
    mtp_weight_final: float | None = option(None, "λ for the rest of the steps (default --mtp-weight / 3: "
                                                  "DeepSeek-V3's 0.1).")


def lm_loss(model: torch.nn.Module, batch, head=None) -> tuple[torch.Tensor, dict]:
    """Next-token cross-entropy over x, y int64 [B, T] (mean over the B*T targets), through
    `head` when given (--fused-ce: `smedjan.training.heads.FusedCE`)."""
    x, y = batch
    return model(x, y, head=head), {"tokens": x.numel()}


# ---------------------------------------------------------------------------- config
def _pre_yarn_len(cfg: ModelConfig) -> int:
    return cfg.rope.original_max_seq_len if cfg.rope.scaling == "yarn" else cfg.max_seq_len


def apply_yarn(cfg: ModelConfig, factor: float, where: str) -> ModelConfig:
    """cfg with its context extended `factor` times by YaRN (idempotent for the same factor)."""
    if factor < 1.0:
        raise UserError(f"`yarn_scale` {factor} must be >= 1")
    if factor == 1.0 or (cfg.rope.scaling == "yarn" and cfg.rope.factor == factor):
        return cfg
    if cfg.rope.scaling != "none":
        raise UserError(f"{where}: the model already uses {cfg.rope.scaling} RoPE scaling (factor "
                        f"{cfg.rope.factor}); `yarn_scale` cannot be stacked on it")
    return cfg.replace(rope_scaling="yarn", rope_factor=factor, rope_original_max_seq_len=cfg.max_seq_len,
                       max_seq_len=int(round(cfg.max_seq_len * factor)))


def model_config_for(a: TrainArgs, vocab_size: int, base: ModelConfig | None, base_path: str | None) -> ModelConfig:
    """The run's model config from the flags and the --init/--resume checkpoint's (`base`)."""
    if base is None:
        cfg = model_config(a, vocab_size, a.max_seq_len or a.seq_len)
        cfg = apply_yarn(cfg, a.yarn_scale, "`yarn_scale`")
        where = "`max_seq_len`" if a.max_seq_len else "`seq_len`"
    elif not described_by(a):
        given = [f"`{n}`" for n in ARCH_FLAGS if getattr(a, n) not in (None, ModelOptions.__dataclass_fields__[n].default)]
        if given:
            raise UserError(f"{', '.join(given)} need `size` (or `depth`) when starting from {base_path} (without "
                            "them its config is used as is)")
        cfg = apply_yarn(base, a.yarn_scale, base_path)
        where = base_path
    else:
        built = model_config(a, vocab_size, a.max_seq_len or _pre_yarn_len(base))
        cfg = apply_yarn(built, a.yarn_scale, base_path)
        want = apply_yarn(base, a.yarn_scale, base_path)
        from smedjan.training.state import config_diff

        diff = config_diff(want, cfg.replace(preset=want.preset))
        if diff:
            chosen = f"`size` {a.size}" if a.size is not None else f"`depth` {a.depth}"
            raise UserError(f"{base_path}: its model differs from {chosen} and the architecture flags "
                            f"({'; '.join(diff[:3])}); leave out `size` and `depth` to use the checkpoint's config")
        cfg = want
        where = base_path
    if a.seq_len > cfg.max_seq_len:
        raise UserError(f"`seq_len` {a.seq_len} is past the model's context of {cfg.max_seq_len} positions "
                        f"(its RoPE tables, from {where}); extend it with `yarn_scale`, or use a shorter `seq_len`")
    return cfg


def resolve_horizon(a: TrainArgs, cfg: ModelConfig, tokens_per_step: int) -> tuple[int, str]:
    """(steps, how): --steps > --target-flops > --target-param-data-ratio > 50000."""
    if a.steps is not None:
        if a.steps < 1:
            raise UserError(f"`steps` {a.steps} must be >= 1")
        return a.steps, "`steps`"
    if a.target_flops is not None:
        if not a.target_flops > 0:
            raise UserError(f"`target_flops` {a.target_flops} must be positive")
        per_step = cfg.flops_per_token(a.seq_len) * tokens_per_step
        return max(1, round(a.target_flops / per_step)), f"`target_flops` {a.target_flops:.3g}"
    if a.target_param_data_ratio is not None:
        if not a.target_param_data_ratio > 0:
            raise UserError(f"`target_param_data_ratio` {a.target_param_data_ratio} must be positive")
        tokens = a.target_param_data_ratio * cfg.n_params()
        return max(1, math.ceil(tokens / tokens_per_step)), (
            f"`target_param_data_ratio` {a.target_param_data_ratio:g} ({tokens:.3g} tokens)")
    return DEFAULT_STEPS, "default"


def horizon_tokens(a: TrainArgs, cfg: ModelConfig) -> tuple[float, float] | None:
    """(tokens of a horizon given in tokens, those of nanochat's d12 reference at the same
    tokens:parameter ratio; 12 with `target_flops`, nanochat's default) for `total_batch_size` -1."""
    if a.steps is not None:
        return None
    ref = ModelConfig.from_depth(cfg.vocab_size, 12).n_params()
    if a.target_flops is not None:
        return a.target_flops / cfg.flops_per_token(a.seq_len), 12 * ref
    if a.target_param_data_ratio is not None:
        return a.target_param_data_ratio * cfg.n_params(), a.target_param_data_ratio * ref
    return None


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
def _check_flags(a: TrainArgs) -> None:
    check_run(a)
    checks = [
        (a.seq_len >= 1, f"`seq_len` {a.seq_len} must be >= 1"),
        (a.val_tokens >= 1, f"`val_tokens` {a.val_tokens} must be >= 1"),
        (a.sample_every >= 0, f"`sample_every` {a.sample_every} must be >= 0"),
        (a.curriculum >= 0, f"`curriculum` {a.curriculum} must be >= 0"),
        (not (a.resume and a.init), "`resume` and `init` exclude each other (a state already holds the weights)"),
    ]
    for ok, msg in checks:
        if not ok:
            raise UserError(msg)
    if not a.val_dataset:
        # flags that only mean something with a validation set are refused, not ignored
        given = [f"`{n}`" for n, set_ in (("patience", a.patience > 0), ("eval_every", a.eval_every is not None),
                                          ("val_tokens", a.val_tokens != VAL_TOKENS)) if set_]
        if given:
            verb = "needs" if len(given) == 1 else "need"
            raise UserError(f"{', '.join(given)} {verb} `val_dataset` (without a validation set it would be ignored)")


def run(a: TrainArgs, fault_steps: frozenset = frozenset()) -> tuple[dict, "object"]:
    """Check every input, train, and return (summary, TrainResult)."""
    from smedjan.data.loader import Loader, n_sequential_batches
    from smedjan.formats.checkpoint import load_checkpoint
    from smedjan.formats.tokens import TokenFile, check_tokenizer_match
    from smedjan.tokenizer import Tokenizer
    from smedjan.training.state import read_train_state

    _check_flags(a)
    mtp.check_flags(a)
    tok = Tokenizer.load(a.tokenizer)
    train_tf = TokenFile.open(a.dataset)
    check_tokenizer_match(train_tf, tok, a.tokenizer)
    val_tf = None
    if a.val_dataset:
        val_tf = TokenFile.open(a.val_dataset)
        check_tokenizer_match(val_tf, tok, a.tokenizer)
    ckpt_dir = check_folder(a.checkpoint_dir)

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
    base_n_predict = base.mtp.n_predict if base is not None else None
    base = mtp.trunk_config(base)  # the flags describe the trunk; --n-predict the MTP modules
    cfg = model_config_for(a, tok.vocab_size, base, base_path)
    cfg = mtp.config_with_n_predict(a, cfg, base_n_predict, resuming=resumed is not None)

    ctx, device, amp = setup(a)
    loader = Loader(train_tf, batch_size=a.batch_size, seq_len=a.seq_len, seed=a.seed, rank=ctx.rank,
                    world_size=ctx.world_size, bos_aligned=a.bos_aligned, stream=a.stream)
    if val_tf is not None:
        n_sequential_batches(val_tf, a.batch_size, a.seq_len, ctx.world_size)  # refuses a too-short val.bin
    lr_scale = resolve_total_batch(a, a.seq_len, ctx.world_size, horizon_tokens(a, cfg))
    tokens_per_step = a.batch_size * a.seq_len * a.grad_accum * ctx.world_size
    steps, how = resolve_horizon(a, cfg, tokens_per_step)

    torch.manual_seed(a.seed)
    model = Transformer(cfg)
    if init_ck is not None:
        mtp.load_init_weights(model, init_ck)
    model.to(device)
    loggers = (_Wandb(a.run, {**vars(a), "steps": steps}),) if (a.run and a.run != "dummy" and ctx.is_main) else ()
    evaluator = None
    if val_tf is not None:
        evaluator = make_evaluator(val_tf, a.batch_size, a.seq_len, a.val_tokens, tok.token_byte_lengths, ctx)
    if ctx.is_main:
        log(f"data: {train_tf.n_tokens:,} tokens; {tokens_per_step:,} tokens/step ({a.batch_size} x {a.seq_len} x "
            f"{a.grad_accum} accum x {ctx.world_size} rank(s)); {steps:,} steps from {how}")
    loss_fn = functools.partial(lm_loss, head=FusedCE()) if a.fused_ce else lm_loss
    if cfg.mtp.depth:
        loss_fn = mtp.MTPObjective(a.mtp_weight, a.mtp_weight_final, steps, fused=a.fused_ce)
    source = CurriculumSource(loader, a.curriculum, a.seq_len, a.grad_accum) if a.curriculum else loader
    result, _ = fit("train", a, model, tok, cfg, source, loss_fn, steps, ctx, amp, ckpt_dir, resumed,
                    evaluator=evaluator, sampler=make_sampler(tok) if a.sample_every else None,
                    flops_per_token=cfg.flops_per_token(a.seq_len), peak_flops=a.peak_flops, loggers=loggers,
                    fault_steps=fault_steps, lr_scale=lr_scale)
    summary = {**summary_of(result), "params": cfg.n_params(), "final": str(result.final) if result.final else None,
               "world_size": ctx.world_size, "rank": ctx.rank}
    return summary, result
