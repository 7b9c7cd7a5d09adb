"""Self-speculative greedy decoding with the model's multi-token-prediction modules
(`smedjan generate --speculative`, `smedjan serve --speculative`).

A model trained with `--n-predict N` carries D = N - 1 MTP modules (`smedjan.model.mtp`)
that predict 2..N tokens ahead from the trunk's hidden states. Each round:
1. verify: the pending token and the D drafted tokens go through the model in one forward
   at positions L..L+D (the model's path with per-layer state, as `ModelRunner`); the
   greedy token after each position is the model's own choice there;
2. accept: drafts are kept while they equal those choices; the first disagreement is
   replaced by the model's token, so a round emits 1..D+1 tokens, each exactly the one
   greedy decoding emits at that position (end tokens, stop strings and lengths are
   checked token by token, as the plain engine does);
3. roll back: the KV cache columns written for rejected drafts are simply overwritten by
   the next round (attention reads only columns below the row's length), which is why
   recurrent mixers, whose state cannot be cut back, are refused;
4. draft: module k runs over the positions whose inputs changed (its own KV cache, the
   previous depth's hidden states kept per position) and drafts t_{L'+k} at the last one.
The drafts only decide how many tokens a round can emit, never which: the output is
greedy decoding's, token for token (up to float rounding between a one-token and a
several-token forward, which tests/test_mtp.py checks is below any argmax margin on the
tiny models, in float32 and float64).

Requests that sample (temperature > 0) or use a repetition penalty run plain one-token
steps through the same engine. One sequence at a time (a cache row of its own).

    engine = SpeculativeEngine(model, tok)                 # model from load_model(), n_predict >= 2
    for d in engine.stream(tok.encode("Once upon"), SamplingParams(temperature=0)):
        print(d.text, end="")
    engine.accepted / max(1, engine.proposed)              # the drafts' acceptance rate
"""

from __future__ import annotations

import torch

from smedjan.errors import UserError
from smedjan.infer.engine import Delta, Engine, Sequence
from smedjan.infer.runner import ModelRunner


def speculative_refusal(model) -> str | None:
    """Why `model` cannot decode speculatively (None when it can)."""
    if model.mtp is None:
        return "it has no multi-token-prediction modules to draft with (train it with --n-predict 2 or more)"
    kinds = [b.mixer.KIND for b in list(model.layers) + [m.block for m in model.mtp] if not b.mixer.TRUNCATABLE]
    if kinds:
        return (f"its {kinds[0]} layers keep a recurrent state, which cannot be rolled back past rejected drafts "
                "(only attention's KV cache can)")
    return None


class _TrunkRunner(ModelRunner):
    """ModelRunner whose prefill also keeps the trunk output (the MTP modules' input)."""

    last_trunk: torch.Tensor | None = None

    def prefill(self, cache, row: int, prompts: list[list[int]], start: int = 0) -> torch.Tensor:
        assert len(prompts) == 1, "speculative decoding runs one sequence at a time"
        ids = torch.tensor(prompts, dtype=torch.long, device=self.device)
        x = self.model.trunk(ids, state=cache, start=start, rows=slice(row, row + 1))
        self.last_trunk = x[0]
        return self.model.logits(self.model.norm(x))[0, -1][None]  # as model(ids, state=...)[0, -1]


class SpeculativeEngine(Engine):
    def __init__(self, model, tokenizer=None, *, device=None, dtype=None, context: int | None = None,
                 where: str = "the model"):
        why = speculative_refusal(model)
        if why is not None:
            raise UserError(f"--speculative: {where} cannot decode speculatively: {why}")
        super().__init__(model, tokenizer, max_batch=1, device=device, dtype=dtype, context=context, path="model")
        self.model = self.runner.model  # on the engine's device and dtype
        self.runner = _TrunkRunner(self.model, max_len=self.context)
        ref = self.model.tok_embeddings.weight
        self.depth = self.model.cfg.mtp.depth
        self.mtp_cache = self.model.mtp.new_state(1, self.context, ref.device, ref.dtype)
        # hidden[k][j]: depth k's output at position j (k = 0: the trunk), the input of depth k + 1
        self.hidden = torch.zeros(self.depth, self.context, self.model.cfg.dim, device=ref.device, dtype=ref.dtype)
        self.drafts: list[int] = []
        self.proposed = self.accepted = 0  # drafts verified / accepted, over the engine's life

    @staticmethod
    def _greedy(s: Sequence) -> bool:
        return s.params.greedy and s.params.repetition_penalty == 1.0

    def add(self, seqs: list[Sequence]) -> list[tuple[Sequence, Delta | Exception]]:
        self.forget_prefixes()  # a full prefill: the MTP modules read the trunk at every prompt position
        self.drafts = []
        out = super().add(seqs)
        if self.active and self._greedy(self.active[0]):
            s = self.active[0]
            with torch.inference_mode():
                self.hidden[0, :s.length] = self.runner.last_trunk
                self._draft(s, 0)
        return out

    def step(self) -> list[tuple[Sequence, Delta | Exception]]:
        if not self.active or not self._greedy(self.active[0]):
            return super().step()
        s = self.active[0]
        L = s.length  # cache columns 0..L-1 hold the accepted tokens before the pending one
        drafts = self.drafts[:max(0, min(self.context - L - 1, s.params.max_new_tokens - len(s.tokens) - 1))]
        with torch.inference_mode():
            ids = torch.tensor([[s.tokens[-1], *drafts]], device=self.model.tok_embeddings.weight.device)
            x = self.model.trunk(ids, state=self.cache, start=L, rows=slice(0, 1))
            chosen = self.model.logits(self.model.norm(x))[0].argmax(-1).tolist()
        n = 0  # drafts accepted: each equals the model's own choice after the tokens before it
        while n < len(drafts) and drafts[n] == chosen[n]:
            n += 1
        self.proposed += len(drafts)
        self.accepted += n
        out: list[tuple[Sequence, Delta | Exception]] = []
        for t in chosen[:n + 1]:  # the accepted drafts, then the model's token after them
            s.length += 1
            try:
                d = self._accept(s, t)
            except Exception as e:  # as Engine._advance: the failure goes back with the sequence
                d = e
            out.append((s, d))
            if isinstance(d, Exception) or d.finish_reason is not None:
                self._remove(s)
                return out
        with torch.inference_mode():
            self.hidden[0, L:s.length] = x[0, :n + 1]
            self._draft(s, L)
        return out

    def _draft(self, s: Sequence, before: int) -> None:
        """Draft the tokens after the pending one with the MTP modules. `before`: the pending
        token's position in the previous round (0 after a prefill). Depth k at position j reads
        t_{j+k}; the positions whose inputs were drafts then (from before - k + 1) are recomputed
        with the accepted tokens now, up to the last position, where depth k drafts t_{L+k}."""
        m = self.model
        L = s.length
        toks = s.prompt_ids + s.tokens  # t_0..t_L, the pending token t_L last
        assert len(toks) == L + 1, (len(toks), L)
        dev = self.hidden.device
        drafts: list[int] = []
        for k, module in enumerate(m.mtp, 1):
            lo = max(0, before - k + 1)
            seq = toks + drafts
            emb = m.tok_embeddings(torch.tensor([seq[lo + k:L + k]], device=dev))  # t_{j+k}, j = lo..L-1
            ctx = m.context(1, L - lo, dev, start=lo, state=self.mtp_cache, rows=slice(0, 1))
            h = module(self.hidden[k - 1, lo:L][None], emb, ctx, k - 1)  # [1, L - lo, dim]
            if k < self.depth:
                self.hidden[k, lo:L] = h[0]
            drafts.append(int(m.logits(module.norm(h[:, -1])).argmax(-1)))
        self.drafts = drafts
