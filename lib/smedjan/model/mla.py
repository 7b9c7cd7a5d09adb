"""Multi-head latent attention (DeepSeek-V2): keys and values from a shared low-rank latent.

Per token, `wkv_a` makes a latent c (latent_dim, RMS-normalised) and one RoPE key k_pe
(rope_dim, shared by every head); `wkv_b` expands c into each head's content key
k_nope (nope_dim) and value (v_dim). Queries are [q_nope | q_pe] per head, from `wq`
(or a low-rank `wq_a` -> norm -> `wq_b` when q_latent_dim is set). The score of head h
is (q_nope . k_nope + q_pe . k_pe) / sqrt(nope_dim + rope_dim).

Decoding caches only c and k_pe: latent_dim + rope_dim numbers per token and layer,
instead of 2 x heads x head_dim. The absorbed path never expands the cache:
q_nope . (W_uk c) = (W_uk^T q_nope) . c and sum_t p_t (W_uv c_t) = W_uv (sum_t p_t c_t),
so each step costs a latent-sized dot product per cached token. Training runs the
naive (expanded) form through SDPA; the two agree to float64 rounding (tested).

    cfg = ModelConfig.make(vocab_size=97, dim=64, n_layers=2, n_heads=4, mla_latent_dim=32)
    mla = MLA(cfg, layer=0)
    y = mla(x, ctx, layer=0)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from smedjan.model.attention import attend, causal_mask
from smedjan.model.parts import MATRIX, NORM, Context, Init, Mixer, TensorState
from smedjan.model.rope import apply_rope

if TYPE_CHECKING:
    from smedjan.model.config import ModelConfig


@dataclass
class MLAConfig:
    latent_dim: int = 0  # kv_lora_rank: width of the cached latent (0: MLA off)
    q_latent_dim: int = 0  # 0: full-rank queries; else q goes through a latent of this width
    rope_dim: int = 0  # decoupled RoPE key per token, shared by the heads; 0 -> head_dim / 2
    nope_dim: int = 0  # per-head content key/query width; 0 -> head_dim
    v_dim: int = 0  # per-head value width; 0 -> head_dim

    def resolve(self, head_dim: int) -> None:
        if self.latent_dim:
            self.rope_dim = self.rope_dim or max(2, head_dim // 2)
            self.nope_dim = self.nope_dim or head_dim
            self.v_dim = self.v_dim or head_dim

    def validate(self, dim: int, n_heads: int, n_kv_heads: int) -> list[tuple[bool, str]]:
        if not self.latent_dim:
            return []
        return [
            (0 < self.latent_dim <= dim, f"--mla-latent-dim {self.latent_dim} must be in [1, dim {dim}] "
                                         "(the latent compresses the keys and values)"),
            (0 <= self.q_latent_dim <= dim, f"MLA q latent dim {self.q_latent_dim} must be in [0, dim {dim}]"),
            (self.rope_dim % 2 == 0 and 0 < self.rope_dim <= 1024, f"MLA rope dim {self.rope_dim} must be even"),
            (0 < self.nope_dim <= 1024 and 0 < self.v_dim <= 1024, "MLA head widths must be in [1, 1024]"),
            (n_kv_heads == n_heads, f"--kv-heads {n_kv_heads}: MLA shares one latent across all heads, so grouped-"
                                    "query attention does not apply; leave --kv-heads unset"),
        ]


class MLA(Mixer):
    KIND = "mla"
    ROLES = {"wq.weight": MATRIX, "wq_a.weight": MATRIX, "q_norm": NORM, "wq_b.weight": MATRIX,
             "wkv_a.weight": MATRIX, "kv_norm": NORM, "wkv_b.weight": MATRIX, "wo.weight": MATRIX}

    def __init__(self, cfg: "ModelConfig", layer: int):
        super().__init__()
        m, H = cfg.mla, cfg.attention.n_heads
        self.n_heads, self.latent, self.rope_dim = H, m.latent_dim, m.rope_dim
        self.nope, self.v_dim = m.nope_dim, m.v_dim
        self.window = cfg.attention.window(layer, cfg.n_layers, cfg.max_seq_len)
        self.eps = cfg.norm_eps
        self.absorbed = True  # decode through the latent (the naive path is the test reference)
        qk = m.nope_dim + m.rope_dim
        if m.q_latent_dim:
            self.wq_a = nn.Linear(cfg.dim, m.q_latent_dim, bias=False)
            self.q_norm = nn.Parameter(torch.ones(m.q_latent_dim))
            self.wq_b = nn.Linear(m.q_latent_dim, H * qk, bias=False)
        else:
            self.wq = nn.Linear(cfg.dim, H * qk, bias=False)
        self.wkv_a = nn.Linear(cfg.dim, m.latent_dim + m.rope_dim, bias=False)
        self.kv_norm = nn.Parameter(torch.ones(m.latent_dim))
        self.wkv_b = nn.Linear(m.latent_dim, H * (m.nope_dim + m.v_dim), bias=False)
        self.wo = nn.Linear(H * m.v_dim, cfg.dim, bias=False)
        self.scale = qk ** -0.5

    def _linears(self) -> list[nn.Linear]:
        return [m for m in self.children() if isinstance(m, nn.Linear)]

    def init_weights(self, init: Init) -> None:
        for name, p in self.named_parameters():
            if p.ndim == 1:
                init.fill_(p, 1.0)
            elif name == "wo.weight":
                init.resid_(p)
            else:
                init.normal_(p)

    def flops_per_token(self, seq_len: int) -> float:
        keys = min(seq_len, self.window) if self.window else seq_len
        return 6.0 * sum(m.weight.numel() for m in self._linears()) + \
            6.0 * self.n_heads * (self.nope + self.rope_dim + self.v_dim) * keys

    def _rms(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        dt = torch.promote_types(x.dtype, torch.float32)
        return F.rms_norm(x.to(dt), (x.shape[-1],), g.to(dt), self.eps).type_as(x)

    def project(self, x: torch.Tensor, ctx: Context):
        """q_nope [B, H, T, nope], q_pe [B, H, T, rope] (rotated), c [B, T, latent] (normed),
        k_pe [B, T, rope] (rotated)."""
        B, T, _ = x.shape
        H = self.n_heads
        q = self.wq_b(self._rms(self.wq_a(x), self.q_norm)) if hasattr(self, "wq_a") else self.wq(x)
        q = q.view(B, T, H, self.nope + self.rope_dim).transpose(1, 2)
        q_nope, q_pe = q[..., :self.nope], q[..., self.nope:]
        kv = self.wkv_a(x)
        c, k_pe = self._rms(kv[..., :self.latent], self.kv_norm), kv[..., self.latent:]
        cos, sin = ctx.rope(self.rope_dim)  # [T, r] or [B, 1, T, r]
        q_pe = apply_rope(q_pe, cos, sin)
        k_pe = apply_rope(k_pe[:, None], cos, sin)[:, 0]
        return q_nope, q_pe, c, k_pe

    def naive(self, q_nope, q_pe, c, k_pe, ctx: Context) -> torch.Tensor:
        """Expand the latents into per-head keys and values, then SDPA: [B, H, T, v]."""
        B, S, _ = c.shape
        H = self.n_heads
        kv = self.wkv_b(c).view(B, S, H, self.nope + self.v_dim).transpose(1, 2)
        k = torch.cat([kv[..., :self.nope], k_pe[:, None].expand(B, H, S, self.rope_dim)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        return attend(q, k, kv[..., self.nope:], ctx, self.window, scale=self.scale)

    def absorbed_attention(self, q_nope, q_pe, c, k_pe, ctx: Context) -> torch.Tensor:
        """Attention over the cached latents without expanding them: [B, H, T, v]."""
        H, S = self.n_heads, c.shape[1]
        w = self.wkv_b.weight.view(H, self.nope + self.v_dim, self.latent)
        w_uk, w_uv = w[:, :self.nope], w[:, self.nope:]  # [H, nope, L], [H, v, L]
        q_lat = torch.einsum("bhtn,hnl->bhtl", q_nope, w_uk)
        scores = (torch.einsum("bhtl,bsl->bhts", q_lat, c) + torch.einsum("bhtr,bsr->bhts", q_pe, k_pe)) * self.scale
        mask = causal_mask(ctx.positions(), S, self.window)  # [T, S] or [B, 1, T, S]
        wide = torch.promote_types(scores.dtype, torch.float32)  # softmax in at least float32
        scores = scores.to(wide).masked_fill(~mask, float("-inf")).softmax(-1).to(c.dtype)
        o_lat = torch.einsum("bhts,bsl->bhtl", scores, c)
        return torch.einsum("bhtl,hvl->bhtv", o_lat, w_uv)

    def forward(self, x: torch.Tensor, ctx: Context, layer: int) -> torch.Tensor:
        B, T, _ = x.shape
        q_nope, q_pe, c, k_pe = self.project(x, ctx)
        if ctx.states is not None:
            st = ctx.states[layer]
            c = st.write("c", ctx.rows, ctx.start, c)
            k_pe = st.write("k_pe", ctx.rows, ctx.start, k_pe)
        if ctx.states is not None and self.absorbed:
            y = self.absorbed_attention(q_nope, q_pe, c, k_pe, ctx)
        else:
            y = self.naive(q_nope, q_pe, c, k_pe, ctx)
        return self.wo(y.transpose(1, 2).reshape(B, T, self.n_heads * self.v_dim))

    def new_state(self, batch: int, max_len: int, device, dtype) -> TensorState:
        return TensorState(seq_dim=1, c=torch.zeros(batch, max_len, self.latent, device=device, dtype=dtype),
                           k_pe=torch.zeros(batch, max_len, self.rope_dim, device=device, dtype=dtype))
