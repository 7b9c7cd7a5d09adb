"""The smedjan transformer: decoder-only, pre-norm, Llama-compatible.

RMSNorm -> attention (RoPE, multi-head or grouped-query, through
`scaled_dot_product_attention`, so CUDA gets flash kernels) -> residual ->
RMSNorm -> SwiGLU -> residual; a final RMSNorm and an output head tied to the
embedding (untied for imported models that have their own head).
RoPE uses the Hugging Face Llama convention (rotate the two halves of each head), so
importing/exporting HF weights is a rename; the GGUF writer permutes Q/K rows for
llama.cpp's interleaved convention.

    cfg = ModelConfig.from_preset("small", vocab_size=8192)
    model = Transformer(cfg)
    loss = model(idx, targets)            # idx, targets: int64 [B, T]
    logits = model(idx)                   # [B, T, vocab]
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from smedjan.model.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in at least float32 (bf16 sums of squares lose too much), return the input dtype.
        # F.rms_norm computes x * rsqrt(mean(x^2) + eps) * weight as one fused kernel (CPU
        # and CUDA) instead of five elementwise passes, with the same result.
        dt = torch.promote_types(x.dtype, torch.float32)
        return F.rms_norm(x.to(dt), (x.shape[-1],), self.weight.to(dt), self.eps).type_as(x)


def rope_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim/2] after the configured scaling, and the attention
    temperature factor YaRN applies to cos/sin (1.0 otherwise)."""
    hd, base = cfg.head_dim, cfg.rope_theta
    exponents = torch.arange(0, hd, 2, dtype=torch.float64) / hd
    factor = cfg.rope_factor
    kind = cfg.rope_scaling if factor > 1.0 else "none"
    if kind == "ntk":
        # NTK-aware: stretch the base so the lowest frequency is interpolated by `factor`
        # while the highest stay (almost) untouched.
        base = base * factor ** (hd / (hd - 2))
    inv_freq = 1.0 / base ** exponents
    if kind == "linear":
        return inv_freq / factor, 1.0
    if kind == "yarn":
        original = cfg.rope_original_max_seq_len or cfg.max_seq_len

        def correction_dim(n_rotations: float) -> float:
            return hd * math.log(original / (n_rotations * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))

        low = max(math.floor(correction_dim(cfg.yarn_beta_fast)), 0)
        high = min(math.ceil(correction_dim(cfg.yarn_beta_slow)), hd - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(hd // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        extrapolate = 1.0 - ramp  # 1 for high frequencies (kept), 0 for low ones (interpolated)
        inv_freq = inv_freq / factor * (1 - extrapolate) + inv_freq * extrapolate
        return inv_freq, 0.1 * math.log(factor) + 1.0
    if kind == "llama3":
        original = cfg.rope_original_max_seq_len or 8192
        lo, hi = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > original / lo, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= original / hi) & (wavelen <= original / lo)
        return torch.where(medium, smoothed, scaled), 1.0
    return inv_freq, 1.0


def rope_tables(cfg: ModelConfig, length: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [length, head_dim], computed in float64, HF half-split layout."""
    inv_freq, mscale = rope_frequencies(cfg)
    t = torch.arange(length, dtype=torch.float64)
    freqs = torch.outer(t, inv_freq)  # [length, hd/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return (emb.cos() * mscale).to(dtype), (emb.sin() * mscale).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, hd]; cos, sin: [T, hd]. Rotates in the tables' precision (float32 at
    least: bf16 angles at position 2000 would be off by whole radians' fractions)."""
    half = x.shape[-1] // 2
    xf = x.to(cos.dtype)
    x1, x2 = xf[..., :half], xf[..., half:]
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * cos + rotated * sin).type_as(x)


class KVCache:
    """Keys and values of past positions, preallocated: per layer [B, n_kv_heads, max_len, head_dim]."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device, dtype):
        shape = (batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.max_len = max_len
        self.length = 0  # positions filled (same for every row)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = k.shape[2]
        if pos + t > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, {pos + t} requested")
        self.k[layer][:, :, pos:pos + t] = k
        self.v[layer][:, :, pos:pos + t] = v
        return self.k[layer][:, :, :pos + t], self.v[layer][:, :, :pos + t]

    def truncate(self, length: int) -> None:
        self.length = length


def attention_mask(t_q: int, t_k: int, pos: int, window: int, device) -> torch.Tensor | None:
    """Boolean [t_q, t_k] mask (True = attend) for queries at pos..pos+t_q-1 over keys
    0..t_k-1: causal, and within `window` positions when a sliding window is set.
    None when plain `is_causal` (or no mask at all, for one query) already says it."""
    if window == 0 and (pos == 0 and t_q == t_k):
        return None
    if window == 0 and t_q == 1:
        return None
    q = torch.arange(pos, pos + t_q, device=device)[:, None]
    k = torch.arange(t_k, device=device)[None, :]
    mask = k <= q
    if window:
        mask &= (q - k) < window
    return mask


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.window = cfg.sliding_window
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layer: int,
                cache: KVCache | None, pos: int, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, hd]
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, hd]
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v, pos)
        gqa = self.n_kv_heads != self.n_heads
        if mask is None and k.shape[2] == T:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.wo(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, cos, sin, layer, cache, pos, mask):
        x = x + self.attention(self.attention_norm(x), cos, sin, layer, cache, pos, mask)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        # Tied: logits use the embedding matrix, so there is no separate head parameter
        # (and safetensors never sees two names for one storage).
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # RoPE tables live outside the module's buffers so that `model.to(bfloat16)`
        # cannot round them: float32 (float64 for a float64 model), one pair per device.
        self._rope_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.reset_parameters()

    def rope(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = torch.float64 if self.tok_embeddings.weight.dtype == torch.float64 else torch.float32
        key = (str(device), dtype)
        if key not in self._rope_cache:
            cos, sin = rope_tables(self.cfg, self.cfg.max_seq_len, dtype)
            self._rope_cache[key] = (cos.to(device), sin.to(device))
        return self._rope_cache[key]

    def reset_parameters(self, seed: int | None = None) -> None:
        """GPT-2 initialisation: N(0, 0.02) for every matrix and the embedding, with the
        two projections that write into the residual stream (attention `wo`, FFN `w2`)
        scaled by 1/sqrt(2 * n_layers), so the residual stream's variance stays O(1)
        whatever the depth; RMSNorm gains start at 1. 0.02 is about 1/sqrt(dim) for the
        presets' widths, which keeps initial logits small (loss starts near ln(vocab))."""
        gen = None
        if seed is not None:
            gen = torch.Generator(device="cpu").manual_seed(seed)
        std = 0.02
        resid_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if p.ndim == 1:
                nn.init.ones_(p)
                continue
            s = resid_std if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")) else std
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(s).to(p.dtype))

    @property
    def head_weight(self) -> torch.Tensor:
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def hidden(self, idx: torch.Tensor, *, cache: KVCache | None = None, pos: int = 0) -> torch.Tensor:
        """Final normalized hidden states [B, T, dim] of token ids `idx` [B, T] at positions pos.."""
        B, T = idx.shape
        if pos + T > self.cfg.max_seq_len:
            raise ValueError(f"positions up to {pos + T} exceed the model's context of {self.cfg.max_seq_len}")
        cos, sin = self.rope(idx.device)
        cos, sin = cos[pos:pos + T], sin[pos:pos + T]
        t_k = pos + T if cache is not None else T
        mask = attention_mask(T, t_k, pos if cache is not None else 0, self.cfg.sliding_window, idx.device)
        x = self.tok_embeddings(idx)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, i, cache, pos, mask)
        if cache is not None:
            cache.length = pos + T
        return self.norm(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.head_weight)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, cache: KVCache | None = None,
                pos: int = 0, ignore_index: int = -1) -> torch.Tensor:
        """Logits [B, T, vocab] or, with targets [B, T], the mean cross-entropy over the
        targets that are not `ignore_index`."""
        logits = self.logits(self.hidden(idx, cache=cache, pos=pos))
        if targets is None:
            return logits
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=ignore_index)
