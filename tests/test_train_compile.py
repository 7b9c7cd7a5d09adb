"""`--compile`: torch.compile (inductor, a C++ compiler on CPU) trains like eager mode and
compiles once: no recompilation after the first step."""

from __future__ import annotations

import pytest
import torch

from smedjan.model import ModelConfig
from smedjan.training.bench import SmedjanRunner


def compiled_and_eager(cfg: ModelConfig, steps: int) -> tuple[SmedjanRunner, SmedjanRunner]:
    """Train `cfg` eagerly and compiled for `steps` steps: the same losses, and the steps
    after the first reuse its graph (no recompilation)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager = SmedjanRunner(cfg, 2, 16)
    comp = SmedjanRunner(cfg, 2, 16, compile=True)
    le = [eager.trainer.train_step()["loss"] for _ in range(steps)]
    lc = [comp.trainer.train_step()["loss"]]
    graphs = counters["stats"]["unique_graphs"]
    lc += [comp.trainer.train_step()["loss"] for _ in range(steps - 1)]
    assert counters["stats"]["unique_graphs"] == graphs > 0
    assert lc == pytest.approx(le, rel=1e-4)
    return eager, comp


@pytest.mark.slow
def test_compiled_training_matches_eager_and_compiles_once():
    eager, comp = compiled_and_eager(ModelConfig.make(vocab_size=256, dim=32, n_layers=2, n_heads=2, max_seq_len=16), 4)
    for a, b in zip(eager.model.parameters(), comp.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("kw", [
    dict(layer_pattern="ssm,linear_attn,rwkv,attention", n_layers=4, ssm_head_dim=16, rwkv_head_dim=16, ssm_chunk=8,
         linear_attn_chunk=8, rwkv_chunk=8),
    dict(mixer="rwkv", mlp="rwkv", rwkv_head_dim=16, rwkv_chunk=8),  # the contextual feed-forward
])
def test_recurrent_mixers_compile_once_and_train_like_eager(kw):
    """The chunk loops unroll at a fixed length: one graph, the eager losses."""
    compiled_and_eager(ModelConfig.make(vocab_size=256, dim=32, n_heads=2, max_seq_len=16, **{"n_layers": 2, **kw}), 3)
