"""Encode/decode properties over arbitrary unicode, and the two encoders agreeing."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smedjan.formats import constants as C

# Text that stresses the pre-tokenizer and byte-level BPE: NUL and control characters,
# emoji (4-byte UTF-8 and ZWJ sequences), CJK, combining marks, every newline style,
# long runs of spaces and digits, apostrophes (contractions) and special-token spellings.
pieces = st.sampled_from([
    "\x00", "\t", "\r\n", "\r", "\n", "\n\n\n", "\u2028", "\x0b", " ", "   ", " " * 40, "0", "1234567890" * 3,
    "😀", "👨‍👩‍👧", "🏳️‍🌈", "日本語", "中文字", "한국어", "e\u0301", "a\u0308\u0323", "ﬁ", "Ω", "ß",
    "'s", "'LL", "don't", "The", " the", "hello", "WORLD", ",", "...", "!?", "<|bos|>", "<|assistant_end|>",
    "\ufffd", "\U0010ffff", "🙂\u200d", "\u00a0", "\u3000",
])
texts = st.one_of(
    st.text(max_size=300),
    st.lists(st.one_of(pieces, st.text(max_size=8)), max_size=60).map("".join),
)

SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(text=texts)
def test_decode_encode_round_trips_exactly(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


@SETTINGS
@given(text=texts)
def test_tiktoken_engine_equals_reference_encoder(tokenizer, text):
    assert tokenizer.encode(text) == tokenizer.encode_reference(text)


@SETTINGS
@given(ids=st.lists(st.integers(min_value=0, max_value=2047), max_size=200))
def test_decoding_any_ids_never_raises(tokenizer, ids):
    text = tokenizer.decode(ids)
    assert isinstance(text, str)
    # decode_bytes is exact; decode only replaces invalid UTF-8
    assert text == tokenizer.decode_bytes(ids).decode("utf-8", errors="replace")


@SETTINGS
@given(text=texts)
def test_numpy_encoding_equals_list_encoding(tokenizer, text):
    assert tokenizer.encode_numpy(text).tolist() == tokenizer.encode(text)


def test_cut_characters_become_replacement_chars(tokenizer):
    ids = tokenizer.encode("日")
    raw = tokenizer.decode_bytes(ids)
    assert len(raw) == 3
    first_byte = [tokenizer.byte_ids[raw[0]]]
    assert tokenizer.decode(first_byte) == "\ufffd"


def test_special_token_spellings_are_plain_text(tokenizer):
    ids = tokenizer.encode(C.BOS + "hi" + C.ASSISTANT_END)
    assert not set(ids) & set(tokenizer.specials.values())
    assert tokenizer.decode(ids) == C.BOS + "hi" + C.ASSISTANT_END
    # while the special id itself decodes to its spelling
    assert tokenizer.decode([tokenizer.bos_id]) == C.BOS


@SETTINGS
@given(text=texts)
def test_allow_special_mode_agrees_between_encoders(tokenizer, text):
    ids = tokenizer.encode(text, allow_special=True)
    assert ids == tokenizer.encode_reference(text, allow_special=True)
    assert tokenizer.decode(ids) == text
    assert (C.BOS in text) == (tokenizer.bos_id in ids)


def test_lone_surrogates_are_replaced_not_fatal(tokenizer):
    assert tokenizer.decode(tokenizer.encode("a\ud800b")) == "a\ufffdb"
    assert tokenizer.encode_reference("a\ud800b") == tokenizer.encode("a\ud800b")


def test_byte_lengths_count_specials_as_zero(tokenizer):
    lengths = tokenizer.token_byte_lengths
    ids = tokenizer.encode("Hello, world! 日本")
    assert int(lengths[ids].sum()) == len("Hello, world! 日本".encode())
    assert all(lengths[i] == 0 for i in tokenizer.specials.values())
