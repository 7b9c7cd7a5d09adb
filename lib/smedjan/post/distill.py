"""Logit distillation: a student learns a teacher's next-token distributions on a token file.

Per target position, with temperature T and the softened distributions
p_T = softmax(teacher_logits / T) and p_S = softmax(student_logits / T):

    loss = alpha * T^2 * KL(p_T || p_S) + (1 - alpha) * CE(student_logits, next token)

KL is the forward KL (teacher || student), summed over the vocabulary and averaged over
positions; the T^2 factor keeps its gradient on the scale of the CE's as T changes
(Hinton et al. 2015). alpha = 1 is pure distillation, alpha = 0 plain pretraining.

Teacher and student share the tokenizer: a new student takes the teacher's (its vocabulary
size included); a student started from --init must carry the same tokenizer fingerprint,
and so must the dataset. The teacher stays in memory (frozen, eval mode) during training.

    loss, kl, ce = distill_loss(student(x), teacher(x), y, temperature=2.0, alpha=0.5)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from smedjan.errors import UserError
from smedjan.options import option, retitled
from smedjan.post.run import PostArgs
from smedjan.training.heads import FusedDistill
from smedjan.training.options import ModelOptions, RunOptions, model_config


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, y: torch.Tensor, temperature: float,
                 alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(alpha * T^2 * KL + (1 - alpha) * CE, KL term before weighting, CE). logits [B, T, V] (float32
    inside), y [B, T] int64 next tokens."""
    V = student_logits.size(-1)
    s = student_logits.float().reshape(-1, V)
    t = teacher_logits.float().reshape(-1, V).detach()
    log_ps = F.log_softmax(s / temperature, dim=-1)
    log_pt = F.log_softmax(t / temperature, dim=-1)
    # KL(p_T || p_S) per position, [B*T], then the mean over positions.
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean() * temperature ** 2
    ce = F.cross_entropy(s, y.reshape(-1))
    return alpha * kl + (1 - alpha) * ce, kl.detach(), ce.detach()


def make_distill_loss(teacher: torch.nn.Module, temperature: float, alpha: float, fused: bool = False):
    """loss_fn(student, (x, y)) for the Trainer; the teacher runs frozen under no_grad.
    `fused` (--fused-ce): the same loss from both models' final hidden states, a chunk of
    positions at a time (`smedjan.training.heads.FusedDistill`): no logits of either."""
    if not temperature > 0:
        raise UserError(f"--temperature {temperature} must be positive")
    if not 0 <= alpha <= 1:
        raise UserError(f"--alpha {alpha} must be in [0, 1]")
    head = FusedDistill(teacher, temperature, alpha) if fused else None

    def loss_fn(model, batch):
        x, y = batch
        if head is not None:
            with torch.no_grad():
                t_hidden = teacher.hidden(x)
            loss, kl, ce = model(x, (y, t_hidden), head=head)
        else:
            with torch.no_grad():
                t_logits = teacher(x)
            loss, kl, ce = distill_loss(model(x), t_logits, y, temperature, alpha)
        return loss, {"tokens": x.numel(), "kl": kl, "ce": ce}

    return loss_fn


# ------------------------------------------------------------------------------- the run
@dataclass(kw_only=True)
class DistillArgs(PostArgs, ModelOptions):
    teacher: str = option(help="Teacher model checkpoint (carries the tokenizer).")
    dataset: str = option(help="Token file to distil on (made with the teacher's tokenizer).")
    val_dataset: str | None = option(None, "Held-out token file: student (and teacher) val loss and bits per byte.")
    init: str | None = option(None, "Start the student from this checkpoint (same tokenizer as the teacher).")
    size: str | None = retitled(ModelOptions, "size", None, help="Student size: tiny, small, medium, large, max "
                                "or custom (default small; not with --init). The other architecture flags shape "
                                "the student as in `smedjan train`.")
    seq_len: int = option(256, "Tokens per sequence.")
    temperature: float = option(2.0, "Softmax temperature T of the KL term.")
    alpha: float = option(0.5, "Weight of the KL term; 1 - alpha weighs the CE.")
    val_tokens: int = option(262_144, "Validation target tokens per evaluation (from the start of --val-dataset).")
    bos_aligned: bool = option(False, "Start every sequence at a document's BOS (default: random windows).")
    batch_size: int = retitled(RunOptions, "batch_size", 32)
    lr: float = retitled(RunOptions, "lr", 3e-4)
    weight_decay: float = retitled(RunOptions, "weight_decay", 0.1)


def student_config(a: DistillArgs, teacher_cfg, init_ck):
    """The student's ModelConfig: --init's, or built from the architecture flags at the teacher's vocabulary."""
    from smedjan.training.options import ARCH_FLAGS, ModelOptions
    from smedjan.training.pretrain import apply_yarn

    if init_ck is not None:
        defaults = ModelOptions.__dataclass_fields__
        given = [f"`{n}`" for n in ("size", *ARCH_FLAGS, "yarn_scale") if getattr(a, n) != defaults[n].default]
        if given:
            raise UserError(f"{', '.join(given)} cannot be combined with `init` (the student is {a.init}'s model)")
        return init_ck.config
    cfg = model_config(a, teacher_cfg.vocab_size, a.max_seq_len or a.seq_len)
    return apply_yarn(cfg, a.yarn_scale, "`yarn_scale`")


def run(a: DistillArgs, fault_steps: frozenset = frozenset()) -> tuple[dict, object]:
    """Check every input, distil, write --output; returns (summary, TrainResult)."""
    from smedjan.console import log
    from smedjan.data.loader import Loader, n_sequential_batches
    from smedjan.formats.checkpoint import load_checkpoint
    from smedjan.formats.tokens import TokenFile, check_tokenizer_match
    from smedjan.model import Transformer, model_from_checkpoint
    from smedjan.post.run import base_summary, check_common, resolve_steps, train_model
    from smedjan.training.driver import resolve_total_batch, setup
    from smedjan.training.pretrain import make_evaluator

    if not a.seq_len >= 1:
        raise UserError(f"`seq_len` {a.seq_len} must be >= 1")
    if not a.val_tokens >= 1:
        raise UserError(f"`val_tokens` {a.val_tokens} must be >= 1")
    make_distill_loss(torch.nn.Identity(), a.temperature, a.alpha)  # flag checks before any loading
    ckpt_dir, resumed = check_common(a, "distill")
    t_ck = load_checkpoint(a.teacher)
    try:
        tok = t_ck.tokenizer
    except UserError:
        raise UserError(f"{a.teacher}: the teacher carries no tokenizer; the student takes the teacher's") from None
    t_cfg = t_ck.config
    init_ck = load_checkpoint(a.init) if a.init else None
    if init_ck is not None and init_ck.fingerprint != tok.fingerprint:
        raise UserError(f"{a.init}: made with tokenizer {init_ck.fingerprint or '(none)'}, the teacher {a.teacher} "
                        f"with {tok.fingerprint}; teacher and student must share a tokenizer")
    train_tf = TokenFile.open(a.dataset)
    check_tokenizer_match(train_tf, tok, f"the teacher {a.teacher}")
    val_tf = None
    if a.val_dataset:
        val_tf = TokenFile.open(a.val_dataset)
        check_tokenizer_match(val_tf, tok, f"the teacher {a.teacher}")
    cfg = student_config(a, t_cfg, init_ck)
    if cfg.vocab_size != t_cfg.vocab_size:
        raise UserError(f"the student has {cfg.vocab_size} tokens, the teacher {t_cfg.vocab_size}")
    for who, c in (("teacher", t_cfg), ("student", cfg)):
        if a.seq_len > c.max_seq_len:
            raise UserError(f"`seq_len` {a.seq_len} is past the {who}'s context of {c.max_seq_len} positions")

    ctx, device, amp = setup(a)
    loader = Loader(train_tf, batch_size=a.batch_size, seq_len=a.seq_len, seed=a.seed, rank=ctx.rank,
                    world_size=ctx.world_size, bos_aligned=a.bos_aligned)
    if val_tf is not None:
        n_sequential_batches(val_tf, a.batch_size, a.seq_len, ctx.world_size)  # refuses a too-short val file
    lr_scale = resolve_total_batch(a, a.seq_len, ctx.world_size)
    per_step = a.batch_size * a.seq_len * a.grad_accum * ctx.world_size
    steps, how = resolve_steps(a, per_step, train_tf.n_tokens, "tokens")
    teacher = model_from_checkpoint(t_ck, device).eval().requires_grad_(False)
    torch.manual_seed(a.seed)
    model = model_from_checkpoint(init_ck, device) if init_ck is not None else Transformer(cfg).to(device)
    evaluator, teacher_val = None, None
    if val_tf is not None:
        evaluator = make_evaluator(val_tf, a.batch_size, a.seq_len, a.val_tokens, tok.token_byte_lengths, ctx)
        with torch.no_grad():
            teacher_val = evaluator(teacher)
    if ctx.is_main:
        log(f"teacher: {t_cfg.describe()}, {t_cfg.n_params():,} parameters; student "
            f"{t_cfg.n_params() / cfg.n_params():.1f}x smaller; T {a.temperature:g}, alpha {a.alpha:g}; "
            f"{steps:,} steps from {how}")
    loss_fn = make_distill_loss(teacher, a.temperature, a.alpha, a.fused_ce)
    result, _ = train_model("distill", a, model, tok, cfg, loader, loss_fn,
                            steps, ctx, amp, ckpt_dir, resumed, evaluator=evaluator,
                            flops_per_token=cfg.flops_per_token(a.seq_len), fault_steps=fault_steps, lr_scale=lr_scale)
    summary = base_summary(result, a)
    if teacher_val is not None:
        summary.update({f"teacher_{k}": v for k, v in teacher_val.items()})
    summary.update({"student_params": cfg.n_params(), "teacher_params": t_cfg.n_params(),
                    "temperature": a.temperature, "alpha": a.alpha, "rank": ctx.rank})
    return summary, result
