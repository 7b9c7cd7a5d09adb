"""BitNet b1.58 (`--bitnet`; Ma et al. 2024, "The Era of 1-bit LLMs"): every hidden linear
layer of the blocks runs with ternary weights and 8-bit activations, trained through a
straight-through estimator; the embedding and the output head stay full precision.

- Weights, per matrix (absmean): s = mean|W|, W_q = clamp(round(W / s), -1, 1) x s, so
  the forward sees at most three values {-s, 0, +s} per matrix.
- Activations, per token (absmax): m = max|x| over the features, x_q = clamp(round(x x
  127 / m), -128, 127) x m / 127: at most 256 levels per token.
- Straight-through estimator: the backward treats both quantisers as the identity, so the
  gradients are F.linear's at (x_q, W_q), passed unchanged to x and to the full-precision
  master W that the optimizer keeps. Written as an autograd.Function rather than the
  spec's `x + (q(x) - x).detach()`: that form is the same gradient but its forward value
  is x + (q - x) in floating point, which can miss q by an ulp (more than 3 values).
- Norms: we rely on the blocks' pre-norms (mixer_norm, ffn_norm: RMSNorm in front of the
  q/k/v, gate and up projections) and add no SubLN of our own before the output
  projections (wo, w2). The absmax quantiser is invariant to a per-token scale, so a
  gain-free RMSNorm in front of it would only rescale each token's output; a gained one
  would add parameters, new state-dict names and a layout llama.cpp's llama blocks lack.

How it is applied: from outside the parts (as torchtitan's float8 conversion). `convert`
turns every nn.Linear inside `model.layers` into a `BitLinear` (a subclass: the parameter
keeps its name `weight`, so checkpoints, optimizer roles and state-dict names do not
change) and wraps each mixer's and feed-forward's forward in a `BitNetMode`, a
TorchFunctionMode that quantises the linear calls the parts make on those weights
directly (`F.linear(x, self.wq.weight)`, and `torch.cat` of several of them, which the
fused q/k/v and gate/up matmuls use: each matrix keeps its own scale). The Transformer
calls `convert` when `ModelConfig.bitnet` is set, so every tool that builds the model
from a checkpoint (train, resume, sft, dpo, eval, generate, chat, serve) runs the same
quantised forward. The parts it knows: attention, block_sparse and linear_attn mixers,
swiglu and relu2 feed-forwards (`checks` refuses the rest: their weights are batched
tensors or are read outside a linear call).

    cfg = ModelConfig.make(vocab_size=256, dim=32, n_layers=2, n_heads=2, bitnet=True)
    model = Transformer(cfg)                    # every block linear is a BitLinear
    w = model.layers[0].mixer.wq.weight         # the full-precision master weight
    assert len(torch.unique(weight_quant(w))) <= 3
"""

from __future__ import annotations

import types
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

if TYPE_CHECKING:
    from smedjan.model.config import ModelConfig

WEIGHT_EPS = 1e-5  # floor of mean|W| (an all-zero matrix stays zero)
ACT_EPS = 1e-5  # floor of max|x| (an all-zero token stays zero)
ACT_MAX = 127  # int8: codes in [-128, 127]
MIXERS = ("attention", "block_sparse", "linear_attn")
FEED_FORWARDS = ("swiglu", "relu2")


def checks(cfg: ModelConfig) -> list[tuple[bool, str]]:
    """Config checks: BitNet quantises the parts whose projections are nn.Linear layers
    used through linear calls."""
    if not cfg.bitnet:
        return []
    other = sorted({m for m in cfg.layer_mixers() if m not in MIXERS})
    mixers = f"`bitnet` quantises the linear layers of the {', '.join(MIXERS)} mixers; not {', '.join(other)}"
    ffn = f"`bitnet` quantises the {' and '.join(FEED_FORWARDS)} feed-forwards; not --mlp {cfg.ffn.kind}"
    return [(not other, mixers), (cfg.ffn.kind in FEED_FORWARDS, ffn)]


# ------------------------------------------------------------------------ quantisers
def weight_codes(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ternary codes in {-1, 0, 1} in w's shape, the scale s = mean|w| >= WEIGHT_EPS),
    computed in float32 at least."""
    wf = w.to(torch.promote_types(w.dtype, torch.float32))
    s = wf.abs().mean().clamp(min=WEIGHT_EPS)
    return (wf / s).round().clamp(-1, 1), s


def act_codes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes in [-128, 127], per-token scale m / 127 with m = max|x| over the last
    dim [..., 1]), computed in float32 at least."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    m = xf.abs().amax(dim=-1, keepdim=True).clamp(min=ACT_EPS)
    return (xf * ACT_MAX / m).round().clamp(-ACT_MAX - 1, ACT_MAX), m / ACT_MAX


class _Ste(torch.autograd.Function):
    """Forward: `q` (the quantised value); backward: the gradient passes to the input unchanged."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return q.view_as(q)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return g, None


def weight_quant(w: torch.Tensor) -> torch.Tensor:
    """W_q = clamp(round(W / s), -1, 1) x s, s = mean|W|, in w's dtype; gradient straight through.
    Recomputed at every call, decoding included: a cache keyed on the weight's version counter
    would go stale, since fused AdamW updates the weights without bumping it."""
    t, s = weight_codes(w.detach())
    return _Ste.apply(w, (t * s).to(w.dtype))


def act_quant(x: torch.Tensor) -> torch.Tensor:
    """x_q = clamp(round(x x 127 / m), -128, 127) x m / 127 per token, in x's dtype; gradient straight through."""
    q, scale = act_codes(x.detach())
    return _Ste.apply(x, (q * scale).to(x.dtype))


def bit_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear at the quantised activations and weights (STE on both)."""
    return F.linear(act_quant(x), weight_quant(w), bias)


class BitLinear(nn.Linear):
    """An nn.Linear whose forward is `bit_linear`; its parameter is still `weight` (the
    full-precision master the optimizer updates)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bit_linear(x, self.weight, self.bias)


# ------------------------------------------------------------------ the direct calls
class BitNetMode(TorchFunctionMode):
    """Quantises the linear calls on `weights` a part makes without its BitLinear's forward:
    F.linear(x, w) -> bit_linear(x, w), and F.linear(x, torch.cat([w1, w2, ...])) -> the
    activation quantiser times the cat of each matrix's own W_q."""

    def __init__(self, weights: list[torch.Tensor]):
        super().__init__()
        self.ids = {id(w) for w in weights}
        self.fused: dict[int, torch.Tensor] = {}  # id -> a cat of quantised weights (kept alive while entered)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            w = args[1] if len(args) > 1 else kwargs["weight"]
            x = args[0] if args else kwargs["input"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if id(w) in self.ids:
                return bit_linear(x, w, bias)
            if self.fused.get(id(w)) is w:
                return F.linear(act_quant(x), w, bias)
        elif func is torch.cat and args and isinstance(args[0], (list, tuple)) and args[0] \
                and all(id(t) in self.ids for t in args[0]):
            out = torch.cat([weight_quant(t) for t in args[0]], *args[1:], **kwargs)
            self.fused[id(out)] = out
            return out
        return func(*args, **kwargs)


def _quantised_forward(self, *args, **kwargs):
    weights = [m.weight for m in self.modules() if isinstance(m, BitLinear)]  # now (FSDP swaps them per forward)
    with BitNetMode(weights):
        return type(self).forward(self, *args, **kwargs)


def convert(layers: nn.Module) -> int:
    """Turn every nn.Linear under `layers` (the blocks) into a BitLinear in place and wrap the
    mixers' and feed-forwards' forwards; parameters and their names are untouched. Returns
    the number of linear layers converted."""
    n = 0
    for m in layers.modules():
        if type(m) is nn.Linear:
            m.__class__ = BitLinear
            n += 1
    for block in layers:
        for part in (block.mixer, block.ffn):
            if "forward" not in part.__dict__:  # a shared block is listed once per layer
                part.forward = types.MethodType(_quantised_forward, part)
    return n
