"""`smedjan chat`: an interactive terminal chat with a checkpoint, through the chat template.

    smedjan chat --checkpoint sft.bin --system "Answer briefly." --temperature 0.7

Type a message and press Enter; the reply streams in. /reset clears the conversation,
/exit (or Ctrl-D) quits. Ctrl-C stops a reply that is being written and keeps what was
written so far; at the prompt, Ctrl-C twice in a row quits. Lines are edited with
readline (arrow keys, history with Up/Down; --history-file keeps it between sessions).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from smedjan.cli import log, make_app, run_app, tool, warn
from smedjan_tools.serve.common import (CheckpointOpt, DeviceOpt, DtypeOpt, MaxNewOpt, RepPenaltyOpt, SeedOpt,
                                        StopOpt, TemperatureOpt, ThreadsOpt, TopKOpt, TopPOpt, load_engine, sampling)

app = make_app()

PROMPT = "you> "
HELP = "/reset clears the conversation, /exit or Ctrl-D quits, Ctrl-C stops a reply."


def fit_to_context(tok, messages: list[dict], context: int, reserve: int) -> tuple[list[int], int]:
    """Prompt ids of the conversation, dropping the oldest exchanges (never the system
    message or the newest user turn) until `reserve` tokens are left for the reply.
    Returns (ids, number of messages dropped)."""
    from smedjan.chat import render

    head = 1 if messages and messages[0]["role"] == "system" else 0
    dropped = 0
    while True:
        ids = render(tok, messages, add_generation_prompt=True).ids
        if len(ids) + reserve <= context or len(messages) - head <= 1:
            return ids, dropped
        # the oldest user turn and the reply to it go together
        n = 2 if len(messages) - head > 2 and messages[head + 1]["role"] == "assistant" else 1
        del messages[head:head + n]
        dropped += n


@app.command(help=(
    "Chat with a checkpoint in the terminal. Each message is sent with the whole conversation through the chat "
    "template (the KV cache of the previous turns is reused); the reply streams in and ends at <|assistant_end|>. "
    "When the conversation outgrows the context, the oldest exchanges are dropped. " + HELP +
    " At the prompt, Ctrl-C twice quits. Works with piped input too (one message per line)."
))
@tool("chat")
def chat(
    checkpoint: CheckpointOpt,
    system: Annotated[Optional[str], typer.Option("--system", help="System message that opens the conversation.")] = None,
    max_new_tokens: MaxNewOpt = 512,
    temperature: TemperatureOpt = 0.8,
    top_k: TopKOpt = 0,
    top_p: TopPOpt = 1.0,
    repetition_penalty: RepPenaltyOpt = 1.0,
    seed: SeedOpt = None,
    stop: StopOpt = None,
    ignore_eos: Annotated[bool, typer.Option("--ignore-eos", help="Do not stop at <|assistant_end|> (for testing "
                                                                  "interruption); replies then run to the limit.")] = False,
    history_file: Annotated[Optional[Path], typer.Option("--history-file", help="Keep the readline input history "
                                                         "in this file (read at start, written at exit).")] = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = "auto",
    threads: ThreadsOpt = None,
) -> None:
    from smedjan.errors import UserError
    from smedjan.io import check_output_path

    params = sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop, ignore_eos)
    if history_file is not None:
        check_output_path(history_file)
    # Ctrl-C at the prompt works whichever thread takes it: see smedjan.signals
    model, tok, engine = load_engine(checkpoint, device, dtype, threads, max_batch=1)
    readline = _setup_readline(history_file)
    reserve = min(max_new_tokens, engine.context // 4)
    system_msgs = [{"role": "system", "content": system}] if system else []
    messages = list(system_msgs)
    log(f"chatting with {checkpoint.name} ({model.cfg.n_params() / 1e6:.1f}M parameters, context "
        f"{engine.context} tokens). {HELP}")
    interrupted = False  # the previous key press at the prompt was Ctrl-C
    out = sys.stdout
    try:
        while True:
            try:
                line = input(PROMPT)
            except EOFError:  # Ctrl-D, or the end of piped input
                out.write("\n")
                break
            except KeyboardInterrupt:
                if interrupted:
                    out.write("\n")
                    break
                interrupted = True
                out.write("\n(Ctrl-C again or Ctrl-D to quit)\n")
                continue
            interrupted = False
            text = line.strip()
            if not text:
                continue
            if text in ("/exit", "/quit"):
                break
            if text == "/reset":
                messages = list(system_msgs)
                log("(conversation cleared)")
                continue
            if text in ("/help", "/?"):
                log(HELP)
                continue
            messages.append({"role": "user", "content": line})
            ids, dropped = fit_to_context(tok, messages, engine.context, reserve)
            if dropped:
                warn(f"dropped the {dropped} oldest messages to fit the context of {engine.context} tokens")
            try:
                engine.check_prompt(ids)
            except UserError as e:
                warn(f"{e}; message not sent")
                messages.pop()
                continue
            reply, reason = [], ""
            stream = engine.stream(ids, params)
            try:
                for d in stream:
                    out.write(d.text)
                    out.flush()
                    reply.append(d.text)
                    reason = d.finish_reason or reason
            except KeyboardInterrupt:
                reason = "interrupted"
            finally:
                stream.close()  # cancels the sequence and frees the engine for the next turn
            out.write("\n")
            if reason == "interrupted":
                log("(reply stopped)")
            elif reason == "length":
                log("(reply cut at the length limit)")
            out.flush()
            messages.append({"role": "assistant", "content": "".join(reply)})
    finally:
        if readline is not None and history_file is not None:
            readline.write_history_file(str(history_file))


def _setup_readline(history_file: Path | None):
    """Line editing and Up/Down history for input() on a terminal (None where unavailable)."""
    if not sys.stdin.isatty():
        return None
    try:
        import readline
    except ImportError:  # e.g. Windows without pyreadline
        return None
    if history_file is not None and history_file.is_file():
        try:
            readline.read_history_file(str(history_file))
        except OSError:
            pass
    return readline


def main() -> None:
    run_app(app, "smedjan-chat")


if __name__ == "__main__":
    main()
