"""Corpora on the Hugging Face hub: `hf://datasets/OWNER/NAME[@REVISION]/GLOB` inputs.

Every tool that reads a corpus takes such an input beside local files. It stands for the
files of the dataset repository that GLOB matches (`*`, `?` and `[...]` within one path
component, `**` across components; a path without wildcards is that file or every file
below that folder; no GLOB at all is the whole repository), kept to the kinds the readers
know (.txt/.jsonl/.parquet, optionally .zst/.gz) and sorted by path. A REVISION with a `/`
in it is written percent-encoded (`@refs%2Fconvert%2Fparquet`), as `HfFileSystem` does.

- **Pinned**: REVISION (a branch, a tag or a commit; default `main`) is resolved to its
  commit sha once, then every file is listed and read at that commit. A resolved branch
  is recorded in the hub cache (`refs/`), as huggingface_hub itself does, and each
  commit's listing under the hub's assets folder, so a pinned or already resolved input
  is listed again without the network.
- **Downloaded on first use**: `HubFile.fetch` downloads a file into the hub cache with
  `hf_hub_download` (progress bar; a dropped connection resumes where it stopped; a
  stopped run keeps the files it finished), or returns the cached copy without any
  network call. Readers fetch a file only when they reach it, so
  `--max-docs`/`--max-chars` caps download only what they read.
- **Offline** (`HF_HUB_OFFLINE=1`, or the hub unreachable): a branch resolves to the
  commit cached in `refs/`, and a commit never listed online is listed from the files in
  its cached snapshot. What is not cached is a `UserError` (one line), as are a missing
  `huggingface_hub` (the `hub` extra), an unknown dataset or revision and an empty glob.

    from smedjan.data.hub import resolve
    res = resolve("hf://datasets/karpathy/fineweb-edu-100b-shuffle/shard_0000[01].parquet")
    res.sha, [f.path for f in res.files]   # the commit `main` pointed to; two shards
    local = res.files[0].fetch()           # the cached copy, downloaded first if need be
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator, TypeVar
from urllib.parse import unquote

from smedjan.errors import UserError

PREFIX = "hf://"
DEFAULT_REVISION = "main"
INSTALL = 'pip install -e ".[hub]" (in the smedjan folder)'
FORM = "hf://datasets/OWNER/NAME[@REVISION]/GLOB"
_URL = re.compile(r"hf://datasets/(?P<owner>[^/@]*)/(?P<name>[^/@]*)(?:@(?P<rev>[^/]*))?(?:/(?P<glob>.*))?\Z", re.S)
_REPO_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")
_SHA = re.compile(r"[0-9a-f]{40}\Z")
_MAGIC = re.compile(r"[*?\[]")
T = TypeVar("T")


def note(message: str) -> None:
    """A line for the user on stderr (downloads, fallbacks). Tools may replace it."""
    print(message, file=sys.stderr, flush=True)


def is_hub_url(text: object) -> bool:
    return isinstance(text, str) and text.startswith(PREFIX)


# ------------------------------------------------------------------ parsing
@dataclass(frozen=True)
class HubURL:
    repo_id: str  # OWNER/NAME
    revision: str | None  # as written; None means the default branch
    glob: str  # inside the repository; "" is the whole repository
    text: str  # the input as given

    @property
    def ref(self) -> str:
        return self.revision or DEFAULT_REVISION

    @property
    def pinned(self) -> bool:
        return self.revision is not None and bool(_SHA.match(self.revision))

    def at(self, sha: str) -> str:
        """The same input pinned to commit `sha`."""
        return f"{PREFIX}datasets/{self.repo_id}@{sha}" + (f"/{self.glob}" if self.glob else "")


def parse(text: str) -> HubURL:
    """`hf://datasets/OWNER/NAME[@REVISION]/GLOB` -> its parts; a UserError names what is malformed."""
    m = _URL.match(text)
    if m is None:
        if text.startswith(PREFIX) and not text.startswith(PREFIX + "datasets/"):
            raise UserError(f"{text}: only datasets are corpora; write {FORM}")
        raise UserError(f"{text}: malformed hub input; write {FORM}")
    owner, name, rev, glob = m["owner"], m["name"], m["rev"], (m["glob"] or "").strip("/")
    for part, what in ((owner, "OWNER"), (name, "NAME")):
        if not _REPO_PART.match(part):
            raise UserError(f"{text}: {what} {part!r} is not a valid name on the hub; write {FORM}")
    if rev is not None:
        rev = unquote(rev)
        if not rev.strip():
            raise UserError(f"{text}: empty @REVISION; write {FORM} (a branch, a tag or a commit)")
    parts = glob.split("/") if glob else []
    if any(p in ("", ".", "..") for p in parts):
        raise UserError(f"{text}: GLOB {glob!r} has an empty, '.' or '..' component")
    return HubURL(f"{owner}/{name}", rev, glob, text)


def glob_regex(glob: str) -> re.Pattern:
    """A glob over repository paths as a regex: `*`, `?`, `[...]` stay within a component, `**` spans them."""
    out, i, n = [], 0, len(glob)
    while i < n:
        c = glob[i]
        if glob.startswith("**", i) and (i == 0 or glob[i - 1] == "/") and (i + 2 == n or glob[i + 2] == "/"):
            out.append("(?:[^/]+/)*" if i + 2 < n else ".*")
            i += 3
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[" and (j := glob.find("]", i + 2)) != -1:
            body = glob[i + 1: j]
            body = "^" + body[1:] if body.startswith("!") else body
            out.append("(?!/)[" + body.replace("\\", "\\\\") + "]")
            i = j
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z", re.S)


def _list_prefix(glob: str) -> str:
    """The folder to list for `glob`: its components before the first wildcard (a plain
    path's parent, since it may name a file)."""
    parts = glob.split("/") if glob else []
    fixed = next((k for k, p in enumerate(parts) if _MAGIC.search(p)), len(parts))
    if fixed == len(parts):
        fixed -= 1
    return "/".join(parts[:max(fixed, 0)])


def matches(url: HubURL, path: str) -> bool:
    from smedjan.data.sources import is_supported

    if not is_supported(PurePosixPath(path)):  # type: ignore[arg-type]
        return False
    g = url.glob
    if not g:
        return True
    if not _MAGIC.search(g):
        return path == g or path.startswith(g + "/")
    return bool(glob_regex(g).match(path))


# ------------------------------------------------------------------ huggingface_hub
def _hf(what: str):
    """The huggingface_hub module, or a one-line UserError naming `what` and the extra."""
    try:
        import huggingface_hub
        from huggingface_hub import constants  # noqa: F401
    except ImportError:
        raise UserError(f"{what}: reading from the Hugging Face hub needs huggingface_hub, which is not "
                        f"installed; install the hub extra: {INSTALL}") from None
    return huggingface_hub


def cache_dir() -> Path:
    """The hub cache (HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub)."""
    return Path(_hf("the Hugging Face hub cache").constants.HF_HUB_CACHE)


def offline() -> bool:
    """HF_HUB_OFFLINE (as huggingface_hub read it when imported)."""
    return bool(_hf("the Hugging Face hub").constants.HF_HUB_OFFLINE)


def _repo_dir(repo_id: str) -> Path:
    return cache_dir() / ("datasets--" + repo_id.replace("/", "--"))


def _is_network_error(e: BaseException) -> bool:
    """Connection-level failures of whichever HTTP client huggingface_hub uses."""
    if isinstance(e, OSError):
        return True
    names = {k.__name__ for k in type(e).__mro__}
    return bool(names & {"TransportError", "TimeoutException", "NetworkError", "ConnectError", "RequestException"})


def _short(e: BaseException) -> str:
    return (f"{type(e).__name__}: {e}".splitlines() or [type(e).__name__])[0][:200]


def _call(what: str, repo_id: str, ref: str, fn: Callable[[], T]) -> T:
    """Run a hub API call, turning the hub's answers into one-line UserErrors naming `what`.
    Connection failures propagate (callers fall back to the cache)."""
    from huggingface_hub import errors as E

    try:
        return fn()
    except E.GatedRepoError:
        raise UserError(f"{what}: dataset {repo_id} is gated: accept its terms on huggingface.co and log in "
                        "(`hf auth login`, or set HF_TOKEN)") from None
    except E.RepositoryNotFoundError:
        raise UserError(f"{what}: no dataset {repo_id!r} on the hub (a private one needs `hf auth login` "
                        "or HF_TOKEN)") from None
    except E.RevisionNotFoundError:
        raise UserError(f"{what}: dataset {repo_id} has no revision {ref!r}") from None
    except E.HfHubHTTPError as e:  # any other answer of the hub (connection failures are not these)
        raise UserError(f"{what}: the hub refused the request ({_short(e)})") from None


# ------------------------------------------------------------------ files
@dataclass(frozen=True)
class HubFile:
    """One file of a dataset at a commit; `origin` is the input it was listed for."""

    repo_id: str
    sha: str
    path: str
    size: int | None = None
    origin: str = field(default="", compare=False)

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name

    def __str__(self) -> str:
        return f"{PREFIX}datasets/{self.repo_id}@{self.sha}/{self.path}"

    def cached(self) -> Path | None:
        """The file in the hub cache (a snapshot entry), or None when it is not there yet."""
        p = _repo_dir(self.repo_id) / "snapshots" / self.sha / self.path
        return p if p.is_file() else None

    def fetch(self) -> Path:
        """The local copy: from the hub cache, else downloaded into it."""
        hf = _hf(str(self))
        local = self.cached()
        if local is not None:
            return local
        if offline():
            raise UserError(f"{self}: offline (HF_HUB_OFFLINE is set) and the file is not in the hub cache "
                            f"{cache_dir()}")
        note(f"downloading {self} ({human_bytes(self.size)}) into {cache_dir()}")
        try:
            got = _call(str(self), self.repo_id, self.sha, lambda: hf.hf_hub_download(
                self.repo_id, self.path, repo_type="dataset", revision=self.sha))
        except UserError:
            raise
        except Exception as e:
            if not _is_network_error(e):
                raise
            raise UserError(f"{self}: download failed ({_short(e)}); run again when the hub is reachable "
                            "(files already downloaded are kept)") from None
        return Path(got)


def unreachable(repo_id: str, sha: str) -> str | None:
    """Why the hub cannot be asked about `repo_id` now (offline, no connection), or None."""
    hf = _hf(repo_id)
    if offline():
        return "HF_HUB_OFFLINE is set"
    from huggingface_hub import errors as E

    try:
        hf.HfApi().dataset_info(repo_id, revision=sha)
    except E.HfHubHTTPError:  # it answered: whatever is wrong, the tool will say
        return None
    except Exception as e:
        if not _is_network_error(e):
            raise
        return f"the hub is unreachable ({_short(e)})"
    return None


def read(f: HubFile, reader: Callable[[Path], Iterator[T]]) -> Iterator[T]:
    """Yield from reader(local copy of f); errors and chunk sources name the hub file,
    not the cache path."""
    local = f.fetch()
    try:
        for item in reader(local):
            if hasattr(item, "source"):
                item.source = str(f)  # type: ignore[attr-defined]
            yield item
    except UserError as e:
        raise UserError(str(e).replace(str(local), str(f))) from None


def human_bytes(n: int | None) -> str:
    if n is None:
        return "size unknown"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


# ------------------------------------------------------------------ resolution
@dataclass
class Resolved:
    url: HubURL
    sha: str
    files: list[HubFile]
    complete: bool  # False: listed offline from the cached snapshot, which may lack files

    @property
    def total_bytes(self) -> int:
        return sum(f.size or 0 for f in self.files)

    def record(self) -> dict:
        return {"input": self.url.text, "dataset": self.url.repo_id, "revision": self.url.ref, "sha": self.sha,
                "files": [[f.path, f.size] for f in self.files]}


def _cached_ref(url: HubURL) -> str | None:
    try:
        sha = (_repo_dir(url.repo_id) / "refs" / url.ref).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return sha if _SHA.match(sha) else None


def _write_ref(url: HubURL, sha: str) -> None:
    # The layout huggingface_hub keeps itself: refs/<revision> holds the commit.
    from smedjan.io import atomic_write

    path = _repo_dir(url.repo_id) / "refs" / url.ref
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, "w") as f:
            f.write(sha)
    except OSError:
        pass  # a read-only cache only costs a network call next time


def _listing_path(repo_id: str, sha: str, prefix: str) -> Path:
    from huggingface_hub import cached_assets_path

    key = hashlib.sha256(prefix.encode()).hexdigest()[:12]
    folder = cached_assets_path(library_name="smedjan", namespace="datasets--" + repo_id.replace("/", "--"),
                                subfolder="listings")
    return Path(folder) / f"{sha}-{key}.json"


def remember_listing(repo_id: str, sha: str, prefix: str, files: dict[str, int | None]) -> None:
    """Record the files under `prefix` at commit `sha`, so that they are listed again offline."""
    from smedjan.io import atomic_write

    try:
        path = _listing_path(repo_id, sha, prefix)
        with atomic_write(path, "w") as f:
            json.dump({"dataset": repo_id, "sha": sha, "prefix": prefix, "files": files}, f, sort_keys=True)
    except OSError:
        pass


def _read_listing(repo_id: str, sha: str, prefix: str) -> dict[str, int | None] | None:
    try:
        data = json.loads(_listing_path(repo_id, sha, prefix).read_text())
        files = data["files"]
        if data["sha"] == sha and isinstance(files, dict):
            return files
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _snapshot_listing(repo_id: str, sha: str, prefix: str) -> dict[str, int | None] | None:
    """The files below `prefix` in the cached snapshot of `sha`; None when the commit is not cached."""
    root = _repo_dir(repo_id) / "snapshots" / sha
    if not root.is_dir():
        return None
    files: dict[str, int | None] = {}
    for dirpath, _, names in os.walk(root / prefix if prefix else root):
        for n in names:
            p = Path(dirpath) / n
            try:
                files[p.relative_to(root).as_posix()] = p.stat().st_size
            except OSError:  # a dangling link: its blob was deleted
                continue
    return files


def _resolve_ref(url: HubURL, hf) -> str:
    cached = _cached_ref(url)
    where = f"revision {url.ref!r} of {url.repo_id}"
    if offline():
        if cached:
            return cached
        raise UserError(f"{url.text}: offline (HF_HUB_OFFLINE is set) and {where} is not in the hub cache "
                        f"{cache_dir()}; run once with network, or pin @COMMIT")
    try:
        sha = _call(url.text, url.repo_id, url.ref,
                    lambda: hf.HfApi().dataset_info(url.repo_id, revision=url.ref).sha)
    except UserError:
        raise
    except Exception as e:
        if not _is_network_error(e):
            raise
        if cached:
            note(f"{url.text}: the hub is unreachable ({_short(e)}); using the cached commit {cached[:12]} of "
                 f"{url.ref!r}")
            return cached
        raise UserError(f"{url.text}: cannot reach the hub to resolve {where} ({_short(e)}), and it is not in "
                        f"the hub cache {cache_dir()}") from None
    if url.revision is None or not _SHA.match(url.ref):
        _write_ref(url, sha)
    return sha


def _listing(url: HubURL, sha: str, hf) -> tuple[dict[str, int | None], bool]:
    prefix = _list_prefix(url.glob)
    known = _read_listing(url.repo_id, sha, prefix)
    if known is not None:
        return known, True
    why = "offline (HF_HUB_OFFLINE is set)"
    if not offline():
        from huggingface_hub import errors as E
        from huggingface_hub.hf_api import RepoFolder

        def tree() -> dict[str, int | None]:
            entries = hf.HfApi().list_repo_tree(url.repo_id, path_in_repo=prefix or None, recursive=True,
                                               revision=sha, repo_type="dataset")
            try:  # the listing is paged: errors come while iterating
                return {e.path: e.size for e in entries if not isinstance(e, RepoFolder)}
            except E.EntryNotFoundError:  # the folder does not exist: nothing matches
                return {}

        try:
            files = _call(url.text, url.repo_id, url.ref, tree)
        except UserError:
            raise
        except Exception as e:
            if not _is_network_error(e):
                raise
            why = f"the hub is unreachable ({_short(e)})"
        else:
            remember_listing(url.repo_id, sha, prefix, files)
            return files, True
    local = _snapshot_listing(url.repo_id, sha, prefix)
    if local is None:
        raise UserError(f"{url.text}: {why}, and commit {sha[:12]} of {url.repo_id} is not in the hub cache "
                        f"{cache_dir()}")
    return local, False


def resolve(text: str) -> Resolved:
    """Pin `text` to a commit and list the files it stands for (see the module docstring)."""
    url = parse(text)
    hf = _hf(text)
    sha = url.ref if url.pinned else _resolve_ref(url, hf)
    listing, complete = _listing(url, sha, hf)
    files = [HubFile(url.repo_id, sha, p, size, origin=text) for p, size in sorted(listing.items())
             if matches(url, p)]
    if not files:
        seen = "" if complete else " (offline, only the files in the hub cache are seen)"
        raise UserError(f"{text}: matches no .txt, .jsonl or .parquet file of {url.repo_id} at commit "
                        f"{sha[:12]}{seen}")
    if not complete:
        note(f"{text}: listed offline from the hub cache: {len(files)} file(s) of commit {sha[:12]}, which may "
             "lack files never downloaded")
    return Resolved(url, sha, files, complete)


def records(files: list) -> list[dict]:
    """For an artifact's header: per hub input, the dataset, the revision asked for, the
    commit it resolved to and how many files (of how many bytes) it stood for."""
    out: dict[str, dict] = {}
    for f in files:
        if not isinstance(f, HubFile):
            continue
        url = parse(f.origin) if f.origin else None
        rec = out.setdefault(f.origin or str(f), {
            "input": f.origin, "dataset": f.repo_id, "revision": url.ref if url else f.sha, "sha": f.sha,
            "files": 0, "bytes": 0})
        rec["files"] += 1
        rec["bytes"] += f.size or 0
    return list(out.values())
