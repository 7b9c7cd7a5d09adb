"""Sampling settings and the next-token choice: repetition penalty, temperature,
top-k, top-p, and a per-sequence seeded `torch.Generator` so that a seed gives the
same tokens every time (on any device: sampling always runs on CPU float32 logits).

Order, as in Hugging Face `generate`: repetition penalty -> temperature -> top-k ->
top-p -> sample. Temperature 0 means greedy (argmax after the repetition penalty).
The repetition penalty is the CTRL paper's (Keskar et al. 2019), as HF defines it:
for every token already in the sequence (prompt and generated), a positive logit is
divided by the penalty and a negative one multiplied by it.

    params = SamplingParams(temperature=0.8, top_p=0.95, seed=1)
    gen = params.generator()
    token = sample(logits, params, gen, seen)       # logits: float32 [vocab]; seen: bool [vocab]
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field, replace

import torch

from smedjan.errors import UserError

MAX_STOP_STRINGS = 16


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 1.0  # 0 -> greedy
    top_k: int = 0  # 0 -> off
    top_p: float = 1.0  # 1 -> off
    repetition_penalty: float = 1.0  # 1 -> off
    seed: int | None = None  # None -> a fresh random seed per sequence
    stop: tuple[str, ...] = ()  # stop strings: the text ends just before the first one
    ignore_eos: bool = False  # keep going through end-of-turn tokens (benchmarks)
    stop_token_ids: tuple[int, ...] = field(default=())  # extra stop tokens besides the tokenizer's

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        self.validate()

    def validate(self) -> None:
        checks = [
            (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
             f"max new tokens must be at least 1, got {self.max_new_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (isinstance(self.top_k, int) and self.top_k >= 0, f"top-k must be >= 0, got {self.top_k}"),
            (0 < self.top_p <= 1, f"top-p must be in (0, 1], got {self.top_p}"),
            (self.repetition_penalty > 0, f"repetition penalty must be > 0, got {self.repetition_penalty}"),
            (len(self.stop) <= MAX_STOP_STRINGS, f"at most {MAX_STOP_STRINGS} stop strings"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
            (self.seed is None or isinstance(self.seed, int), f"seed must be an integer, got {self.seed!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UserError(msg)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def with_(self, **changes) -> "SamplingParams":
        return replace(self, **changes)

    def generator(self) -> torch.Generator:
        seed = self.seed if self.seed is not None else secrets.randbits(63)
        return torch.Generator(device="cpu").manual_seed(seed % (1 << 64))


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL/HF: logits of seen tokens divided by `penalty` where positive, multiplied where
    negative. logits: [..., vocab]; seen: bool, same shape (or broadcastable)."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits [vocab] with everything outside the top-k and outside the smallest set of
    most likely tokens whose probability reaches top-p set to -inf. At least one token
    always survives. Ties keep the lower id first, as `argmax` does, so top-k 1 and a
    tiny top-p both reduce to greedy."""
    vocab = logits.shape[-1]
    if (top_k == 0 or top_k >= vocab) and top_p >= 1.0:
        return logits
    values, order = torch.sort(logits, descending=True, stable=True)
    drop = torch.zeros(vocab, dtype=torch.bool)
    if 0 < top_k < vocab:
        drop[top_k:] = True
    if top_p < 1.0:
        probs = torch.softmax(values.masked_fill(drop, -torch.inf), -1)
        before = torch.cumsum(probs, -1) - probs  # probability mass of the better tokens
        drop |= before >= top_p
    drop[0] = False
    out = torch.full_like(logits, -torch.inf)
    keep = order[~drop]
    out[keep] = logits[keep]
    return out


def sample(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator,
           seen: torch.Tensor | None = None) -> int:
    """Next token id from CPU logits [vocab] (float32 or float64)."""
    if params.repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return int(logits.argmax())
    logits = filter_top_k_top_p(logits / params.temperature, params.top_k, params.top_p)
    probs = torch.softmax(logits.float(), -1)
    return int(torch.multinomial(probs, 1, generator=gen))
