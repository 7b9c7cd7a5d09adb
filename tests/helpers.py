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


def hub_cache_dataset(hf_home: Path, repo_id: str, sha: str, files: dict[str, bytes], ref: str | None = "main") -> Path:
    """Lay `files` out as huggingface_hub caches dataset `repo_id` at commit `sha`, under
    $HF_HOME/hub: blobs/<sha256>, snapshots/<sha>/<path> linking to its blob, refs/<ref>."""
    import hashlib

    repo = hf_home / "hub" / ("datasets--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for path, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = repo / "snapshots" / sha / path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if ref:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(sha)
    return repo


def hub_env(hf_home: Path, offline: bool = True) -> dict:
    """Environment for a tool run against the hub cache in `hf_home` (offline unless told)."""
    env = {"HF_HOME": str(hf_home), "HF_HUB_CACHE": str(hf_home / "hub"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    env["HF_HUB_OFFLINE"] = "1" if offline else "0"
    return env
