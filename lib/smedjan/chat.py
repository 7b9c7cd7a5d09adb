"""The one chat format: SFT, DPO, generate/chat/serve and the exported GGUF/HF
templates all render conversations through this module.

Token stream (no newlines or other glue between the markers):

    <|bos|> [<|system_start|> S <|system_end|>]
    <|user_start|> U1 <|user_end|> <|assistant_start|> A1 <|assistant_end|>
    <|user_start|> U2 <|user_end|> <|assistant_start|> ...

Message texts are encoded as plain text (special-token spellings inside them stay
text). The loss mask marks each assistant reply and its <|assistant_end|>, so the
model learns to answer and to stop, never to write the user's turns.
`CHAT_TEMPLATE` is the same format in Jinja for llama.cpp and transformers;
rendering it and tokenizing with special tokens recognized gives the same ids.

    r = render(tok, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}])
    r.ids, r.mask          # mask[i] == 1 where ids[i] is an assistant token to learn
    prompt = render(tok, [{"role": "user", "content": "Hi"}], add_generation_prompt=True).ids
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from smedjan.errors import UserError
from smedjan.formats import constants as C

ROLES = ("system", "user", "assistant")
_MARKERS = {
    "system": (C.SYSTEM_START, C.SYSTEM_END),
    "user": (C.USER_START, C.USER_END),
    "assistant": (C.ASSISTANT_START, C.ASSISTANT_END),
}

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}" + C.SYSTEM_START + "{{ message['content'] }}" + C.SYSTEM_END +
    "{% elif message['role'] == 'user' %}" + C.USER_START + "{{ message['content'] }}" + C.USER_END +
    "{% elif message['role'] == 'assistant' %}" + C.ASSISTANT_START + "{{ message['content'] }}" + C.ASSISTANT_END +
    "{% else %}{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}" + C.ASSISTANT_START + "{% endif %}"
)


@dataclass
class Rendered:
    ids: list[int]
    mask: list[int]  # same length as ids: 1 = train on this token (assistant reply + end marker)


def check_messages(messages: Sequence[dict], need_assistant: bool = False) -> None:
    """Roles known, contents strings, system only first; optionally an assistant turn."""
    if not messages:
        raise UserError("conversation is empty")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UserError(f"message {i} must be an object with 'role' and 'content'")
        if not isinstance(m["role"], str) or m["role"] not in ROLES:
            raise UserError(f"message {i} has unknown role {m['role']!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(m["content"], str):
            raise UserError(f"message {i} content is {type(m['content']).__name__}, expected a string")
        if m["role"] == "system" and i != 0:
            raise UserError(f"message {i}: a system message may only come first")
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        raise UserError("conversation has no assistant turn")


def render(tok, messages: Sequence[dict], add_generation_prompt: bool = False) -> Rendered:
    """Token ids and loss mask of a conversation (see the module docstring)."""
    check_messages(messages)
    if not tok.has_chat_tokens:
        raise UserError("tokenizer has no chat special tokens; train one with `smedjan tokenizer`")
    sp = tok.specials
    ids, mask = [sp[C.BOS]], [0]
    for m in messages:
        start, end = _MARKERS[m["role"]]
        if m["role"] == "system" and start not in sp:
            raise UserError("tokenizer has no system-turn tokens")
        body = tok.encode(m["content"])
        learn = 1 if m["role"] == "assistant" else 0
        ids += [sp[start], *body, sp[end]]
        mask += [0] + [learn] * len(body) + [learn]
    if add_generation_prompt:
        ids.append(sp[C.ASSISTANT_START])
        mask.append(0)
    return Rendered(ids, mask)


def render_template(messages: Sequence[dict], add_generation_prompt: bool = False,
                    template: str = CHAT_TEMPLATE) -> str:
    """Render the Jinja template as llama.cpp / transformers do (sandboxed Jinja2)."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg):
        raise TemplateError(msg)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                            bos_token=C.BOS, eos_token=C.ASSISTANT_END)
