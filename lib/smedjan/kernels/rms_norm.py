"""RMSNorm as a Triton kernel (forward and backward) beside its reference, `rms_norm_torch`.

y = x / sqrt(mean(x^2) + eps) * w, computed in at least float32 and returned in x's
dtype. The Triton forward keeps 1/rms per row (4 bytes a row) for the backward instead
of the normalised activations, so the backward reads x, dy and w once:
dx = r * (w*dy - x_hat * mean(x_hat * w*dy)), dw = sum over rows of dy * x_hat, with
x_hat = x * r. dw is summed per program over a band of rows, then the bands in torch.

    y = rms_norm_triton(x, w, 1e-6)       # CUDA (or TRITON_INTERPRET=1 on the CPU)
"""

from __future__ import annotations

import torch

from smedjan.kernels.launch import row_block, runs_on, tl, triton
from smedjan.kernels.reference import rms_norm_torch


_rms_fwd = _rms_bwd = None
if triton is not None:
    @triton.jit
    def _rms_fwd(X, W, Y, R, stride, n_cols, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(X + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        r = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        tl.store(R + row, r)
        tl.store(Y + row * stride + cols, (x * r * w).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _rms_bwd(X, W, R, DY, DX, DW, stride, n_rows, n_cols, rows_per_program, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros((BLOCK,), dtype=tl.float32)
        first = pid * rows_per_program
        for i in range(0, rows_per_program):
            row = first + i
            if row < n_rows:
                x = tl.load(X + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
                r = tl.load(R + row)
                x_hat = x * r
                wdy = w * dy
                dx = r * (wdy - x_hat * (tl.sum(x_hat * wdy, axis=0) / n_cols))
                tl.store(DX + row * stride + cols, dx.to(DX.dtype.element_ty), mask=mask)
                dw += dy * x_hat
        tl.store(DW + pid * n_cols + cols, dw, mask=mask)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        n_rows, n_cols = x2.shape
        y = torch.empty_like(x2)
        r = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        _rms_fwd[(n_rows,)](x2, weight, y, r, x2.stride(0), n_cols, eps, BLOCK=row_block(n_cols))
        ctx.save_for_backward(x2, weight, r)
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, r = ctx.saved_tensors
        n_rows, n_cols = x2.shape
        dy2 = dy.reshape(-1, n_cols).contiguous()
        dx = torch.empty_like(x2)
        programs = min(n_rows, 4 * max(1, torch.cuda.get_device_properties(x2.device).multi_processor_count)
                       if x2.is_cuda else 8)
        per = -(-n_rows // programs)
        dw = torch.empty(programs, n_cols, dtype=torch.float32, device=x2.device)
        _rms_bwd[(programs,)](x2, weight, r, dy2, dx, dw, x2.stride(0), n_rows, n_cols, per,
                              BLOCK=row_block(n_cols))
        return dx.view(dy.shape), dw.sum(0).to(weight.dtype), None


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The Triton kernel where it runs (CUDA, or the interpreter), for float32/bf16/fp16;
    the reference otherwise (float64 models, other devices)."""
    if not runs_on(_rms_fwd, x, weight) or x.dtype == torch.float64 or weight.dtype == torch.float64:
        return rms_norm_torch(x, weight, eps)
    return _RMSNorm.apply(x, weight, eps)
