"""Atomic writes, temporary names, disk-full errors and input-path checks shared by every tool.

A tool never leaves a half-written artifact under its real name: it writes to a
temporary file in the same folder, flushes and fsyncs it, then renames it over the
target (an atomic step on POSIX), and fsyncs the folder so the rename survives a
power cut. An exception or Ctrl-C removes the temporary file and leaves any existing
artifact untouched.

Temporaries have one recognisable name, `.TARGET.smj-PID-HOST-RANDOM.tmp` (HOST: 8 hex
digits of the host name's hash), so that a run killed with SIGKILL, which cleans up
nothing, leaves files the next writer can recognise: every atomic write first removes
the temporaries in its folder whose owner is gone (same host, PID not running, or
running but started after the temporary was last written, i.e. a reused PID). A live
run's temporaries, and other hosts' on a shared folder, are never touched.

A full disk (ENOSPC, EDQUOT) while writing is a `DiskFull` error: one line naming the
file, the space it needs (exact when the writer says how much it will write, else at
least what was written when the disk filled) and what is free; the temporary is gone.

    with atomic_write("tokenizer.bin") as f:
        f.write(payload)

    with atomic_path("model.gguf", expected_size=n_bytes) as tmp:   # for writers that take a name
        gguf_writer.write_to(tmp)
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

from smedjan.errors import UserError

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
TEMP_RE = re.compile(r"^\.(?P<name>.+)\.smj-(?P<pid>\d+)-(?P<host>[0-9a-f]{8})-[0-9a-z]{6}\.(?P<kind>tmp|old)$")
_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


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


# --------------------------------------------------------------------- temporary names
def new_temp(folder: Path, target_name: str, *, folder_kind: bool = False, kind: str = "tmp") -> Path:
    """Create (exclusively, mode 0600/0700) a temporary file or folder beside `target_name`."""
    for _ in range(100):
        rand = "".join(secrets.choice("0123456789abcdefghijklmnopqrstuvwxyz") for _ in range(6))
        p = folder / f".{target_name}.smj-{os.getpid()}-{_HOST}-{rand}.{kind}"
        try:
            if folder_kind:
                os.mkdir(p, 0o700)
            else:
                os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
            return p
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(folder / target_name))


def _started_after(pid: int, when: float) -> bool:
    """Whether process `pid` started after time `when` (so it cannot have written a file
    last modified then). False where that cannot be known."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        with open("/proc/stat", "rb") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith(b"btime"))
        start = btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return False
    return start > when + 2  # btime has 1 s resolution


def _owner_gone(pid: int, mtime: float) -> bool:
    if pid == os.getpid():
        return False  # ours: another thread of this process may be writing it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # a live process of another user
    return _started_after(pid, mtime)


def clean_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporaries in `folder` that dead runs of this host left (see the module
    docstring). A stale `.old` folder is a previous artifact set aside by an atomic folder
    swap that was killed half-way: it goes back under its name if that is free."""
    folder = Path(folder)
    gone: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return gone
    for entry in entries:
        m = TEMP_RE.match(entry.name)
        if not m or m["host"] != _HOST:
            continue
        try:
            if not _owner_gone(int(m["pid"]), entry.stat(follow_symlinks=False).st_mtime):
                continue
            p = Path(entry.path)
            if m["kind"] == "old" and not (folder / m["name"]).exists():
                os.replace(p, folder / m["name"])
            elif entry.is_dir(follow_symlinks=False):
                shutil.rmtree(p)
            else:
                p.unlink()
            gone.append(p)
        except OSError:  # raced with another cleaner, or not ours to remove
            continue
    return gone


# --------------------------------------------------------------------------- disk full
class DiskFull(UserError):
    """The disk (or quota) filled while writing an artifact."""


def is_disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
        return True
    # safetensors (Rust) reports it as a SafetensorError carrying the OS message
    return type(e).__name__ == "SafetensorError" and "No space left" in str(e)


def human_bytes(n: float) -> str:
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def _free(folder: Path) -> int:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return 0


def disk_full_error(target: Path, expected_size: int | None = None, written: int = 0,
                    atomic: bool = True) -> DiskFull:
    """The one-line error for a full disk: the file, the space it needs (`expected_size`
    when known, else more than what was `written`) and the free space."""
    folder = target.parent if str(target.parent) else Path(".")
    free = human_bytes(_free(folder))
    if expected_size:
        need = f"writing it needs about {human_bytes(expected_size)}, {free} is free in {folder}"
    elif written:
        need = f"writing it needs more than the {human_bytes(written)} written when the disk filled, {free} is " \
               f"free in {folder}"
    else:
        need = f"{free} is free in {folder}"
    done = "; nothing was written" if atomic else ""
    return DiskFull(f"{target}: no space left on the device: {need}{done}")


def check_free_space(target: Path, required_size: int, expected_size: int | None = None) -> None:
    """Refuse before writing when the folder's filesystem lacks `required_size` bytes
    (counting blocks reserved for root: the write itself decides in the edge cases); the
    message names `expected_size` when given."""
    folder = target.parent if str(target.parent) else Path(".")
    try:
        st = os.statvfs(folder)
    except OSError:
        return
    if st.f_bfree * st.f_frsize < required_size:
        raise disk_full_error(target, expected_size or required_size)


def _tree_size(p: Path) -> int:
    try:
        if p.is_dir():
            return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        return p.stat().st_size
    except OSError:
        return 0


# ------------------------------------------------------------------------ atomic writes
@contextmanager
def atomic_path(path: str | os.PathLike, expected_size: int | None = None,
                required_size: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it over `path`.
    `expected_size` (bytes, when the writer knows or can estimate it) is named if the disk
    fills; `required_size` (default: `expected_size`), a size the file certainly reaches, is
    checked against the free space before anything is written."""
    target = check_output_path(path)
    folder = target.parent if str(target.parent) else Path(".")
    clean_stale_temps(folder)
    if required_size or expected_size:
        check_free_space(target, required_size or expected_size, expected_size)
    tmp = new_temp(folder, target.name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        # the temporary is 0600; give the artifact the mode any new file would get.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
        _fsync_dir(folder)
    except BaseException as e:
        written = _tree_size(tmp)
        tmp.unlink(missing_ok=True)
        if is_disk_full(e):
            raise disk_full_error(target, expected_size, written) from None
        raise


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", expected_size: int | None = None,
                 **open_kwargs) -> Iterator[IO]:
    """Open a temporary file for writing; on success it replaces `path` atomically."""
    assert "w" in mode, "atomic_write is for writing"
    with atomic_path(path, expected_size) as tmp:
        with open(tmp, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


@contextmanager
def atomic_dir(path: str | os.PathLike, expected_size: int | None = None,
               required_size: int | None = None) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path` (an existing
    folder is swapped out only after the new one is complete; a failure leaves it untouched).
    Files in it get the mode any new file would get. Sizes as for `atomic_path`."""
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"{target}: output folder {parent} does not exist")
    if target.exists() and not target.is_dir():
        raise UserError(f"{target}: exists and is not a folder")
    clean_stale_temps(parent)
    if required_size or expected_size:
        check_free_space(target, required_size or expected_size, expected_size)
    tmp = new_temp(parent, target.name, folder_kind=True)
    try:
        yield tmp
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
            os.chmod(f, 0o666 & ~_umask())
        os.chmod(tmp, 0o777 & ~_umask())
        if not target.exists():
            os.replace(tmp, target)
        else:
            # two renames (POSIX cannot swap folders atomically): the old folder steps aside
            # under a temporary name (put back by the next writer if this one is killed in
            # between), the new one takes its name, and a failure in between puts it back
            old = new_temp(parent, target.name, folder_kind=True, kind="old")
            os.replace(target, old)
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(old, target)
                raise
            shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(parent)
    except BaseException as e:
        written = _tree_size(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(e):
            raise disk_full_error(target, expected_size, written) from None
        raise

