"""state_N.bin contents: RNG streams, optimizer state by parameter name, metrics.jsonl
truncation on resume, cleanup of temporaries."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from smedjan.errors import UserError
from smedjan.model import ModelConfig, Transformer
from smedjan.optim import OptimizerSettings, build_optimizer, param_groups
from smedjan.training.files import MetricsLog, clean_stale_temps, read_metrics, rotate_states
from smedjan.training.state import (apply_train_state, list_states, read_train_state, save_train_state)

CFG = ModelConfig.make(vocab_size=50, dim=16, n_layers=2, n_heads=2, max_seq_len=16)


def setup(seed=0, cfg=CFG):
    torch.manual_seed(seed)
    m = Transformer(cfg)
    opt = build_optimizer("adamw", param_groups(m, 0.1), OptimizerSettings(lr=1e-2))
    return m, opt


def step(m, opt, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, CFG.vocab_size, (2, 9), generator=g)
    loss = m(x[:, :-1], x[:, 1:])
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.item()


def save(path, m, opt, tool="train", cfg=CFG):
    save_train_state(path, model=m, optimizer=opt, model_config=cfg, tokenizer=None, tool=tool, step=3,
                     trainer={"step": 3}, source={"k": 1}, run_config={"lr": 1e-2})


def test_rng_streams_continue_after_restore(tmp_path):
    m, opt = setup()
    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    torch.rand(3), np.random.rand(2), random.random(), np.random.randn()  # move every stream, cache a gaussian
    save(tmp_path / "s.bin", m, opt)
    expect = (torch.rand(5), np.random.rand(5), np.random.randn(3), [random.random() for _ in range(5)],
              random.gauss(0, 1))
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    apply_train_state(read_train_state(tmp_path / "s.bin", "train"), m, opt)
    got = (torch.rand(5), np.random.rand(5), np.random.randn(3), [random.random() for _ in range(5)],
           random.gauss(0, 1))
    assert torch.equal(expect[0], got[0])
    assert np.array_equal(expect[1], got[1]) and np.array_equal(expect[2], got[2])
    assert expect[3] == got[3] and expect[4] == got[4]


def test_optimizer_state_is_stored_by_parameter_name_and_restores_exactly(tmp_path):
    m, opt = setup()
    for s in range(3):
        step(m, opt, s)
    save(tmp_path / "s.bin", m, opt)
    st = read_train_state(tmp_path / "s.bin", "train")
    assert "optim.state.layers.1.mixer.wq.weight.exp_avg_sq" in st.ck.tensors
    assert "optim.state.tok_embeddings.weight.exp_avg" in st.ck.tensors
    ahead = [step(m, opt, s) for s in range(3, 6)]
    m2, opt2 = setup(seed=99)
    apply_train_state(st, m2, opt2)
    again = [step(m2, opt2, s) for s in range(3, 6)]
    assert ahead == again  # bitwise
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_state_of_a_different_model_is_refused(tmp_path):
    m, opt = setup()
    step(m, opt, 0)
    save(tmp_path / "s.bin", m, opt)
    other = ModelConfig.make(vocab_size=50, dim=16, n_layers=1, n_heads=2, max_seq_len=16)
    m2, opt2 = setup(cfg=other)
    with pytest.raises(UserError, match="unexpected tensor|missing tensor"):
        apply_train_state(read_train_state(tmp_path / "s.bin", "train"), m2, opt2)


def test_state_kind_and_tool_checks(tmp_path):
    from smedjan.formats import constants as C
    from smedjan.formats.checkpoint import save_checkpoint

    m, opt = setup()
    save(tmp_path / "sft.bin", m, opt, tool="sft")
    with pytest.raises(UserError, match="state of `smedjan sft`"):
        read_train_state(tmp_path / "sft.bin", "train")
    save_checkpoint(tmp_path / "final.bin", m.state_dict(), kind=C.KIND_MODEL, config=CFG)
    with pytest.raises(UserError, match="expected train_state"):
        read_train_state(tmp_path / "final.bin", "train")


def test_metrics_log_truncates_to_the_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    for s in range(1, 8):
        log.write({"step": s, "loss": 1.0 / s, "x": float("nan")})
    log.close()
    assert read_metrics(path)[0] == {"step": 1, "loss": 1.0, "x": None}  # NaN is written as null
    with open(path, "a") as f:
        f.write('{"step": 8, "lo')  # cut by a kill -9
    log = MetricsLog(path, resume_step=5)
    log.write({"step": 6, "loss": 0.5})
    log.close()
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6] and recs[-1]["loss"] == 0.5


def test_rotation_and_stale_temporaries(tmp_path):
    for s in (5, 10, 15, 20, 100):
        (tmp_path / f"state_{s}.bin").write_bytes(b"x")
    (tmp_path / ".state_25.bin.abc123.tmp").write_bytes(b"partial")
    (tmp_path / "notes.tmp").write_bytes(b"not ours")
    assert rotate_states(tmp_path, newest=20, keep=2) == [tmp_path / "state_5.bin", tmp_path / "state_10.bin"]
    assert [s for s, _ in list_states(tmp_path)] == [15, 20, 100]  # a later run's state is left alone
    assert clean_stale_temps(tmp_path) == [tmp_path / ".state_25.bin.abc123.tmp"]
    assert (tmp_path / "notes.tmp").exists()
