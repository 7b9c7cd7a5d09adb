"""The server's worker thread: one request's failure (in sampling, in its prefill, or a
hostile setting) ends that request only; the others in the same batch finish exactly as
they would alone, and the worker keeps serving."""

from __future__ import annotations

import queue

import pytest

from smedjan.infer import Engine, SamplingParams
from smedjan.infer.worker import Request, Worker
from smedjan.model import load_model

PROMPTS = ["ROMEO:", "JULIET:", "First Citizen:", "KING HENRY:"]


@pytest.fixture(scope="module")
def micro(trained_checkpoint):
    model, tok, _ = load_model(trained_checkpoint)
    return model, tok


def _ids(tok, text):
    return [tok.bos_id] + tok.encode(text)


def _solo(micro, text, params):
    model, tok = micro
    return Engine(model, tok).generate([_ids(tok, text)], params)[0].token_ids


def _serve(micro, jobs: list[tuple[list[int], SamplingParams]], max_batch: int = 4) -> list[object]:
    """Run every job through one worker, submitted together so they share batch steps; each
    job's result is its list of token ids, or the exception it was sent."""
    model, tok = micro
    worker = Worker(Engine(model, tok, max_batch=max_batch))
    inbox: queue.Queue = queue.Queue()
    reqs = [Request(ids, p, lambda r, item: inbox.put((r.tag, item)), tag=i) for i, (ids, p) in enumerate(jobs)]
    for r in reqs:  # queued before the thread starts: admitted into one prefill, stepped together
        worker.submit(r)
    worker.start()
    results: list[object] = [[] for _ in jobs]
    left = len(jobs)
    try:
        while left:
            i, item = inbox.get(timeout=120)
            if isinstance(item, Exception):
                results[i], left = item, left - 1
                continue
            results[i].extend(item.token_ids)
            left -= item.finish_reason is not None
        # still serving afterwards
        after = Request(_ids(tok, "HAMLET:"), SamplingParams(temperature=0, max_new_tokens=3),
                        lambda r, item: inbox.put((r.tag, item)), tag="after")
        worker.submit(after)
        while True:
            tag, item = inbox.get(timeout=120)
            assert tag == "after" and not isinstance(item, Exception), item
            if item.finish_reason is not None:
                break
        stats = worker.stats()
    finally:
        worker.stop()
    results.append(stats)
    return results


def _victims():
    return [SamplingParams(temperature=1.0, seed=10 + i, max_new_tokens=12, ignore_eos=True) for i in range(3)]


def test_a_sampling_failure_ends_only_its_own_request(micro, monkeypatch):
    import smedjan.infer.engine as engine_mod

    real = engine_mod.sample
    calls = {"n": 0}

    def flaky(logits, params, gen, seen=None):
        if params.seed == 666:  # the poisoned request fails a few tokens in, as in the issue
            calls["n"] += 1
            if calls["n"] == 4:
                raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return real(logits, params, gen, seen)

    monkeypatch.setattr(engine_mod, "sample", flaky)
    _, tok = micro
    poison = SamplingParams(temperature=1.0, seed=666, max_new_tokens=12, ignore_eos=True)
    jobs = [(_ids(tok, p), v) for p, v in zip(PROMPTS, _victims())] + [(_ids(tok, PROMPTS[3]), poison)]
    *results, stats = _serve(micro, jobs)
    for (text, params), got in zip(zip(PROMPTS, _victims()), results[:3]):
        assert got == _solo(micro, text, params)
    assert isinstance(results[3], RuntimeError) and "probability tensor" in str(results[3])
    assert (stats["failed"], stats["served"], stats["active"]) == (1, 4, 0)


def test_a_prefill_failure_ends_only_its_own_request(micro, monkeypatch):
    model, tok = micro
    poisoned = _ids(tok, "POISON")
    import smedjan.infer.runner as runner_mod

    real = runner_mod.Runner.prefill

    def prefill(self, cache, row, prompts, start):
        if any(list(p) == poisoned[start:] for p in prompts):
            raise RuntimeError("out of memory in the prefill")
        return real(self, cache, row, prompts, start)

    monkeypatch.setattr(runner_mod.Runner, "prefill", prefill)
    jobs = [(_ids(tok, p), v) for p, v in zip(PROMPTS, _victims())]
    jobs.insert(1, (poisoned, SamplingParams(temperature=0, max_new_tokens=5)))
    *results, stats = _serve(micro, jobs)
    assert isinstance(results[1], RuntimeError) and "out of memory" in str(results[1])
    victims = results[:1] + results[2:]
    for text, params, got in zip(PROMPTS, _victims(), victims):
        assert got == _solo(micro, text, params)
    assert (stats["failed"], stats["served"]) == (1, 4)


@pytest.mark.parametrize("hostile", [
    {"temperature": 2.57e-38}, {"temperature": 1e-40}, {"repetition_penalty": 0.01, "temperature": 1e-30},
    {"repetition_penalty": 100.0, "temperature": 2.0}, {"top_p": 5e-324}, {"top_k": 1, "temperature": 2.0},
    {"top_k": 10 ** 30, "seed": -(2 ** 70)},
])
def test_a_hostile_setting_beside_normal_requests_changes_nothing_for_them(micro, hostile):
    _, tok = micro
    attacker = SamplingParams(**{"temperature": 1.0, "max_new_tokens": 12, "ignore_eos": True, **hostile})
    jobs = [(_ids(tok, p), v) for p, v in zip(PROMPTS, _victims())] + [(_ids(tok, "MENENIUS:"), attacker)]
    *results, stats = _serve(micro, jobs)
    for text, params, got in zip(PROMPTS, _victims(), results[:3]):
        assert got == _solo(micro, text, params)
    assert isinstance(results[3], list) and len(results[3]) == 12  # the attacker is served too
    assert stats["failed"] == 0


def test_the_engine_drivers_raise_a_sequence_failure_instead_of_dropping_it(micro, monkeypatch):
    import smedjan.infer.engine as engine_mod
    from smedjan.infer.sampling import SamplingError

    def broken(logits, params, gen, seen=None):
        raise SamplingError("the model's logits are not finite")

    model, tok = micro
    engine = Engine(model, tok, max_batch=2)
    monkeypatch.setattr(engine_mod, "sample", broken)
    params = SamplingParams(temperature=1.0, seed=1, max_new_tokens=5)
    with pytest.raises(RuntimeError, match="not finite"):
        engine.generate([_ids(tok, "ROMEO:"), _ids(tok, "JULIET:")], params)
    assert not engine.active
    with pytest.raises(RuntimeError, match="not finite"):
        list(engine.stream(_ids(tok, "ROMEO:"), params))
    assert not engine.active
    monkeypatch.undo()
    assert len(engine.generate([_ids(tok, "ROMEO:")], params)[0].token_ids) == 5  # the engine still works
