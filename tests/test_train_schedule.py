"""LR schedules against their closed-form definitions."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smedjan.errors import UserError
from smedjan.training.schedule import SCHEDULES, Schedule

S, W, M = 100, 10, 0.1


def test_warmup_is_linear_from_one_step_to_one():
    for kind in SCHEDULES:
        s = Schedule(kind, S, W, M)
        assert [s(i) for i in range(W)] == pytest.approx([(i + 1) / W for i in range(W)])
        assert s(0) > 0


def test_cosine_closed_form():
    s = Schedule("cosine", S, W, M)
    for i in range(W, S):
        p = (i - W + 1) / (S - W)
        assert s(i) == pytest.approx(M + (1 - M) * 0.5 * (1 + math.cos(math.pi * p)))
    assert s(S - 1) == pytest.approx(M)
    assert s(W + (S - W) // 2 - 1) == pytest.approx((1 + M) / 2)  # half way: the mean of peak and floor


def test_wsd_holds_then_cools_down_with_one_minus_sqrt():
    s = Schedule("wsd", S, W, M, warmdown=0.2)
    assert s.decay_start == 80
    assert all(s(i) == 1.0 for i in range(W, 80))
    for i in range(80, S):
        p = (i - 80 + 1) / 20
        assert s(i) == pytest.approx(M + (1 - M) * (1 - math.sqrt(p)))
    assert s(S - 1) == pytest.approx(M)


def test_trapezoid_cools_down_linearly():
    s = Schedule("trapezoid", S, W, M, warmdown=0.3)
    assert s.decay_start == 70
    assert all(s(i) == 1.0 for i in range(W, 70))
    for i in range(70, S):
        assert s(i) == pytest.approx(M + (1 - M) * (1 - (i - 69) / 30))


def test_wso_never_decays():
    s = Schedule("wso", S, W, M)
    assert all(s(i) == 1.0 for i in range(W, 10 * S))


def test_invsqrt_closed_form_with_floor():
    s = Schedule("invsqrt", S, W, 0.2)
    for i in range(W, 1000):
        assert s(i) == pytest.approx(max(0.2, math.sqrt(W / (i + 1))))
    assert s(1000) == 0.2  # floored at min_ratio
    assert Schedule("invsqrt", S, 0, 0.0)(3) == pytest.approx(0.5)


def test_warmdown_never_eats_the_warmup():
    s = Schedule("wsd", 20, 15, M, warmdown=0.5)
    assert s.decay_start == 15
    assert s(14) == 1.0 and s(19) == pytest.approx(M)


@pytest.mark.parametrize("kw,needle", [
    ({"kind": "linear"}, "--lr-schedule"), ({"total_steps": 0}, "steps"), ({"warmup": -1}, "--warmup"),
    ({"min_ratio": 1.5}, "--min-lr"), ({"warmdown": 2.0}, "--warmdown"),
])
def test_bad_settings_are_user_errors(kw, needle):
    args = {"kind": "cosine", "total_steps": 10, "warmup": 1, **kw}
    with pytest.raises(UserError, match=needle):
        Schedule(**args)


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(SCHEDULES), total=st.integers(1, 500), warm=st.integers(0, 600),
       m=st.floats(0, 1), wd=st.floats(0, 1))
def test_every_schedule_stays_in_bounds_and_decays_monotonically(kind, total, warm, m, wd):
    s = Schedule(kind, total, warm, m, wd)
    vals = [s(i) for i in range(total)]
    assert all(min(m, 1 / max(warm, 1)) - 1e-12 <= v <= 1.0 + 1e-12 for v in vals)
    after = vals[warm:]
    assert all(a >= b - 1e-12 for a, b in zip(after, after[1:]))  # never rises after warmup
    decays = kind == "cosine" or (kind in ("wsd", "trapezoid") and round(wd * total) >= 1)
    if decays and total > warm:
        assert vals[-1] == pytest.approx(m)  # the last update runs at exactly the floor


def test_horizon_precedence_and_formulas():
    from smedjan.model import ModelConfig
    from smedjan.training.pretrain import DEFAULT_STEPS, TrainArgs, resolve_horizon

    cfg = ModelConfig.from_preset("small", 8192)
    tps = 32 * 256
    a = TrainArgs(dataset="d", tokenizer="t", seq_len=256)
    assert resolve_horizon(a, cfg, tps) == (DEFAULT_STEPS, "default")
    a.target_param_data_ratio = 20  # Chinchilla: 20 tokens per parameter
    steps, how = resolve_horizon(a, cfg, tps)
    assert steps == math.ceil(20 * 7_212_288 / tps) and "ratio" in how
    a.target_flops = 1e15  # takes precedence over the ratio
    steps, how = resolve_horizon(a, cfg, tps)
    assert steps == round(1e15 / (cfg.flops_per_token(256) * tps)) and "flops" in how
    a.steps = 7  # and --steps over both
    assert resolve_horizon(a, cfg, tps) == (7, "`steps`")  # the library names parameters
