"""`smedjan serve`: an OpenAI-compatible HTTP API and a web chat page for a checkpoint.

    smedjan serve --checkpoint sft.bin                       # http://127.0.0.1:8000/
    smedjan serve -c sft.bin --host 0.0.0.0 --port 8080 --api-key "$KEY" --max-batch 16
    smedjan serve -c sft.bin --host 0.0.0.0 --allowed-host chat.lan     # keyless, on a trusted network
    curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"model": "sft.bin", "messages": [{"role": "user", "content": "Hi"}]}'

Needs the serve extra: pip install 'smedjan[serve]'.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from smedjan.cli import log, make_app, run_app, tool, warn
from smedjan_tools.serve.common import CheckpointOpt, DeviceOpt, DtypeOpt, SpeculativeOpt, ThreadsOpt, load_engine

app = make_app()

INDEX_HTML = Path(__file__).resolve().parent / "static" / "index.html"


@app.command(help=(
    "Serve a checkpoint over HTTP: POST /v1/chat/completions and /v1/completions (OpenAI's API, with "
    "\"stream\": true as server-sent events), GET /v1/models, GET /health (status, active and queued requests) "
    "and a web chat page at /. Binds 127.0.0.1 unless --host says otherwise. Up to --max-batch requests are "
    "generated together; more wait in a queue (503 beyond --max-queue). A client that disconnects frees its "
    "slot at once. Chat replies end at <|assistant_end|>; completions continue the prompt as a document "
    "(after <|bos|>). The model id is the checkpoint's file name unless --model-name is given. Without "
    "--api-key only requests addressed to localhost, 127.0.0.1 or [::1] (or an --allowed-host) are answered, "
    "so that a web page cannot reach the server through DNS rebinding; POST /v1/* must be application/json."
))
@tool("serve")
def serve(
    checkpoint: CheckpointOpt,
    host: Annotated[str, typer.Option("--host", help="Address to bind; 0.0.0.0 exposes the server to the "
                                                     "network (use --api-key).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port (0: any free one, named in the startup line).")] = 8000,
    model_name: Annotated[Optional[str], typer.Option("--model-name", help="Model id clients must send (default: "
                                                                           "the checkpoint's file name).")] = None,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="SMEDJAN_API_KEY",
                                                   help="Require 'Authorization: Bearer KEY' on /v1/* "
                                                        "(or set SMEDJAN_API_KEY). With a key, requests "
                                                        "to any Host name are answered.")] = None,
    allowed_host: Annotated[Optional[list[str]], typer.Option(
        "--allowed-host", help="Without --api-key, also answer requests addressed to this host name or address "
                               "(any port; repeat for several). Only localhost, 127.0.0.1 and [::1] are "
                               "answered otherwise.")] = None,
    max_batch: Annotated[int, typer.Option("--max-batch", help="Requests generated together (KV-cache rows).")] = 8,
    max_queue: Annotated[int, typer.Option("--max-queue", help="Requests that may wait for a row; beyond it, 503.")] = 256,
    max_body: Annotated[int, typer.Option("--max-body", help="Largest request body in bytes; larger gets 413.")] = 1 << 20,
    context: Annotated[Optional[int], typer.Option("--context", help="Tokens of context per request (default and "
                                                                     "maximum: the model's).")] = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = "auto",
    threads: ThreadsOpt = None,
    log_level: Annotated[str, typer.Option("--log-level", help="uvicorn log level: critical, error, warning, info, "
                                                               "debug.")] = "info",
    speculative: SpeculativeOpt = False,
) -> None:
    from smedjan.errors import UserError

    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise UserError(f"the web stack is missing ({e}); install the serve extra: pip install 'smedjan[serve]'") \
            from None
    if not 0 <= port <= 65535:
        raise UserError(f"--port {port} is not a TCP port")
    if max_body < 1024:
        raise UserError(f"--max-body {max_body} is too small (at least 1024 bytes)")
    if max_queue < 0:
        raise UserError(f"--max-queue must be >= 0, got {max_queue}")
    if context is not None and context < 2:
        raise UserError(f"--context must be at least 2, got {context}")
    if api_key is not None and not api_key.strip():
        raise UserError("--api-key is empty")
    from smedjan.infer.http import create_app, normalize_host

    if allowed_host and api_key is not None:
        raise UserError("--allowed-host is for a server without --api-key (with a key, every Host is answered)")
    for name in allowed_host or []:
        try:
            normalize_host(name)
        except ValueError as e:
            raise UserError(f"--allowed-host: {e}") from None
    if log_level not in ("critical", "error", "warning", "info", "debug", "trace"):
        raise UserError(f"--log-level {log_level!r} is not a uvicorn log level")
    if speculative and max_batch != 1:  # requests that sample (temperature > 0) decode plainly, one token a step
        raise UserError(f"--speculative decodes one request at a time: give --max-batch 1 (not {max_batch})")

    sock = _listen(host, port)  # before the model loads: a taken port fails fast, with exit 2
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        warn(f"--host {host} exposes the model beyond this machine without --api-key; only requests addressed to "
             f"localhost, 127.0.0.1, [::1]" + "".join(f", {h}" for h in allowed_host or []) + " are answered")
    model, tok, engine = load_engine(checkpoint, device, dtype, threads, max_batch, context, speculative)
    name = model_name or checkpoint.name
    web = create_app(engine, tok, name, api_key=api_key, max_body=max_body, index_html=INDEX_HTML,
                     max_queue=max_queue, allowed_hosts=allowed_host or ())
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    log(f"serving {name} ({model.cfg.n_params() / 1e6:.1f}M parameters, context {engine.context}, "
        f"batch {max_batch}) at http://{shown}:{bound}/" + (" (API key required)" if api_key else ""))
    config = uvicorn.Config(web, log_level=log_level, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])


def _listen(host: str, port: int):
    """A bound TCP socket (port 0 picks a free one, which the startup line names)."""
    import socket

    from smedjan.errors import UserError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UserError(f"--host {host!r}: {e.strerror}") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def main() -> None:
    run_app(app, "smedjan-serve")


if __name__ == "__main__":
    main()
