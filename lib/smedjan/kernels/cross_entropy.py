"""Cross-entropy of a chunk of logits and its gradient, in one pass: a Triton kernel beside
its reference, `ce_chunk_torch` (the part of the fused linear cross-entropy that touches the
[chunk, vocab] logits; the matmuls around it are in `smedjan.kernels.linear_ce`).

For raw logits z (before soft-capping), targets y and per-row loss
    c = C tanh(z / C) (C = softcap; c = z when 0),  lse = logsumexp(c),
    loss = lse - c[y] + z_loss * lse^2                (0 where y == ignore_index)
the gradient with respect to z is
    (softmax(c) * (1 + 2 z_loss lse) - onehot(y)) * (1 - (c / C)^2).
The Triton kernel makes two passes over each row (an online max and sum of exponentials,
then the gradient) and writes the gradient over the logits in place, so a chunk needs one
[chunk, vocab] buffer in all (Liger-Kernel's cross_entropy does the same).

    loss, dz = ce_chunk_triton(z, y, softcap=15.0, ignore_index=-1, z_loss=1e-4)   # dz is z
"""

from __future__ import annotations

import torch

from smedjan.kernels.launch import runs_on, tl, triton
from smedjan.kernels.reference import ce_chunk_torch

BLOCK = 1024

_ce_rows = None
if triton is not None:
    @triton.jit
    def _ce_rows(Z, Y, LOSS, stride, n_vocab, ignore_index, softcap, z_loss, HAS_CAP: tl.constexpr,
                 BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = Z + row * stride
        y = tl.load(Y + row)
        valid = y != ignore_index
        ys = tl.where(valid, y, 0)
        m = -float("inf")
        d = 0.0
        for start in range(0, n_vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_vocab
            c = tl.load(base + cols, mask=mask, other=0.0)
            if HAS_CAP:  # tanh(x) = 2 sigmoid(2x) - 1
                c = softcap * (2.0 * tl.sigmoid(2.0 * c / softcap) - 1.0)
            c = tl.where(mask, c, -float("inf"))
            m_new = tl.maximum(m, tl.max(c, axis=0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(c - m_new), axis=0)
            m = m_new
        lse = m + tl.log(d)
        cy = tl.load(base + ys)
        if HAS_CAP:
            cy = softcap * (2.0 * tl.sigmoid(2.0 * cy / softcap) - 1.0)
        loss = lse - cy + z_loss * lse * lse
        keep = valid.to(tl.float32)
        for start in range(0, n_vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_vocab
            c = tl.load(base + cols, mask=mask, other=0.0)
            if HAS_CAP:
                c = softcap * (2.0 * tl.sigmoid(2.0 * c / softcap) - 1.0)
            g = tl.exp(c - lse) * (1.0 + 2.0 * z_loss * lse) - tl.where(cols == ys, 1.0, 0.0)
            if HAS_CAP:
                g = g * (1.0 - (c / softcap) * (c / softcap))
            tl.store(base + cols, g * keep, mask=mask)
        tl.store(LOSS + row, loss * keep)


def ce_chunk_triton(z: torch.Tensor, y: torch.Tensor, *, softcap: float = 0.0, ignore_index: int = -100,
                    z_loss: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """As `ce_chunk_torch`, overwriting the contiguous float32 `z` with the gradient; the
    reference where the kernel cannot run."""
    if z.dtype != torch.float32 or not z.is_contiguous() or not runs_on(_ce_rows, z, y):
        return ce_chunk_torch(z, y, softcap=softcap, ignore_index=ignore_index, z_loss=z_loss)
    n, V = z.shape
    loss = torch.empty(n, dtype=torch.float32, device=z.device)
    _ce_rows[(n,)](z, y.contiguous(), loss, z.stride(0), V, ignore_index, float(softcap or 1.0), float(z_loss),
                   HAS_CAP=bool(softcap), BLOCK=min(BLOCK, triton.next_power_of_2(V)))
    return loss, z
