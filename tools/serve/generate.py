"""`smedjan generate`: continue a prompt with a checkpoint, streaming the text to stdout.

    smedjan generate --checkpoint final.bin --prompt "ROMEO:" --max-new-tokens 100
    smedjan generate -c sft.bin --chat --prompt "Name three colours." --temperature 0
    smedjan generate -c final.bin -p "Once" -p "There was" --seed 1 --json    # a batch of prompts
"""

from __future__ import annotations

import sys
import time
from typing import Annotated, Optional

import typer

from smedjan.cli import JsonOpt, emit, log, make_app, run_app, tool
from smedjan_tools.serve.common import (CheckpointOpt, DeviceOpt, DtypeOpt, IgnoreEosOpt, MaxNewOpt, RepPenaltyOpt,
                                        SeedOpt, SpeculativeOpt, StopOpt, TemperatureOpt, ThreadsOpt, TopKOpt, TopPOpt,
                                        load_engine, sampling)

app = make_app()


@app.command(help=(
    "Generate text from a checkpoint. A plain prompt is continued as a document: it is encoded after <|bos|>, "
    "as training documents start. --chat instead sends it as a user message through the chat template and "
    "prints the assistant's reply. Generation ends at an end token (<|assistant_end|>, <|bos|> or another "
    "special token), a --stop string, --max-new-tokens, or the model's context. One prompt is streamed to "
    "stdout as it is generated; several (-p repeated) run together as one batch and are printed in order, "
    "separated by blank lines. Speed and the finish reason go to stderr. With no --prompt, the prompt is "
    "read from stdin."
))
@tool("generate")
def generate(
    checkpoint: CheckpointOpt,
    prompt: Annotated[Optional[list[str]], typer.Option("--prompt", "-p", help="Prompt text; repeat for a batch.")] = None,
    chat: Annotated[bool, typer.Option("--chat", help="Wrap the prompt in the chat template as a user turn.")] = False,
    system: Annotated[Optional[str], typer.Option("--system", help="System message (with --chat).")] = None,
    max_new_tokens: MaxNewOpt = 256,
    temperature: TemperatureOpt = 0.8,
    top_k: TopKOpt = 0,
    top_p: TopPOpt = 1.0,
    repetition_penalty: RepPenaltyOpt = 1.0,
    seed: SeedOpt = None,
    stop: StopOpt = None,
    ignore_eos: IgnoreEosOpt = False,
    speculative: SpeculativeOpt = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = "auto",
    threads: ThreadsOpt = None,
    json: JsonOpt = False,
) -> None:
    from smedjan.chat import render
    from smedjan.errors import UserError

    params = sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop, ignore_eos)
    if system is not None and not chat:
        raise UserError("--system needs --chat")
    if speculative and not (params.greedy and params.repetition_penalty == 1.0):
        raise UserError("--speculative decodes greedily (its drafts are checked against greedy choices): give "
                        "--temperature 0 and no --repetition-penalty")
    texts = list(prompt) if prompt else [sys.stdin.read()]
    model, tok, engine = load_engine(checkpoint, device, dtype, threads, max_batch=min(len(texts), 8),
                                     speculative=speculative)

    def ids_of(text: str) -> list[int]:
        if chat:
            msgs = ([{"role": "system", "content": system}] if system is not None else [])
            return render(tok, msgs + [{"role": "user", "content": text}], add_generation_prompt=True).ids
        return [tok.bos_id] + tok.encode(text)

    prompts = [ids_of(t) for t in texts]
    for p in prompts:
        engine.check_prompt(p)
    t0 = time.perf_counter()
    if len(prompts) == 1 and not json:
        out = sys.stdout
        n, reason, first = 0, "", None
        for d in engine.stream(prompts[0], params):
            if first is None:
                first = time.perf_counter()
            out.write(d.text)
            out.flush()
            n += len(d.token_ids)
            reason = d.finish_reason or reason
        if out.isatty():
            out.write("\n")
        # The first token comes out of the prefill, so a decode rate needs at least two;
        # with one there is no rate to report (it printed "nan tok/s").
        decode_s = time.perf_counter() - first if first is not None else 0.0
        rate = f", {(n - 1) / decode_s:.1f} tok/s" if n > 1 and decode_s > 0 else ""
        if speculative:
            rate += f", {engine.accepted}/{engine.proposed} drafts accepted"
        log(f"{n} token{'' if n == 1 else 's'}{rate}, finish: {reason}")
        return
    results = engine.generate(prompts, params)
    seconds = time.perf_counter() - t0
    rows = [{"text": r.text, "finish_reason": r.finish_reason, "prompt_tokens": r.prompt_tokens,
             "completion_tokens": r.completion_tokens} for r in results]
    total = sum(r.completion_tokens for r in results)
    if json:
        drafts = {"drafts": {"accepted": engine.accepted, "proposed": engine.proposed}} if speculative else {}
        emit({"completions": rows, "seconds": round(seconds, 3),
              "tokens_per_second": round(total / seconds, 1) if seconds > 0 else None, **drafts}, True)
        return
    print("\n\n".join(r.text for r in results), flush=True)
    log(f"{len(results)} prompts, {total} tokens in {seconds:.2f}s ({total / seconds:.1f} tok/s), finish: "
        + ", ".join(r.finish_reason for r in results))


def main() -> None:
    run_app(app, "smedjan-generate")


if __name__ == "__main__":
    main()
