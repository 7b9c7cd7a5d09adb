"""The flags of the training tools, each defined once (a field becomes the option).

`RunOptions`: what every training tool shares (train, sft, dpo, distill): batch,
horizon, optimizer, schedule, checkpoints, device. `ModelOptions`: the architecture of a
new model (train, and distill's student), built into a `ModelConfig` by
`model_config`. Tools subclass them with their own fields and defaults.

    o = ModelOptions(size="tiny", qk_norm=True, window_pattern="SSSL")
    cfg = model_config(o, vocab_size=8192, max_seq_len=256)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from smedjan.errors import UserError
from smedjan.model.config import PRESETS, ModelConfig
from smedjan.options import option


@dataclass(kw_only=True)
class RunOptions:
    batch_size: int = option(32, "Sequences per step per process.")
    grad_accum: int = option(1, "Micro-batches per step; effective batch = batch-size x grad-accum x processes.")
    steps: int | None = option(None, "Optimizer steps.")
    lr: float = option(3e-4, "Peak learning rate.")
    min_lr: float | None = option(None, "Floor of the decay (cosine, wsd, trapezoid, invsqrt). Default: --lr / 10.")
    warmup: int | None = option(None, "Steps of linear LR warmup. Default: 5% of the steps.")
    warmdown: float = option(0.2, "wsd / trapezoid: fraction of the steps spent cooling down.")
    lr_schedule: str = option("cosine", "cosine, wsd, wso, invsqrt or trapezoid.")
    optimizer: str = option("adamw", "Optimizer (adamw).")
    adamw_beta2: float = option(0.95, "AdamW second-moment decay (beta1 0.9, eps 1e-5).")
    weight_decay: float = option(0.1, "Decoupled weight decay of the hidden matrices (not embeddings, head, norms).")
    grad_clip: float = option(1.0, "Clip the gradient norm to this (0: off).")
    max_bad_steps: int = option(8, "Non-finite (skipped) steps in a row that stop the run.")
    checkpoint_dir: str | None = option(None, "Folder for state_N.bin, best.bin and metrics.jsonl.")
    checkpoint_every: int = option(1000, "Write state_N.bin every N steps (0: only at the end).")
    keep: int = option(3, "Newest state_N.bin files kept (0: all).")
    resume: str | None = option(None, "Continue from this state_N.bin of the same tool (same flags give the same "
                                      "losses).")
    seed: int = option(0, "Seed of the initialisation, the data order and the validation split.")
    eval_every: int | None = option(None, "Evaluate every N steps (default: --checkpoint-every).")
    patience: int = option(0, "Stop after this many evaluations without a lower val loss (0: never).")
    device: str | None = option(None, "cpu, cuda, cuda:N or mps (default: cuda > mps > cpu).")
    precision: str = option("auto", "auto (bf16 autocast and TF32 matmuls on CUDA, fp32 elsewhere), fp32 or bf16.")
    compile: bool = option(False, "torch.compile the model (needs a C++ compiler on CPU).")
    # Memory and speed levers (smedjan.training.levers); out of memory? In order: a smaller
    # --batch-size, --grad-accum, --gradient-checkpointing, --fused-ce, --fp16-activations.
    gradient_checkpointing: bool = option(False, "Keep only each block's input and recompute the rest in the "
                                                 "backward (non-reentrant torch.utils.checkpoint): most of the "
                                                 "activation memory for about a third more compute.")
    checkpoint_layers: int = option(1, "With --gradient-checkpointing: checkpoint every Nth block (blocks 0, N, "
                                       "2N, ...; 1: all).")
    fused_ce: bool = option(False, "Output head and loss a chunk of positions at a time, gradients in the forward: "
                                   "no [tokens, vocab] logits are kept (GBs at a 32k+ vocabulary).")
    fp16_activations: bool = option(False, "Store the float32 activations kept for the backward in fp16 (a "
                                           "power-of-two scale per tensor, so nothing overflows): about half their "
                                           "memory.")
    bf16_matmul: bool = option(False, "Matmuls in bf16 on any device, from fp32 master weights; everything else "
                                      "fp32 (replaces autocast). It has coarser precision and can destabilize an "
                                      "otherwise-healthy run: reach for it last.")
    kernels: str = option("auto", "auto (Triton kernels for RMSNorm, RoPE, SwiGLU and --fused-ce on CUDA without "
                                  "--compile, PyTorch elsewhere), triton or torch.")
    fp8: bool = option(False, "FP8 matmuls (torch._scaled_mm) in the block linears whose widths are multiples of 16 "
                              "and >= 128; a GPU of compute capability 8.9+ (H100, L4, RTX 40). Eval and export "
                              "stay bf16/fp32.")
    fp8_recipe: str = option("tensorwise", "With --fp8: tensorwise (a scale per tensor; e5m2 gradients) or rowwise "
                                           "(a scale per row; more accurate, slower).")


# Flags that may change between a run and its resumption without a warning.
RESUME_FREE = frozenset({"resume", "init", "device", "compile", "run", "sample_every", "peak_flops",
                         "checkpoint_dir", "output", "gradient_checkpointing", "checkpoint_layers"})


@dataclass(kw_only=True)
class ModelOptions:
    size: str | None = option(None, "tiny, small, medium, large, max or custom. Default: small for a new model "
                                    "(unless --depth); with --init or --resume the checkpoint's config is used "
                                    "unless --size or --depth is given (then the flags must describe that model).")
    depth: int | None = option(None, "nanochat's dial: this many layers, dim = depth x --aspect-ratio rounded up to "
                                     "a multiple of --head-dim, heads = dim / head-dim (instead of --size).")
    aspect_ratio: int = option(64, "With --depth: model width per layer.")
    head_dim: int | None = option(None, "Width of an attention head (default: 128 with --depth, dim / heads "
                                        "otherwise).")
    dim: int | None = option(None, "Model width (--size custom).")
    layers: int | None = option(None, "Number of blocks (--size custom).")
    heads: int | None = option(None, "Attention heads (--size custom; default dim / --head-dim).")
    ffn_mult: float | None = option(None, "Feed-forward hidden = ffn-mult x dim, rounded up to 256 (--size custom "
                                          "or --depth; default 8/3 for SwiGLU, 4 for ReLU^2).")
    kv_heads: int | None = option(None, "Key/value heads: fewer than the heads is grouped-query attention "
                                        "(default: = heads).")
    mlp: str | None = option(None, "Feed-forward part: swiglu (default) or relu2 (ReLU squared).")
    qk_norm: bool | None = option(None, "RMS-normalise each query and key head (learned gains) before RoPE.",
                                  flag="--qk-norm/--no-qk-norm")
    logit_softcap: float | None = option(None, "Soft-cap the output logits at C: C tanh(logits / C) (0: off).")
    sliding_window: int | None = option(None, "Attend only the last N tokens in L layers (default 0: the whole "
                                              "causal prefix).")
    window_pattern: str | None = option(None, "Windows per layer as nanochat: a string of S (short window) and L "
                                              "tiled over the layers, the last layer always L (default L).")
    short_window: int | None = option(None, "Window of S layers (default: a quarter of the context rounded up to "
                                            "128, capped at the context).")
    layer_pattern: str | None = option(None, "Mixer per layer: comma-separated part names tiled over the layers, "
                                             "NAME*N repeating one (e.g. 'attention*3,mla').")
    mla_latent_dim: int | None = option(None, "Multi-head latent attention: cache a latent of this width per token "
                                              "(plus a shared RoPE key) instead of keys and values.")
    mla_rope_dim: int | None = option(None, "MLA: width of the decoupled RoPE key (default head-dim / 2).")
    mla_q_latent_dim: int | None = option(None, "MLA: low-rank queries through a latent of this width (default "
                                                "0: full rank).")
    block_sparse_top_k: int | None = option(None, "Block-sparse attention: each query reads its own block plus "
                                                  "the K earlier key blocks with the best pooled score.")
    block_size: int | None = option(None, "Block-sparse attention: positions per block (default 64).")
    rope_theta: float | None = option(None, "RoPE base (default 10000).")
    untied: bool | None = option(None, "Separate output head instead of the tied embedding (default: tied).",
                                 flag="--untied/--tied")
    max_seq_len: int | None = option(None, "Model context (RoPE tables). Default: --seq-len, or the checkpoint's.")
    yarn_scale: float = option(1.0, "Extend the context this many times with YaRN RoPE scaling (1 = off).")


SHAPE_FLAGS = ("dim", "layers", "heads")
# ModelOptions fields that describe the model (all but how it is chosen and extended)
ARCH_FLAGS = tuple(f.name for f in dataclasses.fields(ModelOptions) if f.name not in ("size", "yarn_scale"))
# ModelOptions field -> the flat ModelConfig keyword it sets
_TO_CONFIG = {"kv_heads": "n_kv_heads", "mlp": "mlp", "qk_norm": "qk_norm", "logit_softcap": "logit_softcap",
              "sliding_window": "sliding_window", "window_pattern": "window_pattern", "short_window": "short_window",
              "layer_pattern": "layer_pattern", "mla_latent_dim": "mla_latent_dim", "mla_rope_dim": "mla_rope_dim",
              "mla_q_latent_dim": "mla_q_latent_dim", "block_sparse_top_k": "block_sparse_top_k",
              "block_size": "block_size", "rope_theta": "rope_theta"}


def described_by(o: ModelOptions) -> bool:
    """Whether the flags choose a model (--size or --depth) rather than leave it to a checkpoint."""
    return o.size is not None or o.depth is not None


def model_config(o: ModelOptions, vocab_size: int, max_seq_len: int) -> ModelConfig:
    """The config the architecture flags describe (see each field's help)."""
    flat = {cfg_key: getattr(o, name) for name, cfg_key in _TO_CONFIG.items() if getattr(o, name) is not None}
    if o.untied is not None:
        flat["tie_embeddings"] = not o.untied
    flat["max_seq_len"] = max_seq_len
    if o.depth is not None:
        if o.size is not None:
            raise UserError(f"`depth` and `size` {o.size} exclude each other (the depth dial derives the shape)")
        given = [f"`{n}`" for n in SHAPE_FLAGS if getattr(o, n) is not None]
        if given:
            raise UserError(f"{', '.join(given)} do not apply with `depth` (it derives dim and heads)")
        return ModelConfig.from_depth(vocab_size, o.depth, aspect_ratio=o.aspect_ratio, head_dim=o.head_dim or 128,
                                      ffn_mult=o.ffn_mult, **flat)
    size = o.size or "small"
    if size == "custom":
        missing = [f"`{n}`" for n in ("dim", "layers") if getattr(o, n) is None]
        if o.heads is None and o.head_dim is None:
            missing.append("`heads` (or `head_dim`)")
        if missing:
            raise UserError(f"`size` custom needs {', '.join(missing)}")
        heads = o.heads
        if heads is None:
            if o.dim % o.head_dim:
                raise UserError(f"`dim` {o.dim} is not divisible by `head_dim` {o.head_dim}")
            heads = o.dim // o.head_dim
        return ModelConfig.custom(vocab_size, dim=o.dim, n_layers=o.layers, n_heads=heads, ffn_mult=o.ffn_mult,
                                  head_dim=o.head_dim or 0, **flat)
    shape = [f"`{n}`" for n in (*SHAPE_FLAGS, "ffn_mult", "head_dim") if getattr(o, n) is not None]
    if shape:
        raise UserError(f"{', '.join(shape)} only apply to `size` custom (`size` {size} is a preset; or use `depth`)")
    if size not in PRESETS:
        raise UserError(f"unknown `size` {size!r}; presets: {', '.join(PRESETS)} (or custom)")
    return ModelConfig.from_preset(size, vocab_size, **flat)
