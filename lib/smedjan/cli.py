"""Conventions every smedjan tool shares: errors, logs, progress, summaries.

- `UserError` (bad input) -> one line `smedjan <tool>: error: ...` on stderr, the last line
  the tool writes there (a progress display ends without a final line), exit 2. So is a
  full disk (ENOSPC, EDQUOT) anywhere. Any other exception is a bug: traceback, exit 1.
  Ctrl-C -> exit 130.
- `log()` writes human messages to stderr, so stdout stays clean for `--json`.
- `progress()` draws a rich progress bar on a terminal and prints plain, timestamped
  lines otherwise (logs, CI, pipes), at most every `SMEDJAN_LOG_INTERVAL` seconds.
- `emit()` prints the tool's summary: JSON on stdout with `--json`, else `key: value`.

    import typer
    from smedjan.cli import tool, JsonOpt, emit, progress

    app = typer.Typer()

    @app.command()
    @tool("tokenizer")
    def tokenizer(n: int = 10, json: JsonOpt = False):
        with progress("merging", total=n) as bar:
            for _ in range(n):
                bar.advance(1)
        emit({"merges": n}, json)
"""

from __future__ import annotations

import functools
import json as _json
import math
import os
import sys
import time
from contextlib import contextmanager
from typing import Annotated, Any, Callable, Iterator

import typer

from smedjan.errors import UserError
from smedjan.io import is_disk_full
from smedjan.signals import route_signals_to_main_thread

__all__ = ["UserError", "tool", "JsonOpt", "emit", "log", "progress", "make_app", "run_app"]

JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print a JSON summary on stdout; logs and progress go to stderr.")
]

_current_tool = ["smedjan"]


def log(message: str) -> None:
    """A human-readable line on stderr."""
    print(message, file=sys.stderr, flush=True)


def warn(message: str) -> None:
    log(f"{_current_tool[0]}: warning: {message}")


def fail(message: str, code: int = 2) -> "typer.Exit":
    """Print the one-line user error and return the exit exception to raise."""
    log(f"{_current_tool[0]}: error: {message}")
    return typer.Exit(code)


def tool(name: str) -> Callable[[Callable], Callable]:
    """Wrap a typer command: user errors become one line + exit 2, Ctrl-C exits 130."""

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            _current_tool[0] = f"smedjan {name}"
            _exit_cleanly_on_sigterm()
            route_signals_to_main_thread()  # Ctrl-C must end a read on a FIFO or stdin
            try:
                return fn(*args, **kwargs)
            except UserError as e:
                raise fail(str(e)) from None
            except KeyboardInterrupt:
                log(f"smedjan {name}: interrupted")
                raise typer.Exit(130) from None
            except Terminated:
                log(f"smedjan {name}: terminated")
                raise typer.Exit(143) from None
            except BrokenPipeError:
                # `smedjan encode ... | head` closes stdout early: not an error.
                sys.stderr.close()
                raise typer.Exit(0) from None
            except Exception as e:
                # A full disk outside smedjan.io's atomic writes (an appended log, a
                # library's own file): still the user's to fix, still one line.
                if not is_disk_full(e):
                    raise
                where = getattr(e, "filename", None) or "a file being written"
                raise fail(f"{where}: no space left on the device ({e.__class__.__name__}: "
                           f"{getattr(e, 'strerror', None) or e})".splitlines()[0]) from None

        return wrapper

    return decorate


class Terminated(BaseException):
    """SIGTERM as an exception, so `finally` blocks and atomic writes clean up."""


def _exit_cleanly_on_sigterm() -> None:
    # The default SIGTERM action kills the process on the spot, leaving temporary files
    # behind; raising instead unwinds the stack. Tools with their own handler (train
    # checkpoints on SIGTERM) install it later and take precedence.
    import signal

    def handler(signum, frame):
        raise Terminated()

    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        try:
            signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread (tests calling tools in-process)
            pass


def make_app(help: str | None = None) -> typer.Typer:
    """A one-command typer app with smedjan's settings (plain tracebacks for bugs)."""
    return typer.Typer(
        add_completion=False,
        pretty_exceptions_enable=False,
        no_args_is_help=False,
        help=help,
        context_settings={"help_option_names": ["-h", "--help"]},
    )


def run_app(app: typer.Typer, prog_name: str) -> None:
    """Entry point of a single tool's console script."""
    app(prog_name=prog_name)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 1e6 or abs(v) < 1e-3):
            return f"{v:.4g}"
        return f"{v:.4f}".rstrip("0").rstrip(".") if not math.isnan(v) else "nan"
    return str(v)


def emit(summary: dict, as_json: bool) -> None:
    """Print the tool's summary: one JSON object on stdout, or aligned `key: value` lines."""
    if as_json:
        print(_json.dumps(summary, sort_keys=False, default=str), flush=True)
        return
    width = max((len(k) for k in summary), default=0)
    for k, v in summary.items():
        print(f"{k.ljust(width)} : {_fmt(v)}", flush=True)


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
        pass


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


# --- option types shared by several tools (one definition, one help text) --------------
from pathlib import Path  # noqa: E402
from typing import Optional  # noqa: E402

InputsOpt = Annotated[
    list[str],
    typer.Option("--input", "-i", help="Corpus file, folder or glob (.txt, .jsonl, .parquet, optionally .zst/.gz). "
                 "Repeat for several."),
]
TextFieldOpt = Annotated[str, typer.Option("--text-field", help="JSONL field that holds the text.")]
TextColumnOpt = Annotated[str, typer.Option("--text-column", help="Parquet column that holds the text.")]
TxtSplitOpt = Annotated[
    str, typer.Option("--txt-split", help="How .txt files split into documents: file (one per file), "
                      "blank (at blank lines) or line (one per line).")
]
MaxCharsOpt = Annotated[
    Optional[int], typer.Option("--max-chars", help="Read at most this many characters of the corpus (all if unset).")
]
WorkersOpt = Annotated[Optional[int], typer.Option("--workers", help="Worker processes (default: all cores).")]
TokenizerOpt = Annotated[Path, typer.Option("--tokenizer", "-t", help="tokenizer.bin to use.")]
