"""Sampling settings and the next-token choice: repetition penalty, temperature,
top-k, top-p, and a per-sequence seeded `torch.Generator` so that a seed gives the
same tokens every time (on any device: sampling always runs on CPU logits).

Order, as in Hugging Face `generate`: repetition penalty -> temperature -> top-k ->
top-p -> sample. The repetition penalty is the CTRL paper's (Keskar et al. 2019), as
HF defines it: for every token already in the sequence (prompt and generated), a
positive logit is divided by the penalty and a negative one multiplied by it.

Every accepted setting is numerically safe, whatever a client sends:
- a temperature below `MIN_TEMPERATURE` (1e-5, vLLM's threshold) is greedy: argmax
  after the penalty. Dividing by a tinier one only turns float rounding into the
  choice (2.57e-38 overflowed float32 to inf and then NaN);
- the penalty is applied and the maximum subtracted in float64, then the temperature
  divides scores that are all <= 0, so nothing overflows and the best token keeps
  exp(0) = 1: the softmax (float32, as HF's warpers run) is never NaN;
- the repetition penalty is bounded to [0.01, 100] (`MIN/MAX_REPETITION_PENALTY`):
  beyond 100 a seen token is already as good as excluded, and the bounds keep every
  penalised logit finite; temperature must be finite, top-p in (0, 1];
- logits that are NaN or +inf (a broken model) raise `SamplingError` for that
  sequence only.

    params = SamplingParams(temperature=0.8, top_p=0.95, seed=1)
    gen = params.generator()
    token = sample(logits, params, gen, seen)       # logits: [vocab]; seen: bool [vocab]
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field, replace

import torch

from smedjan.errors import UserError

MAX_STOP_STRINGS = 16
MIN_TEMPERATURE = 1e-5  # below this, sampling is greedy
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0


class SettingError(UserError):
    """A sampling setting out of range; `param` is its field name (the HTTP API's name
    too, but max_new_tokens), so a tool can name its own flag instead."""

    def __init__(self, param: str, problem: str):
        super().__init__(f"{param} {problem}")
        self.param, self.problem = param, problem


class SamplingError(RuntimeError):
    """The next token of one sequence cannot be drawn (its logits are not finite)."""


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


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
        p = self
        checks = [
            ("max_new_tokens", isinstance(p.max_new_tokens, int) and p.max_new_tokens >= 1,
             f"must be at least 1, got {p.max_new_tokens}"),
            ("temperature", _number(p.temperature) and math.isfinite(p.temperature) and p.temperature >= 0,
             f"must be a finite number >= 0 (below {MIN_TEMPERATURE:g} is greedy), got {p.temperature}"),
            ("top_k", isinstance(p.top_k, int) and p.top_k >= 0, f"must be an integer >= 0, got {p.top_k}"),
            ("top_p", _number(p.top_p) and 0 < p.top_p <= 1, f"must be in (0, 1], got {p.top_p}"),
            ("repetition_penalty", _number(p.repetition_penalty)
             and MIN_REPETITION_PENALTY <= p.repetition_penalty <= MAX_REPETITION_PENALTY,
             f"must be between {MIN_REPETITION_PENALTY:g} and {MAX_REPETITION_PENALTY:g} (1 is off), "
             f"got {p.repetition_penalty}"),
            ("stop", len(p.stop) <= MAX_STOP_STRINGS, f"takes at most {MAX_STOP_STRINGS} strings"),
            ("stop", all(isinstance(x, str) and x for x in p.stop), "strings must be non-empty"),
            ("seed", p.seed is None or isinstance(p.seed, int), f"must be an integer, got {p.seed!r}"),
        ]
        for param, ok, problem in checks:
            if not ok:
                raise SettingError(param, problem)

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

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


def _scores(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None) -> torch.Tensor:
    """float64 logits after the repetition penalty, minus their maximum (so <= 0, the best 0)."""
    x = logits.double()
    if torch.isnan(x).any() or torch.isposinf(x).any() or torch.isneginf(x).all():
        raise SamplingError("the model's logits are not finite (NaN, +inf, or every token -inf)")
    if params.repetition_penalty != 1.0 and seen is not None:
        x = apply_repetition_penalty(x, seen, params.repetition_penalty)
    return x - x.max()


def probabilities(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 distribution [vocab] a non-greedy `params` samples from."""
    x = _scores(logits, params, seen) / params.temperature  # <= 0 (or -inf): exp cannot overflow
    x = filter_top_k_top_p(x.float(), params.top_k, params.top_p)
    return torch.softmax(x, -1)


def sample(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator,
           seen: torch.Tensor | None = None) -> int:
    """Next token id from CPU logits [vocab] (any float dtype). SamplingError if they are
    not finite."""
    if params.greedy:
        return int(_scores(logits, params, seen).argmax())
    return int(torch.multinomial(probabilities(logits, params, seen), 1, generator=gen))
