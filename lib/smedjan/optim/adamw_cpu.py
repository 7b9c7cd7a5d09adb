"""`adamw-cpu`: AdamW whose state and update live in CPU memory while the model trains on
a GPU (ZeRO-Offload's idea for one device): GPU memory holds only weights, gradients and
activations, freeing the 8 bytes per parameter of AdamW's moments.

Each step, per parameter in order: its gradient is copied into pinned CPU memory on a
side CUDA stream; the CPU waits for that copy only, runs AdamW (torch's fused CPU kernel)
on a float32 CPU copy of the weight, and queues the copy back to the GPU on the side
stream. So later gradients travel while earlier parameters update, and uploads overlap
the CPU work; the compute stream waits for the uploads before the next forward. The
CPU copy of the weights is taken at the first step and after loading a state.

On a device that is not CUDA the state already lives in CPU memory (or unified memory,
MPS): `adamw-cpu` is then exactly `adamw`, and the run's log says so.

    opt = build(param_groups(model, 0.1), OptimizerSettings(lr=3e-4), torch.device("cuda"))
"""

from __future__ import annotations

import torch

from smedjan.optim import adamw
from smedjan.optim.adamw import BETA1, BETA2, EPS, adam_groups, step_schedules
from smedjan.optim.common import Scheduled, adamw_update


class OffloadAdamW(Scheduled, torch.optim.Optimizer):
    def __init__(self, groups: list[dict], *, betas=(BETA1, BETA2), eps: float = EPS):
        super().__init__(groups, dict(betas=betas, eps=eps))
        cuda = any(p.is_cuda for g in self.param_groups for p in g["params"])
        self._stream = torch.cuda.Stream() if cuda else None
        self._master: dict[torch.Tensor, torch.Tensor] = {}  # param -> float32 CPU copy (pinned on CUDA)
        self._grad: dict[torch.Tensor, torch.Tensor] = {}  # param -> CPU gradient buffer

    def _cpu(self, like: torch.Tensor) -> torch.Tensor:
        t = torch.empty(like.shape, dtype=torch.float32, device="cpu")
        return t.pin_memory() if self._stream is not None else t

    @torch.no_grad()
    def step(self, closure=None):
        assert closure is None, "OffloadAdamW takes no closure"
        s = self._stream
        if s is not None:
            s.synchronize()  # the previous step's uploads have left the CPU copies
            s.wait_stream(torch.cuda.current_stream())  # the gradients are complete
        pending = []
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                if p not in self._master:
                    self._master[p] = self._cpu(p).copy_(p.detach())
                    self._grad[p] = self._cpu(p)
                buf, done = self._grad[p], None
                if s is not None:
                    with torch.cuda.stream(s):
                        buf.copy_(p.grad, non_blocking=True)
                        done = torch.cuda.Event()
                        done.record(s)
                else:
                    buf.copy_(p.grad)
                pending.append((g, p, done))
        for g, p, done in pending:
            if done is not None:
                done.synchronize()
            master = self._master[p]
            adamw_update([master], [self._grad[p]], [self.state[p]], lr=g["lr"], betas=tuple(g["betas"]),
                         eps=g["eps"], weight_decay=g["weight_decay"])
            if s is not None:
                with torch.cuda.stream(s):
                    p.copy_(master, non_blocking=True)
            else:
                p.copy_(master)
        if s is not None:
            torch.cuda.current_stream().wait_stream(s)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # torch moves loaded state to each parameter's device: bring it back to CPU memory
        for st in self.state.values():
            for key, v in list(st.items()):
                if isinstance(v, torch.Tensor):
                    st[key] = v.to("cpu", torch.float32)
        self._master.clear()  # the weights were (re)loaded too: copy them again at the next step
        self._grad.clear()


def build(groups: list[dict], s, device: torch.device) -> torch.optim.Optimizer:
    if device.type != "cuda":
        opt = adamw.build(groups, s, device)
        opt.note = f"on {device.type} the state is already in CPU memory: adamw-cpu is adamw"
        return opt
    groups = adam_groups(groups, s)
    betas = (BETA1 if s.beta1 is None else s.beta1, BETA2 if s.beta2 is None else s.beta2)
    opt = OffloadAdamW(groups, betas=betas, eps=EPS if s.eps is None else s.eps)
    opt.step_schedules = step_schedules(s)
    return opt
