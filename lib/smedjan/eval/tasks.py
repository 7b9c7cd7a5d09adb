"""In-context-learning task definitions and their data files: CORE, HellaSwag, MMLU.

Task kinds and the fields each JSONL row must carry (the DCLM / MosaicML "eval gauntlet"
layout that nanochat's CORE metric reads):

- `multiple_choice`: {query: str, choices: [str, ...], gold: int}
- `schema`:          {context_options: [str, ...], continuation: str, gold: int}
- `language_modeling`: {context: str, continuation: str}

CORE is the 22-task set of the DCLM paper as nanochat runs it (DCLM
`eval/mmlu_and_lowvar.yaml` without mmlu_fewshot; nanochat's eval bundle `core.yaml`):
task, few-shot count and continuation delimiter below are those; the random baselines are
the "Random baseline" column of the bundle's `eval_meta_data.csv` (percent there,
fractions here). squad and coqa are optional: `../shared/data/eval` lacks them, so the
`core` suite runs the other 20 and says so; any other missing file is an error.

Data folder layout (`--data-dir`, by default `../shared/data/eval`):

    DIR/core/<category>/<task>.jsonl[.zst]     CORE files, e.g. core/world_knowledge/arc_easy.jsonl.zst
    DIR/hellaswag_val.jsonl[.zst]              HellaSwag val, rowanz schema
    DIR/mmlu_{test,validation,dev}.jsonl[.zst] MMLU, {question, subject, choices[4], answer}

Every file is read in order and shuffled with `random.Random(1337)` as nanochat does, so
`--max-per-task N` evaluates the same first N items nanochat's `--max-per-task N` picks.

    specs = resolve_tasks(["core"])
    task = load_task(specs[0], "../shared/data/eval")
    task.items[0]        # {"query": ..., "choices": [...], "gold": 3}
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from smedjan.errors import UserError

MC, SCHEMA, LM = "multiple_choice", "schema", "language_modeling"
KINDS = (MC, SCHEMA, LM)
SHUFFLE_SEED = 1337  # nanochat base_eval: random.Random(1337).shuffle(data)
ANSWER = "\nAnswer: "  # the gauntlet's question/answer delimiter


@dataclass(frozen=True)
class TaskSpec:
    label: str
    kind: str
    path: str  # relative to the data dir, without the optional .zst
    num_fewshot: int
    delimiter: str
    baseline: float  # random-guess accuracy, a fraction
    suite: str = "core"
    optional: bool = False  # a missing file skips the task (with a note) instead of failing
    fewshot_path: str | None = None  # few-shot examples come from this file, same group
    group_field: str | None = None  # few-shot examples share this field's value with the item


def _core(label: str, kind: str, category: str, name: str, shots: int, baseline_pct: float,
          delimiter: str = " ", optional: bool = False) -> TaskSpec:
    return TaskSpec(label, kind, f"core/{category}/{name}.jsonl", shots, delimiter, baseline_pct / 100.0,
                    optional=optional)


# label, kind, category folder, file, shots, random baseline (%), delimiter (default " ").
CORE_TASKS: list[TaskSpec] = [
    _core("hellaswag_zeroshot", MC, "language_understanding", "hellaswag", 0, 25),
    _core("jeopardy", LM, "world_knowledge", "jeopardy_all", 10, 0, ANSWER),
    _core("bigbench_qa_wikidata", LM, "world_knowledge", "bigbench_qa_wikidata", 10, 0),
    _core("arc_easy", MC, "world_knowledge", "arc_easy", 10, 25, ANSWER),
    _core("arc_challenge", MC, "world_knowledge", "arc_challenge", 10, 25, ANSWER),
    _core("copa", MC, "commonsense_reasoning", "copa", 0, 50),
    _core("commonsense_qa", MC, "commonsense_reasoning", "commonsense_qa", 10, 20),
    _core("piqa", MC, "commonsense_reasoning", "piqa", 10, 50, ANSWER),
    _core("openbook_qa", MC, "commonsense_reasoning", "openbook_qa", 0, 25),
    _core("lambada_openai", LM, "language_understanding", "lambada_openai", 0, 0),
    _core("hellaswag", MC, "language_understanding", "hellaswag", 10, 25),
    _core("winograd", SCHEMA, "language_understanding", "winograd_wsc", 0, 50),
    _core("winogrande", SCHEMA, "language_understanding", "winogrande", 0, 50),
    _core("bigbench_dyck_languages", LM, "symbolic_problem_solving", "bigbench_dyck_languages", 10, 0),
    _core("agi_eval_lsat_ar", MC, "symbolic_problem_solving", "agi_eval_lsat_ar", 3, 20),
    _core("bigbench_cs_algorithms", LM, "symbolic_problem_solving", "bigbench_cs_algorithms", 10, 0),
    _core("bigbench_operators", LM, "symbolic_problem_solving", "bigbench_operators", 10, 0),
    _core("bigbench_repeat_copy_logic", LM, "symbolic_problem_solving", "bigbench_repeat_copy_logic", 10, 0),
    _core("squad", LM, "reading_comprehension", "squad", 10, 0, optional=True),
    _core("coqa", LM, "reading_comprehension", "coqa", 0, 0, optional=True),
    _core("boolq", MC, "reading_comprehension", "boolq", 10, 62, ANSWER),
    _core("bigbench_language_identification", MC, "language_understanding", "bigbench_language_identification",
          10, 9.1),
]
CORE_BY_LABEL = {t.label: t for t in CORE_TASKS}

# HellaSwag val from the rowanz file, zero-shot like CORE's hellaswag_zeroshot.
HELLASWAG = TaskSpec("hellaswag_val", MC, "hellaswag_val.jsonl", 0, " ", 0.25, suite="hellaswag")


def mmlu_spec(split: str = "test") -> TaskSpec:
    """MMLU as the gauntlet's mmlu_fewshot: 5-shot, lettered choices listed in the query, the
    choice text as the continuation after "\\nAnswer: "; shots from the dev split, same subject."""
    if split not in ("test", "validation", "dev"):
        raise UserError(f"--mmlu-split {split!r}: choose test, validation or dev")
    return TaskSpec("mmlu", MC, f"mmlu_{split}.jsonl", 5, ANSWER, 0.25, suite="mmlu",
                    fewshot_path="mmlu_dev.jsonl", group_field="subject")


SUITES = ("core", "hellaswag", "mmlu")


def resolve_tasks(names: list[str], mmlu_split: str = "test") -> list[TaskSpec]:
    """Task specs for `--tasks` entries: suites (core, hellaswag, mmlu), CORE labels, or
    `core:LABEL` (CORE's own 10-shot `hellaswag` is `core:hellaswag`). Order kept, no repeats."""
    out: list[TaskSpec] = []
    for raw in names:
        for name in (n.strip() for n in raw.split(",")):
            if not name:
                continue
            if name == "core":
                found = list(CORE_TASKS)
            elif name == "hellaswag":
                found = [HELLASWAG]
            elif name == "mmlu":
                found = [mmlu_spec(mmlu_split)]
            else:
                label = name[5:] if name.startswith("core:") else name
                if label not in CORE_BY_LABEL:
                    raise UserError(f"--tasks {name!r} is unknown; use core, hellaswag, mmlu or a CORE task: "
                                    f"{', '.join(CORE_BY_LABEL)}")
                # Named on its own, an optional task is required: its absence is an error.
                spec = CORE_BY_LABEL[label]
                found = [TaskSpec(**{**spec.__dict__, "optional": False})]
            out += [t for t in found if t.label not in {o.label for o in out}]
    if not out:
        raise UserError("--tasks names no task")
    return out


# ----------------------------------------------------------------------------- files
def find_file(data_dir: Path, rel: str) -> Path | None:
    """DIR/rel or DIR/rel.zst, whichever exists (plain first)."""
    for cand in (data_dir / rel, data_dir / (rel + ".zst")):
        if cand.is_file():
            return cand
    return None


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) of each non-blank line; a bad line or stream is a UserError naming file:line."""
    from smedjan.data.sources import guard_reads, iter_json_lines

    return guard_reads(path, iter_json_lines, path)


def _need(path: Path, lineno: int, obj: dict, key: str, typ, what: str):
    if key not in obj:
        raise UserError(f"{path}:{lineno}: missing key {key!r} ({what})")
    v = obj[key]
    if typ is int and isinstance(v, bool) or not isinstance(v, typ):
        raise UserError(f"{path}:{lineno}: {key!r} is {type(v).__name__}, expected {typ.__name__}")
    return v


def _str_list(path: Path, lineno: int, obj: dict, key: str) -> list[str]:
    v = _need(path, lineno, obj, key, list, "a list of strings")
    if len(v) < 2 or not all(isinstance(s, str) for s in v):
        raise UserError(f"{path}:{lineno}: {key!r} must be a list of at least 2 strings")
    return v


def _gold(path: Path, lineno: int, obj: dict, key: str, n: int) -> int:
    g = _need(path, lineno, obj, key, int, "the index of the right answer")
    if not 0 <= g < n:
        raise UserError(f"{path}:{lineno}: {key} {g} is out of range for {n} options")
    return g


def validate_item(kind: str, obj: dict, path: Path, lineno: int) -> dict:
    """The item reduced to the fields its kind uses, after checking types and ranges."""
    if kind == MC:
        query = _need(path, lineno, obj, "query", str, "the question")
        choices = _str_list(path, lineno, obj, "choices")
        return {"query": query, "choices": choices, "gold": _gold(path, lineno, obj, "gold", len(choices))}
    if kind == SCHEMA:
        options = _str_list(path, lineno, obj, "context_options")
        cont = _need(path, lineno, obj, "continuation", str, "the shared ending")
        return {"context_options": options, "continuation": cont,
                "gold": _gold(path, lineno, obj, "gold", len(options))}
    context = _need(path, lineno, obj, "context", str, "the prompt")
    cont = _need(path, lineno, obj, "continuation", str, "the expected text")
    if not cont.strip():
        raise UserError(f"{path}:{lineno}: 'continuation' is empty")
    return {"context": context, "continuation": cont}


def _hellaswag_clean(text: str) -> str:
    """lm-evaluation-harness preprocessing (the data README's reconstruction of CORE's file)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag_item(obj: dict, path: Path, lineno: int) -> dict:
    for k in ("activity_label", "ctx_a", "ctx_b"):
        _need(path, lineno, obj, k, str, "rowanz HellaSwag schema")
    endings = _str_list(path, lineno, obj, "endings")
    if isinstance(obj.get("label"), str) and obj["label"].strip().isdigit():
        obj = {**obj, "label": int(obj["label"])}  # HF exports store the label as a string
    gold = _gold(path, lineno, obj, "label", len(endings))
    ctx = obj["ctx_a"] + " " + obj["ctx_b"].capitalize()
    return {"query": _hellaswag_clean(obj["activity_label"] + ": " + ctx),
            "choices": [_hellaswag_clean(e) for e in endings], "gold": gold}


def _mmlu_item(obj: dict, path: Path, lineno: int) -> dict:
    question = _need(path, lineno, obj, "question", str, "MMLU schema")
    subject = _need(path, lineno, obj, "subject", str, "MMLU schema")
    choices = _str_list(path, lineno, obj, "choices")
    gold = _gold(path, lineno, obj, "answer", len(choices))
    letters = "ABCDEFGHIJ"
    listing = "".join(f"\n{letters[i]}. {c}" for i, c in enumerate(choices))
    return {"query": f"Question: {question}\nChoices{listing}", "choices": choices, "gold": gold,
            "subject": subject}


def read_items(spec: TaskSpec, path: Path) -> list[dict]:
    convert = {"hellaswag": _hellaswag_item, "mmlu": _mmlu_item}.get(spec.suite)
    items = []
    for lineno, obj in iter_jsonl(path):
        items.append(convert(obj, path, lineno) if convert else validate_item(spec.kind, obj, path, lineno))
    if not items:
        raise UserError(f"{path}: holds no examples")
    return items


@dataclass
class TaskData:
    spec: TaskSpec
    path: Path
    items: list[dict]  # shuffled with Random(1337)
    fewshot_items: list[dict] | None = None  # a separate few-shot pool (MMLU dev), else `items`
    groups: dict[str, list[int]] = field(default_factory=dict)  # group value -> pool indices


def load_task(spec: TaskSpec, data_dir: str | Path) -> TaskData | None:
    """The task's items, shuffled as nanochat shuffles them; None for an absent optional task."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"{data_dir}: eval data folder does not exist (give --data-dir)")
    path = find_file(data_dir, spec.path)
    if path is None:
        if spec.optional:
            return None
        raise UserError(f"{data_dir / spec.path}: task file for {spec.label!r} does not exist (nor its .zst)")
    items = read_items(spec, path)
    random.Random(SHUFFLE_SEED).shuffle(items)
    task = TaskData(spec, path, items)
    if spec.fewshot_path is not None:
        fpath = find_file(data_dir, spec.fewshot_path)
        if fpath is None:
            raise UserError(f"{data_dir / spec.fewshot_path}: few-shot file for {spec.label!r} does not exist")
        task.fewshot_items = items if fpath == path else read_items(spec, fpath)
    if spec.group_field is not None:
        pool = task.fewshot_items if task.fewshot_items is not None else items
        for i, it in enumerate(pool):
            task.groups.setdefault(it[spec.group_field], []).append(i)
    return task
