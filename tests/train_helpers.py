"""Shared pieces of the training tests: token files of the shipped corpus, a micro model's
flags, running `smedjan train` in a subprocess, reading metrics.jsonl.

Subprocesses run with one intra-op thread: bit-exact comparisons need the same thread
count in both runs, and one thread is also the fastest for micro models on a shared
2-core machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from helpers import DATA, Result, smedjan

ENV1 = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

# A micro model: dim 32, 2 layers, 2 heads over the test tokenizer's 2048 tokens (~90k
# parameters); 4 x 32 tokens per step: a step takes milliseconds.
MICRO = ["--size", "custom", "--dim", "32", "--layers", "2", "--heads", "2", "--batch-size", "4", "--seq-len", "32",
         "--warmup", "2", "--lr", "3e-3"]

_CACHE: dict[str, tuple[Path, Path]] = {}


def token_files(tmp_path_factory, tokenizer_path: Path) -> tuple[Path, Path]:
    """(train.bin, val.bin) of tinyshakespeare (blank-line documents, 5% to val), made
    once per session with `smedjan prepare`."""
    key = str(tokenizer_path)
    if key not in _CACHE:
        folder = tmp_path_factory.mktemp("tokens")
        train, val = folder / "train.bin", folder / "val.bin"
        res = smedjan("prepare", "--input", DATA / "pretrain" / "tinyshakespeare.txt.zst", "-t", tokenizer_path,
                      "-o", train, "--val-output", val, "--val-fraction", "0.05", "--txt-split", "blank",
                      "--workers", "1")
        assert res.code == 0, res
        _CACHE[key] = (train, val)
    return _CACHE[key]


def train(*args, env: dict | None = None, timeout: float = 600) -> Result:
    return smedjan("train", *args, env={**ENV1, **(env or {})}, timeout=timeout)


def popen_train(*args, env: dict | None = None) -> subprocess.Popen:
    """`smedjan train ARGS` started in the background (stdout/stderr to pipes)."""
    full_env = {**os.environ, "SMEDJAN_PLAIN_PROGRESS": "1", **ENV1, **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "smedjan_tools.cli", "train", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env)


def metrics(folder: Path) -> list[dict]:
    with open(Path(folder) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def losses(folder: Path) -> dict[int, float]:
    """step -> training loss, from metrics.jsonl (lines with a loss only)."""
    return {r["step"]: r["loss"] for r in metrics(folder) if "loss" in r}


def last_step(folder: Path) -> int:
    """The highest step in metrics.jsonl so far (0 if none); tolerates a half-written line."""
    path = Path(folder) / "metrics.jsonl"
    if not path.exists():
        return 0
    best = 0
    for line in path.read_text().splitlines():
        try:
            best = max(best, json.loads(line).get("step", 0))
        except json.JSONDecodeError:
            pass
    return best


def for_optimizer(flags: list, name: str) -> list:
    """`flags` with --lr / --min-lr dropped for the hybrid (every role has its own rate there,
    and a global one is refused rather than ignored)."""
    if name not in ("hybrid", "muon-adamw"):
        return list(flags)
    out, skip = [], False
    for f in flags:
        if skip:
            skip = False
        elif f in ("--lr", "--min-lr"):
            skip = True
        else:
            out.append(f)
    return out
