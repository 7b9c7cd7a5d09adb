"""Low-rank training and ReLoRA (`--lowrank R`, `--relora-interval N`), applied to a model
from outside its parts, as the regularisers are.

Every trainable hidden matrix W (role `matrix`: attention and feed-forward projections,
MoE experts as a batch of matrices) is frozen and read as

    W + B A alpha / R,    A [..., R, in], B [..., out, R]    (Hu et al. 2021, LoRA)

with A drawn Kaiming-uniform (torch's nn.Linear init: U(-1/sqrt(in), 1/sqrt(in))) and B
zero, so a fresh adapter changes nothing. The embedding (the tied head), an untied head,
norm gains and scalars keep training full-rank, as in the paper.

ReLoRA (Lialin et al. 2023, "ReLoRA: High-Rank Training Through Low-Rank Updates"): after
every N updates, `merge`: W += B A alpha / R, A drawn afresh, B zeroed (the function is
unchanged: bit for bit on CPU), then the optimizer state of the adapters is pruned by
magnitude (`--relora-prune q`: in each exp_avg / exp_avg_sq tensor the entries at or below
the q-quantile of |state| are zeroed; ReLoRA's `optimizer_magnitude_pruning`; q = 1 is a
full reset; Adam's step count stays, as in the paper's code), and the LR re-warms linearly
from near 0 over `--relora-warmup` updates on top of the main schedule (the jagged
schedule: `smedjan.training.schedule.Schedule.restart_every`). Without `--relora-interval`
it is plain LoRA-style low-rank training, merged only into what final.bin holds.

How it is wired: the adapted modules read their parameter through `__getattr__` (a
subclass made per class), so the parts' own code (`self.wq.weight`, fused projections,
expert slices) sees W + B A alpha / R while the state dict keeps the model's names and the
frozen W. A and B live beside the model: the optimizer holds them in the `matrix` group as
`relora.<param name>.A|B`, state_N.bin as `extra.relora.<param name>.A|B` (safetensors);
final.bin and best.bin hold merged plain weights (`merged()`), so export, generate and sft
need nothing special; a state_N.bin read as a model (generate, export, `--init`) gives the
merged weights too (`merged_state`, via Checkpoint.model_state); only `--resume` reads W and
the adapters apart. The fresh A of merge k is drawn from a generator seeded by
(--seed, k), and merges happen after updates N, 2N, ... (skipped non-finite steps count):
a pure function of the step, so a resumed run, and every DDP rank, merges alike. Under DDP
the adapters' gradients are averaged over the ranks by a hook (DDP sees only the model).
The paper's full-rank warm start: train full-rank first, then `smedjan train --init
final.bin --lowrank R ...`.

    spec = lowrank_of(o)                      # one-line errors for bad flags
    relora = attach(model, spec)              # freezes W, adds the adapters
    groups = param_groups(model, 0.1, relora.trainable())
    ...; optimizer.step(); relora.after_step(step + 1, optimizer)   # merges every N steps
    with relora.merged():
        save(model.state_dict())              # plain names, merged weights
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from smedjan.errors import UserError
from smedjan.model.parts import MATRIX

PREFIX = "extra.relora."  # tensor names in state_N.bin
OPT_PREFIX = "relora."  # names in the optimizer's groups (and its state in state_N.bin)
OPTIMIZERS = ("adamw",)  # the pruning edits Adam's moments; adamw-cpu keeps master copies it would overwrite
WARMUP = 50  # ReLoRA's restart warmup
PRUNE = 0.9  # ReLoRA's magnitude pruning ratio
_STREAM = 0x72656C6F7261  # keeps the adapters' seeds apart from other users of --seed


@dataclass(frozen=True)
class LowRank:
    rank: int
    alpha: float
    interval: int = 0  # merge every this many updates (0: only into final.bin)
    warmup: int = 0  # LR re-warmup after each merge
    prune: float = PRUNE  # quantile of |state| pruned after each merge (1: full reset)
    seed: int = 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def schedule(self) -> dict:
        """The Schedule's restart keywords (the jagged schedule)."""
        return {"restart_every": self.interval, "restart_warmup": self.warmup}

    def describe(self) -> str:
        s = f"low rank {self.rank} (alpha {self.alpha:g})"
        if self.interval:
            s += f", ReLoRA merges every {self.interval} steps (re-warmup {self.warmup}, prune {self.prune:g})"
        return s


def lowrank_of(o) -> LowRank | None:
    """What a RunOptions asks for (None: off); one-line errors for bad or conflicting flags."""
    r, n = o.lowrank, o.relora_interval
    if r is None:
        for name in ("relora_interval", "lowrank_alpha"):
            if getattr(o, name) is not None:
                raise UserError(f"`{name}` needs `lowrank` (the rank of the adapters)")
    if n is None:
        for name in ("relora_warmup", "relora_prune"):
            if getattr(o, name) is not None:
                raise UserError(f"`{name}` needs `relora_interval` (it acts at each merge)")
    if r is None:
        return None
    if r < 1:
        raise UserError(f"`lowrank` {r} must be >= 1 (the rank of the adapters)")
    alpha = float(r) if o.lowrank_alpha is None else o.lowrank_alpha
    if not (math.isfinite(alpha) and alpha > 0):
        raise UserError(f"`lowrank_alpha` {alpha} must be a positive number")
    warmup = WARMUP if o.relora_warmup is None else o.relora_warmup
    prune = PRUNE if o.relora_prune is None else o.relora_prune
    if n is not None:
        if n < 1:
            raise UserError(f"`relora_interval` {n} must be >= 1")
        if warmup < 0:
            raise UserError(f"`relora_warmup` {warmup} must be >= 0")
        if n < warmup:
            raise UserError(f"`relora_interval` {n} is shorter than `relora_warmup` {warmup}: the LR would never "
                            "finish re-warming between merges")
        if not (math.isfinite(prune) and 0 <= prune <= 1):
            raise UserError(f"`relora_prune` {prune} must be in [0, 1]")
    from smedjan.optim.registry import canonical

    name = canonical(o.optimizer)
    if name not in OPTIMIZERS:
        raise UserError(f"`lowrank` needs `optimizer` {' or '.join(OPTIMIZERS)} (its Adam states are pruned at "
                        f"merges), not {name}")
    if o.fsdp:
        raise UserError("`lowrank` does not support `fsdp` (the adapters live beside the sharded model): use DDP")
    if o.ema_decay:
        raise UserError("`ema_decay` does not combine with `lowrank` (the average would miss the adapters)")
    return LowRank(rank=r, alpha=alpha, interval=n or 0, warmup=warmup if n else 0, prune=prune, seed=o.seed)


# ------------------------------------------------------------------ the adapters
class Adapter:
    """A [..., R, in] and B [..., out, R] of one frozen W [..., out, in]."""

    def __init__(self, name: str, weight: nn.Parameter, rank: int, scale: float):
        self.name, self.weight, self.scale = name, weight, scale
        *lead, out, inp = weight.shape
        self.A = nn.Parameter(torch.zeros(*lead, rank, inp, dtype=weight.dtype, device=weight.device))
        self.B = nn.Parameter(torch.zeros(*lead, out, rank, dtype=weight.dtype, device=weight.device))
        self.on = True

    def delta(self) -> torch.Tensor:
        return torch.matmul(self.B, self.A) * self.scale

    def read(self, w: torch.Tensor) -> torch.Tensor:
        return w + self.delta() if self.on else w


class _Adapted:
    """Mixin of a module whose adapted parameters read as W + B A alpha / R."""

    def __getattr__(self, name: str):
        adapters = self.__dict__.get("_relora")
        if adapters is not None and name in adapters:
            return adapters[name].read(self._parameters[name])
        return super().__getattr__(name)


_CLASSES: dict[type, type] = {}


def _adapted_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(cls.__name__, (_Adapted, cls), {"__module__": cls.__module__})
    return _CLASSES[cls]


def quantile(t: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile's linear interpolation (any size: torch.quantile stops at 2^24)."""
    v = t.flatten().sort().values
    pos = q * (v.numel() - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, v.numel() - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


@torch.no_grad()
def magnitude_prune_(t: torch.Tensor, q: float) -> None:
    """Zero the entries of `t` whose magnitude is at or below the q-quantile of |t| (q = 1: all)."""
    if q >= 1:
        t.zero_()
    elif q > 0 and t.numel():
        a = t.abs()
        t.mul_(a > quantile(a, q))


class ReLoRA:
    def __init__(self, model: nn.Module, spec: LowRank):
        self.spec = spec
        roles = model.param_roles()
        self.adapters: list[Adapter] = []
        for name, p in model.named_parameters():  # a shared or tied tensor once
            if roles[name] != MATRIX or not p.requires_grad or p.dim() < 2:
                continue
            if spec.rank > min(p.shape[-2:]):
                raise UserError(f"`lowrank` {spec.rank} is larger than the matrix {name} "
                                f"{tuple(p.shape[-2:])}: at most {min(p.shape[-2:])}")
            self.adapters.append(Adapter(name, p, spec.rank, spec.scale))
        if not self.adapters:
            raise UserError("`lowrank`: the model has no trainable hidden matrix to adapt")
        by_id = {id(a.weight): a for a in self.adapters}
        for module in model.modules():  # every owner of an adapted tensor (shared blocks: one module)
            mine = {k: by_id[id(p)] for k, p in module._parameters.items() if p is not None and id(p) in by_id}
            if mine:
                module.__class__ = _adapted_class(type(module))
                module.__dict__.setdefault("_relora", {}).update(mine)
        for a in self.adapters:
            a.weight.requires_grad_(False)
        self.merges = 0
        self._draw(0)
        self._hooks = _average_over_ranks([p for a in self.adapters for p in (a.A, a.B)])

    # ------------------------------------------------------------ training side
    def trainable(self) -> list[tuple[str, nn.Parameter, str]]:
        """(name, parameter, role) of the adapters for `param_groups`."""
        return [(f"{OPT_PREFIX}{a.name}.{k}", p, MATRIX) for a in self.adapters for k, p in (("A", a.A), ("B", a.B))]

    @torch.no_grad()
    def _draw(self, k: int) -> None:
        """A of merge `k` (0: the start) drawn Kaiming-uniform from (seed, k); B zero."""
        key = int(np.random.SeedSequence([_STREAM, self.spec.seed, k]).generate_state(1)[0])
        gen = torch.Generator().manual_seed(key)
        for a in self.adapters:
            bound = 1.0 / math.sqrt(a.A.shape[-1])
            a.A.copy_((torch.rand(a.A.shape, generator=gen, dtype=torch.float32) * 2 - 1).mul_(bound))
            a.B.zero_()

    @torch.no_grad()
    def merge(self) -> None:
        """W += B A alpha / R (what the forward added), then a fresh A and a zero B."""
        for a in self.adapters:
            a.weight.add_(a.delta())
        self.merges += 1
        self._draw(self.merges)

    @torch.no_grad()
    def prune(self, optimizer: torch.optim.Optimizer) -> None:
        """Magnitude-prune the adapters' Adam moments (`spec.prune`)."""
        for a in self.adapters:
            for p in (a.A, a.B):
                st = optimizer.state.get(p, {})
                for key in ("exp_avg", "exp_avg_sq"):
                    if isinstance(st.get(key), torch.Tensor):
                        magnitude_prune_(st[key], self.spec.prune)

    def after_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        """After update number `step` (1-based): merge and prune every `interval` updates."""
        if self.spec.interval and step % self.spec.interval == 0:
            self.merge()
            self.prune(optimizer)

    @contextlib.contextmanager
    def merged(self):
        """The model's weights hold W + B A alpha / R inside (adapters off); W again after, bit for bit."""
        with torch.no_grad():
            raw = [a.weight.detach().clone() for a in self.adapters]
            for a in self.adapters:
                a.weight.add_(a.delta())
                a.on = False
        try:
            yield
        finally:
            with torch.no_grad():
                for a, w in zip(self.adapters, raw):
                    a.weight.copy_(w)
                    a.on = True

    # ------------------------------------------------------------------ state
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {f"{PREFIX}{a.name}.{k}": p.detach() for a in self.adapters for k, p in (("A", a.A), ("B", a.B))}
        return tensors, {"relora": {"rank": self.spec.rank, "alpha": self.spec.alpha, "merges": self.merges}}

    def load(self, ck) -> None:
        saved, meta = ck.prefixed(PREFIX), ck.json("relora")
        if not isinstance(meta, dict) or not isinstance(meta.get("merges"), int) or meta["merges"] < 0:
            raise UserError(f"{ck.path}: holds no low-rank adapters (a run without `lowrank`, or corrupt)")
        if meta.get("rank") != self.spec.rank:
            raise UserError(f"{ck.path}: adapters of rank {meta.get('rank')}, this run's `lowrank` is {self.spec.rank}")
        want = {f"{a.name}.{k}": p for a in self.adapters for k, p in (("A", a.A), ("B", a.B))}
        if sorted(saved) != sorted(want):
            missing = sorted(set(want) ^ set(saved))
            raise UserError(f"{ck.path}: low-rank adapters do not fit this model ({missing[0]!r})")
        with torch.no_grad():
            for k, p in want.items():
                if saved[k].shape != p.shape:
                    raise UserError(f"{ck.path}: adapter {k!r} has shape {tuple(saved[k].shape)}, expected "
                                    f"{tuple(p.shape)} (corrupt)")
                p.copy_(saved[k])
        self.merges = meta["merges"]

    def describe(self) -> str:
        return f"{self.spec.describe()} on {len(self.adapters)} matrices"


def _average_over_ranks(params: list[nn.Parameter]) -> list:
    """Under DDP (which wraps the model only): average these gradients over the ranks as
    they arrive (each micro-batch's: the sum of averages is the average of the sums)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return []
    world = dist.get_world_size()

    def hook(g: torch.Tensor) -> torch.Tensor:
        g = g.contiguous().clone()
        dist.all_reduce(g)
        return g.div_(world)

    return [p.register_hook(hook) for p in params]


@torch.no_grad()
def merged_state(ck, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` (the W of a ReLoRA state_N.bin `ck`) with the saved adapters merged: W + B A
    alpha / R, the same arithmetic as `ReLoRA.merged` (so bit for bit what final.bin holds)."""
    meta, saved = ck.json("relora"), ck.prefixed(PREFIX)
    try:
        scale = float(meta["alpha"]) / int(meta["rank"])
        out = dict(state)
        for key in saved:
            if key.endswith(".A"):
                name = key[:-2]
                out[name] = state[name] + torch.matmul(saved[name + ".B"], saved[key]) * scale
    except (KeyError, TypeError, ValueError, ZeroDivisionError, RuntimeError) as e:
        raise UserError(f"{ck.path}: low-rank adapters missing or corrupt ({e.__class__.__name__}: {e})") from None
    return out


def attach(model: nn.Module, spec: LowRank | None) -> ReLoRA | None:
    """Freeze the trainable hidden matrices of `model` and give each an adapter (None: off).
    Call before the optimizer is built (and before DDP wraps the model)."""
    return ReLoRA(model, spec) if spec is not None else None
