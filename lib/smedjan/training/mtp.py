"""Multi-token prediction in training (`smedjan train --n-predict N --mtp-weight λ`):
DeepSeek-V3's objective (arXiv:2412.19437 eq. 25) over the model's MTP modules
(`smedjan.model.mtp`):

    loss = CE_main + λ / D · Σ_{k=1..D} CE_k,    D = n_predict - 1

CE_k is depth k's mean cross-entropy on the tokens k+1 ahead (y[:, k:]). λ follows
DeepSeek-V3's schedule: `mtp_weight` (0.3) for the first 10/14.8 of the steps (its first
10T of 14.8T tokens), then `mtp_weight_final` (default a third of `mtp_weight`: its 0.1).
The objective is the Trainer's loss function and the model's loss head at once: the
Trainer tells it the step (`set_step`, so a resumed run weighs each step as the
uninterrupted one did), and the model's forward hands it the trunk output
(`Transformer.forward`'s `from_trunk` heads), so DDP and torch.compile see one ordinary
forward. metrics.jsonl's `loss` is the minimised total; `lm_loss` is the next-token
cross-entropy alone (comparable with a run without MTP), `mtp_loss_k` each depth's.

    obj = MTPObjective(weight=0.3, final_weight=None, steps=1000)
    loss, metrics = obj(model, (x, y))          # x, y int64 [B, T]; metrics["lm_loss"], ["mtp_loss_1"], ...
"""

from __future__ import annotations

import math

import torch

from smedjan.errors import UserError
from smedjan.model.mtp import PREFIX, without_mtp

WEIGHT = 0.3  # DeepSeek-V3's λ for the first 10T tokens
FINAL_RATIO = 1.0 / 3.0  # ... and 0.1 for the remaining 4.8T
SWITCH = 10.0 / 14.8  # the fraction of the run at which λ drops
MAX_WEIGHT = 100.0


class MTPObjective:
    from_trunk = True  # Transformer.forward calls trunk_loss(model, trunk output, idx, targets)

    def __init__(self, weight: float = WEIGHT, final_weight: float | None = None, steps: int = 1,
                 fused: bool = False):
        self.first = weight
        self.final = weight * FINAL_RATIO if final_weight is None else final_weight
        self.switch = round(SWITCH * steps)
        self.weight = self.first
        if fused:
            from smedjan.training.heads import FusedCE

            self.ce = FusedCE()
        else:
            self.ce = lambda model, h, y: model.cross_entropy(model.logits(h), y)

    def weight_at(self, step: int) -> float:
        """λ at `step` (0-based): `mtp_weight` before the switch, `mtp_weight_final` from it."""
        return self.first if step < self.switch else self.final

    def set_step(self, step: int) -> None:
        self.weight = self.weight_at(step)

    def trunk_loss(self, model, x: torch.Tensor, idx: torch.Tensor, y: torch.Tensor):
        """(total, CE_main, [CE_1..CE_D]) from the trunk output x [B, T, dim], the inputs idx
        and the targets y [B, T] (y[:, i] = t_{i+1}); the last two detached, for the log."""
        main = self.ce(model, model.norm(x), y)
        depths = torch.stack([self.ce(model, h, y[:, k:].contiguous()) for k, h in model.mtp.hidden(model, x, idx)])
        return main + self.weight * depths.mean(), main.detach(), depths.detach()

    def __call__(self, model, batch) -> tuple[torch.Tensor, dict]:
        x, y = batch
        total, main, depths = model(x, y, head=self)
        return total, {"tokens": x.numel(), "lm_loss": main,
                       **{f"mtp_loss_{k}": depths[k - 1] for k in range(1, depths.numel() + 1)}}


# ------------------------------------------------------------------------ flags
def check_flags(a) -> None:
    """One-line errors for --mtp-weight / --mtp-weight-final out of range (before anything is read)."""
    for name in ("mtp_weight", "mtp_weight_final"):
        v = getattr(a, name)
        if v is not None and not (math.isfinite(v) and 0 <= v <= MAX_WEIGHT):
            raise UserError(f"`{name}` {v} must be in [0, {MAX_WEIGHT:g}]")


def config_with_n_predict(a, cfg, base_n: int | None, resuming: bool):
    """The run's model config with `n_predict` applied: the flag, else the checkpoint's
    (`base_n`, None for a new model), else 1. --resume keeps the state's; --init may add or
    drop modules (the trunk's weights are loaded, new modules drawn fresh)."""
    n = a.n_predict if a.n_predict is not None else (base_n or 1)
    if resuming and n != base_n:
        raise UserError(f"`n_predict` {n}: the state was saved with `n_predict` {base_n}; resume with the same")
    if n != cfg.mtp.n_predict:
        cfg = cfg.replace(n_predict=n)  # checks the range (one line)
    if n > a.seq_len:
        raise UserError(f"`n_predict` {n} needs `seq_len` >= {n} (depth {n - 1} is scored on the tokens {n} ahead)")
    given = [f"`{f}`" for f, on in (("mtp_weight", a.mtp_weight != WEIGHT),
                                    ("mtp_weight_final", a.mtp_weight_final is not None)) if on]
    if n == 1 and given:
        raise UserError(f"{', '.join(given)} need{'s' if len(given) == 1 else ''} `n_predict` >= 2 (without MTP "
                        "modules there is nothing to weigh)")
    return cfg


def trunk_config(cfg):
    """`cfg` without MTP modules (None stays None): the part of a checkpoint's config the
    architecture flags are matched against."""
    return None if cfg is None else without_mtp(cfg, {})[0]


def load_init_weights(model, ck) -> None:
    """--init: `ck`'s weights into `model`; where their MTP modules differ (`n_predict`), the
    trunk, embedding and head only (the model's own MTP modules stay as drawn)."""
    from smedjan.training.state import load_model_weights

    if ck.config.mtp.n_predict == model.cfg.mtp.n_predict:
        load_model_weights(model, ck)
        return
    from smedjan.model.load import check_state_shapes
    from smedjan.model.model import meta_model

    _, state = without_mtp(ck.config, ck.model_state())
    check_state_shapes(ck.path, state, meta_model(trunk_config(model.cfg)), "this model")
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith(PREFIX) for k in missing), (missing, unexpected)
