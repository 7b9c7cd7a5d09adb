"""Fully sharded data parallel (FSDP2, `torch.distributed.fsdp.fully_shard`) under torchrun:
each rank keeps 1/N of the weights, gradients and optimizer state (ZeRO-3; Zhao et al.,
"PyTorch FSDP", VLDB 2023), all-gathering one block's weights at a time for its forward and
backward and reduce-scattering its gradients.

Sharding is per block (`model.layers[i]`), then the root (embeddings, final norm, head);
the memory levers are applied before it and the optimizer is built after it, over the
DTensor parameters. Checkpoints stay whole: rank 0 writes full state dicts gathered with
torch.distributed.checkpoint.state_dict, so a state_N.bin moves freely between FSDP, DDP
and one process.

    torchrun --standalone --nproc-per-node 2 -m smedjan_tools.cli train --fsdp ...

    check_fsdp(True, "adamw", world_size=2)       # UserError when it cannot run
    shard_model(model, device, amp=torch.bfloat16)
"""

from __future__ import annotations

import torch
from torch import nn

from smedjan.errors import UserError

# Optimizers whose step runs on DTensor (sharded) parameters, found by training two gloo
# ranks under --fsdp against one process (tests/test_train_fsdp.py). muon: its Newton-Schulz
# matmuls on a sharded matrix make DTensor all-gather it (right, and each rank does the
# whole orthogonalization, as under DDP). Refused: adamw-8bit (`bucketize` of a shard
# against plain code tables) and hybrid (`lerp_` of sharded state with plain tensors).
FSDP_OPTIMIZERS = ("adamw", "adamw-cpu", "sophia", "muon")


def check_fsdp(fsdp: bool, optimizer: str, world_size: int) -> None:
    """UserError unless `--fsdp` can run here: under torchrun with 2+ processes and an
    optimizer that steps sharded parameters."""
    if not fsdp:
        return
    if world_size <= 1:
        raise UserError("`fsdp` shards over processes: start the run with `torchrun --nproc-per-node N` (N >= 2)")
    from smedjan.optim.registry import canonical

    name = canonical(optimizer)
    if name not in FSDP_OPTIMIZERS:
        raise UserError(f"`fsdp` does not support `optimizer` {name!r} (its step needs whole parameters); "
                        f"use {', '.join(FSDP_OPTIMIZERS)} or DDP (no --fsdp)")


def shard_model(model: nn.Module, device: torch.device, amp: torch.dtype | None = None) -> None:
    """fully_shard every block, then the root, in place. On CUDA with bf16 (`amp`): weights
    gathered and computed in bf16, gradients reduced in fp32 (MixedPrecisionPolicy)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=amp, reduce_dtype=torch.float32) \
        if device.type == "cuda" and amp is not None else MixedPrecisionPolicy()
    from smedjan.model.sharing import first_uses

    for _, block in first_uses(getattr(model, "layers", ())):  # a shared block (--shared-layers) once
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict on CPU (rank 0; a collective: every rank must call it)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(cpu_offload=True))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """optimizer.state_dict() of the whole model, `state` keyed by index as torch keeps it
    (rank 0 holds it; a collective: every rank must call it)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    sd = get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))
    names = [n for g in optimizer.param_groups for n in g["names"]]
    state = sd.get("state", {})
    return {"state": {i: state[n] for i, n in enumerate(names) if n in state},
            "param_groups": optimizer.state_dict()["param_groups"]}


def load_full_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Shard a whole state dict (every rank holds it) into the model."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state, options=_options())


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, groups: list) -> None:
    """Shard whole optimizer state (`state` keyed by index, `groups` as optimizer.state_dict()
    has them; every rank holds it) into the optimizer."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    names = [n for g in optimizer.param_groups for n in g["names"]]
    by_name = {names[i]: st for i, st in state.items()}
    fq_groups = [{**g, "params": list(og["names"])} for g, og in zip(groups, optimizer.param_groups)]
    set_optimizer_state_dict(model, optimizer, {"state": by_name, "param_groups": fq_groups}, options=_options())


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state this rank holds (a DTensor counts its local shard)."""
    from torch.distributed.tensor import DTensor

    total = 0
    for st in optimizer.state.values():
        for v in st.values():
            if isinstance(v, DTensor):
                v = v.to_local()
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
    return total
