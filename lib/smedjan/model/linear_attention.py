"""Linear attention (Katharopoulos et al. 2020): softmax(q.k) replaced by a kernel
feature map, which makes causal attention a recurrence with a fixed-size state.

Feature map phi(x) = elu(x) + 1 (positive, so the normaliser below never vanishes), on
each query and key head; no RoPE (the recurrence orders the tokens). Per head:

    S_t = S_{t-1} + phi(k_t) v_t^T,   z_t = z_{t-1} + phi(k_t)
    o_t = phi(q_t)^T S_t / (phi(q_t) . z_t + 1e-6)

The normaliser makes o_t a weighted mean of the values so far, as softmax attention's
is. z rides along as an extra value column of ones, so one state [d, d + 1] per head and
one `chunked_linear_attention` call (no decay) compute both. Projections are the
attention part's (wq, wk, wv, wo; `--heads`, `--head-dim`, `--kv-heads` as for
attention). `--linear-attn-period N` makes every Nth layer linear and the rest softmax
attention, through the layer pattern.

    cfg = ModelConfig.make(vocab_size=97, dim=64, n_layers=4, n_heads=4, layer_pattern="attention*3,linear_attn")
    y = LinearAttention(cfg, layer=3)(x, ctx, layer=3)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from smedjan.errors import UserError
from smedjan.model.attention import Attention
from smedjan.model.parts import Context, External, TensorState, Unsupported
from smedjan.model.recurrent import (carried, chunked_linear_attention, keep, recurrent_state, state_of,
                                     stepwise_linear_attention, wide)

if TYPE_CHECKING:
    from smedjan.model.config import ModelConfig

EPS = 1e-6  # added to the normaliser phi(q) . z, which is > 0 but may be tiny


def feature_map(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1.0


@dataclass
class LinearAttnConfig:
    chunk: int = 64  # tokens per chunk of the training form

    def validate(self) -> list[tuple[bool, str]]:
        return [(1 <= self.chunk <= 4096, f"--linear-attn-chunk {self.chunk} must be in [1, 4096]")]


class LinearAttention(Attention):
    KIND = "linear_attn"
    TRUNCATABLE = False

    def __init__(self, cfg: "ModelConfig", layer: int):
        super().__init__(cfg, layer)
        self.chunk = cfg.linear_attn.chunk

    def flops_per_token(self, seq_len: int) -> float:
        # projections; within a chunk q.k and the weighted values (2 L (2 d + 1) per head),
        # across chunks reading and updating the state (4 d (d + 1)); x3 for backward.
        L, d = min(self.chunk, seq_len), self.head_dim
        mixing = self.n_heads * (2 * L * (2 * d + 1) + 4 * d * (d + 1))
        return 6.0 * sum(w.weight.numel() for w in (self.wq, self.wk, self.wv, self.wo)) + 3.0 * mixing

    def forward(self, x: torch.Tensor, ctx: Context, layer: int) -> torch.Tensor:
        B, T, _ = x.shape
        H, Hkv, d = self.n_heads, self.n_kv_heads, self.head_dim
        f = wide(x.dtype)
        qkv = F.linear(x, torch.cat([self.wq.weight, self.wk.weight, self.wv.weight])).to(f)
        q = qkv[..., :H * d].view(B, T, H, d).transpose(1, 2)
        k = qkv[..., H * d:(H + Hkv) * d].view(B, T, Hkv, d).transpose(1, 2)
        v = qkv[..., (H + Hkv) * d:].view(B, T, Hkv, d).transpose(1, 2)
        if self.q_norm is not None:
            q = F.rms_norm(q, (d,), self.q_norm.to(f), self.eps)
            k = F.rms_norm(k, (d,), self.k_norm.to(f), self.eps)
        if Hkv != H:  # grouped: each key/value head serves H / Hkv query heads
            k, v = (t.repeat_interleave(H // Hkv, dim=1) for t in (k, v))
        q, k = feature_map(q), feature_map(k)
        v = torch.cat([v, torch.ones_like(v[..., :1])], -1)  # the last column accumulates z
        st = state_of(ctx, layer)
        S0 = carried(st, "S", ctx, (H, d, d + 1), v)
        if T == 1 and st is not None:
            o, S = stepwise_linear_attention(q, k, v, None, S0)
        else:
            o, S = chunked_linear_attention(q, k, v, None, S0, self.chunk)
        keep(st, "S", ctx, S)
        y = o[..., :d] / (o[..., d:] + EPS)
        return self.wo(y.transpose(1, 2).reshape(B, T, H * d).to(x.dtype))

    def new_state(self, batch: int, max_len: int, device, dtype) -> TensorState:
        return recurrent_state(batch, device, dtype, S=(self.n_heads, self.head_dim, self.head_dim + 1))

    @classmethod
    def external(cls, cfg: "ModelConfig", layer: int, fmt: str) -> list[External]:
        where = "llama.cpp has no architecture" if fmt == "gguf" else "transformers' Llama has no layer"
        raise Unsupported(f"the 'linear_attn' part (elu+1 linear attention): {where} for it")

    @classmethod
    def check_growable(cls, src: "ModelConfig", dst: "ModelConfig") -> None:
        raise UserError(f"grow: the {cls.KIND!r} part cannot be grown (only attention, swiglu and relu2 can)")
