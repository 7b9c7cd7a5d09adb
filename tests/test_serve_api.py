"""`smedjan serve` as a real subprocess on a loopback port, driven by the official
`openai` client: chat and completions, streaming, max_tokens, stop sequences,
determinism, usage counts, 8 concurrent clients, disconnects, auth and every 4xx.

The server helpers here (`Server`, `long_context_copy`) are shared with test_serve_web.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

API_KEY = "test-key-123"


class Server:
    """`smedjan serve ARGS` on 127.0.0.1 with --port 0; the port is read from its startup line."""

    def __init__(self, checkpoint: Path, *args: str):
        env = {**os.environ, "SMEDJAN_PLAIN_PROGRESS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "smedjan_tools.cli", "serve", "--checkpoint", str(checkpoint), "--port", "0",
             "--log-level", "warning", *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        self.log: list[str] = []
        self._port: list[int] = []
        self._ready = threading.Event()
        # Drain stderr for the whole run, so the server can never block on a full pipe.
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(180) or not self._port:
            self.close()
            raise RuntimeError("server did not start:\n" + "".join(self.log))
        self.port = self._port[0]
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("server is not answering:\n" + "".join(self.log))
            time.sleep(0.1)

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line)
            m = re.search(r"at http://127\.0\.0\.1:(\d+)/", line)
            if m and not self._port:
                self._port.append(int(m.group(1)))
                self._ready.set()
        self._ready.set()

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def long_context_copy(checkpoint: Path, out: Path, max_seq_len: int) -> Path:
    """The same weights with a longer context: RoPE has no learned positions, so the
    model is unchanged on the positions it was trained on, and generation can run long."""
    from smedjan.formats import constants as C
    from smedjan.formats.checkpoint import load_checkpoint, save_checkpoint

    ck = load_checkpoint(checkpoint)
    cfg = ck.config
    cfg.max_seq_len = max_seq_len
    save_checkpoint(out, ck.model_state(), kind=C.KIND_MODEL, config=cfg, tokenizer=ck.tokenizer)
    return out


# ------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def long_checkpoint(trained_checkpoint, tmp_path_factory) -> Path:
    # a long context, so that a request can run for seconds: the disconnect tests need one to cut short
    return long_context_copy(trained_checkpoint, tmp_path_factory.mktemp("serve") / "micro.bin", 16384)


@pytest.fixture(scope="module")
def server(long_checkpoint):
    srv = Server(long_checkpoint, "--api-key", API_KEY, "--max-body", "262144", "--max-batch", "8")
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def engine(long_checkpoint):
    """The same model in this process: what the server must answer, computed sequentially."""
    from smedjan.infer import Engine
    from smedjan.model import load_model

    model, tok, _ = load_model(long_checkpoint)
    return Engine(model, tok), tok


def expected_chat(engine, messages, **kw):
    from smedjan.chat import render
    from smedjan.infer import SamplingParams

    eng, tok = engine
    ids = render(tok, messages, add_generation_prompt=True).ids
    return eng.generate([ids], SamplingParams(**kw))[0]


def expected_completion(engine, prompt, **kw):
    from smedjan.infer import SamplingParams

    eng, tok = engine
    return eng.generate([[tok.bos_id] + tok.encode(prompt)], SamplingParams(**kw))[0]


MODEL = "micro.bin"
USER = [{"role": "user", "content": "Good morrow, what news?"}]


# --------------------------------------------------------------------- the API
def test_models_lists_the_checkpoint(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_chat_at_temperature_zero_is_the_engines_greedy_answer(client, engine):
    want = expected_chat(engine, USER, temperature=0, max_new_tokens=24)
    first = client.chat.completions.create(model=MODEL, messages=USER, temperature=0, max_tokens=24)
    again = client.chat.completions.create(model=MODEL, messages=USER, temperature=0, max_tokens=24)
    assert first.choices[0].message.content == again.choices[0].message.content == want.text
    assert first.choices[0].finish_reason == want.finish_reason
    u = first.usage
    assert (u.prompt_tokens, u.completion_tokens) == (want.prompt_tokens, want.completion_tokens)
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens


def test_streamed_chat_adds_up_to_the_same_answer_and_usage(client, engine):
    want = expected_chat(engine, USER, temperature=0, max_new_tokens=30)
    stream = client.chat.completions.create(model=MODEL, messages=USER, temperature=0, max_tokens=30, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len([c for c in chunks if c.choices]) > 3  # it really streamed, in pieces
    assert text == want.text and reasons == [want.finish_reason]
    assert chunks[-1].usage.completion_tokens == want.completion_tokens
    assert chunks[-1].usage.prompt_tokens == want.prompt_tokens


def test_max_tokens_is_respected(client, engine):
    r = client.completions.create(model=MODEL, prompt="KING HENRY:", max_tokens=7, temperature=0)
    want = expected_completion(engine, "KING HENRY:", temperature=0, max_new_tokens=7)
    assert r.choices[0].text == want.text and r.usage.completion_tokens == want.completion_tokens <= 7
    assert r.choices[0].finish_reason == ("length" if want.completion_tokens == 7 else "stop")
    assert r.usage.prompt_tokens == 1 + len(engine[1].encode("KING HENRY:"))  # <|bos|> + the text


def test_stop_sequences_cut_the_text_before_them(client, engine):
    full = expected_completion(engine, "ROMEO:", temperature=0, max_new_tokens=40, ignore_eos=True).text
    stop = full[12:15]
    r = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=40, temperature=0, stop=[stop, "@@@"])
    assert r.choices[0].text == full[:full.find(stop)] and r.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=40, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == full[:full.find(stop)]


def test_a_seed_makes_sampling_reproducible(client):
    kw = dict(model=MODEL, messages=USER, temperature=1.0, max_tokens=20, seed=11)
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_eight_concurrent_clients_each_get_their_own_answer(client, engine):
    prompts = ["ROMEO:", "JULIET:", "First Citizen:", "KING HENRY:", "HAMLET:\nTo be", "MENENIUS:", "Nurse:",
               "GLOUCESTER:\nNow is"]
    want = [expected_completion(engine, p, temperature=0, max_new_tokens=30).text for p in prompts]
    assert len(set(want)) == len(want)  # different answers, so cross-talk would show
    start = threading.Barrier(len(prompts))

    def ask(p):
        start.wait()
        r = client.completions.create(model=MODEL, prompt=p, max_tokens=30, temperature=0, stream=p.endswith(":"))
        return "".join(c.choices[0].text for c in r) if p.endswith(":") else r.choices[0].text

    with ThreadPoolExecutor(len(prompts)) as pool:
        got = list(pool.map(ask, prompts))
    assert got == want


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server, client):
    before = server.health()["cancelled"]
    body = {"model": MODEL, "prompt": "ROMEO:", "max_tokens": 16000, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
    # The connection is closed here, thousands of tokens early.
    deadline = time.monotonic() + 60
    while (h := server.health())["active"] or h["cancelled"] == before:
        assert time.monotonic() < deadline, h
        time.sleep(0.05)
    assert h["cancelled"] == before + 1 and h["queued"] == 0
    r = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=5, temperature=0)
    assert r.usage.completion_tokens == 5


def test_a_waiting_client_that_gives_up_frees_its_slot_too(server):
    before = server.health()["cancelled"]
    body = {"model": MODEL, "prompt": "ROMEO:", "max_tokens": 16000}  # not streamed: nothing to send until the end
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"},
                   timeout=httpx.Timeout(60, read=0.5))
    deadline = time.monotonic() + 60
    while (h := server.health())["active"] or h["cancelled"] == before:
        assert time.monotonic() < deadline, h
        time.sleep(0.05)
    assert h["cancelled"] == before + 1


# ---------------------------------------------------------------- auth, errors
def test_the_api_key_is_required_on_v1_only(server):
    from openai import AuthenticationError, OpenAI

    for key in ("wrong", ""):
        bad = OpenAI(base_url=server.url + "/v1", api_key=key or "x", max_retries=0)
        with pytest.raises(AuthenticationError) as e:
            bad.models.list()
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    r = httpx.get(server.url + "/v1/models")  # no header at all
    assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(server.url + "/health").status_code == 200


def _post(server, path, content, **headers):
    return httpx.post(server.url + path, content=content, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json", **headers})


@pytest.mark.parametrize("path,body,status,param,code", [
    ("/v1/chat/completions", b'{"model": "micro.bin", "messages": [', 400, None, "invalid_json"),
    ("/v1/chat/completions", b'[1, 2]', 400, None, "invalid_json"),
    ("/v1/chat/completions", {"model": "gpt-4", "messages": USER}, 404, "model", "model_not_found"),
    ("/v1/chat/completions", {"model": MODEL, "messages": USER, "max_tokens": -5}, 400, "max_tokens", None),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens", None),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, 400,
     "messages.0.role", None),
    ("/v1/chat/completions", {"model": MODEL, "messages": USER, "temperature": "hot"}, 400, "temperature", None),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages", None),
    ("/v1/completions", {"model": MODEL, "prompt": "word " * 20000}, 400, "prompt", "context_length_exceeded"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "word " * 20000}]}, 400,
     "messages", "context_length_exceeded"),
    ("/v1/completions", {"model": MODEL, "prompt": "x" * 300000}, 413, None, "request_too_large"),
    ("/v1/chat/completions", {"model": MODEL, "messages": USER, "n": 3}, 400, "n", None),
    ("/v1/completions", {"model": MODEL, "prompt": [1, 2, 999999]}, 400, "prompt", None),  # a token id out of range
])
def test_bad_requests_get_a_4xx_with_an_openai_error_body(server, path, body, status, param, code):
    r = _post(server, path, body if isinstance(body, bytes) else json.dumps(body).encode())
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param and err["code"] == code


def test_a_chunked_body_over_the_limit_is_refused_too(server):
    def chunks():  # no Content-Length: the server must count while reading
        for _ in range(70):
            yield b" " * 4096
        yield b"{}"

    r = httpx.post(server.url + "/v1/completions", content=chunks(), timeout=60,
                   headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_serve_without_the_web_stack_says_how_to_install_it(long_checkpoint, tmp_path):
    from helpers import assert_user_error, smedjan

    (tmp_path / "fastapi.py").write_text("raise ImportError('No module named fastapi')\n")  # as if not installed
    res = smedjan("serve", "--checkpoint", long_checkpoint, env={"PYTHONPATH": str(tmp_path)})
    assert_user_error(res, "pip install 'smedjan[serve]'")
