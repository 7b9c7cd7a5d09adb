"""Build a ready-to-run model from a checkpoint file.

    model, tok, ck = load_model("final.bin", device="cpu")
"""

from __future__ import annotations

import os

import torch

from smedjan.errors import UserError
from smedjan.formats import constants as C
from smedjan.formats.checkpoint import Checkpoint, load_checkpoint
from smedjan.model.model import Transformer


def check_state_shapes(path, state: dict[str, torch.Tensor], model: torch.nn.Module, against: str,
                       display: dict[str, str] | None = None) -> None:
    """Raise a UserError naming the first tensor of `state` (read from `path`) that is
    missing, extra or misshapen with respect to `model`'s own (which may be on meta).
    `display` maps our tensor names to the file's own (HF) names for the message."""
    shown = (lambda n: (display or {}).get(n, n))
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, extra = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    if missing or extra:
        what = f"missing tensor {shown(missing[0])!r}" if missing else f"unexpected tensor {shown(extra[0])!r}"
        raise UserError(f"{path}: {what} for {against}")
    for name, shape in want.items():
        if tuple(state[name].shape) != shape:
            raise UserError(f"{path}: tensor {shown(name)!r} has shape {tuple(state[name].shape)}, "
                            f"{against} needs {shape}")


def _meta_model_and_state(ck: Checkpoint) -> tuple[Transformer, dict[str, torch.Tensor]]:
    """`ck`'s config as a Transformer on the meta device (nothing allocated) and its
    tensors, checked against it."""
    with torch.device("meta"):
        model = Transformer(ck.config)
    state = ck.model_state()
    check_state_shapes(ck.path, state, model, "its model config")
    return model, state


def checked_model_state(ck: Checkpoint) -> dict[str, torch.Tensor]:
    """`ck`'s model tensors after checking names and shapes against its config; names
    any missing, extra or misshapen tensor."""
    return _meta_model_and_state(ck)[1]


def model_from_checkpoint(ck: Checkpoint, device="cpu", dtype: torch.dtype | None = None) -> Transformer:
    """The Transformer of `ck`'s config with its weights (see `checked_model_state`)."""
    model, state = _meta_model_and_state(ck)
    model = model.to_empty(device=device)
    model.load_state_dict(state, strict=True)
    if dtype is not None:
        model = model.to(dtype)
    return model


def load_model(path: str | os.PathLike, device="cpu", dtype: torch.dtype | None = None,
               kinds: tuple[str, ...] = (C.KIND_MODEL, C.KIND_TRAIN_STATE)):
    """(model in eval mode, its tokenizer, the Checkpoint) from a smedjan checkpoint file."""
    ck = load_checkpoint(path, kinds=kinds)
    tok = ck.tokenizer
    if tok.vocab_size != ck.config.vocab_size:
        raise UserError(f"{path}: tokenizer has {tok.vocab_size} tokens, the model {ck.config.vocab_size}")
    model = model_from_checkpoint(ck, device, dtype).eval()
    return model, tok, ck
