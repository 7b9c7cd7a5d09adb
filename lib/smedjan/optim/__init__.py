"""Optimizers: role-tagged parameter groups and a registry of builders by name.

    from smedjan.optim import param_groups, build_optimizer, OptimizerSettings
    opt = build_optimizer("adamw", param_groups(model, weight_decay=0.1), OptimizerSettings(lr=3e-4))
"""

from smedjan.optim.groups import DECAYED_ROLES, ROLES, param_groups, param_roles
from smedjan.optim.registry import OPTIMIZERS, OptimizerSettings, build_optimizer

__all__ = ["param_groups", "param_roles", "ROLES", "DECAYED_ROLES", "OPTIMIZERS", "OptimizerSettings", "build_optimizer"]
