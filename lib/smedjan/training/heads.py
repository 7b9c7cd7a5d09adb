"""Loss heads: what a training loss reads from the model's final hidden states when
`--fused-ce` is on, instead of the full [tokens, vocab] logits.

A head is passed to the model's forward (`model(x, targets, head=h)`), which calls
h(model, hidden, targets) after the final norm, so the head sees the model's own output
matrix, soft-cap and kernels, and DDP and torch.compile see one ordinary forward. The
computations are `smedjan.kernels.linear_ce` (chunks of positions, gradients in the
forward for a scalar loss).

- `FusedCE()`: the mean cross-entropy (train, sft); `FusedCE(reduction="none")` the
  per-token NLL (dpo's sequence log-probs), each chunk recomputed in the backward.
- `FusedDistill(teacher, T, alpha)`: distill's loss with targets (y, teacher hidden
  states): the teacher's logits are made from its hidden states and head a chunk at a
  time too, under no_grad, so neither model's logits exist whole.

    loss = model(x, y, head=FusedCE(ignore_index=-1))
    nll = model(x, y, head=FusedCE(ignore_index=-1, reduction="none"))      # [B, T]
    loss, kl, ce = student(x, (y, teacher.hidden(x)), head=FusedDistill(teacher, 2.0, 0.5))
"""

from __future__ import annotations

from smedjan.kernels.linear_ce import linear_cross_entropy, linear_distill
from smedjan.model import mup


class FusedCE:
    def __init__(self, ignore_index: int = -1, reduction: str = "mean", z_loss: float = 0.0,
                 chunk: int | None = None):
        self.ignore_index, self.reduction, self.z_loss, self.chunk = ignore_index, reduction, z_loss, chunk

    def __call__(self, model, h, targets):
        h = mup.readout(model.cfg, h)  # µP's output multiplier (1 otherwise)
        return linear_cross_entropy(h, model.head_weight, targets, softcap=model.cfg.logit_softcap,
                                    ignore_index=self.ignore_index, z_loss=self.z_loss, reduction=self.reduction,
                                    chunk=self.chunk, ce_chunk=model.kernels.ce_chunk)


class FusedDistill:
    def __init__(self, teacher, temperature: float, alpha: float, chunk: int | None = None):
        self.teacher, self.temperature, self.alpha, self.chunk = teacher, temperature, alpha, chunk

    def __call__(self, model, h, targets):
        y, h_teacher = targets
        h, h_teacher = mup.readout(model.cfg, h), mup.readout(self.teacher.cfg, h_teacher)
        return linear_distill(h, model.head_weight, h_teacher, self.teacher.head_weight, y,
                              temperature=self.temperature, alpha=self.alpha, softcap=model.cfg.logit_softcap,
                              teacher_softcap=self.teacher.cfg.logit_softcap, chunk=self.chunk)
