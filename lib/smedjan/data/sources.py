"""Streaming corpus readers: .txt, .jsonl, .parquet, each optionally .zst or .gz, local or
on the Hugging Face hub (`hf://datasets/OWNER/NAME[@REVISION]/GLOB`, `smedjan.data.hub`).

Every reader streams: memory stays bounded whatever the file size. The unit they
yield is a `Chunk` of text with a `new_doc` flag on the first chunk of each document;
a long document arrives as several chunks cut only at places where the pre-tokenizer
splits anyway (after a newline that precedes a non-space character), so encoding the
chunks one by one gives exactly the ids of encoding the whole document.

Documents:
- `.txt`: `txt_split="file"` (default) makes each file one document;
  `"blank"` splits at blank lines; `"line"` makes each non-empty line a document.
- `.jsonl`: one document per line, the string field `text_field` (default "text").
- `.parquet`: one document per row, the string column `text_column` (default "text"),
  read by record batch.
A document longer than `DOC_CHUNK` characters (a whole book in one JSON line) is cut the
same way, so that downstream workers can share its encoding.
Bytes that are not valid UTF-8 are replaced by U+FFFD (counted in `stats`).

    for chunk in iter_chunks(["data/"], max_chars=10_000_000):
        ...
"""

from __future__ import annotations

import codecs
import glob
import gzip
import io
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from smedjan.errors import UserError

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
COMPRESSED = (".zst", ".zstd", ".gz")
BLOCK = 1 << 20  # bytes read per step from a text file

# A cut is safe right after a newline that is followed by a non-space character: every
# pattern in PRETOKENIZER_PATTERNS ends a piece there and starts a new one.
_SAFE_CUT = re.compile(r"\n(?=\S)")
DOC_CHUNK = BLOCK  # characters: longer documents are yielded as several chunks


@dataclass
class Chunk:
    text: str
    new_doc: bool
    source: str


@dataclass
class ReadStats:
    files: int = 0
    documents: int = 0
    chars: int = 0
    replaced_bytes: int = 0
    skipped_empty: int = 0
    per_file: dict = field(default_factory=dict)


def base_suffix(p: Path) -> str:
    """The suffix under any compression suffix: data.jsonl.zst -> .jsonl."""
    name = p.name.lower()
    for c in COMPRESSED:
        if name.endswith(c):
            name = name[: -len(c)]
            break
    return os.path.splitext(name)[1]


def is_supported(p: Path) -> bool:
    return base_suffix(p) in TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES


def expand_inputs(inputs: list) -> list:
    """Files, folders (every supported file below, sorted), globs and hub inputs
    (`hf://datasets/...`, see `smedjan.data.hub`) -> a file list: `Path`s and `HubFile`s."""
    out: list = []
    for raw in inputs:
        if not isinstance(raw, (str, os.PathLike)):  # a HubFile, expanded already
            out.append(raw)
            continue
        s = str(raw)
        if s.startswith("hf://"):
            from smedjan.data import hub

            out += hub.resolve(s).files
            continue
        p = Path(s)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and is_supported(q))
            if not found:
                raise UserError(f"{p}: folder holds no .txt, .jsonl or .parquet files (optionally .zst/.gz)")
            out += found
        elif p.exists():
            if not is_supported(p):
                raise UserError(f"{p}: unsupported input type; expected .txt, .jsonl or .parquet, optionally .zst/.gz")
            out.append(p)
        elif glob.has_magic(s):
            found = sorted(Path(q) for q in glob.glob(s, recursive=True) if Path(q).is_file() and is_supported(Path(q)))
            if not found:
                raise UserError(f"{s}: pattern matches no .txt, .jsonl or .parquet files")
            out += found
        else:
            raise UserError(f"{p}: input file does not exist")
    for p in out:
        if isinstance(p, Path) and not os.access(p, os.R_OK):
            raise UserError(f"{p}: input file is not readable")
    return out


class TruncatedStream(EOFError):
    """A compressed file that ends before its stream does (a cut download or copy)."""


class _ZstdFrames(io.RawIOBase):
    """Every zstd frame of a file, one after another, as one byte stream. End of input
    inside a frame raises TruncatedStream: zstandard's own stream_reader returns what it
    decoded before the cut as if that were all (and stops after the first frame).

    Input is fed in `FEED` byte pieces so that one call's output stays bounded."""

    FEED = 1 << 15

    def __init__(self, raw: BinaryIO):
        import zstandard

        self._raw = raw
        self._dctx = zstandard.ZstdDecompressor()
        self._frame = None  # the decompressor of the frame in progress, None between frames
        self._out = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not len(self._out):
            data = self._raw.read(self.FEED)
            if not data:
                if self._frame is not None:
                    raise TruncatedStream("the file ends inside a zstd frame")
                return 0
            parts = []
            while data:
                if self._frame is None:
                    self._frame = self._dctx.decompressobj()
                parts.append(self._frame.decompress(data))
                if not self._frame.eof:
                    break
                data, self._frame = self._frame.unused_data, None  # the next frame starts here
            self._out = memoryview(b"".join(parts))
        n = min(len(b), len(self._out))
        b[:n] = self._out[:n]
        self._out = self._out[n:]
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


def open_binary(p: Path) -> BinaryIO:
    """Open a file, transparently decompressing .zst and .gz, as a byte stream. A
    compressed file that is empty or ends before its stream does raises TruncatedStream
    (an EOFError) when read: `guard_reads` makes that one line naming the file."""
    name = p.name.lower()
    raw = open(p, "rb")
    if name.endswith((".zst", ".zstd", ".gz")):
        try:
            if not raw.peek(1):  # works on a FIFO too: waits for data or the end
                raise TruncatedStream(f"the file is empty, not a {'gzip' if name.endswith('.gz') else 'zstd'} stream")
        except BaseException:
            raw.close()
            raise
    if name.endswith((".zst", ".zstd")):
        # Buffered, so that line iteration (readline) works on the stream.
        return io.BufferedReader(_ZstdFrames(raw), BLOCK)  # type: ignore[return-value]
    if name.endswith(".gz"):
        # gzip raises EOFError itself at a cut, and reads every member of the file
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    return raw


def guard_reads(p: Path, fn, *args):
    """Yield from fn(*args), turning decompression and IO failures into a one-line
    UserError naming the file `p`."""
    import zstandard

    try:
        yield from fn(*args)
    except UserError:
        raise
    except zstandard.ZstdError as e:
        raise UserError(f"{p}: corrupt zstd stream ({e})".splitlines()[0]) from None
    except EOFError as e:  # TruncatedStream, or gzip's "Compressed file ended before ..."
        raise UserError(f"{p}: truncated compressed file ({e})".splitlines()[0]) from None
    except (OSError, ValueError) as e:
        raise UserError(f"{p}: cannot read ({e.__class__.__name__}: {e})".splitlines()[0]) from None


def iter_json_lines(p: Path, objects: bool = True, stats: ReadStats | None = None) -> Iterator[tuple[int, Any]]:
    """(line number, value) of each non-blank line of a JSON-lines file (optionally .zst/.gz).
    A line that is not JSON, or not an object when `objects`, is a UserError naming
    file:line; wrap the call in `guard_reads` for corrupt streams and IO errors. Invalid
    UTF-8 is replaced by U+FFFD and counted in `stats` when given (a corpus), else refused."""
    utf8 = _Utf8(stats) if stats is not None else None
    with open_binary(p) as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                if utf8 is None:
                    raise UserError(f"{p}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start} of the line)") from None
                line = utf8(raw, final=True)  # a line never splits a character: each decodes alone
            if lineno == 1:
                line = line.removeprefix("\ufeff")  # a byte-order mark
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{p}:{lineno}: malformed JSON line ({e.__class__.__name__}: {e})") from None
            if objects and not isinstance(obj, dict):
                raise UserError(f"{p}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


class _Utf8:
    """Incremental UTF-8 decoding that replaces invalid bytes and counts them."""

    def __init__(self, stats: ReadStats):
        self.dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stats = stats

    def __call__(self, data: bytes, final: bool = False) -> str:
        s = self.dec.decode(data, final)
        if "\ufffd" in s:
            # Count only replacements, not U+FFFD that was in the file already.
            self.stats.replaced_bytes += s.count("\ufffd") - data.count("\ufffd".encode())
        return s


class _ValidUtf8(io.RawIOBase):
    """The bytes of `f` with invalid UTF-8 replaced by U+FFFD (counted in `stats`), so that a
    strict TextIOWrapper on top splits lines exactly as on the original text."""

    def __init__(self, f: BinaryIO, stats: ReadStats):
        self._f, self._utf8 = f, _Utf8(stats)
        self._out = memoryview(b"")
        self._done = False

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not len(self._out):
            if self._done:
                return 0
            data = self._f.read(BLOCK)
            self._done = not data
            self._out = memoryview(self._utf8(data, final=self._done).encode("utf-8"))
        n = min(len(b), len(self._out))
        b[:n] = self._out[:n]
        self._out = self._out[n:]
        return n


def _last_safe_cut(text: str, lo: int, hi: int) -> int | None:
    """The largest p in (lo, hi] where `_SAFE_CUT` would end a match: text[p-1] is a
    newline and text[p] exists and is not whitespace. None if there is none."""
    i = text.rfind("\n", lo, hi)
    while i >= lo:
        if i + 1 < len(text) and not text[i + 1].isspace():
            return i + 1
        i = text.rfind("\n", lo, i)
    return None


def _doc_chunks(text: str, src: str) -> Iterator[Chunk]:
    """One document as chunks of about `DOC_CHUNK` characters, cut only at safe places."""
    start, first = 0, True
    while len(text) - start > DOC_CHUNK:
        cut = _last_safe_cut(text, start, start + DOC_CHUNK)
        if cut is None:  # no safe place in this stretch: take the next one after it
            m = _SAFE_CUT.search(text, start + DOC_CHUNK)
            if m is None:
                break
            cut = m.end()
        yield Chunk(text[start:cut], first, src)
        first, start = False, cut
    yield Chunk(text[start:] if start else text, first, src)


def _read_txt(p: Path, split: str, stats: ReadStats) -> Iterator[Chunk]:
    utf8 = _Utf8(stats)
    src = str(p)
    with open_binary(p) as f:
        if split == "file":
            pending = ""
            first = True
            while True:
                data = f.read(BLOCK)
                final = not data
                pending += utf8(data, final)
                if final:
                    break
                # cut at the last safe place; keep the rest for the next block
                cut = None
                for m in _SAFE_CUT.finditer(pending, max(0, len(pending) - BLOCK // 4)):
                    cut = m.end()
                if cut is not None and cut > 0:
                    yield Chunk(pending[:cut], first, src)
                    first = False
                    pending = pending[cut:]
            if pending or first:
                if pending:
                    yield Chunk(pending, first, src)
                elif first:
                    stats.skipped_empty += 1
            return
        text_stream = io.TextIOWrapper(io.BufferedReader(_ValidUtf8(f, stats), BLOCK), encoding="utf-8", newline="")
        if split == "line":
            for line in text_stream:
                body = line.rstrip("\r\n")
                if body.strip():
                    yield from _doc_chunks(body, src)
                else:
                    stats.skipped_empty += 1
            return
        assert split == "blank", split
        buf: list[str] = []
        for line in text_stream:
            if line.strip():
                buf.append(line)
            elif buf:
                yield from _doc_chunks("".join(buf).rstrip("\r\n"), src)
                buf = []
        if buf:
            yield from _doc_chunks("".join(buf).rstrip("\r\n"), src)


def _read_jsonl(p: Path, text_field: str, stats: ReadStats) -> Iterator[Chunk]:
    src = str(p)
    for lineno, obj in iter_json_lines(p, stats=stats):
        if text_field not in obj:
            raise UserError(f"{p}:{lineno}: no {text_field!r} field (choose one with --text-field)")
        text = obj[text_field]
        if not isinstance(text, str):
            raise UserError(f"{p}:{lineno}: field {text_field!r} is {type(text).__name__}, expected a string")
        if text:
            yield from _doc_chunks(text, src)
        else:
            stats.skipped_empty += 1


@contextmanager
def open_parquet(p: Path):
    """A pyarrow ParquetFile of `p`. Parquet needs random access, so a compressed file is
    first decompressed, streaming, to a temporary file that is deleted on exit."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = None
    try:
        path = str(p)
        if p.name.lower().endswith(COMPRESSED):
            # smedjan's temporary name, so that the copy of a killed run is recognised
            # and removed by the next one (smedjan.io.clean_stale_temps)
            from smedjan.io import clean_stale_temps, disk_full_error, is_disk_full, new_temp

            folder = Path(tempfile.gettempdir())
            clean_stale_temps(folder)
            tmp = new_temp(folder, "decompressed.parquet")
            try:
                with open(tmp, "wb") as out, open_binary(p) as f:
                    shutil.copyfileobj(f, out, BLOCK)
            except OSError as e:
                if is_disk_full(e):  # the temporary folder, not the input, is the problem
                    raise disk_full_error(folder / f"{p.name} decompressed", None, tmp.stat().st_size) from None
                raise
            path = str(tmp)
        try:
            pf = pq.ParquetFile(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise UserError(f"{p}: not a readable parquet file ({e})".splitlines()[0]) from None
        yield pf
    finally:
        if tmp:
            os.unlink(tmp)


def _read_parquet(p: Path, text_column: str, stats: ReadStats) -> Iterator[Chunk]:
    import pyarrow as pa

    src = str(p)
    with open_parquet(p) as pf:
        names = pf.schema_arrow.names
        if text_column not in names:
            raise UserError(f"{p}: no column {text_column!r} (columns: {', '.join(names)}; choose with --text-column)")
        typ = pf.schema_arrow.field(text_column).type
        if not (pa.types.is_string(typ) or pa.types.is_large_string(typ)):
            raise UserError(f"{p}: column {text_column!r} has type {typ}, expected string")
        for batch in pf.iter_batches(columns=[text_column], batch_size=1024):
            for text in batch.column(0).to_pylist():
                if text:
                    yield from _doc_chunks(text, src)
                else:
                    stats.skipped_empty += 1


def iter_file(p: Path, stats: ReadStats, text_field: str = "text", text_column: str = "text",
              txt_split: str = "file") -> Iterator[Chunk]:
    suffix = base_suffix(p)
    if suffix in JSONL_SUFFIXES:
        yield from guard_reads(p, _read_jsonl, p, text_field, stats)
    elif suffix in PARQUET_SUFFIXES:
        yield from guard_reads(p, _read_parquet, p, text_column, stats)
    else:
        yield from guard_reads(p, _read_txt, p, txt_split, stats)


def iter_chunks(inputs: list, *, text_field: str = "text", text_column: str = "text",
                txt_split: str = "file", max_chars: int | None = None, max_docs: int | None = None,
                stats: ReadStats | None = None) -> Iterator[Chunk]:
    """Stream every document of every input as chunks, stopping after `max_chars` characters
    or `max_docs` documents. A file is opened (a hub file downloaded) only when reached."""
    if txt_split not in ("file", "blank", "line"):
        raise UserError(f"--txt-split must be file, blank or line, not {txt_split!r}")
    stats = stats if stats is not None else ReadStats()
    files = expand_inputs(inputs)
    budget = max_chars if max_chars is not None and max_chars > 0 else None
    docs_left = max_docs if max_docs is not None and max_docs > 0 else None
    for p in files:
        if (budget is not None and budget <= 0) or docs_left == 0:
            return
        stats.files += 1
        if isinstance(p, Path):
            reader = iter_file(p, stats, text_field, text_column, txt_split)
        else:
            from smedjan.data import hub

            reader = hub.read(p, lambda local: iter_file(local, stats, text_field, text_column, txt_split))
        for chunk in reader:
            if chunk.new_doc and docs_left is not None:
                if docs_left == 0:
                    return
                docs_left -= 1
            if budget is not None:
                if budget <= 0:
                    return
                if len(chunk.text) > budget:
                    chunk = Chunk(chunk.text[:budget], chunk.new_doc, chunk.source)
                budget -= len(chunk.text)
            stats.chars += len(chunk.text)
            stats.documents += chunk.new_doc
            stats.per_file[chunk.source] = stats.per_file.get(chunk.source, 0) + len(chunk.text)
            yield chunk
