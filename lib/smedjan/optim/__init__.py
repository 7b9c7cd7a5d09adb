"""Optimizers: role-tagged parameter groups and a registry of builders by name (adamw,
adamw-cpu, adamw-8bit, sophia, muon, hybrid; one file each).

    from smedjan.optim import param_groups, build_optimizer, OptimizerSettings
    opt = build_optimizer("hybrid", param_groups(model, weight_decay=0.1), OptimizerSettings(lr=3e-3, width=128))
"""

from smedjan.optim.groups import DECAYED_ROLES, ROLES, param_groups, param_roles
from smedjan.optim.registry import ALIASES, OPTIMIZERS, OptimizerSettings, build_optimizer, canonical

__all__ = ["param_groups", "param_roles", "ROLES", "DECAYED_ROLES", "OPTIMIZERS", "ALIASES", "OptimizerSettings",
           "build_optimizer", "canonical"]
