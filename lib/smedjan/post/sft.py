"""Supervised fine-tuning: conversations -> chat-format token rows -> assistant-only loss.

Each conversation is rendered by `smedjan.chat.render` (the one chat format), giving ids
and the assistant mask. The model reads x = ids[:-1] and predicts y = ids[1:]; a target
counts only where the mask marks an assistant token (each reply and its
<|assistant_end|>), else it is -1 and ignored. So y[t] = ids[t+1] if mask[t+1] else -1.

Too long (more than `max_len` input positions, i.e. len(ids) - 1 > max_len):
`too_long="truncate"` (default) keeps the first max_len + 1 tokens (later turns are cut,
and the cut reply loses its end marker); `"skip"` drops the conversation. Both are
counted; a conversation left with no assistant target is skipped and counted.
Batches are padded, not packed (see `smedjan.post.batching`); the loss of a micro-batch
is the mean over its assistant targets.

    examples = tokenize_conversations(tok, convs, max_len=512, too_long="truncate", report=report)
    source = sft_source(examples, tok, batch_size=8, seed=0)
    loss, metrics = sft_loss(model, source.next_batch())
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import numpy as np
import torch

from smedjan.errors import UserError
from smedjan.formats import constants as C
from smedjan.post.batching import ShuffledBatches, digest_rows, pad_rows
from smedjan.post.formats import Conversation, LoadReport
from smedjan.options import option
from smedjan.post.run import ChatDataArgs, PostArgs

TOO_LONG = ("truncate", "skip")


@dataclass
class Example:
    x: np.ndarray  # int32 [n] input ids (ids[:-1])
    y: np.ndarray  # int32 [n] targets: ids[1:] where an assistant token, else -1
    where: str


def pad_id(tok) -> int:
    """<|pad|> when the tokenizer has one; padded positions are never targets either way."""
    return tok.specials.get(C.PAD, tok.bos_id)


def example_from_ids(ids: list[int], mask: list[int], where: str) -> Example:
    a = np.asarray(ids, dtype=np.int32)
    m = np.asarray(mask, dtype=bool)
    return Example(a[:-1].copy(), np.where(m[1:], a[1:], -1).astype(np.int32), where)


def tokenize_conversations(tok, convs: list[Conversation], max_len: int, too_long: str,
                           report: LoadReport) -> list[Example]:
    """Rendered, length-checked examples; skips and truncations are counted in `report`."""
    from smedjan.chat import render

    if too_long not in TOO_LONG:
        raise UserError(f"--too-long {too_long!r} is not one of {', '.join(TOO_LONG)}")
    out = []
    for c in convs:
        r = render(tok, c.messages)
        ids, mask = r.ids, r.mask
        if len(ids) - 1 > max_len:
            if too_long == "skip":
                report.skip(f"longer than the context of {max_len} tokens", c.where)
                continue
            ids, mask = ids[:max_len + 1], mask[:max_len + 1]
            report.truncated += 1
            report.first_truncated = report.first_truncated or c.where
        if not any(mask[1:]):
            report.skip("no assistant token within the context", c.where)
            continue
        out.append(example_from_ids(ids, mask, c.where))
    return out


def collate(examples: list[Example], idx, pad: int):
    """(x [B, L] int64 padded with `pad`, y [B, L] int64 padded with -1, real input tokens)."""
    rows = [examples[i] for i in idx]
    x = pad_rows([e.x for e in rows], pad)
    y = pad_rows([e.y for e in rows], -1)
    return x, y, sum(len(e.x) for e in rows)


def sft_source(examples: list[Example], tok, batch_size: int, seed: int, rank: int = 0,
               world_size: int = 1) -> ShuffledBatches:
    pad = pad_id(tok)
    ident = {"examples": digest_rows([e.x for e in examples] + [e.y for e in examples])}
    return ShuffledBatches(len(examples), batch_size, seed, lambda idx: collate(examples, idx, pad),
                           rank=rank, world_size=world_size, identity=ident)


def sft_loss(model, batch, head=None) -> tuple[torch.Tensor, dict]:
    """Mean cross-entropy over the batch's assistant targets (through `head` when given:
    --fused-ce)."""
    x, y, n_tokens = batch
    return model(x, y, ignore_index=-1, head=head), {"tokens": n_tokens}


def assistant_nll(model, examples: list[Example], batch_size: int, device, rank: int = 0,
                  world_size: int = 1) -> torch.Tensor:
    """float64 [2] on `device`: summed NLL (nats) over this rank's share of the examples'
    assistant targets, and their count. Run under no_grad."""
    from smedjan.metrics import token_nll

    acc = torch.zeros(2, dtype=torch.float64, device=device)
    mine = [e for i, e in enumerate(examples) if i % world_size == rank]
    for s in range(0, len(mine), batch_size):
        chunk = mine[s:s + batch_size]
        x = pad_rows([e.x for e in chunk], 0).to(device)  # padded positions have no target
        y = pad_rows([e.y for e in chunk], -1).to(device)
        nll = token_nll(model(x), y)
        acc[0] += nll.double().sum()
        acc[1] += (y != -1).sum()
    return acc


def make_evaluator(examples: list[Example], batch_size: int, ctx):
    """evaluator(model) -> {"val_loss": mean NLL per assistant token of the held-out examples}."""

    def evaluate(model) -> dict:
        acc = assistant_nll(model, examples, batch_size, ctx.device, ctx.rank, ctx.world_size)
        ctx.all_reduce_sum(acc)
        return {"val_loss": float(acc[0] / acc[1]) if acc[1] > 0 else float("nan")}

    return evaluate


# ------------------------------------------------------------------------------- the run

@dataclass(kw_only=True)
class SftArgs(PostArgs, ChatDataArgs):
    format: str = option("auto", "auto, messages, sharegpt, alpaca or prompt-response.")


def run(a: SftArgs, fault_steps: frozenset = frozenset()) -> tuple[dict, object]:
    """Check every input, fine-tune, write --output; returns (summary, TrainResult)."""
    from smedjan.console import log
    from smedjan.model import model_from_checkpoint
    from smedjan.post.batching import split_indices
    from smedjan.post.formats import load_conversations
    from smedjan.post.run import base_summary, check_common, load_chat_model_checkpoint, resolve_steps, train_model
    from smedjan.training.driver import setup
    from smedjan.training.heads import FusedCE

    ckpt_dir, resumed = check_common(a, "sft")
    ck, tok = load_chat_model_checkpoint(a.checkpoint)
    cfg = ck.config
    max_len = a.max_len or cfg.max_seq_len
    if not 2 <= max_len <= cfg.max_seq_len:
        raise UserError(f"`max_len` {max_len} must be between 2 and the model's context of {cfg.max_seq_len}")
    convs, report = load_conversations(list(a.data), a.format)
    examples = tokenize_conversations(tok, convs, max_len, a.too_long, report)
    if a.val_data:
        vconvs, vreport = load_conversations(list(a.val_data), a.format)
        val = tokenize_conversations(tok, vconvs, max_len, a.too_long, vreport)
        report.merge(vreport, "val: ")
        train = examples
    else:
        if not 0.0 <= a.val_fraction < 1.0:
            raise UserError(f"`val_fraction` {a.val_fraction} must be in [0, 1)")
        if not examples:
            train, val = [], []
        else:
            ti, vi = split_indices(len(examples), a.val_fraction, a.seed)
            train, val = [examples[i] for i in ti], [examples[i] for i in vi]
    if not train:
        raise UserError(f"{', '.join(map(str, a.data))}: no conversation fits the context of {max_len} tokens "
                        f"({report.describe_skips()})")

    ctx, device, amp = setup(a)
    per_step = a.batch_size * a.grad_accum * ctx.world_size
    steps, how = resolve_steps(a, per_step, len(train), "conversations")
    source = sft_source(train, tok, a.batch_size, a.seed, ctx.rank, ctx.world_size)
    torch.manual_seed(a.seed)
    model = model_from_checkpoint(ck, device)
    evaluator = make_evaluator(val, a.batch_size, ctx) if val else None
    val_start = None
    if evaluator is not None and resumed is None:
        model.eval()
        with torch.no_grad(), (torch.autocast(device.type, amp) if amp else contextlib.nullcontext()):
            val_start = evaluator(model)["val_loss"]
    if ctx.is_main:
        n_targets = sum(int((e.y >= 0).sum()) for e in train)
        log(f"data: {len(train):,} conversations for training ({n_targets:,} assistant targets), {len(val):,} held "
            f"out; formats {', '.join(sorted(set(report.formats.values())))}; skipped: {report.describe_skips()}; "
            f"truncated: {report.truncated}; padded per example, not packed; {steps:,} steps from {how}")
    loss_fn = functools.partial(sft_loss, head=FusedCE(ignore_index=-1)) if a.fused_ce else sft_loss
    result, _ = train_model("sft", a, model, tok, cfg, source, loss_fn, steps, ctx, amp, ckpt_dir, resumed,
                            evaluator=evaluator, run_config={"max_len": max_len},
                            flops_per_token=cfg.flops_per_token(max_len), fault_steps=fault_steps)
    summary = base_summary(result, a)
    if val_start is not None:
        summary["val_loss_start"] = val_start
    summary.update({"epochs": round(source.epochs, 3), "examples": len(train), "val_examples": len(val),
                    "skipped": dict(report.skipped), "truncated": report.truncated, "batching": "padded",
                    "formats": sorted(set(report.formats.values())), "rank": ctx.rank})
    return summary, result
