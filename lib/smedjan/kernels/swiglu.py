"""SwiGLU's gate, silu(gate) * up, as a Triton kernel beside its reference, `swiglu_torch`.

The Triton forward computes in float32 and keeps only its inputs; the backward
recomputes silu from them (Liger-Kernel's trade: no [tokens, hidden] intermediate is
stored, where autograd over the reference keeps silu(gate) as well):
d gate = dy * up * s * (1 + gate * (1 - s)), d up = dy * gate * s, with s = sigmoid(gate).

    h = swiglu_triton(gate, up)           # gate, up [..., hidden]; CUDA or TRITON_INTERPRET=1
"""

from __future__ import annotations

import torch

from smedjan.kernels.launch import runs_on, tl, triton
from smedjan.kernels.reference import swiglu_torch

BLOCK = 1024


_swiglu_fwd = _swiglu_bwd = None
if triton is not None:
    @triton.jit
    def _swiglu_fwd(G, U, Y, s_g, s_u, n_cols, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        g = tl.load(G + row * s_g + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + row * s_u + cols, mask=mask, other=0.0).to(tl.float32)
        y = g * tl.sigmoid(g) * u
        tl.store(Y + row * n_cols + cols, y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd(G, U, DY, DG, DU, s_g, s_u, n_cols, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        g = tl.load(G + row * s_g + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + row * s_u + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        s = tl.sigmoid(g)
        dg = dy * u * s * (1.0 + g * (1.0 - s))
        du = dy * g * s
        tl.store(DG + row * n_cols + cols, dg.to(DG.dtype.element_ty), mask=mask)
        tl.store(DU + row * n_cols + cols, du.to(DU.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[rows, cols] with unit stride along cols (a view where possible: the halves of one
    fused projection are views with a row stride of 2 x hidden)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        g, u = _rows(gate), _rows(up)
        n_rows, n_cols = g.shape
        y = torch.empty((n_rows, n_cols), dtype=gate.dtype, device=gate.device)
        _swiglu_fwd[(n_rows, triton.cdiv(n_cols, BLOCK))](g, u, y, g.stride(0), u.stride(0), n_cols, BLOCK=BLOCK)
        ctx.save_for_backward(g, u)
        ctx.shape = gate.shape
        return y.view(gate.shape)

    @staticmethod
    def backward(ctx, dy):
        g, u = ctx.saved_tensors
        n_rows, n_cols = g.shape
        dy2 = dy.reshape(n_rows, n_cols).contiguous()
        dg = torch.empty((n_rows, n_cols), dtype=g.dtype, device=g.device)
        du = torch.empty((n_rows, n_cols), dtype=u.dtype, device=u.device)
        _swiglu_bwd[(n_rows, triton.cdiv(n_cols, BLOCK))](g, u, dy2, dg, du, g.stride(0), u.stride(0), n_cols,
                                                           BLOCK=BLOCK)
        return dg.view(ctx.shape), du.view(ctx.shape)


def swiglu_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The Triton kernel for same-dtype float32/bf16/fp16 inputs where it runs; the
    reference otherwise."""
    if (gate.dtype != up.dtype or gate.shape != up.shape or gate.dtype == torch.float64
            or not runs_on(_swiglu_fwd, gate, up)):
        return swiglu_torch(gate, up)
    return _SwiGLU.apply(gate, up)
