"""What the special tokens mean to other programs: bos/eos/pad ids, and where generation ends.

llama.cpp ends generation at the ids in six GGUF keys (its end-of-generation set:
eos, eot, eom and the three fill-in-the-middle pad/repo/separator ids) and has no key
for more. smedjan's end tokens are exactly the specials the exporters place there, so
smedjan, llama.cpp and transformers (a list of eos ids in generation_config.json) stop
at the same tokens. With the chat tokenizer: <|assistant_end|> (ends a reply), <|bos|>
(a new document: where a base model's text ends), <|user_start|>, <|system_start|>,
<|assistant_start|> (a new turn) and <|user_end|>. The rest (<|system_end|>, <|pad|>,
never training targets) are control tokens that render as nothing, as llama.cpp
renders them.

    ids = special_ids(tok)       # {"bos": 8184, "eos": 8188, "pad": 8191}
    eog_slots(tok)               # {"eos": 8188, "eot": 8184, "eom": 8185, ...}
    end_ids(tok)                 # frozenset of the same ids
"""

from __future__ import annotations

from smedjan.formats import constants as C

# llama.cpp's keys whose ids it adds to its end-of-generation set, in the order filled.
EOG_KEYS = ("eos", "eot", "eom", "fim_pad", "fim_rep", "fim_sep")
_END_ORDER = (C.ASSISTANT_END, C.BOS, C.USER_START, C.SYSTEM_START, C.ASSISTANT_START, C.USER_END,
              "<|endoftext|>")


def special_ids(tok) -> dict[str, int]:
    """bos/eos/pad ids for configs and GGUF: <|bos|> starts every document and conversation;
    <|assistant_end|> ends a reply, the natural stop of a chat model. A tokenizer without
    them (GPT-2 imported with --no-chat-specials) uses <|endoftext|> for both."""
    sp = tok.specials
    out = {}
    if C.BOS in sp:
        out["bos"] = sp[C.BOS]
    elif "<|endoftext|>" in sp:
        out["bos"] = sp["<|endoftext|>"]
    if C.ASSISTANT_END in sp:
        out["eos"] = sp[C.ASSISTANT_END]
    elif "<|endoftext|>" in sp:
        out["eos"] = sp["<|endoftext|>"]
    if C.PAD in sp:
        out["pad"] = sp[C.PAD]
    return out


def eog_slots(tok) -> dict[str, int]:
    """The end tokens, as llama.cpp's end-of-generation keys -> ids (at most six)."""
    sp = tok.specials
    ids = [sp[name] for name in _END_ORDER if name in sp]
    # other tokenizers' specials (imported vocabularies), by id, after the known ones
    ids += sorted(i for name, i in sp.items() if name not in _END_ORDER and name != C.PAD)
    return dict(zip(EOG_KEYS, ids))


def end_ids(tok) -> frozenset[int]:
    """Every token generation stops at (see the module docstring)."""
    return frozenset(eog_slots(tok).values())
