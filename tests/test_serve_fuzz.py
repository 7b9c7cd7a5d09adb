"""Property-based fuzzing of the HTTP API (hypothesis, bounded to a few seconds): random
JSON bodies for POST /v1/chat/completions and /v1/completions, built from a valid request
by setting fields to values of any JSON type (NaN and Infinity literals included, as
Python's json module reads them), deleting fields and adding unknown ones; plus bodies
that are no JSON object at all and random content types. Property: always a 200 with a
complete answer (a stream ending in [DONE] without an error event) or a 4xx with
OpenAI's error body; never a 500, never a traceback.

Run with -s to see the case counts: `python -m pytest -q -s tests/test_serve_fuzz.py`;
SMEDJAN_FUZZ_EXAMPLES=5000 searches longer (default 300 per endpoint, about 2 s each).
"""

from __future__ import annotations

import collections
import json
import os

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smedjan.infer import Engine
from smedjan.infer.http import create_app
from smedjan.model import load_model

MODEL = "micro.bin"
COUNTS: collections.Counter = collections.Counter()

SPECIAL_FLOATS = [0.0, -0.0, 2.57e-38, 1e-40, 5e-324, 1e-5, 0.5, 1.0, 2.0, 2.0000001, 100.0, 1e300, -1.0,
                  float("nan"), float("inf"), float("-inf")]
SPECIAL_INTS = [0, 1, -1, 2, 7, 255, 2 ** 31, 2 ** 63, 2 ** 64 + 5, 10 ** 30, -(10 ** 30)]

scalars = (st.none() | st.booleans() | st.integers() | st.sampled_from(SPECIAL_INTS)
           | st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(SPECIAL_FLOATS)
           | st.text(max_size=12) | st.sampled_from(["", "user", "text", "micro.bin", "<|bos|>", "\x00", "\ud7ff"]))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10)

message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "developer", "tool"])
                                 | json_values,
                                 "content": st.text(max_size=30) | json_values
                                 | st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]),
                                                                   "text": st.text(max_size=10) | json_values}),
                                            max_size=3)})
FIELDS = {
    "model": st.sampled_from([MODEL, MODEL, "gpt-4", "", "MICRO.BIN"]) | json_values,
    "max_tokens": st.integers(-3, 40) | st.sampled_from(SPECIAL_INTS) | json_values,
    "max_completion_tokens": st.integers(-3, 40) | json_values,
    "temperature": st.sampled_from(SPECIAL_FLOATS) | st.floats(0, 2) | json_values,
    "top_p": st.sampled_from(SPECIAL_FLOATS) | st.floats(0, 1) | json_values,
    "top_k": st.sampled_from(SPECIAL_INTS) | json_values,
    "repetition_penalty": st.sampled_from(SPECIAL_FLOATS + [0.01, 0.0099, 100.01]) | json_values,
    "seed": st.sampled_from(SPECIAL_INTS) | json_values,
    "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=18) | json_values,
    "stream": st.booleans() | json_values,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans() | json_values}) | json_values,
    "n": st.sampled_from([1, 2, 0]) | json_values,
    "presence_penalty": st.sampled_from([0, 0.5]) | json_values,
    "frequency_penalty": st.sampled_from([0, 0.5]) | json_values,
    "logprobs": st.sampled_from([None, False, True, 3]) | json_values,
    "messages": st.lists(message, max_size=3) | json_values,
    "prompt": (st.text(max_size=30) | st.lists(st.text(max_size=8), max_size=3)
               | st.lists(st.integers(-2, 2100), max_size=6) | json_values),
    "echo": st.booleans() | json_values,
    "suffix": st.none() | st.text(max_size=3) | json_values,
}
CONTENT_TYPES = ["application/json"] * 8 + ["application/json; charset=utf-8", "text/plain", None]


@st.composite
def requests(draw, chat: bool):
    """(body bytes, content type, whether the content type is JSON)."""
    ctype = draw(st.sampled_from(CONTENT_TYPES))
    kind = draw(st.sampled_from(["mutated"] * 8 + ["any json", "bytes"]))
    if kind == "bytes":
        body = draw(st.binary(max_size=40))
    elif kind == "any json":
        body = json.dumps(draw(json_values)).encode()
    else:
        data = ({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]} if chat
                else {"model": MODEL, "prompt": "ROMEO:"})
        data["max_tokens"] = draw(st.integers(1, 8))
        for name in draw(st.lists(st.sampled_from(sorted(FIELDS)), max_size=5)):
            if draw(st.integers(0, 4)) == 0:
                data.pop(name, None)
            else:
                data[name] = draw(FIELDS[name])
        for key, value in draw(st.dictionaries(st.text(max_size=6), json_values, max_size=2)).items():
            data.setdefault(key, value)
        body = json.dumps(data).encode()  # NaN and Infinity as the literals Python's json reads back
    return body, ctype, ctype is not None and ctype.startswith("application/json")


@pytest.fixture(scope="module")
def client(trained_checkpoint):
    model, tok, _ = load_model(trained_checkpoint)
    engine = Engine(model, tok, max_batch=2, context=48)  # every answer is short, whatever max_tokens says
    with TestClient(create_app(engine, tok, MODEL), base_url="http://127.0.0.1") as c:
        yield c
    print("\nAPI fuzz cases by endpoint and status:", dict(sorted(COUNTS.items())))


def _check(client, path: str, body: bytes, ctype: str | None, is_json: bool) -> None:
    headers = {"Content-Type": ctype} if ctype is not None else {}
    r = client.post(path, content=body, headers=headers)
    COUNTS[f"{path} {r.status_code}"] += 1
    assert r.status_code == 200 or 400 <= r.status_code < 500, (r.status_code, r.text, body)
    if not is_json:
        assert r.status_code == 415, (r.text, body)
    if r.status_code != 200:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str) \
            and err["message"], (r.text, body)
        return
    if r.headers["content-type"].startswith("text/event-stream"):
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]", (r.text, body)
        for e in events[:-1]:
            obj = json.loads(e)
            assert "error" not in obj and "choices" in obj, (r.text, body)
    else:
        obj = r.json()
        assert obj["choices"] and obj["usage"]["completion_tokens"] >= 1, (r.text, body)


FUZZ = settings(max_examples=int(os.environ.get("SMEDJAN_FUZZ_EXAMPLES", "300")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FUZZ
@given(req=requests(chat=True))
def test_fuzzed_chat_requests_get_a_200_or_an_openai_4xx(client, req):
    _check(client, "/v1/chat/completions", *req)


@FUZZ
@given(req=requests(chat=False))
def test_fuzzed_completion_requests_get_a_200_or_an_openai_4xx(client, req):
    _check(client, "/v1/completions", *req)


def test_the_worker_never_failed_and_nothing_is_left_running(client):
    stats = client.get("/health").json()
    assert stats["failed"] == 0 and stats["active"] == 0 and stats["queued"] == 0, stats
