"""Learning-rate schedules: a multiplier in [min_ratio, 1] of each group's peak LR.

Step s is the 0-based index of the optimizer update the rate is used for; a run has S
updates, W of warmup, and `min_ratio` m = --min-lr / --lr.

- warmup (every schedule): s < W -> (s + 1) / W, a linear ramp that reaches 1 at the
  last warmup step (never 0, so the first update moves).
- `cosine`: after warmup, a half cosine from 1 down to m over the remaining S - W
  updates: m + (1 - m) * (1 + cos(pi * p)) / 2 with p = (s - W + 1) / (S - W), so the
  last update runs at exactly m.
- `wsd` (warmup-stable-decay): 1 until the last `warmdown` fraction of the run, then a
  "1 - sqrt" cooldown m + (1 - m) * (1 - sqrt(p)), p from the cooldown start as above.
  The stable phase makes checkpoints of a long run reusable as starts of shorter ones;
  1-sqrt beats linear cooldown in Hägele et al. (2024).
- `wso` (warmup-stable-only): warmup, then 1 for ever: no decay. For runs that will
  be continued or annealed later.
- `invsqrt`: warmup, then sqrt(W / (s + 1)) (T5 / "Noam" decay), floored at m;
  no horizon needed.
- `trapezoid`: like wsd but the cooldown is linear: m + (1 - m) * (1 - p).
- restarts (ReLoRA's jagged schedule, `--relora-interval N`, `--relora-warmup R`): from
  update N on, the multiplier of update s is also scaled by min(1, (s mod N + 1) / R), a
  linear re-warmup from near 0 after every merge (at updates N, 2N, ...).

    sched = Schedule("cosine", total_steps=50_000, warmup=2_000, min_ratio=0.1)
    lr = 3e-4 * sched(s)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from smedjan.errors import UserError

SCHEDULES = ("cosine", "wsd", "wso", "invsqrt", "trapezoid")


@dataclass(frozen=True)
class Schedule:
    kind: str
    total_steps: int
    warmup: int
    min_ratio: float = 0.1
    warmdown: float = 0.2  # wsd / trapezoid: fraction of the run spent cooling down
    restart_every: int = 0  # ReLoRA: re-warm every this many updates (0: never)
    restart_warmup: int = 0  # ReLoRA: over this many updates

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise UserError(f"--lr-schedule {self.kind!r} is not one of {', '.join(SCHEDULES)}")
        if self.total_steps < 1:
            raise UserError(f"the run has {self.total_steps} steps; it needs at least 1")
        if self.warmup < 0:
            raise UserError(f"--warmup {self.warmup} must be >= 0")
        if not 0.0 <= self.min_ratio <= 1.0:
            raise UserError(f"--min-lr must be between 0 and --lr (ratio {self.min_ratio})")
        if not 0.0 <= self.warmdown <= 1.0:
            raise UserError(f"--warmdown {self.warmdown} must be a fraction between 0 and 1")

    @property
    def decay_start(self) -> int:
        """First update of the decay phase (cosine: right after warmup)."""
        if self.kind == "cosine":
            return self.warmup
        return max(self.warmup, self.total_steps - round(self.warmdown * self.total_steps))

    def __call__(self, step: int) -> float:
        base = self._main(step)
        N, R = self.restart_every, self.restart_warmup
        if N and R and step >= N:  # ReLoRA's jagged schedule: the main one, re-warmed after each merge
            return base * min(1.0, (step % N + 1) / R)
        return base

    def _main(self, step: int) -> float:
        s, W, S, m = step, self.warmup, self.total_steps, self.min_ratio
        if s < W:
            return (s + 1) / W
        if self.kind == "wso":
            return 1.0
        if self.kind == "invsqrt":
            return max(m, math.sqrt(W / (s + 1))) if W else max(m, 1 / math.sqrt(s + 1))
        D = self.decay_start
        if s < D:
            return 1.0
        # p in (0, 1]: the fraction of the decay phase done after this update.
        p = min(1.0, (s - D + 1) / max(1, S - D))
        if self.kind == "cosine":
            return m + (1 - m) * 0.5 * (1 + math.cos(math.pi * p))
        if self.kind == "wsd":
            return m + (1 - m) * (1 - math.sqrt(p))
        assert self.kind == "trapezoid", self.kind
        return m + (1 - m) * (1 - p)
