"""The inference engine: batched generation with a KV cache, streaming text deltas.

A sequence is prefilled (its whole prompt in one forward), then advanced one token
per step. Up to `max_batch` sequences run together, each in its own row of the KV
cache, with its own length, sampling settings and random generator; a finished or
cancelled sequence frees its row at once and a waiting one can take it in the next
step (continuous batching). `generate` and `stream` drive the engine for a list of
prompts or one prompt; a server calls `add`, `step` and `cancel` itself.

End of generation, reported as `finish_reason`:
- "stop": the model produced an end token, or the text reached a stop string (the
  text ends just before it). End tokens are those of `smedjan.tokenizer.specials`:
  `<|assistant_end|>` ends a chat reply; `<|bos|>` starts a new document, which is
  where a base model's text ends; the markers that open a new turn. They are exactly
  the tokens an exported GGUF marks end-of-generation, so llama.cpp stops where smedjan
  does. Special tokens never appear in the text (the two that are not end tokens render
  as nothing, as in llama.cpp). `ignore_eos` turns this off (benchmarks).
- "length": `max_new_tokens` were generated, or prompt + completion filled the
  model's context. A prompt must leave room for at least one new token.
- "cancelled": `cancel()` was called (a client went away).
`completion_tokens` counts every sampled token, a final end token included.

    model, tok, _ = load_model("final.bin")
    engine = Engine(model, tok)
    for d in engine.stream(tok.encode("Once upon"), SamplingParams(temperature=0)):
        print(d.text, end="", flush=True)
    outs = engine.generate([ids_a, ids_b], SamplingParams(max_new_tokens=32, seed=1))
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence as Seq

import torch

from smedjan.errors import UserError
from smedjan.infer.detok import Detokenizer, StopText
from smedjan.infer.runner import runner_for
from smedjan.infer.sampling import SamplingParams, sample
from smedjan.tokenizer.specials import end_ids

_ids = itertools.count()


@dataclass
class Delta:
    """What one step added to one sequence."""

    text: str  # new text, safe to show (never half a character, never part of a stop string)
    token_ids: list[int]  # tokens sampled in this step (one)
    finish_reason: str | None = None  # None while running; then "stop", "length" or "cancelled"


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(eq=False)
class Sequence:
    """One prompt being continued. `length` is the number of KV-cache columns filled."""

    prompt_ids: list[int]
    params: SamplingParams
    tag: Any = None  # the caller's handle (a server request)
    id: int = field(default_factory=lambda: next(_ids))
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    length: int = 0

    def completion(self) -> Completion:
        return Completion(self.text, list(self.tokens), self.finish_reason or "", len(self.prompt_ids),
                          len(self.tokens))


class Engine:
    def __init__(self, model, tokenizer=None, *, max_batch: int = 1, device=None, dtype=None,
                 context: int | None = None, path: str = "auto"):
        """`path`: "auto" (the fast path where it applies), "model" (the model's own forward
        with per-layer state) or "fast"."""
        self.context = min(context or model.cfg.max_seq_len, model.cfg.max_seq_len)
        self.runner = runner_for(model, device, dtype, self.context, path)
        self.tok = tokenizer
        self.max_batch = max_batch
        self.vocab_size = model.cfg.vocab_size
        self.cache = self.runner.new_cache(max_batch, self.context)
        self.active: list[Sequence] = []  # row r of the cache holds active[r]
        # Token ids whose keys/values row r holds in its first len() columns: a new
        # sequence that starts with them skips that part of its prefill (chat turns).
        self._cached: list[list[int]] = [[] for _ in range(max_batch)]
        self.end_ids = end_ids(tokenizer) if tokenizer is not None else frozenset()
        self._state: dict[int, tuple] = {}  # seq.id -> (generator, seen mask, detokenizer, stop text)

    # ------------------------------------------------------------- admission
    @property
    def free_slots(self) -> int:
        return self.max_batch - len(self.active)

    def check_prompt(self, prompt_ids: Seq[int]) -> None:
        """UserError for a prompt the engine cannot continue."""
        if not prompt_ids:
            raise UserError("the prompt is empty")
        if len(prompt_ids) >= self.context:
            raise UserError(f"the prompt is {len(prompt_ids)} tokens; the model's context is {self.context} "
                            f"and must leave room for at least one new token")
        bad = [i for i in prompt_ids if not 0 <= i < self.vocab_size]
        if bad:
            raise UserError(f"token id {bad[0]} is out of range for a vocabulary of {self.vocab_size}")

    def add(self, seqs: list[Sequence]) -> list[tuple[Sequence, Delta | Exception]]:
        """Prefill `seqs` into free rows and sample their first tokens (see `_advance`)."""
        if not seqs:
            return []
        if len(seqs) > self.free_slots:
            raise RuntimeError(f"{len(seqs)} sequences for {self.free_slots} free rows")
        for s in seqs:
            self.check_prompt(s.prompt_ids)
        row = len(self.active)
        start = 0
        if len(seqs) == 1:
            cached = self._cached[row]
            start = _common_prefix(cached, seqs[0].prompt_ids)
            start = min(start, len(seqs[0].prompt_ids) - 1)  # at least one token to get logits from
            if start < len(cached) and not self.runner.truncatable:
                start = 0  # a recurrent state holds all of `cached`: it cannot be cut back to a prefix
        # Forget what the prefill overwrites first, so an exception (Ctrl-C) midway
        # cannot leave a row claiming keys it no longer holds.
        for r in range(len(seqs)):
            del self._cached[row + r][start:]
        with torch.inference_mode():
            logits = self.runner.prefill(self.cache, row, [s.prompt_ids[start:] for s in seqs], start)
        for r, s in enumerate(seqs):
            s.length = len(s.prompt_ids)
            self._cached[row + r] = list(s.prompt_ids)
            self.active.append(s)
            gen = s.params.generator()
            seen = None
            if s.params.repetition_penalty != 1.0:
                seen = torch.zeros(self.vocab_size, dtype=torch.bool)
                seen[torch.tensor(s.prompt_ids)] = True
            detok = Detokenizer(self.tok) if self.tok is not None else None
            self._state[s.id] = (gen, seen, detok, StopText(s.params.stop))
        return self._advance(seqs, logits)

    def step(self) -> list[tuple[Sequence, Delta | Exception]]:
        """Feed every active sequence its last token and sample the next one (see `_advance`)."""
        if not self.active:
            return []
        seqs = list(self.active)
        tokens = torch.tensor([s.tokens[-1] for s in seqs])
        lens = [s.length for s in seqs]
        with torch.inference_mode():
            logits = self.runner.decode(self.cache, tokens, lens)
        for r, s in enumerate(seqs):
            self._cached[r].append(s.tokens[-1])
            s.length += 1
        return self._advance(seqs, logits)

    def forget_prefixes(self) -> None:
        """Drop what the cache rows remember, so the next prompt is prefilled in full (benchmarks)."""
        self._cached = [[] for _ in range(self.max_batch)]

    def cancel(self, seq: Sequence) -> None:
        """Stop `seq` now and free its row (no-op if it already finished)."""
        if seq in self.active:
            seq.finish_reason = "cancelled"
            self._remove(seq)

    # --------------------------------------------------------------- internals
    def _advance(self, seqs: list[Sequence], logits: torch.Tensor) -> list[tuple[Sequence, Delta | Exception]]:
        """Sample one token per sequence from logits [n, vocab] and update its text. A
        sequence whose sampling or bookkeeping raises is removed and paired with the
        exception; the others go on."""
        simple = all(s.params.greedy and s.params.repetition_penalty == 1.0 for s in seqs)
        if simple:
            chosen = logits.argmax(-1).tolist()  # one op and one device sync for the whole batch
        else:
            rows = logits.float().cpu()
        out = []
        for r, s in enumerate(seqs):
            try:  # one request's failure (SamplingError, a bug) must never end another's
                t = chosen[r] if simple else sample(rows[r], s.params, *self._state[s.id][:2])
                out.append((s, self._accept(s, t)))
            except Exception as e:
                out.append((s, e))
        for s, d in out:
            if isinstance(d, Exception) or d.finish_reason is not None:
                self._remove(s)
        return out

    def _accept(self, s: Sequence, t: int) -> Delta:
        gen, seen, detok, stops = self._state[s.id]
        s.tokens.append(t)
        if seen is not None:
            seen[t] = True
        p = s.params
        if not p.ignore_eos and (t in self.end_ids or t in p.stop_token_ids):
            return self._finish(s, "", "stop")
        text, hit = stops.feed(detok.add(t)) if detok is not None else ("", False)
        if hit:
            return self._finish(s, text, "stop", flushed=True)
        if len(s.tokens) >= p.max_new_tokens or len(s.prompt_ids) + len(s.tokens) >= self.context:
            return self._finish(s, text, "length")
        s.text += text
        return Delta(text, [t])

    def _finish(self, s: Sequence, text: str, reason: str, flushed: bool = False) -> Delta:
        _, _, detok, stops = self._state[s.id]
        if not flushed and detok is not None:
            # Release what was held back: an incomplete character (as U+FFFD) and text
            # that could have begun a stop string but now never will.
            more, hit = stops.feed(detok.flush())
            text += more
            if hit:
                reason = "stop"
            else:
                text += stops.flush()
        s.text += text
        s.finish_reason = reason
        return Delta(text, [s.tokens[-1]], reason)

    def _remove(self, s: Sequence) -> None:
        """Free `s`'s row; the last active row moves into it so active rows stay 0..n-1
        (a decode step then works on a prefix view of the cache, never a gather)."""
        r = self.active.index(s)
        last = len(self.active) - 1
        self._state.pop(s.id, None)
        if r != last:
            moved = self.active[last]
            n = moved.length
            self._cached[r] = []
            self.runner.move_row(self.cache, last, r, n)
            self.active[r] = moved
            # `last` keeps its (still valid) copy of moved's ids; row r now holds them too.
            self._cached[r] = list(self._cached[last])
        self.active.pop()

    # -------------------------------------------------------------- drivers
    def stream(self, prompt_ids: Seq[int], params: SamplingParams, tag: Any = None) -> Iterator[Delta]:
        """Generate for one prompt, yielding a Delta per token. Closing the iterator early
        (or an exception, e.g. Ctrl-C, in the consumer) cancels the sequence."""
        if self.active:
            raise RuntimeError("stream() needs an idle engine")
        seq = Sequence(list(prompt_ids), params, tag)
        try:
            for _, d in _checked(self.add([seq])):
                yield d
            while seq.finish_reason is None:
                for _, d in _checked(self.step()):
                    yield d
        finally:
            self.cancel(seq)

    def generate(self, prompts: Seq[Seq[int]], params: SamplingParams | Seq[SamplingParams]) -> list[Completion]:
        """Complete every prompt, `max_batch` at a time (a finished one's row is reused at once)."""
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(plist) != len(prompts):
            raise ValueError("one SamplingParams per prompt")
        for p in prompts:
            self.check_prompt(p)
        waiting = [Sequence(list(p), sp) for p, sp in zip(prompts, plist)]
        done = list(waiting)
        try:
            while waiting or self.active:
                if waiting and self.free_slots:
                    batch, waiting = waiting[:self.free_slots], waiting[self.free_slots:]
                    _checked(self.add(batch))
                _checked(self.step())
        finally:
            for s in list(self.active):
                self.cancel(s)
        return [s.completion() for s in done]


def _checked(results: list[tuple[Sequence, Delta | Exception]]) -> list[tuple[Sequence, Delta]]:
    """`results`, raising the exception of a sequence that failed (for callers that own every sequence)."""
    for _, d in results:
        if isinstance(d, Exception):
            raise d
    return results


def _common_prefix(a: Seq[int], b: Seq[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def decode_tokens_per_second(model, prompt_len: int = 16, new_tokens: int = 128, repeats: int = 3,
                             dtype: torch.dtype | None = None, engine: Engine | None = None) -> float:
    """Greedy decode speed at batch 1 with the KV cache, in tokens per second (best of
    `repeats`; prefill excluded): what `smedjan bench` and bench/decode.py report. A model
    whose context is shorter than prompt + new tokens is measured on a copy with a longer
    one (RoPE has no learned positions, so the weights are the same)."""
    from smedjan.model.model import meta_model

    need = prompt_len + new_tokens + 1
    if engine is None and model.cfg.max_seq_len < need:
        longer = meta_model(model.cfg.replace(max_seq_len=need))
        longer = longer.to_empty(device=model.tok_embeddings.weight.device)
        longer.load_state_dict(model.state_dict())
        model = longer.eval()
    engine = engine or Engine(model, None, max_batch=1, context=need, dtype=dtype)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.cfg.vocab_size, (prompt_len,), generator=gen).tolist()
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
    best = 0.0
    for _ in range(repeats):
        engine.forget_prefixes()  # a full prefill every time
        it = engine.stream(prompt, params)
        next(it)  # prefill and the first token
        t0 = time.perf_counter()
        n = sum(1 for _ in it)
        best = max(best, n / (time.perf_counter() - t0))
    return best
