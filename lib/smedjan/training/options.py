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
from smedjan.optim import hybrid as HYBRID
from smedjan.optim.muon import MATRIX_LR as MUON_LR
from smedjan.optim.muon import MOMENTUM as MUON_MOMENTUM
from smedjan.optim.sophia import INTERVAL as SOPHIA_INTERVAL
from smedjan.optim.sophia import RHO as SOPHIA_RHO
from smedjan.options import option


@dataclass(kw_only=True)
class RunOptions:
    batch_size: int = option(32, "Sequences per step per process.")
    grad_accum: int = option(1, "Micro-batches per step; effective batch = batch-size x grad-accum x processes.")
    steps: int | None = option(None, "Optimizer steps.")
    lr: float = option(3e-4, "Peak learning rate (muon: of the roles AdamW trains; not hybrid, whose roles have "
                             "their own: --matrix-lr ...).")
    min_lr: float | None = option(None, "Floor of the decay (cosine, wsd, trapezoid, invsqrt). Default: --lr / 10 "
                                        "(hybrid: --final-lr-frac).")
    warmup: int | None = option(None, "Steps of linear LR warmup. Default: 5% of the steps.")
    warmdown: float = option(0.2, "wsd / trapezoid: fraction of the steps spent cooling down.")
    lr_schedule: str = option("cosine", "cosine, wsd, wso, invsqrt or trapezoid.")
    optimizer: str = option("adamw", "adamw; adamw-cpu (state and update in CPU memory on a GPU run; on a CPU "
                                     "device it is adamw); adamw-8bit (moments in 8 bits); sophia (SophiaG); muon "
                                     "(Muon on the hidden matrices, adamw on the rest); hybrid or muon-adamw "
                                     "(nanochat's MuonAdamW: per-role rates, see --matrix-lr).")
    adam_beta1: float | None = option(None, "AdamW first-moment decay (default 0.9; hybrid 0.8).")
    adamw_beta2: float | None = option(None, "AdamW second-moment decay (default 0.95, eps 1e-5; hybrid: 0.995 "
                                             "embedding, 0.96 head, 0.95 norms, eps 1e-10).")
    matrix_lr: float | None = option(None, "Rate of the hidden matrices (default --lr; muon and hybrid: Muon's "
                                           f"{MUON_LR}).")
    embedding_lr: float | None = option(None, "Rate of the token embedding (default --lr; hybrid: "
                                              f"{HYBRID.EMBEDDING_LR} untied, {HYBRID.TIED_LR} tied, at width 768: "
                                              "hybrid scales it by sqrt(768 / dim)).")
    unembedding_lr: float | None = option(None, "Rate of an untied output head (default --lr; hybrid: "
                                                f"{HYBRID.UNEMBEDDING_LR} at width 768, scaled by sqrt(768 / dim)).")
    scalar_lr: float | None = option(None, f"Rate of norm gains and scalars (default --lr; hybrid {HYBRID.SCALAR_LR}).")
    muon_momentum: float | None = option(None, f"Muon momentum (default {MUON_MOMENTUM}; hybrid: its peak, "
                                               f"{HYBRID.MOMENTUM}).")
    momentum_start: float | None = option(None, "Muon momentum at step 0, ramping to --muon-momentum over "
                                                     "--momentum-warmup steps (default: no ramp; hybrid "
                                                     f"{HYBRID.MOMENTUM_START}).")
    momentum_warmup: int | None = option(None, f"Steps of the Muon momentum ramp (hybrid {HYBRID.MOMENTUM_WARMUP}).")
    momentum_end: float | None = option(None, "Muon momentum at the last step, reached linearly over the LR "
                                                   f"decay (default: no change; hybrid {HYBRID.MOMENTUM_END}).")
    normuon: bool | None = option(None, "NorMuon: per-neuron second-moment normalisation of the Muon update, "
                                        "keeping its norm (default off; hybrid on).", flag="--normuon/--no-normuon")
    cautious: bool = option(False, "Muon: zero the update components whose sign disagrees with the gradient.")
    cautious_wd: bool | None = option(None, "Muon: weight decay only where the update and the weight agree in sign "
                                            "(default off; hybrid on).", flag="--cautious-wd/--no-cautious-wd")
    wd_schedule: str = option("constant", "Weight decay over the run: constant, cosine (to 0, as nanochat) or "
                                          "linear (to 0).")
    sophia_rho: float | None = option(None, f"SophiaG's clipping scale rho (default {SOPHIA_RHO}).")
    hessian_interval: int | None = option(None, "SophiaG: refresh the Hessian estimate every N steps (default "
                                                f"{SOPHIA_INTERVAL}).")
    warmup_ratio: float | None = option(None, "LR warmup as a fraction of the steps (instead of --warmup).")
    final_lr_frac: float | None = option(None, "Floor of the LR decay as a fraction of each group's peak rate "
                                               "(instead of --min-lr).")
    total_batch_size: int | None = option(None, "Tokens per step (train, distill): sets --grad-accum and scales "
                                                "every rate by sqrt(tokens / 2^19) (nanochat); -1: nanochat's rule "
                                                "2^19 x (D / D_d12)^0.383 from the horizon D in tokens.")
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
    # EMA and the regularisers (smedjan.training.ema, smedjan.training.regularisers): all
    # off at 0, applied to the model from outside its parts.
    ema_decay: float = option(0.0, "Keep an exponential moving average of the weights with this decay (e.g. "
                                   "0.999; 0: off), warmed up as ema-pytorch's min(decay, 1 - (1 + t)^(-2/3)) after "
                                   "t updates; validation, best.bin and the final checkpoint use the averaged "
                                   "weights, state_N.bin keeps both.")
    dropout: float = option(0.0, "Residual dropout (GPT-2's resid_pdrop): zero this fraction of each mixer's and "
                                 "feed-forward's output before it joins the residual stream, scaling the rest by "
                                 "1 / (1 - p); training only.")
    stochastic_depth: float = option(0.0, "Stochastic depth (Huang et al. 2016): skip each block for a random "
                                          "fraction of the sequences, with a survival probability falling linearly "
                                          "from 1 - p / layers at the first block to 1 - p at the last and the kept "
                                          "residual branch scaled by 1 / survival; training only (0: off).")
    noise_scale: float = option(0.0, "Annealed Gaussian gradient noise (Neelakantan et al. 2015): add N(0, "
                                     "eta / (1 + t)^0.55) to every gradient element at step t, after clipping "
                                     "(0: off; the paper's eta: 0.01, 0.3, 1).")
    freeze_fraction: float = option(0.0, "Freeze the first floor(f x layers) blocks (their weights stay exactly "
                                         "as loaded, e.g. by --init; no optimizer state); the embedding, which is "
                                         "also the tied head, the later blocks and the final norm train (0: off).")
    # Low-rank training and ReLoRA (smedjan.training.relora)
    lowrank: int | None = option(None, "Low-rank training (LoRA, Hu et al. 2021): freeze every hidden matrix W and "
                                       "train adapters of this rank R beside it, read as W + B A alpha / R (A "
                                       "Kaiming-uniform, B zero); embeddings, head and norms train full-rank; "
                                       "final.bin holds the merged plain weights (default: off; adamw only).")
    lowrank_alpha: float | None = option(None, "With --lowrank: the adapters' scale alpha (they add B A alpha / R; "
                                               "default alpha = R).")
    relora_interval: int | None = option(None, "ReLoRA (Lialin et al. 2023): with --lowrank, merge the adapters "
                                               "into W every N steps (W += B A alpha / R, fresh A, zero B), prune "
                                               "their Adam states and re-warm the LR (default: off, merged only "
                                               "at the end).")
    relora_warmup: int | None = option(None, "ReLoRA: after each merge the LR re-warms linearly from near 0 over "
                                             "this many steps, on top of the main schedule (default 50, the "
                                             "paper's; at most --relora-interval).")
    relora_prune: float | None = option(None, "ReLoRA: at each merge zero the entries of the adapters' Adam moments "
                                              "at or below this quantile of their magnitude (default 0.9, the "
                                              "paper's magnitude pruning; 1: a full reset).")

    # FSDP (smedjan.training.fsdp)
    fsdp: bool = option(False, "Under torchrun: shard weights, gradients and optimizer state over the processes "
                               "(FSDP2 fully_shard per block, ZeRO-3; Zhao et al. 2023) instead of replicating them "
                               "(DDP, the default when off); adamw, adamw-cpu, sophia, muon.")

# Flags that may change between a run and its resumption without a warning.
RESUME_FREE = frozenset({"resume", "init", "device", "compile", "run", "sample_every", "peak_flops",
                         "checkpoint_dir", "output", "gradient_checkpointing", "checkpoint_layers",
                         "fsdp"})  # FSDP: a state moves between --fsdp, DDP and one process


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
    ssm: bool = option(False, "Mamba-2 (SSD) state-space mixer in every layer (O(N) training, constant-memory "
                              "decoding); with --mlp none, llama.cpp's mamba2.")
    ssm_state: int | None = option(None, "Mamba-2: state size N per head (default 64).")
    ssm_expand: int | None = option(None, "Mamba-2: inner width = expand x dim (default 2).")
    ssm_head_dim: int | None = option(None, "Mamba-2: channels per head (default 64).")
    ssm_chunk: int | None = option(None, "Mamba-2: tokens per chunk of the chunked SSD training form (default 64).")
    linear_attn: bool = option(False, "Linear attention (elu+1 feature map, normalised) in every layer.")
    linear_attn_period: int | None = option(None, "Hybrid: every Nth layer linear attention, the rest softmax "
                                                  "attention.")
    linear_attn_chunk: int | None = option(None, "Linear attention: tokens per chunk of the training form "
                                                 "(default 64).")
    rwkv: bool = option(False, "RWKV-7 time mixing in every layer, with its channel mixing unless --mlp is given "
                               "(--mlp swiglu: llama.cpp's arwkv7).")
    rwkv_head_dim: int | None = option(None, "RWKV-7: channels per head (default 64).")
    rwkv_chunk: int | None = option(None, "RWKV-7: tokens per chunk of the training form (default 16).")
    rope_theta: float | None = option(None, "RoPE base (default 10000).")
    untied: bool | None = option(None, "Separate output head instead of the tied embedding (default: tied).",
                                 flag="--untied/--tied")
    max_seq_len: int | None = option(None, "Model context (RoPE tables). Default: --seq-len, or the checkpoint's.")
    yarn_scale: float = option(1.0, "Extend the context this many times with YaRN RoPE scaling (1 = off).")
    # Mixture-of-Experts feed-forward (smedjan.model.moe)
    n_experts: int | None = option(None, "Mixture-of-Experts: this many SwiGLU experts per feed-forward, each of the "
                                         "FFN's width (Switch Transformer / Mixtral; 0 or 1, the default: a dense "
                                         "feed-forward).")
    top_k_experts: int | None = option(None, "MoE: experts per token, chosen by an fp32 softmax router whose top-K "
                                             "scores are renormalised to sum to 1 (Mixtral; default 2).")
    shared_experts: int | None = option(None, "MoE: always-on experts every token also runs (DeepSeekMoE; default "
                                              "0).")
    moe_capacity: float | None = option(None, "MoE capacity factor in training: each expert takes at most "
                                              "ceil(F x tokens x K / E) tokens of a batch, later ones are dropped "
                                              "(Switch Transformer; 1.25 is usual). 0, the default: dropless. "
                                              "Evaluation and decoding are always dropless.")
    moe_aux_loss: float | None = option(None, "MoE load-balancing loss coefficient: C x E x sum_i f_i P_i (Switch "
                                              "Transformer; 1 when balanced; default 0.01).")
    z_loss: float | None = option(None, "MoE router z-loss coefficient: C x mean logsumexp(router logits)^2 "
                                        "(ST-MoE; default 0.001).")
    # Weight sharing (smedjan.model.sharing)
    shared_layers: int | None = option(None, "Block-wise weight sharing (ALBERT; MobileLLM's block-wise repeat): "
                                             "consecutive groups of N layers run one block's weights, N dividing "
                                             "the layers (default 1: none). The blocks' parameters drop N times, "
                                             "their compute does not; checkpoints and exports still hold every "
                                             "layer's tensors.")
    # µP (smedjan.model.mup)
    mup_base: int | None = option(None, "µP, the maximal update parametrisation (Yang et al. 2022, Tensor Programs "
                                        "V): the width at which --lr was tuned; the run's width (--dim) is "
                                        "width_mult = dim / base times wider. Hidden matrices: init std "
                                        "0.02/sqrt(width_mult) and, under the AdamW family (adamw, adamw-cpu, "
                                        "adamw-8bit, sophia), learning rate and Adam eps / width_mult; "
                                        "embedding, norms and head keep theirs; logits x 1/width_mult; attention scale 1/sqrt(head_dim x "
                                        "width_mult) (1/d). Under muon the hidden matrices keep Muon's own "
                                        "width-aware update (µP sets init, readout and attention); hybrid is "
                                        "refused. Saved in the model config; export-gguf/export-hf refuse µP "
                                        "models. Default: off (standard parametrisation).")
    # BitNet b1.58 (smedjan.model.bitnet)
    bitnet: bool = option(False, "BitNet b1.58 (Ma et al. 2024): ternary weights (absmean: round(W / mean|W|) "
                                 "clamped to {-1, 0, 1} times mean|W|, per matrix) and 8-bit activations (absmax per "
                                 "token) in every block linear layer, trained with a straight-through estimator; "
                                 "the embedding and head stay full precision (default off). It wants a higher "
                                 "--lr than full precision (the paper's recipe). Saved in the model config, so "
                                 "sft, dpo and decoding keep it; export refuses it.")


SHAPE_FLAGS = ("dim", "layers", "heads")
# ModelOptions fields that describe the model (all but how it is chosen and extended)
ARCH_FLAGS = tuple(f.name for f in dataclasses.fields(ModelOptions) if f.name not in ("size", "yarn_scale"))
# ModelOptions field -> the flat ModelConfig keyword it sets
_TO_CONFIG = {"kv_heads": "n_kv_heads", "mlp": "mlp", "qk_norm": "qk_norm", "logit_softcap": "logit_softcap",
              "sliding_window": "sliding_window", "window_pattern": "window_pattern", "short_window": "short_window",
              "layer_pattern": "layer_pattern", "mla_latent_dim": "mla_latent_dim", "mla_rope_dim": "mla_rope_dim",
              "mla_q_latent_dim": "mla_q_latent_dim", "block_sparse_top_k": "block_sparse_top_k",
              "block_size": "block_size", "rope_theta": "rope_theta", "ssm_state": "ssm_state",
              "ssm_expand": "ssm_expand", "ssm_head_dim": "ssm_head_dim", "ssm_chunk": "ssm_chunk",
              "linear_attn_chunk": "linear_attn_chunk", "rwkv_head_dim": "rwkv_head_dim", "rwkv_chunk": "rwkv_chunk",
              "shared_layers": "shared_layers", "mup_base": "mup_base", "bitnet": "bitnet"}
# Mixture-of-Experts flags -> their flat ModelConfig keywords (the same names)
MOE_FLAGS = ("n_experts", "top_k_experts", "shared_experts", "moe_capacity", "moe_aux_loss", "z_loss")
_TO_CONFIG.update({name: name for name in MOE_FLAGS})
# Mixer flags: the part every layer gets.
MIXER_FLAGS = {"ssm": "ssm", "linear_attn": "linear_attn", "rwkv": "rwkv"}
# Attention settings that mean nothing to a model without attention layers.
ATTENTION_ONLY = ("kv_heads", "qk_norm", "sliding_window", "window_pattern", "short_window", "rope_theta")


def described_by(o: ModelOptions) -> bool:
    """Whether the flags choose a model (--size or --depth) rather than leave it to a checkpoint."""
    return o.size is not None or o.depth is not None


def mixer_flags(o: ModelOptions, flat: dict) -> int | None:
    """Route --ssm / --linear-attn / --rwkv into `flat` (checking what they exclude);
    returns --linear-attn-period, which needs the layer count."""
    chosen = [f for f in MIXER_FLAGS if getattr(o, f)]
    period = o.linear_attn_period
    if period is not None and "linear_attn" not in chosen:
        chosen.append("linear_attn")
    if len(chosen) > 1 and set(chosen) != {"linear_attn"}:
        raise UserError(f"{' and '.join(f'`{c}`' for c in chosen)} exclude each other (mix mixers with "
                        "`layer_pattern`)")
    if not chosen:
        return None
    flag = "linear_attn_period" if period is not None else chosen[0]
    if o.layer_pattern is not None:
        raise UserError(f"`{flag}` and `layer_pattern` exclude each other (name the mixers in the pattern)")
    if chosen[0] != "linear_attn" or period is None:  # a period's linear layers: through the pattern
        flat["mixer"] = MIXER_FLAGS[chosen[0]]
    if chosen[0] in ("ssm", "rwkv"):
        given = [f"`{n}`" for n in ATTENTION_ONLY if getattr(o, n) is not None]
        if given:
            raise UserError(f"{', '.join(given)} do not apply to `{chosen[0]}` (a model without attention layers)")
    if chosen[0] == "rwkv" and o.mlp is None:
        flat["mlp"] = "rwkv"  # RWKV-7's own channel mixing
    return period


def moe_flags(o: ModelOptions, flat: dict) -> None:
    """Refuse MoE settings without experts, and another feed-forward beside them."""
    if (o.n_experts or 0) <= 1:
        given = [f"`{n}`" for n in MOE_FLAGS[1:] if getattr(o, n) is not None]
        if given:
            raise UserError(f"{', '.join(given)} need `n_experts` >= 2 (a Mixture-of-Experts feed-forward)")
        flat.pop("n_experts", None)  # 0 or 1: the dense feed-forward, as without the flag
    elif o.mlp not in (None, "swiglu", "moe"):
        raise UserError(f"`n_experts` and `mlp` {o.mlp}: the experts are SwiGLU")
    elif o.mlp is not None:
        flat["mlp"] = "moe"


def model_config(o: ModelOptions, vocab_size: int, max_seq_len: int) -> ModelConfig:
    """The config the architecture flags describe (see each field's help)."""
    flat = {cfg_key: getattr(o, name) for name, cfg_key in _TO_CONFIG.items() if getattr(o, name) is not None}
    if o.mup_base is not None and o.mup_base < 1:  # µP: the config's 0 means off, never a width
        raise UserError(f"`mup_base` {o.mup_base} must be a width >= 1 (leave it out for the standard parametrisation)")
    if o.untied is not None:
        flat["tie_embeddings"] = not o.untied
    flat["max_seq_len"] = max_seq_len
    moe_flags(o, flat)
    period = mixer_flags(o, flat)
    cfg = _shape(o, vocab_size, flat)
    if period is not None:
        if not 1 <= period <= cfg.n_layers:
            raise UserError(f"`linear_attn_period` {period} must be in [1, the model's {cfg.n_layers} layers]")
        cfg = cfg.replace(layer_pattern="linear_attn" if period == 1 else f"attention*{period - 1},linear_attn")
    return cfg


def _shape(o: ModelOptions, vocab_size: int, flat: dict) -> ModelConfig:
    """The config of --size / --depth / --size custom with the other flags in `flat`."""
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
