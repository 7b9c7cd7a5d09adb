"""Shared fixtures: the shared data folder (or a skip) and a small trained tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import DATA, SHARED


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
