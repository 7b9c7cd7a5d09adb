"""doit tasks: every pipeline in pipelines/*.toml, stage by stage, re-running only what is stale.

    doit list                      # tasks: tokenizer:tiny, prepare:tiny, train:tiny, ...
    doit pipeline:tiny             # the whole pipeline; a second run does nothing
    doit train:tiny                # one stage (and whatever it needs first)
    doit clean pipeline:tiny       # remove the pipeline's artifacts (runs/tiny) and its state

A stage re-runs when a file it reads changed (by content), when one of its outputs is
missing, or when its flags in the TOML changed; then every later stage that reads what
it wrote re-runs too (only if the new output differs). This file knows the stage graph
and nothing about any particular pipeline: add pipelines/NAME.toml and
`doit pipeline:NAME` exists. SMEDJAN_PIPELINES and SMEDJAN_RUNS point elsewhere.

A corpus on the Hugging Face hub (`hf://datasets/...` in [corpus]) adds the task
corpus:NAME before the tokenizer: it pins each such input to a commit in
runs/NAME/corpus.lock.json (asking the hub only for inputs not locked yet, or for every
branch with SMEDJAN_HUB_UPDATE=1) and says what is cached and what will be downloaded.
Nothing here touches the network while loading: `doit list` works offline.
"""

import os
import shutil
import sys
from pathlib import Path

from doit.exceptions import TaskFailed
from doit.tools import config_changed

from smedjan.errors import UserError
from smedjan.pipeline import corpus, load_pipeline
from smedjan.pipeline.report import chat_instructions, write_report
from smedjan.pipeline.runner import ran_this_session, run_stage

PIPELINES = Path(os.environ.get("SMEDJAN_PIPELINES", "pipelines"))
RUNS = Path(os.environ.get("SMEDJAN_RUNS", "runs"))

DOIT_CONFIG = {"default_tasks": [], "verbosity": 2, "dep_file": str(RUNS / ".doit.db")}
RUNS.mkdir(parents=True, exist_ok=True)


def _load_all():
    pipes = {}
    for path in sorted(PIPELINES.glob("*.toml")):
        try:
            pipes[path.stem] = load_pipeline(path, RUNS)
        except UserError as e:
            print(f"dodo: skipping pipeline {path.stem!r}: {e}", file=sys.stderr)
    return pipes


PIPES = _load_all()


def _action(stage, name):
    def run():
        failure = run_stage(stage, name)
        return TaskFailed(failure) if failure else None

    return run


def _remove(paths):
    def clean():
        for p in paths:
            p = Path(p)
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()

    return clean


def _stage_tasks(stage_name):
    def gen():
        for name, pipe in PIPES.items():
            stage = next((s for s in pipe.stages if s.name == stage_name), None)
            if stage is None:
                continue
            extra = [stage.log] + ([stage.checkpoint_dir] if stage.checkpoint_dir else [])
            yield {
                "name": name,
                "doc": f"{stage_name} stage of pipeline {name}",
                "actions": [_action(stage, name)],
                "file_dep": stage.file_dep,
                "targets": stage.targets,
                "uptodate": [config_changed(stage.config)],
                "clean": [_remove(stage.targets + extra)],
                "verbosity": 2,
            }

    gen.__doc__ = f"The {stage_name} stage of each pipeline."
    return gen


def task_corpus():
    """Pin each pipeline's hub corpus to a commit (runs/NAME/corpus.lock.json); say what it downloads."""
    for name, pipe in PIPES.items():
        if not pipe.hub_inputs:
            continue

        def resolve(p=pipe, n=name):
            try:
                lock = corpus.resolve_corpus(p.hub_inputs, p.lock)
                lines = corpus.plan(lock)
            except UserError as e:
                return TaskFailed(f"pipeline {n!r}: {e}")
            for line in lines:
                print(f"[{n}:corpus] {line}", file=sys.stderr, flush=True)
            return None

        yield {
            "name": name,
            "doc": f"pin the hub corpus of pipeline {name} to commits",
            "actions": [resolve],
            "targets": [str(pipe.lock)],
            "uptodate": [False],  # cheap when locked; it is where a missing download is announced
            "clean": [_remove([pipe.lock])],
            "verbosity": 2,
        }


task_tokenizer = _stage_tasks("tokenizer")
task_prepare = _stage_tasks("prepare")
task_train = _stage_tasks("train")
task_sft = _stage_tasks("sft")
task_dpo = _stage_tasks("dpo")
task_export = _stage_tasks("export")
task_eval = _stage_tasks("eval")


def task_report():
    """runs/NAME/report.md and loss.png from every stage's log."""
    for name, pipe in PIPES.items():
        deps = [s.log for s in pipe.stages] + [s.targets[0] for s in pipe.stages]
        yield {
            "name": name,
            "actions": [(lambda p=pipe: print(f"report: {write_report(p)}") or None)],
            "file_dep": deps,
            "targets": [str(pipe.root / "report.md")],
            "clean": [_remove([pipe.root / "report.md", pipe.root / "loss.png"])],
            "verbosity": 2,
        }


def task_pipeline():
    """Every stage of a pipeline, then its report."""
    for name, pipe in PIPES.items():
        def done(p=pipe, n=name):
            ran = [r for r in ran_this_session if r.startswith(n + ":")]
            state = f"ran {', '.join(r.split(':')[1] for r in ran)}" if ran else "all stages up to date, nothing ran"
            print(f"pipeline {n}: {state}. Report: {p.root / 'report.md'}")
            print("Chat with the result:\n" + "\n".join(chat_instructions(p)))

        yield {
            "name": name,
            "doc": f"run pipeline {name} ({pipe.path})",
            "actions": [done],
            "task_dep": ([f"corpus:{name}"] if pipe.hub_inputs else []) + [f"{s.name}:{name}" for s in pipe.stages]
            + [f"report:{name}"],
            "uptodate": [False],
            "clean": [_remove([pipe.root])],
            "verbosity": 2,
        }
