"""Rotary position embedding: its config, the scaled frequencies, tables and rotation.

Hugging Face's half-split layout: the pair rotated together is (i, i + d/2), so HF
import/export is a rename; the GGUF writer permutes Q/K rows for llama.cpp's interleaved
pairs. Tables are computed in float64 and kept in float32 (float64 for a float64 model):
bf16 angles at position 2000 would be off by whole fractions of a radian.

    cfg = RopeConfig(theta=10000.0)
    tables = RopeTables(cfg, original_max_seq_len=2048)
    cos, sin = tables.get(64, length=256, device="cpu", dtype=torch.float32)   # [256, 64] each
    q = apply_rope(q, cos, sin)                                                 # q: [B, H, 256, 64]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from smedjan.kernels.reference import apply_rope  # noqa: F401  (the rotation; its Triton twin is beside it)

SCALINGS = ("none", "linear", "ntk", "yarn", "llama3")


@dataclass
class RopeConfig:
    theta: float = 10000.0
    # Context extension: "none", "linear" (position interpolation), "ntk" (NTK-aware base
    # change), "yarn" (NTK-by-parts + attention temperature), "llama3" (Llama 3.1's
    # frequency bands, for imported models).
    scaling: str = "none"
    factor: float = 1.0
    original_max_seq_len: int = 0  # context the model was trained at, before scaling
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    beta_fast: float = 32.0  # yarn only
    beta_slow: float = 1.0  # yarn only

    def validate(self) -> list[tuple[bool, str]]:
        return [
            (math.isfinite(self.theta) and self.theta > 1.0, f"rope theta {self.theta} must be a finite number > 1"),
            (self.scaling in SCALINGS, f"rope scaling {self.scaling!r} is not one of {SCALINGS}"),
            (math.isfinite(self.factor) and 1.0 <= self.factor <= 1024,
             f"rope scaling factor {self.factor} must be in [1, 1024]"),
            (0 <= self.original_max_seq_len <= 1 << 24, "rope original_max_seq_len must be in [0, 2^24]"),
            (all(math.isfinite(v) and v > 0 for v in (self.low_freq_factor, self.high_freq_factor,
                                                      self.beta_fast, self.beta_slow)),
             "rope low/high frequency factors and yarn betas must be finite and positive"),
            (self.scaling != "llama3" or self.high_freq_factor > self.low_freq_factor,
             "llama3 rope scaling needs high_freq_factor > low_freq_factor"),
        ]

    @property
    def active(self) -> str:
        """The scaling actually applied ("none" when the factor is 1)."""
        return self.scaling if self.factor > 1.0 else "none"


def rope_frequencies(cfg: RopeConfig, dim: int, max_seq_len: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] (float64) after the configured scaling, and the attention
    temperature factor YaRN applies to cos/sin (1.0 otherwise). `max_seq_len` is the model's
    context, the fallback for YaRN's original context."""
    base = cfg.theta
    exponents = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    factor = cfg.factor
    kind = cfg.active
    if kind == "ntk":
        # NTK-aware: stretch the base so the lowest frequency is interpolated by `factor`
        # while the highest stay (almost) untouched.
        base = base * factor ** (dim / (dim - 2))
    inv_freq = 1.0 / base ** exponents
    if kind == "linear":
        return inv_freq / factor, 1.0
    if kind == "yarn":
        original = cfg.original_max_seq_len or max_seq_len

        def correction_dim(n_rotations: float) -> float:
            return dim * math.log(original / (n_rotations * 2 * math.pi)) / (2 * math.log(cfg.theta))

        low = max(math.floor(correction_dim(cfg.beta_fast)), 0)
        high = min(math.ceil(correction_dim(cfg.beta_slow)), dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        extrapolate = 1.0 - ramp  # 1 for high frequencies (kept), 0 for low ones (interpolated)
        inv_freq = inv_freq / factor * (1 - extrapolate) + inv_freq * extrapolate
        return inv_freq, 0.1 * math.log(factor) + 1.0
    if kind == "llama3":
        original = cfg.original_max_seq_len or 8192
        lo, hi = cfg.low_freq_factor, cfg.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > original / lo, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= original / hi) & (wavelen <= original / lo)
        return torch.where(medium, smoothed, scaled), 1.0
    return inv_freq, 1.0


def rope_tables(cfg: RopeConfig, dim: int, length: int, max_seq_len: int,
                dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [length, dim], computed in float64, HF half-split layout."""
    inv_freq, mscale = rope_frequencies(cfg, dim, max_seq_len)
    t = torch.arange(length, dtype=torch.float64)
    freqs = torch.outer(t, inv_freq)  # [length, dim/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return (emb.cos() * mscale).to(dtype), (emb.sin() * mscale).to(dtype)


class RopeTables:
    """cos/sin tables per (rotary dim, device, dtype), grown on demand up to the context:
    a model whose config allows a long context allocates only what its inputs reach.
    Kept outside the module's buffers so `model.to(bfloat16)` cannot round them."""

    def __init__(self, cfg: RopeConfig, max_seq_len: int):
        self.cfg, self.max_seq_len = cfg, max_seq_len
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, dim: int, length: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables of at least `length` rows (callers slice the positions they need)."""
        key = (dim, str(device), dtype)
        have = self._tables.get(key)
        if have is None or have[0].shape[0] < length:
            # Double (up to the context) so a growing decode does not rebuild every step.
            n = min(self.max_seq_len, max(length, 2 * (have[0].shape[0] if have is not None else 0), 256))
            cos, sin = rope_tables(self.cfg, dim, n, self.max_seq_len, dtype)
            have = self._tables[key] = (cos.to(device), sin.to(device))
        return have

    def clear(self) -> None:
        self._tables.clear()
