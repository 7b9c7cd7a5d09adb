"""The regularisers and the weight average of the research menu, applied to a model from
outside its parts (as the levers are): every mixer and feed-forward gets them.

- `--dropout p`: residual dropout (GPT-2's resid_pdrop, nanoGPT's resid_dropout): each
  mixer's and feed-forward's output is dropped elementwise (kept ones scaled by 1/(1-p))
  before it joins the residual stream. Attention probabilities, the embedding and the
  logits are left alone.
- `--stochastic-depth p`: drop-path per block (Huang et al. 2016, "Deep Networks with
  Stochastic Depth"): block l of L (1-based) survives with probability
  s_l = 1 - p l / L (the linear decay rule: 1 - p at the last block), drawn per sequence;
  out = x + mask / s_l (block(x) - x), so a dropped sequence passes the block unchanged
  and the expectation equals the plain block. The block is still computed for every
  sequence (DDP needs every parameter in every backward).
- `--noise-scale eta`: annealed Gaussian gradient noise (Neelakantan et al. 2015, "Adding
  Gradient Noise Improves Learning for Very Deep Networks"): at step t (0-based) every
  trainable gradient element gets N(0, sigma_t^2), sigma_t^2 = eta / (1 + t)^0.55, added
  after clipping (the clip bounds the data gradient; the noise keeps its stated variance).
  The noise is drawn from a generator seeded by (--seed, t): a pure function of the step,
  so a resumed run adds the same noise and every DDP rank the same.
- `--freeze-fraction f`: the first floor(f L) blocks stop training (requires_grad off
  before the optimizer is built, so it holds no state for them and weight decay never
  touches them); the embedding (the tied head), the final norm and later blocks train.
- `--ema-decay`: `smedjan.training.ema.EMA`, driven by the Trainer through `Extras`.

Dropout and drop-path act in training mode only: `model.eval()` (validation, sampling,
export) runs the plain model. Their masks come from torch's global generator, which
state_N.bin saves and restores, so resuming stays bit-exact.

    reg = regularisers_of(o)              # one-line errors for values out of range
    extras = prepare(model, reg, cfg)     # freezes (before the optimizer is built)
    extras.wrap(model)                    # dropout and drop-path (after apply_levers)
    trainer = Trainer(..., extras=extras)
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from smedjan.errors import UserError
from smedjan.model.sharing import first_uses
from smedjan.training.ema import EMA

NOISE_GAMMA = 0.55  # Neelakantan et al.'s annealing exponent
_NOISE_STREAM = 0x6E6F697365  # keeps the noise generator's seeds apart from other users of --seed


@dataclass(frozen=True)
class Regularisers:
    ema_decay: float = 0.0
    dropout: float = 0.0
    stochastic_depth: float = 0.0
    noise_scale: float = 0.0
    freeze_fraction: float = 0.0
    seed: int = 0

    def describe(self) -> str:
        on = [f"EMA {self.ema_decay:g}" if self.ema_decay else "",
              f"dropout {self.dropout:g}" if self.dropout else "",
              f"stochastic depth {self.stochastic_depth:g}" if self.stochastic_depth else "",
              f"gradient noise {self.noise_scale:g}" if self.noise_scale else "",
              f"frozen fraction {self.freeze_fraction:g}" if self.freeze_fraction else ""]
        return ", ".join(s for s in on if s)


def regularisers_of(o) -> Regularisers:
    """The regularisers a RunOptions asks for; one-line errors for values out of range."""
    def fraction(name: str, v: float) -> None:
        if not (math.isfinite(v) and 0.0 <= v < 1.0):
            raise UserError(f"`{name}` {v} must be in [0, 1)")

    for name in ("ema_decay", "dropout", "stochastic_depth", "freeze_fraction"):
        fraction(name, getattr(o, name))
    if not (math.isfinite(o.noise_scale) and o.noise_scale >= 0):
        raise UserError(f"`noise_scale` {o.noise_scale} must be >= 0")
    return Regularisers(ema_decay=o.ema_decay, dropout=o.dropout, stochastic_depth=o.stochastic_depth,
                        noise_scale=o.noise_scale, freeze_fraction=o.freeze_fraction, seed=o.seed)


# --------------------------------------------------------------------------- freezing
def frozen_layers(fraction: float, cfg) -> int:
    """How many leading layers `fraction` freezes (one-line errors where it would freeze none
    or split a group of shared layers)."""
    if not fraction:
        return 0
    k = math.floor(round(fraction * cfg.n_layers, 9))
    if k == 0:
        raise UserError(f"`freeze_fraction` {fraction} freezes none of the model's {cfg.n_layers} layers "
                        f"(floor({fraction} x {cfg.n_layers}) = 0)")
    if k % cfg.shared_layers:
        raise UserError(f"`freeze_fraction` {fraction} freezes {k} layers, splitting a group of `shared_layers` "
                        f"{cfg.shared_layers}")
    return k


def freeze(model: nn.Module, k: int) -> list[str]:
    """Turn off training of the first `k` blocks; returns their parameter names."""
    names = []
    for i, block in first_uses(model.layers[:k]):
        for n, p in block.named_parameters():
            p.requires_grad_(False)
            names.append(f"layers.{i}.{n}")
    return names


# ---------------------------------------------------------------- dropout, drop-path
def _with_dropout(module: nn.Module, p: float) -> None:
    inner = module.forward

    def forward(*args, **kwargs):
        return F.dropout(inner(*args, **kwargs), p, module.training)

    module.forward = forward


def survival(p: float, layer: int, n_layers: int) -> float:
    """Huang et al.'s linear decay rule: block `layer` (0-based) of `n_layers` survives with
    1 - p (layer + 1) / n_layers."""
    return 1.0 - p * (layer + 1) / n_layers


def _with_drop_path(block: nn.Module, p: float, n_layers: int) -> None:
    inner = block.forward  # the class's, or a lever's checkpointed forward

    def forward(x, ctx, layer):
        out = inner(x, ctx, layer)
        if not block.training:
            return out
        s = survival(p, layer, n_layers)
        keep = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), device=x.device, dtype=out.dtype).bernoulli_(s)
        return x + (out - x) * (keep / s)

    block.forward = forward


# -------------------------------------------------------------------- gradient noise
def noise_std(eta: float, step: int) -> float:
    return math.sqrt(eta / (1.0 + step) ** NOISE_GAMMA)


@torch.no_grad()
def add_gradient_noise(params: list[torch.Tensor], eta: float, step: int, seed: int) -> None:
    """Add N(0, eta / (1 + step)^0.55) to every element of the gradients of `params` (those
    that have one), from a generator seeded by (seed, step)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    from torch.distributed.tensor import DTensor, distribute_tensor
    std = noise_std(eta, step)
    key = int(np.random.SeedSequence([_NOISE_STREAM, seed, step]).generate_state(1)[0])
    gens: dict[torch.device, torch.Generator] = {}
    for g in grads:
        gen = gens.get(g.device)
        if gen is None:
            gen = gens[g.device] = torch.Generator(device=g.device).manual_seed(key)
        noise = torch.randn(g.shape, generator=gen, device=g.device, dtype=g.dtype)
        if isinstance(g, DTensor):  # --fsdp: every rank draws the whole noise and keeps its shard
            noise = distribute_tensor(noise, g.device_mesh, g.placements, src_data_rank=None)
        g.add_(noise, alpha=std)


# ------------------------------------------------------------------- the Trainer side
class Extras:
    """What the Trainer calls around each update and evaluation (all no-ops when off)."""

    def __init__(self, reg: Regularisers = Regularisers(), frozen: list[str] | None = None,
                 ema: EMA | None = None, relora=None):
        self.reg, self.frozen, self.ema = reg, frozen or [], ema
        self.relora = relora  # smedjan.training.relora.ReLoRA (set by `attach`) or None

    def trainable(self) -> list[tuple]:
        """(name, parameter, role) of what trains beside the model (ReLoRA's adapters)."""
        return self.relora.trainable() if self.relora is not None else []

    def after_step(self, step: int, optimizer) -> None:
        """After every step, good or skipped (`step`: the steps done): ReLoRA's merges."""
        if self.relora is not None:
            self.relora.after_step(step, optimizer)

    def wrap(self, model: nn.Module) -> None:
        """Dropout on every mixer and feed-forward output, drop-path around every block
        (after the levers, whose checkpointed forwards the drop-path then wraps)."""
        n_layers = len(model.layers)
        for _, block in first_uses(model.layers):
            if self.reg.dropout:
                _with_dropout(block.mixer, self.reg.dropout)
                if block.ffn_norm is not None:
                    _with_dropout(block.ffn, self.reg.dropout)
            if self.reg.stochastic_depth:
                _with_drop_path(block, self.reg.stochastic_depth, n_layers)

    def before_update(self, params: list[torch.Tensor], step: int) -> None:
        """After clipping, before the optimizer step."""
        if self.reg.noise_scale:
            add_gradient_noise(params, self.reg.noise_scale, step, self.reg.seed)

    def track(self, model: nn.Module) -> None:
        """Start the EMA again from `model`'s parameters: after fully_shard (--fsdp) they are
        new (DTensor) objects, and averages of the old ones would silently stand still."""
        if self.ema is not None:
            self.ema = EMA(model, self.ema.decay)

    def after_update(self) -> None:
        if self.ema is not None:
            self.ema.update()

    @contextlib.contextmanager
    def final_weights(self):
        """Context: the weights validation, best.bin and final.bin see (the EMA's, if any;
        ReLoRA's merged ones)."""
        with contextlib.ExitStack() as stack:
            if self.ema is not None:
                stack.enter_context(self.ema.applied())
            if self.relora is not None:
                stack.enter_context(self.relora.merged())
            yield

    def state(self) -> tuple[dict, dict]:
        tensors, meta = self.ema.state() if self.ema is not None else ({}, {})
        if self.relora is not None:
            t, m = self.relora.state()
            tensors, meta = {**tensors, **t}, {**meta, **m}
        return tensors, meta

    def load(self, ck) -> None:
        if self.ema is not None:
            self.ema.load(ck)
        if self.relora is not None:
            self.relora.load(ck)

    def describe(self) -> str:
        d = self.reg.describe()
        d += f" ({len(self.frozen)} tensors frozen)" if self.frozen else ""
        return ", ".join(s for s in (d, self.relora.describe() if self.relora is not None else "") if s)


def prepare(model: nn.Module, reg: Regularisers, cfg) -> Extras:
    """Freeze what `reg` freezes and start the EMA (of the trainable weights); call before
    the optimizer is built, then `wrap` after the levers."""
    frozen = freeze(model, frozen_layers(reg.freeze_fraction, cfg))
    ema = EMA(model, reg.ema_decay) if reg.ema_decay else None
    return Extras(reg, frozen, ema)
