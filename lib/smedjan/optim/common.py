"""What every smedjan optimizer shares: per-step settings besides the LR, the AdamW
update on a list of tensors, and the checks of the knobs.

The Trainer sets each group's `lr = peak_lr x schedule(step)` and then, for an optimizer
that has it, calls `before_step(step)`: `Scheduled` sets the step's weight decay (from
the group's `peak_wd` and the run's weight-decay schedule) and Muon's momentum (warm-up
and warm-down around the LR schedule's decay). After the update the Trainer calls
`after_step(model, batch, step)` where an optimizer needs more than the gradient
(Sophia's Hessian estimate); what it returns is logged with the step.

    sched = StepSchedules(lr_schedule, wd_schedule="cosine", momentum=(0.85, 0.95, 0.9), momentum_warmup=100)
    sched.weight_decay(step), sched.momentum(step)
    adamw_update(params, grads, states, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.optim.adamw import adamw as _adamw_functional

from smedjan.errors import UserError

WD_SCHEDULES = ("constant", "cosine", "linear")


@dataclass(frozen=True)
class StepSchedules:
    """Weight decay and Muon momentum as functions of the step (0-based update index).

    - weight decay multiplier: `constant` 1; `cosine` 1 -> 0 as (1 + cos(pi s / S)) / 2
      (nanochat); `linear` 1 - s / S.
    - momentum (start, peak, end): a linear ramp start -> peak over `momentum_warmup`
      updates, peak until the LR schedule's decay starts, then linear to `end` at the
      last update (nanochat: 0.85 -> 0.97 over 400 steps, -> 0.90 over the warmdown). The
      warm-up wins where the two overlap."""

    lr_schedule: object  # smedjan.training.schedule.Schedule (total_steps, decay_start)
    wd_schedule: str = "constant"
    momentum: tuple[float, float, float] | None = None
    momentum_warmup: int = 0

    def weight_decay(self, step: int) -> float:
        S = max(1, self.lr_schedule.total_steps)
        if self.wd_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(step, S) / S))
        if self.wd_schedule == "linear":
            return 1 - min(step, S) / S
        return 1.0

    def muon_momentum(self, step: int) -> float | None:
        if self.momentum is None:
            return None
        start, peak, end = self.momentum
        W = self.momentum_warmup
        if step < W:
            return start + (peak - start) * step / W
        D, S = self.lr_schedule.decay_start, self.lr_schedule.total_steps
        if step >= D and S > D:
            p = min(1.0, (step - D) / (S - D))
            return peak + (end - peak) * p
        return peak


class Scheduled:
    """Mixin of every smedjan optimizer: `before_step(step)` applies `self.step_schedules`
    (set by the builder; None: nothing changes) to the groups that carry `peak_wd`
    (weight decay) and to the Muon groups (momentum)."""

    step_schedules: StepSchedules | None = None

    def state_shape(self, key: str, param: torch.Tensor) -> tuple[int, ...]:
        """The shape state tensor `key` of `param` has (resume checks a saved state against
        it before loading): the parameter's own, unless the optimizer stores it otherwise."""
        return tuple(param.shape)

    def before_step(self, step: int) -> None:
        sched = self.step_schedules
        if sched is None:
            return
        wd = sched.weight_decay(step)
        momentum = sched.muon_momentum(step)
        for g in self.param_groups:
            if "peak_wd" in g:
                g["weight_decay"] = g["peak_wd"] * wd
            if momentum is not None and g.get("kind") == "muon":
                g["momentum"] = momentum


def adamw_update(params: list[torch.Tensor], grads: list[torch.Tensor], states: list[dict], *, lr: float,
                 betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    """One AdamW update of `params` in place, with torch's own kernel (fused on CPU and CUDA,
    foreach elsewhere): the same arithmetic as torch.optim.AdamW. `states` (one dict per
    param) get `step`, `exp_avg`, `exp_avg_sq` on first use."""
    if not params:
        return
    fused = params[0].device.type in ("cpu", "cuda")
    for p, st in zip(params, states):
        if not st:
            # as torch.optim.AdamW: a float32 0-d step, on the param's device when fused
            st["step"] = torch.zeros((), dtype=torch.float32, device=p.device if fused else "cpu")
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    _adamw_functional(params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [],
                            [s["step"] for s in states], fused=fused, foreach=None if fused else True,
                            amsgrad=False, beta1=betas[0], beta2=betas[1], lr=lr, weight_decay=weight_decay, eps=eps,
                            maximize=False)


def with_grads(group: dict, state) -> tuple[list, list, list]:
    """(params, grads, state dicts) of the group's parameters that have a gradient."""
    params = [p for p in group["params"] if p.grad is not None]
    return params, [p.grad for p in params], [state[p] for p in params]


def check_rate(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise UserError(f"`{name}` {value} must be a positive number")


def check_fraction(name: str, value: float, closed: bool = False) -> None:
    ok = 0 <= value <= 1 if closed else 0 <= value < 1
    if not (isinstance(value, (int, float)) and math.isfinite(value) and ok):
        raise UserError(f"`{name}` {value} must be in [0, 1{']' if closed else ')'}")
