"""Helpers for tests: run a smedjan tool as a real subprocess and check its contract."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data"
SHARED = Path(os.environ.get("SMEDJAN_SHARED_DATA", REPO.parent / "shared" / "data"))


class Result:
    def __init__(self, proc: subprocess.CompletedProcess):
        self.code = proc.returncode
        self.out = proc.stdout
        self.err = proc.stderr

    def __repr__(self) -> str:
        return f"<exit {self.code}\nstdout: {self.out[-2000:]}\nstderr: {self.err[-2000:]}>"


def smedjan(*args, input: str | None = None, cwd: Path | None = None, env: dict | None = None,
            timeout: float = 600) -> Result:
    """Run `smedjan ARGS...` in a subprocess, as a user would."""
    full_env = {**os.environ, "SMEDJAN_PLAIN_PROGRESS": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "smedjan_tools.cli", *map(str, args)], input=input,
                          capture_output=True, text=True, cwd=cwd, env=full_env, timeout=timeout)
    return Result(proc)


def assert_user_error(res: Result, *needles: str) -> None:
    """Exit 2, no traceback, and one `error:` line, the last line on stderr, that mentions
    each needle (the README's contract)."""
    assert res.code == 2, res
    assert "Traceback" not in res.err, res
    lines = [ln for ln in res.err.splitlines() if "error:" in ln]
    assert len(lines) == 1, res
    assert res.err.splitlines()[-1] == lines[0] and lines[0].startswith("smedjan "), res
    for n in needles:
        assert n in lines[0], (n, res)
