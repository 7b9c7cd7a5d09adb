"""CORE-style in-context-learning evaluation: few-shot prompts, batched log-likelihood scoring.

Semantics (nanochat `core_eval.py`, itself a reimplementation of the DCLM/MosaicML gauntlet):

- Few-shot: item i of a task (after the Random(1337) shuffle) gets `num_fewshot` examples
  drawn by `random.Random(1234 + i).sample(...)` from the task's other items, exactly the
  indices nanochat draws. With `--max-per-task` the pool stays the whole file (nanochat
  draws from the capped list), so item i's prompt never depends on the cap. MMLU draws
  its 5 shots from the dev split, same subject.
- Prompts: each shot is `query + delimiter + gold answer` followed by a blank line, then the
  item. Multiple choice: one prompt per choice, `query + delimiter + choice`. Schema: one
  prompt per context option, `option + delimiter + continuation`. Language modeling:
  contexts are stripped, `context + delimiter + continuation`.
- Tokenization: BOS + the whole prompt string, encoded in one piece (so the space of the
  delimiter joins the first continuation token, as it would in running text). The scored
  span is found in token space: MC = what follows the longest common prefix of the choices'
  sequences; schema = the longest common suffix of the options' sequences (which reaches
  into the options when they end alike: "...because Anna" / "...because Maria" share a
  final "a" token, scored with the continuation, as nanochat does); LM = what follows
  the encoding of the stripped prompt without continuation (if that is not a token prefix,
  the span starts at the common prefix and the item counts in `boundary_merges`).
- Scores: log-probabilities of the span's tokens under the model, computed in float64 from
  the logits. MC and schema predict the option with the highest MEAN log-prob per span token
  (nanochat: lowest mean cross-entropy; ties -> the first option). LM is correct iff the
  greedy (argmax) token at every span position equals the continuation token.
- Context longer than the model's: the sequence loses tokens on the left (the span stays
  whole) and the item counts in `truncated`; a span that cannot fit scores the item wrong
  and counts in `too_long`.
- `--chat`: the shots become user/assistant turns, the item's query/context the last user
  turn, rendered by `smedjan.chat.render` with the assistant prompt; each choice (or the
  continuation) is encoded on its own and appended, exactly the tokens the model produces
  as a reply. Delimiters are dropped (the turn markers take their place).
- Accuracy = correct / evaluated; centered = (accuracy - baseline) / (1 - baseline); CORE
  is the mean centered accuracy over the tasks run.

Batching: the sequences of many items are sorted by length, cut into batches of
`batch_size` rows, right-padded with BOS (causal attention: padding after a row's end
cannot change its scores), and only the span positions' logits are computed.

    result = evaluate_task(model, tok, load_task(CORE_BY_LABEL["copa"], data_dir), max_len=2048)
    result.accuracy, result.centered
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from smedjan.eval.tasks import LM, MC, SCHEMA, TaskData

FEWSHOT_SEED = 1234  # nanochat: random.Random(1234 + idx)


# ------------------------------------------------------------------------ few-shot
class _RangeWithout(Sequence):
    """The list [j for j in range(n) if j != skip] without building it: `random.sample`
    draws positions from len() and indexes them, so it picks what it would pick from the list."""

    def __init__(self, n: int, skip: int):
        self.n, self.skip = n, skip

    def __len__(self) -> int:
        return self.n - (1 if 0 <= self.skip < self.n else 0)

    def __getitem__(self, j: int) -> int:
        if not 0 <= j < len(self):
            raise IndexError(j)
        return j + (1 if 0 <= self.skip <= j else 0)


def fewshot_indices(task: TaskData, idx: int) -> list[int]:
    """Indices into the few-shot pool for item `idx` (deterministic, never the item itself)."""
    k = task.spec.num_fewshot
    if k <= 0:
        return []
    own_pool = task.fewshot_items is None or task.fewshot_items is task.items
    skip = idx if own_pool else -1
    if task.spec.group_field is not None:
        group = task.groups.get(task.items[idx][task.spec.group_field], [])
        population: Sequence = [j for j in group if j != skip]
    else:
        n = len(task.items) if own_pool else len(task.fewshot_items)
        population = _RangeWithout(n, skip)
    rng = random.Random(FEWSHOT_SEED + idx)
    return rng.sample(population, min(k, len(population)))


# ------------------------------------------------------------------------- prompts
def render_prompts(kind: str, item: dict, shots: list[dict], delim: str) -> list[str]:
    """The prompt strings of one item: one per choice (MC) or option (schema); for LM the
    pair (without continuation, stripped; with continuation)."""
    if kind == MC:
        head = "".join(f"{s['query']}{delim}{s['choices'][s['gold']]}\n\n" for s in shots)
        return [f"{head}{item['query']}{delim}{c}" for c in item["choices"]]
    if kind == SCHEMA:
        head = "".join(f"{s['context_options'][s['gold']]}{delim}{s['continuation']}\n\n" for s in shots)
        return [f"{head}{o}{delim}{item['continuation']}" for o in item["context_options"]]
    head = "".join(f"{s['context'].strip()}{delim}{s['continuation']}\n\n" for s in shots)
    prompt = f"{head}{item['context'].strip()}{delim}"
    return [prompt.strip(), prompt + item["continuation"]]


def render_chat(kind: str, item: dict, shots: list[dict]) -> list[tuple[list[dict], str]]:
    """(conversation up to the last user turn, assistant reply) per choice/option/continuation."""
    def turns(user: str, reply: str) -> list[dict]:
        return [{"role": "user", "content": user.strip()}, {"role": "assistant", "content": reply.strip()}]

    if kind == MC:
        head = [m for s in shots for m in turns(s["query"], s["choices"][s["gold"]])]
        user = {"role": "user", "content": item["query"].strip()}
        return [(head + [user], c.strip()) for c in item["choices"]]
    if kind == SCHEMA:
        head = [m for s in shots for m in turns(s["context_options"][s["gold"]], s["continuation"])]
        return [(head + [{"role": "user", "content": o.strip()}], item["continuation"].strip())
                for o in item["context_options"]]
    head = [m for s in shots for m in turns(s["context"], s["continuation"])]
    return [(head + [{"role": "user", "content": item["context"].strip()}], item["continuation"].strip())]


# ----------------------------------------------------------------------- sequences
@dataclass
class Seq:
    ids: list[int]
    start: int  # the scored span is ids[start:end]; position p predicts ids[p + 1]
    end: int


@dataclass
class ItemPlan:
    seqs: list[Seq | None]  # None: the span cannot fit the context
    truncated: bool = False
    boundary_merge: bool = False


def common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        t = seqs[0][i]
        if any(s[i] != t for s in seqs):
            return i
    return n


def common_suffix(seqs: list[list[int]]) -> int:
    return common_prefix([s[::-1] for s in seqs])


def fit(seq: Seq, max_len: int) -> tuple[Seq | None, bool]:
    """Crop tokens on the left to fit `max_len`, keeping the span and one token before it."""
    if len(seq.ids) <= max_len:
        return seq, False
    crop = len(seq.ids) - max_len
    if seq.start - crop < 1:
        return None, True
    return Seq(seq.ids[crop:], seq.start - crop, seq.end - crop), True


def plan_item(task: TaskData, idx: int, tok, *, max_len: int, chat: bool = False) -> ItemPlan:
    """Token sequences and scored spans of item `idx` (see the module docstring)."""
    spec = task.spec
    pool = task.fewshot_items if task.fewshot_items is not None else task.items
    shots = [pool[j] for j in fewshot_indices(task, idx)]
    item = task.items[idx]
    merge = False
    if chat:
        from smedjan.chat import render

        seqs = []
        for messages, reply in render_chat(spec.kind, item, shots):
            prompt = render(tok, messages, add_generation_prompt=True).ids
            body = tok.encode(reply) or tok.encode(" ")  # an empty reply still needs one token to score
            seqs.append(Seq(prompt + body, len(prompt), len(prompt) + len(body)))
    else:
        bos = [tok.bos_id]
        prompts = render_prompts(spec.kind, item, shots, spec.delimiter)
        ids = [bos + tok.encode(p) for p in prompts]
        if spec.kind == MC:
            # The shared context ends where the choices' tokens first differ; every choice keeps >= 1 token.
            start = min(common_prefix(ids), min(len(s) for s in ids) - 1)
            seqs = [Seq(s, start, len(s)) for s in ids]
        elif spec.kind == SCHEMA:
            suffix = max(1, min(common_suffix(ids), min(len(s) for s in ids) - 1))
            seqs = [Seq(s, len(s) - suffix, len(s)) for s in ids]
        else:
            without, with_ = ids
            start = len(without)
            if with_[:start] != without:
                start, merge = common_prefix(ids), True
            start = max(1, min(start, len(with_) - 1))
            seqs = [Seq(with_, start, len(with_))]
    plan = ItemPlan([], boundary_merge=merge)
    for s in seqs:
        fitted, cropped = fit(s, max_len)
        plan.seqs.append(fitted)
        plan.truncated |= cropped
    return plan


# ------------------------------------------------------------------------- scoring
@dataclass
class SeqScore:
    logprob: float  # sum of the span tokens' log-probabilities (float64)
    n_tokens: int
    greedy: bool  # every span token is the argmax of its position's logits

    @property
    def mean(self) -> float:
        return self.logprob / self.n_tokens


def _span_logits(model, idx: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Logits [N, V] at (rows[k], pos[k]) of the batch idx [B, T]. With a smedjan Transformer
    only those N hidden states go through the output head (the full [B, T, V] would not fit
    for long contexts and large vocabularies); any other module: model(idx) [B, T, V]."""
    if hasattr(model, "hidden") and hasattr(model, "logits"):
        h = model.hidden(idx)  # [B, T, dim]
        return model.logits(h[rows, pos])  # [N, V]
    return model(idx)[rows, pos]


@torch.no_grad()
def score_sequences(model, seqs: list[Seq], *, batch_size: int, device, pad_id: int) -> list[SeqScore]:
    """Sum log-prob, token count and greedy match of each sequence's span, in batches."""
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i].ids))
    out: list[SeqScore | None] = [None] * len(seqs)
    for b0 in range(0, len(order), batch_size):
        members = order[b0:b0 + batch_size]
        T = len(seqs[members[0]].ids)
        idx = torch.full((len(members), T), pad_id, dtype=torch.long)  # [B, T], right-padded
        rows, pos, tgt, seg = [], [], [], []
        for r, i in enumerate(members):
            s = seqs[i]
            idx[r, :len(s.ids)] = torch.tensor(s.ids, dtype=torch.long)
            n = s.end - s.start
            rows += [r] * n
            pos += range(s.start - 1, s.end - 1)  # position p predicts token p + 1
            tgt += s.ids[s.start:s.end]
            seg += [r] * n
        rows_t, pos_t = torch.tensor(rows, device=device), torch.tensor(pos, device=device)
        logits = _span_logits(model, idx.to(device), rows_t, pos_t).double().cpu()  # [N, V]
        tgt_t, seg_t = torch.tensor(tgt), torch.tensor(seg)
        lp = torch.log_softmax(logits, dim=-1).gather(1, tgt_t[:, None]).squeeze(1)  # [N]
        miss = (logits.argmax(dim=-1) != tgt_t).to(torch.float64)  # [N]
        sums = torch.zeros(len(members), dtype=torch.float64).index_add_(0, seg_t, lp)
        misses = torch.zeros(len(members), dtype=torch.float64).index_add_(0, seg_t, miss)
        for r, i in enumerate(members):
            out[i] = SeqScore(sums[r].item(), seqs[i].end - seqs[i].start, misses[r].item() == 0)
    return out  # type: ignore[return-value]


# ---------------------------------------------------------------------- evaluation
@dataclass
class TaskResult:
    label: str
    kind: str
    num_fewshot: int
    n: int
    correct: int
    accuracy: float
    baseline: float
    centered: float
    truncated: int
    too_long: int
    boundary_merges: int
    seconds: float
    examples_per_s: float
    file: str
    details: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("details")
        return d


def centered_accuracy(accuracy: float, baseline: float) -> float:
    """(accuracy - baseline) / (1 - baseline): 0 at random guessing, 1 when all are right."""
    return (accuracy - baseline) / (1.0 - baseline)


def core_metric(results: list[TaskResult]) -> float:
    """The mean centered accuracy over the tasks run (NaN for none)."""
    return sum(r.centered for r in results) / len(results) if results else float("nan")


def _decide(kind: str, item: dict, plan: ItemPlan, scores: list[SeqScore | None]) -> dict:
    if any(s is None for s in scores):
        return {"correct": False, "pred": None, "scores": None}
    if kind == LM:
        return {"correct": scores[0].greedy, "pred": None, "scores": [scores[0].mean]}
    means = [s.mean for s in scores]
    pred = max(range(len(means)), key=lambda i: (means[i], -i))  # first of equal maxima
    return {"correct": pred == item["gold"], "pred": pred, "scores": means}


def evaluate_task(model, tok, task: TaskData, *, max_len: int, batch_size: int = 32, device="cpu",
                  chat: bool = False, max_per_task: int | None = None, keep_details: bool = False,
                  on_items: Callable[[int], None] | None = None) -> TaskResult:
    """Accuracy of `model` on the first `max_per_task` items of `task` (all if None)."""
    spec = task.spec
    n = len(task.items) if not max_per_task or max_per_task <= 0 else min(max_per_task, len(task.items))
    t0 = time.monotonic()
    correct = truncated = too_long = merges = 0
    details: list[dict] = []
    chunk = max(1, batch_size * 4 // (1 if spec.kind == LM else 2))  # items planned and scored together
    for c0 in range(0, n, chunk):
        ids = list(range(c0, min(n, c0 + chunk)))
        plans = [plan_item(task, i, tok, max_len=max_len, chat=chat) for i in ids]
        flat = [s for p in plans for s in p.seqs if s is not None]
        scored = iter(score_sequences(model, flat, batch_size=batch_size, device=device, pad_id=tok.bos_id))
        for i, plan in zip(ids, plans):
            scores = [next(scored) if s is not None else None for s in plan.seqs]
            d = _decide(spec.kind, task.items[i], plan, scores)
            correct += d["correct"]
            truncated += plan.truncated
            too_long += d["pred"] is None and d["scores"] is None
            merges += plan.boundary_merge
            if keep_details:
                details.append({"index": i, **d})
        if on_items is not None:
            on_items(len(ids))
    seconds = time.monotonic() - t0
    acc = correct / n
    return TaskResult(spec.label, spec.kind, spec.num_fewshot, n, correct, acc, spec.baseline,
                      centered_accuracy(acc, spec.baseline), truncated, too_long, merges, round(seconds, 3),
                      round(n / seconds, 2) if seconds > 0 else float("inf"), str(task.path), details)
