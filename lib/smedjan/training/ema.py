"""An exponential moving average of the weights (`--ema-decay`), kept beside the model.

After every optimizer update (skipped non-finite steps do not count), each trainable
parameter's average moves toward it: ema <- ema - (1 - d_t) (ema - w), with the decay
warmed up as in lucidrains/ema-pytorch (inv_gamma 1, power 2/3; Crowson's EMA warmup):
d_t = min(decay, 1 - (1 + t)^(-2/3)) after t earlier updates, so the first update copies
the weights (d_0 = 0) and early, fast-moving weights are not averaged with the random
init. Once the warmup passes `decay` (t >= (1 - decay)^(-3/2) - 1: 31 steps at 0.9, 1000
at 0.99), a weight held at w for k updates after a change from w0 averages to the closed
form decay^k w0 + (1 - decay^k) w.

The averages are float copies by parameter name (a shared or tied tensor once). The
training state holds them as `extra.ema.<name>` with the update count, so a resumed run
continues them bit for bit; `applied()` swaps them into the model for validation and for
writing best.bin / final.bin, then puts the raw weights back exactly.

    ema = EMA(model, decay=0.999)
    ...; optimizer.step(); ema.update()
    with ema.applied():
        val = evaluate(model)
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from smedjan.errors import UserError

POWER = 2 / 3  # ema-pytorch's default warmup power (3/4 suits shorter runs, 2/3 long ones)
PREFIX = "extra.ema."  # tensor names in state_N.bin (outside the model's own names)


def decay_at(decay: float, t: int) -> float:
    """The decay of the update after `t` earlier ones."""
    return min(decay, 1.0 - (1.0 + t) ** -POWER)


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        assert 0.0 < decay < 1.0, decay
        self.decay = decay
        self.updates = 0
        # named_parameters() yields a shared or tied tensor once; frozen ones never move
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.shadows = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        d = decay_at(self.decay, self.updates)
        torch._foreach_lerp_(self.shadows, [p.detach() for p in self.params], 1.0 - d)
        self.updates += 1

    @contextlib.contextmanager
    def applied(self):
        """The model holds the averages inside, its raw weights again after (bit for bit)."""
        with torch.no_grad():
            raw = [p.detach().clone() for p in self.params]
            _copy_all(self.params, self.shadows)
        try:
            yield
        finally:
            with torch.no_grad():
                _copy_all(self.params, raw)

    # ------------------------------------------------------------------ state
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, metadata) for state_N.bin. Under --fsdp the averages are sharded like the
        weights: each is gathered whole (a collective: every rank calls this)."""
        return ({PREFIX + n: _whole(s) for n, s in zip(self.names, self.shadows)},
                {"ema": {"decay": self.decay, "updates": self.updates}})

    def load(self, ck) -> bool:
        """Restore from a loaded state_N.bin; False when it holds no averages (a run that
        had no EMA: they start again from the current weights)."""
        saved = ck.prefixed(PREFIX)
        meta = ck.json("ema")
        if not saved and meta is None:
            return False
        if not isinstance(meta, dict) or not isinstance(meta.get("updates"), int) or meta["updates"] < 0:
            raise UserError(f"{ck.path}: EMA state missing or corrupt (the update count)")
        if sorted(saved) != sorted(self.names):
            missing = sorted(set(self.names) - set(saved)) or sorted(set(saved) - set(self.names))
            raise UserError(f"{ck.path}: EMA state does not fit this model ({missing[0]!r})")
        with torch.no_grad():
            for name, s in zip(self.names, self.shadows):
                t = saved[name]
                if t.shape != s.shape:
                    raise UserError(f"{ck.path}: EMA tensor {name!r} has shape {tuple(t.shape)}, expected "
                                    f"{tuple(s.shape)} (corrupt)")
                s.copy_(_like(t, s))
        self.updates = meta["updates"]
        return True


def _whole(t: torch.Tensor) -> torch.Tensor:
    """A sharded (FSDP, DTensor) average gathered whole to the CPU; others as they are."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor().cpu() if isinstance(t, DTensor) else t


def _like(saved: torch.Tensor, shadow: torch.Tensor) -> torch.Tensor:
    """A whole saved average, as `shadow` holds it (under FSDP: this rank's shard of it)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(shadow, DTensor):
        return saved
    return distribute_tensor(saved.to(shadow.device, shadow.dtype), shadow.device_mesh, shadow.placements,
                             src_data_rank=None)  # every rank holds the whole tensor: no scatter


def _copy_all(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    """dst[i] <- src[i] (DTensor has no sharding rule for the foreach copy: one by one there)."""
    from torch.distributed.tensor import DTensor

    if dst and isinstance(dst[0], DTensor):
        for d, s in zip(dst, src):
            d.copy_(s)
    else:
        torch._foreach_copy_(dst, src)
