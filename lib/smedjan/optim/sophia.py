"""`sophia`: SophiaG (Liu et al. 2023) with the Gauss-Newton-Bartlett Hessian estimate.

Per coordinate, with gradient g and the diagonal Hessian estimate h:
    m <- beta1 m + (1 - beta1) g
    theta <- theta (1 - lr wd)                                   (decoupled, matrices only)
    theta <- theta - lr sign(m) min(|m| / (rho h + 1e-15), 1)
so no coordinate moves by more than lr, and where h = 0 the step is lr sign(m).

Every `hessian_interval` updates (`after_step`, called by the Trainer with the model and
the step's last micro-batch) the estimate is refreshed: the model's next-token
distributions on the batch's inputs, a label sampled from each, and the gradient g' of the
mean cross-entropy against those labels over the n target positions give
h <- beta2 h + (1 - beta2) n g'^2 (n g'^2 estimates the per-token Gauss-Newton diagonal,
so rho needs no batch-size factor: the reference's rho x bs x h with h = EMA(g'^2)). The
labels come from a generator seeded by the run's seed and the step, drawn for the global
batch and sliced by rank, so two processes draw what one would. The fraction of
coordinates at the lr bound is logged each step as `clip_rate` (1 - the reference's
"win rate"; 0.5-0.9 is the healthy range).

    opt = build(param_groups(model, 0.1), OptimizerSettings(lr=3e-4, sophia_rho=0.04), torch.device("cpu"))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from smedjan.optim.adamw import adam_groups, step_schedules
from smedjan.optim.common import Scheduled, with_grads

BETAS, RHO, INTERVAL = (0.965, 0.99), 0.04, 10


class SophiaG(Scheduled, torch.optim.Optimizer):
    def __init__(self, groups: list[dict], *, betas=BETAS, rho: float = RHO, interval: int = INTERVAL, seed: int = 0):
        super().__init__(groups, dict(betas=betas, rho=rho))
        self.interval, self.seed = interval, seed
        self._clipped = None  # 0-d tensors of the last step: coordinates at the bound, all coordinates
        self._total = 0

    def _state(self, p: torch.Tensor) -> dict:
        st = self.state[p]
        if not st:
            st["step"] = torch.zeros((), dtype=torch.float32)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["hessian"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return st

    @torch.no_grad()
    def step(self, closure=None):
        assert closure is None, "SophiaG takes no closure"
        clipped, total = None, 0
        for g in self.param_groups:
            beta1 = g["betas"][0]
            params, grads, _ = with_grads(g, self.state)
            for p, grad in zip(params, grads):
                st = self._state(p)
                st["step"] += 1
                if g["weight_decay"]:
                    p.mul_(1 - g["lr"] * g["weight_decay"])
                m = st["exp_avg"].lerp_(grad, 1 - beta1)
                ratio = (m.abs() / (g["rho"] * st["hessian"] + 1e-15)).clamp_(max=1)
                p.addcmul_(m.sign(), ratio, value=-g["lr"])
                n = (ratio >= 1).sum()
                clipped = n if clipped is None else clipped + n
                total += p.numel()
        self._clipped, self._total = clipped, total

    def after_step(self, model: torch.nn.Module, batch, step: int) -> dict:
        """Refresh the Hessian estimate when due (after updates k, 2k, ...); report the clip rate."""
        out = {"clip_rate": float(self._clipped) / self._total} if self._total else {}
        if (step + 1) % self.interval == 0:
            self.update_hessian(model, batch, step)
        return out

    def update_hessian(self, model: torch.nn.Module, batch, step: int) -> None:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        y = batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None
        mask = (y != -1) if isinstance(y, torch.Tensor) and y.shape == x.shape else torch.ones_like(x, dtype=torch.bool)
        rank, world = _dist_info()
        B, T = x.shape
        gen = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + step)
        u = torch.rand(B * world, T, generator=gen, dtype=torch.float64)[rank * B:(rank + 1) * B].to(x.device)
        with torch.enable_grad():
            logits = model(x).float()
            with torch.no_grad():  # inverse-CDF sampling of one label per position
                cdf = logits.softmax(-1).double().cumsum(-1)
                labels = torch.searchsorted(cdf, (u * cdf[..., -1]).unsqueeze(-1)).squeeze(-1)
                labels = labels.clamp_(max=logits.size(-1) - 1).masked_fill_(~mask, -1)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), labels.view(-1), ignore_index=-1)
            loss.backward()
        n = mask.sum().to(torch.float64)
        if world > 1:
            import torch.distributed as dist

            dist.all_reduce(n)  # DDP averages the ranks' means: the gradient is a mean over all their positions
        with torch.no_grad():
            for g in self.param_groups:
                beta2 = g["betas"][1]
                params, grads, _ = with_grads(g, self.state)
                for p, grad in zip(params, grads):
                    self._state(p)["hessian"].mul_(beta2).addcmul_(grad, grad, value=(1 - beta2) * float(n))
        for p in (p for g in self.param_groups for p in g["params"]):
            p.grad = None


def _dist_info() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def build(groups: list[dict], s, device: torch.device) -> torch.optim.Optimizer:
    groups = adam_groups(groups, s)
    opt = SophiaG(groups, rho=RHO if s.sophia_rho is None else s.sophia_rho,
                  interval=INTERVAL if s.hessian_interval is None else s.hessian_interval, seed=s.seed)
    opt.step_schedules = step_schedules(s)
    return opt
