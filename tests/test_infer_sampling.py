"""Sampling (penalty, temperature, top-k, top-p, seeds), the streaming UTF-8
detokenizer, and stop strings that span tokens."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smedjan.errors import UserError
from smedjan.infer import Detokenizer, Engine, SamplingParams, StopText
from smedjan.infer.sampling import apply_repetition_penalty, filter_top_k_top_p, sample
from smedjan.model import load_model


@pytest.fixture(scope="module")
def micro(trained_checkpoint):
    model, tok, _ = load_model(trained_checkpoint)
    return model, tok


def run(micro, text: str, **kw):
    model, tok = micro
    return Engine(model, tok).generate([[tok.bos_id] + tok.encode(text)], SamplingParams(**kw))[0]


# ---------------------------------------------------------------- sampling
def test_repetition_penalty_is_the_ctrl_formula():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(50, generator=gen, dtype=torch.float64) * 3
    seen = torch.zeros(50, dtype=torch.bool)
    seen[[0, 3, 7, 8, 21, 49]] = True
    got = apply_repetition_penalty(logits, seen, 1.7)
    for i in range(50):  # written out, one logit at a time
        x = logits[i].item()
        want = (x / 1.7 if x > 0 else x * 1.7) if seen[i] else x
        assert got[i].item() == pytest.approx(want, rel=1e-15, abs=0)
    from transformers import RepetitionPenaltyLogitsProcessor

    ids = seen.nonzero().T  # [1, n]: HF takes the ids that were seen
    torch.testing.assert_close(got, RepetitionPenaltyLogitsProcessor(1.7)(ids, logits[None].clone())[0])


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.6), (12, 0.8), (1, 1.0), (0, 1e-9)])
def test_top_k_top_p_keep_the_same_tokens_as_transformers(top_k, top_p):
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(1, 64, generator=torch.Generator().manual_seed(top_k))
    ref = logits.clone()
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1:
        ref = TopPLogitsWarper(top_p)(None, ref)
    got = filter_top_k_top_p(logits[0], top_k, top_p)
    assert torch.equal(torch.isinf(got), torch.isinf(ref[0]))
    assert torch.equal(got[~torch.isinf(got)], logits[0][~torch.isinf(got)])


def test_a_seed_reproduces_the_tokens_and_other_seeds_differ(micro):
    kw = dict(text="ROMEO:", temperature=1.2, max_new_tokens=30, ignore_eos=True)
    a, b, c = run(micro, seed=7, **kw), run(micro, seed=7, **kw), run(micro, seed=8, **kw)
    assert a.token_ids == b.token_ids and a.text == b.text
    assert a.token_ids != c.token_ids


@pytest.mark.parametrize("kw", [{"top_k": 1}, {"top_p": 1e-9}, {"temperature": 0.0}])
def test_degenerate_sampling_is_greedy(micro, kw):
    model, tok = micro
    greedy = run(micro, "JULIET:", temperature=0, max_new_tokens=25, ignore_eos=True)
    got = run(micro, "JULIET:", **{"temperature": 1.0, "seed": 1, "max_new_tokens": 25, "ignore_eos": True, **kw})
    assert got.token_ids == greedy.token_ids


def test_repetition_penalty_changes_greedy_choices_as_the_formula_says(micro):
    model, tok = micro
    prompt = [tok.bos_id] + tok.encode("the the the the the")
    out = Engine(model, tok).generate([prompt], SamplingParams(temperature=0, repetition_penalty=5.0,
                                                               max_new_tokens=12, ignore_eos=True))[0]
    ids = list(prompt)
    with torch.no_grad():  # reference: full forward, float64 penalty by the formula, argmax
        for _ in range(12):
            logits = model(torch.tensor([ids]))[0, -1].double()
            for t in set(ids):
                logits[t] = logits[t] / 5.0 if logits[t] > 0 else logits[t] * 5.0
            ids.append(int(logits.argmax()))
    assert out.token_ids == ids[len(prompt):]


@pytest.mark.parametrize("kw,needle", [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
                                       ({"top_k": -2}, "top_k"), ({"max_new_tokens": 0}, "at least 1"),
                                       ({"repetition_penalty": 0}, "repetition"), ({"stop": [""]}, "stop")])
def test_bad_settings_are_user_errors(kw, needle):
    with pytest.raises(UserError, match=needle):
        SamplingParams(**kw)


# ------------------------------------------------------- text and stop strings
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=st.sampled_from("aé€😀 \n漢字xyz"), max_size=40),
       noise=st.lists(st.integers(0, 255), max_size=6))
def test_streamed_text_equals_decode_and_never_splits_a_character(tokenizer, text, noise):
    ids = tokenizer.encode(text) + [tokenizer.byte_ids[b] for b in noise]  # noise: maybe invalid UTF-8
    detok = Detokenizer(tokenizer)
    deltas = [detok.add(i) for i in ids] + [detok.flush()]
    assert "".join(deltas) == tokenizer.decode(ids)
    if not noise:
        assert "\ufffd" not in "".join(deltas)  # a character cut between tokens waits, never breaks


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet="abc\n", max_size=30), cuts=st.lists(st.integers(0, 30), max_size=8),
       stops=st.lists(st.text(alphabet="abc\n", min_size=1, max_size=4), min_size=1, max_size=3))
def test_stop_text_releases_exactly_the_text_before_the_first_stop(text, cuts, stops):
    bounds = sorted(set(c for c in cuts if c <= len(text)))
    pieces = [text[a:b] for a, b in zip([0] + bounds, bounds + [len(text)])]
    st_, out, hit = StopText(stops), [], False
    for p in pieces:
        o, hit = st_.feed(p)
        out.append(o)
        if hit:
            break
    if not hit:
        out.append(st_.flush())
    # Generation ends at the first delta after which the text contains a stop string;
    # the text is cut at the earliest stop string it then contains.
    expected, seen = text, ""
    for p in pieces:
        seen += p
        starts = [i for i in (seen.find(s) for s in stops) if i >= 0]
        if starts:
            expected = seen[:min(starts)]
            break
    assert hit == any(s in text for s in stops)
    assert "".join(out) == expected


def test_stop_string_across_a_token_boundary_cuts_the_text_exactly(micro):
    model, tok = micro
    free = run(micro, "KING RICHARD III:\n", temperature=0, max_new_tokens=40, ignore_eos=True)
    pieces = [tok.decode([t]) for t in free.token_ids]
    # the first boundary with at least two characters on each side: the stop string spans it
    k = next(i for i in range(1, len(pieces)) if len("".join(pieces[:i])) >= 2 and len(pieces[i]) >= 2
             and len(pieces[i - 1]) >= 2)
    before = "".join(pieces[:k])
    stop = before[-2:] + pieces[k][:2]
    cut = free.text.find(stop)
    engine = Engine(model, tok)
    deltas = list(engine.stream([tok.bos_id] + tok.encode("KING RICHARD III:\n"),
                                SamplingParams(temperature=0, max_new_tokens=40, stop=["zzzz-never", stop])))
    text = "".join(d.text for d in deltas)
    assert text == free.text[:cut] and deltas[-1].finish_reason == "stop"
    # it stopped on the very token that completed the stop string
    done = next(j for j in range(1, len(pieces) + 1) if stop in tok.decode(free.token_ids[:j]))
    assert len([t for d in deltas for t in d.token_ids]) == done


# ------------------------------------------------- hostile settings (issue 20)
def _hostile_logits() -> torch.Tensor:
    """Logits a model can produce: large, tied at the top, and near float32's range."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(300, generator=gen) * 30
    logits[17] = logits[40] = logits.max() + 1.0  # a tie: greedy takes the lower id
    logits[5], logits[6] = 3e38, -3e38
    return logits


@pytest.mark.parametrize("temperature", [2.57e-38, 1e-40, 5e-324, 1e-30, 9.9e-6])
def test_a_temperature_below_the_threshold_is_greedy(temperature):
    logits = _hostile_logits()
    logits[5] = 12.0  # the tie at 17/40 is the maximum
    params = SamplingParams(temperature=temperature, seed=1)
    assert params.greedy
    assert sample(logits, params, params.generator()) == 17


@pytest.mark.parametrize("temperature", [1e-5, 1e-3, 0.7, 2.0, 100.0, 1e30, 1e300])
@pytest.mark.parametrize("penalty", [1.0, 0.01, 100.0])
def test_every_accepted_setting_samples_a_real_token(temperature, penalty):
    logits = _hostile_logits()
    seen = torch.zeros(300, dtype=torch.bool)
    seen[::3] = True
    params = SamplingParams(temperature=temperature, repetition_penalty=penalty, top_p=0.9, seed=2)
    gen = params.generator()
    for _ in range(20):
        assert 0 <= sample(logits, params, gen, seen) < 300


def _reference_probs(logits, temperature, top_k, top_p, penalty, seen) -> torch.Tensor:
    """The distribution written out in float64, one step at a time (HF's order)."""
    x = logits.double().clone()
    for i in range(len(x)):
        if seen[i]:
            x[i] = x[i] / penalty if x[i] > 0 else x[i] * penalty
    x = (x - x.max()) / temperature
    order = sorted(range(len(x)), key=lambda i: (-x[i].item(), i))  # ties: the lower id first
    kept = order[:top_k] if top_k else order
    weights = {i: math.exp(x[i].item()) for i in kept}
    total = sum(weights.values())
    final, mass = [], 0.0
    for i in kept:  # the smallest head of the ranking whose probability reaches top_p
        if final and mass >= top_p:
            break
        final.append(i)
        mass += weights[i] / total
    p = torch.zeros(len(x), dtype=torch.float64)
    for i in final:
        p[i] = weights[i]
    return p / p.sum()


@pytest.mark.parametrize("temperature,top_k,top_p,penalty", [
    (1.0, 0, 1.0, 1.0), (1e-5, 0, 1.0, 1.0), (0.05, 0, 1.0, 100.0), (2.0, 10, 0.9, 0.01), (50.0, 0, 0.5, 1.3),
    (1e30, 7, 1.0, 1.0),
])
def test_the_distribution_matches_a_float64_reference(temperature, top_k, top_p, penalty):
    from smedjan.infer.sampling import probabilities

    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(64, generator=gen) * 8
    seen = torch.rand(64, generator=gen) < 0.3
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=penalty)
    got = probabilities(logits, params, seen)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    want = _reference_probs(logits, temperature, top_k, top_p, penalty, seen)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)


def test_non_finite_logits_fail_that_sequence_with_a_clear_error():
    from smedjan.infer.sampling import SamplingError

    params = SamplingParams(temperature=1.0, seed=0)
    for bad in (float("nan"), float("inf")):
        logits = torch.zeros(10)
        logits[3] = bad
        with pytest.raises(SamplingError, match="not finite"):
            sample(logits, params, params.generator())
    with pytest.raises(SamplingError, match="not finite"):
        sample(torch.full((10,), -torch.inf), params, params.generator())
    masked = torch.full((10,), -torch.inf)
    masked[4] = 1.0  # -inf is a masked token, not an error
    assert sample(masked, params, params.generator()) == 4


@pytest.mark.parametrize("kw,param", [
    ({"repetition_penalty": 1e-300}, "repetition_penalty"), ({"repetition_penalty": 1e300}, "repetition_penalty"),
    ({"repetition_penalty": float("inf")}, "repetition_penalty"), ({"repetition_penalty": float("nan")},
                                                                     "repetition_penalty"),
    ({"repetition_penalty": -1.0}, "repetition_penalty"), ({"repetition_penalty": 0.0099}, "repetition_penalty"),
    ({"repetition_penalty": 100.5}, "repetition_penalty"), ({"temperature": float("inf")}, "temperature"),
    ({"temperature": float("nan")}, "temperature"), ({"top_p": float("nan")}, "top_p"),
])
def test_out_of_range_settings_name_their_parameter(kw, param):
    from smedjan.infer.sampling import SettingError

    with pytest.raises(SettingError) as e:
        SamplingParams(**kw)
    assert e.value.param == param and str(e.value).startswith(param)


def test_a_tiny_temperature_generates_the_greedy_text(micro):
    greedy = run(micro, "ROMEO:", temperature=0, max_new_tokens=20, ignore_eos=True)
    for t in (2.57e-38, 1e-40):
        assert run(micro, "ROMEO:", temperature=t, seed=3, max_new_tokens=20, ignore_eos=True).token_ids \
            == greedy.token_ids
