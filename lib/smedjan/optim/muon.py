"""Muon (momentum orthogonalised by Polar Express) for the hidden matrices, AdamW for the
rest: the `MuonAdamW` optimizer behind `muon` and `hybrid`.

A Muon update of a weight W (m x n, as stored: out x in) with gradient G:
1. Nesterov momentum: buf <- lerp(buf, G, 1 - beta); U = lerp(G, buf, beta).
2. Orthogonalise: U / (||U||_F x 1.02 + 1e-6), then 5 Polar Express steps
   X <- a X + (b A + c A^2) X, A = X X^T (on the wide orientation), which map every
   singular value into about [0.8, 1.2] (bf16 on CUDA, fp32 elsewhere).
3. `normuon` (NorMuon): v <- lerp(v, mean(O^2 over each neuron's row / column), 1 - 0.95);
   O <- O / sqrt(v), rescaled to O's Frobenius norm before the step.
4. `cautious`: zero the components whose sign disagrees with G, rescale by the kept fraction.
5. Weight decay (decoupled): W <- W (1 - lr wd), or with `cautious_wd` only where the update
   and W agree in sign (so decay never pushes against the update; nanochat).
6. W <- W - lr x sqrt(max(1, m / n)) x O (the shape factor: Keller Jordan's Muon).

Same-shape matrices are orthogonalised as one stacked batch; a tensor of more than two
dimensions is a stack of matrices over its last two (MoE experts [E, out, in]), each
orthogonalised on its own. State is per parameter
(`momentum_buffer`, `second_momentum_buffer`), so state_N.bin holds it by name. Under DDP
every rank applies the same update to the all-reduced gradient (replicated, not sharded):
identical to one process.

    opt = MuonAdamW([muon_group(matrix_group, lr=0.02), adam_group(norm_group, lr=3e-3)])
    X = orthogonalize(torch.randn(64, 256))      # singular values in about [0.8, 1.2]
"""

from __future__ import annotations

from collections import defaultdict

import torch

from smedjan.errors import UserError
from smedjan.optim.adamw import BETA1, BETA2, EPS
from smedjan.optim.common import Scheduled, StepSchedules, adamw_update, with_grads

# Polar Express (Amsel, Persson, Musco, Gower 2025), 5 steps, as nanochat and modded-nanogpt use them.
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
# Keller Jordan's quintic Newton-Schulz (torch.optim.Muon's default), for comparison.
NS5 = ((3.4445, -4.7750, 2.0315),) * 5
# name -> (coefficients, safety, eps of the normalisation X / (||X||_F safety + eps)); NS5 as Keller Jordan's.
ORTHOGONALIZERS = {"polar-express": (POLAR_EXPRESS, 1.02, 1e-6), "ns5": (NS5, 1.0, 1e-7)}
# The dtype of the iteration: auto is bf16 on CUDA (fast, and the iteration tolerates it), the
# parameter's dtype elsewhere (CPUs have no fast bf16 matmul). fp16 would overflow: not offered.
ORTH_DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp32": torch.float32}
MATRIX_LR, MOMENTUM, NORMUON_BETA2 = 0.02, 0.95, 0.95


def orthogonalize(G: torch.Tensor, coeffs=POLAR_EXPRESS, dtype: torch.dtype | None = None, safety: float = 1.02,
                  eps: float = 1e-6) -> torch.Tensor:
    """The polar factor U V^T of G [..., m, n] (G = U S V^T), approximately: an odd
    polynomial iteration on the singular values, computed in `dtype` (default G's) and
    returned in G's dtype. G is scaled to spectral norm < 1 by its Frobenius norm first."""
    X = G.to(dtype) if dtype is not None else G
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * safety + eps)
    tall = X.size(-2) > X.size(-1)
    if tall:  # iterate on the wide orientation: the Gram matrix is the smaller one
        X = X.mT
    for a, b, c in coeffs:
        A = X @ X.mT
        X = a * X + (b * A + c * (A @ A)) @ X
    if tall:
        X = X.mT
    return X.to(G.dtype)


def normuon(O: torch.Tensor, v: torch.Tensor, beta2: float) -> torch.Tensor:
    """NorMuon: each neuron's update divided by the root of its running mean square `v`
    (updated in place; [.., m, 1] when m >= n, else [.., 1, n]), then scaled back to O's
    Frobenius norm, so only the distribution across neurons changes."""
    red = -1 if O.size(-2) >= O.size(-1) else -2
    o = O.float()
    v.lerp_(o.square().mean(dim=red, keepdim=True).to(v.dtype), 1 - beta2)
    scaled = o * v.float().clamp_min(1e-10).rsqrt()
    before = o.norm(dim=(-2, -1), keepdim=True)
    after = scaled.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-10)
    return (scaled * (before / after)).to(O.dtype)


def second_moment_shape(m: int, n: int) -> tuple[int, int]:
    return (m, 1) if m >= n else (1, n)


def matrix_shape(p: torch.Tensor) -> tuple[int, int]:
    """The shape of each matrix of a >= 2-D tensor: its last two dimensions (leading ones stack matrices)."""
    return tuple(p.shape[-2:])


def moment_shape(p: torch.Tensor) -> tuple[int, ...]:
    """NorMuon's second-moment shape of a >= 2-D tensor (one per stacked matrix)."""
    return (*p.shape[:-2], *second_moment_shape(*matrix_shape(p)))


class MuonAdamW(Scheduled, torch.optim.Optimizer):
    """Groups of kind `muon` (lr, momentum, nesterov, orthogonalizer, orth_dtype, normuon,
    cautious, cautious_wd, weight_decay) and kind `adamw` (lr, betas, eps, weight_decay; torch's
    AdamW arithmetic)."""

    def __init__(self, groups: list[dict]):
        super().__init__(groups, defaults={})

    @torch.no_grad()
    def step(self, closure=None):
        assert closure is None, "MuonAdamW takes no closure"
        for g in self.param_groups:
            params, grads, states = with_grads(g, self.state)
            if not params:
                continue
            if g["kind"] == "adamw":
                adamw_update(params, grads, states, lr=g["lr"], betas=tuple(g["betas"]), eps=g["eps"],
                             weight_decay=g["weight_decay"])
            else:
                self._muon(g, params, grads, states)

    def state_shape(self, key: str, param: torch.Tensor) -> tuple[int, ...]:
        if key == "second_momentum_buffer":  # NorMuon's per-neuron second moment
            return moment_shape(param)
        return tuple(param.shape)

    def _muon(self, g: dict, params: list, grads: list, states: list) -> None:
        mom, lr, wd = g["momentum"], g["lr"], g["weight_decay"]
        for p, st in zip(params, states):
            if "momentum_buffer" not in st:
                st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if g["normuon"] and "second_momentum_buffer" not in st:
                st["second_momentum_buffer"] = torch.zeros(moment_shape(p), dtype=torch.float32, device=p.device)
        bufs = [st["momentum_buffer"] for st in states]
        torch._foreach_lerp_(bufs, grads, 1 - mom)
        updates = torch._foreach_lerp(grads, bufs, mom) if g["nesterov"] else bufs
        coeffs, safety, eps = ORTHOGONALIZERS[g["orthogonalizer"]]
        by_shape: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, p in enumerate(params):
            by_shape[matrix_shape(p)].append(i)
        for (m, n), idx in by_shape.items():
            dev = params[idx[0]].device
            U = torch.cat([updates[i].reshape(-1, m, n) for i in idx])  # [matrices, m, n]
            O = orthogonalize(U, coeffs, dtype=ORTH_DTYPES[g.get("orth_dtype", "auto")] or (
                torch.bfloat16 if dev.type == "cuda" else None), safety=safety, eps=eps)
            if g["normuon"]:
                vs = [states[i]["second_momentum_buffer"].view(-1, *second_moment_shape(m, n)) for i in idx]
                V = torch.cat(vs)
                O = normuon(O, V, g["beta2"])
                torch._foreach_copy_(vs, list(V.split([v.shape[0] for v in vs])))
            if g["cautious"]:
                G = torch.cat([grads[i].reshape(-1, m, n) for i in idx])
                keep = (O * G > 0).to(O.dtype)
                O = O * keep / keep.mean(dim=(-2, -1), keepdim=True).clamp_min(1e-3)
            P = [w for i in idx for w in params[i].view(-1, m, n).unbind(0)]  # one view per matrix, O's order
            if wd:
                if g["cautious_wd"]:
                    agree = (O * torch.stack(P)) >= 0
                    torch._foreach_sub_(P, [p * a * (lr * wd) for p, a in zip(P, agree.unbind(0))])
                else:
                    torch._foreach_mul_(P, 1 - lr * wd)
            torch._foreach_add_(P, list(O.unbind(0)), alpha=-lr * max(1.0, m / n) ** 0.5)


def muon_group(g: dict, s, lr: float, *, normuon: bool = False, cautious_wd: bool = False,
               orthogonalizer: str = "polar-express") -> dict:
    """A role group as a Muon group (`s`: OptimizerSettings; its flags override the defaults)."""
    return {**g, "kind": "muon", "peak_lr": lr, "lr": lr, "peak_wd": g["weight_decay"],
            "momentum": MOMENTUM if s.muon_momentum is None else s.muon_momentum, "nesterov": True,
            "orthogonalizer": orthogonalizer, "normuon": normuon if s.normuon is None else s.normuon,
            "beta2": NORMUON_BETA2, "cautious": s.cautious,
            "cautious_wd": cautious_wd if s.cautious_wd is None else s.cautious_wd}


def adam_group(g: dict, lr: float, betas: tuple[float, float], eps: float, weight_decay: float | None = None) -> dict:
    wd = g["weight_decay"] if weight_decay is None else weight_decay
    return {**g, "kind": "adamw", "peak_lr": lr, "lr": lr, "betas": betas, "eps": eps, "weight_decay": wd,
            "peak_wd": wd}


def split_matrices(groups: list[dict], strict: bool) -> tuple[list[dict], list[dict]]:
    """(groups Muon takes, the rest): the `matrix` role's >= 2-D tensors go to Muon. A
    matrix-role tensor of fewer dimensions is refused (`strict`) or joins the rest."""
    muon, rest = [], []
    for g in groups:
        if g["role"] != "matrix":
            rest.append(g)
            continue
        flat = [(n, p) for n, p in zip(g["names"], g["params"]) if p.ndim < 2]
        if flat and strict:
            raise UserError(f"`optimizer` muon: {flat[0][0]} has the role matrix but is {flat[0][1].ndim}-D, and Muon "
                            "orthogonalises matrices only; use `optimizer` hybrid (it sends such tensors to AdamW)")
        keep = [(n, p) for n, p in zip(g["names"], g["params"]) if p.ndim >= 2]
        if keep:
            muon.append({**g, "names": [n for n, _ in keep], "params": [p for _, p in keep]})
        if flat:
            rest.append({**g, "role": "scalar", "names": [n for n, _ in flat], "params": [p for _, p in flat]})
    return muon, rest


def momentum_schedules(s, peak_default: float, start_default: float | None = None, end_default: float | None = None,
                       warmup_default: int = 0) -> StepSchedules | None:
    """Weight decay and Muon momentum schedules from the flags (defaults: the builder's)."""
    if s.lr_schedule is None:
        return None
    peak = peak_default if s.muon_momentum is None else s.muon_momentum
    start = s.muon_momentum_start if s.muon_momentum_start is not None else (
        peak if start_default is None else start_default)
    end = s.muon_momentum_end if s.muon_momentum_end is not None else (peak if end_default is None else end_default)
    warmup = warmup_default if s.muon_momentum_warmup is None else s.muon_momentum_warmup
    moving = (start != peak and warmup > 0) or end != peak
    return StepSchedules(s.lr_schedule, s.wd_schedule, (start, peak, end) if moving else None, warmup)


def build(groups: list[dict], s, device: torch.device) -> torch.optim.Optimizer:
    """`muon`: Muon (lr `matrix_lr`, default 0.02) on every hidden matrix, and AdamW with
    `adamw`'s settings (the run's `lr`, betas 0.9 / 0.95, eps 1e-5) on everything else: Muon
    swapped in for AdamW where it applies, nothing else changed. Refuses a model whose
    matrices Muon cannot take rather than quietly training them with AdamW."""
    muon, rest = split_matrices(groups, strict=True)
    if not muon:
        raise UserError("`optimizer` muon: the model has no hidden matrices for Muon to orthogonalise")
    betas = (BETA1 if s.beta1 is None else s.beta1, BETA2 if s.beta2 is None else s.beta2)
    out = [muon_group(g, s, s.rate("matrix", MATRIX_LR)) for g in muon]
    out += [adam_group(g, s.rate(g["role"], s.lr), betas, EPS if s.eps is None else s.eps) for g in rest]
    opt = MuonAdamW(out)
    opt.step_schedules = momentum_schedules(s, MOMENTUM)
    return opt
