"""Self-speculative decoding against plain greedy decoding, same checkpoint, same prompts:
decode tokens/s (batch 1, prefill excluded, best of --repeats) of plain greedy through the
model's path (`Engine(path="model")`, what speculation runs on), plain greedy through the
default path (the fast C-kernel runner where the model allows it), and `--speculative`
(smedjan.infer.speculative); checks that all three give the same tokens, and reports the
drafts' acceptance rate and tokens per verifying forward.

    python bench/speculative.py --checkpoint runs/mtp/final.bin            # a model trained with --n-predict N
    python bench/speculative.py --checkpoint final.bin --new-tokens 200 --json
"""

from __future__ import annotations

import argparse
import json
import time

PROMPTS = ["ROMEO:", "First Citizen:\nBefore we proceed any further, hear me speak.", "KING HENRY:\nNow",
           "Thou art", "JULIET:\nO Romeo, Romeo!"]


def decode_rate(engine, prompts: list[list[int]], new_tokens: int, repeats: int) -> tuple[float, list[list[int]]]:
    """(best decode tok/s over `repeats` passes over the prompts, the tokens of the last pass)."""
    from smedjan.infer import SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
    best, outs = 0.0, []
    for _ in range(repeats):
        n, secs, outs = 0, 0.0, []
        for p in prompts:
            engine.forget_prefixes()
            it = engine.stream(p, params)
            toks = next(it).token_ids  # prefill and the first token
            t0 = time.perf_counter()
            for d in it:
                toks += d.token_ids
            secs += time.perf_counter() - t0
            n += len(toks) - 1
            outs.append(toks)
        best = max(best, n / secs)
    return best, outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--new-tokens", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    import torch

    from smedjan.infer import Engine
    from smedjan.infer.speculative import SpeculativeEngine
    from smedjan.model import load_model

    if a.threads:
        torch.set_num_threads(a.threads)
    model, tok, _ = load_model(a.checkpoint)
    prompts = [[tok.bos_id] + tok.encode(p) for p in PROMPTS]
    context = min(model.cfg.max_seq_len, max(map(len, prompts)) + a.new_tokens + 1)
    spec = SpeculativeEngine(model, tok, context=context)
    rows = {}
    for name, engine in (("greedy (model path)", Engine(model, tok, context=context, path="model")),
                         ("greedy (default path)", Engine(model, tok, context=context)), ("speculative", spec)):
        rows[name] = decode_rate(engine, prompts, a.new_tokens, a.repeats)
    outs = [o for _, o in rows.values()]
    same = all(o == outs[0] for o in outs)
    decoded = sum(len(o) - 1 for o in outs[0]) * a.repeats  # tokens after the prefill's, every repeat
    # each verifying forward emits its accepted drafts and one token of its own
    result = {"checkpoint": a.checkpoint, "n_predict": model.cfg.mtp.n_predict, "threads": torch.get_num_threads(),
              "new_tokens": a.new_tokens, "prompts": len(prompts), "same_tokens": same,
              "tok_s": {k: round(v, 1) for k, (v, _) in rows.items()},
              "acceptance": round(spec.accepted / max(1, spec.proposed), 3),
              "tokens_per_forward": round(decoded / max(1, decoded - spec.accepted), 3)}
    if a.json:
        print(json.dumps(result))
        return
    base = rows["greedy (model path)"][0]
    print("| decoding | tok/s | vs greedy (model path) |\n|---|---|---|")
    for k, (v, _) in rows.items():
        print(f"| {k} | {v:,.0f} | {v / base:.2f}x |")
    print(f"\n{a.checkpoint}: n_predict {result['n_predict']}, {len(prompts)} prompts x {a.new_tokens} new tokens "
          f"(greedy, end tokens ignored), best of {a.repeats}, threads {result['threads']}; same tokens: {same}; "
          f"drafts accepted {100 * result['acceptance']:.1f}%, {result['tokens_per_forward']:.2f} tokens per "
          "verifying forward")
    if not same:
        raise SystemExit("speculative decoding gave other tokens than greedy decoding")


if __name__ == "__main__":
    main()
