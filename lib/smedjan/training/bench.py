"""Throughput at a fixed shape: forward tokens/s (logits, no grad) and train tokens/s
(forward + backward + optimizer step), measured through the very code `smedjan train`
runs: `Trainer.train_step` with AdamW, gradient-norm check and clipping.

Runners of different implementations are timed in alternating rounds in one process
(`interleave`), so that a machine shared with other work slows all of them alike and
their per-round ratio stays fair.

    r = SmedjanRunner(ModelConfig.from_preset("small", 8192), batch_size=4, seq_len=128)
    res = interleave({"smedjan": r}, rounds=5, steps=10)    # {"smedjan": {"train": [tok/s, ...], ...}}
"""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Callable, Protocol

import torch

from smedjan.model import ModelConfig, Transformer
from smedjan.optim import OptimizerSettings, build_optimizer, param_groups
from smedjan.training.loop import Trainer, TrainerConfig
from smedjan.training.mtp import MTPObjective
from smedjan.training.pretrain import lm_loss
from smedjan.training.schedule import Schedule


class Runner(Protocol):
    tokens_per_step: int

    def train(self, n: int) -> float: ...  # seconds for n training steps

    def forward(self, n: int) -> float: ...  # seconds for n forward passes


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class FixedBatches:
    """A batch source cycling through a few random (x, y) batches, int64 [B, T]."""

    def __init__(self, vocab_size: int, batch_size: int, seq_len: int, n: int = 4, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        rows = [torch.randint(0, vocab_size, (batch_size, seq_len + 1), generator=g) for _ in range(n)]
        self.batches = [(r[:, :-1].contiguous(), r[:, 1:].contiguous()) for r in rows]
        self.i = 0

    def next_batch(self):
        b = self.batches[self.i % len(self.batches)]
        self.i += 1
        return b

    @property
    def step(self) -> int:  # batches drawn, as the Loader's (the curriculum reads it)
        return self.i

    def state_dict(self) -> dict:
        return {"i": self.i}

    def load_state_dict(self, state: dict) -> None:
        self.i = state["i"]


class SmedjanRunner:
    def __init__(self, cfg: ModelConfig, batch_size: int, seq_len: int, device: torch.device | str = "cpu",
                 compile: bool = False, amp_dtype: torch.dtype | None = None, seed: int = 0,
                 options: dict | None = None):
        """`options`: training options of `Regularisers` (ema_decay, dropout, ...),
        `curriculum` (warmup steps) and `lowrank`, `relora_interval` (ReLoRA; its schedule's
        re-warmup is left out: the LR does not change the work), as the flags of the same names."""
        from smedjan.training.curriculum import CurriculumSource
        from smedjan.training.regularisers import Regularisers, prepare

        options = dict(options or {})
        curriculum = options.pop("curriculum", 0)
        rank, interval = options.pop("lowrank", None), options.pop("relora_interval", 0)
        self.device = torch.device(device)
        self.tokens_per_step = batch_size * seq_len
        torch.manual_seed(seed)
        self.model = Transformer(cfg).to(self.device)
        extras = prepare(self.model, Regularisers(seed=seed, **options), cfg)
        if rank:
            from smedjan.training.relora import LowRank, ReLoRA

            extras.relora = ReLoRA(self.model, LowRank(rank=rank, alpha=float(rank), interval=interval, seed=seed))
        opt = build_optimizer("adamw", param_groups(self.model, 0.1, extras.trainable()), OptimizerSettings(),
                              self.device)
        from smedjan.model.mup import scale_rates

        scale_rates(opt, cfg, "adamw")  # µP's per-role rates, as `fit` sets them
        extras.wrap(self.model)
        self.source = FixedBatches(cfg.vocab_size, batch_size, seq_len, seed=seed)
        source = CurriculumSource(self.source, curriculum, seq_len, 1) if curriculum else self.source
        tcfg = TrainerConfig(tool="bench", steps=1 << 62, handle_signals=False, compile=compile, amp_dtype=amp_dtype)
        from smedjan.model.moe import with_router_losses

        # a model with MTP modules trains with their loss (smedjan.training.mtp), as `smedjan train` does
        loss = MTPObjective(steps=1 << 62) if cfg.mtp.depth else lm_loss
        loss_fn = with_router_losses(self.model, loss)  # as `fit` trains (MoE: + the router losses)
        self.trainer = Trainer(self.model, opt, Schedule("wso", 1 << 62, 0), source, loss_fn, tcfg, extras=extras)
        self.amp_dtype = amp_dtype
        self._fwd = torch.compile(self.model) if compile else self.model  # rope cache filled by the Trainer
        self.x = self.source.batches[0][0].to(self.device)

    def train(self, n: int) -> float:
        tokens = self.trainer.tokens
        _sync(self.device)
        t = time.perf_counter()
        for _ in range(n):
            self.trainer.train_step()  # ends with a host sync (loss, grad norm)
        _sync(self.device)
        secs = time.perf_counter() - t
        self.tokens_per_step = (self.trainer.tokens - tokens) // n  # fewer than B x T under a curriculum
        return secs

    def forward(self, n: int) -> float:
        ctx = torch.autocast(self.device.type, self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()
        self.model.eval()
        try:
            with torch.no_grad(), ctx:
                _sync(self.device)
                t = time.perf_counter()
                for _ in range(n):
                    self._fwd(self.x)
                _sync(self.device)
                self.tokens_per_step = self.x.numel()
                return time.perf_counter() - t
        finally:
            self.model.train()


def interleave(runners: dict[str, Runner], rounds: int, steps: int, warmup: int = 2,
               what: tuple[str, ...] = ("forward", "train"),
               on_round: Callable[[int], None] | None = None) -> dict[str, dict[str, list[float]]]:
    """tok/s of every runner for each of `what`, one measurement of `steps` calls per
    round, runners alternating inside each round (their order rotates every round)."""
    names = list(runners)
    for name in names:  # warm-up: allocator, compilation, caches
        for w in what:
            getattr(runners[name], w)(warmup)
    out = {n: {w: [] for w in what} for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for w in what:
            for name in order:
                secs = getattr(runners[name], w)(steps)
                out[name][w].append(steps * runners[name].tokens_per_step / secs)
        if on_round:
            on_round(r + 1)
    return out


def ratios(res: dict[str, dict[str, list[float]]], a: str, b: str, w: str) -> list[float]:
    """Per-round tok/s ratios a / b (measured back to back, so shared-machine noise cancels)."""
    return [x / y for x, y in zip(res[a][w], res[b][w])]


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")
