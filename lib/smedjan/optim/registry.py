"""Optimizers by name, built from role-tagged parameter groups (see `groups`).

A builder takes the groups and the `OptimizerSettings` and returns a
`torch.optim.Optimizer` whose every param group carries `role`, `names` and
`peak_lr` (the learning rate the schedule multiplies; per-group, so an optimizer that
wants another rate for embeddings or matrices sets it here). The trainer only ever
does `group["lr"] = group["peak_lr"] * schedule(step)`, `step()`, `zero_grad()` and
`state_dict()`, so a new optimizer (Muon for `matrix`, AdamW for the rest, ...) is
one builder added to OPTIMIZERS, nothing else.

    groups = param_groups(model, weight_decay=0.1)
    opt = build_optimizer("adamw", groups, OptimizerSettings(lr=3e-4, beta2=0.95), device=torch.device("cpu"))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from smedjan.errors import UserError


@dataclass
class OptimizerSettings:
    lr: float = 3e-4
    beta1: float = 0.9
    beta2: float = 0.95
    # 1e-5, not PyTorch's 1e-8: with beta2 = 0.95 the second moment of a rarely-seen
    # parameter decays fast, and a tiny eps then lets sqrt(v) ~ 0 blow the update up
    # (the "hardened eps" of the training guide).
    eps: float = 1e-5
    weight_decay: float = 0.1


def _adamw(groups: list[dict], s: OptimizerSettings, device: torch.device) -> torch.optim.Optimizer:
    for g in groups:
        g["peak_lr"] = s.lr
        g["lr"] = s.lr
    # fused: one kernel per step over all tensors (CPU and CUDA); foreach elsewhere (MPS).
    # Both are deterministic; fused avoids the per-tensor Python loop AdamW uses on CPU by default.
    impl = {"fused": True} if device.type in ("cpu", "cuda") else {"foreach": True}
    return torch.optim.AdamW(groups, lr=s.lr, betas=(s.beta1, s.beta2), eps=s.eps, **impl)


Builder = Callable[[list[dict], OptimizerSettings, torch.device], torch.optim.Optimizer]
OPTIMIZERS: dict[str, Builder] = {
    "adamw": _adamw,
}


def build_optimizer(name: str, groups: list[dict], settings: OptimizerSettings,
                    device: torch.device | str = "cpu") -> torch.optim.Optimizer:
    """The optimizer `name` over `groups`; UserError for an unknown name."""
    if name not in OPTIMIZERS:
        raise UserError(f"--optimizer {name!r} is not available; choose from {', '.join(OPTIMIZERS)}")
    if not settings.lr > 0:
        raise UserError(f"--lr {settings.lr} must be positive")
    if not (0 <= settings.beta1 < 1 and 0 <= settings.beta2 < 1):
        raise UserError(f"Adam betas ({settings.beta1}, {settings.beta2}) must be in [0, 1)")
    if settings.weight_decay < 0:
        raise UserError(f"--weight-decay {settings.weight_decay} must be >= 0")
    opt = OPTIMIZERS[name](groups, settings, torch.device(device))
    assert all("peak_lr" in g and "role" in g for g in opt.param_groups), "builders must set peak_lr and role"
    return opt
