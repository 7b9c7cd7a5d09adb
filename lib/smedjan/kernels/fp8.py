"""FP8 training matmuls with `torch._scaled_mm`: y = x W^T with both operands cast to
float8 by dynamic scales, forward and backward (the recipes of torchao's float8 training,
written for smedjan's linear calls, which include fused projections no module swap sees).

Each operand is scaled along its contraction dimension so its largest magnitude maps to
the float8 maximum (scales rounded down to a power of two, so scaling is exact):
- `tensorwise`: one scale per tensor; e4m3 for inputs and weights, e5m2 (more range)
  for gradients. nanochat's default: about 1.17x the step speed of bf16 on H100s.
- `rowwise`: one scale per row of each operand (per token of x, per output of W, ...),
  e4m3 throughout: more accurate, slower (torchao reports 0.9x of tensorwise).
The three matmuls (y = x W^T, dx = dy W, dW = dy^T x) each quantize their own operands;
nothing but x and W (high precision) is kept for the backward. Biases are added in high
precision. `_scaled_mm` needs the contraction and output widths to be multiples of 16,
so `eligible` takes a call only then (tokens too, as they are dW's contraction) and when
both widths are at least 128, where FP8 pays; the rest run as before. PyTorch's CPU
`_scaled_mm` runs the same code, which is how the tests check it against an emulation;
the training flag itself requires a GPU of compute capability 8.9 or newer.

    if eligible(x, w): y = fp8_linear(x, w, None, "tensorwise")
"""

from __future__ import annotations

import torch

RECIPES = ("tensorwise", "rowwise")
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
MIN_WIDTH = 128


def eligible_shape(in_features: int, out_features: int) -> bool:
    """The layer filter: both widths multiples of 16 (a `_scaled_mm` requirement) and at
    least MIN_WIDTH (below it the casts cost more than FP8 saves)."""
    return in_features % 16 == 0 and out_features % 16 == 0 and min(in_features, out_features) >= MIN_WIDTH


def eligible(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether F.linear(x, w) can run in FP8: a 2-D float weight of an eligible shape and
    a token count that is a multiple of 16."""
    if w.dim() != 2 or not w.is_floating_point() or not x.is_floating_point() or x.shape[-1] != w.shape[1]:
        return False
    return eligible_shape(w.shape[1], w.shape[0]) and (x.numel() // w.shape[1]) % 16 == 0


def quantize(t: torch.Tensor, dtype: torch.dtype, dim: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 tensor, float32 inverse scale): t x scale in `dtype`, scale a power of two
    chosen so max |t| (over `dim`, keepdim; over everything when None) lands at most at
    the format's maximum."""
    a = t.abs()
    amax = (a.amax() if dim is None else a.amax(dim=dim, keepdim=True)).float()
    scale = torch.exp2(torch.floor(torch.log2(torch.finfo(dtype).max / amax.clamp(min=1e-30))))
    q = (t.float() * scale).clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max).to(dtype)
    return q, scale.reciprocal()


def _mm(a: torch.Tensor, b: torch.Tensor, a_dtype, b_dtype, rowwise: bool, out_dtype, fast: bool = False):
    """a [M, K] @ b [K, N] in float8, each scaled along K (per row of a and column of b
    when rowwise). `_scaled_mm` wants a row-major and b column-major."""
    qa, sa = quantize(a, a_dtype, -1 if rowwise else None)
    qb, sb = quantize(b, b_dtype, 0 if rowwise else None)
    qa = qa.contiguous()
    qb = qb.t().contiguous().t()
    kw = {"use_fast_accum": True} if fast and a.is_cuda else {}
    # rowwise scaling produces bf16 only on CUDA; cast afterwards
    mm_dtype = torch.bfloat16 if rowwise and out_dtype != torch.bfloat16 else out_dtype
    return torch._scaled_mm(qa, qb, scale_a=sa, scale_b=sb, out_dtype=mm_dtype, **kw).to(out_dtype)


class _Fp8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, recipe, out_dtype):
        rowwise = recipe == "rowwise"
        x2 = x.reshape(-1, x.shape[-1])
        with torch.autocast(x.device.type, enabled=False):
            y = _mm(x2, w.t(), E4M3, E4M3, rowwise, out_dtype, fast=True)
        ctx.save_for_backward(x, w)
        ctx.recipe = recipe
        return y.view(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        rowwise = ctx.recipe == "rowwise"
        g_dtype = E4M3 if rowwise else E5M2
        x2, g = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
        with torch.autocast(x.device.type, enabled=False):
            dx = _mm(g, w, g_dtype, E4M3, rowwise, x.dtype) if ctx.needs_input_grad[0] else None
            dw = _mm(g.t(), x2, g_dtype, E4M3, rowwise, torch.float32).to(w.dtype) if ctx.needs_input_grad[1] else None
        return (dx.view(x.shape) if dx is not None else None), dw, None, None


def fp8_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, recipe: str) -> torch.Tensor:
    """F.linear(x, w, bias) with FP8 matmuls (forward and backward) under `recipe`. The
    result is in autocast's dtype when autocast is on, else x's dtype."""
    if recipe not in RECIPES:
        raise ValueError(f"fp8 recipe {recipe!r} is not one of {', '.join(RECIPES)}")
    dev = x.device.type
    out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    y = _Fp8Linear.apply(x, w, recipe, out_dtype)
    return y if bias is None else y + bias.to(y.dtype)
