"""CORE-style scoring: hand-computed log-likelihoods, an oracle model, few-shot sampling, the math."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from smedjan.chat import render
from smedjan.eval.core import (Seq, centered_accuracy, core_metric, evaluate_task, fewshot_indices, fit, plan_item,
                               render_prompts)
from smedjan.eval.tasks import (CORE_BY_LABEL, CORE_TASKS, LM, MC, SCHEMA, TaskData, TaskSpec, load_task,
                                resolve_tasks)
from smedjan.model import ModelConfig, Transformer

MC_ITEMS = [
    {"query": "The cat sat on the", "choices": ["mat.", "moon and all of the stars.", "roof"], "gold": 0},
    {"query": "Water freezes when it is", "choices": ["hot", "cold enough."], "gold": 1},
    {"query": "Question: what do bees make?", "choices": ["honey", "steel beams", "clouds", "bread"], "gold": 0},
]
SCHEMA_ITEMS = [
    {"context_options": ["The trophy did not fit in the case because the trophy",
                         "The trophy did not fit in the case because the case"],
     "continuation": "was too big.", "gold": 0},
    {"context_options": ["Anna lent Maria a book because Anna", "Anna lent Maria a book because Maria"],
     "continuation": "had asked for it.", "gold": 1},
]
LM_ITEMS = [
    {"context": "The capital of France is", "continuation": "Paris"},
    {"context": "One, two, three, four,  ", "continuation": "five"},
    {"context": "Roses are red, violets are", "continuation": "blue, sugar is sweet"},
]


def make_task(kind: str, items: list[dict], shots: int = 0, delim: str = " ", baseline: float = 0.25) -> TaskData:
    return TaskData(TaskSpec(f"t_{kind}", kind, "unused.jsonl", shots, delim, baseline), "unused", [dict(i) for i in items])


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    torch.manual_seed(0)
    cfg = ModelConfig.make(vocab_size=tokenizer.vocab_size, dim=32, n_layers=1, n_heads=2, max_seq_len=128)
    return Transformer(cfg).eval()


# --------------------------------------------------------------- hand-computed scores
def hand_logprob(model, ids: list[int], start: int) -> float:
    """Mean float64 log-prob of ids[start:] given what precedes, from the model's own full logits."""
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0].double().numpy()  # [T, V]
    total = 0.0
    for t in range(start, len(ids)):
        row = logits[t - 1]
        m = row.max()
        lse = m + math.log(np.exp(row - m).sum())
        total += row[ids[t]] - lse
    return total / (len(ids) - start)


def test_mc_score_equals_hand_computed_float64_loglik(tiny_model, tokenizer):
    task = make_task(MC, MC_ITEMS)
    res = evaluate_task(tiny_model, tokenizer, task, max_len=128, batch_size=3, keep_details=True)
    for det, item in zip(res.details, task.items):
        context = [tokenizer.bos_id] + tokenizer.encode(item["query"])
        for choice, score in zip(item["choices"], det["scores"]):
            ids = [tokenizer.bos_id] + tokenizer.encode(item["query"] + " " + choice)
            assert ids[:len(context)] == context  # the choice starts at a pre-tokenizer boundary
            assert score == pytest.approx(hand_logprob(tiny_model, ids, len(context)), abs=1e-5)
        best = max(range(len(det["scores"])), key=lambda i: det["scores"][i])
        assert det["pred"] == best and det["correct"] == (best == item["gold"])


def test_schema_scores_the_common_token_suffix(tiny_model, tokenizer):
    task = make_task(SCHEMA, SCHEMA_ITEMS, baseline=0.5)
    res = evaluate_task(tiny_model, tokenizer, task, max_len=128, batch_size=1, keep_details=True)
    for det, item in zip(res.details, task.items):
        seqs = [[tokenizer.bos_id] + tokenizer.encode(o + " " + item["continuation"]) for o in item["context_options"]]
        k = 0  # by hand: the tokens the options' sequences share at their end (nanochat's span)
        while all(s[-1 - k] == seqs[0][-1 - k] for s in seqs):
            k += 1
        assert tokenizer.decode(seqs[0][-k:]).endswith(" " + item["continuation"])
        for ids, score in zip(seqs, det["scores"]):
            assert score == pytest.approx(hand_logprob(tiny_model, ids, len(ids) - k), abs=1e-5)


# -------------------------------------------------------------------- oracle model
class Oracle(nn.Module):
    """Puts (almost) all probability on the next token of whichever known sequence the row's
    prefix belongs to; uniform elsewhere. Only forward(idx) -> logits, like any foreign module."""

    def __init__(self, sequences: list[list[int]], vocab: int):
        super().__init__()
        self.vocab = vocab
        self.next = {}
        for s in sequences:
            for t in range(1, len(s)):
                self.next[tuple(s[:t])] = s[t]

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        out = torch.zeros(B, T, self.vocab)
        for b in range(B):
            row = idx[b].tolist()
            for t in range(T):
                nxt = self.next.get(tuple(row[:t + 1]))
                if nxt is not None:
                    out[b, t, nxt] = 30.0
        return out


def true_texts(kind: str, items: list[dict], shift: int = 0) -> list[str]:
    """The full zero-shot text of each item with its right answer (or, with shift, a wrong one)."""
    if kind == MC:
        return [f"{i['query']} {i['choices'][(i['gold'] + shift) % len(i['choices'])]}" for i in items]
    if kind == SCHEMA:
        return [f"{i['context_options'][(i['gold'] + shift) % 2]} {i['continuation']}" for i in items]
    return [f"{i['context'].strip()} {'zebra' if shift else i['continuation']}" for i in items]


@pytest.mark.parametrize("kind,items", [(MC, MC_ITEMS), (SCHEMA, SCHEMA_ITEMS), (LM, LM_ITEMS)])
def test_oracle_scores_100_and_anti_oracle_0(tokenizer, kind, items):
    task = make_task(kind, items)
    seqs = [[tokenizer.bos_id] + tokenizer.encode(t) for t in true_texts(kind, items)]
    res = evaluate_task(Oracle(seqs, tokenizer.vocab_size), tokenizer, task, max_len=128, batch_size=2)
    assert (res.n, res.correct, res.accuracy) == (len(items), len(items), 1.0)
    wrong = [[tokenizer.bos_id] + tokenizer.encode(t) for t in true_texts(kind, items, shift=1)]
    res = evaluate_task(Oracle(wrong, tokenizer.vocab_size), tokenizer, task, max_len=128, batch_size=2)
    assert res.correct == 0


@pytest.mark.parametrize("kind,items", [(MC, MC_ITEMS), (SCHEMA, SCHEMA_ITEMS), (LM, LM_ITEMS)])
def test_oracle_scores_100_through_the_chat_template(tokenizer, kind, items):
    seqs = []
    for i in items:
        if kind == MC:
            user, reply = i["query"], i["choices"][i["gold"]]
        elif kind == SCHEMA:
            user, reply = i["context_options"][i["gold"]], i["continuation"]
        else:
            user, reply = i["context"].strip(), i["continuation"]
        prompt = render(tokenizer, [{"role": "user", "content": user}], add_generation_prompt=True).ids
        seqs.append(prompt + tokenizer.encode(reply))
    res = evaluate_task(Oracle(seqs, tokenizer.vocab_size), tokenizer, make_task(kind, items), max_len=128,
                        batch_size=4, chat=True)
    assert res.accuracy == 1.0


# ----------------------------------------------------------------------- few-shot
def test_fewshot_draws_what_nanochat_draws_and_never_the_item():
    items = [{"query": f"q{i}", "choices": ["a", "b"], "gold": 0} for i in range(37)]
    task = make_task(MC, items, shots=10)
    for idx in (0, 5, 36):
        ref = random.Random(1234 + idx).sample([i for i in range(len(items)) if i != idx], 10)
        assert fewshot_indices(task, idx) == ref == fewshot_indices(task, idx)
        assert idx not in ref
    small = make_task(MC, items[:4], shots=10)  # fewer items than shots: all the others, no error
    assert sorted(fewshot_indices(small, 2)) == [0, 1, 3]


def test_fewshot_prompt_layout(tokenizer):
    shots = [{"query": "Q: 1+1?", "choices": ["2", "3"], "gold": 0}]
    item = {"query": "Q: 2+2?", "choices": ["4", "5"], "gold": 0}
    assert render_prompts(MC, item, shots, "\nAnswer: ") == ["Q: 1+1?\nAnswer: 2\n\nQ: 2+2?\nAnswer: 4",
                                                            "Q: 1+1?\nAnswer: 2\n\nQ: 2+2?\nAnswer: 5"]
    lm_item = {"context": "  The sky is  ", "continuation": "blue"}
    assert render_prompts(LM, lm_item, [], " ") == ["The sky is", "The sky is blue"]


def test_real_task_order_and_shots_are_reproducible(shared_data, tokenizer):
    task = load_task(CORE_BY_LABEL["copa"], shared_data / "eval")
    from smedjan.eval.tasks import iter_jsonl

    raw = [o for _, o in iter_jsonl(task.path)]
    random.Random(1337).shuffle(raw)
    assert [r["query"] for r in raw] == [i["query"] for i in task.items]
    arc = load_task(CORE_BY_LABEL["arc_easy"], shared_data / "eval")
    a = plan_item(arc, 3, tokenizer, max_len=100_000)
    b = plan_item(arc, 3, tokenizer, max_len=100_000)
    assert [s.ids for s in a.seqs] == [s.ids for s in b.seqs]
    text = tokenizer.decode(a.seqs[0].ids[1:])
    assert text.count("\nAnswer: ") == 11 and text.startswith(arc.items[fewshot_indices(arc, 3)[0]]["query"])


# ------------------------------------------------------------- truncation, spans
def test_long_context_is_cut_on_the_left_keeping_the_span():
    s = Seq(list(range(100)), 90, 100)
    cut, cropped = fit(s, 40)
    assert cropped and len(cut.ids) == 40 and cut.ids[cut.start:cut.end] == list(range(90, 100))
    assert fit(Seq(list(range(100)), 50, 100), 40) == (None, True)  # the span itself does not fit
    assert fit(s, 100) == (s, False)


def test_truncated_and_too_long_are_counted(tiny_model, tokenizer):
    items = [{"context": "word " * 60, "continuation": "end"}, {"context": "short", "continuation": "x " * 80}]
    res = evaluate_task(tiny_model, tokenizer, make_task(LM, items), max_len=32, batch_size=2)
    assert res.truncated == 2 and res.too_long == 1 and res.n == 2


def test_every_choice_keeps_a_token_when_one_is_a_prefix_of_another(tokenizer):
    task = make_task(MC, [{"query": "Pick", "choices": ["a", "a b c"], "gold": 0}])
    plan = plan_item(task, 0, tokenizer, max_len=64)
    assert all(s.end - s.start >= 1 for s in plan.seqs)


# ------------------------------------------------------------------------ the math
def test_centered_accuracy_and_core_mean():
    assert centered_accuracy(0.25, 0.25) == 0.0
    assert centered_accuracy(1.0, 0.62) == 1.0
    assert centered_accuracy(0.5, 0.0) == 0.5
    assert centered_accuracy(0.0, 0.5) == -1.0
    r = lambda c: type("R", (), {"centered": c})()  # noqa: E731
    assert core_metric([r(0.2), r(-0.1), r(0.5)]) == pytest.approx(0.2)
    assert math.isnan(core_metric([]))


def test_core_table_matches_nanochat():
    assert len(CORE_TASKS) == 22
    spec = {t.label: (t.kind, t.num_fewshot, t.delimiter, t.baseline) for t in CORE_TASKS}
    assert spec["hellaswag_zeroshot"] == (MC, 0, " ", 0.25) and spec["hellaswag"][1] == 10
    assert spec["boolq"] == (MC, 10, "\nAnswer: ", 0.62)
    assert spec["bigbench_language_identification"][3] == pytest.approx(0.091)
    assert spec["winogrande"] == (SCHEMA, 0, " ", 0.5) and spec["jeopardy"] == (LM, 10, "\nAnswer: ", 0.0)
    assert [t.label for t in resolve_tasks(["core:hellaswag", "hellaswag", "copa,copa"])] == \
        ["hellaswag", "hellaswag_val", "copa"]
