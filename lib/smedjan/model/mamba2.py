"""Mamba-2 (SSD, Dao & Gu 2024): a selective state-space mixer, O(T) in training and O(1)
per decoded token.

    in_proj(x) -> z [d_inner], xBC [d_inner + 2N], dt [H]        (d_inner = expand x dim)
    xBC = silu(causal depthwise conv1d(xBC), kernel 4)             -> x [H, P], B [N], C [N]
    dt = softplus(dt + dt_bias),  A = -exp(A_log)                  (one dt and A per head)
    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T,   y_t = h_t C_t + D x_t   (h: [H, P, N])
    out = out_proj(RMSNorm(y * silu(z)) * norm)

One B and C for all heads (ngroups = 1), so the gated RMSNorm is over all of d_inner:
llama.cpp's `mamba2` with group_count 1. Training runs the chunked SSD form
(`recurrent.chunked_linear_attention` with q = C, k = B, v = dt x, log decay = dt A);
decoding keeps per layer the conv window (3 inputs of xBC) and h, and steps them.
Initialisation as mamba_ssm's Mamba2Simple: dt from log-uniform [1e-3, 1e-1] through the
inverse softplus into dt_bias, A from U[1, 16], D = 1.

    cfg = ModelConfig.make(vocab_size=97, dim=64, n_layers=2, n_heads=4, mixer="ssm", ssm_head_dim=32, mlp="none")
    y = Mamba2(cfg, layer=0)(x, ctx, layer=0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from smedjan.model.parts import MATRIX, NORM, SCALAR, Context, External, Init, Mixer, TensorState, gguf_name
from smedjan.model.recurrent import (carried, causal_conv, chunked_linear_attention, keep, recurrent_state, state_of,
                                     stepwise_linear_attention, wide)

if TYPE_CHECKING:
    from smedjan.model.config import ModelConfig

D_CONV = 4  # the causal convolution's width (Mamba's default; llama.cpp reads it from the file)


@dataclass
class SSMConfig:
    state: int = 64  # N: the state size per head (B and C widths)
    expand: int = 2  # d_inner = expand x dim
    head_dim: int = 64  # P: channels per head; heads = d_inner / P
    chunk: int = 64  # tokens per chunk of the training (SSD) form

    def validate(self, dim: int) -> list[tuple[bool, str]]:
        inner = self.expand * dim
        return [(1 <= self.state <= 1024, f"--ssm-state {self.state} must be in [1, 1024]"),
                (1 <= self.expand <= 16, f"--ssm-expand {self.expand} must be in [1, 16]"),
                (1 <= self.head_dim <= inner and inner % self.head_dim == 0,
                 f"--ssm-head-dim {self.head_dim} must divide --ssm-expand x --dim = {inner}"),
                (1 <= self.chunk <= 4096, f"--ssm-chunk {self.chunk} must be in [1, 4096]")]


class Mamba2(Mixer):
    KIND = "ssm"
    TRUNCATABLE = False
    # The conv and the per-head dt/A/D are small vectors, not matrices for decay or Muon.
    ROLES = {"in_proj.weight": MATRIX, "conv_weight": SCALAR, "conv_bias": SCALAR, "dt_bias": SCALAR,
             "A_log": SCALAR, "D": SCALAR, "norm": NORM, "out_proj.weight": MATRIX}
    WRITERS = ("out_proj.weight",)

    def __init__(self, cfg: "ModelConfig", layer: int):
        super().__init__()
        s = cfg.ssm
        self.d_inner, self.d_state, self.p = s.expand * cfg.dim, s.state, s.head_dim
        self.n_heads = self.d_inner // s.head_dim
        self.chunk, self.eps = s.chunk, cfg.norm_eps
        self.conv_dim = self.d_inner + 2 * s.state
        # registration order is init order
        self.in_proj = nn.Linear(cfg.dim, self.d_inner + self.conv_dim + self.n_heads, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(self.conv_dim, D_CONV))
        self.conv_bias = nn.Parameter(torch.empty(self.conv_dim))
        self.dt_bias = nn.Parameter(torch.empty(self.n_heads))
        self.A_log = nn.Parameter(torch.empty(self.n_heads))
        self.D = nn.Parameter(torch.ones(self.n_heads))
        self.norm = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, cfg.dim, bias=False)

    def init_weights(self, init: Init) -> None:
        init.normal_(self.in_proj.weight)
        bound = 1 / math.sqrt(D_CONV)  # nn.Conv1d's default for a depthwise kernel
        init.uniform_(self.conv_weight, -bound, bound)
        init.uniform_(self.conv_bias, -bound, bound)
        init.uniform_(self.dt_bias, math.log(1e-3), math.log(1e-1))
        init.uniform_(self.A_log, 1.0, 16.0)
        with torch.no_grad():
            if not self.dt_bias.is_meta:
                dt = self.dt_bias.double().exp().clamp(min=1e-4)
                self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) = dt
                self.A_log.copy_(self.A_log.double().log())
        init.fill_(self.D, 1.0)
        init.fill_(self.norm, 1.0)
        init.resid_(self.out_proj.weight)

    def flops_per_token(self, seq_len: int) -> float:
        # projections; the conv; SSD: within a chunk C.B and the weighted sum of x (2 L (N + P)
        # per head), across chunks reading and updating the state (4 N P per head); x3 for backward.
        L = min(self.chunk, seq_len)
        ssd = self.n_heads * (2 * L * (self.d_state + self.p) + 4 * self.d_state * self.p)
        return 6.0 * (self.in_proj.weight.numel() + self.out_proj.weight.numel() + self.conv_weight.numel()) + 3.0 * ssd

    def forward(self, x: torch.Tensor, ctx: Context, layer: int) -> torch.Tensor:
        B, T, _ = x.shape
        H, P, N, E = self.n_heads, self.p, self.d_state, self.d_inner
        st = state_of(ctx, layer)
        z, xBC, dt = self.in_proj(x).split([E, self.conv_dim, H], dim=-1)
        xBC, window = causal_conv(xBC, self.conv_weight, self.conv_bias,
                                  carried(st, "conv", ctx, (D_CONV - 1, self.conv_dim), xBC))
        keep(st, "conv", ctx, window)
        xs, Bm, Cm = F.silu(xBC).split([E, N, N], dim=-1)
        f = wide(x.dtype)
        xh = xs.to(f).view(B, T, H, P)
        dt = F.softplus(dt.to(f) + self.dt_bias.to(f))  # [B, T, H]
        log_a = (dt * -torch.exp(self.A_log.to(f))).transpose(1, 2)  # [B, H, T]
        v = (xh * dt[..., None]).transpose(1, 2)  # [B, H, T, P]
        k, q = Bm.to(f)[:, None], Cm.to(f)[:, None]  # [B, 1, T, N]: shared by the heads
        S0 = carried(st, "ssm", ctx, (H, N, P), v)
        if T == 1 and st is not None:
            y, S = stepwise_linear_attention(q, k, v, log_a, S0)
        else:
            y, S = chunked_linear_attention(q, k, v, log_a, S0, self.chunk)
        keep(st, "ssm", ctx, S)
        y = y.transpose(1, 2) + xh * self.D.to(f)[:, None]  # [B, T, H, P]
        y = y.reshape(B, T, E) * F.silu(z.to(f))
        y = F.rms_norm(y, (E,), self.norm.to(f), self.eps)
        return self.out_proj(y.to(x.dtype))

    def new_state(self, batch: int, max_len: int, device, dtype) -> TensorState:
        return recurrent_state(batch, device, dtype, conv=(D_CONV - 1, self.conv_dim),
                               ssm=(self.n_heads, self.d_state, self.p))

    @classmethod
    def external(cls, cfg: "ModelConfig", layer: int, fmt: str) -> list[External]:
        """llama.cpp's `mamba2` tensors (ngroups 1): A as -exp(A_log) [H, 1], D [H, 1], the
        conv [conv_dim, 4], the norm [1, d_inner]; all but the two projections in float32."""
        if fmt == "hf":
            return super().external(cfg, layer, fmt)
        from gguf import MODEL_TENSOR as T

        def ssm(t, suffix=".weight"):
            return gguf_name(t, layer).removesuffix(".weight") + suffix

        return [External("in_proj.weight", ssm(T.SSM_IN)),
                External("conv_weight", ssm(T.SSM_CONV1D), f32=True),
                External("conv_bias", ssm(T.SSM_CONV1D, ".bias"), f32=True),
                External("dt_bias", ssm(T.SSM_DT, ".bias"), f32=True),
                External("A_log", ssm(T.SSM_A, ""), convert=lambda a: -np.exp(a)[:, None], f32=True),
                External("D", ssm(T.SSM_D, ""), convert=lambda d: d[:, None], f32=True),
                External("norm", ssm(T.SSM_NORM), convert=lambda g: g[None, :], f32=True),
                External("out_proj.weight", ssm(T.SSM_OUT))]
