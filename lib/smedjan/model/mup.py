"""µP, the maximal update parametrisation (Yang et al. 2022, Tensor Programs V, tables 3 and 8).

Under the standard parametrisation (SP) a learning rate tuned on a narrow model does not
carry to a wide one: with Adam every hidden-matrix entry moves by about lr per step, so
a matrix's update changes its output by about lr x fan_in, which grows with the width,
and the logits grow with it. µP rescales the parts so that every activation's update
stays of the same size as the width grows, and the learning rate tuned at a base width
transfers (`smedjan train --mup-base WIDTH`). With width_mult = dim / base:

- hidden matrices (role `matrix`): init std 0.02 / sqrt(width_mult) (the projections into
  the residual stream also / sqrt(2 x layers)), Adam learning rate / width_mult, and Adam's
  eps / width_mult too: their gradients shrink like 1 / width under µP, and a fixed eps
  would turn Adam into SGD at large widths (measured: the coordinate check drifts);
- vectors (embedding, norm gains, scalars): init and learning rate unchanged;
- readout: logits = (h x output_mult / width_mult) W^T, with output_mult = 1; the head
  (tied or untied) keeps its 0.02 init and its learning rate;
- attention: logits q.k x 1/sqrt(head_dim x width_mult); with the heads of the base model
  (its head dim = head_dim / width_mult) that is sqrt(base head dim) / head_dim: 1/d
  scaling, equal to SP's 1/sqrt(d) at the base width.

At width_mult 1 the model and its optimizer are exactly SP's: the base width is where the
rates are tuned. The multipliers are part of the saved `ModelConfig` (`mup_base`), so
generate and eval compute the same function. Muon (`--optimizer muon`) keeps its own
width-aware update of the hidden matrices (orthogonalised, scaled by its shape); µP then
sets init, readout and attention only. nanochat's hybrid rescales its AdamW rates by
width itself and is refused.

    cfg = ModelConfig.make(vocab_size=97, dim=512, n_layers=2, n_heads=4, mup_base=64)  # width_mult 8
    model = Transformer(cfg)                          # hidden matrices drawn with std 0.02 / sqrt(8)
    opt = build_optimizer("adamw", param_groups(model, 0.1), OptimizerSettings(lr=3e-3))
    scale_rates(opt, cfg, "adamw")                    # the matrix group's peak_lr becomes 3e-3 / 8
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from smedjan.errors import UserError
from smedjan.model.parts import INIT_STD, MATRIX

if TYPE_CHECKING:
    from smedjan.model.config import ModelConfig

# Mixers whose attention logits µP rescales (the attention part's `scale`); the others
# (MLA's decoupled RoPE keys, recurrent states) have no derivation here and are refused.
MUP_MIXERS = ("attention", "block_sparse")
# Optimizers whose hidden-matrix update is Adam-like (about lr per entry, whatever the width).
ADAM_FAMILY = ("adamw", "adamw-cpu", "adamw-8bit", "sophia")


def width_mult(cfg: "ModelConfig") -> float:
    """dim / mup_base under µP, 1 otherwise."""
    return cfg.dim / cfg.mup_base if cfg.mup_base else 1.0


def checks(cfg: "ModelConfig") -> list[tuple[bool, str]]:
    """ModelConfig.validate's checks of `mup_base` (0: off)."""
    b = cfg.mup_base
    if b == 0:
        return []
    other = sorted(set(cfg.layer_mixers()) - set(MUP_MIXERS))
    hd = cfg.attention.head_dim
    return [(1 <= b <= cfg.dim, f"--mup-base {b} must be a width in [1, the model's dim {cfg.dim}] (0: off)"),
            # the base model has this model's heads: its head dim, head_dim x base / dim, must be whole
            (b > cfg.dim or hd * b % cfg.dim == 0,
             f"--mup-base {b}: the base model's head dim would be {hd * b / cfg.dim:g} (head dim {hd} x base / "
             f"dim {cfg.dim}); choose a base that gives whole heads"),
            (not other, f"--mup-base: µP's attention scale is defined for the {' and '.join(MUP_MIXERS)} mixers, "
                        f"not {', '.join(other)}")]


def attention_scale(cfg: "ModelConfig") -> float:
    """The softmax scale of the attention part: 1/sqrt(head_dim x width_mult) under µP."""
    return 1.0 / math.sqrt(cfg.attention.head_dim * width_mult(cfg))


def init_std(cfg: "ModelConfig") -> float:
    """The init std of the hidden matrices (`Init.std`): 0.02 / sqrt(width_mult)."""
    return INIT_STD / math.sqrt(width_mult(cfg))


def readout(cfg: "ModelConfig", h: torch.Tensor) -> torch.Tensor:
    """The final hidden states [.., dim] as the head reads them: x output_mult / width_mult
    under µP (scaling h, [N, dim], is cheaper than the logits, [N, vocab])."""
    return h * (1.0 / width_mult(cfg)) if cfg.mup_base else h


def scale_rates(optimizer: torch.optim.Optimizer, cfg: "ModelConfig", name: str) -> None:
    """Divide the Adam-family hidden-matrix groups' `peak_lr` (and `lr`, and `eps` where the
    optimizer has one) by width_mult; Muon's groups (kind `muon`) keep theirs. UserError
    for the hybrid."""
    if not cfg.mup_base:
        return
    from smedjan.optim.registry import canonical

    name = canonical(name)
    if name not in ADAM_FAMILY and name != "muon":
        raise UserError(f"`mup_base` scales Adam-family rates by width; `optimizer` {name} already scales its "
                        f"AdamW rates by width (use adamw, adamw-cpu, adamw-8bit, sophia or muon)")
    m = width_mult(cfg)
    for g in optimizer.param_groups:
        if g["role"] == MATRIX and g.get("kind") != "muon":
            g["peak_lr"] /= m
            g["lr"] /= m
            if "eps" in g:
                g["eps"] /= m
