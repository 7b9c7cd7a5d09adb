"""The compiled CPU decode kernel against PyTorch: matrix-vector products, whole decode
steps (GQA, sliding window, ragged batches), and thread-count independence."""

from __future__ import annotations

import copy

import pytest
import torch

from smedjan.infer import Runner, cpu_kernel
from smedjan.model import ModelConfig, Transformer

kernel = cpu_kernel.load()
pytestmark = pytest.mark.skipif(kernel is None, reason="no CPU kernel here: it needs an x86-64 CPU with AVX2/FMA "
                                                       "and a C compiler (PyTorch's matmul is used instead)")


@pytest.mark.parametrize("out,inp,rows", [(1, 1, 1), (7, 13, 1), (64, 256, 1), (96, 40, 3), (300, 777, 8)])
def test_gemv_equals_matmul(out, inp, rows):
    gen = torch.Generator().manual_seed(out)
    w, x = torch.randn(out, inp, generator=gen), torch.randn(rows, inp, generator=gen)
    torch.testing.assert_close(kernel.gemv(w, x).double(), x.double() @ w.double().T, rtol=1e-5, atol=1e-4)


def model(**kw) -> Transformer:
    cfg = ModelConfig.make(**{**dict(vocab_size=97, dim=64, n_layers=2, n_heads=4, max_seq_len=64), **kw})
    torch.manual_seed(0)
    m = Transformer(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
    return m


@pytest.mark.parametrize("kw", [{}, {"n_kv_heads": 2}, {"n_kv_heads": 1, "tie_embeddings": False},
                                {"sliding_window": 4}, {"head_dim": 24}])
def test_decode_steps_in_c_equal_the_model(kw, monkeypatch):
    m = model(**kw)
    c_runner = Runner(m)
    monkeypatch.setattr(cpu_kernel, "load", lambda: None)
    torch_runner = Runner(m)
    assert c_runner.kernel is not None and torch_runner.kernel is None
    idx = torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = copy.deepcopy(m).double()(idx).float()  # the reference, in float64
    lens = [2, 6, 9]  # a ragged batch: every row at its own position
    for runner in (c_runner, torch_runner):
        cache = runner.new_cache(3, 32)
        with torch.inference_mode():
            runner.prefill(cache, 0, [idx[r, :lens[r]].tolist() for r in range(3)])
            for step in range(6):
                cols = [n + step for n in lens]
                got = runner.decode(cache, torch.tensor([idx[r, c] for r, c in enumerate(cols)]), cols)
                want = torch.stack([full[r, c] for r, c in enumerate(cols)])
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_results_do_not_depend_on_the_thread_count():
    m = model(n_kv_heads=2, dim=256, n_heads=8, vocab_size=1000)  # big enough to run in parallel
    runner = Runner(m)
    cache = runner.new_cache(2, 64)
    with torch.inference_mode():
        runner.prefill(cache, 0, [[1, 2, 3], [4, 5]])
    saved = [t.clone() for t in cache.k + cache.v]
    outs = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for t, s in zip(cache.k + cache.v, saved):
                t.copy_(s)
            with torch.inference_mode():
                outs.append(runner.decode(cache, torch.tensor([7, 8]), [3, 2]))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(outs[0], outs[1])  # each output is one thread's dot product, in one order


def test_batches_wider_than_the_kernel_use_pytorch_on_the_same_weights():
    m = model(n_kv_heads=2)
    runner = Runner(m)
    rows = cpu_kernel.MAX_ROWS + 3  # 11: the step falls back to PyTorch, with per-row masks
    idx = torch.randint(0, 97, (rows, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = copy.deepcopy(m).double()(idx).float()
    lens = [3 + r % 5 for r in range(rows)]
    cache = runner.new_cache(rows, 32)
    with torch.inference_mode():
        runner.prefill(cache, 0, [idx[r, :lens[r]].tolist() for r in range(rows)])
        for step in range(3):
            cols = [n + step for n in lens]
            got = runner.decode(cache, torch.tensor([idx[r, c] for r, c in enumerate(cols)]), cols)
            torch.testing.assert_close(got, torch.stack([full[r, c] for r, c in enumerate(cols)]), rtol=1e-4,
                                       atol=1e-4)
