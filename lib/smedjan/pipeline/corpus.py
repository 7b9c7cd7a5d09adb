"""A pipeline's corpus on the Hugging Face hub: resolved once, kept in a lock file, pinned.

A `[corpus] input` entry `hf://datasets/OWNER/NAME[@REVISION]/GLOB` is resolved to a commit
and its file list (`smedjan.data.hub.resolve`) by the task `corpus:NAME`, which writes them
to `runs/NAME/corpus.lock.json`. Later runs take the commit from the lock without asking
the hub again, even for a branch such as `main`: the pipeline keeps reading what it was
built from until its input changes (another revision or glob in the TOML), the lock is
removed (`doit clean corpus:NAME`), or `SMEDJAN_HUB_UPDATE=1` asks the hub where each
branch is now. The lock is rewritten only when its content changes, and it is a file
input of the tokenizer and prepare stages: a new commit or file list re-runs them (and
everything after), the same one leaves them up to date.

The stage commands get each input pinned to its locked commit (`pin`), so a tool reads
the files of that commit (their listing is cached too), from the hub cache when there.

    lock = resolve_corpus(pipe.hub_inputs, pipe.lock)   # {"inputs": {url: {dataset, revision, sha, files}}}
    print("\\n".join(plan(lock)))          # what is cached, what will be downloaded
    args = pin(stage.command[0], lock)   # hf://datasets/org/name/x.parquet -> ...@<sha>/x.parquet
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from smedjan.data import hub
from smedjan.io import atomic_write


def read_lock(path: str | os.PathLike) -> dict:
    try:
        data = json.loads(Path(path).read_text())
        return data if isinstance(data.get("inputs"), dict) else {"inputs": {}}
    except (OSError, ValueError, AttributeError):
        return {"inputs": {}}


def resolve_corpus(hub_inputs: list[str], lock_path: str | os.PathLike, update: bool | None = None) -> dict:
    """The lock for `hub_inputs`: entries already locked are kept (unless `update` and
    the input names a branch or tag), others are resolved; written only if it changed.
    A UserError (one line) when an input cannot be resolved."""
    if update is None:
        update = os.environ.get("SMEDJAN_HUB_UPDATE", "") not in ("", "0")
    old = read_lock(lock_path)
    inputs: dict[str, dict] = {}
    for url in hub_inputs:
        entry = old["inputs"].get(url)
        if entry is None or (update and not hub.parse(url).pinned):
            res = hub.resolve(url)
            entry = {"dataset": res.url.repo_id, "revision": res.url.ref, "sha": res.sha,
                     "files": [[f.path, f.size] for f in res.files]}
        inputs[url] = entry
    lock = {"inputs": inputs}
    if lock != old or not Path(lock_path).exists():
        Path(lock_path).parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(lock_path, "w") as f:
            json.dump(lock, f, indent=1, sort_keys=True)
            f.write("\n")
    return lock


def _files(url: str, entry: dict) -> list[hub.HubFile]:
    return [hub.HubFile(entry["dataset"], entry["sha"], p, size, origin=url) for p, size in entry["files"]]


def plan(lock: dict) -> list[str]:
    """One line per input: its commit, its files and bytes, what the hub cache holds."""
    lines = []
    for url, entry in lock["inputs"].items():
        files = _files(url, entry)
        missing = [f for f in files if f.cached() is None]
        total, need = sum(f.size or 0 for f in files), sum(f.size or 0 for f in missing)
        head = (f"corpus {url}: {entry['dataset']} at commit {entry['sha'][:12]} ({entry['revision']}), "
                f"{len(files)} file{'s' * (len(files) != 1)}, {hub.human_bytes(total)}")
        if missing:
            lines.append(f"{head}; {len(files) - len(missing)} in the hub cache, up to {hub.human_bytes(need)} "
                         f"({len(missing)} file{'s' * (len(missing) != 1)}) to download into {hub.cache_dir()} "
                         "as the stages reach them")
        else:
            lines.append(f"{head}; all in the hub cache {hub.cache_dir()}")
    return lines


def pin(args: list[str], lock: dict) -> list[str]:
    """A stage command with each locked hub input pinned to its commit."""
    return [hub.parse(a).at(lock["inputs"][a]["sha"]) if a in lock["inputs"] else a for a in args]


def cannot_download(lock: dict) -> str | None:
    """Why the first file of some input cannot be had (every stage reads at least that
    one): not cached and offline, or the hub unreachable. None when it can."""
    for url, entry in lock["inputs"].items():
        files = _files(url, entry)
        if not files or files[0].cached() is not None:
            continue
        first = files[0]
        if hub.offline():
            why = "HF_HUB_OFFLINE is set"
        else:
            why = hub.unreachable(first.repo_id, first.sha)
            if why is None:
                continue
        missing = [f for f in files if f.cached() is None]
        return (f"{url}: {len(missing)} file{'s' * (len(missing) != 1)} "
                f"({hub.human_bytes(sum(f.size or 0 for f in missing))}) to download into {hub.cache_dir()}, "
                f"starting with {first.path}, and {why}")
    return None


def describe(lock: dict) -> dict:
    """For the report: per input, the commit and the size of what it stands for."""
    return {url: f"{e['dataset']}@{e['sha'][:12]} ({e['revision']}), {len(e['files'])} files, "
                 f"{hub.human_bytes(sum(s or 0 for _, s in e['files']))}" for url, e in lock["inputs"].items()}

