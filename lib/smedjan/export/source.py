"""What the exporters read: a smedjan checkpoint or a Hugging Face folder, as one `ModelSource`.

A source is a model config, its weights under smedjan's tensor names in their stored dtype
(float32, bfloat16 or float16), and the tokenizer when there is one. Every tensor is checked
against the config (name, shape, dtype, finite values) before any output is written.

    src = checkpoint_source(Path("final.bin"), tok=None)     # checkpoint: embedded tokenizer
(`smedjan.export.load.load_source` picks this or the HF reader by what the path is.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from smedjan.errors import UserError
from smedjan.model.config import ModelConfig

ALLOWED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class ModelSource:
    path: Path
    config: ModelConfig
    tensors: dict[str, torch.Tensor]  # smedjan names -> [out, in] matrices and [dim] norm gains
    tokenizer: object | None  # smedjan.tokenizer.Tokenizer
    name: str
    kind: str  # "checkpoint" or "hf"
    meta: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    tokenizer_note: str | None = None  # why there is no tokenizer, when there is none


def check_tensors(cfg: ModelConfig, tensors: dict[str, torch.Tensor], where: str,
                  display: dict[str, str] | None = None) -> None:
    """Names, shapes, dtypes and finiteness against the config; `display` maps our names to the
    file's own (HF) names for the message."""
    from smedjan.model.load import check_state_shapes
    from smedjan.model.model import meta_model

    model = meta_model(cfg)  # the config's tensors, without allocating them
    check_state_shapes(where, tensors, model, "its model config", display)
    shown = (lambda n: (display or {}).get(n, n))
    for name, t in tensors.items():
        if t.dtype not in ALLOWED_DTYPES:
            raise UserError(f"{where}: tensor {shown(name)!r} has dtype {str(t.dtype).removeprefix('torch.')}; "
                            "supported: float32, bfloat16, float16")
        if not bool(torch.isfinite(t).all()):
            raise UserError(f"{where}: tensor {shown(name)!r} holds NaN or infinite values")


def checkpoint_source(p: Path, tok) -> ModelSource:
    """A smedjan checkpoint as a ModelSource; `tok` (or None) must equal its embedded tokenizer."""
    from smedjan.formats.checkpoint import TOKENIZER_TENSOR, load_checkpoint
    from smedjan.model.mtp import without_mtp

    ck = load_checkpoint(p)
    cfg = ck.config
    state = ck.model_state()
    check_tensors(cfg, state, str(p))
    # Multi-token-prediction modules serve training and speculative decoding only: neither
    # llama.cpp nor transformers' Llama has them, so every export is of the model without.
    cfg, state = without_mtp(cfg, state)
    note = None
    if TOKENIZER_TENSOR in ck.tensors:
        embedded = ck.tokenizer
        if tok is not None and tok.fingerprint != embedded.fingerprint:
            raise UserError(f"{p}: was made with tokenizer {embedded.fingerprint}, --tokenizer is "
                            f"{tok.fingerprint}; leave --tokenizer out to use the embedded one")
        tok = embedded
    elif tok is None:
        note = f"{p} carries no tokenizer"
    return ModelSource(path=p, config=cfg, tensors=state, tokenizer=tok, name=p.stem, kind="checkpoint",
                       meta=dict(ck.meta), tokenizer_note=note)
