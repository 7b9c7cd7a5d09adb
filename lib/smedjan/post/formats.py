"""Post-training data: SFT conversations and DPO preference pairs from common file layouts.

Files: `.jsonl` (one record per line), `.json` (one JSON array of records) or `.parquet`
(one record per row; nested lists and structs come through as lists and dicts), each
optionally `.zst`/`.gz`. A record's place is named `file:LINE` (1-based) in .jsonl files and
`file[INDEX]` (0-based) in .json arrays and .parquet files.

SFT record formats (auto-detected per file from its first record; `fmt` forces one):
- `messages`:        {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
- `sharegpt`:        {"conversations": [{"from": "human"|"gpt"|"system", "value": str}, ...], "system"?: str}
- `alpaca`:          {"instruction": str, "input"?: str, "output": str}; the user turn is the instruction,
                     then a blank line and the input when there is one.
- `prompt-response`: {"prompt": str, "response": str}; the prompt is the user turn verbatim (dolly_hhrlhf's
                     prompts already hold an Alpaca template).
DPO record formats:
- `prompt`:   {"prompt": str | messages, "chosen": str | [assistant message], "rejected": ...}
- `hh-rlhf`:  {"chosen": transcript, "rejected": transcript}, Anthropic's "\\n\\nHuman: ...\\n\\nAssistant: ..."
              texts: the part up to the last "\\n\\nAssistant:" is the shared prompt (split into turns), the
              rest of each transcript is its reply.
- `alpaca`:   {"instruction": str, "input"?: str, "chosen": str, "rejected": str} (an `output` is ignored)
- `sharegpt`: {"conversations": [{from, value}, ...], "chosen": {from, value}, "rejected": {from, value}}

Two kinds of bad record. A *malformed* one (not JSON, a missing field, a wrong type, an
unknown role) stops the load with one line naming the record and the problem: the file
needs fixing. An *unusable* one (no assistant turn, an empty reply, an empty or identical
chosen/rejected, hh-rlhf transcripts whose prompts differ) is skipped and counted by reason,
with the first place of each; only when every record is unusable does the load refuse.

    convs, report = load_conversations(["data/sft/instruction-data.json.zst"])
    pairs, report = load_pairs(["data/dpo/hh-rlhf_harmless-base_test.jsonl.zst"], fmt="hh-rlhf")
    report.skipped        # {"no assistant turn": 3, ...}
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from smedjan.data.sources import base_suffix, guard_reads, iter_json_lines, open_binary, open_parquet
from smedjan.errors import UserError

SFT_FORMATS = ("messages", "sharegpt", "alpaca", "prompt-response")
DPO_FORMATS = ("prompt", "hh-rlhf", "alpaca", "sharegpt")
SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet")

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "chatgpt": "assistant", "system": "system"}
# hh-rlhf turn markers. The texts start with "\n\nHuman: "; a marker is only a marker after
# a blank line (the word "Human:" inside a sentence stays text).
_HH_MARK = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLE = {"Human": "user", "Assistant": "assistant"}


class Bad(Exception):
    """A malformed record: the load stops with its place and this message."""


class Skip(Exception):
    """An unusable record: skipped and counted under this reason."""


@dataclass
class Conversation:
    messages: list[dict]
    where: str


@dataclass
class Pair:
    prompt: list[dict]  # the conversation so far, ending with a user turn
    chosen: str
    rejected: str
    where: str


@dataclass
class LoadReport:
    records: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    first_skipped: dict = field(default_factory=dict)  # reason -> place of its first record
    formats: dict = field(default_factory=dict)  # file -> format used
    truncated: int = 0  # kept, but cut to the context (counted by the tokenizing step)
    first_truncated: str = ""

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] += 1
        self.first_skipped.setdefault(reason, where)

    def merge(self, other: "LoadReport", prefix: str) -> None:
        """Add another load's skips (a validation file's) under `prefix`."""
        for reason, n in other.skipped.items():
            self.skipped[prefix + reason] += n
            self.first_skipped.setdefault(prefix + reason, other.first_skipped[reason])

    def describe_skips(self) -> str:
        if not self.skipped:
            return "none"
        return "; ".join(f"{n} {r} (first: {self.first_skipped[r]})" for r, n in self.skipped.most_common())


# ------------------------------------------------------------------------------ reading
def _read_jsonl(p: Path) -> Iterator[tuple[str, Any]]:
    for lineno, rec in iter_json_lines(p, objects=False):
        yield f"{p}:{lineno}", rec


def _read_json(p: Path) -> Iterator[tuple[str, Any]]:
    with open_binary(p) as f:
        try:
            data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{p}: malformed JSON ({e.__class__.__name__}: {e})") from None
    if not isinstance(data, list):
        raise UserError(f"{p}: a .json data file must hold one JSON array of records, not a "
                        f"{type(data).__name__} (use .jsonl for one record per line)")
    for i, rec in enumerate(data):
        yield f"{p}[{i}]", rec


def _read_parquet(p: Path) -> Iterator[tuple[str, Any]]:
    with open_parquet(p) as pf:
        i = 0
        for batch in pf.iter_batches(batch_size=1024):
            for rec in batch.to_pylist():
                yield f"{p}[{i}]", rec
                i += 1


def iter_records(path: str | os.PathLike) -> Iterator[tuple[str, Any]]:
    """(place, record) of every record in one data file."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: data file does not exist")
    if p.is_dir():
        raise UserError(f"{p}: is a folder, expected a data file (.jsonl, .json or .parquet)")
    suffix = base_suffix(p)
    readers = {".jsonl": _read_jsonl, ".ndjson": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}
    if suffix not in readers:
        raise UserError(f"{p}: unsupported data file; expected .jsonl, .json or .parquet, optionally .zst/.gz")
    yield from guard_reads(p, readers[suffix], p)


# ---------------------------------------------------------------------------- helpers
def _str(rec: dict, key: str, optional: bool = False) -> str:
    if key not in rec or rec[key] is None:
        if optional:
            return ""
        raise Bad(f"no {key!r} field")
    v = rec[key]
    if not isinstance(v, str):
        raise Bad(f"field {key!r} is {type(v).__name__}, expected a string")
    return v


def _messages(raw: Any, key: str) -> list[dict]:
    """Validated role/content messages (a copy) from a list."""
    from smedjan.chat import check_messages

    if not isinstance(raw, list):
        raise Bad(f"field {key!r} is {type(raw).__name__}, expected a list of messages")
    msgs = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise Bad(f"{key}[{i}] is {type(m).__name__}, expected an object with 'role' and 'content'")
        msgs.append({"role": m.get("role"), "content": m.get("content")} if "role" in m else dict(m))
    try:
        check_messages(msgs)
    except UserError as e:
        raise Bad(f"{key}: {e}") from None
    return msgs


def _sharegpt_turns(raw: Any, key: str) -> list[dict]:
    if not isinstance(raw, list):
        raise Bad(f"field {key!r} is {type(raw).__name__}, expected a list of {{from, value}} turns")
    msgs = []
    for i, t in enumerate(raw):
        msgs.append(_sharegpt_turn(t, f"{key}[{i}]"))
    if not msgs:
        raise Bad(f"{key!r} is empty")
    if any(m["role"] == "system" for m in msgs[1:]):
        raise Bad(f"{key}: a system turn may only come first")
    return msgs


def _sharegpt_turn(t: Any, key: str) -> dict:
    if not isinstance(t, dict):
        raise Bad(f"{key} is {type(t).__name__}, expected an object with 'from' and 'value'")
    if "from" in t and "value" in t:
        role, content = t["from"], t["value"]
    elif "role" in t and "content" in t:
        role, content = t["role"], t["content"]
    else:
        raise Bad(f"{key} needs 'from' and 'value'")
    if not isinstance(role, str) or role not in SHAREGPT_ROLES:
        raise Bad(f"{key} has unknown speaker {role!r} (expected one of {', '.join(SHAREGPT_ROLES)})")
    if not isinstance(content, str):
        raise Bad(f"{key} value is {type(content).__name__}, expected a string")
    return {"role": SHAREGPT_ROLES[role], "content": content}


def _alpaca_user(rec: dict) -> str:
    instruction, inp = _str(rec, "instruction"), _str(rec, "input", optional=True)
    user = f"{instruction}\n\n{inp}" if instruction.strip() and inp.strip() else instruction + inp
    if not user.strip():
        raise Skip("empty instruction")
    return user


def _check_assistant(msgs: list[dict]) -> list[dict]:
    if not any(m["role"] == "assistant" for m in msgs):
        raise Skip("no assistant turn")
    if any(m["role"] == "assistant" and not m["content"].strip() for m in msgs):
        raise Skip("empty assistant reply")
    return msgs


# -------------------------------------------------------------------------- SFT records
def _sft_messages(rec: dict) -> list[dict]:
    if "messages" not in rec:
        raise Bad("no 'messages' field")
    return _check_assistant(_messages(rec["messages"], "messages"))


def _sft_sharegpt(rec: dict) -> list[dict]:
    if "conversations" not in rec:
        raise Bad("no 'conversations' field")
    msgs = _sharegpt_turns(rec["conversations"], "conversations")
    system = _str(rec, "system", optional=True)
    if system and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": system})
    return _check_assistant(msgs)


def _sft_alpaca(rec: dict) -> list[dict]:
    user, output = _alpaca_user(rec), _str(rec, "output")
    return _check_assistant([{"role": "user", "content": user}, {"role": "assistant", "content": output}])


def _sft_prompt_response(rec: dict) -> list[dict]:
    prompt, response = _str(rec, "prompt"), _str(rec, "response")
    return _check_assistant([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}])


SFT_CONVERTERS: dict[str, Callable[[dict], list[dict]]] = {
    "messages": _sft_messages, "sharegpt": _sft_sharegpt, "alpaca": _sft_alpaca,
    "prompt-response": _sft_prompt_response,
}


def detect_sft(rec: dict) -> str | None:
    if "messages" in rec:
        return "messages"
    if "conversations" in rec:
        return "sharegpt"
    if "instruction" in rec and "output" in rec:
        return "alpaca"
    if "prompt" in rec and "response" in rec:
        return "prompt-response"
    return None


# -------------------------------------------------------------------------- DPO records
def _reply(rec: dict, key: str) -> str:
    """A chosen/rejected reply: a string, a one-message assistant list, or a {from, value} turn."""
    if key not in rec or rec[key] is None:
        raise Bad(f"no {key!r} field")
    v = rec[key]
    if isinstance(v, list):
        if len(v) != 1:
            raise Bad(f"{key!r} holds {len(v)} messages; expected the one assistant reply")
        v = v[0]
    if isinstance(v, dict):
        m = _sharegpt_turn(v, key)
        if m["role"] != "assistant":
            raise Bad(f"{key!r} is a {m['role']} message; expected the assistant reply")
        v = m["content"]
    if not isinstance(v, str):
        raise Bad(f"field {key!r} is {type(v).__name__}, expected a string")
    return v


def _pair(prompt: list[dict], rec: dict) -> tuple[list[dict], str, str]:
    chosen, rejected = _reply(rec, "chosen"), _reply(rec, "rejected")
    return _checked_pair(prompt, chosen, rejected)


def _checked_pair(prompt: list[dict], chosen: str, rejected: str) -> tuple[list[dict], str, str]:
    if not prompt or prompt[-1]["role"] != "user":
        raise Bad("the prompt must end with a user turn")
    if not chosen.strip() or not rejected.strip():
        raise Skip("empty chosen or rejected reply")
    if chosen == rejected:
        raise Skip("identical chosen and rejected replies")
    return prompt, chosen, rejected


def _dpo_prompt(rec: dict) -> tuple[list[dict], str, str]:
    if "prompt" not in rec:
        raise Bad("no 'prompt' field")
    p = rec["prompt"]
    prompt = _messages(p, "prompt") if isinstance(p, list) else [{"role": "user", "content": _str(rec, "prompt")}]
    return _pair(prompt, rec)


def _dpo_alpaca(rec: dict) -> tuple[list[dict], str, str]:
    return _pair([{"role": "user", "content": _alpaca_user(rec)}], rec)


def _dpo_sharegpt(rec: dict) -> tuple[list[dict], str, str]:
    if "conversations" not in rec:
        raise Bad("no 'conversations' field")
    prompt = _sharegpt_turns(rec["conversations"], "conversations")
    system = _str(rec, "system", optional=True)
    if system and prompt[0]["role"] != "system":
        prompt.insert(0, {"role": "system", "content": system})
    return _pair(prompt, rec)


def parse_hh_transcript(text: str, key: str = "transcript") -> list[dict]:
    """'\\n\\nHuman: a\\n\\nAssistant: b' -> [{user: a}, {assistant: b}]. Consecutive turns of one
    speaker (a few hh-rlhf records have them) are joined with a blank line."""
    parts = _HH_MARK.split(text)
    if parts[0].strip():
        raise Bad(f"{key!r} does not start with '\\n\\nHuman:' (not an hh-rlhf transcript)")
    msgs: list[dict] = []
    for speaker, body in zip(parts[1::2], parts[2::2]):
        role, content = _HH_ROLE[speaker], body.strip()
        if msgs and msgs[-1]["role"] == role:
            msgs[-1]["content"] += "\n\n" + content
        else:
            msgs.append({"role": role, "content": content})
    if not msgs:
        raise Bad(f"{key!r} has no 'Human:'/'Assistant:' turns (not an hh-rlhf transcript)")
    return msgs


def _dpo_hh(rec: dict) -> tuple[list[dict], str, str]:
    chosen, rejected = _str(rec, "chosen"), _str(rec, "rejected")
    # The shared prompt ends at each transcript's last "\n\nAssistant:" (as TRL's hh-rlhf recipe).
    cut_c, cut_r = chosen.rfind("\n\nAssistant:"), rejected.rfind("\n\nAssistant:")
    if cut_c < 0 or cut_r < 0:
        raise Bad("a transcript has no '\\n\\nAssistant:' turn (not an hh-rlhf pair)")
    head_c, head_r = chosen[:cut_c], rejected[:cut_r]
    if head_c != head_r:
        raise Skip("hh-rlhf transcripts with different prompts")
    prompt = parse_hh_transcript(head_c, "chosen")
    reply_c = chosen[cut_c + len("\n\nAssistant:"):].strip()
    reply_r = rejected[cut_r + len("\n\nAssistant:"):].strip()
    return _checked_pair(prompt, reply_c, reply_r)


DPO_CONVERTERS: dict[str, Callable[[dict], tuple[list[dict], str, str]]] = {
    "prompt": _dpo_prompt, "hh-rlhf": _dpo_hh, "alpaca": _dpo_alpaca, "sharegpt": _dpo_sharegpt,
}


def detect_dpo(rec: dict) -> str | None:
    if "chosen" not in rec or "rejected" not in rec:
        return None
    if "conversations" in rec:
        return "sharegpt"
    if "instruction" in rec:
        return "alpaca"
    if "prompt" in rec:
        return "prompt"
    return "hh-rlhf"


# ------------------------------------------------------------------------------ loading
def _load(paths, fmt: str, formats: tuple[str, ...], detect, converters, what: str, make):
    if fmt != "auto" and fmt not in formats:
        raise UserError(f"--format {fmt!r} is not one of auto, {', '.join(formats)}")
    if not paths:
        raise UserError("no --data files given")
    out, report = [], LoadReport()
    for path in paths:
        used = None if fmt == "auto" else fmt
        n_file = 0
        for where, rec in iter_records(path):
            report.records += 1
            n_file += 1
            if not isinstance(rec, dict):
                raise UserError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            if used is None:
                used = detect(rec)
                if used is None:
                    keys = ", ".join(sorted(map(str, rec))[:8]) or "none"
                    raise UserError(f"{where}: cannot tell the {what} format from its fields ({keys}); expected "
                                    f"one of {', '.join(formats)} (see --help), or force one with --format")
            try:
                out.append(make(converters[used](rec), where))
                report.kept += 1
            except Bad as e:
                raise UserError(f"{where}: {e} (format {used})") from None
            except Skip as e:
                report.skip(str(e), where)
        if n_file == 0:
            raise UserError(f"{path}: holds no records")
        report.formats[str(path)] = used
    if not out:
        raise UserError(f"{', '.join(map(str, paths))}: no usable {what} records ({report.describe_skips()})")
    return out, report


def load_conversations(paths: list[str | os.PathLike], fmt: str = "auto") -> tuple[list[Conversation], LoadReport]:
    """Every usable conversation of `paths`, in order, and what was skipped."""
    return _load(paths, fmt, SFT_FORMATS, detect_sft, SFT_CONVERTERS, "SFT", lambda m, w: Conversation(m, w))


def load_pairs(paths: list[str | os.PathLike], fmt: str = "auto") -> tuple[list[Pair], LoadReport]:
    """Every usable preference pair of `paths`, in order, and what was skipped."""
    return _load(paths, fmt, DPO_FORMATS, detect_dpo, DPO_CONVERTERS, "preference",
                 lambda t, w: Pair(t[0], t[1], t[2], w))
