"""Training memory per GPU under DDP and under FSDP (`smedjan sizes --gpus N`): a first-order
estimate to see which run fits which cards, not a measurement.

Per parameter: fp32 weights (4 bytes) and fp32 gradients (4 bytes); optimizer state as
the optimizer keeps it (AdamW two fp32 moments: 8; 8-bit AdamW: 2; adamw-cpu: 0 on the
GPU; Sophia m and h: 8; Muon/hybrid: one fp32 momentum (4) on the block matrices, AdamW's 8
on the rest). DDP replicates all three; FSDP (ZeRO-3) keeps 1/N of each. Activations per
micro-batch of `batch` sequences of `seq_len`, the same under both: per layer 17 values
per token and width (Korthikanti et al. 2022, "Reducing Activation Recomputation", 34sbh
bytes at 16 bits, without the attention-score term a fused attention does not store) at
2 bytes (bf16) or 4 (fp32), plus the fp32 logits and their gradient (8 x vocab per token).

    m = training_memory(ModelConfig.from_preset("small", 8192), gpus=8, optimizer="adamw")
    m["fsdp"]["total"]   # bytes per GPU
"""

from __future__ import annotations

# optimizer -> (bytes per block-matrix parameter, bytes per other parameter) on the GPU
OPTIMIZER_BYTES = {"adamw": (8, 8), "adamw-cpu": (0, 0), "adamw-8bit": (2, 2), "sophia": (8, 8),
                   "muon": (4, 8), "hybrid": (4, 8)}


def training_memory(cfg, *, gpus: int, optimizer: str = "adamw", precision: str = "bf16", batch: int = 8,
                    seq_len: int = 256) -> dict:
    """{"ddp": {...}, "fsdp": {...}}: bytes per GPU of weights, grads, optimizer, activations, total."""
    from smedjan.errors import UserError

    if optimizer not in OPTIMIZER_BYTES:
        raise UserError(f"`optimizer` {optimizer!r}: choose from {', '.join(OPTIMIZER_BYTES)}")
    if precision not in ("bf16", "fp32"):
        raise UserError(f"`precision` {precision!r} is not bf16 or fp32")
    if gpus < 1 or batch < 1 or seq_len < 1:
        raise UserError("`gpus`, `batch_size` and `seq_len` must be positive")
    p, p_matrix = cfg.n_params(), cfg.n_params(embedding=False)
    per_matrix, per_other = OPTIMIZER_BYTES[optimizer]
    whole = {"weights": 4 * p, "grads": 4 * p, "optimizer": per_matrix * p_matrix + per_other * (p - p_matrix)}
    tokens = batch * seq_len
    act = tokens * (cfg.n_layers * 17 * cfg.dim * (2 if precision == "bf16" else 4) + 8 * cfg.vocab_size)
    out = {}
    for mode, div in (("ddp", 1), ("fsdp", gpus)):
        row = {k: v // div for k, v in whole.items()}
        row["activations"] = act
        row["total"] = sum(row.values())
        out[mode] = row
    return out
