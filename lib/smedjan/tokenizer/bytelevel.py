"""GPT-2's reversible byte <-> printable-unicode map.

HF `vocab.json`/`merges.txt`, `tokenizer.json` and GGUF `tokenizer.ggml.tokens` store
byte-level tokens as strings in which each byte is one printable character: the
printable Latin-1 bytes stand for themselves, the other 68 bytes map to U+0100...

    >>> token_to_str(b" hello")
    'Ġhello'
    >>> str_to_token("Ġhello")
    b' hello'
"""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    mapping = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + n)
            n += 1
    return mapping


@lru_cache(maxsize=1)
def unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in byte_to_unicode().items()}


def token_to_str(token: bytes) -> str:
    m = byte_to_unicode()
    return "".join(m[b] for b in token)


def str_to_token(s: str) -> bytes:
    """Inverse of token_to_str; raises KeyError on a character outside the map."""
    m = unicode_to_byte()
    return bytes(m[c] for c in s)
