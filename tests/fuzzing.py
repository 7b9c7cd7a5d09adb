"""Shared pieces of the fuzz tests: mutations of outside files and the property they must keep.

Mutations (hypothesis strategies over a valid file's bytes): truncation anywhere, bit
flips in the header or the payload, length fields set to extreme values, and for JSON
(headers, configs, records) fields deleted, mistyped or extreme anywhere in the tree.

The property (`survives`): the reader returns, or raises one `UserError` of one line
naming the file; never another exception (a traceback) and never a hang (an alarm
fails an example that takes over `HANG_SECONDS`). Readers run in-process; each test
file also runs a few mutated files through the CLI (`cli_survives`: exit 0, or exit 2
with the error as the last line of stderr, and nothing written).

Bounds: `SMEDJAN_FUZZ_EXAMPLES` examples per reader (default 40; seconds per reader),
derandomized so CI runs the same cases every time. `SMEDJAN_FUZZ_EXAMPLES=2000
SMEDJAN_FUZZ_RANDOM=1` is a long, fresh run. `SMEDJAN_FUZZ_REPORT=file.json` writes the
case counts (reader -> outcome -> n) there at exit.

    @fuzz_settings()
    @given(data=mutated_bytes(good_bytes, header_end))
    def test_x(data, tmp_path_factory): survives("tokenizer.bin", Tokenizer.load, write(data))
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import json
import math
import os
import signal
from collections import Counter, defaultdict
from pathlib import Path

from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st

from helpers import Result
from smedjan.errors import UserError

EXAMPLES = int(os.environ.get("SMEDJAN_FUZZ_EXAMPLES", "40"))
RANDOM = bool(os.environ.get("SMEDJAN_FUZZ_RANDOM"))
HANG_SECONDS = 30
COUNTS: dict[str, Counter] = defaultdict(Counter)

# Values a damaged or hostile file may hold where a number, string, list or object belongs.
EXTREMES = [0, -1, 1, 2, 3, 255, 256, 65535, 65536, 2**31 - 1, 2**31, 2**32, 2**32 + 1, 2**53 + 1, 2**63 - 1,
            2**63, 2**64 + 5, -(2**63), -(2**64) - 5, 10**30, 0.0, -0.0, 0.5, -1.5, 1e-300, 1e308, -1e308,
            math.inf, -math.inf, math.nan, True, False, None, "", "x", "-1", "1e9", "\u0000", "é" * 3, "../../etc/passwd",
            [], [1], [None], [[]], {}, {"a": 1}, {"": None}]


def fuzz_settings(n: int | None = None, shrink: bool = True):
    """`n` examples (default SMEDJAN_FUZZ_EXAMPLES); `shrink=False` for slow (CLI) cases, where
    shrinking a failure would rerun the tool hundreds of times."""
    phases = [Phase.explicit, Phase.reuse, Phase.generate] + ([Phase.shrink] if shrink else [])
    return settings(max_examples=n or EXAMPLES, deadline=None, derandomize=not RANDOM, database=None,
                    suppress_health_check=list(HealthCheck), phases=phases)


def _report() -> None:
    path = os.environ.get("SMEDJAN_FUZZ_REPORT")
    if path and COUNTS:
        old = json.loads(Path(path).read_text()) if Path(path).exists() else {}
        for reader, c in COUNTS.items():
            for outcome, n in c.items():
                old.setdefault(reader, {})[outcome] = old.get(reader, {}).get(outcome, 0) + n
        Path(path).write_text(json.dumps(old, indent=1, sort_keys=True))


atexit.register(_report)


class Hang(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float = HANG_SECONDS):
    def alarm(signum, frame):
        raise Hang(f"no answer after {seconds} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def survives(reader: str, fn, *args, names=None, **kwargs):
    """Run fn(*args); it returns (its result) or raises one one-line UserError naming
    `names` (a path, when given). Anything else fails the example. Counts the outcome."""
    COUNTS[reader]["cases"] += 1
    try:
        with time_limit():
            out = fn(*args, **kwargs)
    except UserError as e:
        msg = str(e)
        assert "\n" not in msg and msg, repr(msg)
        if names is not None:
            assert str(names) in msg, (msg, names)
        COUNTS[reader]["refused"] += 1
        return None
    except Hang:
        COUNTS[reader]["hang"] += 1
        raise
    except BaseException:
        COUNTS[reader]["traceback"] += 1
        raise
    COUNTS[reader]["ok"] += 1
    return out


def cli_survives(reader: str, res: Result, out_dir: Path | None = None, keep: set[str] = frozenset()) -> str:
    """A tool's answer to a mutated file: exit 0, or exit 2 whose last stderr line is its
    one error line; no traceback; with `out_dir`, nothing but `keep` left there on exit 2."""
    COUNTS[f"cli {reader}"]["cases"] += 1
    assert "Traceback" not in res.err, res
    if res.code == 0:
        COUNTS[f"cli {reader}"]["ok"] += 1
        return "ok"
    assert res.code == 2, res
    errors = [ln for ln in res.err.splitlines() if "error:" in ln]
    assert len(errors) == 1 and res.err.splitlines()[-1] == errors[0], res
    if out_dir is not None:
        assert set(os.listdir(out_dir)) <= set(keep), (os.listdir(out_dir), res)
    COUNTS[f"cli {reader}"]["refused"] += 1
    return "refused"


def put(path: Path, data: bytes) -> Path:
    """Write a case's file as a new inode (write, then rename), as smedjan's own writers do:
    a reader of the previous case may still map the old file (safetensors, numpy.memmap),
    and truncating a mapped file in place would kill this process with SIGBUS."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------ strategies
@st.composite
def byte_mutation(draw, data: bytes, header_end: int, length_fields: tuple[tuple[int, int], ...] = ()):
    """`data` truncated, bit-flipped (header or payload) or with a length field made extreme.
    `length_fields`: (offset, size) of little-endian integers in the header."""
    kinds = ["truncate", "flip_header", "flip_payload"] + (["length"] if length_fields else [])
    kind = draw(st.sampled_from(kinds))
    b = bytearray(data)
    if kind == "truncate":
        # near the header more often: that is where readers trust lengths
        cut = draw(st.one_of(st.integers(0, min(len(b), header_end + 64)), st.integers(0, max(len(b) - 1, 0))))
        return bytes(b[:cut])
    if kind == "length":
        off, size = draw(st.sampled_from(length_fields))
        value = draw(st.sampled_from([0, 1, 7, 8, 2**(8 * size) - 1, 2**(8 * size - 1), len(data), len(data) + 1,
                                      header_end - off, 2**31]))
        b[off:off + size] = (value % 2**(8 * size)).to_bytes(size, "little")
        return bytes(b)
    if not b:
        return bytes(b)
    header_end = min(header_end, len(b))
    lo, hi = (0, header_end) if kind == "flip_header" else (header_end, len(b))
    if hi <= lo:
        lo, hi = 0, len(b)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(lo, hi - 1))
        b[i] ^= 1 << draw(st.integers(0, 7))
    return bytes(b)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:8]):  # the first few items of long lists are enough
            yield from _paths(v, prefix + (i,))


def _extreme(draw):
    return copy.deepcopy(draw(st.sampled_from(EXTREMES)))  # never share a list or dict between files


@st.composite
def json_mutation(draw, obj, max_edits: int = 3):
    """A deep copy of `obj` with 1..max_edits edits: a key deleted, a value replaced by an
    extreme or mistyped one, a string or list emptied, an unknown key added."""
    obj = json.loads(json.dumps(obj))
    for _ in range(draw(st.integers(1, max_edits))):
        paths = [p for p in _paths(obj) if p]
        if not paths:
            return _extreme(draw)
        path = draw(st.sampled_from(paths))
        parent = obj
        for k in path[:-1]:
            parent = parent[k]
        key = path[-1]
        action = draw(st.sampled_from(["delete", "replace", "replace", "add"]))
        if action == "delete":
            if isinstance(parent, dict):
                del parent[key]
            else:
                parent.pop(key)
        elif action == "add" and isinstance(parent, dict):
            parent[draw(st.sampled_from(["", "extra", "__proto__", "é"]))] = _extreme(draw)
        else:
            parent[key] = _extreme(draw)
    return obj


def dumps(obj) -> str:
    """JSON as Python writes it, NaN and Infinity included (Python's reader accepts them)."""
    return json.dumps(obj, allow_nan=True)
