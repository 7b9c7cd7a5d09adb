"""One decode path for every architecture: the model's own forward with per-layer state
(`ModelRunner`) decodes what the fast path (`Runner`, with or without the C kernel) decodes,
token for token, with logits within float32 rounding; models the fast path cannot run
(QK-norm, MLA, block-sparse, ReLU^2) take the model's path automatically."""

from __future__ import annotations

import pytest
import torch

from smedjan.infer import Engine, SamplingParams
from smedjan.infer.runner import ModelRunner, Runner, fast_path_refusal
from smedjan.model import ModelConfig, Transformer

GREEDY = SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True)


def model_of(**kw) -> Transformer:
    cfg = ModelConfig.make(**{**dict(vocab_size=97, dim=64, n_layers=3, n_heads=4, max_seq_len=64), **kw})
    torch.manual_seed(0)
    m = Transformer(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
    return m


PLAIN = [{}, {"n_kv_heads": 2}, {"n_kv_heads": 1, "tie_embeddings": False}, {"window_pattern": "SSL",
         "short_window": 6}, {"logit_softcap": 5.0}]


@pytest.mark.parametrize("kw", PLAIN)
def test_fast_path_and_model_path_agree(kw):
    m = model_of(**kw)
    assert fast_path_refusal(m) is None
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]]
    fast = Engine(m, None, max_batch=3, path="fast")
    slow = Engine(m, None, max_batch=3, path="model")
    assert isinstance(fast.runner, Runner) and isinstance(slow.runner, ModelRunner)
    a, b = fast.generate(prompts, GREEDY), slow.generate(prompts, GREEDY)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    # logits of the same ragged decode step
    ca, cb = fast.runner.new_cache(3, 32), slow.runner.new_cache(3, 32)
    with torch.inference_mode():
        la = fast.runner.prefill(ca, 0, prompts)
        lb = slow.runner.prefill(cb, 0, prompts)
        torch.testing.assert_close(la, lb, rtol=1e-4, atol=1e-4)
        lens = [len(p) for p in prompts]
        nxt = torch.tensor([11, 12, 13])
        torch.testing.assert_close(fast.runner.decode(ca, nxt, lens), slow.runner.decode(cb, nxt, lens), rtol=1e-4,
                                   atol=1e-4)


@pytest.mark.parametrize("kw,why", [({"qk_norm": True}, "QK-norm"), ({"mla_latent_dim": 32}, "mla"),
                                    ({"block_sparse_top_k": 1, "block_size": 4}, "block_sparse"),
                                    ({"mlp": "relu2"}, "relu2")])
def test_other_architectures_take_the_models_path(kw, why):
    m = model_of(**kw)
    assert why in fast_path_refusal(m)
    eng = Engine(m, None, max_batch=2)
    assert isinstance(eng.runner, ModelRunner)
    # greedy decoding with state equals recomputing the whole sequence at every step
    prompt = [1, 2, 3, 4]
    got = eng.generate([prompt], GREEDY)[0].token_ids
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(len(got)):
            ids.append(int(m(torch.tensor([ids]))[0, -1].argmax()))
    assert got == ids[len(prompt):]


def test_recurrent_style_states_are_reused_only_whole():
    """A row whose state cannot be cut back (truncatable False) is prefilled from scratch
    unless the new prompt extends exactly what it holds."""
    m = model_of()
    eng = Engine(m, None, max_batch=1, path="model")
    eng.runner.truncatable = False
    calls = []
    real = eng.runner.prefill
    eng.runner.prefill = lambda cache, row, prompts, start=0: calls.append(start) or real(cache, row, prompts, start)
    first = eng.generate([[1, 2, 3, 4, 5]], SamplingParams(temperature=0, max_new_tokens=3))[0]
    held = [1, 2, 3, 4, 5] + first.token_ids[:-1]  # what the row holds: the last token was never fed
    eng.generate([held + [7]], SamplingParams(temperature=0, max_new_tokens=3))
    assert calls[-1] == len(held)  # extends exactly what the row holds: only the new token is prefilled
    eng.generate([[1, 2, 3, 9]], GREEDY)  # shares only a prefix: a fresh prefill
    assert calls[-1] == 0


RECURRENT = [{"mixer": "ssm", "ssm_head_dim": 32, "ssm_chunk": 4}, {"mixer": "linear_attn", "linear_attn_chunk": 4},
             {"mixer": "rwkv", "mlp": "rwkv", "rwkv_head_dim": 16, "rwkv_chunk": 4},
             {"layer_pattern": "ssm,rwkv,attention", "ssm_head_dim": 32, "rwkv_head_dim": 16}]


@pytest.mark.parametrize("kw", RECURRENT)
def test_recurrent_mixers_decode_batched_and_reuse_whole_states(kw):
    """Several prompts of different lengths decode together (ragged steps, rows moving as
    sequences finish) to what recomputing each whole sequence gives; a follow-up prompt
    that extends what a row holds continues its state (only the new tokens are prefilled)."""
    m = model_of(**kw)
    eng = Engine(m, None, max_batch=3)
    assert isinstance(eng.runner, ModelRunner) and not eng.runner.truncatable
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]]
    params = [SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True) for n in (12, 5, 9)]
    got = [c.token_ids for c in eng.generate(prompts, params)]
    for prompt, tokens in zip(prompts, got):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(len(tokens)):
                ids.append(int(m(torch.tensor([ids]))[0, -1].argmax()))
        assert tokens == ids[len(prompt):]
    one = Engine(m, None, max_batch=1)
    starts, real = [], one.runner.prefill
    one.runner.prefill = lambda cache, row, ps, start=0: starts.append(start) or real(cache, row, ps, start)
    first = one.generate([[1, 2, 3, 4, 5]], SamplingParams(temperature=0, max_new_tokens=4))[0]
    held = [1, 2, 3, 4, 5] + first.token_ids[:-1]
    again = one.generate([held + [7, 8]], GREEDY)[0].token_ids
    assert starts == [0, len(held)]  # the state was carried on, not rebuilt
    assert again == Engine(m, None, max_batch=1).generate([held + [7, 8]], GREEDY)[0].token_ids
