"""Optimizer construction: role-tagged parameter groups, decay on hidden matrices only."""

from __future__ import annotations

import pytest
import torch

from smedjan.errors import UserError
from smedjan.model import ModelConfig, Transformer
from smedjan.optim import OPTIMIZERS, OptimizerSettings, build_optimizer, param_groups


def model(**kw) -> Transformer:
    return Transformer(ModelConfig.make(vocab_size=97, dim=32, n_layers=2, n_heads=4, max_seq_len=16, **kw))


def by_role(groups):
    return {g["role"]: g for g in groups}


def test_every_parameter_in_exactly_one_group():
    for m in (model(), model(tie_embeddings=False, n_kv_heads=2)):
        groups = param_groups(m, 0.1)
        ids = [id(p) for g in groups for p in g["params"]]
        assert len(ids) == len(set(ids)) == len(list(m.parameters()))
        for g in groups:
            assert [dict(m.named_parameters())[n] is p for n, p in zip(g["names"], g["params"])] == [True] * len(g["params"])


def test_decay_only_on_block_matrices():
    groups = by_role(param_groups(model(), 0.1))
    assert set(groups) == {"matrix", "embedding", "norm"}  # tied: the head is the embedding
    assert groups["matrix"]["weight_decay"] == 0.1
    assert all(g["weight_decay"] == 0.0 for r, g in groups.items() if r != "matrix")
    # 7 linear weights per block (wq wk wv wo w1 w2 w3), all 2-D, nothing else.
    assert len(groups["matrix"]["params"]) == 2 * 7
    assert all(p.ndim == 2 for p in groups["matrix"]["params"])
    assert all(n.startswith("layers.") for n in groups["matrix"]["names"])
    assert groups["embedding"]["names"] == ["tok_embeddings.weight"]
    assert all(p.ndim == 1 for p in groups["norm"]["params"])
    assert len(groups["norm"]["params"]) == 2 * 2 + 1


def test_untied_head_gets_its_own_undecayed_group():
    groups = by_role(param_groups(model(tie_embeddings=False), 0.1))
    assert groups["head"]["names"] == ["output.weight"] and groups["head"]["weight_decay"] == 0.0


def test_adamw_settings_and_peak_lr():
    opt = build_optimizer("adamw", param_groups(model(), 0.05), OptimizerSettings(lr=1e-3, beta2=0.9))
    assert isinstance(opt, torch.optim.AdamW)
    for g in opt.param_groups:
        assert g["betas"] == (0.9, 0.9) and g["eps"] == 1e-5 and g["peak_lr"] == 1e-3 and g["lr"] == 1e-3
        assert g["weight_decay"] == (0.05 if g["role"] == "matrix" else 0.0)


def test_weight_decay_really_skips_norms_and_embedding():
    """With zero gradients AdamW moves only decayed weights: exactly the matrices."""
    m = model()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = build_optimizer("adamw", param_groups(m, 0.5), OptimizerSettings(lr=0.1, weight_decay=0.5))
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in m.named_parameters():
        moved = not torch.equal(p, before[n])
        assert moved == (p.ndim == 2 and n.startswith("layers.")), n
        if moved:
            torch.testing.assert_close(p, before[n] * (1 - 0.1 * 0.5))


def test_registry_and_bad_settings():
    assert "adamw" in OPTIMIZERS
    with pytest.raises(UserError, match="`optimizer` .sgd."):
        build_optimizer("sgd", param_groups(model(), 0.1), OptimizerSettings())
    with pytest.raises(UserError, match="`lr`"):
        build_optimizer("adamw", param_groups(model(), 0.1), OptimizerSettings(lr=0))
    with pytest.raises(UserError, match="`adamw_beta2`"):
        build_optimizer("adamw", param_groups(model(), 0.1), OptimizerSettings(beta2=1.0))
