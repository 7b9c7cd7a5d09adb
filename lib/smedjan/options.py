"""Options as dataclass fields: one definition per flag (default, help, flag name).

A tool's options are a keyword-only dataclass in the library; the CLI layer
(`smedjan.cli.tool`) turns every field into the command's option, with this help text
and default, so a new knob is one field. Library messages name fields as `field_name`,
which the tool shows as its flag.

    @dataclass(kw_only=True)
    class TrainOptions:
        lr: float = option(3e-4, "Peak learning rate.")
        untied: bool | None = option(None, "Separate output head.", flag="--untied/--tied")

    class SftOptions(TrainOptions):   # the same flag, another default
        lr: float = retitled(TrainOptions, "lr", 1e-4)
"""

from __future__ import annotations

import dataclasses
from typing import Any


def option(default: Any = dataclasses.MISSING, help: str = "", *, flag: str | None = None, short: str | None = None,
           factory=None, cli: bool = True) -> Any:
    """A dataclass field carrying its command-line option: `flag` (default --field-name,
    "--yes/--no" for a two-way bool), `short` ("-c"), `help`. No default: required. `cli`
    False keeps a field out of the command line (set by the tool itself)."""
    meta = {"help": help, "flag": flag, "short": short, "cli": cli}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def retitled(cls, name: str, default: Any = dataclasses.MISSING, help: str | None = None) -> Any:
    """`cls`'s field `name` with another default (and optionally help): the same option,
    defined once, where a tool wants another default."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    meta = dict(f.metadata)
    if help is not None:
        meta["help"] = help
    return dataclasses.field(default=default, metadata=meta)


def fields_of(cls, obj) -> dict[str, Any]:
    """The values of `cls`'s fields in `obj` (an instance of `cls` or of a subclass)."""
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(cls)}
