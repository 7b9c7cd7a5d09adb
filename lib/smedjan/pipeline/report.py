"""`runs/NAME/report.md`: one section per stage (inputs, flags, duration, figures) and
a loss-curve PNG (matplotlib, the `plot` extra; without it the report says so).

    path = write_report(pipe)      # after every stage has run
"""

from __future__ import annotations

import json
import math
import shlex
import time
from pathlib import Path

from smedjan.io import atomic_path, atomic_write
from smedjan.pipeline.config import Pipeline

# Figures worth a headline, per stage, from the tools' --json summaries (when present).
HEADLINES = {
    "tokenizer": ("vocab_size", "merges", "pattern", "fingerprint", "chars"),
    "prepare": ("train_tokens", "train_docs", "val_tokens", "val_docs", "dtype", "mb_per_s", "tokens", "documents"),
    "train": ("steps", "step", "params", "last_loss", "loss", "val_loss", "val_bpb", "best", "reason", "tok_s"),
    "sft": ("steps", "step", "examples", "skipped", "last_loss", "loss", "val_loss", "reason"),
    "dpo": ("steps", "step", "pairs", "skipped", "last_loss", "loss", "rewards/accuracies", "rewards/margins",
            "reward_accuracy_before", "reward_accuracy_after", "reason"),
    "export": ("quant", "tensors", "bytes", "size_mb", "seconds"),
    "eval": ("bits_per_byte", "loss", "perplexity", "core", "core_tasks", "longctx_accuracy"),
}


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    if isinstance(v, (dict, list)):
        return json.dumps(v)[:120]
    return str(v)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and len(v) <= 12:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def bytes_per_token(pipe: Pipeline) -> float | None:
    """Tokenizer compression on the held-out split: text bytes / ordinary tokens of val.bin."""
    try:
        import numpy as np

        from smedjan.formats.tokens import TokenFile
        from smedjan.tokenizer import Tokenizer

        tok = Tokenizer.load(pipe.root / "tokenizer.bin")
        val = TokenFile.open(pipe.root / "val.bin")
        ids = np.asarray(val.tokens[: 4_000_000], dtype=np.int64)
        lengths = tok.token_byte_lengths[ids]
        ordinary = int((lengths > 0).sum())
        return float(lengths.sum()) / max(ordinary, 1)
    except Exception:  # the report must not fail over a figure
        return None


def train_figures(rows: list[dict]) -> dict:
    losses = [r["loss"] for r in rows if isinstance(r.get("loss"), (int, float))]
    out: dict = {}
    if losses:
        out["first loss"], out["last loss"] = losses[0], losses[-1]
    tps = sorted(r["tok_s"] for r in rows if isinstance(r.get("tok_s"), (int, float)))
    if tps:
        out["median tok/s"] = tps[len(tps) // 2]
    for key in ("val_loss", "val_bpb", "rewards/accuracies", "rewards/margins"):
        vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        if vals:
            out[f"last {key}"] = vals[-1]
    steps = [r["step"] for r in rows if "step" in r]
    if steps:
        out["steps"] = max(steps)
    return out


def plot_losses(curves: dict[str, list[dict]], out: Path) -> str | None:
    """Loss against step, one panel per training stage; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    curves = {k: v for k, v in curves.items() if any("loss" in r for r in v)}
    if not curves:
        return None
    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.6), squeeze=False)
    for ax, (name, rows) in zip(axes[0], curves.items()):
        pts = [(r["step"], r["loss"]) for r in rows if isinstance(r.get("loss"), (int, float)) and "step" in r]
        if pts:
            ax.plot(*zip(*pts), lw=1, label="train loss")
        val = [(r["step"], r["val_loss"]) for r in rows if isinstance(r.get("val_loss"), (int, float))]
        if val:
            ax.plot(*zip(*val), "o-", ms=3, label="val loss")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return out.name


def chat_instructions(pipe: Pipeline) -> list[str]:
    ggufs = pipe.stage("export").targets
    return [
        f"- smedjan: `smedjan chat --checkpoint {pipe.final_model}`",
        f"- llama.cpp: `llama-cli -m {ggufs[0]} -cnv` (the chat template is embedded), or with "
        f"llama-cpp-python: `python -m llama_cpp.server --model {ggufs[0]}`",
    ]


def write_report(pipe: Pipeline) -> Path:
    root = pipe.root
    lines = [f"# smedjan pipeline `{pipe.name}`", "",
             f"Written {time.strftime('%Y-%m-%d %H:%M:%S')} from `{pipe.path}`. Final model: `{pipe.final_model}`.",
             "", "## Chat with the result", "", *chat_instructions(pipe), ""]
    rows, sections, curves = [], [], {}
    for stage in pipe.stages:
        log = _read_json(Path(stage.log)) or {}
        figures: dict = {}
        runs = log.get("runs", [])
        for run in runs:
            flat = _flatten(run.get("summary", {}))
            keys = [k for k in HEADLINES.get(stage.name, ()) if k in flat] or list(flat)[:8]
            cmd = run.get("command", [])
            # several runs of one stage (export per quant): prefix each figure with its quant
            prefix = f"{cmd[cmd.index('--quant') + 1]} " if len(runs) > 1 and "--quant" in cmd else ""
            for k in keys:
                figures[prefix + k] = flat[k]
        if stage.name == "tokenizer":
            bpt = bytes_per_token(pipe)
            if bpt:
                figures["bytes/token (val.bin)"] = round(bpt, 3)
        if stage.name in ("tokenizer", "prepare") and stage.hub_lock:
            from smedjan.pipeline.corpus import describe, read_lock

            for url, what in describe(read_lock(stage.hub_lock)).items():
                figures[f"corpus {url}"] = what
        if stage.checkpoint_dir:
            m = _metrics(Path(stage.checkpoint_dir) / "metrics.jsonl")
            if m:
                curves[stage.name] = m
                figures.update(train_figures(m))
        if stage.name == "export":
            for t in stage.targets:
                if Path(t).exists():
                    figures[f"{Path(t).name} MB"] = round(Path(t).stat().st_size / 1e6, 2)
        if stage.name == "eval":
            # after the headline figures, each task's accuracy (centered: 0 is chance)
            for run in runs:
                for task, v in (run.get("summary", {}).get("centered") or {}).items():
                    figures[f"centered {task}"] = v
        seconds = log.get("seconds")
        rows.append(f"| {stage.name} | {seconds if seconds is not None else 'not run'} | "
                    + "; ".join(f"{k} {_fmt(v)}" for k, v in list(figures.items())[:4]) + " |")
        sec = [f"## {stage.name}", ""]
        for run in log.get("runs", []) or [{"command": ["smedjan", *a]} for a in stage.command]:
            sec.append(f"    {shlex.join(run['command'])}")
        sec += ["", f"- inputs: {', '.join(f'`{p}`' for p in stage.file_dep[:6])}"
                + (f" and {len(stage.file_dep) - 6} more" if len(stage.file_dep) > 6 else ""),
                f"- outputs: {', '.join(f'`{p}`' for p in stage.targets)}",
                f"- duration: {seconds} s" if seconds is not None else "- duration: not run yet"]
        sec += [f"- {k}: {_fmt(v)}" for k, v in figures.items()]
        sec += [f"- note: {n}" for n in stage.notes]
        sections.append("\n".join(sec) + "\n")
    png = plot_losses(curves, root / "loss.png")
    lines += ["## Stages", "", "| stage | seconds | headline |", "|---|---|---|", *rows, ""]
    if png:
        lines += ["## Loss curves", "", f"![loss curves]({png})", ""]
    else:
        lines += ["## Loss curves", "", "matplotlib is not installed, so no plot was drawn: "
                  "`pip install 'smedjan[plot]'` and re-run `doit report:" + pipe.name + "`.", ""]
    lines += sections
    out = root / "report.md"
    with atomic_write(out, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    return out
