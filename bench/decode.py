"""smedjan's decode speed against llama.cpp (llama-cpp-python), in one run, on the same model.

For each preset, one random-initialised model (or a given checkpoint) is exported to an
f32 GGUF with smedjan's own exporter; then both engines decode greedily at batch 1 with a
KV cache: the same prompt, the same number of new tokens, end tokens ignored, the same
thread count. Repetitions alternate between the two (llama.cpp first on even rounds,
smedjan first on odd ones), so drifting machine load hits both alike. Prefill is not
timed. Each side's loop is what its Python API costs per token: smedjan's `Engine`
(decode step, argmax, stop checks); llama.cpp's `Llama.eval` of one token and a numpy
argmax over its logits, read in place.

    python bench/decode.py                            # small and medium, vocab 8192, 2 threads
    python bench/decode.py --sizes small --threads 1 --rounds 9
    python bench/decode.py --checkpoint runs/small/final.bin

Prints a markdown table: median tok/s of each engine, their ratio, and how many of the
greedy tokens agree (random weights make near-ties, so an early divergence on them is
rounding, not a bug; a trained checkpoint agrees for long stretches).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "lib"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from smedjan.infer import Engine, SamplingParams  # noqa: E402
from smedjan.model import ModelConfig, Transformer, load_model  # noqa: E402


def build(size: str | None, checkpoint: Path | None, vocab: int, context: int, seed: int):
    """(label, model in float32 eval mode, ModelSource for the exporter)."""
    from smedjan.export.source import ModelSource

    if checkpoint is not None:
        model, tok, _ = load_model(checkpoint)
        label = checkpoint.name
    else:
        cfg = ModelConfig.from_preset(size, vocab, max_seq_len=context)
        torch.manual_seed(seed)
        model, tok, label = Transformer(cfg).eval(), None, size
    state = {k: v.detach().float() for k, v in model.state_dict().items()}
    src = ModelSource(path=checkpoint or Path(f"<random {label}>"), config=model.cfg, tensors=state, tokenizer=tok,
                      name=label, kind="checkpoint")
    return label, model.float(), src


def llama_decode(llm, prompt: list[int], n: int) -> tuple[float, list[int]]:
    """tok/s of n greedy steps after the prompt (prefill untimed), and the tokens."""
    import llama_cpp

    vocab = llm.n_vocab()

    def argmax() -> int:  # the last token's logits, read in place (llama.cpp keeps only those)
        return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))))

    llm.reset()
    llm.eval(prompt)
    out = [argmax()]
    t = time.perf_counter()
    for _ in range(n - 1):
        llm.eval([out[-1]])
        out.append(argmax())
    return (n - 1) / (time.perf_counter() - t), out


def smedjan_decode(engine: Engine, prompt: list[int], n: int) -> tuple[float, list[int]]:
    engine.forget_prefixes()  # a full prefill every round, like llama.reset()
    it = engine.stream(prompt, SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True))
    out = next(it).token_ids
    t = time.perf_counter()
    for d in it:
        out += d.token_ids
    return (n - 1) / (time.perf_counter() - t), out


def agreement(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["small", "medium"], help="presets (random weights)")
    ap.add_argument("--checkpoint", type=Path, help="benchmark this checkpoint instead of random presets")
    ap.add_argument("--vocab", type=int, default=8192, help="vocabulary of the random presets")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5, help="alternating repetitions per engine (median reported)")
    ap.add_argument("--threads", type=int, default=2, help="threads for both engines")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from llama_cpp import Llama

    from smedjan.export import export_gguf

    torch.set_num_threads(args.threads)
    context = args.prompt_tokens + args.new_tokens + 8
    jobs = [(None, args.checkpoint)] if args.checkpoint else [(s, None) for s in args.sizes]
    rows = []
    with tempfile.TemporaryDirectory(prefix="smedjan-bench-") as tmp:
        for size, ckpt in jobs:
            label, model, src = build(size, ckpt, args.vocab, context, args.seed)
            gguf = Path(tmp) / f"{label}-f32.gguf"
            export_gguf(src, gguf, quant="f32", no_vocab=src.tokenizer is None)
            gen = torch.Generator().manual_seed(args.seed)
            prompt = torch.randint(0, model.cfg.vocab_size, (args.prompt_tokens,), generator=gen).tolist()
            llm = Llama(str(gguf), n_ctx=context, n_batch=max(args.prompt_tokens, 32), n_threads=args.threads,
                        n_threads_batch=args.threads, verbose=False)
            engine = Engine(model, None, max_batch=1, context=context)
            speeds: dict[str, list[float]] = {"llama.cpp": [], "smedjan": []}
            toks = {}
            llama_decode(llm, prompt, 8), smedjan_decode(engine, prompt, 8)  # warm-up
            for r in range(args.rounds):
                order = ["llama.cpp", "smedjan"] if r % 2 == 0 else ["smedjan", "llama.cpp"]
                for who in order:
                    run = llama_decode if who == "llama.cpp" else smedjan_decode
                    speed, toks[who] = run(llm if who == "llama.cpp" else engine, prompt, args.new_tokens)
                    speeds[who].append(speed)
            med = {k: statistics.median(v) for k, v in speeds.items()}
            rows.append((label, model.cfg.n_params(), med["smedjan"], med["llama.cpp"],
                         med["smedjan"] / med["llama.cpp"], agreement(toks["smedjan"], toks["llama.cpp"]),
                         speeds))
            print(f"{label}: smedjan {[round(s) for s in speeds['smedjan']]} tok/s, "
                  f"llama.cpp {[round(s) for s in speeds['llama.cpp']]} tok/s", file=sys.stderr, flush=True)
            del llm, engine, model
    print("| model | params | smedjan decode | llama.cpp f32 decode | smedjan / llama.cpp | greedy tokens agree |")
    print("|---|---|---|---|---|---|")
    for label, n, s, l, ratio, agree, _ in rows:
        print(f"| {label} | {n / 1e6:.1f}M | {s:,.0f} tok/s | {l:,.0f} tok/s | {ratio:.2f}x | "
              f"{agree}/{args.new_tokens} |")
    print(f"\nbatch 1, KV cache, {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens (greedy, end tokens "
          f"ignored), {args.threads} thread(s) each, median of {args.rounds} alternating rounds; "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
