"""The inference engine: KV-cache decoding against full recomputation, batching,
prefix reuse, stop tokens, context limits and cancellation."""

from __future__ import annotations

import pytest
import torch

from smedjan.errors import UserError
from smedjan.infer import Engine, SamplingParams, Sequence
from smedjan.model import ModelConfig, Transformer, load_model

GREEDY = SamplingParams(temperature=0, max_new_tokens=24)


def random_model(**kw) -> Transformer:
    cfg = ModelConfig.make(**{**dict(vocab_size=97, dim=32, n_layers=2, n_heads=4, max_seq_len=64), **kw})
    torch.manual_seed(0)
    model = Transformer(cfg).double().eval()
    with torch.no_grad():  # random norm gains: a misplaced fold cannot hide behind ones
        for p in model.parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
    return model


def greedy_by_recompute(model: Transformer, prompt: list[int], n: int) -> list[int]:
    """The reference: the full forward over the whole sequence at every step, no cache."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.fixture(scope="module")
def micro(trained_checkpoint):
    model, tok, _ = load_model(trained_checkpoint)
    return model, tok


@pytest.mark.parametrize("kw", [{}, {"n_kv_heads": 2}, {"sliding_window": 5}, {"n_kv_heads": 1, "tie_embeddings": False},
                                {"rope_scaling": "yarn", "rope_factor": 4.0, "rope_original_max_seq_len": 16},
                                {"head_dim": 16}])
def test_kv_cache_greedy_equals_full_recompute(kw):
    model = random_model(**kw)
    prompt = torch.randint(0, 97, (7,), generator=torch.Generator().manual_seed(1)).tolist()
    out = Engine(model, None).generate([prompt], GREEDY)[0]
    assert out.token_ids == greedy_by_recompute(model, prompt, 24)
    assert out.finish_reason == "length" and out.completion_tokens == 24


def test_kv_cache_greedy_equals_full_recompute_on_the_trained_model(micro):
    model, tok = micro  # float32, as served
    prompt = [tok.bos_id] + tok.encode("ROMEO:\nWhat light")
    out = Engine(model, tok).generate([prompt], SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True))[0]
    assert out.token_ids == greedy_by_recompute(model, prompt, 40)
    assert out.text == tok.decode(out.token_ids)


@pytest.mark.parametrize("kw", [{"n_kv_heads": 2}, {"sliding_window": 4}])
def test_batched_prompts_of_different_lengths_equal_one_by_one(kw):
    model = random_model(**kw)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in (3, 11, 1, 7, 5)]
    # Different lengths and settings, so sequences finish at different steps and rows
    # are freed, compacted and refilled while others run (3 rows for 5 prompts).
    params = [SamplingParams(temperature=0, max_new_tokens=n) for n in (9, 4, 12, 6, 8)]
    params[1] = SamplingParams(temperature=1.0, top_p=0.9, seed=5, max_new_tokens=4)
    params[3] = SamplingParams(temperature=0.7, top_k=20, repetition_penalty=1.3, seed=6, max_new_tokens=6)
    batched = Engine(model, None, max_batch=3).generate(prompts, params)
    single = [Engine(model, None).generate([p], sp)[0] for p, sp in zip(prompts, params)]
    assert [b.token_ids for b in batched] == [s.token_ids for s in single]
    assert [len(b.token_ids) for b in batched] == [9, 4, 12, 6, 8]


def test_cancel_frees_the_row_and_the_others_go_on():
    model = random_model(n_kv_heads=2)
    a, b, c = [3, 1, 4, 1, 5], [9, 2, 6], [5, 3, 5, 8, 9, 7, 9]
    engine = Engine(model, None, max_batch=2)
    sa, sb = Sequence(a, GREEDY), Sequence(b, GREEDY)
    engine.add([sa, sb])
    engine.step()
    engine.cancel(sa)  # row 0 is freed; b moves into it
    assert sa.finish_reason == "cancelled" and engine.active == [sb] and engine.free_slots == 1
    sc = Sequence(c, GREEDY)
    engine.add([sc])
    while engine.active:
        engine.step()
    assert sb.tokens == greedy_by_recompute(model, b, 24)
    assert sc.tokens == greedy_by_recompute(model, c, 24)


def test_a_prompt_that_extends_the_cached_one_reuses_it(micro):
    model, tok = micro
    engine = Engine(model, tok)
    first = [tok.bos_id] + tok.encode("KING HENRY:\nOnce more unto the breach")
    out = engine.generate([first], GREEDY)[0]
    follow = first + out.token_ids[:-1] + tok.encode(" and more")  # like a chat's next turn
    calls = []
    real = engine.runner.prefill
    engine.runner.prefill = lambda cache, row, prompts, start=0: calls.append(start) or real(cache, row, prompts, start)
    again = engine.generate([follow], GREEDY)[0]
    assert calls == [len(first) + len(out.token_ids) - 1]  # only the new tokens were prefilled
    assert again.token_ids == Engine(model, tok).generate([follow], GREEDY)[0].token_ids


def test_stop_tokens_end_generation_and_never_reach_the_text(micro):
    model, tok = micro
    from smedjan.formats import constants as C

    # every special but <|system_end|> and <|pad|>: six, the most llama.cpp's end-of-generation keys hold
    ends = {i for name, i in tok.specials.items() if name not in (C.SYSTEM_END, C.PAD)}
    assert Engine(model, tok).end_ids == ends and len(ends) == 6
    prompt = [tok.bos_id] + tok.encode("First Citizen:\n")
    free = Engine(model, tok).generate([prompt], SamplingParams(temperature=0, max_new_tokens=20))[0]
    ids = free.token_ids
    i = max(k for k in range(len(ids)) if ids[k] not in ids[:k])  # the last token to appear first
    out = Engine(model, tok).generate([prompt], SamplingParams(temperature=0, max_new_tokens=20,
                                                               stop_token_ids=(ids[i],)))[0]
    assert i > 0 and out.finish_reason == "stop" and out.token_ids == ids[:i + 1]
    assert out.text == tok.decode(ids[:i])


def test_special_tokens_stop_unless_ignore_eos():
    model = random_model()
    free = Engine(model, None).generate([[1, 2]], SamplingParams(temperature=0, max_new_tokens=30))[0].token_ids
    # Declare a token the model does produce (first seen at step i) a special token.
    i = max(k for k in range(len(free)) if free[k] not in free[:k])

    class Tok:  # what the engine reads from a tokenizer
        tokens = [bytes([65 + t % 26]) for t in range(97)]
        specials = {"<|bos|>": free[i]}

    out = Engine(model, Tok()).generate([[1, 2]], SamplingParams(temperature=0, max_new_tokens=30))[0]
    assert out.finish_reason == "stop" and out.token_ids == free[:i + 1]
    assert out.text == "".join(chr(65 + t % 26) for t in free[:i])
    kept = Engine(model, Tok()).generate([[1, 2]], SamplingParams(temperature=0, max_new_tokens=30, ignore_eos=True))[0]
    assert kept.finish_reason == "length" and kept.token_ids == free


def test_generation_stops_at_the_context_end():
    model = random_model(max_seq_len=16)
    engine = Engine(model, None)
    out = engine.generate([[1, 2, 3, 4, 5]], SamplingParams(temperature=0, max_new_tokens=100))[0]
    assert out.finish_reason == "length" and out.prompt_tokens + out.completion_tokens == 16
    assert out.token_ids == greedy_by_recompute(model, [1, 2, 3, 4, 5], 11)
    with pytest.raises(UserError, match="context is 16"):
        engine.generate([list(range(16))], GREEDY)
    with pytest.raises(UserError, match="empty"):
        engine.generate([[]], GREEDY)
    assert engine.generate([list(range(15))], GREEDY)[0].completion_tokens == 1


def test_stream_yields_the_same_as_generate_and_cancels_when_closed(micro):
    model, tok = micro
    engine = Engine(model, tok)
    prompt = [tok.bos_id] + tok.encode("To be, or not")
    params = SamplingParams(temperature=0.8, seed=3, max_new_tokens=30)
    deltas = list(engine.stream(prompt, params))
    full = engine.generate([prompt], params)[0]
    assert "".join(d.text for d in deltas) == full.text
    assert [t for d in deltas for t in d.token_ids] == full.token_ids
    assert [d.finish_reason for d in deltas][-1] == full.finish_reason and all(d.finish_reason is None for d in deltas[:-1])
    it = engine.stream(prompt, params)
    next(it), next(it)
    it.close()
    assert engine.active == [] and engine.free_slots == 1
