"""The CLI layer every smedjan tool shares: errors, options from dataclasses, summaries.

Library code never imports this module (it logs through `smedjan.console`).
- `tool(name, Options)` wraps a typer command: `UserError` (bad input) -> one line
  `smedjan <tool>: error: ...` on stderr, the last line the tool writes there, exit 2 (so
  is a full disk, ENOSPC or EDQUOT, anywhere); any other exception is a bug (traceback,
  exit 1); Ctrl-C -> exit 130. With an options dataclass, every field becomes the
  command's option (its help text, default and flag live on the field: one definition per
  flag), and parameters named `like_this` in library messages show as that flag.
- `emit()` prints the tool's summary: JSON on stdout with `--json`, else `key: value`.

    @dataclass(kw_only=True)
    class Options:
        n: int = option(10, "How many merges.")

    @app.command()
    @tool("tokenizer", Options)
    def tokenizer(args: Options, json: JsonOpt = False):
        with progress("merging", total=args.n) as bar:
            ...
        emit({"merges": args.n}, json)
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json as _json
import sys
import types
import typing
from typing import Annotated, Callable, Optional

import typer

from smedjan.console import Terminated, _fmt, log, progress, render, set_tool, warn
from smedjan.errors import UserError
from smedjan.io import is_disk_full
from smedjan.signals import route_signals_to_main_thread

__all__ = ["UserError", "tool", "JsonOpt", "emit", "log", "warn", "progress", "make_app", "run_app", "Terminated",
           "option_flags"]

JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print a JSON summary on stdout; logs and progress go to stderr.")
]

_current = {"name": "smedjan"}


def fail(message: str, code: int = 2) -> "typer.Exit":
    """Print the one-line user error and return the exit exception to raise."""
    log(f"{_current['name']}: error: {message}")
    return typer.Exit(code)


def option_flags(cls) -> dict[str, str]:
    """Field -> flag of an options dataclass (metadata `flag`, else --field-name)."""
    out = {}
    for f in dataclasses.fields(cls):
        decl = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        out[f.name] = decl.split("/")[0]
    return out


def _option_params(cls) -> list[inspect.Parameter]:
    """typer parameters for the fields of dataclass `cls` (see `smedjan.options.option`)."""
    hints = typing.get_type_hints(cls)
    params = []
    # required options first (the inputs a tool reads), then the rest in declaration order
    fields = sorted(dataclasses.fields(cls),
                    key=lambda f: f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING)
    for f in fields:
        if not f.init or f.metadata.get("cli") is False:
            continue
        t = hints[f.name]
        if isinstance(t, types.UnionType):  # `X | None` -> Optional[X], which typer reads
            args = [a for a in typing.get_args(t) if a is not type(None)]
            t = Optional[args[0]]
        decls = [f.metadata.get("flag") or "--" + f.name.replace("_", "-")]
        if f.metadata.get("short"):
            decls.append(f.metadata["short"])
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = ...
        opt = typer.Option(*decls, help=f.metadata.get("help", ""), show_default=f.metadata.get("show_default", True))
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=Annotated[t, opt]))
    return params


def tool(name: str, options: type | None = None) -> Callable[[Callable], Callable]:
    """Wrap a typer command (see the module docstring). With `options`, the command's first
    parameter receives an instance built from the flags; its other parameters stay options."""

    def decorate(fn: Callable) -> Callable:
        fields: set[str] = set()
        flags = {}
        sig = None
        if options is not None:
            hints = typing.get_type_hints(fn, include_extras=True)  # resolve `from __future__` annotations
            rest = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hints.get(p.name, p.annotation))
                    for p in list(inspect.signature(fn).parameters.values())[1:]]
            opt_params = _option_params(options)
            fields = {p.name for p in opt_params}
            flags = option_flags(options)
            sig = inspect.Signature(opt_params + rest)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            _current["name"] = f"smedjan {name}"
            set_tool(f"smedjan {name}", flags)
            _exit_cleanly_on_sigterm()
            route_signals_to_main_thread()  # Ctrl-C must end a read on a FIFO or stdin
            try:
                if options is not None:
                    opts = options(**{k: kwargs.pop(k) for k in list(kwargs) if k in fields})
                    return fn(opts, **kwargs)
                return fn(*args, **kwargs)
            except UserError as e:
                raise fail(render(str(e))) from None
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

        if sig is not None:
            # typer reads the parameters from the signature and their types from __annotations__
            wrapper.__signature__ = sig
            wrapper.__annotations__ = {p.name: p.annotation for p in sig.parameters.values()}
            del wrapper.__wrapped__
        return wrapper

    return decorate


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


def emit(summary: dict, as_json: bool) -> None:
    """Print the tool's summary: one JSON object on stdout, or aligned `key: value` lines."""
    if as_json:
        print(_json.dumps(summary, sort_keys=False, default=str), flush=True)
        return
    width = max((len(k) for k in summary), default=0)
    for k, v in summary.items():
        print(f"{k.ljust(width)} : {_fmt(v)}", flush=True)


# --- option types shared by several tools (one definition, one help text) --------------
from pathlib import Path  # noqa: E402

InputsOpt = Annotated[
    list[str],
    typer.Option("--input", "-i", help="Corpus file, folder or glob (.txt, .jsonl, .parquet, optionally .zst/.gz), "
                 "or files of a dataset on the Hugging Face hub: hf://datasets/OWNER/NAME[@REVISION]/GLOB "
                 "(downloaded into the hub cache on first use; the `hub` extra). Repeat for several."),
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
MaxDocsOpt = Annotated[
    Optional[int], typer.Option("--max-docs", help="Read at most this many documents of the corpus (all if unset).")
]
WorkersOpt = Annotated[Optional[int], typer.Option("--workers", help="Worker processes (default: all cores).")]
TokenizerOpt = Annotated[Path, typer.Option("--tokenizer", "-t", help="tokenizer.bin to use.")]
