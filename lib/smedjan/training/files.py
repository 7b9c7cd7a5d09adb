"""What a training run writes into its checkpoint folder, besides the checkpoints.

- `metrics.jsonl`: one JSON object per step, appended and flushed as the run goes (a
  crash loses at most the line being written). On resume from state_N.bin the file is
  rewritten (atomically) to its lines up to step N, so the resumed run's lines follow
  on exactly as an uninterrupted run's would.
- state rotation: after state_N.bin is written, only the newest `keep` states with a
  step <= N stay (states of a longer, older run in the same folder are left alone).
- stale temporaries: a run killed while writing leaves `.state_N.bin.XXXX.tmp` (never a
  partial `state_N.bin`); the next run in the folder removes them.

    log = MetricsLog(folder / "metrics.jsonl", resume_step=120)   # or None for a fresh run
    log.write({"step": 121, "loss": 3.2})
    rotate_states(folder, newest=200, keep=3)
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from smedjan.io import atomic_write
from smedjan.training.state import list_states

TEMP_PREFIXES = (".state_", ".final.bin.", ".best.bin.", ".metrics.jsonl.")


def _clean(v):
    # Strict JSON has no NaN/Inf: a non-finite value (a skipped step's loss) is written as null.
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class MetricsLog:
    def __init__(self, path: str | os.PathLike, resume_step: int | None = None):
        self.path = Path(path)
        if resume_step is None:
            self._f = open(self.path, "w", encoding="utf-8")
            return
        kept = []
        if self.path.exists():
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut by a crash
                    if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= resume_step:
                        kept.append(json.dumps(rec) + "\n")
        with atomic_write(self.path, "w", encoding="utf-8") as f:
            f.writelines(kept)
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Every record of a metrics.jsonl (tests, plots)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def rotate_states(folder: str | os.PathLike, newest: int, keep: int) -> list[Path]:
    """Delete all but the `keep` newest state_N.bin with N <= `newest` (keep 0 = keep all)."""
    if keep <= 0:
        return []
    mine = [p for step, p in list_states(folder) if step <= newest]
    doomed = mine[:-keep]
    for p in doomed:
        p.unlink(missing_ok=True)
    return doomed


def clean_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove temporaries that a killed run left behind (they are never valid files)."""
    folder = Path(folder)
    gone = []
    if folder.is_dir():
        for name in os.listdir(folder):
            if name.startswith(TEMP_PREFIXES) and name.endswith(".tmp"):
                (folder / name).unlink(missing_ok=True)
                gone.append(folder / name)
    return gone
