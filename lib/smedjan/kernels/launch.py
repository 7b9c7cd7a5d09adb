"""What the Triton kernels share: the import (Triton is optional at run time: a machine
without it, or without a GPU, runs the references) and where a kernel can run.

Triton decides when a kernel is defined whether it is compiled for the GPU or run by its
CPU interpreter (`TRITON_INTERPRET=1`, used by the tests on tiny shapes); `runs_on` asks
the kernel itself, so a module imported before the variable was set is never launched
on the wrong device.

    if runs_on(_rms_fwd, x): _rms_fwd[(rows,)](...)
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a declared dependency on Linux
    triton, tl = None, None


def interpreted(kernel) -> bool:
    """Whether `kernel` was defined under TRITON_INTERPRET=1 (runs on CPU tensors)."""
    return type(kernel).__name__ == "InterpretedFunction"


def runs_on(kernel, *tensors: torch.Tensor) -> bool:
    """Whether `kernel` can be launched on these tensors: all on CUDA (compiled kernels), or
    all on the CPU with an interpreted kernel."""
    if triton is None or kernel is None:
        return False
    devices = {t.device.type for t in tensors}
    if interpreted(kernel):
        return devices == {"cpu"}
    return devices == {"cuda"}


def row_block(n: int) -> int:
    """A power-of-two block covering a row of n elements (one program per row)."""
    return triton.next_power_of_2(n)


def available(device: torch.device) -> bool:
    """Whether compiled Triton kernels can run on `device` (CUDA with Triton installed)."""
    return triton is not None and device.type == "cuda"
