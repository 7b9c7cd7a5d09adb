"""`hybrid` (alias `muon-adamw`): nanochat's MuonAdamW recipe over smedjan's roles.

- `matrix`: Muon (see `muon`) at `matrix_lr`, NorMuon and cautious weight decay on, the
  momentum warming up from MOMENTUM_START to MOMENTUM over MOMENTUM_WARMUP updates and
  down to MOMENTUM_END over the LR schedule's decay.
- `embedding`, `head`, `norm`, `scalar`: AdamW, eps 1e-10, each role at its own rate.
  Embedding and head rates are nanochat's units: rates of a width-768 model, scaled by
  sqrt(768 / width) (an explicit `embedding_lr` / `unembedding_lr` is scaled too); a tied
  embedding is also the output head and takes TIED_LR.

Every default below is stated in `smedjan train --help`; each flag overrides one.

    opt = build(param_groups(model, 0.1), OptimizerSettings(width=128, lr_schedule=sched), torch.device("cpu"))
"""

from __future__ import annotations

import torch

from smedjan.optim.muon import MuonAdamW, adam_group, momentum_schedules, muon_group, split_matrices

MATRIX_LR = 0.02
EMBEDDING_LR, UNEMBEDDING_LR, TIED_LR, SCALAR_LR = 0.3, 0.008, 0.008, 0.02  # embedding/head at width 768
MOMENTUM_START, MOMENTUM, MOMENTUM_END, MOMENTUM_WARMUP = 0.85, 0.95, 0.9, 100
BETA1 = 0.8
BETA2 = {"embedding": 0.995, "head": 0.96, "norm": 0.95, "scalar": 0.95}
EPS = 1e-10
HELP = (f"hybrid defaults: Muon lr {MATRIX_LR}, momentum {MOMENTUM_START} -> {MOMENTUM} over {MOMENTUM_WARMUP} steps "
        f"-> {MOMENTUM_END} over the decay, NorMuon and cautious weight decay on; AdamW (beta1 {BETA1}, eps {EPS}) "
        f"embedding {EMBEDDING_LR}, head {UNEMBEDDING_LR}, tied embedding {TIED_LR} (x sqrt(768 / dim)), "
        f"norms and scalars {SCALAR_LR}")


def build(groups: list[dict], s, device: torch.device) -> torch.optim.Optimizer:
    muon, rest = split_matrices(groups, strict=False)
    width_scale = (s.width / 768) ** -0.5
    tied = not any(g["role"] == "head" for g in groups)
    out = [muon_group(g, s, s.rate("matrix", MATRIX_LR), normuon=True, cautious_wd=True) for g in muon]
    for g in rest:
        role = g["role"]
        if role == "embedding":
            base = TIED_LR if tied else EMBEDDING_LR
            lr = s.rate(role, base * width_scale, width_scale)
        elif role == "head":
            lr = s.rate(role, UNEMBEDDING_LR * width_scale, width_scale)
        else:
            lr = s.rate(role, SCALAR_LR)
        betas = (BETA1 if s.beta1 is None else s.beta1, BETA2[role] if s.beta2 is None else s.beta2)
        out.append(adam_group(g, lr, betas, EPS if s.eps is None else s.eps))
    opt = MuonAdamW(out)
    opt.step_schedules = momentum_schedules(s, MOMENTUM, MOMENTUM_START, MOMENTUM_END, MOMENTUM_WARMUP)
    return opt
