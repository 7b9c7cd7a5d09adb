"""Atomic writes: recognisable temporaries that the next writer removes once their owner
is gone (issue 20 item 7), a full disk as one line with nothing left behind (item 6), the
files' modes, and export-gguf's Ctrl-C."""

from __future__ import annotations

import errno
import io
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from smedjan.errors import UserError
from smedjan.formats import constants as C
from smedjan.formats.checkpoint import save_checkpoint
from smedjan.io import TEMP_RE, DiskFull, atomic_dir, atomic_path, atomic_write, clean_stale_temps, new_temp
from smedjan.model import ModelConfig, Transformer

CFG = ModelConfig.make(vocab_size=2048, dim=32, n_layers=1, n_heads=2, max_seq_len=32)


def _host() -> str:
    probe = new_temp(__import__("pathlib").Path("/tmp"), "probe")
    probe.unlink()
    return TEMP_RE.match(probe.name)["host"]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ---------------------------------------------------------------------------- temporaries
def test_a_temporary_is_named_after_its_target_and_owner(tmp_path):
    with atomic_path(tmp_path / "model.gguf") as tmp:
        m = TEMP_RE.match(tmp.name)
        assert m and m["name"] == "model.gguf" and int(m["pid"]) == os.getpid() and m["kind"] == "tmp"
        assert tmp.parent == tmp_path and (tmp.stat().st_mode & 0o777) == 0o600
        tmp.write_bytes(b"x")
    assert os.listdir(tmp_path) == ["model.gguf"]


def test_only_temporaries_of_gone_owners_are_removed(tmp_path):
    host = _host()
    dead = tmp_path / f".a.bin.smj-{_dead_pid()}-{host}-abc123.tmp"
    live_proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".b.bin.smj-{live_proc.pid}-{host}-abc123.tmp"
        reused = tmp_path / f".c.bin.smj-{live_proc.pid}-{host}-def456.tmp"  # older than its PID's process
        other_host = tmp_path / f".d.bin.smj-{_dead_pid()}-{'0' * 8 if host != '0' * 8 else '1' * 8}-abc123.tmp"
        mine = tmp_path / f".e.bin.smj-{os.getpid()}-{host}-abc123.tmp"
        folder = tmp_path / f".hf.smj-{_dead_pid()}-{host}-abc123.tmp"
        foreign = tmp_path / ".f.bin.abc123.tmp"  # not ours: never touched
        for p in (dead, live, reused, other_host, mine, foreign):
            p.write_bytes(b"partial")
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"partial")
        hour_ago = time.time() - 3600
        os.utime(reused, (hour_ago, hour_ago))
        gone = clean_stale_temps(tmp_path)
        assert sorted(p.name for p in gone) == sorted([dead.name, reused.name, folder.name])
        assert sorted(os.listdir(tmp_path)) == sorted([live.name, other_host.name, mine.name, foreign.name])
    finally:
        live_proc.kill()
        live_proc.wait()


def test_a_folder_swap_killed_half_way_is_put_back(tmp_path):
    old = tmp_path / f".hf.smj-{_dead_pid()}-{_host()}-abc123.old"
    old.mkdir()
    (old / "config.json").write_text("{}")
    clean_stale_temps(tmp_path)  # the target is missing: the set-aside folder is the only copy
    assert (tmp_path / "hf" / "config.json").read_text() == "{}"
    assert os.listdir(tmp_path) == ["hf"]


KILL_WRITER = textwrap.dedent("""
    import os, signal, sys, threading, time, torch
    from pathlib import Path
    from smedjan.formats import constants as C
    out = Path(sys.argv[2])
    what = sys.argv[1]

    def kill_once_the_temporary_appears():  # mid-write: the data takes far longer than this
        while not os.listdir(out.parent):
            time.sleep(0.0005)
        os.kill(os.getpid(), signal.SIGKILL)

    big = {f"w{i}": torch.zeros(1024, 1024) for i in range(32)}  # 128 MB
    threading.Thread(target=kill_once_the_temporary_appears, daemon=True).start()
    if what == "checkpoint":
        from smedjan.formats.checkpoint import save_checkpoint
        save_checkpoint(out, big, kind=C.KIND_MODEL)
    elif what == "tokens":
        import numpy as np
        from smedjan.formats.tokens import TokenWriter
        with TokenWriter(out, vocab_size=50000, tokenizer_fingerprint="0" * 16, bos_id=0) as w:
            for _ in range(64):
                w.write(np.zeros(1 << 20, dtype=np.uint16))
    elif what == "hf":
        from smedjan.io import atomic_dir
        from smedjan.formats.safetensors import write_safetensors
        with atomic_dir(out) as tmp, open(tmp / "model.safetensors", "wb") as f:
            write_safetensors(f, big)
    time.sleep(60)  # never reached: the watcher kills us first
""")


@pytest.mark.parametrize("what, name", [("checkpoint", "final.bin"), ("tokens", "train.bin"), ("hf", "hf")])
def test_a_writer_killed_mid_write_leaves_a_temporary_the_next_write_removes(tmp_path, what, name):
    """safetensors wrote its own .tmpXXXXXX beside the target, and killed prepare and
    export-gguf left their .NAME.XXXX.tmp for ever (183 MB after 20 prepare kills)."""
    proc = subprocess.run([sys.executable, "-c", KILL_WRITER, what, str(tmp_path / name)], timeout=120)
    assert proc.returncode == -signal.SIGKILL
    left = os.listdir(tmp_path)
    assert left and not (tmp_path / name).exists(), left  # killed mid-write, before the rename
    assert all(TEMP_RE.match(n) for n in left), left  # only names the cleanup recognises
    save_checkpoint(tmp_path / "next.bin", {"w": torch.ones(2)}, kind=C.KIND_MODEL)  # the next write there
    assert os.listdir(tmp_path) == ["next.bin"]


# ------------------------------------------------------------------------------ file modes
def test_every_file_of_an_exported_hf_folder_has_the_usual_mode(trained_checkpoint, tmp_path):
    """export-hf wrote model.safetensors with mode 0600 beside 0644 files."""
    from smedjan.export.hf_write import export_hf
    from smedjan.export.load import load_source

    old = os.umask(0o022)
    try:
        export_hf(load_source(trained_checkpoint), tmp_path / "hf")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "hf").iterdir()}
    assert set(modes.values()) == {0o644}, modes
    assert (tmp_path / "hf").stat().st_mode & 0o777 == 0o755


# ------------------------------------------------------------------------ a full disk, injected
class _Filling:
    """A file that raises ENOSPC once `budget` bytes have been written to it."""

    def __init__(self, f, budget: int):
        self._f, self._budget = f, budget

    def write(self, b) -> int:
        n = memoryview(b).nbytes
        if n > self._budget:
            self._f.write(memoryview(b).cast("B")[: self._budget])
            self._budget = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self._budget -= n
        return self._f.write(b)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


@pytest.fixture
def disk_fills_after(monkeypatch):
    """Make every file the writers open for writing fill up after `budget` bytes."""
    import builtins

    def install(budget: int):
        real = builtins.open

        def fake_open(file, mode="r", *args, **kwargs):
            f = real(file, mode, *args, **kwargs)
            return _Filling(f, budget) if any(c in mode for c in "wa+") and "b" in mode else f

        import gguf.gguf_writer

        import smedjan.export.hf_write
        import smedjan.formats.tokens
        import smedjan.io

        for module in (smedjan.io, smedjan.formats.tokens, smedjan.export.hf_write, gguf.gguf_writer):
            monkeypatch.setattr(module, "open", fake_open, raising=False)

    return install


def _assert_disk_full(e: pytest.ExceptionInfo, path) -> None:
    msg = str(e.value)
    assert isinstance(e.value, DiskFull) and isinstance(e.value, UserError)
    assert msg.startswith(f"{path}: no space left on the device: writing it needs ") and "\n" not in msg, msg
    assert " free in " in msg


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, disk_fills_after, tokenizer, trained_checkpoint):
    from smedjan.data.prepare import prepare
    from smedjan.export.gguf import export_gguf
    from smedjan.export.hf_write import export_hf
    from smedjan.export.load import load_source

    src = load_source(trained_checkpoint)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Some text to encode. " * 20000)
    out = tmp_path / "out"
    out.mkdir()
    (out / "final.bin").write_bytes(b"an earlier artifact")
    disk_fills_after(20_000)
    cases = [
        (out / "train.bin", lambda p: prepare([corpus], tokenizer, p, workers=1)),
        (out / "final.bin", lambda p: save_checkpoint(p, Transformer(CFG).state_dict(), kind=C.KIND_MODEL,
                                                      config=CFG, tokenizer=tokenizer)),
        (out / "tok.bin", lambda p: tokenizer.save(p)),
        (out / "m.gguf", lambda p: export_gguf(src, p, quant="f32")),
        (out / "hf", lambda p: export_hf(src, p)),
    ]
    for path, write in cases:
        with pytest.raises(DiskFull) as e:
            write(path)
        _assert_disk_full(e, path)
        assert sorted(os.listdir(out)) == ["final.bin"], (path, os.listdir(out))
    assert (out / "final.bin").read_bytes() == b"an earlier artifact"  # untouched


def test_a_full_disk_in_the_middle_of_training_keeps_the_earlier_states(tmp_path, monkeypatch):
    from smedjan.formats import safetensors as st
    from smedjan.training.state import list_states, read_train_state
    from test_train_loop import make

    real = st.write_safetensors
    calls = []

    def fills_on_the_second(f, tensors, metadata=None):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(f, tensors, metadata)

    monkeypatch.setattr(st, "write_safetensors", fills_on_the_second)
    tr = make(tmp_path, steps=6, checkpoint_every=2, keep=0)
    with pytest.raises(DiskFull) as e:
        tr.fit()
    _assert_disk_full(e, tmp_path / "state_4.bin")
    assert [s for s, _ in list_states(tmp_path)] == [2]
    assert read_train_state(tmp_path / "state_2.bin", "train").step == 2
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl", "state_2.bin"]


def test_free_space_is_checked_before_a_checkpoint_is_written(tmp_path, monkeypatch):
    import smedjan.io

    class Full:
        f_bfree = f_bavail = f_blocks = 10
        f_frsize = 4096

    monkeypatch.setattr(smedjan.io.os, "statvfs", lambda p: Full)
    with pytest.raises(DiskFull, match="needs about 2.1 MB, 41.0 kB is free"):
        save_checkpoint(tmp_path / "x.bin", {"w": torch.zeros(512, 1024)}, kind=C.KIND_MODEL)
    assert os.listdir(tmp_path) == []


def test_atomic_write_and_dir_map_a_full_disk_whatever_the_writer(tmp_path):
    for cm in (lambda: atomic_write(tmp_path / "a.bin"), lambda: atomic_dir(tmp_path / "d")):
        with pytest.raises(DiskFull, match="no space left"):
            with cm():
                raise OSError(errno.EDQUOT, "Disk quota exceeded")
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------- export-gguf, Ctrl-C
def test_ctrl_c_while_export_gguf_writes_tensors_is_a_keyboard_interrupt(trained_checkpoint, tmp_path, monkeypatch):
    """1 of 45 Ctrl-C: 'TypeError: expected str, bytes or os.PathLike object, not BufferedWriter'.
    gguf wrote tensors with numpy's tofile, which asks whether the file is os.PathLike and
    takes a KeyboardInterrupt raised in that check for a yes. Here the Ctrl-C lands at the
    first Python code run for the file once tensor data is written: the PathLike check
    (numpy), or a write."""
    import gguf.gguf_writer

    from smedjan.export.gguf import export_gguf

    writes = []

    class Writer(io.BufferedWriter):
        def write(self, b):
            writes.append(len(memoryview(b)))
            if len(writes) > 8:  # past the header, key-values and tensor infos
                raise KeyboardInterrupt
            return super().write(b)

    def opened(path, mode="r", *a, **k):
        return Writer(io.FileIO(path, mode.replace("b", "")))

    real_hook = os.PathLike.__subclasshook__.__func__

    def hook(cls, sub):
        if sub is Writer:
            raise KeyboardInterrupt
        return real_hook(cls, sub)

    monkeypatch.setattr(gguf.gguf_writer, "open", opened, raising=False)
    monkeypatch.setattr(os.PathLike, "__subclasshook__", classmethod(hook))
    with pytest.raises(KeyboardInterrupt):
        export_gguf(trained_checkpoint, tmp_path / "m.gguf", quant="f32")
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- messages
def test_a_missing_token_file_is_named_once(tmp_path):
    from smedjan.formats.tokens import TokenFile

    with pytest.raises(UserError) as e:
        TokenFile.open(tmp_path / "train.bin")
    assert str(e.value) == f"{tmp_path / 'train.bin'}: token file does not exist"  # was "tokens file file"
