"""Device selection shared by every tool: cuda > mps > cpu, or what the user asks for.

    device = pick_device(None)        # autodetect
    device = pick_device("cuda:1")    # UserError if not available
"""

from __future__ import annotations

import torch

from smedjan.errors import UserError


def pick_device(requested: str | None = None) -> torch.device:
    if not requested or requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(requested)
    except RuntimeError:
        raise UserError(f"--device {requested!r} is not a device (use cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {requested}: CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"--device {requested}: only {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError(f"--device {requested}: MPS is not available on this machine")
    return dev
