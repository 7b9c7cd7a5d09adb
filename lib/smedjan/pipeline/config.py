"""Pipeline TOML -> stages with their commands, inputs and outputs.

A pipeline file holds only flags. Its sections are stages, in this fixed order:

    [corpus]     input = [...]           the text the tokenizer and prepare read
    [tokenizer]  flags of `smedjan tokenizer`
    [prepare]    flags of `smedjan prepare`
    [train]      flags of `smedjan train`
    [sft]        data = [...] + flags of `smedjan sft`        (optional)
    [dpo]        data = [...] + flags of `smedjan dpo`        (optional)
    [export]     quant = ["q4_0", ...] + flags of `smedjan export-gguf`
    [eval]       flags of `smedjan eval`                      (optional)

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


@dataclass
class Pipeline:
    name: str
    path: Path
    root: Path  # runs/NAME
    settings: dict
    stages: list[Stage]

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
    """Corpus entries (files, folders, globs) -> the sorted files they stand for."""
    from smedjan.data.sources import expand_inputs

    resolved = [str(p if Path(p).is_absolute() else base / p) for p in inputs]
    return [str(p) for p in expand_inputs(resolved)]


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
        raise UserError(f"{path}: [corpus] needs input = [files, folders or globs]")
    try:
        corpus_files = expand_files(corpus, base)
    except UserError as e:
        raise UserError(f"{path}: [corpus] {e}") from None
    root = Path(runs) / name
    logs = root / "logs"
    st = settings
    tok, train_bin, val_bin = root / "tokenizer.bin", root / "train.bin", root / "val.bin"
    stages: list[Stage] = []

    def add(name: str, args: list[list[str]], deps: list[str], targets: list[str], cfg: dict, ckdir: str | None = None):
        stages.append(Stage(name, args, deps, targets, {"args": args, **cfg}, str(logs / f"{name}.json"), ckdir))

    corpus_args = [a for f in corpus for a in ("--input", str(f if Path(f).is_absolute() else base / f))]
    add("tokenizer", [["tokenizer", *corpus_args, "--output", str(tok), *flags(st["tokenizer"])]],
        corpus_files, [str(tok)], {"corpus": corpus_files})
    add("prepare", [["prepare", *corpus_args, "--tokenizer", str(tok), "--output", str(train_bin),
                     "--val-output", str(val_bin), *flags(st["prepare"])]],
        [str(tok), *corpus_files], [str(train_bin), str(val_bin)], {"corpus": corpus_files})
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
        add("eval", [["eval", "--checkpoint", str(final), "--dataset", str(val_bin), "--output-json", out,
                      *flags(st["eval"])]], [str(final), str(val_bin)], [out], {})
    for s in stages:
        s.config["digest"] = _digest(s.config)
    return Pipeline(name, path, root, settings, stages)


def load_pipelines(folder: str | os.PathLike, runs: str | os.PathLike = "runs",
                   base: str | os.PathLike = ".") -> dict[str, Pipeline]:
    return {p.stem: load_pipeline(p, runs, base) for p in sorted(Path(folder).glob("*.toml"))}
