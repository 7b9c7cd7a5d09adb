"""Shared fixtures: the shared data folder (or a skip) and a small trained tokenizer."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from helpers import DATA, SHARED

# A shell without job control starts background commands with SIGINT ignored, and the
# tools' subprocesses would inherit that: the Ctrl-C tests would then wait out their
# timeouts. A Python handler here is reset to the default in every exec'd child.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Triton compiles for a GPU or, with TRITON_INTERPRET=1, interprets on the CPU; it reads the
# variable when it is first imported. Without a GPU the kernel tests (test_kernels.py) run
# in the interpreter, so set it before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data; tests that need more than data/ skip (with the reason) without it."""
    if not SHARED.is_dir():
        pytest.skip(f"shared data folder {SHARED} is absent (set SMEDJAN_SHARED_DATA); CI always has it")
    return SHARED


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory) -> Path:
    """A 2048-token BPE trained on the shipped corpus (first 3M characters)."""
    from smedjan.data.sources import iter_chunks
    from smedjan.tokenizer import train_bpe

    path = tmp_path_factory.mktemp("tok") / "tokenizer.bin"
    texts = (c.text for c in iter_chunks([DATA / "pretrain"], max_chars=3_000_000))
    train_bpe(texts, vocab_size=2048, workers=1).save(path)
    return path


@pytest.fixture(scope="session")
def tokenizer(tokenizer_path):
    from smedjan.tokenizer import Tokenizer

    return Tokenizer.load(tokenizer_path)


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory, tokenizer) -> Path:
    """A micro model (dim 64, 2 layers, GQA 4/2 heads, vocab 2048) trained for 150 AdamW
    steps on tinyshakespeare with a plain loop: not random, so greedy generation and
    perplexity mean something, yet built in ~20 s. Saved as a `model` checkpoint."""
    import numpy as np
    import torch

    from smedjan.data.sources import iter_chunks
    from smedjan.formats import constants as C
    from smedjan.formats.checkpoint import save_checkpoint
    from smedjan.model import ModelConfig, Transformer

    text = "".join(c.text for c in iter_chunks([DATA / "pretrain" / "tinyshakespeare.txt.zst"], max_chars=400_000))
    data = torch.tensor(np.array(tokenizer.encode(text), dtype=np.int64))
    cfg = ModelConfig.make(vocab_size=tokenizer.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                      max_seq_len=256, preset="custom")
    torch.manual_seed(0)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(150):
        starts = torch.randint(0, len(data) - 65, (16,), generator=gen)
        x = torch.stack([data[s:s + 64] for s in starts])
        y = torch.stack([data[s + 1:s + 65] for s in starts])
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    path = tmp_path_factory.mktemp("ckpt") / "final.bin"
    save_checkpoint(path, model.state_dict(), kind=C.KIND_MODEL, config=cfg, tokenizer=tokenizer,
                    meta={"step": 150, "train_loss": loss.item()})
    return path
