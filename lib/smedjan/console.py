"""What library code tells the user while it works: log lines, warnings and progress.

- `log()` writes human messages to stderr, so stdout stays clean for `--json`.
- `warn()` prefixes the tool's name: `smedjan train: warning: ...`.
- `progress()` draws a rich progress bar on a terminal and prints plain, timestamped
  lines otherwise (logs, CI, pipes), at most every `SMEDJAN_LOG_INTERVAL` seconds.
- Messages name parameters as `name` (in backquotes); `render()` shows them as the running
  tool's flags (`--batch-size`), or as plain names when the library is used directly. The
  CLI layer (`smedjan.cli`, which library code never imports) sets the tool and its flags.

    from smedjan.console import log, progress, warn
    with progress("merging", total=n) as bar:
        bar.advance(1, loss=0.5)
    warn("`warmup` 2000 >= 1000 steps: the learning rate never reaches `lr`")
"""

from __future__ import annotations

import math
import os
import re
import sys
import time
from contextlib import contextmanager
from typing import Any, Iterator

_tool = {"name": "smedjan", "flags": None}
_PARAM = re.compile(r"`([a-z][a-z0-9_]*)`")


def set_tool(name: str, flags: dict[str, str] | None = None) -> None:
    """Called by the CLI layer: the tool's name for warnings, and parameter -> flag names
    (parameters not listed render as `--name-with-dashes`)."""
    _tool["name"], _tool["flags"] = name, dict(flags or {})


def tool_name() -> str:
    return _tool["name"]


def render(message: str) -> str:
    """`param` -> the running tool's flag (`--param`), or the bare name outside a tool."""
    flags = _tool["flags"]
    if flags is None:
        return _PARAM.sub(r"\1", message)
    return _PARAM.sub(lambda m: flags.get(m.group(1), "--" + m.group(1).replace("_", "-")), message)


def log(message: str) -> None:
    """A human-readable line on stderr."""
    print(render(message), file=sys.stderr, flush=True)


def warn(message: str) -> None:
    log(f"{_tool['name']}: warning: {message}")


class Terminated(BaseException):
    """SIGTERM as an exception, so `finally` blocks and atomic writes clean up."""


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 1e6 or abs(v) < 1e-3):
            return f"{v:.4g}"
        return f"{v:.4f}".rstrip("0").rstrip(".") if not math.isnan(v) else "nan"
    return str(v)


class _PlainBar:
    """Progress as plain log lines: used when stderr is not a terminal."""

    def __init__(self, description: str, total: float | None, unit: str, interval: float):
        self.description, self.total, self.unit, self.interval = description, total, unit, interval
        self.completed = 0.0
        self.fields: dict[str, Any] = {}
        self.t0 = time.monotonic()
        self.last = -math.inf

    def _line(self) -> str:
        dt = time.monotonic() - self.t0
        done = _fmt(self.completed) if not float(self.completed).is_integer() else str(int(self.completed))
        parts = [f"{self.description}: {done}"]
        if self.total:
            frac = self.completed / self.total
            parts[0] += f"/{int(self.total)} ({100 * frac:.0f}%)"
            eta = dt / frac - dt if frac > 0 else float("nan")
            parts.append(f"{dt:.0f}s elapsed, eta {eta:.0f}s" if frac > 0 else f"{dt:.0f}s elapsed")
        else:
            parts.append(f"{dt:.0f}s elapsed")
        parts += [f"{k}={_fmt(v)}" for k, v in self.fields.items()]
        return " | ".join(parts)

    def update(self, completed: float | None = None, advance: float = 0, **fields) -> None:
        if completed is not None:
            self.completed = completed
        self.completed += advance
        self.fields.update(fields)
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            log(self._line())

    def advance(self, n: float = 1, **fields) -> None:
        self.update(advance=n, **fields)

    def close(self) -> None:
        log(self._line())

    def abandon(self) -> None:
        """Nothing to erase: plain progress is past log lines, and no final one is written."""


class _RichBar:
    def __init__(self, description: str, total: float | None, unit: str):
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self.fields: dict[str, Any] = {}
        self._p = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=Console(stderr=True),
            transient=False,
        )
        self._p.start()
        self._task = self._p.add_task(description, total=total, info="")

    def update(self, completed: float | None = None, advance: float = 0, **fields) -> None:
        self.fields.update(fields)
        info = "  ".join(f"{k}={_fmt(v)}" for k, v in self.fields.items())
        kw = {"info": info, "advance": advance}
        if completed is not None:
            kw["completed"] = completed
        self._p.update(self._task, **kw)

    def advance(self, n: float = 1, **fields) -> None:
        self.update(advance=n, **fields)

    def close(self) -> None:
        self._p.stop()

    def abandon(self) -> None:
        self._p.live.transient = True  # stop() erases the bar
        self._p.stop()


def _use_rich() -> bool:
    if os.environ.get("SMEDJAN_PLAIN_PROGRESS"):
        return False
    return sys.stderr.isatty()


@contextmanager
def progress(description: str, total: float | None = None, unit: str = "") -> Iterator[_PlainBar | _RichBar]:
    """A progress display: rich on a terminal, plain periodic lines otherwise."""
    if _use_rich():
        bar: _PlainBar | _RichBar = _RichBar(description, total, unit)
    else:
        bar = _PlainBar(description, total, unit, float(os.environ.get("SMEDJAN_LOG_INTERVAL", "10")))
    try:
        yield bar
    except Exception:
        # An error ends the display without a last progress line: the error line that the
        # tool wrapper prints next must be the last line on stderr.
        bar.abandon()
        raise
    except BaseException:  # Ctrl-C, SIGTERM: where it stopped is worth a line
        bar.close()
        raise
    bar.close()
