"""What the recurrent (O(N)) mixers share: decode-state rows, token shift, the causal
depthwise convolution, and linear attention with a scalar decay per head.

Decayed linear attention is the core of two mixers. Per head, with a state S [d_k, d_v]:

    S_t = a_t S_{t-1} + k_t v_t^T        a_t = exp(log_a_t) in (0, 1]
    o_t = S_t^T q_t

Mamba-2's SSD is this with q = C, k = B, v = dt x and log a = dt A; linear attention is it
with a = 1. `stepwise_linear_attention` runs it token by token (decoding, and the
reference of the tests); `chunked_linear_attention` is the same function for training: in
chunks of L tokens, the part within a chunk is a masked (L x L) attention whose decay
factors exp(g_t - g_s) (g the within-chunk cumulative log decay, s <= t) are formed from
differences, so they never exceed 1; the state passes from chunk to chunk once per chunk.
Work is O(T L) instead of O(T^2), state traffic O(T / L).

A recurrent state cannot be cut back to a prefix (`Mixer.TRUNCATABLE = False`): the
engine reuses a row only whole. A prefill from position 0 starts the rows over
(`fresh`); any other forward carries them on.

    o, S = chunked_linear_attention(q, k, v, log_a, S0, chunk=64)   # == stepwise_linear_attention(...)
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from smedjan.model.parts import Context, TensorState


def wide(dtype: torch.dtype) -> torch.dtype:
    """At least float32: recurrences and their decays are never run in bf16/fp16."""
    return torch.promote_types(dtype, torch.float32)


def full_precision(fn):
    """Run `fn` with autocast off: its matmuls stay in their inputs' (float32) precision,
    where autocast would round the decay factors and states to bf16."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        device = next(a for a in args if isinstance(a, torch.Tensor)).device.type
        with torch.autocast(device, enabled=False):
            return fn(*args, **kwargs)
    return run


def fresh(ctx: Context) -> bool:
    """A prefill from position 0: the rows start over, whatever their state held."""
    return not ctx.per_row and ctx.start == 0


def state_of(ctx: Context, layer: int) -> TensorState | None:
    return ctx.states[layer] if ctx.states is not None else None


def carried(st: TensorState | None, name: str, ctx: Context, shape: tuple[int, ...], like: torch.Tensor
            ) -> torch.Tensor:
    """The rows' stored `name` ([B, *shape]), or zeros for training and fresh prefills.
    A copy: the stored tensor is overwritten later in the same forward."""
    if st is None or fresh(ctx):
        return torch.zeros(like.shape[0], *shape, device=like.device, dtype=like.dtype)
    return st.tensors[name][ctx.rows].to(like.dtype, copy=True)


def keep(st: TensorState | None, name: str, ctx: Context, value: torch.Tensor) -> None:
    """Store the rows' new `name` (nothing in training)."""
    if st is not None:
        t = st.tensors[name]
        t[ctx.rows] = value.detach().to(t.dtype)


def recurrent_state(batch: int, device, dtype, **shapes: tuple[int, ...]) -> TensorState:
    """A fixed-size decode state: one [batch, *shape] tensor per name, kept in at least
    float32 (it accumulates over the whole sequence)."""
    dt = wide(dtype)
    return TensorState(**{n: torch.zeros(batch, *s, device=device, dtype=dt) for n, s in shapes.items()})


def token_shift(x: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """x [B, T, C] moved one position later: out[:, 0] = prev [B, C], out[:, t] = x[:, t-1]."""
    return torch.cat([prev[:, None].to(x.dtype), x[:, :-1]], 1)


def causal_conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, prev: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal convolution of x [B, T, C] with w [C, K] and bias b [C]; `prev`
    [B, K-1, C] holds the inputs before x[:, 0]. Returns (y [B, T, C], the last K-1 inputs).
    y[t] = b + sum_k w[:, k] * input[t - (K-1) + k], as llama.cpp's ssm_conv."""
    K = w.shape[1]
    xx = torch.cat([prev.to(x.dtype), x], 1)
    y = F.conv1d(xx.transpose(1, 2), w[:, None, :].to(x.dtype), b.to(x.dtype), groups=w.shape[0])
    return y.transpose(1, 2), xx[:, xx.shape[1] - (K - 1):]


@full_precision
def stepwise_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_a: torch.Tensor | None,
                              S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence one token at a time. q, k: [B, H or 1, T, d_k]; v: [B, H, T, d_v];
    log_a: [B, H, T] or None (no decay); S: [B, H, d_k, d_v]. Returns (o [B, H, T, d_v],
    final S)."""
    outs = []
    for t in range(v.shape[2]):
        if log_a is not None:
            S = torch.exp(log_a[:, :, t])[..., None, None] * S
        S = S + k[:, :, t, :, None] * v[:, :, t, None, :]
        outs.append((q[:, :, t, :, None] * S).sum(-2))
    return torch.stack(outs, 2), S


@full_precision
def chunked_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_a: torch.Tensor | None,
                             S0: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`stepwise_linear_attention` in chunks of `chunk` tokens (see the module docstring);
    any length (the last chunk is padded with tokens that neither decay nor write)."""
    B, H, T, dv = v.shape
    dk = k.shape[-1]
    L = min(chunk, T)
    n = -(-T // L)
    pad = n * L - T
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        log_a = F.pad(log_a, (0, pad)) if log_a is not None else None
    q = q.reshape(B, q.shape[1], n, L, dk)
    k = k.reshape(B, k.shape[1], n, L, dk)
    v = v.reshape(B, H, n, L, dv)
    causal = torch.ones(L, L, dtype=torch.bool, device=v.device).tril()
    scores = q @ k.transpose(-1, -2)  # [B, H or 1, n, L, L]
    if log_a is None:
        o = scores.masked_fill(~causal, 0.0) @ v
        kv = k.transpose(-1, -2) @ v  # [B, H, n, dk, dv]: what each chunk adds to the state
        csum = kv.cumsum(2)
        starts = S0[:, :, None] + csum - kv  # the state before each chunk
        S_end = S0 + csum[:, :, -1]
        o = o + q @ starts
    else:
        g = log_a.reshape(B, H, n, L).cumsum(-1)  # within-chunk cumulative log decay, inclusive
        diff = (g[..., :, None] - g[..., None, :]).masked_fill(~causal, float("-inf"))
        o = (scores * torch.exp(diff)) @ v
        to_end = torch.exp(g[..., -1:] - g)[..., None]  # [B, H, n, L, 1]: decay from token s to chunk end
        kv = (k * to_end).transpose(-1, -2) @ v
        chunk_decay = torch.exp(g[..., -1])  # [B, H, n]
        S, starts = S0, []
        for decay, add in zip(chunk_decay.unbind(2), kv.unbind(2)):  # unbind: one backward, not n selects
            starts.append(S)
            S = decay[..., None, None] * S + add
        S_end = S
        o = o + (q * torch.exp(g)[..., None]) @ torch.stack(starts, 2)
    return o.reshape(B, H, n * L, dv)[:, :, :T], S_end
