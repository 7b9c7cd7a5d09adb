"""What the exporters read: a smedjan checkpoint or a Hugging Face folder, as one `ModelSource`.

A source is a model config, its weights under smedjan's tensor names in their stored dtype
(float32, bfloat16 or float16), and the tokenizer when there is one. Every tensor is checked
against the config (name, shape, dtype, finite values) before any output is written.

    src = load_source("final.bin")                          # checkpoint: embedded tokenizer
    src = load_source("tiny-random-llama/", tokenizer="tok.bin")  # HF folder
"""

from __future__ import annotations

import os
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
    from smedjan.model.model import Transformer

    with torch.device("meta"):  # the config's tensors, without allocating them
        model = Transformer(cfg)
    check_state_shapes(where, tensors, model, "its model config", display)
    shown = (lambda n: (display or {}).get(n, n))
    for name, t in tensors.items():
        if t.dtype not in ALLOWED_DTYPES:
            raise UserError(f"{where}: tensor {shown(name)!r} has dtype {str(t.dtype).removeprefix('torch.')}; "
                            "supported: float32, bfloat16, float16")
        if not bool(torch.isfinite(t).all()):
            raise UserError(f"{where}: tensor {shown(name)!r} holds NaN or infinite values")


def _load_tokenizer(path: str | os.PathLike | None):
    if path is None:
        return None
    from smedjan.tokenizer import Tokenizer

    return Tokenizer.load(path)


def load_source(path: str | os.PathLike, tokenizer: str | os.PathLike | None = None) -> ModelSource:
    """A checkpoint file or an HF folder; `tokenizer` (a tokenizer.bin) supplies or must equal
    the tokenizer, and must have the model's vocabulary size."""
    p = Path(path)
    tok = _load_tokenizer(tokenizer)
    if p.is_dir():
        from smedjan.export.hf import read_hf_dir

        src = read_hf_dir(p, tokenizer=tok)
    else:
        src = _checkpoint_source(p, tok)
    if src.tokenizer is not None and src.tokenizer.vocab_size != src.config.vocab_size:
        who = f"--tokenizer {tokenizer}" if tok is not None else f"{p}'s tokenizer"
        raise UserError(f"{who} has {src.tokenizer.vocab_size} tokens but the model in {p} has a vocabulary "
                        f"of {src.config.vocab_size}; they must match")
    return src


def _checkpoint_source(p: Path, tok) -> ModelSource:
    from smedjan.formats.checkpoint import TOKENIZER_TENSOR, load_checkpoint

    ck = load_checkpoint(p)
    cfg = ck.config
    state = ck.model_state()
    check_tensors(cfg, state, str(p))
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
