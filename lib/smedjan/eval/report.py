"""Eval output: plain-text tables, the JSON report and the long-context heatmap.

    print(core_table(results, core_metric(results)))
    print(longctx_table(res))
    write_json("eval.json", {"core": ...})
    heatmap(res, "niah.png")          # False when matplotlib (the `plot` extra) is absent
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING

from smedjan.io import atomic_write

if TYPE_CHECKING:  # no torch import just to print a table
    from smedjan.eval.core import TaskResult
    from smedjan.eval.longctx import LongCtxResult

_KIND = {"multiple_choice": "MC", "schema": "schema", "language_modeling": "LM"}


def _num(v: float, width: int = 8, digits: int = 4) -> str:
    return ("-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}").rjust(width)


def core_table(results: list["TaskResult"], core: float | None = None, core_labels: list[str] | None = None,
               skipped: list[str] | None = None) -> str:
    """One row per task: kind, shots, n, accuracy, baseline, centered, truncated, examples/s;
    then CORE, the mean centered accuracy over `core_labels` (the CORE tasks among them)."""
    w = max([len("task")] + [len(r.label) for r in results])
    head = (f"{'task'.ljust(w)}  {'kind':>6}  {'shots':>5}  {'n':>6}  {'accuracy':>8}  {'baseline':>8}  "
            f"{'centered':>8}  {'trunc':>6}  {'ex/s':>7}")
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(f"{r.label.ljust(w)}  {_KIND.get(r.kind, r.kind):>6}  {r.num_fewshot:>5}  {r.n:>6}  "
                     f"{_num(r.accuracy)}  {_num(r.baseline)}  {_num(r.centered)}  {r.truncated:>6}  "
                     f"{r.examples_per_s:>7.1f}")
    if core is not None:
        labels = core_labels if core_labels is not None else [r.label for r in results]
        others = [r.label for r in results if r.label not in labels]
        lines.append("-" * len(head))
        lines.append(f"{'CORE'.ljust(w)}  {'':>6}  {'':>5}  {'':>6}  {'':>8}  {'':>8}  {_num(core)}   "
                     f"(mean centered accuracy over {len(labels)} CORE task{'s' if len(labels) != 1 else ''}"
                     + (f"; not in it: {', '.join(others)})" if others else ")"))
    if skipped:
        lines.append(f"not run (no data file): {', '.join(skipped)}")
    return "\n".join(lines)


def longctx_table(res: "LongCtxResult") -> str:
    """Accuracy by length (rows) x requested depth (columns), then overall."""
    cols = [f"d={d:g}" for d in res.depths]
    head = f"{'length':>8}  " + "  ".join(c.rjust(7) for c in cols)
    lines = [f"passkey retrieval accuracy, {res.per_cell} needle(s) per cell", head, "-" * len(head)]
    for L in res.lengths:
        lines.append(f"{L:>8}  " + "  ".join(_num(res.accuracy[(L, d)], 7, 2) for d in res.depths))
    lines.append("-" * len(head))
    lines.append(f"overall accuracy: {_num(res.overall, 0, 3).strip()}")
    if res.skipped:
        lines.append(f"skipped (longer than the model's context): {', '.join(map(str, res.skipped))}")
    return "\n".join(lines)


def write_json(path, report: dict) -> None:
    """The full report as indented JSON, written atomically."""
    def clean(v):  # JSON has no NaN/inf: write null
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(clean(report), f, indent=2)
        f.write("\n")


def heatmap(res: "LongCtxResult", path) -> bool:
    """Length x depth accuracy heatmap as PNG; False (nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    from smedjan.io import atomic_path

    grid = [[res.accuracy[(L, d)] for d in res.depths] for L in res.lengths]  # [lengths, depths]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(res.depths), 1.2 + 0.6 * len(res.lengths)))
    im = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(res.depths)), [f"{d:g}" for d in res.depths])
    ax.set_yticks(range(len(res.lengths)), [str(L) for L in res.lengths])
    ax.set_xlabel("needle depth (fraction of the haystack)")
    ax.set_ylabel("context length (tokens)")
    ax.set_title(f"passkey retrieval, {res.per_cell} needle(s) per cell")
    for y, row in enumerate(grid):
        for x, v in enumerate(row):
            ax.text(x, y, f"{v:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="accuracy")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return True
