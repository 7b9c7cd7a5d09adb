"""Fused linear cross-entropy: the output head and the loss a chunk of positions at a time,
so no [tokens, vocab] logits tensor is ever kept for the backward.

`_GradInForward` (a scalar loss: mean or sum) computes, per chunk of positions, the logits
h_c W^T, the loss and its gradient with respect to them (`ce_chunk`: the reference or
the Triton kernel), and at once the gradients h_c receives (dz W) and W receives
(dz^T h_c); the backward only scales those two by the incoming gradient (Liger-Kernel's
scheme). What is kept: dh [tokens, dim] and dW [vocab, dim] in float32, never logits.
`_GradInBackward` (per-token losses, as DPO's sequence log-probs need: each token's
upstream gradient is unknown until the backward) keeps h and W only and recomputes each
chunk's logits in the backward. Both take any per-chunk rule (`rows_fn`), which gives
distillation its chunked form as well: the teacher's logits are made chunk by chunk
from its final hidden states, so neither model's [tokens, vocab] logits exist whole.

Matmuls run in the autocast dtype when autocast is on (as `F.linear` would), else in h's
dtype; the per-row losses and gradients are always float32.

    loss = linear_cross_entropy(h, W, y, softcap=15.0, ignore_index=-1)           # mean, scalar
    nll = linear_cross_entropy(h, W, y, ignore_index=-1, reduction="none")        # [B, T]
    loss, kl, ce = linear_distill(h, W, h_teacher, W_teacher, y, temperature=2.0, alpha=0.5)
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from smedjan.kernels.reference import ce_chunk_torch

# rows_fn(z, s, e) -> (rows [n, k] float32, dz [n, V] float32): z the float32 raw logits of
# positions s..e-1; column 0 of rows is the objective per position, dz its gradient.
RowsFn = Callable[[torch.Tensor, int, int], "tuple[torch.Tensor, torch.Tensor]"]


def default_chunk(n: int, dim: int, vocab: int) -> int:
    """Liger-Kernel's rule: a chunk's logits about the size of all hidden states, as a power
    of two (at least 16 positions)."""
    per = max(1, math.ceil(vocab / dim))
    return min(n, max(16, 1 << max(0, math.ceil(math.log2(max(1, math.ceil(n / per)))))))


def compute_dtype(h: torch.Tensor) -> torch.dtype:
    """The matmul dtype F.linear would use here: autocast's when it is on, else h's."""
    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return h.dtype


def _chunk_grads(hc, wc, dz, dh, dw, s, e, cdt):
    dzc = dz.to(cdt)
    dh[s:e] = dzc @ wc
    if dw.dtype == cdt:
        dw.addmm_(dzc.t(), hc[s:e])
    else:
        dw += dzc.t() @ hc[s:e]


class _GradInForward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, rows_fn, scale, chunk):
        cdt = compute_dtype(h)
        with torch.autocast(h.device.type, enabled=False):
            hc, wc = h.to(cdt), w.to(cdt)
            dh = torch.empty(h.shape, dtype=h.dtype, device=h.device)
            dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
            sums = None
            for s in range(0, h.shape[0], chunk):
                e = min(h.shape[0], s + chunk)
                rows, dz = rows_fn((hc[s:e] @ wc.t()).float(), s, e)
                sums = rows.sum(0) if sums is None else sums + rows.sum(0)
                _chunk_grads(hc, wc, dz, dh, dw, s, e, cdt)
            dh.mul_(scale.to(dh.dtype))
            dw.mul_(scale)
        ctx.w_dtype = w.dtype
        ctx.save_for_backward(dh, dw)
        return sums * scale

    @staticmethod
    def backward(ctx, g):
        dh, dw = ctx.saved_tensors
        g0 = g[0]  # the other outputs are metrics, returned detached by the callers
        return dh * g0.to(dh.dtype), (dw * g0).to(ctx.w_dtype), None, None, None


class _GradInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, rows_fn, chunk):
        cdt = compute_dtype(h)
        with torch.autocast(h.device.type, enabled=False):
            hc, wc = h.to(cdt), w.to(cdt)
            out = [rows_fn((hc[s:s + chunk] @ wc.t()).float(), s, min(h.shape[0], s + chunk))[0]
                   for s in range(0, h.shape[0], chunk)]
        ctx.rows_fn, ctx.chunk, ctx.cdt = rows_fn, chunk, cdt
        ctx.save_for_backward(h, w)
        return torch.cat(out)

    @staticmethod
    def backward(ctx, g):
        h, w = ctx.saved_tensors
        cdt, chunk = ctx.cdt, ctx.chunk
        with torch.autocast(h.device.type, enabled=False):
            hc, wc = h.to(cdt), w.to(cdt)
            dh = torch.empty(h.shape, dtype=h.dtype, device=h.device)
            dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
            for s in range(0, h.shape[0], chunk):
                e = min(h.shape[0], s + chunk)
                _, dz = ctx.rows_fn((hc[s:e] @ wc.t()).float(), s, e)
                _chunk_grads(hc, wc, dz * g[s:e, :1].float(), dh, dw, s, e, cdt)
        return dh, dw.to(w.dtype), None, None


def chunked_head(h: torch.Tensor, w: torch.Tensor, rows_fn: RowsFn, *, scale: torch.Tensor | None = None,
                 chunk: int | None = None) -> torch.Tensor:
    """h [N, dim], w [vocab, dim]. With `scale`: the column sums of rows_fn's rows over all
    positions times scale ([k]; gradients computed in the forward, through column 0 only).
    Without: the rows themselves ([N, k]; each chunk recomputed in the backward)."""
    chunk = chunk or default_chunk(h.shape[0], h.shape[1], w.shape[0])
    if scale is None:
        return _GradInBackward.apply(h, w, rows_fn, chunk)
    return _GradInForward.apply(h, w, rows_fn, scale, chunk)


def linear_cross_entropy(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, *, softcap: float = 0.0,
                         ignore_index: int = -100, z_loss: float = 0.0, reduction: str = "mean",
                         chunk: int | None = None, ce_chunk=ce_chunk_torch) -> torch.Tensor:
    """F.cross_entropy(softcap(h W^T), y) without the logits: `reduction` mean (over the
    targets that are not ignore_index), sum, or none (per position, y's shape)."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction {reduction!r} is not mean, sum or none")
    h2, y2 = h.reshape(-1, h.shape[-1]), y.reshape(-1)

    def rows_fn(z, s, e):
        loss, dz = ce_chunk(z, y2[s:e], softcap=softcap, ignore_index=ignore_index, z_loss=z_loss)
        return loss[:, None], dz

    if reduction == "none":
        return chunked_head(h2, w, rows_fn, chunk=chunk)[:, 0].view(y.shape)
    if reduction == "mean":  # 1/0 = inf makes an all-ignored batch NaN, as F.cross_entropy does
        scale = 1.0 / (y2 != ignore_index).sum().to(torch.float32)
    else:
        scale = torch.ones((), dtype=torch.float32, device=h.device)
    return chunked_head(h2, w, rows_fn, scale=scale, chunk=chunk)[0]


def linear_distill(h: torch.Tensor, w: torch.Tensor, h_teacher: torch.Tensor, w_teacher: torch.Tensor,
                   y: torch.Tensor, *, temperature: float, alpha: float, softcap: float = 0.0,
                   teacher_softcap: float = 0.0, chunk: int | None = None):
    """(alpha T^2 KL(p_T || p_S) + (1 - alpha) CE, T^2 KL, CE), each the mean over positions,
    as `smedjan.post.distill.distill_loss` computes them from both models' full logits;
    here from the final hidden states and heads, a chunk of positions at a time."""
    h2, ht2, y2 = h.reshape(-1, h.shape[-1]), h_teacher.reshape(-1, h_teacher.shape[-1]), y.reshape(-1)
    cdt = compute_dtype(h)
    T = temperature

    def cap(z, c):
        return torch.tanh(z / c) * c if c else z

    def rows_fn(z, s, e):
        with torch.no_grad():
            zt = cap((ht2[s:e].to(cdt) @ w_teacher.to(cdt).t()).float(), teacher_softcap)
        cs = cap(z, softcap)
        log_ps = F.log_softmax(cs / T, dim=-1)
        log_pt = F.log_softmax(zt / T, dim=-1)
        pt = log_pt.exp()
        kl = (pt * (log_pt - log_ps)).sum(-1) * T * T
        lse = torch.logsumexp(cs, dim=-1)
        ce = lse - cs.gather(1, y2[s:e, None])[:, 0]
        dz = alpha * T * (log_ps.exp() - pt) + (1 - alpha) * torch.exp(cs - lse[:, None])
        dz.scatter_add_(1, y2[s:e, None], torch.full_like(lse[:, None], alpha - 1))
        if softcap:
            dz = dz * (1.0 - (cs / softcap) ** 2)
        return torch.stack([alpha * kl + (1 - alpha) * ce, kl, ce], dim=1), dz

    scale = torch.full((), 1.0 / h2.shape[0], dtype=torch.float32, device=h.device)
    out = chunked_head(h2, w, rows_fn, scale=scale, chunk=chunk)
    return out[0], out[1].detach(), out[2].detach()
