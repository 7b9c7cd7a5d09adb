"""Rotary position embedding as a Triton kernel beside its reference, `apply_rope`.

Hugging Face's half-split layout: the pair rotated together is (i, i + d/2). The
reference rotates in the tables' precision (float32, float64 for a float64 model) and
returns x's dtype. The Triton kernel does the same per row of d numbers, reading q or k
in place through their strides (they are views of the fused QKV projection) and writing
a contiguous result; its backward is the transposed rotation, so nothing but the tables
is kept for it.

    q = rope_triton(q, cos, sin)          # q [B, H, T, d], cos/sin [T, d]; CUDA or TRITON_INTERPRET=1
"""

from __future__ import annotations

import torch

from smedjan.kernels.launch import row_block, runs_on, tl, triton
from smedjan.kernels.reference import apply_rope


_rope = None
if triton is not None:
    @triton.jit
    def _rope(X, COS, SIN, Y, sB, sH, sT, n_heads, half, BACKWARD: tl.constexpr, BLOCK: tl.constexpr):
        bh = tl.program_id(0)
        t = tl.program_id(1)
        b = bh // n_heads
        h = bh % n_heads
        i = tl.arange(0, BLOCK)
        mask = i < half
        src = X + b * sB + h * sH + t * sT
        x1 = tl.load(src + i, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + half + i, mask=mask, other=0.0).to(tl.float32)
        c1 = tl.load(COS + t * 2 * half + i, mask=mask, other=0.0)
        c2 = tl.load(COS + t * 2 * half + half + i, mask=mask, other=0.0)
        s1 = tl.load(SIN + t * 2 * half + i, mask=mask, other=0.0)
        s2 = tl.load(SIN + t * 2 * half + half + i, mask=mask, other=0.0)
        if BACKWARD:  # the transpose of [[c1, -s1], [s2, c2]]
            y1 = x1 * c1 + x2 * s2
            y2 = x2 * c2 - x1 * s1
        else:
            y1 = x1 * c1 - x2 * s1
            y2 = x2 * c2 + x1 * s2
        dst = Y + ((b * n_heads + h) * tl.num_programs(1) + t) * 2 * half
        tl.store(dst + i, y1.to(Y.dtype.element_ty), mask=mask)
        tl.store(dst + half + i, y2.to(Y.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    B, H, T, d = x.shape
    y = torch.empty((B, H, T, d), dtype=x.dtype, device=x.device)
    _rope[(B * H, T)](x, cos, sin, y, x.stride(0), x.stride(1), x.stride(2), H, d // 2, BACKWARD=backward,
                      BLOCK=row_block(d // 2))
    return y


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _launch(x, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        if dy.stride(-1) != 1:
            dy = dy.contiguous()
        return _launch(dy, cos, sin, backward=True), None, None


def rope_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The Triton kernel for the training layout (x [B, H, T, d] with unit stride along d,
    float32 tables [T, d]); the reference for anything else (per-row decode tables,
    float64 models, other devices)."""
    T = x.shape[-2] if x.dim() == 4 else -1
    if (x.dim() != 4 or cos.shape != (T, x.shape[-1]) or cos.dtype != torch.float32 or x.dtype == torch.float64
            or x.stride(-1) != 1 or not runs_on(_rope, x, cos, sin)):
        return apply_rope(x, cos, sin)
    return _Rope.apply(x, cos.contiguous(), sin.contiguous())
