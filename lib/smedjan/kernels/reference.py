"""The PyTorch references of the kernels: what every device runs unless Triton is chosen,
and what the Triton kernels (rms_norm.py, rope.py, swiglu.py, cross_entropy.py beside this
file) are tested against. Importing this module never imports Triton.

    y = rms_norm_torch(x, w, 1e-6)
    q = apply_rope(q, cos, sin)
    h = swiglu_torch(gate, up)
    loss, dz = ce_chunk_torch(z, y, softcap=15.0, ignore_index=-1)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) * weight over the last dim, in at least float32, returned in x's dtype."""
    # Normalize in at least float32 (bf16 sums of squares lose too much), return the input
    # dtype. F.rms_norm is one fused kernel instead of five elementwise passes.
    dt = torch.promote_types(x.dtype, torch.float32)
    return F.rms_norm(x.to(dt), (x.shape[-1],), weight.to(dt), eps).type_as(x)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [..., T, d]; cos, sin broadcastable to it ([T, d], or [B, 1, 1, d] for one
    position per row). Rotates pairs (i, i + d/2) in the tables' precision, returns x's dtype."""
    half = x.shape[-1] // 2
    xf = x.to(cos.dtype)
    x1, x2 = xf[..., :half], xf[..., half:]
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * cos + rotated * sin).type_as(x)


def swiglu_torch(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up."""
    return F.silu(gate) * up


def ce_chunk_torch(z: torch.Tensor, y: torch.Tensor, *, softcap: float = 0.0, ignore_index: int = -100,
                   z_loss: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss [n] float32, d loss / d z [n, V] float32) for float32 raw logits z [n, V]:
    cross-entropy of the soft-capped logits (plus z_loss x logsumexp^2), 0 where
    y == ignore_index; the formulas are in `smedjan.kernels.cross_entropy`."""
    c = torch.tanh(z / softcap) * softcap if softcap else z
    lse = torch.logsumexp(c, dim=-1)
    valid = y != ignore_index
    ys = torch.where(valid, y, 0)
    loss = lse - c.gather(1, ys[:, None])[:, 0]
    if z_loss:
        loss = loss + z_loss * lse * lse
    p = torch.exp(c - lse[:, None])
    dz = p * (1.0 + 2.0 * z_loss * lse)[:, None] if z_loss else p
    dz.scatter_add_(1, ys[:, None], torch.full_like(lse[:, None], -1.0))
    if softcap:
        dz = dz * (1.0 - (c / softcap) ** 2)
    keep = valid.to(z.dtype)
    return loss * keep, dz * keep[:, None]
