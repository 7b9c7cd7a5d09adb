"""The model's one config dataclass and the preset table.

    cfg = ModelConfig.from_preset("small", vocab_size=8192)     # 7.2M parameters
    cfg = ModelConfig.custom(vocab_size=8192, dim=1024, n_layers=16, n_heads=16, ffn_mult=4, n_kv_heads=4)
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from smedjan.errors import UserError

FFN_MULTIPLE = 256

# name -> (dim, n_layers, n_heads). FFN hidden = 8/3 * dim rounded up to a multiple of 256.
# At vocab 8192: tiny 2.1M, small 7.2M, medium 45M, large 317M, max 6.5B parameters.
PRESETS: dict[str, tuple[int, int, int]] = {
    "tiny": (128, 4, 4),
    "small": (256, 6, 4),
    "medium": (512, 12, 8),
    "large": (1024, 24, 16),
    "max": (4096, 32, 32),
}

ROPE_SCALINGS = ("none", "linear", "ntk", "yarn", "llama3")


def ffn_hidden_for(dim: int, ffn_mult: float = 8 / 3) -> int:
    return int(math.ceil(ffn_mult * dim / FFN_MULTIPLE) * FFN_MULTIPLE)


@dataclass
class ModelConfig:
    vocab_size: int
    dim: int = 256
    n_layers: int = 6
    n_heads: int = 4
    n_kv_heads: int = 0  # 0 -> n_heads (multi-head); fewer -> grouped-query attention
    head_dim: int = 0  # 0 -> dim // n_heads
    ffn_hidden: int = 0  # 0 -> 8/3 * dim rounded up to a multiple of 256
    max_seq_len: int = 2048  # longest context RoPE tables are built for
    rope_theta: float = 10000.0
    # RoPE scaling for context extension: "none", "linear" (position interpolation),
    # "ntk" (NTK-aware base change), "yarn" (NTK-by-parts + attention temperature),
    # "llama3" (Llama 3.1's frequency-band scaling, for imported models).
    rope_scaling: str = "none"
    rope_factor: float = 1.0
    rope_original_max_seq_len: int = 0  # context the model was trained at, before scaling
    rope_low_freq_factor: float = 1.0  # llama3 scaling only
    rope_high_freq_factor: float = 4.0  # llama3 scaling only
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    sliding_window: int = 0  # 0 -> full causal attention
    preset: str = "custom"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.n_kv_heads == 0:
            self.n_kv_heads = self.n_heads
        if self.head_dim == 0:
            if self.n_heads <= 0 or self.dim % self.n_heads:
                raise UserError(f"--dim {self.dim} is not divisible by --heads {self.n_heads}")
            self.head_dim = self.dim // self.n_heads
        if self.ffn_hidden == 0:
            self.ffn_hidden = ffn_hidden_for(self.dim)
        self.validate()

    def validate(self) -> None:
        checks = [
            (self.vocab_size > 0, f"vocab size {self.vocab_size} must be positive"),
            (self.dim > 0 and self.n_layers > 0 and self.n_heads > 0, "dim, layers and heads must be positive"),
            (self.n_kv_heads > 0 and self.n_heads % self.n_kv_heads == 0,
             f"--heads {self.n_heads} must be a multiple of --kv-heads {self.n_kv_heads}"),
            (self.head_dim % 2 == 0, f"head dim {self.head_dim} must be even for RoPE"),
            (self.rope_scaling in ROPE_SCALINGS, f"rope scaling {self.rope_scaling!r} is not one of {ROPE_SCALINGS}"),
            (self.rope_factor >= 1.0, f"rope scaling factor {self.rope_factor} must be >= 1"),
            (self.max_seq_len > 0, "max_seq_len must be positive"),
            (self.sliding_window >= 0, "sliding window must be >= 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UserError(msg)

    # ------------------------------------------------------------------ builders
    @classmethod
    def from_preset(cls, name: str, vocab_size: int, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise UserError(f"unknown size {name!r}; presets: {', '.join(PRESETS)} (or custom)")
        dim, n_layers, n_heads = PRESETS[name]
        return cls(vocab_size=vocab_size, dim=dim, n_layers=n_layers, n_heads=n_heads, preset=name, **overrides)

    @classmethod
    def custom(cls, vocab_size: int, dim: int, n_layers: int, n_heads: int, ffn_mult: float = 8 / 3,
               n_kv_heads: int = 0, **overrides) -> "ModelConfig":
        return cls(vocab_size=vocab_size, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                   ffn_hidden=ffn_hidden_for(dim, ffn_mult), preset="custom", **overrides)

    # ------------------------------------------------------------- derived facts
    def n_params(self, embedding: bool = True) -> int:
        """Exact parameter count (the tied head counts once)."""
        hd = self.head_dim
        attn = self.dim * hd * (self.n_heads * 2 + self.n_kv_heads * 2)
        ffn = 3 * self.dim * self.ffn_hidden
        per_layer = attn + ffn + 2 * self.dim
        n = self.n_layers * per_layer + self.dim
        if embedding:
            n += self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6 x matmul params, plus attention.

        The matmul params include the output head (vocab x dim) but not the embedding
        lookup; attention adds 12 * layers * heads * head_dim * seq_len (QK^T and AV,
        forward and backward, causal masking not discounted), as in PaLM / nanochat.
        """
        matmul = self.n_params(embedding=False) - self.n_layers * 2 * self.dim - self.dim
        matmul += self.vocab_size * self.dim
        return 6.0 * matmul + 12.0 * self.n_layers * self.n_heads * self.head_dim * seq_len

    # ------------------------------------------------------------ serialization
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise UserError(f"model config has unknown fields {sorted(unknown)} (made by a newer smedjan?)")
        try:
            return cls(**d)
        except TypeError as e:
            raise UserError(f"model config is malformed ({e})") from None
