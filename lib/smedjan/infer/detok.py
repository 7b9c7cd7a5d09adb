"""Streaming text out of token ids: UTF-8 that is never cut inside a character, and
stop strings that are found even when they span tokens, with the text cut exactly
before them.

A byte-level token can end in the middle of a multi-byte character, so deltas come
from an incremental UTF-8 decoder that holds incomplete bytes back until the next
token completes them; invalid bytes become U+FFFD exactly as `Tokenizer.decode`
does, so the concatenated deltas equal `tok.decode(ids)`.

`StopText` holds back the end of the text while it could still be the beginning of a
stop string, so no delta ever has to be taken back. Generation ends at the first
token after which the text contains a stop string; the text is cut at the earliest
stop string it then contains.

    detok, stops = Detokenizer(tok), StopText(["\\n\\n"])
    for t in ids:
        out, hit = stops.feed(detok.add(t))     # out: text safe to show now
        if hit: break
    else:
        out = stops.feed(detok.flush())[0] + stops.flush()
"""

from __future__ import annotations

import codecs
from typing import Sequence


class Detokenizer:
    """Token ids in, complete UTF-8 text out (invalid bytes -> U+FFFD)."""

    def __init__(self, tok):
        self._tokens = tok.tokens
        self._specials = frozenset(tok.specials.values())
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        if token_id in self._specials:  # control tokens render as nothing (as llama.cpp renders them)
            return ""
        return self._decoder.decode(self._tokens[token_id])

    def flush(self) -> str:
        """Bytes still held (an incomplete character at the very end) as U+FFFD."""
        return self._decoder.decode(b"", final=True)


class StopText:
    """Accumulates text deltas; releases what can no longer start a stop string.

    Invariant: the released text never ends with a prefix of a stop string that the
    held-back text could complete, so a match always lies in the unreleased part."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.text = ""  # everything seen so far
        self.sent = 0  # characters of `text` released
        self.stopped = False

    def feed(self, delta: str) -> tuple[str, bool]:
        """(text to release now, whether a stop string was found). After a hit the
        text is final: everything before the earliest stop string."""
        if self.stopped:
            return "", True
        self.text += delta
        if not self.stops:
            out, self.sent = self.text[self.sent:], len(self.text)
            return out, False
        # The earliest match wins; by the invariant it starts at or after `sent`, so
        # only the unreleased text (plus nothing before it) needs searching.
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0]
        if hits:
            cut = min(hits)
            out = self.text[self.sent:cut]
            self.text, self.sent, self.stopped = self.text[:cut], cut, True
            return out, True
        safe = len(self.text) - self._held()
        out, self.sent = self.text[self.sent:safe], max(self.sent, safe)
        return out, False

    def _held(self) -> int:
        """Length of the longest suffix of the unreleased text that is a proper prefix of a stop string."""
        tail = self.text[self.sent:]
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(tail)), best, -1):
                if tail.endswith(s[:k]):
                    best = k
                    break
        return best

    def flush(self) -> str:
        """At the end of generation: the held-back text (it was not a stop string after all)."""
        out, self.sent = self.text[self.sent:], len(self.text)
        return out
