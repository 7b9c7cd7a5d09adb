"""What a training run writes into its checkpoint folder, besides the checkpoints.

- `metrics.jsonl`: one JSON object per step, appended and flushed as the run goes (a
  crash loses at most the line being written). On resume from state_N.bin the file is
  rewritten (atomically) to its lines up to step N, so the resumed run's lines follow
  on exactly as an uninterrupted run's would.
- state rotation: after state_N.bin is written, only the newest `keep` states with a
  step <= N stay (states of a longer, older run in the same folder are left alone).
- stale temporaries: a run killed while writing leaves `.state_N.bin.XXXX.tmp` (never a
  partial `state_N.bin`); the next run in the folder removes them.
- one run at a time: `hold_run_folder` takes an exclusive lock on the folder for the whole
  run; a second run into the same folder is refused with one line naming the holder's PID.

    with hold_run_folder(folder):
        log = MetricsLog(folder / "metrics.jsonl", resume_step=120)   # or None for a fresh run
    log.write({"step": 121, "loss": 3.2})
    rotate_states(folder, newest=200, keep=3)
"""

from __future__ import annotations

import errno
import json
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from smedjan.errors import UserError
from smedjan.io import TEMP_RE, atomic_write, disk_full_error, is_disk_full
from smedjan.io import clean_stale_temps as io_clean_stale_temps
from smedjan.training.state import list_states

TEMP_PREFIXES = (".state_", ".final.bin.", ".best.bin.", ".metrics.jsonl.")
LOCK_NAME = ".smedjan-run.lock"


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
        try:
            self._f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
            self._f.flush()
        except OSError as e:
            if is_disk_full(e):  # the states written so far stay; resume drops a cut line
                raise disk_full_error(self.path, atomic=False) from None
            raise

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
    """Remove temporaries that a killed run left behind (they are never valid files): any
    of smedjan's whose owner is gone (`smedjan.io.clean_stale_temps`), and the unnamed
    ones of older smedjan versions (`.state_N.bin.XXXXXXXX.tmp`). Called with the folder
    locked (`hold_run_folder`), so no other run can be writing them."""
    folder = Path(folder)
    gone = io_clean_stale_temps(folder)
    if folder.is_dir():
        for name in os.listdir(folder):
            if name.startswith(TEMP_PREFIXES) and name.endswith(".tmp") and not TEMP_RE.match(name):
                (folder / name).unlink(missing_ok=True)
                gone.append(folder / name)
    return gone


def _holder_pid(fd: int) -> str:
    # The holder writes its PID right after it takes the lock: give it a moment.
    for _ in range(20):
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        if text.isdigit():
            return text
        time.sleep(0.01)
    return "unknown"


@contextmanager
def hold_run_folder(folder: str | os.PathLike | None) -> Iterator[None]:
    """Hold an exclusive lock on the checkpoint folder `folder` (made if missing) while the
    block runs (None: no folder, nothing to lock). A second run into the same folder (any tool, any process)
    is refused with one line naming the holder's PID.

    The lock is an flock on `folder/.smedjan-run.lock`, which holds the PID. The kernel
    drops it when its holder dies, however it dies, so a lock file left by a killed run is
    no obstacle: the next run takes it over. The file is removed on release; a run that
    opened it just before that checks that the file it locked is still the one in the
    folder, and retries otherwise.
    """
    if folder is None:
        yield
        return
    import fcntl

    Path(folder).mkdir(parents=True, exist_ok=True)
    path = Path(folder) / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder_pid(fd)
            os.close(fd)
            raise UserError(f"{folder}: another run (PID {holder}) is writing to this checkpoint folder; wait for it "
                            "to finish or choose another --checkpoint-dir") from None
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):  # a filesystem without locks
                from smedjan.cli import warn

                warn(f"{folder}: cannot lock the checkpoint folder ({e.strerror}); make sure no other run uses it")
                yield
                return
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # we locked a file that its last holder had just removed: start over
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        path.unlink(missing_ok=True)  # still ours: nobody else can hold it while we do
        os.close(fd)
