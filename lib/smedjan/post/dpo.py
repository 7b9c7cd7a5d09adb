"""Direct preference optimisation: pairs -> token rows -> DPO losses against fixed reference log-probs.

A pair is a prompt (rendered with the generation prompt: ... <|assistant_start|>) and two
replies (each + <|assistant_end|>). A reply's log-prob is the sum over its tokens of
log p(token | everything before); the prompt is never scored.

Losses, with h = (log pi(c) - log pi(r)) - (log ref(c) - log ref(r)), beta = --beta and
eps = --label-smoothing (the formulas of Hugging Face TRL's DPOTrainer):
- `sigmoid` (DPO, Rafailov et al. 2023; with eps, conservative DPO):
      -(1 - eps) * log sigmoid(beta h) - eps * log sigmoid(-beta h)
- `ipo` (Azar et al. 2023): (h - 1 / (2 beta))^2, on log-probs averaged per reply token
- `hinge` (SLiC, Zhao et al. 2023): max(0, 1 - beta h)
- `robust` (rDPO, Chowdhury et al. 2024): (-(1 - eps) log sigmoid(beta h) + eps log sigmoid(-beta h)) / (1 - 2 eps)
Implicit rewards: rewards/chosen = beta (log pi(c) - log ref(c)), rewards/rejected likewise;
rewards/margins = their difference; rewards/accuracies = the fraction with chosen > rejected.

Reference log-probs are computed once, before training, with the reference model (the
starting --checkpoint, or --ref-checkpoint) and kept as two float64 numbers per pair, so no
reference model is in memory while training. On --resume they are recomputed from the same
reference (deterministic) and checked against the sums recorded in the state: a different
reference or data is refused.

Too long (prompt + reply > max_len input positions): `truncate` (default) cuts the prompt
from the left, keeping <|bos|>, down to what fits (but never below max_prompt_len tokens),
then cuts the replies from the right; `skip` drops the pair. Both are counted.

    pairs = tokenize_pairs(tok, load_pairs(paths)[0], max_len=256, max_prompt_len=128, too_long="truncate", report=r)
    ref = pair_logps(model, pairs, batch_size=8, device=dev)          # float64 [N, 2]
    loss_fn = make_dpo_loss(beta=0.1, loss="sigmoid", label_smoothing=0.0)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from smedjan.errors import UserError
from smedjan.post.batching import ShuffledBatches, digest_rows, pad_rows
from smedjan.post.formats import LoadReport, Pair
from smedjan.options import option, retitled
from smedjan.post.run import ChatDataArgs, PostArgs
from smedjan.post.sft import TOO_LONG, pad_id
from smedjan.training.heads import FusedCE

LOSSES = ("sigmoid", "ipo", "hinge", "robust")


# ------------------------------------------------------------------------------ losses
def dpo_loss(pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor, beta: float,
             loss: str = "sigmoid", label_smoothing: float = 0.0):
    """Per-pair losses [B] and the implicit rewards (chosen [B], rejected [B], detached).
    pc/pr: policy log-probs of chosen/rejected [B]; rc/rr: the reference's."""
    h = (pc - pr) - (rc - rr)
    eps = label_smoothing
    if loss == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss == "hinge":
        losses = torch.relu(1 - beta * h)
    elif loss == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    else:
        raise UserError(f"--loss {loss!r} is not one of {', '.join(LOSSES)}")
    return losses, (beta * (pc - rc)).detach(), (beta * (pr - rr)).detach()


def check_loss_flags(beta: float, loss: str, label_smoothing: float) -> None:
    if loss not in LOSSES:
        raise UserError(f"--loss {loss!r} is not one of {', '.join(LOSSES)}")
    if not beta > 0:
        raise UserError(f"--beta {beta} must be positive")
    if not 0 <= label_smoothing < 0.5:
        raise UserError(f"--label-smoothing {label_smoothing} must be in [0, 0.5)")
    if label_smoothing and loss not in ("sigmoid", "robust"):
        raise UserError(f"--label-smoothing applies to the sigmoid and robust losses, not {loss}")


def sequence_logps(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """float32 [R]: the summed log-prob of each row's targets (y != -1). logits [R, T, V], y [R, T]."""
    nll = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), ignore_index=-1,
                          reduction="none")
    return -nll.view(y.shape).sum(-1)


# -------------------------------------------------------------------------- tokenizing
@dataclass
class TokPair:
    prompt: np.ndarray  # int32: <|bos|> ... <|assistant_start|>
    chosen: np.ndarray  # int32: reply tokens + <|assistant_end|>
    rejected: np.ndarray
    where: str


def tokenize_pairs(tok, pairs: list[Pair], max_len: int, max_prompt_len: int, too_long: str,
                   report: LoadReport) -> list[TokPair]:
    """Rendered, length-checked pairs; skips and truncations are counted in `report`."""
    from smedjan.chat import render

    if too_long not in TOO_LONG:
        raise UserError(f"--too-long {too_long!r} is not one of {', '.join(TOO_LONG)}")
    if not 2 <= max_prompt_len < max_len:
        raise UserError(f"--max-prompt-len {max_prompt_len} must be between 2 and --max-len {max_len} - 1")
    out = []
    for p in pairs:
        prompt = render(tok, p.prompt, add_generation_prompt=True).ids
        replies = []
        for text in (p.chosen, p.rejected):
            full = render(tok, p.prompt + [{"role": "assistant", "content": text}]).ids
            assert full[:len(prompt)] == prompt, "the chat format must extend the generation prompt"
            replies.append(full[len(prompt):])
        c, r = replies
        longest = max(len(c), len(r))
        if len(prompt) + longest - 1 > max_len:
            if too_long == "skip":
                report.skip(f"longer than the context of {max_len} tokens", p.where)
                continue
            keep = min(len(prompt), max(max_len + 1 - longest, max_prompt_len))
            prompt = prompt[:1] + prompt[len(prompt) - keep + 1:]  # <|bos|> + the prompt's last keep-1 tokens
            room = max_len + 1 - keep
            c, r = c[:room], r[:room]
            report.truncated += 1
            report.first_truncated = report.first_truncated or p.where
            if c == r:
                report.skip("chosen and rejected identical after truncation", p.where)
                continue
        out.append(TokPair(np.asarray(prompt, np.int32), np.asarray(c, np.int32), np.asarray(r, np.int32), p.where))
    return out


def _row(prompt: np.ndarray, reply: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x = ids[:-1]; y = ids[1:] on the reply's tokens, -1 on the prompt's."""
    ids = np.concatenate([prompt, reply])
    y = ids[1:].copy()
    y[:len(prompt) - 1] = -1
    return ids[:-1], y


def collate(pairs: list[TokPair], idx, pad: int):
    """x, y [2B, L] int64 (rows 0..B-1 chosen, B..2B-1 rejected; padded), reply token counts [2B]
    float64, the pairs' indices [B] int64, and the real input tokens."""
    rows = [_row(pairs[i].prompt, pairs[i].chosen) for i in idx] + [_row(pairs[i].prompt, pairs[i].rejected)
                                                                    for i in idx]
    x = pad_rows([r[0] for r in rows], pad)
    y = pad_rows([r[1] for r in rows], -1)
    counts = torch.tensor([float((r[1] >= 0).sum()) for r in rows], dtype=torch.float64)
    return x, y, counts, torch.as_tensor(np.asarray(idx), dtype=torch.int64), sum(len(r[0]) for r in rows)


@torch.no_grad()
def pair_logps(model, pairs: list[TokPair], batch_size: int, device, amp=None, rank: int = 0,
               world_size: int = 1, ctx=None, show: str | None = None) -> torch.Tensor:
    """float64 [N, 2] on the CPU: summed log-probs of each pair's chosen and rejected reply.
    Under DDP each rank scores its share and `ctx` sums them. `show`: a progress label."""
    from smedjan.console import progress

    was_training = model.training
    model.eval()
    out = torch.zeros(len(pairs), 2, dtype=torch.float64, device=device)
    mine = [i for i in range(len(pairs)) if i % world_size == rank]
    ac = torch.autocast(device.type, amp) if amp else contextlib.nullcontext()
    bar_cm = progress(show, total=len(mine)) if show and rank == 0 else contextlib.nullcontext()
    try:
        with bar_cm as bar:
            for s in range(0, len(mine), batch_size):
                idx = mine[s:s + batch_size]
                x, y, _, _, _ = collate(pairs, idx, 0)
                with ac:
                    lp = sequence_logps(model(x.to(device)), y.to(device)).double()
                B = len(idx)
                out[idx, 0], out[idx, 1] = lp[:B], lp[B:]
                if bar is not None:
                    bar.advance(B)
    finally:
        model.train(was_training)
    if ctx is not None:
        ctx.all_reduce_sum(out)
    return out.cpu()


# ---------------------------------------------------------------------- source and loss
class DpoSource(ShuffledBatches):
    """Shuffled pair batches carrying each pair's reference log-probs."""

    def __init__(self, pairs: list[TokPair], ref: torch.Tensor, tok, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1):
        pad = pad_id(tok)
        self.ref = ref  # float64 [N, 2]
        digest = digest_rows([p.prompt for p in pairs] + [p.chosen for p in pairs] + [p.rejected for p in pairs])

        def make(idx):
            x, y, counts, ids, n = collate(pairs, idx, pad)
            r = torch.cat([ref[ids, 0], ref[ids, 1]])  # [2B], rows as in x
            return x, y, counts, r, n

        super().__init__(len(pairs), batch_size, seed, make, rank, world_size, identity={"pairs": digest})

    def state_dict(self) -> dict:
        return {**super().state_dict(), "ref_sum": float(self.ref.sum()), "ref_abs": float(self.ref.abs().sum())}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        got, scale = state.get("ref_sum"), state.get("ref_abs")
        if not isinstance(got, (int, float)) or not isinstance(scale, (int, float)):
            raise UserError("the state has no reference log-prob check (not a `smedjan dpo` state?)")
        now = float(self.ref.sum())
        if abs(now - got) > 1e-5 * max(1.0, scale):
            raise UserError(f"the reference log-probs recomputed now (sum {now:.6g}) differ from the run's "
                            f"(sum {got:.6g}): resume with the same --checkpoint / --ref-checkpoint and data")


def make_dpo_loss(beta: float, loss: str, label_smoothing: float, fused: bool = False):
    """loss_fn(model, batch) -> (mean DPO loss, metrics) for the Trainer. `fused`
    (--fused-ce): the per-token log-probs come from the chunked head, without logits."""
    check_loss_flags(beta, loss, label_smoothing)
    token_nll = FusedCE(ignore_index=-1, reduction="none") if fused else None

    def loss_fn(model, batch):
        x, y, counts, ref, n_tokens = batch
        logps = -model(x, y, head=token_nll).sum(-1) if fused else sequence_logps(model(x), y)  # [2B]
        ref = ref.to(logps.dtype)
        if loss == "ipo":  # IPO compares per-token averages
            logps, ref = logps / counts.to(logps.dtype), ref / counts.to(logps.dtype)
        B = logps.shape[0] // 2
        losses, rc, rr = dpo_loss(logps[:B], logps[B:], ref[:B], ref[B:], beta, loss, label_smoothing)
        metrics = {"tokens": n_tokens, "rewards/chosen": rc.mean(), "rewards/rejected": rr.mean(),
                   "rewards/margins": (rc - rr).mean(), "rewards/accuracies": (rc > rr).float().mean(),
                   "logps/chosen": logps[:B].detach().mean(), "logps/rejected": logps[B:].detach().mean()}
        return losses.mean(), metrics

    return loss_fn


def pair_metrics(policy: torch.Tensor, ref: torch.Tensor, counts: torch.Tensor, beta: float, loss: str,
                 label_smoothing: float) -> dict:
    """Loss and reward metrics of whole sets: policy/ref float64 [N, 2] summed log-probs,
    counts [N, 2] reply tokens (for ipo's averages)."""
    if loss == "ipo":
        policy, ref = policy / counts, ref / counts
    losses, rc, rr = dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], beta, loss, label_smoothing)
    return {"loss": float(losses.mean()), "rewards/chosen": float(rc.mean()), "rewards/rejected": float(rr.mean()),
            "rewards/margins": float((rc - rr).mean()), "rewards/accuracies": float((rc > rr).double().mean())}


def reply_counts(pairs: list[TokPair]) -> torch.Tensor:
    return torch.tensor([[len(p.chosen), len(p.rejected)] for p in pairs], dtype=torch.float64)


def make_evaluator(pairs: list[TokPair], ref: torch.Tensor, batch_size: int, ctx, beta: float, loss: str,
                   label_smoothing: float):
    """evaluator(model) -> val_loss and the reward metrics over the held-out pairs."""
    counts = reply_counts(pairs)

    def evaluate(model) -> dict:
        lp = pair_logps(model, pairs, batch_size, ctx.device, None, ctx.rank, ctx.world_size, ctx)
        m = pair_metrics(lp, ref, counts, beta, loss, label_smoothing)
        return {"val_loss": m.pop("loss"), **{f"val_{k}": v for k, v in m.items()}}

    return evaluate


def recent_rewards(metrics_path, step: int, last: int = 10) -> dict:
    """Means of the reward metrics over the training batches of the run's last `last` steps
    (from metrics.jsonl), for the summary."""
    from smedjan.training.files import read_metrics

    try:
        recs = [r for r in read_metrics(metrics_path) if "rewards/accuracies" in r and step - last < r["step"] <= step]
    except (OSError, ValueError):
        return {}
    keys = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
    return {k: sum(r[k] for r in recs) / len(recs) for k in keys if recs and all(r.get(k) is not None for r in recs)}


# ------------------------------------------------------------------------------- the run
@dataclass(kw_only=True)
class DpoArgs(PostArgs, ChatDataArgs):
    checkpoint: str = retitled(ChatDataArgs, "checkpoint", help="Model to train (sft.bin); also the reference "
                               "unless --ref-checkpoint.")
    ref_checkpoint: str | None = option(None, "Reference model for the log-prob ratios (default: --checkpoint); "
                                              "same tokenizer.")
    beta: float = option(0.1, "Strength of the KL pull towards the reference.")
    loss: str = option("sigmoid", "sigmoid, ipo, hinge or robust.")
    label_smoothing: float = option(0.0, "Assumed fraction of flipped labels, in [0, 0.5) (sigmoid and robust).")
    format: str = option("auto", "auto, prompt, hh-rlhf, alpaca or sharegpt.")
    max_prompt_len: int | None = option(None, "Truncation keeps at least this many prompt tokens (default: "
                                              "--max-len / 2).")
    lr: float = retitled(PostArgs, "lr", 5e-6)


def _load_pairs(a: DpoArgs, tok, max_len: int, max_prompt_len: int):
    from smedjan.post.batching import split_indices
    from smedjan.post.formats import load_pairs

    pairs, report = load_pairs(list(a.data), a.format)
    tpairs = tokenize_pairs(tok, pairs, max_len, max_prompt_len, a.too_long, report)
    if a.val_data:
        vp, vreport = load_pairs(list(a.val_data), a.format)
        val = tokenize_pairs(tok, vp, max_len, max_prompt_len, a.too_long, vreport)
        report.merge(vreport, "val: ")
        train = tpairs
    elif tpairs:
        ti, vi = split_indices(len(tpairs), a.val_fraction, a.seed)
        train, val = [tpairs[i] for i in ti], [tpairs[i] for i in vi]
    else:
        train, val = [], []
    if not train:
        raise UserError(f"{', '.join(map(str, a.data))}: no pair fits the context of {max_len} tokens "
                        f"({report.describe_skips()})")
    return train, val, report


def run(a: DpoArgs, fault_steps: frozenset = frozenset()) -> tuple[dict, object]:
    """Check every input, score the reference once, train, write --output; returns (summary, TrainResult)."""
    from smedjan.console import log
    from smedjan.model import model_from_checkpoint
    from smedjan.post.run import base_summary, check_common, load_chat_model_checkpoint, resolve_steps, train_model
    from smedjan.training.driver import setup

    check_loss_flags(a.beta, a.loss, a.label_smoothing)
    ckpt_dir, resumed = check_common(a, "dpo")
    ck, tok = load_chat_model_checkpoint(a.checkpoint)
    cfg = ck.config
    ref_ck = None
    if a.ref_checkpoint:
        ref_ck, ref_tok = load_chat_model_checkpoint(a.ref_checkpoint)
        if ref_tok.fingerprint != tok.fingerprint:
            raise UserError(f"{a.ref_checkpoint}: made with tokenizer {ref_tok.fingerprint}, --checkpoint "
                            f"{a.checkpoint} with {tok.fingerprint}; the reference must share the tokenizer")
    max_len = a.max_len or cfg.max_seq_len
    if ref_ck is not None:
        max_len = a.max_len or min(cfg.max_seq_len, ref_ck.config.max_seq_len)
    limit = min(cfg.max_seq_len, ref_ck.config.max_seq_len if ref_ck else cfg.max_seq_len)
    if not 3 <= max_len <= limit:
        raise UserError(f"`max_len` {max_len} must be between 3 and the models' context of {limit}")
    max_prompt_len = a.max_prompt_len or max_len // 2
    train, val, report = _load_pairs(a, tok, max_len, max_prompt_len)

    ctx, device, amp = setup(a)
    # Reference log-probs, once, before any update; a separate reference is freed before training.
    ref_model = model_from_checkpoint(ref_ck if ref_ck is not None else ck, device)
    if ctx.is_main:
        log(f"scoring {len(train) + len(val):,} pairs with the reference model "
            f"({a.ref_checkpoint or a.checkpoint})")
    ref_train = pair_logps(ref_model, train, a.batch_size, device, amp, ctx.rank, ctx.world_size, ctx,
                           show="reference log-probs")
    ref_val = None
    if val:
        ref_val = pair_logps(ref_model, val, a.batch_size, device, amp, ctx.rank, ctx.world_size, ctx)
    if ref_ck is not None:
        del ref_model
        model = model_from_checkpoint(ck, device)
    else:
        model = ref_model
    per_step = a.batch_size * a.grad_accum * ctx.world_size
    steps, how = resolve_steps(a, per_step, len(train), "pairs")
    source = DpoSource(train, ref_train, tok, a.batch_size, a.seed, ctx.rank, ctx.world_size)
    evaluator = None
    if val:
        evaluator = make_evaluator(val, ref_val, a.batch_size, ctx, a.beta, a.loss, a.label_smoothing)
    if ctx.is_main:
        log(f"data: {len(train):,} pairs for training, {len(val):,} held out; formats "
            f"{', '.join(sorted(set(report.formats.values())))}; skipped: {report.describe_skips()}; truncated: "
            f"{report.truncated}; loss {a.loss}, beta {a.beta:g}; {steps:,} steps from {how}")
    loss_fn = make_dpo_loss(a.beta, a.loss, a.label_smoothing, a.fused_ce)
    result, _ = train_model("dpo", a, model, tok, cfg, source, loss_fn,
                            steps, ctx, amp, ckpt_dir, resumed, evaluator=evaluator,
                            run_config={"max_len": max_len, "max_prompt_len": max_prompt_len},
                            flops_per_token=cfg.flops_per_token(max_len), fault_steps=fault_steps)
    summary = base_summary(result, a)
    if ctx.is_main:
        summary.update(recent_rewards(ckpt_dir / "metrics.jsonl", result.step))
    summary.update({"epochs": round(source.epochs, 3), "pairs": len(train), "val_pairs": len(val),
                    "skipped": dict(report.skipped), "truncated": report.truncated, "loss_type": a.loss,
                    "beta": a.beta, "batching": "padded",
                    "formats": sorted(set(report.formats.values())), "rank": ctx.rank})
    return summary, result
