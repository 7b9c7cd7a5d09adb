"""Parameter groups by role: which tensors get weight decay, and which optimizer later.

Every parameter of a model has one role, declared by the part that owns it
(`Transformer.param_roles()`; see smedjan.model.parts):
- `matrix`:    2-D weights inside the blocks (attention wq/wk/wv/wo, FFN w1/w2/w3, ...).
               The only role with weight decay; the one Muon-style optimizers take.
- `embedding`: the token embedding, which is also the output head when tied.
- `head`:      an untied output head.
- `norm`:      RMSNorm gains (block norms, QK-norm gains, ...).
- `scalar`:    other small learned vectors or scalars.

Why decay only `matrix`: decoupled weight decay (AdamW) pulls every weight towards 0
by lr * wd each step, whether or not the weight got a gradient. For the hidden
matrices that is the intended regulariser (it bounds their norm against the
normalised activations). An embedding row gets a gradient only when its token occurs,
so decay would erode rare tokens' rows without any counter-signal, and with the tied
head the same matrix sets the logit scale; decaying it (or an untied head) mostly
fights the output calibration. Norm gains are scale parameters around 1: decaying
them to 0 would shrink every layer's output. This is also what nanochat and most
Llama recipes do (no decay on embeddings, norms; decay on hidden matrices).

    groups = param_groups(model, weight_decay=0.1)
    # [{"role": "matrix", "params": [...], "names": [...], "weight_decay": 0.1}, ...]
"""

from __future__ import annotations

from torch import nn

from smedjan.model.parts import MATRIX, ROLES

DECAYED_ROLES = frozenset({MATRIX})


def param_roles(model: nn.Module) -> dict[str, str]:
    """Parameter name -> role, as the model's parts declare them (no name matching)."""
    if not hasattr(model, "param_roles"):
        raise TypeError(f"{type(model).__name__} declares no parameter roles (param_roles())")
    return model.param_roles()


def param_groups(model: nn.Module, weight_decay: float, extra: list[tuple] = ()) -> list[dict]:
    """One optimizer group per role present in `model`, in ROLES order; only trainable
    parameters. Each group carries `role`, `names` (parallel to `params`) and its
    `weight_decay` (the given value for `matrix`, 0 otherwise). `extra`: (name, parameter,
    role) of tensors that train beside the model (ReLoRA's adapters), after its own."""
    by_role: dict[str, tuple[list, list[str]]] = {r: ([], []) for r in ROLES}
    roles = param_roles(model)
    # named_parameters() yields a tied tensor once, so the tied head is not counted twice.
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        params, names = by_role[roles[name]]
        params.append(p)
        names.append(name)
    for name, p, role in extra:
        by_role[role][0].append(p)
        by_role[role][1].append(name)
    groups = []
    for role in ROLES:
        params, names = by_role[role]
        if params:
            groups.append({"role": role, "params": params, "names": names,
                           "weight_decay": weight_decay if role in DECAYED_ROLES else 0.0})
    return groups
