"""Kernels of the model's hot elementwise and loss operations, chosen once per model.

Four operations have a PyTorch reference (`reference.py`: what every device runs by
default, and the truth the others are tested against) and a Triton kernel beside it
(`rms_norm.py`, `rope.py`, `swiglu.py`, `cross_entropy.py`, the last used by the fused
linear cross-entropy of `linear_ce.py`). A `Kernels` is one choice of all four. A module
that uses them is a `KernelUser` and calls `self.kernels.<op>`; `use_kernels(model, k)`
gives every one in a model the same choice (the training levers do it from `--kernels`),
so no part is found by its name and a new part opts in by calling `self.kernels`.

`choose("auto", device, compiled)` is Triton on CUDA, except under torch.compile (Inductor
already fuses the references into its own Triton code, and a hand-written kernel would
split its graph); the references everywhere else. Each Triton entry point also falls
back to its reference for what it does not cover (other devices, float64, per-row decode
tables), so choosing Triton never changes what a model can do.

    ks = choose("auto", torch.device("cuda"), compiled=False)    # -> TRITON on a GPU
    use_kernels(model, ks)
    y = model.norm.kernels.rms_norm(x, model.norm.weight, 1e-6)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from smedjan.kernels.reference import apply_rope, ce_chunk_torch, rms_norm_torch, swiglu_torch

KERNEL_CHOICES = ("auto", "triton", "torch")


@dataclass(frozen=True)
class Kernels:
    name: str
    rms_norm: Callable  # (x, weight, eps) -> y in x's dtype
    rope: Callable  # (x [..., T, d], cos, sin) -> rotated x
    swiglu: Callable  # (gate, up) -> silu(gate) * up
    ce_chunk: Callable  # (z [n, V] float32, y [n], *, softcap, ignore_index, z_loss) -> (loss [n], dz)


REFERENCE = Kernels("torch", rms_norm_torch, apply_rope, swiglu_torch, ce_chunk_torch)


class KernelUser:
    """Mixin of the modules that call `self.kernels.<op>` (the model's RMSNorm, the parts)."""

    kernels: Kernels = REFERENCE


def triton_kernels() -> Kernels:
    """The Triton set (imports Triton; each op falls back to its reference where it cannot run)."""
    from smedjan.kernels.cross_entropy import ce_chunk_triton
    from smedjan.kernels.rms_norm import rms_norm_triton
    from smedjan.kernels.rope import rope_triton
    from smedjan.kernels.swiglu import swiglu_triton

    return Kernels("triton", rms_norm_triton, rope_triton, swiglu_triton, ce_chunk_triton)


def choose(choice: str, device: torch.device, compiled: bool = False) -> Kernels:
    """The kernels `--kernels` names: auto (Triton on CUDA without torch.compile, else the
    references), triton, or torch (the references)."""
    from smedjan.kernels.launch import available

    if choice not in KERNEL_CHOICES:
        raise ValueError(f"kernels {choice!r} is not one of {', '.join(KERNEL_CHOICES)}")
    if choice == "triton" or (choice == "auto" and available(device) and not compiled):
        return triton_kernels()
    return REFERENCE


def use_kernels(model: torch.nn.Module, kernels: Kernels) -> int:
    """Give every KernelUser in `model` this choice; returns how many there are."""
    users = [m for m in model.modules() if isinstance(m, KernelUser)]
    for m in users:
        m.kernels = kernels
    return len(users)
