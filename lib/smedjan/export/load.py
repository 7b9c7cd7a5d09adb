"""What the exporters read: a smedjan checkpoint file or a Hugging Face folder, as one
`ModelSource` (see `smedjan.export.source`), checked tensor by tensor.

    src = load_source("final.bin")                                  # checkpoint: embedded tokenizer
    src = load_source("tiny-random-llama/", tokenizer="tok.bin")    # HF folder
"""

from __future__ import annotations

import os
from pathlib import Path

from smedjan.errors import UserError
from smedjan.export.hf_read import read_hf_dir
from smedjan.export.source import ModelSource, checkpoint_source


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
        src = read_hf_dir(p, tokenizer=tok)
    else:
        src = checkpoint_source(p, tok)
    if src.tokenizer is not None and src.tokenizer.vocab_size != src.config.vocab_size:
        who = f"--tokenizer {tokenizer}" if tok is not None else f"{p}'s tokenizer"
        raise UserError(f"{who} has {src.tokenizer.vocab_size} tokens but the model in {p} has a vocabulary "
                        f"of {src.config.vocab_size}; they must match")
    return src


