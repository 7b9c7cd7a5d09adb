"""Distributed data parallel under `torchrun`: one process per device, set up from the
environment torchrun provides (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT).

gloo on CPU, NCCL on CUDA. Without those variables (or with WORLD_SIZE=1) everything
here is a no-op and the run is a plain single process. Only rank 0 writes files and logs.

    ctx = init_distributed(pick_device(None))   # DistContext(rank, world_size, device, ...)
    ...
    ctx.all_reduce_sum(t); ctx.barrier(); ctx.close()

    torchrun --standalone --nproc-per-node 2 -m smedjan_tools.cli train ...
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from smedjan.errors import UserError


@dataclass
class DistContext:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """In place sum over ranks (identity on one process); returns `t`."""
        if self.enabled:
            import torch.distributed as dist

            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def init_distributed(device: torch.device) -> DistContext:
    """Join the torchrun process group when WORLD_SIZE > 1; `device` is the requested or
    detected device type (a CUDA run uses cuda:LOCAL_RANK)."""
    world = env_world_size()
    if world <= 1:
        return DistContext(device=device)
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"torchrun started {world} processes but this node has {torch.cuda.device_count()} GPU(s)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise UserError(f"distributed training runs on CUDA (NCCL) or CPU (gloo), not {device.type}")
    dist.init_process_group(backend=backend, rank=rank, world_size=world,
                            device_id=device if backend == "nccl" else None)
    return DistContext(rank=rank, local_rank=local_rank, world_size=world, device=device, backend=backend)
