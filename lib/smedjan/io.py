"""Atomic writes and input-path checks shared by every tool.

A tool never leaves a half-written artifact under its real name: it writes to a
temporary file in the same folder, flushes and fsyncs it, then renames it over the
target (an atomic step on POSIX), and fsyncs the folder so the rename survives a
power cut. An exception or Ctrl-C removes the temporary file and leaves any existing
artifact untouched.

    with atomic_write("tokenizer.bin") as f:
        f.write(payload)

    with atomic_path("model.gguf") as tmp:   # for writers that take a file name
        gguf_writer.write_to(tmp)
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

from smedjan.errors import UserError


def check_output_path(path: str | os.PathLike) -> Path:
    """Refuse an output path whose folder is missing or which names a folder."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"{p}: output folder {parent} does not exist")
    if p.is_dir():
        raise UserError(f"{p}: output path is a folder, expected a file name")
    return p


def check_input_file(path: str | os.PathLike, what: str = "input") -> Path:
    """Refuse a missing, unreadable or non-file input with a one-line message."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: {what} file does not exist")
    if p.is_dir():
        raise UserError(f"{p}: {what} is a folder, expected a file")
    if not os.access(p, os.R_OK):
        raise UserError(f"{p}: {what} file is not readable")
    return p


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it over `path`."""
    target = check_output_path(path)
    folder = target.parent if str(target.parent) else Path(".")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        # mkstemp creates 0600; give the artifact the mode any new file would get.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
        _fsync_dir(folder)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", **open_kwargs) -> Iterator[IO]:
    """Open a temporary file for writing; on success it replaces `path` atomically."""
    assert "w" in mode, "atomic_write is for writing"
    with atomic_path(path) as tmp:
        with open(tmp, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
