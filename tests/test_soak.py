"""Soak tests: hard stops at random moments of train, prepare and export-gguf (issue 20).

- SIGKILL at a random moment: every artifact under its real name loads afterwards, no
  worker outlives its parent, and the next run into the same folder leaves no temporary.
- SIGTERM / SIGINT at a random moment: the tool exits within a few seconds (prepare 143 /
  130; train 0 / 130 after writing a state that loads) and leaves nothing behind.
- A full disk: on a size-limited tmpfs when this process may mount one (root, Linux),
  else the in-process injected ENOSPC of test_atomic.py: one line, exit 2, no temporary,
  earlier artifacts intact.

Bounded for CI: SMEDJAN_SOAK_ROUNDS (default 2) rounds per tool and signal, a few seconds
each. SMEDJAN_SOAK_ROUNDS=50 is a long run. The kill moment is drawn uniformly over the
time an uninterrupted run works (from its first temporary to its exit, measured first),
from a seeded RNG (SMEDJAN_SOAK_SEED, default 20).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import DATA, smedjan
from smedjan.io import TEMP_RE

pytestmark = [pytest.mark.slow, pytest.mark.skipif(sys.platform != "linux", reason="POSIX signals, /proc")]

ROUNDS = int(os.environ.get("SMEDJAN_SOAK_ROUNDS", "2"))
RNG = random.Random(int(os.environ.get("SMEDJAN_SOAK_SEED", "20")))
EXIT_SECONDS = 20  # "within a few seconds", with room for a loaded 2-core CI machine
ENV = {**os.environ, "SMEDJAN_PLAIN_PROGRESS": "1", "OMP_NUM_THREADS": "1", "SMEDJAN_PREP_JOB_CHARS": "50000"}
MICRO = ["--size", "custom", "--dim", "32", "--layers", "2", "--heads", "2", "--batch-size", "4", "--seq-len", "32",
         "--warmup", "2", "--lr", "3e-3"]


def start(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "smedjan_tools.cli", *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=ENV)


def temporaries(folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if TEMP_RE.match(n) or n.endswith(".tmp") or n.startswith(".tmp"))


def wait_for_work(proc: subprocess.Popen, folder: Path, timeout: float = 120) -> bool:
    """Until the tool made its first temporary in `folder` (it is working) or ended."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if temporaries(folder):
            return True
        time.sleep(0.002)
    return False


def survivors(marker: str) -> list[int]:
    """PIDs of live processes whose command line mentions `marker` (orphaned workers)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace")
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmd and state != "Z":
            found.append(int(pid))
    return found


def no_survivors(marker: str) -> None:
    deadline = time.monotonic() + 10
    while survivors(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert survivors(marker) == [], "a worker outlived its parent"


# --------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """About 6 MB of text: prepare works for a second or two on it with two workers."""
    from smedjan.data.sources import iter_chunks

    text = "".join(c.text for c in iter_chunks([DATA / "pretrain"], max_chars=3_000_000))
    path = tmp_path_factory.mktemp("soak") / "corpus.txt"
    path.write_text(text * 2)
    return path


@pytest.fixture(scope="module")
def train_bin(tmp_path_factory, corpus, tokenizer_path) -> Path:
    out = tmp_path_factory.mktemp("soak_tokens") / "train.bin"
    res = smedjan("prepare", "-i", corpus, "-t", tokenizer_path, "-o", out, "--max-chars", "400000")
    assert res.code == 0, res
    return out


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory, tokenizer) -> Path:
    """A 2.4M-parameter checkpoint: 9.6 MB to write as f32, 2.6 MB as q8_0."""
    from smedjan.formats import constants as C
    from smedjan.formats.checkpoint import save_checkpoint
    from smedjan.model import ModelConfig, Transformer

    cfg = ModelConfig.make(vocab_size=tokenizer.vocab_size, dim=192, n_layers=4, n_heads=4, max_seq_len=128)
    path = tmp_path_factory.mktemp("soak_ck") / "small.bin"
    save_checkpoint(path, Transformer(cfg).state_dict(), kind=C.KIND_MODEL, config=cfg, tokenizer=tokenizer)
    return path


def _check_token_file(path: Path) -> None:
    from smedjan.formats.tokens import TokenFile

    TokenFile.open(path).verify()


def _check_gguf(path: Path) -> None:
    from gguf import GGUFReader

    assert GGUFReader(path).tensors


def _check_states(folder: Path) -> None:
    from smedjan.formats import constants as C
    from smedjan.formats.checkpoint import load_checkpoint

    for p in folder.glob("*.bin"):
        load_checkpoint(p, kinds=(C.KIND_MODEL, C.KIND_TRAIN_STATE))


def work_seconds(args: list, folder: Path, limit: float | None = None) -> float:
    """How long an uninterrupted run works (from its first temporary to its exit), capped at
    `limit` (the run is then stopped): the window the kill moments are drawn from."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    proc = start(*args)
    assert wait_for_work(proc, folder), proc.communicate()[1]
    t0 = time.monotonic()
    try:
        proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        pass
    finally:
        proc.kill()
        proc.communicate()
    shutil.rmtree(folder)
    return time.monotonic() - t0


# -------------------------------------------------------------------------------- SIGKILL
def _kill_then_rerun(tmp_path: Path, args: list, output_check, marker: str) -> None:
    folder = tmp_path / "out"
    window = work_seconds(args, folder)
    landed = 0
    folder.mkdir()
    for r in range(ROUNDS):
        proc = start(*args)
        try:
            if wait_for_work(proc, folder):
                time.sleep(RNG.uniform(0, window))
        finally:
            landed += proc.poll() is None
            proc.kill()
            proc.communicate()
        no_survivors(marker)
        output_check(folder)  # whatever exists under its real name is whole
    assert landed, "every kill came after the run had ended: nothing was tested"
    res = smedjan(*args)  # the next run into the folder
    assert res.code == 0, res
    output_check(folder)
    assert temporaries(folder) == []


def test_sigkill_at_random_moments_of_prepare(tmp_path, corpus, tokenizer_path):
    out = tmp_path / "out" / "train.bin"

    def check(folder):
        if out.exists():
            _check_token_file(out)

    _kill_then_rerun(tmp_path, ["prepare", "-i", corpus, "-t", tokenizer_path, "-o", out, "--workers", "2"],
                     check, str(out))


def test_sigkill_at_random_moments_of_export_gguf(tmp_path, small_checkpoint):
    out = tmp_path / "out" / "m.gguf"

    def check(folder):
        if out.exists():
            _check_gguf(out)

    _kill_then_rerun(tmp_path, ["export-gguf", "-c", small_checkpoint, "-o", out, "--quant", "q8_0"], check,
                     str(out))


def test_sigkill_at_random_moments_of_train(tmp_path, train_bin, tokenizer_path):
    folder = tmp_path / "out"
    args = ["train", "--dataset", train_bin, "--tokenizer", tokenizer_path, *MICRO, "--steps", "24",
            "--checkpoint-every", "3", "--keep", "2", "--checkpoint-dir", folder]
    _kill_then_rerun(tmp_path, args, _check_states, str(folder))
    assert (folder / "final.bin").exists()


# ------------------------------------------------------------------------- SIGTERM, SIGINT
def _signal_loop(tmp_path: Path, args: list, sig: int, codes: set[int], check, window: float | None = None) -> None:
    """`window`: draw the signal moments from it (a run that would go on for ever), else
    from the measured length of a whole run."""
    folder = tmp_path / "out"
    window = window or work_seconds(args, folder)
    for r in range(ROUNDS):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        proc = start(*args)
        if wait_for_work(proc, folder):
            time.sleep(RNG.uniform(0, window))
        sent = time.monotonic()
        proc.send_signal(sig)
        try:
            err = proc.communicate(timeout=EXIT_SECONDS)[1]
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            pytest.fail(f"{signal.Signals(sig).name}: no exit within {EXIT_SECONDS} s (round {r})")
        # 0: it had finished; -sig: it had finished and was shutting down, when Python has
        # handed the signal back to its default action (the output is whole either way)
        assert proc.returncode in codes | {0, -sig}, (proc.returncode, err)
        assert "Traceback" not in err, err
        assert time.monotonic() - sent < EXIT_SECONDS
        assert temporaries(folder) == [], (r, os.listdir(folder))
        check(folder, proc.returncode)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_sigint_stop_prepare_at_once_leaving_nothing(tmp_path, corpus, tokenizer_path, sig, code):
    """Issue 20 item 2: prepare hung in about a third of these, waiting on dead workers."""
    out = tmp_path / "out" / "train.bin"

    def check(folder, rc):
        assert os.listdir(folder) == ([] if rc > 0 else ["train.bin"])
        if rc <= 0:
            _check_token_file(out)
        no_survivors(str(out))

    _signal_loop(tmp_path, ["prepare", "-i", corpus, "-t", tokenizer_path, "-o", out, "--workers", "2"], sig, {code},
                 check)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_sigterm_and_sigint_stop_train_with_a_state(tmp_path, train_bin, tokenizer_path, sig, code):
    folder = tmp_path / "out"

    def check(folder, rc):
        _check_states(folder)
        assert list(folder.glob("state_*.bin")), os.listdir(folder)

    args = ["train", "--dataset", train_bin, "--tokenizer", tokenizer_path, *MICRO, "--steps", "100000",
            "--checkpoint-every", "7", "--checkpoint-dir", folder]
    _signal_loop(tmp_path, args, sig, {code}, check, window=2.0)


# ------------------------------------------------------------------------------ disk full
def _tmpfs(path: Path, size: str) -> bool:
    """Mount a tmpfs of `size` at `path`; False where that is not allowed."""
    if sys.platform != "linux" or os.geteuid() != 0 or not shutil.which("mount"):
        return False
    path.mkdir(exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return res.returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """A folder on a 3 MB tmpfs (skips where none can be mounted; test_atomic.py injects
    ENOSPC in-process instead)."""
    mnt = tmp_path / "disk"
    if not _tmpfs(mnt, "3m"):
        pytest.skip("cannot mount a tmpfs here (needs root on Linux); the injected ENOSPC tests of "
                    "test_atomic.py cover a full disk")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_is_one_line_for_every_writing_tool(small_disk, corpus, small_checkpoint, train_bin,
                                                        tokenizer_path):
    from helpers import assert_user_error

    (small_disk / "keep.bin").write_bytes(b"x" * 100_000)  # an earlier artifact
    cases = [
        ("prepare", "-i", corpus, "-t", tokenizer_path, "-o", small_disk / "train.bin", "--workers", "2"),
        ("export-gguf", "-c", small_checkpoint, "-o", small_disk / "m.gguf", "--quant", "f32"),
        ("export-hf", "-c", small_checkpoint, "-o", small_disk / "hf"),
        ("merge", small_checkpoint, small_checkpoint, "-o", small_disk / "merged.bin"),
        ("train", "--dataset", train_bin, "--tokenizer", tokenizer_path, *MICRO, "--steps", "40",
         "--checkpoint-every", "2", "--keep", "0", "--checkpoint-dir", small_disk / "ck"),
    ]
    for args in cases:
        res = smedjan(*args, env={"OMP_NUM_THREADS": "1"})
        assert_user_error(res, "no space left on the device", str(small_disk))
        assert temporaries(small_disk) == [], (args[0], os.listdir(small_disk))
        assert (small_disk / "keep.bin").read_bytes() == b"x" * 100_000
    states = sorted((small_disk / "ck").glob("state_*.bin"))
    assert states, "the states written before the disk filled stay"
    _check_states(small_disk / "ck")
