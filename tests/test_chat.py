"""The chat format: token stream, loss mask, and the Jinja template's equivalence."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smedjan.chat import render, render_template
from smedjan.errors import UserError
from smedjan.formats import constants as C


def test_stream_and_mask_token_by_token(tokenizer):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Bye."}]
    r = render(tokenizer, msgs)
    sp = tokenizer.specials
    enc = tokenizer.encode
    expected = ([(sp[C.BOS], 0), (sp[C.SYSTEM_START], 0)] + [(i, 0) for i in enc("Be brief.")] + [(sp[C.SYSTEM_END], 0)]
                + [(sp[C.USER_START], 0)] + [(i, 0) for i in enc("Hi")] + [(sp[C.USER_END], 0)]
                + [(sp[C.ASSISTANT_START], 0)] + [(i, 1) for i in enc("Hello!")] + [(sp[C.ASSISTANT_END], 1)]
                + [(sp[C.USER_START], 0)] + [(i, 0) for i in enc("Bye")] + [(sp[C.USER_END], 0)]
                + [(sp[C.ASSISTANT_START], 0)] + [(i, 1) for i in enc("Bye.")] + [(sp[C.ASSISTANT_END], 1)])
    assert list(zip(r.ids, r.mask)) == expected


def test_generation_prompt_ends_with_assistant_start(tokenizer):
    r = render(tokenizer, [{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert r.ids[-1] == tokenizer.specials[C.ASSISTANT_START] and not any(r.mask)


message = st.fixed_dictionaries({
    "role": st.sampled_from(["user", "assistant"]),
    "content": st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)
    .filter(lambda s: "<|" not in s),
})


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(system=st.one_of(st.none(), st.text(max_size=20).filter(lambda s: "<|" not in s)),
       messages=st.lists(message, min_size=1, max_size=6), gen=st.booleans())
def test_jinja_template_gives_the_same_tokens(tokenizer, system, messages, gen):
    msgs = ([{"role": "system", "content": system}] if system is not None else []) + messages
    text = render_template(msgs, add_generation_prompt=gen)
    assert tokenizer.encode(text, allow_special=True) == render(tokenizer, msgs, add_generation_prompt=gen).ids


@pytest.mark.parametrize("msgs,needle", [
    ([], "empty"),
    ([{"role": "robot", "content": "x"}], "unknown role"),
    ([{"role": "user"}], "'role' and 'content'"),
    ([{"role": "user", "content": 3}], "expected a string"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "only come first"),
])
def test_bad_conversations(tokenizer, msgs, needle):
    with pytest.raises(UserError, match=needle):
        render(tokenizer, msgs)
