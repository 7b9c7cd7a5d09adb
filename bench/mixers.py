"""Training and decoding speed of attention and each O(N) mixer, in one run, at one width.

Each model is one block (`--layers`, default 1) of the given width with no feed-forward
(`--mlp none`), so the mixer is what is measured; vocabulary 256. Training: batch 1 at
sequence 512, 2048 and 8192, forward + backward + AdamW step, tokens/s (best of
`--rounds` timed steps after one warm-up) and peak memory: the growth of the process's
peak RSS over the steps, each (mixer, length) in its own fresh subprocess so peaks do not
mix. Decoding: the model's own forward with its decode state (`ModelRunner`), batch 1,
tokens/s over `--decode-steps` greedy steps after a context of 256 and of 4096 tokens
(prefill untimed). Rounds alternate between the mixers, so drifting machine load hits
all alike. One thread by default: on shared cores a second thread makes every small op of
the chunk loops wait on a busy sibling, which measures the neighbours, not the mixer.

    python bench/mixers.py                           # dim 256, 4 heads, 1 thread
    python bench/mixers.py --lengths 512 2048 --threads 2 --mixers attention ssm

Prints two markdown tables.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "lib"))

import torch  # noqa: E402

from smedjan.model import ModelConfig, Transformer  # noqa: E402

MIXERS = {"attention": {}, "ssm": {"mixer": "ssm"}, "linear_attn": {"mixer": "linear_attn"},
          "rwkv": {"mixer": "rwkv"}}
VOCAB = 256


def model_for(mixer: str, dim: int, heads: int, layers: int, context: int) -> Transformer:
    cfg = ModelConfig.make(VOCAB, dim=dim, n_layers=layers, n_heads=heads, max_seq_len=context, mlp="none",
                           **MIXERS[mixer])
    torch.manual_seed(0)
    return Transformer(cfg)


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def train_one(a) -> dict:
    """In a fresh process: tokens/s and peak-RSS growth of training steps at one length."""
    torch.set_num_threads(a.threads)
    model = model_for(a.mixer, a.dim, a.heads, a.layers, a.length)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, VOCAB, (1, a.length), generator=torch.Generator().manual_seed(0))
    base = rss_mib()
    best = float("inf")
    for i in range(a.rounds + 1):
        t = time.perf_counter()
        model(x, x).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:  # the first step allocates the optimizer state and warms the allocator
            best = min(best, time.perf_counter() - t)
    return {"tok_s": a.length / best, "peak_mib": rss_mib() - base}


def decode_speeds(models: dict, contexts: list[int], steps: int, rounds: int) -> dict:
    """{(mixer, context): tok/s}, the best of `rounds`, rounds alternating between mixers."""
    from smedjan.infer.runner import ModelRunner

    best: dict = {}
    for _ in range(rounds):
        for name, model in models.items():
            runner = ModelRunner(model.eval())
            for n in contexts:
                cache = runner.new_cache(1, n + steps + 1)
                prompt = torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(1)).tolist()
                with torch.inference_mode():
                    logits = runner.prefill(cache, 0, [prompt])
                    t = time.perf_counter()
                    for i in range(steps):
                        tok = logits.argmax(-1)
                        logits = runner.decode(cache, tok, [n + i])
                    dt = time.perf_counter() - t
                best[name, n] = max(best.get((name, n), 0.0), steps / dt)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mixers", nargs="+", default=list(MIXERS), choices=list(MIXERS))
    p.add_argument("--lengths", nargs="+", type=int, default=[512, 2048, 8192])
    p.add_argument("--contexts", nargs="+", type=int, default=[256, 4096])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--decode-steps", type=int, default=64)
    p.add_argument("--one", nargs=2, metavar=("MIXER", "LENGTH"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        a.mixer, a.length = a.one[0], int(a.one[1])
        print(json.dumps(train_one(a)))
        return
    torch.set_num_threads(a.threads)
    train: dict = {}
    for length in a.lengths:
        for m in a.mixers:
            cmd = [sys.executable, __file__, "--one", m, str(length), "--dim", str(a.dim), "--heads", str(a.heads),
                   "--layers", str(a.layers), "--threads", str(a.threads), "--rounds", str(a.rounds)]
            train[m, length] = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
            print(f"train {m} {length}: {train[m, length]}", file=sys.stderr, flush=True)
    context = max(a.contexts) + a.decode_steps + 1
    models = {m: model_for(m, a.dim, a.heads, a.layers, context) for m in a.mixers}
    decode = decode_speeds(models, a.contexts, a.decode_steps, a.rounds)

    print(f"\nTraining, one block of width {a.dim} ({a.heads} heads, no feed-forward), batch 1, {a.threads} threads: "
          "tokens/s (x attention's) and peak memory growth\n")
    print("| mixer | " + " | ".join(f"seq {n} tok/s | seq {n} MiB" for n in a.lengths) + " |")
    print("|---|" + "---|---|" * len(a.lengths))
    for m in a.mixers:
        cells = []
        for n in a.lengths:
            r, ref = train[m, n], train.get(("attention", n))
            rel = f" ({r['tok_s'] / ref['tok_s']:.2f}x)" if ref and m != "attention" else ""
            cells += [f"{r['tok_s']:,.0f}{rel}", f"{r['peak_mib']:,.0f}"]
        print(f"| {m} | " + " | ".join(cells) + " |")
    print(f"\nDecoding, batch 1, the model's own forward with its state: tokens/s after a context of "
          f"{' and '.join(map(str, a.contexts))} tokens\n")
    lo, hi = min(a.contexts), max(a.contexts)
    print("| mixer | " + " | ".join(f"context {n}" for n in a.contexts) + f" | {hi} / {lo} |")
    print("|---|" + "---|" * (len(a.contexts) + 1))
    for m in a.mixers:
        print(f"| {m} | " + " | ".join(f"{decode[m, n]:,.0f}" for n in a.contexts)
              + f" | {decode[m, hi] / decode[m, lo]:.2f} |")


if __name__ == "__main__":
    main()
