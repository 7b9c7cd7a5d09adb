"""`adamw`: torch's AdamW (fused kernel on CPU and CUDA), one rate for every role unless a
role's rate is given (`--matrix-lr`, `--embedding-lr`, ...), decoupled weight decay on
the hidden matrices only (see `groups`).

    opt = build(param_groups(model, 0.1), OptimizerSettings(lr=3e-4), torch.device("cpu"))
"""

from __future__ import annotations

import torch

from smedjan.optim.common import Scheduled, StepSchedules

BETA1, BETA2, EPS = 0.9, 0.95, 1e-5


class AdamW(Scheduled, torch.optim.AdamW):
    """torch.optim.AdamW plus `before_step` (the weight-decay schedule). Named AdamW: a
    state_N.bin records the optimizer's class name, and these states are AdamW's."""


def step_schedules(s) -> StepSchedules | None:
    return StepSchedules(s.lr_schedule, s.wd_schedule) if s.lr_schedule is not None else None


def adam_groups(groups: list[dict], s) -> list[dict]:
    """`groups` with their peak rates (the run's --lr unless the role's own is given) and peak
    weight decay, for the optimizers that treat every role alike."""
    for g in groups:
        g["peak_lr"] = g["lr"] = s.rate(g["role"], s.lr)
        g["peak_wd"] = g["weight_decay"]
    return groups


def build(groups: list[dict], s, device: torch.device) -> torch.optim.Optimizer:
    groups = adam_groups(groups, s)
    # fused: one kernel per step over all tensors (CPU and CUDA); foreach elsewhere (MPS).
    # Both are deterministic; fused avoids the per-tensor Python loop AdamW uses on CPU by default.
    impl = {"fused": True} if device.type in ("cpu", "cuda") else {"foreach": True}
    betas = (BETA1 if s.beta1 is None else s.beta1, BETA2 if s.beta2 is None else s.beta2)
    opt = AdamW(groups, lr=groups[0]["lr"] if groups else s.lr, betas=betas, eps=EPS if s.eps is None else s.eps,
                **impl)
    opt.step_schedules = step_schedules(s)
    return opt
