"""`smedjan serve` under attack, as a real subprocess: a request with each extreme
sampling value runs alongside normal streams, which must finish byte-identical to their
solo replays (fixed seeds); every attacker gets a 200 or a 400, never a 500; the worker
never fails a request and the server never prints a traceback. Also: the Host and
Content-Type rules end to end, with --allowed-host."""

from __future__ import annotations

import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from test_serve_api import Server, long_context_copy

MODEL = "micro.bin"
USER = [{"role": "user", "content": "Good morrow, what news?"}]

VICTIMS = [
    ("/v1/chat/completions", {"messages": USER, "temperature": 1.0, "seed": 1, "max_tokens": 40}),
    ("/v1/completions", {"prompt": "ROMEO:", "temperature": 0.9, "top_p": 0.95, "seed": 2, "max_tokens": 40}),
    ("/v1/completions", {"prompt": "JULIET:", "temperature": 1.1, "top_k": 40, "repetition_penalty": 1.2, "seed": 3,
                         "max_tokens": 40}),
    ("/v1/chat/completions", {"messages": USER, "temperature": 0, "max_tokens": 40}),
]

# (body fields, expected status): every extreme the API accepts, and some it must refuse
ATTACKS = [
    ({"temperature": 2.57e-38}, 200), ({"temperature": 1e-40}, 200), ({"temperature": 5e-324}, 200),
    ({"temperature": 0}, 200), ({"temperature": 2}, 200), ({"temperature": "1e-40"}, 200),
    ({"top_p": 5e-324}, 200), ({"top_p": 1e-300, "temperature": 2}, 200), ({"top_k": 1, "temperature": 2}, 200),
    ({"top_k": 10 ** 30}, 200), ({"repetition_penalty": 0.01}, 200), ({"repetition_penalty": 100}, 200),
    ({"repetition_penalty": 0.01, "temperature": 2.57e-38}, 200), ({"max_tokens": 10 ** 12}, 200),
    ({"max_tokens": 10 ** 12, "temperature": 1e-40, "repetition_penalty": 100}, 200),
    ({"seed": -1}, 200), ({"seed": 2 ** 64 + 5}, 200), ({"seed": -(10 ** 30)}, 200),
    ({"stop": ["\n", "a", "e", " ", "o", "t", "\u00e9", "\U0001f600", "xx", "th", "ou", "in", "er", "an", "re",
               "on"]}, 200),
    ({"repetition_penalty": 1e-300}, 400), ({"repetition_penalty": 1e300}, 400), ({"repetition_penalty": 0}, 400),
    ({"repetition_penalty": -1}, 400), ({"temperature": -1e-40}, 400), ({"temperature": 2.0000001}, 400),
    ({"top_p": 0}, 400), ({"top_k": -1}, 400), ({"max_tokens": 0}, 400), ({"stop": [""]}, 400),
]
NAN_ATTACKS = ['"temperature": NaN', '"temperature": Infinity', '"repetition_penalty": Infinity',
               '"repetition_penalty": NaN', '"top_p": NaN', '"temperature": -Infinity']


@pytest.fixture(scope="module")
def server(trained_checkpoint, tmp_path_factory):
    ckpt = long_context_copy(trained_checkpoint, tmp_path_factory.mktemp("hostile") / MODEL, 384)
    srv = Server(ckpt, "--max-batch", "8", "--allowed-host", "chat.example.test")
    yield srv
    srv.close()


def _post(server, path, body: dict | bytes, **headers) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.url + path, content=content, timeout=300,
                      headers={"Content-Type": "application/json", **headers})


def _stream(server, path, fields) -> bytes:
    """The whole SSE body, with the per-response id and timestamp masked (they differ by design)."""
    r = _post(server, path, {"model": MODEL, "stream": True, **fields})
    assert r.status_code == 200, r.text
    body = r.content
    assert body.endswith(b"data: [DONE]\n\n") and b'"error"' not in body, body
    return re.sub(rb'"created": \d+', b'"created": 0', re.sub(rb'"id": "[a-z]+-[0-9a-f]+"', b'"id": ""', body))


def test_attackers_cannot_touch_normal_streams(server):
    solo = [_stream(server, path, fields) for path, fields in VICTIMS]
    assert len(set(solo)) == len(solo)
    attacks = []
    for i, (fields, status) in enumerate(ATTACKS):
        path, base = (("/v1/chat/completions", {"messages": USER}) if i % 2 else ("/v1/completions",
                                                                                  {"prompt": "KING HENRY:"}))
        attacks.append((path, {"model": MODEL, "stream": i % 3 == 0, "max_tokens": 64, **base, **fields}, status))
    for literal in NAN_ATTACKS:
        raw = '{"model": "%s", "prompt": "HAMLET:", %s}' % (MODEL, literal)
        attacks.append(("/v1/completions", raw.encode(), 400))
    start = threading.Barrier(len(VICTIMS) + len(attacks))

    def victim(job):
        start.wait()
        return _stream(server, *job)

    def attacker(job):
        start.wait()
        return job, _post(server, job[0], job[1])

    with ThreadPoolExecutor(len(VICTIMS) + len(attacks)) as pool:
        victims = pool.map(victim, VICTIMS)
        attackers = pool.map(attacker, attacks)
        got = list(victims)
        answers = list(attackers)
    assert got == solo
    for (_, body, status), r in answers:
        assert r.status_code == status, (body, r.text)
        if status == 200 and r.headers["content-type"].startswith("text/event-stream"):
            assert r.text.endswith("data: [DONE]\n\n") and '"error"' not in r.text, (body, r.text)
        elif status == 200:
            assert r.json()["usage"]["completion_tokens"] >= 1
        else:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    health = server.health()
    assert health["failed"] == 0 and health["active"] == 0 and health["queued"] == 0, health
    assert not any("Traceback" in line for line in server.log), "".join(server.log)


@pytest.mark.parametrize("host,status", [
    ("127.0.0.1", 200), ("localhost:{port}", 200), ("[::1]:{port}", 200), ("chat.example.test:{port}", 200),
    ("attacker.example", 400), ("attacker.example:{port}", 400), ("127.0.0.1.attacker.example", 400),
])
def test_a_keyless_server_answers_loopback_and_allowed_hosts_only(server, host, status):
    host = host.format(port=server.port)
    body = {"model": MODEL, "prompt": "ROMEO:", "max_tokens": 2, "temperature": 0}
    r = _post(server, "/v1/completions", body, Host=host)
    assert r.status_code == status, r.text
    assert httpx.get(server.url + "/", headers={"Host": host}).status_code == status
    if status == 400:
        assert r.json()["error"]["code"] == "host_not_allowed"


def test_a_form_or_text_post_is_refused_with_415(server):
    body = b'{"model": "micro.bin", "prompt": "ROMEO:", "max_tokens": 2}'
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        r = _post(server, "/v1/completions", body, **{"Content-Type": ctype})
        assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type", r.text
