"""Run one pipeline stage: its smedjan command(s), a log of what ran, crash-resume.

Each command runs as `python -m smedjan_tools.cli ... --json` in the same Python, with
stderr (progress, warnings) passed through and stdout (the JSON summary) kept in
`runs/NAME/logs/STAGE.json` together with the command lines and the duration.

Stages that read a hub corpus run with each hf:// input pinned to the commit in the
pipeline's lock (smedjan.pipeline.corpus); when the first file is neither in the hub cache
nor downloadable (offline, hub unreachable), the stage stops with one line before starting.

Training stages (train, sft, dpo) keep their states in a folder of their own. A marker
file there records a digest of the stage's flags and inputs: a re-run with the same
flags on the same files (after a crash or Ctrl-C) resumes from the newest state;
anything else starts afresh.

    failure = run_stage(pipe.stage("train"))   # None on success, else a message
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from smedjan.io import atomic_write
from smedjan.pipeline.config import Stage

MARKER = "pipeline-stage.json"
ran_this_session: list[str] = []  # stage ids run by this process (for the closing message)


def latest_state(folder: Path) -> Path | None:
    states = []
    for p in folder.glob("state_*.bin"):
        m = re.fullmatch(r"state_(\d+)\.bin", p.name)
        if m:
            states.append((int(m.group(1)), p))
    return max(states)[1] if states else None


def _run_digest(stage: Stage) -> str:
    """Flags plus the identity (path, size, mtime) of every input: a resume is only
    right for the very same data; a rebuilt input, even identical, starts afresh."""
    h = hashlib.sha256(stage.config["digest"].encode())
    for p in stage.file_dep:
        st = Path(p).stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:16]


def _prepare_checkpoint_dir(stage: Stage) -> list[str]:
    """Extra flags for the command: --resume when the same run was cut short."""
    folder = Path(stage.checkpoint_dir)
    marker = folder / MARKER
    digest = _run_digest(stage)
    if folder.is_dir():
        same = False
        try:
            same = json.loads(marker.read_text())["digest"] == digest
        except (OSError, ValueError, KeyError):
            pass
        state = latest_state(folder) if same else None
        if state is not None:
            print(f"[{stage.name}] resuming the interrupted run from {state}", file=sys.stderr, flush=True)
            return ["--resume", str(state)]
        # A run with other flags (or none at all): its states would be refused or wrong.
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    with atomic_write(marker, "w") as f:
        json.dump({"digest": digest, "stage": stage.name}, f)
    return []


def _pinned_commands(stage: Stage, pipeline: str) -> tuple[list[list[str]], str | None]:
    """The stage's commands with hub inputs pinned to the locked commits; or a one-line
    failure when the first file to read can be neither found in the hub cache nor downloaded."""
    if not stage.hub_lock:
        return stage.command, None
    from smedjan.errors import UserError
    from smedjan.pipeline import corpus

    lock = corpus.read_lock(stage.hub_lock)
    try:
        why = corpus.cannot_download(lock)
    except UserError as e:
        why = str(e)
    if why:
        return [], f"pipeline {pipeline!r}, stage {stage.name!r}: {why}"
    return [corpus.pin(args, lock) for args in stage.command], None


def run_stage(stage: Stage, pipeline: str = "") -> str | None:
    """Run a stage; return None on success or a one-line failure naming the stage."""
    commands, failure = _pinned_commands(stage, pipeline)
    if failure:
        return failure
    Path(stage.log).parent.mkdir(parents=True, exist_ok=True)
    for t in stage.targets:
        Path(t).parent.mkdir(parents=True, exist_ok=True)
    for note in stage.notes:
        print(f"[{pipeline}:{stage.name}] note: {note}", file=sys.stderr, flush=True)
    extra = _prepare_checkpoint_dir(stage) if stage.checkpoint_dir else []
    t0 = time.monotonic()
    runs = []
    for args in commands:
        args = [*args, *extra]
        print(f"[{pipeline}:{stage.name}] smedjan {shlex.join(args)}", file=sys.stderr, flush=True)
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "smedjan_tools.cli", *args, "--json"],
                              stdout=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            return (f"stage {stage.name!r} of pipeline {pipeline!r} failed: `smedjan {args[0]}` exited with "
                    f"status {proc.returncode}; earlier stages' artifacts are intact")
        lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
        try:
            summary = json.loads(lines[-1]) if lines else {}
        except json.JSONDecodeError:
            summary = {"stdout": proc.stdout[-2000:]}
        runs.append({"command": ["smedjan", *args], "seconds": round(time.monotonic() - start, 2),
                     "summary": summary})
    log = {"stage": stage.name, "pipeline": pipeline, "seconds": round(time.monotonic() - t0, 2),
           "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "inputs": stage.file_dep, "outputs": stage.targets,
           "notes": stage.notes, "runs": runs}
    with atomic_write(stage.log, "w") as f:
        json.dump(log, f, indent=1)
    ran_this_session.append(f"{pipeline}:{stage.name}")
    return None
