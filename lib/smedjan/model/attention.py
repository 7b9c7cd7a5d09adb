"""Softmax attention: multi-head or grouped-query, RoPE, optional QK-norm, a window per layer.

`scaled_dot_product_attention` does the work (flash kernels on CUDA). Q, K and V are
three parameters (their own init, roles and external names; Muon orthogonalises each)
but one matmul: the weights are concatenated in the forward, which is cheap next to
the activations. QK-norm (OLMo-2 / Qwen-3 style) normalises each query and key head
with RMSNorm and a learned gain before RoPE, which bounds the attention logits.

The decode state is a KV cache per layer, [B, n_kv_heads, max_len, head_dim]; rows may
sit at different lengths (continuous batching), each attending to its own columns.

    cfg = ModelConfig.make(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, qk_norm=True)
    attn = Attention(cfg, layer=0)
    y = attn(x, ctx, layer=0)                        # x: [B, T, 64]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from smedjan.errors import UserError
from smedjan.model.parts import (MATRIX, NORM, Context, External, Growth, Init, Mixer, TensorState, Unsupported,
                                 gguf_name, hf_name)
from smedjan.model.rope import rope_frequencies

if TYPE_CHECKING:
    from smedjan.model.config import ModelConfig


@dataclass
class AttentionConfig:
    n_heads: int = 4
    n_kv_heads: int = 0  # 0 -> n_heads (multi-head); fewer -> grouped-query attention
    head_dim: int = 0  # 0 -> dim // n_heads
    qk_norm: bool = False
    # Per-layer windows: `window_pattern` is tiled across the layers (the last layer is
    # always L): L layers attend over `sliding_window` tokens (0 = the whole causal
    # prefix), S layers over `short_window` (0 = a quarter of the context rounded up to
    # 128, capped at the context: nanochat's default).
    window_pattern: str = "L"
    sliding_window: int = 0
    short_window: int = 0
    # Softmax scale of q.k (0: 1/sqrt(head_dim)); µP (smedjan.model.mup) sets 1/d scaling.
    scale: float = 0.0

    def resolve(self, dim: int) -> None:
        if self.n_kv_heads == 0:
            self.n_kv_heads = self.n_heads
        if self.head_dim == 0 and self.n_heads > 0 and dim % self.n_heads == 0:
            self.head_dim = dim // self.n_heads

    def validate(self, dim: int, max_seq_len: int) -> list[tuple[bool, str]]:
        return [
            (1 <= self.n_heads <= 4096, f"--heads {self.n_heads} must be in [1, 4096]"),
            (self.head_dim > 0 or dim % self.n_heads == 0, f"--dim {dim} is not divisible by --heads {self.n_heads}"),
            (1 <= self.n_kv_heads <= self.n_heads and self.n_heads % self.n_kv_heads == 0,
             f"--heads {self.n_heads} must be a multiple of --kv-heads {self.n_kv_heads}"),
            (2 <= self.head_dim <= 1024 and self.head_dim % 2 == 0,
             f"head dim {self.head_dim} must be even and in [2, 1024] (RoPE rotates pairs)"),
            (bool(self.window_pattern) and set(self.window_pattern) <= {"S", "L"},
             f"--window-pattern {self.window_pattern!r} must be a string of S and L"),
            (0 <= self.sliding_window <= max_seq_len, f"--sliding-window {self.sliding_window} must be in [0, "
                                                      f"context {max_seq_len}]"),
            (0 <= self.short_window <= max_seq_len, f"--short-window {self.short_window} must be in [0, "
                                                    f"context {max_seq_len}]"),
        ]

    def window(self, layer: int, n_layers: int, max_seq_len: int) -> int:
        """The attention window of `layer` (0: the whole causal prefix)."""
        letter = "L" if layer == n_layers - 1 else self.window_pattern[layer % len(self.window_pattern)]
        if letter == "L":
            return self.sliding_window
        short = self.short_window or min(max_seq_len, math.ceil(max_seq_len / 4 / 128) * 128)
        return 0 if short >= max_seq_len else short


FUSE_MIN_TOKENS = 64


def fused_linear(x: torch.Tensor, weights: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """x @ [w1; w2; ...]^T: one matmul over the concatenated weights when x holds many
    tokens (training, prefill: the copy is small next to the activations), separate
    matmuls for a few (a decode step: copying the weights would cost more than the work)."""
    if x.shape[:-1].numel() >= FUSE_MIN_TOKENS:
        return F.linear(x, torch.cat(weights))
    return torch.cat([F.linear(x, w) for w in weights], dim=-1)


def causal_mask(q_pos: torch.Tensor, n_keys: int, window: int) -> torch.Tensor:
    """Boolean mask (True = attend) of queries at `q_pos` ([T] or [B, T]) over keys
    0..n_keys-1: causal, and within `window` positions when one is set. [T, S] or
    [B, 1, T, S] (broadcast over heads)."""
    k = torch.arange(n_keys, device=q_pos.device)
    q = q_pos[..., None]
    mask = k <= q
    if window:
        mask = mask & ((q - k) < window)
    return mask[:, None] if q_pos.dim() == 2 else mask


def plain_causal(ctx: Context, window: int) -> bool:
    """True when `is_causal` (training or a fresh prefill) says everything: no mask needed."""
    return window == 0 and not ctx.per_row and ctx.start == 0


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: Context, window: int,
           mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """SDPA of q [B, H, T, d] over k, v [B, Hkv, S, d] at ctx's positions (causal, window,
    and `mask` ANDed in when given)."""
    gqa = k.shape[1] != q.shape[1]
    T, S = q.shape[2], k.shape[2]
    if mask is None and plain_causal(ctx, window) and S == T:
        return F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa, scale=scale)
    if mask is None and window == 0 and T == 1 and not ctx.per_row:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa, scale=scale)
    key = ("mask", window, S)
    if key not in ctx.cache:
        ctx.cache[key] = causal_mask(ctx.positions(), S, window)
    m = ctx.cache[key] if mask is None else ctx.cache[key] & mask
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=gqa, scale=scale)


class Attention(Mixer):
    KIND = "attention"
    ROLES = {"wq.weight": MATRIX, "wk.weight": MATRIX, "wv.weight": MATRIX, "wo.weight": MATRIX,
             "q_norm": NORM, "k_norm": NORM}
    WRITERS = ("wo.weight",)

    def __init__(self, cfg: "ModelConfig", layer: int):
        super().__init__()
        a = cfg.attention
        self.n_heads, self.n_kv_heads, self.head_dim = a.n_heads, a.n_kv_heads, a.head_dim
        self.window = a.window(layer, cfg.n_layers, cfg.max_seq_len)
        self.eps = cfg.norm_eps
        self.scale = a.scale or None  # None: SDPA's 1/sqrt(head_dim)
        self.wq = nn.Linear(cfg.dim, a.n_heads * a.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, a.n_kv_heads * a.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, a.n_kv_heads * a.head_dim, bias=False)
        self.wo = nn.Linear(a.n_heads * a.head_dim, cfg.dim, bias=False)
        self.q_norm = nn.Parameter(torch.ones(a.head_dim)) if a.qk_norm else None
        self.k_norm = nn.Parameter(torch.ones(a.head_dim)) if a.qk_norm else None

    def init_weights(self, init: Init) -> None:
        for w in (self.wq, self.wk, self.wv):
            init.normal_(w.weight)
        init.resid_(self.wo.weight)
        for g in (self.q_norm, self.k_norm):
            if g is not None:
                init.fill_(g, 1.0)

    def flops_per_token(self, seq_len: int) -> float:
        # Projections, plus QK^T and AV: 2 x 2 x heads x head_dim x keys per token forward,
        # x3 for backward (causal masking not discounted, as PaLM and nanochat count it).
        keys = min(seq_len, self.window) if self.window else seq_len
        return 6.0 * sum(w.weight.numel() for w in (self.wq, self.wk, self.wv, self.wo)) + \
            12.0 * self.n_heads * self.head_dim * keys

    def qkv(self, x: torch.Tensor, ctx: Context) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [B, H, T, hd] and k, v [B, Hkv, T, hd], normalised (QK-norm) and rotated."""
        B, T, _ = x.shape
        H, Hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = fused_linear(x, (self.wq.weight, self.wk.weight, self.wv.weight))
        # split, not slicing: its backward is one cat, where a slice's zero-fills a full-size buffer
        q, k, v = qkv.split((H * hd, Hkv * hd, Hkv * hd), dim=-1)
        q = q.view(B, T, H, hd).transpose(1, 2)
        k = k.view(B, T, Hkv, hd).transpose(1, 2)
        v = v.view(B, T, Hkv, hd).transpose(1, 2)
        if self.q_norm is not None:
            dt = torch.promote_types(q.dtype, torch.float32)
            q = F.rms_norm(q.to(dt), (hd,), self.q_norm.to(dt), self.eps).type_as(v)
            k = F.rms_norm(k.to(dt), (hd,), self.k_norm.to(dt), self.eps).type_as(v)
        cos, sin = ctx.rope(hd)
        return self.kernels.rope(q, cos, sin), self.kernels.rope(k, cos, sin), v

    def extra_mask(self, q: torch.Tensor, k: torch.Tensor, ctx: Context) -> torch.Tensor | None:
        """A mask ANDed into the causal one (block-sparse attention overrides this)."""
        return None

    def forward(self, x: torch.Tensor, ctx: Context, layer: int) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x, ctx)
        if ctx.states is not None:
            st = ctx.states[layer]
            k = st.write("k", ctx.rows, ctx.start, k)
            v = st.write("v", ctx.rows, ctx.start, v)
        y = attend(q, k, v, ctx, self.window, self.extra_mask(q, k, ctx), scale=self.scale)
        return self.wo(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def new_state(self, batch: int, max_len: int, device, dtype) -> TensorState:
        shape = (batch, self.n_kv_heads, max_len, self.head_dim)
        return TensorState(seq_dim=2, k=torch.zeros(shape, device=device, dtype=dtype),
                           v=torch.zeros(shape, device=device, dtype=dtype))

    @classmethod
    def external(cls, cfg: "ModelConfig", layer: int, fmt: str) -> list[External]:
        a = cfg.attention
        if a.qk_norm:
            raise Unsupported("the attention part with QK-norm (--qk-norm): "
                              + ("llama.cpp's 'llama' architecture" if fmt == "gguf" else "LlamaForCausalLM")
                              + " has no QK-norm")
        w = a.window(layer, cfg.n_layers, cfg.max_seq_len)
        if w and fmt == "gguf":  # HF names it (MistralForCausalLM reads windows; the Llama writer refuses them)
            raise Unsupported(f"attention with a {w}-token sliding window (layer {layer}): llama.cpp's 'llama' "
                              "architecture has no sliding-window attention")
        if fmt == "hf":
            return [External(f"{w}.weight", hf_name(layer, f"self_attn.{p}_proj.weight"))
                    for w, p in (("wq", "q"), ("wk", "k"), ("wv", "v"), ("wo", "o"))]
        from gguf import MODEL_TENSOR as T

        return [External("wq.weight", gguf_name(T.ATTN_Q, layer), a.n_heads),
                External("wk.weight", gguf_name(T.ATTN_K, layer), a.n_kv_heads),
                External("wv.weight", gguf_name(T.ATTN_V, layer)), External("wo.weight", gguf_name(T.ATTN_OUT, layer))]

    # ------------------------------------------------------------------- grow
    @classmethod
    def check_growable(cls, src: "ModelConfig", dst: "ModelConfig") -> None:
        a, b = src.attention, dst.attention
        if b.n_heads < a.n_heads or b.n_kv_heads < a.n_kv_heads:
            raise UserError(f"cannot grow to a smaller model: heads {a.n_heads} -> {b.n_heads}, kv heads "
                            f"{a.n_kv_heads} -> {b.n_kv_heads}")
        if a.head_dim != b.head_dim or src.dim != a.n_heads * a.head_dim:
            raise UserError(f"head dim {a.head_dim} -> {b.head_dim}: the attention scale and RoPE frequencies would "
                            f"change, so no expansion is exact; keep dim / heads = {a.head_dim} (e.g. --size custom "
                            f"--dim {dst.dim} --heads {max(1, dst.dim // a.head_dim)})")
        g_src, g_dst = a.n_heads // a.n_kv_heads, b.n_heads // b.n_kv_heads
        if g_dst < g_src:
            raise UserError(f"query heads per key/value head {g_src} -> {g_dst}: heads that share keys now cannot be "
                            f"separated exactly; use --kv-heads {b.n_heads // g_src}")
        for f in ("qk_norm", "sliding_window", "window_pattern", "short_window"):
            if getattr(a, f) != getattr(b, f):
                raise UserError(f"{f} {getattr(a, f)} -> {getattr(b, f)} cannot change when growing")
        if a.window_pattern != "L" and src.n_layers != dst.n_layers:
            raise UserError(f"a model with --window-pattern {a.window_pattern} keeps its depth when grown (the "
                            "pattern would give old layers other windows)")
        fs = rope_frequencies(src.rope, a.head_dim, src.max_seq_len)
        fd = rope_frequencies(dst.rope, b.head_dim, dst.max_seq_len)
        if fs[1] != fd[1] or not torch.equal(fs[0], fd[0]):
            raise UserError("the RoPE frequencies would change (rope settings or context); grow keeps them")

    @classmethod
    def grow(cls, t: dict[str, torch.Tensor], g: Growth) -> dict[str, torch.Tensor]:
        """Old query heads keep their weights; with GQA (G query heads per kv head) old kv
        head j goes to slot j and its G query heads to the first G slots of group j; new
        heads read at random and write zeros (their `wo` columns)."""
        a, b = g.src.attention, g.dst.attention
        hd = a.head_dim
        g_src, g_dst = a.n_heads // a.n_kv_heads, b.n_heads // b.n_kv_heads
        q_slot = [(i // g_src) * g_dst + i % g_src for i in range(a.n_heads)]
        kv_slot = list(range(a.n_kv_heads))

        def readers(w, slots, n_out):  # wq/wk/wv [heads*hd, d] -> [n_out*hd, d'], random elsewhere
            out = g.rand(n_out * hd, g.d2)
            for i, s in enumerate(slots):
                out[s * hd:(s + 1) * hd, :g.d] = w[i * hd:(i + 1) * hd]
            return out

        wo = torch.zeros(g.d2, b.n_heads * hd, dtype=torch.float64)
        for i, s in enumerate(q_slot):
            wo[:g.d, s * hd:(s + 1) * hd] = t["wo.weight"][:, i * hd:(i + 1) * hd]
        out = {"wq.weight": readers(t["wq.weight"], q_slot, b.n_heads),
               "wk.weight": readers(t["wk.weight"], kv_slot, b.n_kv_heads),
               "wv.weight": readers(t["wv.weight"], kv_slot, b.n_kv_heads), "wo.weight": wo}
        for n in ("q_norm", "k_norm"):  # per head_dim gains: same head_dim, same gains
            if n in t:
                out[n] = t[n]
        return out
