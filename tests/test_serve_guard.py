"""What a web page the user visits could make a local server do (DNS rebinding, simple-
request CSRF), checked on the ASGI app in this process: without an API key only
requests addressed to a loopback name or an --allowed-host are answered; POST /v1/* needs
a JSON content type."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from smedjan.infer import Engine
from smedjan.infer.http import create_app
from smedjan.model import load_model

MODEL = "micro.bin"
INDEX_HTML = Path(__file__).resolve().parent.parent / "tools" / "serve" / "static" / "index.html"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0}


@pytest.fixture(scope="module")
def micro(trained_checkpoint):
    model, tok, _ = load_model(trained_checkpoint)
    return model, tok


def _client(micro, **kw) -> TestClient:
    model, tok = micro
    app = create_app(Engine(model, tok, max_batch=2), tok, MODEL, index_html=INDEX_HTML, **kw)
    return TestClient(app, base_url="http://127.0.0.1")


@pytest.fixture(scope="module")
def keyless(micro):
    with _client(micro, allowed_hosts=["chat.example.org", "10.1.2.3", "fd00:0::5"]) as c:
        yield c


@pytest.fixture(scope="module")
def keyed(micro):
    with _client(micro, api_key="k") as c:
        yield c


def _assert_openai_error(r, status, code):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["code"] == code


LOOPBACK = ["localhost", "LOCALHOST", "localhost:8000", "127.0.0.1", "127.0.0.1:65535", "[::1]", "[::1]:8000",
            "[0:0:0:0:0:0:0:1]:80"]
ALLOWED = ["chat.example.org", "Chat.Example.Org:8443", "10.1.2.3:80", "[fd00::5]", "[FD00::5]:9"]
REFUSED = ["attacker.example", "attacker.example:8000", "localhost.attacker.example", "127.0.0.1.nip.io",
           "127.0.0.2", "[::2]", "::1", "0.0.0.0", "", "localhost:80:80", "localhost:x", "[::1",
           "[::1]x", "evil.com#@localhost", "localhost@evil.com", "chat.example.org.evil.com", "10.1.2.3.4", "[abc:80]", "[::1%eth0]", "[::ffff:127.0.0.1]"]


@pytest.mark.parametrize("host", LOOPBACK + ALLOWED)
def test_loopback_and_allowed_hosts_are_answered_without_a_key(keyless, host):
    assert keyless.get("/health", headers={"Host": host}).status_code == 200
    r = keyless.post("/v1/chat/completions", json=CHAT, headers={"Host": host})
    assert r.status_code == 200 and r.json()["choices"], r.text


@pytest.mark.parametrize("host", REFUSED)
def test_any_other_host_is_refused_without_a_key(keyless, host):
    for method, path in (("GET", "/"), ("GET", "/health"), ("GET", "/v1/models"), ("POST", "/v1/chat/completions")):
        r = keyless.request(method, path, headers={"Host": host}, json=CHAT if method == "POST" else None)
        _assert_openai_error(r, 400, "host_not_allowed")
        assert "--allowed-host" in r.json()["error"]["message"]


def test_a_request_without_a_host_header_is_refused_without_a_key(keyless):
    # TestClient always sends one; an HTTP/1.0 request can lack it
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/health", "raw_path": b"/health", "query_string": b"",
             "headers": [], "http_version": "1.0", "scheme": "http", "server": ("127.0.0.1", 80),
             "client": ("127.0.0.1", 5), "root_path": "", "asgi": {"version": "3.0"}}
    asyncio.run(keyless.app(scope, receive, send))
    assert next(m for m in sent if m["type"] == "http.response.start")["status"] == 400


@pytest.mark.parametrize("host", ["attacker.example", "192.168.1.20:8000", "localhost"])
def test_with_an_api_key_any_host_is_answered(keyed, host):
    r = keyed.post("/v1/chat/completions", json=CHAT, headers={"Host": host, "Authorization": "Bearer k"})
    assert r.status_code == 200, r.text
    _assert_openai_error(keyed.post("/v1/chat/completions", json=CHAT, headers={"Host": host}), 401,
                         "invalid_api_key")


@pytest.mark.parametrize("ctype", ["application/json", "application/json; charset=utf-8",
                                   "Application/JSON;charset=UTF-8", "application/json ; charset=\"utf-8\""])
def test_json_content_types_are_accepted(keyless, ctype):
    r = keyless.post("/v1/chat/completions", content=json.dumps(CHAT), headers={"Content-Type": ctype})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("ctype", [None, "text/plain", "text/plain; charset=utf-8", "application/x-www-form-urlencoded",
                                   "multipart/form-data; boundary=x", "application/jsonx", "application/json-seq",
                                   "application/json; charset=latin-1", "text/json", "", "application/*"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_other_content_types_get_415(keyless, keyed, ctype, path):
    body = json.dumps(CHAT if "chat" in path else {"model": MODEL, "prompt": "Hi", "max_tokens": 2})
    headers = {} if ctype is None else {"Content-Type": ctype}
    for client, auth in ((keyless, {}), (keyed, {"Authorization": "Bearer k"})):
        r = client.post(path, content=body, headers={**headers, **auth})
        _assert_openai_error(r, 415, "unsupported_media_type")
    assert keyless.get("/health").status_code == 200  # GETs have no body to check


def test_the_web_page_is_served_to_loopback_names_only(keyless):
    r = keyless.get("/", headers={"Host": "localhost:8000"})
    assert r.status_code == 200 and "<title>smedjan chat</title>" in r.text
    assert keyless.get("/", headers={"Host": "rebound.attacker.example:8000"}).status_code == 400


@pytest.mark.parametrize("name", ["evil.example:80", "abc:80", "http://evil.example", "", "a b", "[::1", "x/y"])
def test_an_allowed_host_must_be_a_bare_name_or_address(name):
    from smedjan.infer.http import normalize_host

    with pytest.raises(ValueError, match="without a port"):
        normalize_host(name)
