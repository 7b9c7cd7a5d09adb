"""Optimizers by name, built from role-tagged parameter groups (see `groups`).

A builder takes the groups, the `OptimizerSettings` and the device and returns a
`torch.optim.Optimizer` whose every param group carries `role`, `names` and `peak_lr`
(the learning rate the schedule multiplies; per group, so a hybrid sets one rate per
role). The trainer does `group["lr"] = group["peak_lr"] * schedule(step)`, then
`before_step(step)` / `step()` / `after_step(model, batch, step)` where the optimizer
has them (see `common`), `zero_grad()` and `state_dict()`. A new optimizer is one file
in this package and one line in OPTIMIZERS, with the settings it reads (`knobs`): a knob
set for an optimizer that does not read it is refused, never ignored.

    groups = param_groups(model, weight_decay=0.1)
    opt = build_optimizer("hybrid", groups, OptimizerSettings(lr=3e-3, width=128), device=torch.device("cpu"))
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from smedjan.errors import UserError
from smedjan.optim import adamw, adamw_8bit, adamw_cpu, hybrid, muon, sophia
from smedjan.optim.common import WD_SCHEDULES, check_fraction, check_rate

# Role -> the flag of its explicit rate (norm gains and other scalars share one).
ROLE_RATE = {"embedding": "embedding_lr", "head": "unembedding_lr", "matrix": "matrix_lr", "norm": "scalar_lr",
             "scalar": "scalar_lr"}


@dataclass
class OptimizerSettings:
    lr: float = 3e-4
    beta1: float | None = None  # None: the optimizer's own default (adamw 0.9, hybrid 0.8)
    beta2: float | None = None  # None: adamw 0.95, hybrid 0.95
    # None: adamw 1e-5, not PyTorch's 1e-8: with beta2 = 0.95 the second moment of a
    # rarely-seen parameter decays fast, and a tiny eps then lets sqrt(v) ~ 0 blow the
    # update up (the "hardened eps" of the training guide).
    eps: float | None = None
    weight_decay: float = 0.1
    role_lr: dict = field(default_factory=dict)  # explicit rates by flag: {"embedding_lr": 0.3, ...}
    width: int = 768  # model width: the hybrid scales its AdamW rates by sqrt(768 / width) (nanochat)
    lr_scale: float = 1.0  # every rate x this (--total-batch-size: sqrt(B / 2^19))
    muon_momentum: float | None = None
    muon_momentum_start: float | None = None
    muon_momentum_end: float | None = None
    muon_momentum_warmup: int | None = None
    normuon: bool | None = None
    cautious: bool = False
    cautious_wd: bool | None = None
    sophia_rho: float | None = None
    hessian_interval: int | None = None
    wd_schedule: str = "constant"
    lr_schedule: object = None  # the run's Schedule (horizon, decay start) for the step schedules
    seed: int = 0  # Sophia's label sampling

    def rate(self, role: str, default: float, scale: float = 1.0) -> float:
        """The peak rate of `role`: its explicit flag x `scale`, else `default`; x lr_scale."""
        explicit = self.role_lr.get(ROLE_RATE[role])
        return (explicit * scale if explicit is not None else default) * self.lr_scale


@dataclass(frozen=True)
class Entry:
    build: Callable[[list[dict], OptimizerSettings, torch.device], torch.optim.Optimizer]
    knobs: frozenset  # OptimizerSettings fields beyond lr / weight decay / rates it reads
    help: str


ADAM = frozenset({"beta1", "beta2"})
MUON = ADAM | {"muon_momentum", "muon_momentum_start", "muon_momentum_end", "muon_momentum_warmup", "normuon",
               "cautious", "cautious_wd"}
SOPHIA = frozenset({"sophia_rho", "hessian_interval"})

OPTIMIZERS: dict[str, Entry] = {
    "adamw": Entry(adamw.build, ADAM, "AdamW"),
    "adamw-cpu": Entry(adamw_cpu.build, ADAM, "AdamW with state and update in CPU memory (GPU runs)"),
    "adamw-8bit": Entry(adamw_8bit.build, ADAM, "AdamW with block-wise 8-bit moments"),
    "sophia": Entry(sophia.build, SOPHIA, "SophiaG with a Gauss-Newton-Bartlett Hessian estimate"),
    "muon": Entry(muon.build, MUON, "Muon on the hidden matrices, AdamW (adamw's settings) on the rest"),
    "hybrid": Entry(hybrid.build, MUON, "nanochat's MuonAdamW recipe: per-role rates"),
}
ALIASES = {"muon-adamw": "hybrid"}

# Settings field -> its flag (library messages name flags in backquotes).
KNOB_FLAGS = {"beta1": "adam_beta1", "beta2": "adamw_beta2", "muon_momentum": "muon_momentum",
              "muon_momentum_start": "momentum_start", "muon_momentum_end": "momentum_end",
              "muon_momentum_warmup": "momentum_warmup", "normuon": "normuon", "cautious": "cautious",
              "cautious_wd": "cautious_wd", "sophia_rho": "sophia_rho", "hessian_interval": "hessian_interval"}


def canonical(name: str) -> str:
    """The registry name of `name` (aliases resolved); UserError for an unknown one."""
    name = ALIASES.get(name, name)
    if name not in OPTIMIZERS:
        names = [*OPTIMIZERS, *(f"{a} (= {t})" for a, t in ALIASES.items())]
        raise UserError(f"`optimizer` {name!r} is not available; choose from {', '.join(names)}")
    return name


def check_settings(name: str, s: OptimizerSettings) -> None:
    """One-line errors for rates, betas and knobs that are out of range or do not apply."""
    entry = OPTIMIZERS[name]
    check_rate("lr", s.lr)
    for flag, value in s.role_lr.items():
        if value is not None:
            check_rate(flag, value)
    if not (math.isfinite(s.weight_decay) and s.weight_decay >= 0):
        raise UserError(f"`weight_decay` {s.weight_decay} must be >= 0")
    for knob, flag in KNOB_FLAGS.items():
        value = getattr(s, knob)
        if value not in (None, False) and knob not in entry.knobs:
            users = [n for n, e in OPTIMIZERS.items() if knob in e.knobs]
            raise UserError(f"`{flag}` does not apply to `optimizer` {name} (only to {', '.join(users)})")
    for knob in ("beta1", "beta2", "muon_momentum", "muon_momentum_start", "muon_momentum_end"):
        if getattr(s, knob) is not None:
            check_fraction(KNOB_FLAGS[knob], getattr(s, knob))
    if s.muon_momentum_warmup is not None and s.muon_momentum_warmup < 0:
        raise UserError(f"`momentum_warmup` {s.muon_momentum_warmup} must be >= 0")
    if s.sophia_rho is not None:
        check_rate("sophia_rho", s.sophia_rho)
    if s.hessian_interval is not None and s.hessian_interval < 1:
        raise UserError(f"`hessian_interval` {s.hessian_interval} must be >= 1")
    if s.wd_schedule not in WD_SCHEDULES:
        raise UserError(f"`wd_schedule` {s.wd_schedule!r} is not one of {', '.join(WD_SCHEDULES)}")


def build_optimizer(name: str, groups: list[dict], settings: OptimizerSettings,
                    device: torch.device | str = "cpu") -> torch.optim.Optimizer:
    """The optimizer `name` (or an alias) over `groups`; UserError for an unknown name or
    a setting it cannot use."""
    name = canonical(name)
    check_settings(name, settings)
    opt = OPTIMIZERS[name].build(groups, settings, torch.device(device))
    assert all("peak_lr" in g and "role" in g for g in opt.param_groups), "builders must set peak_lr and role"
    return opt
