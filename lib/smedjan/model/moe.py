"""Mixture-of-Experts feed-forward (`--n-experts E --top-k-experts K`): a router in fp32,
sorted dispatch, SwiGLU experts with 3-D weights, optional shared experts and capacity.

For x [B, T, D] flattened to N tokens [N, D]:
1. Router (float32 at least, outside autocast): logits = x W_r^T [N, E];
   p = softmax(logits); the K largest p_i per token are its experts, and their scores are
   renormalised to sum to 1 (gates g = p_topk / sum p_topk: Mixtral's choice, which makes
   K = E the dense softmax mixture, and which llama.cpp's Mixtral graph computes).
2. Sorted dispatch (torchtitan): the N x K (token, expert) assignments are stably sorted by
   expert, so each expert runs once on its contiguous slice of tokens (in token order);
   the outputs, times their gates, are scattered back with index_add.
3. Experts: SwiGLU, w2[e] (silu(w1[e] x) * w3[e] x), each of the FFN's hidden width
   (`--ffn-mult`); the weights are stacked [E, H, D] / [E, D, H] (Muon orthogonalises each
   expert's matrix on its own).
4. Shared experts (DeepSeekMoE, `--shared-experts S`): S always-on experts, kept as one
   SwiGLU of width S x H (the same function as S experts of gate 1), added to the output.
5. Capacity (`--moe-capacity F`; Switch Transformer): in training each expert takes at most
   ceil(F x N x K / E) assignments; the rest (the latest tokens of the batch, since the
   sort keeps token order) are dropped: that expert adds nothing for them, their other
   experts' gates are not renormalised. 0 (default): dropless. Evaluation and decoding are
   always dropless (a dropped token would depend on later tokens of the batch, and decoding
   must equal the full forward).

Router losses (added to the training loss by `with_router_losses`, which every training
tool's driver applies; logged in metrics.jsonl):
- load balancing (Switch, Mixtral): aux = E x sum_i f_i P_i, f_i the fraction of the N x K
  assignments routed to expert i (before capacity drops), P_i the mean router probability
  of expert i. It is 1 under uniform routing (whatever K: f sums to 1) and E / K when every
  token picks the same K experts. Coefficient `--moe-aux-loss` (default 0.01).
- router z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2. Coefficient `--z-loss`
  (default 0.001).
Both are averaged over the MoE layers (and over the forwards of one loss, e.g. DPO's two),
so the coefficients do not scale with depth.

    cfg = ModelConfig.make(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_experts=8, top_k_experts=2)
    moe = FEED_FORWARDS["moe"](cfg, layer=0)
    with recording([moe]):
        y = moe(torch.randn(2, 16, 64))            # [2, 16, 64]
    extra, metrics = router_losses([moe])          # weighted aux + z-loss; moe_aux_loss, moe_load_min, ...
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import nn

from smedjan.model.parts import MATRIX, External, FeedForward, Init, Unsupported, gguf_name, hf_name

if TYPE_CHECKING:
    from smedjan.model.config import ModelConfig

AUX_LOSS, Z_LOSS = 0.01, 0.001  # Switch Transformer's alpha; ST-MoE's router z-loss coefficient


@dataclass
class MoEConfig:
    n_experts: int = 0  # 0 or 1: a dense feed-forward (this config is unused)
    top_k: int = 2  # experts per token
    shared: int = 0  # always-on experts (DeepSeekMoE)
    capacity: float = 0.0  # capacity factor in training; 0: dropless
    aux_loss: float = AUX_LOSS  # load-balancing loss coefficient
    z_loss: float = Z_LOSS  # router z-loss coefficient

    @property
    def enabled(self) -> bool:
        return self.n_experts > 1

    def validate(self, ffn_kind: str) -> list[tuple[bool, str]]:
        E = self.n_experts
        checks = [(0 <= E <= 1024, f"`n_experts` {E} must be in [0, 1024] (0 or 1: a dense feed-forward)"),
                  (self.aux_loss >= 0, f"`moe_aux_loss` {self.aux_loss} must be >= 0"),
                  (self.z_loss >= 0, f"`z_loss` {self.z_loss} must be >= 0"),
                  (0 <= self.shared <= 64, f"`shared_experts` {self.shared} must be in [0, 64]"),
                  (self.capacity >= 0, f"`moe_capacity` {self.capacity} must be >= 0 (0: dropless)"),
                  ((ffn_kind == "moe") == self.enabled,
                   f"`n_experts` {E} needs the feed-forward part 'moe' (`mlp` {ffn_kind!r}: the experts are SwiGLU)"
                   if self.enabled else "the feed-forward part 'moe' needs `n_experts` >= 2")]
        if self.enabled:
            checks.append((1 <= self.top_k <= E, f"`top_k_experts` {self.top_k} must be in [1, `n_experts` {E}]"))
        return checks


def active_params(cfg: "ModelConfig", embedding: bool = True) -> int:
    """Parameters a token uses: all but the experts it is not routed to (= n_params when dense)."""
    total = cfg.n_params(embedding)
    m = cfg.moe
    if not m.enabled:
        return total
    return total - cfg.n_layers * (m.n_experts - m.top_k) * 3 * cfg.dim * cfg.ffn.hidden


class MoE(FeedForward):
    KIND = "moe"
    ROLES = {"router.weight": MATRIX, "w1": MATRIX, "w3": MATRIX, "w2": MATRIX,
             "shared_w1": MATRIX, "shared_w3": MATRIX, "shared_w2": MATRIX}
    WRITERS = ("w2", "shared_w2")

    def __init__(self, cfg: "ModelConfig", layer: int):
        super().__init__()
        m, D, H = cfg.moe, cfg.dim, cfg.ffn.hidden
        self.settings = m  # the MoEConfig
        self.n_experts, self.top_k = m.n_experts, m.top_k
        # registration order is init order: router, experts, shared experts
        self.router = nn.Linear(D, m.n_experts, bias=False)
        self.w1 = nn.Parameter(torch.empty(m.n_experts, H, D))  # gate projections [E, H, D]
        self.w3 = nn.Parameter(torch.empty(m.n_experts, H, D))  # up projections [E, H, D]
        self.w2 = nn.Parameter(torch.empty(m.n_experts, D, H))  # down projections [E, D, H]
        if m.shared:
            self.shared_w1 = nn.Parameter(torch.empty(m.shared * H, D))
            self.shared_w3 = nn.Parameter(torch.empty(m.shared * H, D))
            self.shared_w2 = nn.Parameter(torch.empty(D, m.shared * H))
        # Router statistics of each forward with gradients inside `recording` (the training
        # loss): (aux loss, z-loss, tokens per expert [E], assignments dropped) per forward.
        # Nothing is kept outside it (benchmarks, Sophia's Hessian estimate, recomputation).
        self.recording = False
        self.records: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def init_weights(self, init: Init) -> None:
        init.normal_(self.router.weight)
        init.normal_(self.w1)
        init.normal_(self.w3)
        init.resid_(self.w2)
        if self.settings.shared:
            init.normal_(self.shared_w1)
            init.normal_(self.shared_w3)
            init.resid_(self.shared_w2)

    def flops_per_token(self, seq_len: int) -> float:
        """The router plus the K routed and S shared experts a token runs (not the idle ones)."""
        E, H, D = self.w1.shape
        return 6.0 * (E * D + (self.top_k + self.settings.shared) * 3 * D * H)

    # ---------------------------------------------------------------- forward
    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router logits and probabilities [N, E] of tokens h [N, D], in float32 (or h's float64)."""
        dt = torch.promote_types(h.dtype, torch.float32)
        with torch.autocast(device_type=h.device.type, enabled=False):
            logits = F.linear(h.to(dt), self.router.weight.to(dt))
        return logits, logits.softmax(dim=-1)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on tokens x [n, D] -> [n, D]."""
        return F.linear(self.kernels.swiglu(F.linear(x, self.w1[e]), F.linear(x, self.w3[e])), self.w2[e])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        h = x.reshape(-1, shape[-1])  # [N, D]
        N, E, K = h.shape[0], self.n_experts, self.top_k
        logits, probs = self.route(h)
        top, chosen = probs.topk(K, dim=-1)  # [N, K]
        gates = top / top.sum(dim=-1, keepdim=True)  # renormalised over the chosen K
        flat = chosen.reshape(-1)  # [N K]: assignment a = token a // K, its (a % K)-th choice
        order = torch.argsort(flat, stable=True)  # assignments grouped by expert, token order within
        counts = torch.bincount(flat, minlength=E)  # [E]
        kept = counts
        if self.training and self.settings.capacity > 0:
            cap = math.ceil(self.settings.capacity * N * K / E)
            starts = torch.cumsum(counts, 0) - counts
            rank = torch.arange(N * K, device=h.device) - starts.repeat_interleave(counts)  # place in its expert's run
            order = order[rank < cap]
            kept = counts.clamp(max=cap)
        token = order // K  # [M] source token of each kept assignment, sorted by expert
        xs = h[token]  # [M, D]
        sizes = kept.tolist()
        # [M, D]; idle experts are skipped (a decode step runs only K of them)
        ys = torch.cat([self.expert(e, xe) for e, xe in enumerate(xs.split(sizes)) if sizes[e]])
        g = gates.reshape(-1)[order].to(ys.dtype)
        out = torch.zeros(N, shape[-1], dtype=ys.dtype, device=h.device).index_add_(0, token, ys * g[:, None])
        if self.settings.shared:
            out = out + F.linear(self.kernels.swiglu(F.linear(h, self.shared_w1), F.linear(h, self.shared_w3)),
                                 self.shared_w2)
        if torch.is_grad_enabled():  # also outside `recording`: a checkpointed block's recomputation
            f = counts.to(probs.dtype) / (N * K)  # must save the tensors its forward saved
            aux = E * (f * probs.mean(dim=0)).sum()
            z = torch.logsumexp(logits, dim=-1).square().mean()
            if self.recording:
                self.records.append((aux, z, counts.detach(), (counts - kept).sum().detach()))
        return out.to(x.dtype).reshape(shape)

    # ---------------------------------------------------------------- export
    @classmethod
    def external(cls, cfg: "ModelConfig", layer: int, fmt: str) -> list[External]:
        """Mixtral's tensors: GGUF stacks the experts as we do ([E, H, D]: llama.cpp's
        ffn_*_exps); HF (MixtralForCausalLM, transformers 4's layout, which 5 converts on
        load) has one w1/w3/w2 per expert, sliced out of ours. Both route as we do (softmax,
        top-k, renormalised); neither has a shared expert."""
        if cfg.moe.shared:
            raise Unsupported("--shared-experts: " + ("MixtralForCausalLM" if fmt == "hf" else "llama.cpp's 'llama' "
                              "experts") + " has no shared expert")
        if fmt == "hf":
            out = [External("router.weight", hf_name(layer, "block_sparse_moe.gate.weight"))]
            for e in range(cfg.moe.n_experts):
                out += [External(w, hf_name(layer, f"block_sparse_moe.experts.{e}.{w}.weight"),
                                 convert=functools.partial(_expert_slice, e)) for w in ("w1", "w3", "w2")]
            return out
        from gguf import MODEL_TENSOR as T

        return [External("router.weight", gguf_name(T.FFN_GATE_INP, layer), f32=True),
                External("w1", gguf_name(T.FFN_GATE_EXP, layer)), External("w3", gguf_name(T.FFN_UP_EXP, layer)),
                External("w2", gguf_name(T.FFN_DOWN_EXP, layer))]


def _expert_slice(e: int, w):
    """Expert e's matrix of a stacked weight (torch or numpy)."""
    return w[e]


# ------------------------------------------------------------------ training
def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


@contextlib.contextmanager
def recording(layers: list[MoE]):
    """Record the router statistics of the forwards (with gradients) inside, for `router_losses`."""
    for m in layers:
        m.records.clear()
        m.recording = True
    try:
        yield
    finally:
        for m in layers:
            m.recording = False


def router_losses(layers: list[MoE]) -> tuple[torch.Tensor, dict]:
    """(coefficient-weighted aux + z-loss, metrics) of the forwards `recording` recorded,
    which it clears. Metrics: `moe_aux_loss` and `moe_z_loss` (unweighted, mean over
    layers and forwards); `moe_load_min` / `moe_load_max`: the fewest / most assignments any
    expert of any MoE layer received (summed over the forwards; balanced: tokens x K / E);
    `moe_dropped`: the fraction of assignments capacity dropped (with `--moe-capacity`)."""
    recs = [(m, r) for m in layers for r in m.records]
    assert recs, "router_losses: no MoE forward with gradients was recorded"
    aux = torch.stack([r[0] for _, r in recs]).mean()
    z = torch.stack([r[1] for _, r in recs]).mean()
    loads = torch.stack([sum(r[2] for r in m.records) for m in layers if m.records])  # [layers, E]
    dropped = sum(r[3] for _, r in recs)
    c = layers[0].settings
    metrics = {"moe_aux_loss": aux.detach(), "moe_z_loss": z.detach(), "moe_load_min": loads.min().float(),
               "moe_load_max": loads.max().float()}
    if c.capacity > 0:
        metrics["moe_dropped"] = dropped.float() / loads.sum().float()
    for m in layers:
        m.records.clear()
    return c.aux_loss * aux + c.z_loss * z, metrics


def with_router_losses(model: nn.Module, loss_fn: Callable) -> Callable:
    """`loss_fn` with the MoE layers' router losses added (itself when the model has none)."""
    layers = moe_layers(model)
    if not layers:
        return loss_fn

    def wrapped(train_model, batch):
        with recording(layers):
            loss, metrics = loss_fn(train_model, batch)
        extra, logged = router_losses(layers)
        return loss + extra.to(loss.dtype), {**metrics, **logged}

    return wrapped
