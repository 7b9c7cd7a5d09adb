"""`--compile`: torch.compile (inductor, a C++ compiler on CPU) trains like eager mode and
compiles once: no recompilation after the first step."""

from __future__ import annotations

import pytest
import torch

from smedjan.model import ModelConfig
from smedjan.training.bench import SmedjanRunner


@pytest.mark.slow
def test_compiled_training_matches_eager_and_compiles_once():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    cfg = ModelConfig.make(vocab_size=256, dim=32, n_layers=2, n_heads=2, max_seq_len=16)
    eager = SmedjanRunner(cfg, 2, 16)
    comp = SmedjanRunner(cfg, 2, 16, compile=True)
    le = [eager.trainer.train_step()["loss"] for _ in range(4)]
    lc = [comp.trainer.train_step()["loss"]]
    graphs = counters["stats"]["unique_graphs"]
    lc += [comp.trainer.train_step()["loss"] for _ in range(3)]
    assert counters["stats"]["unique_graphs"] == graphs > 0  # the later steps reuse the first graph
    assert lc == pytest.approx(le, rel=1e-4)
    for a, b in zip(eager.model.parameters(), comp.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
