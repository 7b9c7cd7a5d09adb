"""`smedjan train`: pretrain a model on a token file (train.bin) from `smedjan prepare`.

    smedjan train --dataset train.bin --tokenizer tokenizer.bin --size medium \\
        --batch-size 4 --seq-len 512 --steps 50000 --lr 3e-4 --warmup 2000 \\
        --lr-schedule cosine --checkpoint-dir checkpoints/ --val-dataset val.bin
    torchrun --standalone --nproc-per-node 8 -m smedjan_tools.cli train ...   # DDP
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from smedjan.cli import JsonOpt, emit, make_app, run_app, tool

app = make_app()

_HELP = (
    "Pretrain a decoder-only transformer on a token file. Writes state_N.bin every --checkpoint-every steps "
    "(model, optimizer, RNG and data position: --resume continues bit for bit), final.bin (weights + config + "
    "tokenizer) at the end, best.bin at each validation improvement, and metrics.jsonl, all in --checkpoint-dir. "
    "Horizon: --steps, else --target-flops, else --target-param-data-ratio, else 50000 steps. "
    "Schedules (after a linear --warmup): cosine decays to --min-lr; wsd holds --lr then cools down over the "
    "last --warmdown fraction with 1-sqrt; trapezoid the same with a linear cooldown; wso holds --lr, no decay; "
    "invsqrt decays as sqrt(warmup/step) down to --min-lr. A step with a non-finite loss or gradient is skipped "
    "and counted; --max-bad-steps in a row stop the run (exit 2) with the last state intact. SIGTERM or Ctrl-C "
    "finish the step, write a state and exit (0 for SIGTERM, 130 for Ctrl-C). Under `torchrun --nproc-per-node N` "
    "it runs DDP (NCCL on GPU, gloo on CPU): --batch-size is per process, data is sharded by rank, rank 0 writes."
)


@app.command(help=_HELP)
@tool("train")
def train(
    dataset: Annotated[Path, typer.Option("--dataset", help="Token file to train on (train.bin from `smedjan prepare`).")],
    tokenizer: Annotated[Path, typer.Option("--tokenizer", "-t", help="tokenizer.bin the dataset was made with.")],
    val_dataset: Annotated[Optional[Path], typer.Option(
        "--val-dataset", help="Held-out token file: val loss and bits-per-byte at every --eval-every steps.")] = None,
    size: Annotated[Optional[str], typer.Option(
        "--size", help="tiny, small, medium, large, max or custom. Default: small for a new model; with --init or "
        "--resume the checkpoint's config is used unless --size is given (then the flags must match it).")] = None,
    dim: Annotated[Optional[int], typer.Option("--dim", help="Model width (--size custom).")] = None,
    layers: Annotated[Optional[int], typer.Option("--layers", help="Number of blocks (--size custom).")] = None,
    heads: Annotated[Optional[int], typer.Option("--heads", help="Attention heads (--size custom).")] = None,
    ffn_mult: Annotated[Optional[float], typer.Option(
        "--ffn-mult", help="SwiGLU hidden = ffn-mult x dim, rounded up to 256 (--size custom; default 8/3).")] = None,
    kv_heads: Annotated[Optional[int], typer.Option(
        "--kv-heads", help="Key/value heads: fewer than --heads is grouped-query attention (default: = heads).")] = None,
    sliding_window: Annotated[Optional[int], typer.Option(
        "--sliding-window", help="Attend only the last N tokens (default 0: full causal attention).")] = None,
    rope_theta: Annotated[Optional[float], typer.Option("--rope-theta", help="RoPE base (default 10000).")] = None,
    untied: Annotated[Optional[bool], typer.Option(
        "--untied/--tied", help="Separate output head instead of the tied embedding (default: tied).")] = None,
    max_seq_len: Annotated[Optional[int], typer.Option(
        "--max-seq-len", help="Model context (RoPE tables). Default: --seq-len, or the checkpoint's.")] = None,
    yarn_scale: Annotated[float, typer.Option(
        "--yarn-scale", help="Extend the context this many times with YaRN RoPE scaling (1 = off).")] = 1.0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Sequences per step per process.")] = 32,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per sequence.")] = 256,
    grad_accum: Annotated[int, typer.Option(
        "--grad-accum", help="Micro-batches per step; effective batch = batch-size x grad-accum x processes.")] = 1,
    steps: Annotated[Optional[int], typer.Option(
        "--steps", help="Optimizer steps. Default 50000 unless --target-flops or --target-param-data-ratio.")] = None,
    target_flops: Annotated[Optional[float], typer.Option(
        "--target-flops", help="Train for this many FLOPs (6N + attention per token); sets the steps.")] = None,
    target_param_data_ratio: Annotated[Optional[float], typer.Option(
        "--target-param-data-ratio", help="Train on ratio x parameters tokens (Chinchilla: 20); sets the steps.")] = None,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate.")] = 3e-4,
    min_lr: Annotated[Optional[float], typer.Option(
        "--min-lr", help="Floor of the decay (cosine, wsd, trapezoid, invsqrt). Default: --lr / 10.")] = None,
    warmup: Annotated[int, typer.Option("--warmup", help="Steps of linear LR warmup.")] = 2000,
    warmdown: Annotated[float, typer.Option(
        "--warmdown", help="wsd / trapezoid: fraction of the steps spent cooling down.")] = 0.2,
    lr_schedule: Annotated[str, typer.Option(
        "--lr-schedule", help="cosine, wsd, wso, invsqrt or trapezoid.")] = "cosine",
    optimizer: Annotated[str, typer.Option("--optimizer", help="Optimizer (adamw).")] = "adamw",
    adamw_beta2: Annotated[float, typer.Option(
        "--adamw-beta2", help="AdamW second-moment decay (beta1 0.9, eps 1e-5).")] = 0.95,
    weight_decay: Annotated[float, typer.Option(
        "--weight-decay", help="Decoupled weight decay of the hidden matrices (not embeddings, head, norms).")] = 0.1,
    grad_clip: Annotated[float, typer.Option("--grad-clip", help="Clip the gradient norm to this (0: off).")] = 1.0,
    max_bad_steps: Annotated[int, typer.Option(
        "--max-bad-steps", help="Non-finite (skipped) steps in a row that stop the run.")] = 8,
    checkpoint_dir: Annotated[Path, typer.Option(
        "--checkpoint-dir", help="Folder for states, final.bin, metrics.")] = Path("checkpoints"),
    checkpoint_every: Annotated[int, typer.Option(
        "--checkpoint-every", help="Write state_N.bin every N steps (0: only at the end).")] = 1000,
    keep: Annotated[int, typer.Option("--keep", help="Newest state_N.bin files kept (0: all).")] = 3,
    resume: Annotated[Optional[Path], typer.Option(
        "--resume", help="Continue from this state_N.bin exactly (same flags give the same losses).")] = None,
    init: Annotated[Optional[Path], typer.Option(
        "--init", help="Start from this checkpoint's weights (final.bin or a state) with a fresh optimizer at "
        "step 0. Its config is used unless --size is given, which must then describe the same model.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the initialisation and the data order.")] = 0,
    bos_aligned: Annotated[bool, typer.Option(
        "--bos-aligned", help="Start every sequence at a document's BOS (default: random windows).")] = False,
    stream: Annotated[bool, typer.Option(
        "--stream", help="Read the dataset in order, window after window, instead of random windows.")] = False,
    val_tokens: Annotated[int, typer.Option(
        "--val-tokens", help="Validation target tokens per evaluation (from the start of --val-dataset).")] = 262_144,
    eval_every: Annotated[Optional[int], typer.Option(
        "--eval-every", help="Evaluate every N steps (default: --checkpoint-every).")] = None,
    patience: Annotated[int, typer.Option(
        "--patience", help="Stop after this many evaluations without a lower val loss (0: never).")] = 0,
    sample_every: Annotated[int, typer.Option(
        "--sample-every", help="Print a short sample every N steps (0: never).")] = 0,
    device: Annotated[Optional[str], typer.Option(
        "--device", help="cpu, cuda, cuda:N or mps (default: cuda > mps > cpu).")] = None,
    precision: Annotated[str, typer.Option(
        "--precision", help="auto (bf16 autocast on CUDA, fp32 elsewhere), fp32 or bf16.")] = "auto",
    compile: Annotated[bool, typer.Option(
        "--compile", help="torch.compile the model (needs a C++ compiler on CPU).")] = False,
    peak_flops: Annotated[float, typer.Option(
        "--peak-flops", help="Peak FLOP/s of one GPU for MFU (H100 bf16 dense).")] = 989e12,
    run: Annotated[Optional[str], typer.Option(
        "--run", help="Weights & Biases run name (needs wandb); unset or 'dummy' disables it.")] = None,
    json: JsonOpt = False,
) -> None:
    from smedjan.errors import UserError
    from smedjan.training.pretrain import TrainArgs, fault_steps_from_env, run as run_training

    args = TrainArgs(
        dataset=str(dataset), tokenizer=str(tokenizer), val_dataset=str(val_dataset) if val_dataset else None,
        size=size, dim=dim, layers=layers, heads=heads, ffn_mult=ffn_mult, kv_heads=kv_heads,
        sliding_window=sliding_window, rope_theta=rope_theta, untied=untied, max_seq_len=max_seq_len,
        yarn_scale=yarn_scale, batch_size=batch_size, seq_len=seq_len, grad_accum=grad_accum, steps=steps,
        target_flops=target_flops, target_param_data_ratio=target_param_data_ratio, lr=lr, min_lr=min_lr,
        warmup=warmup, warmdown=warmdown, lr_schedule=lr_schedule, optimizer=optimizer, adamw_beta2=adamw_beta2,
        weight_decay=weight_decay, grad_clip=grad_clip, max_bad_steps=max_bad_steps,
        checkpoint_dir=str(checkpoint_dir), checkpoint_every=checkpoint_every, keep=keep,
        resume=str(resume) if resume else None, init=str(init) if init else None, seed=seed,
        bos_aligned=bos_aligned, stream=stream, val_tokens=val_tokens, eval_every=eval_every, patience=patience,
        sample_every=sample_every, device=device, precision=precision, compile=compile, peak_flops=peak_flops,
        run=run)
    summary, result = run_training(args, fault_steps=fault_steps_from_env())
    if result.reason == "diverged":
        raise UserError(f"{dataset}: {result.message}")
    if summary.pop("rank") == 0:
        emit(summary, json)
    if result.reason == "interrupted":
        raise typer.Exit(130)


def main() -> None:
    run_app(app, "smedjan-train")


if __name__ == "__main__":
    main()
