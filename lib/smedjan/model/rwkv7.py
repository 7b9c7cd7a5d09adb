"""RWKV-7 "Goose" (Peng et al. 2025): time mixing with a generalised delta rule, and its
channel mixing, as BlinkDL's RWKV-LM v7 and llama.cpp define them.

Time mixing (`rwkv` mixer), per token, on the block's normalised input x (C = dim,
heads of N = `--rwkv-head-dim` channels):

    xx = x_{t-1} - x_t (token shift);  x_r = x + xx * mu_r, ... for r, w, k, v, a, g
    r, k, v = receptance(x_r), key(x_k), value(x_v)
    decay = exp(-e^-0.5 sigmoid(w0 + w2 tanh(w1 x_w)))                in (0.545, 1)
    a = sigmoid(a0 + a2 a1 x_a)                                         in-context learning rate
    v += (v_first - v) sigmoid(v0 + v2 v1 x_v)   (not in the first RWKV layer, which sets v_first)
    g = g2 sigmoid(g1 x_g)                                              output gate
    kk = normalize(k * k_k) per head;  k = k * (1 + (a - 1) k_a)
    S_t = S_{t-1} (diag(decay) - kk (kk a)^T) + v k^T,  o = S_t r      (S: [N, N] per head)
    out = output(g * (GroupNorm_heads(o) + (r . k . r_k summed per head) v))

Channel mixing (`--mlp rwkv`): value(relu(key(x + (x_{t-1} - x) mu_k))^2), hidden 4 x dim.
Its token shift is kept in the layer's RWKV state (as llama.cpp keeps both shifts), so
it needs the `rwkv` mixer in every layer.

Training runs `wkv7_chunked`: in chunks of L tokens the recurrence is exact linear
algebra (a unit lower-triangular solve for the delta-rule corrections; the WY form of
the DPLR transition products), with cumulative decays g (log space) split as exp(g_t)
<= 1 on the query side and exp(-g_s) <= 0.545^-L on the key side: at the default
L = 16 at most 1.6e4, far inside float32, and since every decay is below 1 the state
never grows. Decoding steps `wkv7_steps` (the per-token recurrence, also the tests'
reference). With `--mlp swiglu` the blocks are llama.cpp's `arwkv7` (RMSNorm, RWKV-7
time mixing, SwiGLU), which `export-gguf` writes.

    cfg = ModelConfig.make(vocab_size=97, dim=64, n_layers=2, n_heads=4, mixer="rwkv", mlp="rwkv", rwkv_head_dim=16)
    o, S = wkv7_chunked(r, log_w, k, v, a, b, S0, chunk=16)       # == wkv7_steps(r, log_w, k, v, a, b, S0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from smedjan.model.parts import (MATRIX, NORM, SCALAR, Context, External, FeedForward, Init, Mixer, TensorState,
                                 Unsupported, gguf_name)
from smedjan.model.recurrent import carried, full_precision, keep, recurrent_state, state_of, token_shift, wide

if TYPE_CHECKING:
    from smedjan.model.config import ModelConfig

DECAY_SCALE = math.exp(-0.5)  # log decay = -e^-0.5 sigmoid(.): decay in (exp(-0.6065), 1) = (0.545, 1)
GROUP_NORM_EPS = 64e-5  # RWKV-7's and llama.cpp's GroupNorm epsilon
LERPS = "rwkvag"  # token-shift mixes, in llama.cpp's time_mix_lerp_fused order


def lora_rank(dim: int, exponent: float, multiplier: float) -> int:
    """RWKV-7's default LoRA width: multiplier x dim^exponent rounded to a multiple of 32."""
    return max(1, round(dim ** exponent * multiplier / 32)) * 32


@dataclass
class RWKVConfig:
    head_dim: int = 64  # N: channels per head (heads = dim / N)
    chunk: int = 16  # tokens per chunk of the training form
    # LoRA widths of the decay, in-context learning rate, value residual and gate (0: RWKV-7's defaults)
    decay_rank: int = 0
    iclr_rank: int = 0
    value_rank: int = 0
    gate_rank: int = 0

    def resolve(self, dim: int) -> None:
        for name, e, m in (("decay_rank", 0.5, 1.8), ("iclr_rank", 0.5, 1.8), ("value_rank", 0.5, 1.3),
                           ("gate_rank", 0.8, 0.6)):
            if getattr(self, name) == 0:
                setattr(self, name, lora_rank(dim, e, m))

    def validate(self, dim: int) -> list[tuple[bool, str]]:
        return [(1 <= self.head_dim <= dim and dim % self.head_dim == 0,
                 f"--rwkv-head-dim {self.head_dim} must divide --dim {dim}"),
                (1 <= self.chunk <= 64, f"--rwkv-chunk {self.chunk} must be in [1, 64] (longer chunks would "
                                         "overflow float32's range in the decay factors)"),
                *[(1 <= getattr(self, n) <= 4096, f"rwkv {n} {getattr(self, n)} must be in [1, 4096]")
                  for n in ("decay_rank", "iclr_rank", "value_rank", "gate_rank")]]


# ------------------------------------------------------------------------ the recurrence
@full_precision
def wkv7_steps(r, log_w, k, v, a, b, S):
    """S_t = S_{t-1} diag(w_t) + (S_{t-1} a_t) b_t^T + v_t k_t^T, o_t = S_t r_t, token by token.
    r, log_w, k, v, a, b: [B, H, T, N]; S: [B, H, N (value), N (key)]. Returns (o, final S)."""
    outs = []
    for t in range(r.shape[2]):
        sa = (S * a[:, :, t, None, :]).sum(-1)
        S = S * torch.exp(log_w[:, :, t, None, :]) + v[:, :, t, :, None] * k[:, :, t, None, :] \
            + sa[..., None] * b[:, :, t, None, :]
        outs.append((S * r[:, :, t, None, :]).sum(-1))
    return torch.stack(outs, 2), S


@full_precision
def wkv7_chunked(r, log_w, k, v, a, b, S0, chunk: int):
    """`wkv7_steps` in chunks of `chunk` tokens (any length). Within a chunk, with g the
    inclusive cumulative log decay and h_t = S_{t-1} a_t:
        h_t = S0 a~_t + sum_{s<t} h_s (b^_s . a~_t) + v_s (k^_s . a~_t),
        a~_t = a_t e^{g_{t-1}},  b^_s = b_s e^{-g_s},  k^_s = k_s e^{-g_s}
    a unit lower-triangular system H = W S0^T + U; the outputs and the state at the
    chunk's end are then sums over H and v. Only S0 -> S_end runs chunk by chunk."""
    B, H, T, N = r.shape
    L = min(chunk, T)
    n = -(-T // L)
    pad = n * L - T
    r, log_w, k, v, a, b = (F.pad(t, (0, 0, 0, pad)).reshape(B, H, n, L, N) if pad else t.reshape(B, H, n, L, N)
                            for t in (r, log_w, k, v, a, b))
    g = log_w.cumsum(3)
    last = g[:, :, :, -1:]  # [B, H, n, 1, N]
    a_q, r_q = a * torch.exp(g - log_w), r * torch.exp(g)  # decayed from the chunk's start: <= 1
    inv = torch.exp(-g)  # <= 0.545^-L
    b_k, k_k = b * inv, k * inv
    ones = torch.ones(L, L, dtype=torch.bool, device=r.device)
    strict, incl = ones.tril(-1), ones.tril()

    def masked(x, y, mask):
        return (x @ y.transpose(-1, -2)).masked_fill(~mask, 0.0)

    A_ab, A_ak = masked(a_q, b_k, strict), masked(a_q, k_k, strict)
    P_rb, P_rk = masked(r_q, b_k, incl), masked(r_q, k_k, incl)
    # (I - A_ab) X = rhs; unitriangular: the (zero) diagonal of -A_ab is taken as 1
    W = torch.linalg.solve_triangular(-A_ab, a_q, upper=False, unitriangular=True)
    U = torch.linalg.solve_triangular(-A_ab, A_ak @ v, upper=False, unitriangular=True)
    to_end = torch.exp(last - g)
    b_e, k_e = b * to_end, k * to_end
    M = torch.diag_embed(torch.exp(last[:, :, :, 0])) + W.transpose(-1, -2) @ b_e  # S_end = S0 M + Nc
    Nc = U.transpose(-1, -2) @ b_e + v.transpose(-1, -2) @ k_e
    S, starts = S0, []
    for Mc, Nc_c in zip(M.unbind(2), Nc.unbind(2)):  # unbind: one backward for all chunks, not n selects
        starts.append(S)
        S = S @ Mc + Nc_c
    Sst = torch.stack(starts, 2)
    o = (r_q + P_rb @ W) @ Sst.transpose(-1, -2) + P_rb @ U + P_rk @ v
    return o.reshape(B, H, n * L, N)[:, :, :T], S


# ------------------------------------------------------------------------ time mixing
def _uniform_ratio(C: int, layer: int, n_layers: int) -> tuple[torch.Tensor, float, float]:
    """RWKV-7's init helpers: channel ramp i/C, and the layer ratios 0 -> 1 and 1 -> ~0."""
    return torch.arange(C, dtype=torch.float64) / C, layer / max(1, n_layers - 1), 1.0 - layer / n_layers


def _set(p: torch.Tensor, value: torch.Tensor) -> None:
    if not p.is_meta:
        with torch.no_grad():
            p.copy_(value.reshape(p.shape).to(p.dtype))


class RWKV7(Mixer):
    KIND = "rwkv"
    TRUNCATABLE = False
    # receptance/key/value/output are the hidden matrices; the LoRAs and per-channel mixes are
    # small adapters RWKV trains without weight decay (and not for Muon).
    ROLES = {"lerp": SCALAR, "w0": SCALAR, "w1.weight": SCALAR, "w2.weight": SCALAR, "a0": SCALAR,
             "a1.weight": SCALAR, "a2.weight": SCALAR, "v0": SCALAR, "v1.weight": SCALAR, "v2.weight": SCALAR,
             "g1.weight": SCALAR, "g2.weight": SCALAR, "k_k": SCALAR, "k_a": SCALAR, "r_k": SCALAR,
             "receptance.weight": MATRIX, "key.weight": MATRIX, "value.weight": MATRIX, "output.weight": MATRIX,
             "ln_w": NORM, "ln_b": SCALAR}
    WRITERS = ("output.weight",)

    def __init__(self, cfg: "ModelConfig", layer: int):
        super().__init__()
        c, C = cfg.rwkv, cfg.dim
        self.head_size, self.n_heads, self.chunk = c.head_dim, C // c.head_dim, c.chunk
        self.layer, self.n_layers = layer, cfg.n_layers
        self.first = layer == cfg.layer_mixers().index(self.KIND)  # sets v_first for the later layers
        self.ffn_shift = cfg.ffn.kind == RWKVChannelMix.KIND

        def lin(i, o):
            return nn.Linear(i, o, bias=False)

        self.lerp = nn.Parameter(torch.empty(len(LERPS), C))
        self.w0, self.w1, self.w2 = nn.Parameter(torch.empty(C)), lin(C, c.decay_rank), lin(c.decay_rank, C)
        self.a0, self.a1, self.a2 = nn.Parameter(torch.empty(C)), lin(C, c.iclr_rank), lin(c.iclr_rank, C)
        if not self.first:
            self.v0, self.v1, self.v2 = nn.Parameter(torch.empty(C)), lin(C, c.value_rank), lin(c.value_rank, C)
        self.g1, self.g2 = lin(C, c.gate_rank), lin(c.gate_rank, C)
        self.k_k, self.k_a = nn.Parameter(torch.empty(C)), nn.Parameter(torch.empty(C))
        self.r_k = nn.Parameter(torch.empty(self.n_heads, self.head_size))
        self.receptance, self.key, self.value, self.output = lin(C, C), lin(C, C), lin(C, C), lin(C, C)
        self.ln_w, self.ln_b = nn.Parameter(torch.empty(C)), nn.Parameter(torch.empty(C))

    def init_weights(self, init: Init) -> None:
        """RWKV-7's initialisation (RWKV-LM v7): token-shift mixes from a per-channel ramp,
        decay speeds from -6 to 0 across channels (faster decay in lower layers), zero
        first LoRA matrices, small second ones."""
        C = self.lerp.shape[1]
        ddd, r01, r10 = _uniform_ratio(C, self.layer, self.n_layers)
        powers = {"r": 0.2, "w": 0.9, "k": 0.7, "v": 0.7, "a": 0.9, "g": 0.2}
        _set(self.lerp, torch.stack([1 - ddd ** (powers[x] * r10) for x in LERPS]))
        n = torch.arange(C, dtype=torch.float64)
        linear = n / (C - 1 if C > 1 else 1) - 0.5
        _set(self.w0, -6 + 6 * (n / max(1, C - 1)) ** (1 + r01 ** 0.3) + 0.5)
        _set(self.a0, linear * 0.4)
        for first, second in ((self.w1, self.w2), (self.a1, self.a2), (self.g1, self.g2)) + \
                (((self.v1, self.v2),) if not self.first else ()):
            init.fill_(first.weight, 0.0)
            init.normal_(second.weight, 0.1 / math.sqrt(C))
        if not self.first:
            _set(self.v0, 1.0 + linear * 0.73)
        _set(self.k_k, 0.71 - linear * 0.1)
        init.fill_(self.k_a, 1.02)
        init.fill_(self.r_k, -0.04)
        s = 1 / math.sqrt(C)
        init.uniform_(self.receptance.weight, -0.5 * s, 0.5 * s)
        init.uniform_(self.key.weight, -0.05 * s, 0.05 * s)
        init.uniform_(self.value.weight, -0.5 * s, 0.5 * s)
        init.resid_(self.output.weight)
        init.fill_(self.ln_w, ((1 + self.layer) / self.n_layers) ** 0.7)
        init.fill_(self.ln_b, 0.0)

    def flops_per_token(self, seq_len: int) -> float:
        # every matrix (LoRAs included), plus the chunked recurrence per head: four L x L
        # products and two triangular solves (~6 L N), the chunk's state maps (~5 N^2) and
        # the chunk-to-chunk product (N^3 / L); x3 for backward.
        L, N = min(self.chunk, seq_len), self.head_size
        wkv = self.n_heads * 2 * (6 * L * N + 5 * N * N + N ** 3 / L)
        return 6.0 * sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear)) + 3.0 * wkv

    def forward(self, x: torch.Tensor, ctx: Context, layer: int) -> torch.Tensor:
        B, T, C = x.shape
        H, N = self.n_heads, self.head_size
        st = state_of(ctx, layer)
        xx = token_shift(x, carried(st, "shift", ctx, (C,), x)) - x
        keep(st, "shift", ctx, x[:, -1])
        xr, xw, xk, xv, xa, xg = (x + xx * self.lerp[i] for i in range(len(LERPS)))
        f = wide(x.dtype)
        r, k, v = self.receptance(xr).to(f), self.key(xk).to(f), self.value(xv).to(f)
        log_w = -DECAY_SCALE * torch.sigmoid(self.w0 + self.w2(torch.tanh(self.w1(xw))).to(f))
        if self.first:
            ctx.cache["rwkv_v_first"] = v
        else:
            v = v + (ctx.cache["rwkv_v_first"] - v) * torch.sigmoid(self.v0 + self.v2(self.v1(xv)).to(f))
        a = torch.sigmoid(self.a0 + self.a2(self.a1(xa)).to(f))
        g = self.g2(torch.sigmoid(self.g1(xg)))

        def heads(t):  # [B, T, C] -> [B, H, T, N]
            return t.reshape(B, T, H, N).transpose(1, 2)

        kk = F.normalize(heads(k * self.k_k), dim=-1, eps=1e-12)
        k = k * (1 + (a - 1) * self.k_a)
        r, k, v, a, log_w = heads(r), heads(k), heads(v), heads(a), heads(log_w)
        S0 = carried(st, "wkv", ctx, (H, N, N), r)
        if T == 1 and st is not None:
            o, S = wkv7_steps(r, log_w, k, v, -kk, kk * a, S0)
        else:
            o, S = wkv7_chunked(r, log_w, k, v, -kk, kk * a, S0, self.chunk)
        keep(st, "wkv", ctx, S)
        bonus = (r * k * self.r_k[:, None].to(f)).sum(-1, keepdim=True) * v  # the current token's own v
        o = F.layer_norm(o, (N,), eps=GROUP_NORM_EPS).transpose(1, 2).reshape(B, T, C)
        o = o * self.ln_w.to(f) + self.ln_b.to(f) + bonus.transpose(1, 2).reshape(B, T, C)
        return self.output((o * g.to(f)).to(x.dtype))

    def new_state(self, batch: int, max_len: int, device, dtype) -> TensorState:
        shapes = {"shift": (self.lerp.shape[1],), "wkv": (self.n_heads, self.head_size, self.head_size)}
        if self.ffn_shift:
            shapes["ffn_shift"] = (self.lerp.shape[1],)
        return recurrent_state(batch, device, dtype, **shapes)

    @classmethod
    def external(cls, cfg: "ModelConfig", layer: int, fmt: str) -> list[External]:
        """llama.cpp's RWKV-7 time-mixing tensors (the `arwkv7` architecture's): the six
        token-shift mixes as one [6, 1, 1, C] tensor, r_k flattened, every LoRA and vector
        in float32 (llama.cpp's quantizer leaves them alone). The first layer has no value
        residual, but llama.cpp loads (and ignores) v0/v1/v2 there: the a0/a1/a2 tensors
        stand in, as its converter does."""
        if fmt == "hf":
            return super().external(cfg, layer, fmt)
        from gguf import MODEL_TENSOR as T

        first = layer == cfg.layer_mixers().index(cls.KIND)
        out = [External("lerp", gguf_name(T.TIME_MIX_LERP_FUSED, layer), convert=lambda m: m[:, None, None, :],
                        f32=True)]
        for p in "wav":
            src = "a" if (p == "v" and first) else p
            out += [External(f"{src}0", gguf_name(getattr(T, f"TIME_MIX_{p.upper()}0"), layer), f32=True),
                    External(f"{src}1.weight", gguf_name(getattr(T, f"TIME_MIX_{p.upper()}1"), layer), f32=True),
                    External(f"{src}2.weight", gguf_name(getattr(T, f"TIME_MIX_{p.upper()}2"), layer), f32=True)]
        out += [External("g1.weight", gguf_name(T.TIME_MIX_G1, layer), f32=True),
                External("g2.weight", gguf_name(T.TIME_MIX_G2, layer), f32=True),
                External("k_k", gguf_name(T.TIME_MIX_K_K, layer), f32=True),
                External("k_a", gguf_name(T.TIME_MIX_K_A, layer), f32=True),
                External("r_k", gguf_name(T.TIME_MIX_R_K, layer), convert=lambda m: m.reshape(-1), f32=True),
                External("key.weight", gguf_name(T.TIME_MIX_KEY, layer)),
                External("value.weight", gguf_name(T.TIME_MIX_VALUE, layer)),
                External("receptance.weight", gguf_name(T.TIME_MIX_RECEPTANCE, layer)),
                External("ln_w", gguf_name(T.TIME_MIX_LN, layer), f32=True),
                External("ln_b", gguf_name(T.TIME_MIX_LN, layer).removesuffix(".weight") + ".bias", f32=True),
                External("output.weight", gguf_name(T.TIME_MIX_OUTPUT, layer))]
        return out


# ------------------------------------------------------------------------ channel mixing
class RWKVChannelMix(FeedForward):
    """RWKV-7's channel mixing, `--mlp rwkv`: a ReLU^2 feed-forward (hidden `--ffn-mult` x
    dim, default 4) on a token-shifted mix of its input."""

    KIND = "rwkv"
    CONTEXTUAL = True
    ROLES = {"x_k": SCALAR, "key.weight": MATRIX, "value.weight": MATRIX}
    WRITERS = ("value.weight",)

    def __init__(self, cfg: "ModelConfig", layer: int):
        super().__init__()
        self.layer, self.n_layers = layer, cfg.n_layers
        self.x_k = nn.Parameter(torch.empty(cfg.dim))
        self.key = nn.Linear(cfg.dim, cfg.ffn.hidden, bias=False)
        self.value = nn.Linear(cfg.ffn.hidden, cfg.dim, bias=False)

    def init_weights(self, init: Init) -> None:
        ddd, _, r10 = _uniform_ratio(self.x_k.shape[0], self.layer, self.n_layers)
        _set(self.x_k, 1 - ddd ** (r10 ** 4))
        init.normal_(self.key.weight)
        init.resid_(self.value.weight)

    def flops_per_token(self, seq_len: int) -> float:
        return 6.0 * (self.key.weight.numel() + self.value.weight.numel())

    def forward(self, x: torch.Tensor, ctx: Context, layer: int) -> torch.Tensor:
        st = state_of(ctx, layer)
        xx = token_shift(x, carried(st, "ffn_shift", ctx, (x.shape[-1],), x)) - x
        keep(st, "ffn_shift", ctx, x[:, -1])
        return self.value(F.relu(self.key(x + xx * self.x_k)).square())

    @classmethod
    def external(cls, cfg: "ModelConfig", layer: int, fmt: str) -> list[External]:
        if fmt == "hf":
            return super().external(cfg, layer, fmt)
        raise Unsupported("RWKV-7's channel mixing (--mlp rwkv): llama.cpp's rwkv7 architecture normalises with "
                          "LayerNorm (with biases, plus one after the embedding) where smedjan's blocks use RMSNorm; "
                          "train with --mlp swiglu to export as llama.cpp's arwkv7")
