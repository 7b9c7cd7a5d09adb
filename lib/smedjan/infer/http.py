"""The OpenAI-compatible HTTP API (FastAPI on uvicorn), served by `smedjan serve`.

Endpoints: POST /v1/chat/completions, POST /v1/completions (both with "stream": true
as server-sent events), GET /v1/models, GET /health, and GET / (the web chat page).
Every error is a 4xx/5xx with OpenAI's body {"error": {"message", "type", "param",
"code"}}. With an API key, /v1/* needs `Authorization: Bearer KEY`. Request bodies
above `max_body` bytes get 413 before they are read in full.

A web page the user visits must not be able to drive a local server: its requests
either name the attacker's host (DNS rebinding) or are "simple" cross-origin POSTs,
which browsers send without a preflight only as text/plain, form or multipart bodies.
So without an API key, only requests whose Host is a loopback name (localhost,
127.0.0.1, [::1], any port) or one of `allowed_hosts` are answered (400 otherwise),
and every POST to /v1/* must be `application/json` (415 otherwise). With a key any
Host is answered: a page cannot know the key, and remote clients need their own name.

One `Worker` thread runs the model; each request waits on its own asyncio queue fed
from that thread. A streaming client that disconnects (or a waiting one that goes
away) cancels its sequence, which frees its batch row for the next request.

    app = create_app(engine, tok, "final.bin", api_key=None, max_body=1 << 20, index_html=path,
                     allowed_hosts=["chat.lan"])
    uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import re
import time
import uuid
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from smedjan.chat import render
from smedjan.errors import UserError
from smedjan.infer.engine import Engine
from smedjan.infer.sampling import (MAX_REPETITION_PENALTY, MAX_STOP_STRINGS, MIN_REPETITION_PENALTY, SamplingParams,
                                    SettingError)
from smedjan.infer.worker import QueueFull, Request, Worker

DISCONNECT_POLL_S = 0.5  # how often a request with nothing to send checks that its client is still there
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
# A Host header: a name or IPv4 address, or a bracketed IPv6 address, then an optional
# port (RFC 3986 allows an empty one). Anything else is refused, never guessed at.
_HOST = re.compile(r"(\[[0-9a-f:.]+\]|[a-z0-9_.-]+)(?::[0-9]*)?")
_NAME = re.compile(r"\[[0-9a-f:.]+\]|[a-z0-9_.-]+")


def _canonical(host: str) -> str | None:
    """IPv6 addresses in brackets in their compressed form, as browsers write them; None if invalid."""
    if not host.startswith("["):
        return host
    try:
        return f"[{ipaddress.IPv6Address(host[1:-1]).compressed}]"
    except ValueError:
        return None


def normalize_host(name: str) -> str:
    """An --allowed-host value as the guard compares it: lower case, IPv6 in brackets,
    no port (a name is allowed on every port). ValueError if it is not a host name."""
    n = name.strip().lower()
    if ":" in n and not n.startswith("["):
        n = f"[{n}]"  # a bare IPv6 address
    canonical = _canonical(n) if _NAME.fullmatch(n) else None
    if canonical is None:
        raise ValueError(f"{name!r} is not a host name or address (give it without a port)")
    return canonical


def host_of(header: str) -> str | None:
    """The host name of a Host header, lower case and without the port; None if malformed."""
    m = _HOST.fullmatch(header.strip().lower())
    return _canonical(m.group(1)) if m else None


def is_json_type(content_type: str) -> bool:
    """application/json, with any parameters, but a charset (if given) must be UTF-8, as
    JSON's is (RFC 8259)."""
    media, *params = content_type.split(";")
    if media.strip().lower() != "application/json":
        return False
    for p in params:
        key, _, value = p.partition("=")
        if key.strip().lower() == "charset" and value.strip().strip('"').lower() not in ("utf-8", "utf8"):
            return False
    return True


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param, self.code)


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status, headers=headers)


# ------------------------------------------------------------------ request bodies
class _Body(BaseModel):
    # Unknown fields are ignored, as OpenAI-compatible servers do, so clients that send
    # extras (user, logit_bias: {} ...) keep working; unsupported non-defaults are refused below.
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: Optional[int] = None
    temperature: Optional[float] = Field(default=None, ge=0, le=2)
    top_p: Optional[float] = Field(default=None, gt=0, le=1)
    top_k: Optional[int] = Field(default=None, ge=0)  # extension, as in vLLM and llama.cpp
    repetition_penalty: Optional[float] = Field(default=None, ge=MIN_REPETITION_PENALTY,
                                                le=MAX_REPETITION_PENALTY)  # extension
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    stream_options: Optional[dict[str, Any]] = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: Optional[Union[bool, int]] = None


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer"]
    content: Union[str, list[dict[str, Any]]]


class ChatBody(_Body):
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = None


class CompletionBody(_Body):
    prompt: Union[str, list[str], list[int]]
    echo: bool = False
    suffix: Optional[str] = None


def _text_of(content: str | list[dict]) -> str:
    """A message's text: a string, or the text parts of a content list."""
    if isinstance(content, str):
        return content
    parts = []
    for p in content:
        if p.get("type") != "text" or not isinstance(p.get("text"), str):
            raise APIError(400, "only text content parts are supported", param="messages")
        parts.append(p["text"])
    return "".join(parts)


# --------------------------------------------------------------------- the app
def create_app(engine: Engine, tok, model_name: str, *, api_key: str | None = None, max_body: int = 1 << 20,
               index_html: Path | None = None, max_queue: int = 256, allowed_hosts: Sequence[str] = ()) -> FastAPI:
    """The app; `allowed_hosts` (names or addresses, any port) are answered besides the
    loopback names when there is no API key; with one, every Host is."""
    worker = Worker(engine, max_queue=max_queue)
    hosts = None if api_key is not None else frozenset(LOOPBACK_HOSTS) | {normalize_host(h) for h in allowed_hosts}
    created = int(time.time())

    async def lifespan(app):
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title="smedjan", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker = worker

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, str(exc.detail), kind)

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(Exception)
    async def internal_error(request, exc: Exception):
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")

    app.add_middleware(_Guard, api_key=api_key, max_body=max_body, hosts=hosts)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, **worker.stats()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(model_name, created, engine.context)]}

    @app.get("/v1/models/{name}")
    async def model(name: str):
        if name != model_name:
            raise _unknown_model(name)
        return _model_card(model_name, created, engine.context)

    @app.get("/", response_class=HTMLResponse)
    async def index():
        if index_html is None or not index_html.is_file():
            raise StarletteHTTPException(404, "no web page is installed")
        return HTMLResponse(index_html.read_text(encoding="utf-8"))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        body = await _parse(request, ChatBody, max_body)
        _check_common(body, model_name)
        msgs = [{"role": "system" if m.role == "developer" else m.role, "content": _text_of(m.content)}
                for m in body.messages]
        try:
            ids = render(tok, msgs, add_generation_prompt=True).ids
        except UserError as e:
            raise APIError(400, str(e), param="messages") from None
        _check_prompts(engine, [ids], "messages")
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = _params(body, limit, engine.context)
        return await _serve(request, worker, engine, [ids], params, body, model_name, chat=True)

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        body = await _parse(request, CompletionBody, max_body)
        _check_common(body, model_name)
        if body.echo or body.suffix:
            raise APIError(400, "echo and suffix are not supported", param="echo" if body.echo else "suffix")
        p = body.prompt
        if isinstance(p, list) and p and all(isinstance(x, int) for x in p):
            prompts = [list(p)]  # token ids, used as given
        else:
            texts = [p] if isinstance(p, str) else list(p)
            if not texts:
                raise APIError(400, "prompt is empty", param="prompt")
            prompts = [[tok.bos_id] + tok.encode(t) for t in texts]  # a document starts with <|bos|>
        if len(prompts) > max(engine.max_batch, 1) * 4:
            raise APIError(400, f"at most {engine.max_batch * 4} prompts per request", param="prompt")
        _check_prompts(engine, prompts, "prompt")
        limit = body.max_tokens if body.max_tokens is not None else 16  # OpenAI's default for completions
        params = _params(body, limit, engine.context)
        return await _serve(request, worker, engine, prompts, params, body, model_name, chat=False)

    return app


class _Guard:
    """Host (without an API key), bearer auth and JSON content type on /v1/*, and the
    declared body size, checked before any endpoint runs. Plain ASGI (not
    BaseHTTPMiddleware), so streamed responses and disconnects pass through untouched.
    `hosts`: the Host names answered, or None for all."""

    def __init__(self, app, api_key: str | None, max_body: int, hosts: frozenset[str] | None):
        self.app, self.api_key, self.max_body, self.hosts = app, api_key, max_body, hosts

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            refusal = self._refusal(scope)
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _refusal(self, scope) -> JSONResponse | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        api = scope["path"].startswith("/v1/")
        if self.hosts is not None:
            given = headers.get("host")
            if given is None or host_of(given) not in self.hosts:
                shown = "no Host header" if given is None else f"Host {given[:100]!r}"
                return error_response(400, f"{shown} is not allowed: without --api-key this server answers only "
                                           f"requests addressed to localhost, 127.0.0.1 or [::1] and the names "
                                           f"given with --allowed-host", code="host_not_allowed")
        if self.api_key is not None and api:
            scheme, _, key = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
                return error_response(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                                      code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if api and scope["method"] == "POST" and not is_json_type(headers.get("content-type", "")):
            got = headers.get("content-type")
            return error_response(415, "Content-Type must be application/json, got "
                                       + (repr(got[:100]) if got is not None else "none"),
                                  code="unsupported_media_type")
        length = headers.get("content-length")
        if length is not None and (not (length.isascii() and length.isdigit()) or int(length) > self.max_body):
            return _too_large(self.max_body)
        return None


def _model_card(name: str, created: int, context: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "smedjan", "context_length": context}


def _too_large(max_body: int) -> JSONResponse:
    return error_response(413, f"request body is larger than {max_body} bytes", code="request_too_large")


def _unknown_model(name: str) -> APIError:
    return APIError(404, f"the model {name!r} does not exist; GET /v1/models lists the one served", param="model",
                    code="model_not_found")


async def _parse(request: HTTPRequest, kind: type[BaseModel], max_body: int):
    """Read the body (at most max_body bytes), parse JSON, validate: 413 or 400 on failure."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_body:  # a chunked body with no Content-Length: stop reading at the limit
            raise APIError(413, f"request body is larger than {max_body} bytes", code="request_too_large")
        chunks.append(chunk)
    try:
        data = json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the body must be a JSON object", code="invalid_json")
    try:
        return kind.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(x) for x in err["loc"]) or None
        raise APIError(400, f"{param}: {err['msg']}" if param else err["msg"], param=param) from None


def _check_common(body: _Body, model_name: str) -> None:
    if body.model != model_name:
        raise _unknown_model(body.model)
    if body.n != 1:
        raise APIError(400, "only n=1 is supported", param="n")
    if body.presence_penalty or body.frequency_penalty:
        raise APIError(400, "presence/frequency penalties are not supported; use repetition_penalty",
                       param="presence_penalty" if body.presence_penalty else "frequency_penalty")
    if body.logprobs:
        raise APIError(400, "logprobs are not supported", param="logprobs")


def _check_prompts(engine: Engine, prompts: list[list[int]], param: str) -> None:
    for ids in prompts:
        try:
            engine.check_prompt(ids)
        except UserError as e:
            code = "context_length_exceeded" if len(ids) >= engine.context else None
            raise APIError(400, str(e), param=param, code=code) from None


def _params(body: _Body, limit: int | None, context: int) -> SamplingParams:
    """Sampling settings (OpenAI's defaults: temperature 1, top_p 1). max_tokens must be
    >= 1; generation also stops where prompt + completion fill the context (finish
    reason "length"), which is the only limit when max_tokens is absent."""
    if limit is not None and limit < 1:
        raise APIError(400, f"max_tokens must be at least 1, got {limit}", param="max_tokens")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > MAX_STOP_STRINGS or any(not s for s in stop):
        raise APIError(400, f"stop: at most {MAX_STOP_STRINGS} non-empty strings", param="stop")
    try:
        return SamplingParams(max_new_tokens=limit or context,
                              temperature=1.0 if body.temperature is None else body.temperature,
                              top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0,
                              repetition_penalty=body.repetition_penalty or 1.0, seed=body.seed, stop=tuple(stop))
    except SettingError as e:
        param = "max_tokens" if e.param == "max_new_tokens" else e.param
        raise APIError(400, f"{param} {e.problem}", param=param) from None


async def _serve(request: HTTPRequest, worker: Worker, engine: Engine, prompts: list[list[int]],
                 params: SamplingParams, body: _Body, model_name: str, chat: bool):
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue = asyncio.Queue()

    def deliver(req: Request, item) -> None:
        loop.call_soon_threadsafe(inbox.put_nowait, (req.tag, item))

    reqs = [Request(ids, params, deliver, tag=i) for i, ids in enumerate(prompts)]
    try:
        for r in reqs:
            worker.submit(r)
    except QueueFull as e:
        for r in reqs:
            worker.cancel(r)
        raise APIError(503, f"server busy: {e}; retry later", "server_error", code="queue_full") from None
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    n_prompt = sum(len(p) for p in prompts)

    def usage_of(done: list[int]) -> dict:
        return {"prompt_tokens": n_prompt, "completion_tokens": sum(done), "total_tokens": n_prompt + sum(done)}

    async def events():
        """(index, Delta) items until every request finished; cancels the rest if closed early
        or when the client is gone (checked every DISCONNECT_POLL_S, busy or not: a waiting
        non-streaming client has no other way to tell us)."""
        left = len(reqs)
        checked = loop.time()
        try:
            while left:
                if loop.time() - checked >= DISCONNECT_POLL_S:
                    checked = loop.time()
                    if await request.is_disconnected():
                        return
                try:
                    index, item = await asyncio.wait_for(inbox.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    continue
                if isinstance(item, Exception):
                    raise item
                if item.finish_reason is not None:
                    left -= 1
                yield index, item
        finally:
            for r in reqs:
                worker.cancel(r)  # no-op for finished ones

    if not body.stream:
        texts, reasons, counts = [""] * len(reqs), [""] * len(reqs), [0] * len(reqs)
        gen = events()
        try:
            async for i, d in gen:
                texts[i] += d.text
                counts[i] += len(d.token_ids)
                reasons[i] = d.finish_reason or reasons[i]
        except Exception as e:
            raise APIError(500, f"generation failed: {e}", "server_error") from None
        finally:
            await gen.aclose()
        if chat:
            choices = [{"index": 0, "message": {"role": "assistant", "content": texts[0]}, "logprobs": None,
                        "finish_reason": reasons[0]}]
        else:
            choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                       for i, (t, r) in enumerate(zip(texts, reasons))]
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": model_name, "choices": choices, "usage": usage_of(counts)}

    include_usage = bool((body.stream_options or {}).get("include_usage"))
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices: list, usage=None) -> str:
        obj = {"id": rid, "object": kind, "created": created, "model": model_name, "choices": choices}
        if usage is not None:
            obj["usage"] = usage
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    async def sse():
        counts = [0] * len(reqs)
        gen = events()
        try:
            if chat:
                yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])
            async for i, d in gen:
                counts[i] += len(d.token_ids)
                if d.text or d.finish_reason is not None:
                    if chat:
                        delta = {"content": d.text} if d.text else {}
                        yield chunk([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": d.finish_reason}])
                    else:
                        yield chunk([{"index": i, "text": d.text, "logprobs": None,
                                      "finish_reason": d.finish_reason}])
            if include_usage:
                yield chunk([], usage_of(counts))
            yield "data: [DONE]\n\n"
        except Exception as e:  # after the 200 went out, errors travel as an event
            yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error', 'param': None, 'code': None}})}\n\n"
        finally:
            await gen.aclose()

    return _EventStream(sse(), media_type="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class _EventStream(StreamingResponse):
    """A streaming response that closes its generator as soon as sending stops, so a
    client that went away cancels its sequence at once (not at garbage collection)."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
