"""Pipeline TOML -> stages with their commands, inputs and outputs.

A pipeline file holds only flags. Its sections are stages, in this fixed order:

    [corpus]     input = [...]           the text the tokenizer and prepare read: files,
                                         folders, globs, hf://datasets/... (see corpus.py)
    [tokenizer]  flags of `smedjan tokenizer`
    [prepare]    flags of `smedjan prepare`
    [train]      flags of `smedjan train`
    [sft]        data = [...] + flags of `smedjan sft`        (optional)
    [dpo]        data = [...] + flags of `smedjan dpo`        (optional)
    [export]     quant = ["q4_0", ...] + flags of `smedjan export-gguf`
    [eval]       flags of `smedjan eval`                      (optional)

`[eval] data_dir` names the eval data (relative to the repository, like all data paths);
when that folder is absent, the tasks that need it are left out of the eval command with
a note (in the stage's log lines and the report), and eval still measures val.bin.

A key `some_flag = value` becomes `--some-flag value`; a list repeats the flag; true
becomes `--some-flag`, false `--no-some-flag`. The paths between stages are wired here
and must not be set in the file (each stage's inputs are the previous stages' outputs,
all under `runs/NAME/`). A stage that is absent is skipped: export and eval take the
last model made (dpo, else sft, else train).

    pipe = load_pipeline("pipelines/tiny.toml", runs="runs")
    [s.name for s in pipe.stages]   # ['tokenizer', 'prepare', 'train', 'sft', 'dpo', 'export', 'eval']
"""

from __future__ import annotations

import hashlib
import json
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from smedjan.errors import UserError

CORPUS_LOCK = "corpus.lock.json"  # runs/NAME/: a hub corpus pinned to commits (smedjan.pipeline.corpus)
STAGE_ORDER = ("tokenizer", "prepare", "train", "sft", "dpo", "export", "eval")
SECTIONS = ("corpus",) + STAGE_ORDER
REQUIRED = ("corpus", "tokenizer", "prepare", "train", "export")
TOOLS = {"tokenizer": "tokenizer", "prepare": "prepare", "train": "train", "sft": "sft", "dpo": "dpo",
         "export": "export-gguf", "eval": "eval"}
# Flags each stage gets from the graph; a pipeline file may not set them.
WIRED = {
    "tokenizer": {"input", "output"},
    "prepare": {"input", "tokenizer", "output", "val_output"},
    "train": {"dataset", "val_dataset", "tokenizer", "checkpoint_dir", "resume", "init"},
    "sft": {"checkpoint", "output", "checkpoint_dir", "resume"},
    "dpo": {"checkpoint", "output", "checkpoint_dir", "resume"},
    "export": {"checkpoint", "output"},
    "eval": {"checkpoint", "dataset", "output_json"},
}


@dataclass
class Stage:
    name: str  # tokenizer, prepare, ...
    command: list[list[str]]  # smedjan argument lists, run in order (export: one per quant)
    file_dep: list[str]  # files whose content the stage reads
    targets: list[str]  # files it writes (the artifacts)
    config: dict  # everything that should re-run the stage when it changes
    log: str  # JSON summaries of the stage's runs
    checkpoint_dir: str | None = None  # train/sft/dpo: states for crash-resume
    extra_clean: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # said when the stage runs (what was left out, why)
    hub_lock: str | None = None  # tokenizer/prepare of a hub corpus: the lock that pins its inputs


@dataclass
class Pipeline:
    name: str
    path: Path
    root: Path  # runs/NAME
    settings: dict
    stages: list[Stage]
    hub_inputs: list[str] = field(default_factory=list)  # [corpus] entries on the hub, as written

    @property
    def lock(self) -> Path:
        """The hub corpus pinned to commits (smedjan.pipeline.corpus); only with hub inputs."""
        return self.root / CORPUS_LOCK

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    @property
    def final_model(self) -> str:
        return _final_model(self.root, self.settings)


def flags(section: dict, skip: set[str] = frozenset()) -> list[str]:
    """TOML keys -> command-line flags (see the module docstring)."""
    out: list[str] = []
    for key, value in section.items():
        if key in skip:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, list):
            for v in value:
                if isinstance(v, (bool, list, dict)):
                    raise UserError(f"flag {key!r} lists a {type(v).__name__}; a list holds strings or numbers")
                out += [flag, str(v)]
        elif isinstance(value, (int, float, str)):
            out += [flag, str(value)]
        else:
            raise UserError(f"flag {key!r} has a {type(value).__name__} value; use a string, number, bool or list")
    return out


def _names(value) -> bool:
    """A non-empty list of non-empty strings (file names, globs, quant names)."""
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) and v for v in value)


def expand_files(inputs: list[str], base: Path) -> list[str]:
    """Local corpus entries (files, folders, globs) -> the sorted files they stand for."""
    from smedjan.data.sources import expand_inputs

    resolved = [str(p if Path(p).is_absolute() else base / p) for p in inputs]
    return [str(p) for p in expand_inputs(resolved)]


def _corpus_entry(entry: str, base: Path) -> str:
    """A corpus entry as the tools get it: hub inputs as written, paths from `base`."""
    from smedjan.data.hub import is_hub_url

    return entry if is_hub_url(entry) or Path(entry).is_absolute() else str(base / entry)


def _final_model(root: Path, settings: dict) -> str:
    for stage in ("dpo", "sft"):
        if stage in settings:
            return str(root / f"{stage}.bin")
    return str(root / "checkpoints" / "final.bin")


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def load_pipeline(path: str | os.PathLike, runs: str | os.PathLike = "runs", base: str | os.PathLike = ".") -> Pipeline:
    """Read and check one pipeline TOML; relative data paths are taken from `base`."""
    path, base = Path(path), Path(base)
    name = path.stem
    try:
        settings = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read ({e})") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: malformed TOML ({e})") from None
    unknown = set(settings) - set(SECTIONS)
    if unknown:
        raise UserError(f"{path}: unknown section [{sorted(unknown)[0]}]; sections are {', '.join(SECTIONS)}")
    for sec in REQUIRED:
        if sec not in settings:
            raise UserError(f"{path}: missing section [{sec}]")
    for sec, body in settings.items():
        if not isinstance(body, dict):
            raise UserError(f"{path}: [{sec}] must be a table of flags")
        bad = set(body) & WIRED.get(sec, set())
        if bad:
            raise UserError(f"{path}: [{sec}] sets {sorted(bad)[0]!r}, which the pipeline wires itself")
        try:
            flags(body, skip={"input", "data", "quant"})  # every value has a flag's type, checked here once
        except UserError as e:
            raise UserError(f"{path}: [{sec}] {e}") from None
    corpus = settings["corpus"].get("input")
    if not _names(corpus):
        raise UserError(f"{path}: [corpus] needs input = [files, folders, globs or hf://datasets/... inputs]")
    from smedjan.data.hub import is_hub_url, parse

    hub_inputs = [c for c in corpus if is_hub_url(c)]
    try:
        for c in hub_inputs:  # the form only: resolving needs the network, and happens when a stage runs
            parse(c)
        corpus_files = expand_files([c for c in corpus if not is_hub_url(c)], base)
    except UserError as e:
        raise UserError(f"{path}: [corpus] {e}") from None
    root = Path(runs) / name
    logs = root / "logs"
    st = settings
    tok, train_bin, val_bin = root / "tokenizer.bin", root / "train.bin", root / "val.bin"
    stages: list[Stage] = []

    def add(name: str, args: list[list[str]], deps: list[str], targets: list[str], cfg: dict, ckdir: str | None = None):
        stages.append(Stage(name, args, deps, targets, {"args": args, **cfg}, str(logs / f"{name}.json"), ckdir))

    corpus_args = [a for f in corpus for a in ("--input", _corpus_entry(f, base))]
    # A hub corpus counts by its lock (commit and file list), a file that corpus:NAME writes.
    lock = root / CORPUS_LOCK
    corpus_deps = corpus_files + ([str(lock)] if hub_inputs else [])
    add("tokenizer", [["tokenizer", *corpus_args, "--output", str(tok), *flags(st["tokenizer"])]],
        corpus_deps, [str(tok)], {"corpus": corpus_files + hub_inputs})
    add("prepare", [["prepare", *corpus_args, "--tokenizer", str(tok), "--output", str(train_bin),
                     "--val-output", str(val_bin), *flags(st["prepare"])]],
        [str(tok), *corpus_deps], [str(train_bin), str(val_bin)], {"corpus": corpus_files + hub_inputs})
    if hub_inputs:
        for s in stages:  # tokenizer and prepare: their commands get the locked commits
            s.hub_lock = str(lock)
    ck = root / "checkpoints"
    final = ck / "final.bin"
    add("train", [["train", "--dataset", str(train_bin), "--val-dataset", str(val_bin), "--tokenizer", str(tok),
                   "--checkpoint-dir", str(ck), *flags(st["train"])]],
        [str(tok), str(train_bin), str(val_bin)], [str(final)], {}, str(ck))
    model = final
    for post in ("sft", "dpo"):
        if post not in st:
            continue
        section = dict(st[post])
        data = section.pop("data", None)
        if not _names(data):
            raise UserError(f"{path}: [{post}] needs data = [files]")
        data_files = [str(p if Path(p).is_absolute() else base / p) for p in data]
        for f in data_files:
            if not Path(f).is_file():
                raise UserError(f"{path}: [{post}] data file {f} does not exist")
        out = root / f"{post}.bin"
        args = [post, "--checkpoint", str(model), *(a for f in data_files for a in ("--data", f)),
                "--output", str(out), "--checkpoint-dir", str(root / f"{post}-checkpoints"), *flags(section)]
        add(post, [args], [str(model), *data_files], [str(out)], {}, str(root / f"{post}-checkpoints"))
        model = out
    export = dict(st["export"])
    quants = export.pop("quant", ["q4_0"])
    quants = quants if isinstance(quants, list) else [quants]
    if not _names(quants):
        raise UserError(f"{path}: [export] quant must be a name or a list of names (q4_0, q8_0, f32)")
    ggufs = [str(root / f"model-{q}.gguf") for q in quants]
    add("export", [["export-gguf", "--checkpoint", str(model), "--output", g, "--quant", q, *flags(export)]
                   for q, g in zip(quants, ggufs)], [str(model)], ggufs, {})
    if "eval" in st:
        out = str(root / "eval.json")
        try:
            section, notes = _eval_section(dict(st["eval"]), base)
        except UserError as e:
            raise UserError(f"{path}: {e}") from None
        add("eval", [["eval", "--checkpoint", str(final), "--dataset", str(val_bin), "--output-json", out,
                      *flags(section)]], [str(final), str(val_bin)], [out], {})
        stages[-1].notes = notes
    for s in stages:
        s.config["digest"] = _digest(s.config)
    return Pipeline(name, path, root, settings, stages, hub_inputs)


def _eval_section(section: dict, base: Path) -> tuple[dict, list[str]]:
    """[eval] flags with data_dir taken from `base`; without that folder, the tasks that read
    it are left out, with a note saying so (eval still measures val.bin)."""
    data_dir = section.get("data_dir")
    if data_dir is None:
        return section, []
    if not isinstance(data_dir, str):
        raise UserError(f"[eval] data_dir must be a folder name, not {data_dir!r}")
    folder = Path(data_dir) if Path(data_dir).is_absolute() else base / data_dir
    section["data_dir"] = str(folder)
    if folder.is_dir() or not section.get("tasks"):
        return section, []
    tasks = section.pop("tasks")
    section.pop("data_dir")
    section.pop("max_per_task", None)
    return section, [f"eval tasks {tasks} skipped: their data folder {folder} is absent (not shipped: put "
                     "nanochat's eval bundle there, core/<category>/<task>.jsonl, or point [eval] data_dir at it); "
                     "eval measures val.bin only"]


def load_pipelines(folder: str | os.PathLike, runs: str | os.PathLike = "runs",
                   base: str | os.PathLike = ".") -> dict[str, Pipeline]:
    return {p.stem: load_pipeline(p, runs, base) for p in sorted(Path(folder).glob("*.toml"))}
