"""`smedjan sizes`: exact parameter counts and training FLOPs per token of every preset.

    smedjan sizes --vocab-size 8192
    smedjan sizes --vocab-size 8192 --dim 1024 --layers 16 --heads 16 --ffn-mult 4 --kv-heads 4   # adds a custom row
    smedjan sizes --depth 4 --depth 12 --depth 20                  # nanochat's dial: dim = depth x 64, heads of 128
    smedjan sizes --gpus 8 --optimizer adamw --batch-size 8        # + memory per GPU under DDP and FSDP
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from smedjan.cli import JsonOpt, make_app, run_app, tool

app = make_app()


def _human(n: float) -> str:
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.3g}{suffix}"
    return str(int(n))


@app.command(help=(
    "Print, for every preset (and a custom shape when --dim/--layers/--heads are given, and a row per --depth): "
    "width, depth, heads, feed-forward hidden size, exact parameter count (the tied embedding counted once), "
    "non-embedding parameters, and training FLOPs per token at --seq-len, as the model's parts count them (6 x "
    "matmul parameters including the output head, plus attention 12 x heads x head-dim x seq-len per layer; "
    "forward + backward). --depth D is nanochat's dial: D layers, dim = D x --aspect-ratio rounded up to a "
    "multiple of --head-dim, heads = dim / head-dim. --gpus N adds, per row, the training memory per GPU under "
    "DDP and under FSDP (--fsdp): fp32 weights, fp32 gradients, --optimizer state (replicated by DDP, 1/N each "
    "under FSDP) and an activation estimate for --batch-size sequences of --seq-len at --precision "
    "(smedjan.training.memory)."
))
@tool("sizes")
def sizes(
    vocab_size: Annotated[int, typer.Option("--vocab-size", help="Vocabulary size the counts are for.")] = 8192,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Sequence length for the attention FLOPs.")] = 256,
    dim: Annotated[Optional[int], typer.Option("--dim", help="Custom row: model width.")] = None,
    layers: Annotated[Optional[int], typer.Option("--layers", help="Custom row: blocks.")] = None,
    heads: Annotated[Optional[int], typer.Option("--heads", help="Custom row: attention heads.")] = None,
    ffn_mult: Annotated[float, typer.Option("--ffn-mult", help="Custom row: SwiGLU hidden / dim.")] = 8 / 3,
    kv_heads: Annotated[int, typer.Option("--kv-heads", help="Custom row: key/value heads (0 = heads).")] = 0,
    depth: Annotated[Optional[list[int]], typer.Option(
        "--depth", help="A row for nanochat's depth dial at this depth (repeat for a series).")] = None,
    aspect_ratio: Annotated[int, typer.Option("--aspect-ratio", help="--depth rows: dim / depth.")] = 64,
    head_dim: Annotated[int, typer.Option("--head-dim", help="--depth rows: width of an attention head.")] = 128,
    gpus: Annotated[Optional[int], typer.Option("--gpus", help="Add memory per GPU over N GPUs (DDP, FSDP).")] = None,
    optimizer: Annotated[str, typer.Option("--optimizer", help="--gpus: the optimizer whose state counts.")] = "adamw",
    precision: Annotated[str, typer.Option("--precision", help="--gpus: bf16 or fp32 activations.")] = "bf16",
    batch_size: Annotated[int, typer.Option("--batch-size", help="--gpus: sequences per GPU per micro-batch.")] = 8,
    json: JsonOpt = False,
) -> None:
    import json as _json

    from smedjan.errors import UserError
    from smedjan.model import PRESETS, ModelConfig

    if vocab_size < 1 or seq_len < 1:
        raise UserError("--vocab-size and --seq-len must be positive")
    cfgs = [] if depth else [ModelConfig.from_preset(name, vocab_size) for name in PRESETS]
    cfgs += [ModelConfig.from_depth(vocab_size, d, aspect_ratio=aspect_ratio, head_dim=head_dim) for d in depth or []]
    custom = [v is not None for v in (dim, layers, heads)]
    if any(custom):
        if not all(custom):
            raise UserError("a custom row needs --dim, --layers and --heads")
        cfgs.append(ModelConfig.custom(vocab_size, dim=dim, n_layers=layers, n_heads=heads, ffn_mult=ffn_mult,
                                       n_kv_heads=kv_heads))
    rows = [{"size": c.preset, "dim": c.dim, "layers": c.n_layers, "heads": c.attention.n_heads,
             "kv_heads": c.attention.n_kv_heads, "head_dim": c.attention.head_dim, "ffn_hidden": c.ffn.hidden,
             "params": c.n_params(), "non_embedding_params": c.n_params(embedding=False),
             "train_flops_per_token": c.flops_per_token(seq_len)} for c in cfgs]
    if gpus is not None:
        from smedjan.training.memory import training_memory

        for r, c in zip(rows, cfgs):
            r["memory"] = training_memory(c, gpus=gpus, optimizer=optimizer, precision=precision,
                                          batch=batch_size, seq_len=seq_len)
    if json:
        print(_json.dumps({"vocab_size": vocab_size, "seq_len": seq_len, "sizes": rows}), flush=True)
        return
    head = ["size", "dim", "layers", "heads", "kv", "head dim", "ffn", "params", "non-embedding", "FLOPs/token"]
    table = [[r["size"], r["dim"], r["layers"], r["heads"], r["kv_heads"], r["head_dim"], r["ffn_hidden"],
              f"{r['params']:,} ({_human(r['params'])})", f"{r['non_embedding_params']:,}",
              f"{r['train_flops_per_token']:.4g}"] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *table)]
    print(f"vocab {vocab_size}, FLOPs at seq-len {seq_len} (forward + backward)")
    for line in [head, *table]:
        print("  ".join(str(x).rjust(w) if i else str(x).ljust(w) for i, (x, w) in enumerate(zip(line, widths))))
    if gpus is not None:
        _print_memory(rows, gpus, optimizer, precision, batch_size, seq_len)


def _print_memory(rows: list[dict], gpus: int, optimizer: str, precision: str, batch: int, seq_len: int) -> None:
    gib = (lambda b: f"{b / 2**30:.2f}")
    parts = ("weights", "grads", "optimizer", "activations", "total")
    head = ["size", *[f"{m} {p}" for m in ("DDP", "FSDP") for p in parts]]
    table = [[r["size"], *[gib(r["memory"][m][p]) for m in ("ddp", "fsdp") for p in parts]] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *table)]
    print(f"\nGiB per GPU over {gpus} GPU(s): {optimizer}, {precision} activations of {batch} x {seq_len} tokens")
    for line in [head, *table]:
        print("  ".join(str(x).rjust(w) if i else str(x).ljust(w) for i, (x, w) in enumerate(zip(line, widths))))


def main() -> None:
    run_app(app, "smedjan-sizes")


if __name__ == "__main__":
    main()
