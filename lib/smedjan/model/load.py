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


def model_from_checkpoint(ck: Checkpoint, device="cpu", dtype: torch.dtype | None = None) -> Transformer:
    """The Transformer of `ck`'s config with its weights; names any missing or extra tensor."""
    cfg = ck.config
    with torch.device("meta"):
        model = Transformer(cfg)
    state = ck.model_state()
    expected = set(model.state_dict())
    missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or extra:
        what = f"missing tensor {missing[0]!r}" if missing else f"unexpected tensor {extra[0]!r}"
        raise UserError(f"{ck.path}: {what} for its model config")
    for name, t in model.state_dict().items():
        if tuple(state[name].shape) != tuple(t.shape):
            raise UserError(f"{ck.path}: tensor {name!r} has shape {tuple(state[name].shape)}, "
                            f"the config needs {tuple(t.shape)}")
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
