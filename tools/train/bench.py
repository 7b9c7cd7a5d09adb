"""`smedjan bench`: forward, decode and training tokens/s of a preset, as in the performance table.

    smedjan bench --size small
    smedjan bench --size medium --compile --rounds 5
    smedjan bench --size tiny --variant all           # a row per architecture variant too
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from smedjan.cli import JsonOpt, log, make_app, progress, run_app, tool

app = make_app()

# name -> flat ModelConfig keywords (a function of the preset's config and the sequence length)
VARIANTS = {
    "qk-norm": lambda cfg, T: {"qk_norm": True},
    "softcap": lambda cfg, T: {"logit_softcap": 15.0},
    "relu2": lambda cfg, T: {"mlp": "relu2"},
    "window-SSSL": lambda cfg, T: {"window_pattern": "SSSL", "short_window": max(1, T // 4)},
    "mla": lambda cfg, T: {"mla_latent_dim": cfg.dim // 2},
    "block-sparse": lambda cfg, T: {"block_sparse_top_k": 2, "block_size": max(1, T // 8)},
    # the O(N) mixers (bench/mixers.py times them against attention across sequence lengths)
    "ssm": lambda cfg, T: {"mixer": "ssm"},
    "linear-attn": lambda cfg, T: {"mixer": "linear_attn"},
    "rwkv": lambda cfg, T: {"mixer": "rwkv", "mlp": "rwkv"},
    "hybrid": lambda cfg, T: {"layer_pattern": "ssm*3,attention"},
    # Mixture-of-Experts, 8 experts top-2, against the dense model of equal active parameters
    # (one SwiGLU as wide as the two experts a token runs; the router's E x dim aside)
    "moe-8x2": lambda cfg, T: {"n_experts": 8, "top_k_experts": 2},
    "moe-dense-equal": lambda cfg, T: {"ffn_hidden": 2 * cfg.ffn.hidden},
    "shared-layers": lambda cfg, T: {"shared_layers": 2},
    # µP at 4x its base width (smedjan.model.mup): the readout multiplier and attention scale
    "mup": lambda cfg, T: {"mup_base": max(1, cfg.dim // 4)},
    # multi-token prediction: one DeepSeek-V3 MTP module, trained with its loss (decode: plain greedy)
    "mtp": lambda cfg, T: {"n_predict": 2},
    # BitNet b1.58: ternary weights, 8-bit activations (quantised in PyTorch, so slower than fp32
    # here: the row measures the cost of the fake-quantised training forward, not 1.58-bit kernels)
    "bitnet": lambda cfg, T: {"bitnet": True},
}
# EMA, the regularisers, the curriculum: rows of the same model trained with one training
# option (smedjan.training.bench.SmedjanRunner's `options`); the forward and decode columns
# are the plain model's (they act in training only).
TRAINING_VARIANTS = {
    "ema": {"ema_decay": 0.999},
    "dropout": {"dropout": 0.1},
    "stochastic-depth": {"stochastic_depth": 0.1},
    "noise": {"noise_scale": 1e-6},
    "freeze": {"freeze_fraction": 0.5},
    "curriculum": {"curriculum": -1},  # -1: a warmup spanning the whole measurement (tok/s: its average)
    "relora": {"lowrank": 32, "relora_interval": 10},  # rank 32 adapters on every hidden matrix, merged every 10 steps
}


def format_table(rows: list[dict], cuda: bool) -> str:
    """Markdown rows like the README / overview performance table."""
    head = ["Preset", "Inference (fwd)", "Decode (1 tok)", "Train (fwd+bwd+step)"] + (["MFU (train)"] if cuda else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        active = f" ({r['active_params'] / 1e6:.3g}M active)" if r.get("active_params", r["params"]) != r["params"] else ""
        cells = [f"{r['size']}{' ' + r['variant'] if r.get('variant') else ''} · {r['params'] / 1e6:.3g}M{active}", f"{r['forward_tok_s']:,.0f} tok/s",
                 f"{r['decode_tok_s']:,.0f} tok/s", f"{r['train_tok_s']:,.0f} tok/s"]
        if cuda:
            cells.append(f"{100 * r['mfu']:.1f}%")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@app.command(help=(
    "Measure forward (logits, no grad), decode (batch 1 with the KV cache, 16-token prompt + 128 new tokens, "
    "as `smedjan generate` runs; best of --rounds) and train (forward + backward + AdamW step, through the same "
    "Trainer step `smedjan train` runs) tokens/s of a preset at --batch-size x --seq-len (default 4 x 128, "
    "vocab 8192, random tokens). Reports the median of --rounds measurements of --steps steps each. "
    "--variant NAME (repeatable, or all) adds a row per architecture variant of each preset: "
    + ", ".join(VARIANTS) + "; --variant NAME also takes a training option row: " + ", ".join(TRAINING_VARIANTS)
    + ". bench/train.py compares the same shapes against a plain PyTorch training loop "
    "and transformers' LlamaForCausalLM."
))
@tool("bench")
def bench(
    size: Annotated[list[str], typer.Option("--size", help="Preset(s) to measure (repeatable).")] = ["small"],  # noqa: B006
    batch_size: Annotated[int, typer.Option("--batch-size", help="Sequences per step.")] = 4,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per sequence.")] = 128,
    vocab_size: Annotated[int, typer.Option("--vocab-size", help="Vocabulary of the benchmarked model.")] = 8192,
    steps: Annotated[int, typer.Option("--steps", help="Steps per measurement.")] = 10,
    rounds: Annotated[int, typer.Option("--rounds", help="Measurements per number (the median is reported).")] = 3,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the model first.")] = False,
    precision: Annotated[str, typer.Option(
        "--precision", help="auto (bf16 autocast on CUDA, fp32 elsewhere), fp32 or bf16 (autocast, CPU too).")] = "auto",
    device: Annotated[Optional[str], typer.Option("--device", help="cpu, cuda, mps (default: cuda > mps > cpu).")] = None,
    peak_flops: Annotated[float, typer.Option("--peak-flops", help="Peak FLOP/s for MFU on GPU (H100 bf16).")] = 989e12,
    variant: Annotated[list[str], typer.Option("--variant", help="Architecture variant rows: " + ", ".join(VARIANTS)
                                               + "; training option rows: " + ", ".join(TRAINING_VARIANTS)
                                               + "; or all (repeatable; default: none).")] = [],  # noqa: B006
    json: JsonOpt = False,
) -> None:
    import json as _json

    import torch

    from smedjan.device import pick_device
    from smedjan.errors import UserError
    from smedjan.infer import decode_tokens_per_second
    from smedjan.model import PRESETS, ModelConfig
    from smedjan.model.moe import active_params
    from smedjan.training.bench import SmedjanRunner, interleave, median
    from smedjan.training.driver import precision_policy

    for s in size:
        if s not in PRESETS:
            raise UserError(f"--size {s!r} is not a preset ({', '.join(PRESETS)})")
    if min(batch_size, seq_len, steps, rounds) < 1:
        raise UserError("--batch-size, --seq-len, --steps and --rounds must be >= 1")
    names = [*VARIANTS, *TRAINING_VARIANTS] if "all" in variant else variant
    unknown = [v for v in names if v not in VARIANTS and v not in TRAINING_VARIANTS]
    if unknown:
        raise UserError(f"--variant {unknown[0]!r} is not one of {', '.join([*VARIANTS, *TRAINING_VARIANTS])} or all")
    dev = pick_device(device)
    amp = precision_policy(precision, dev)
    if dev.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32
    rows = []
    runs = []
    for s in size:
        base = ModelConfig.from_preset(s, vocab_size, max_seq_len=seq_len)
        runs.append((s, None, base))
        runs += [(s, v, base.replace(**VARIANTS[v](base, seq_len)) if v in VARIANTS else base) for v in names]
    for s, v, cfg in runs:
        label = s + (f" {v}" if v else "")
        log(f"{label}: {cfg.n_params():,} parameters, batch {batch_size} x {seq_len} on {dev}"
            f"{' (bf16 autocast)' if amp else ''}{', compiled' if compile else ''}; threads {torch.get_num_threads()}")
        options = dict(TRAINING_VARIANTS.get(v, {}))
        if options.get("curriculum") == -1:
            options["curriculum"] = (steps + 2) * rounds  # interleave's 2 warm-up steps, then the rounds
        runner = SmedjanRunner(cfg, batch_size, seq_len, dev, compile=compile, amp_dtype=amp, options=options)
        with progress(f"bench {label}", total=rounds) as bar:
            res = interleave({s: runner}, rounds=rounds, steps=steps, on_round=lambda r: bar.update(completed=r))
        fwd, tr = median(res[s]["forward"]), median(res[s]["train"])
        # decode: batch 1 with the KV cache, as `smedjan generate` runs (smedjan.infer; bench/decode.py
        # compares it with llama.cpp)
        decode = decode_tokens_per_second(runner.model, prompt_len=16, new_tokens=128, repeats=rounds, dtype=amp)
        rows.append({"size": s, "variant": v, "params": cfg.n_params(), "active_params": active_params(cfg),
                     "batch_size": batch_size, "seq_len": seq_len,
                     "device": str(dev), "compiled": compile, "precision": "bf16" if amp else "fp32",
                     "forward_tok_s": fwd, "train_tok_s": tr,
                     "decode_tok_s": decode,
                     "mfu": tr * cfg.flops_per_token(seq_len) / peak_flops if dev.type == "cuda" else None,
                     "train_rounds": res[s]["train"], "forward_rounds": res[s]["forward"]})
        del runner
    if json:
        print(_json.dumps({"rows": rows}), flush=True)
    else:
        print(format_table(rows, dev.type == "cuda"))
        print(f"\nbatch {batch_size}, sequence length {seq_len}, vocab {vocab_size}, {dev}, "
              f"{'bf16 autocast' if amp else 'fp32'}{', compiled' if compile else ''}, threads "
              f"{torch.get_num_threads()}; median of {rounds} rounds of {steps} steps; decode: batch 1, "
              f"KV cache, 16-token prompt + 128 new tokens, best of {rounds}")


def main() -> None:
    run_app(app, "smedjan-bench")


if __name__ == "__main__":
    main()
