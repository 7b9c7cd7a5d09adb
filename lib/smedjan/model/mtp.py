"""Multi-token prediction (DeepSeek-V3, arXiv:2412.19437 section 2.2): `n_predict - 1`
sequential modules after the trunk, each predicting one token further ahead.

Module k (k = 1..D, D = n_predict - 1) at position i reads the previous depth's hidden
state h^{k-1}_i (h^0: the trunk's last block output, before the final norm) and the
embedding of token t_{i+k}, and predicts t_{i+k+1}:

    h'^k_i = eh_proj([enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)])      # [2 dim] -> [dim]
    h^k    = block_k(h'^k)                                           # one causal block, positions 0..T-k-1
    logits^k_i = head(norm_k(h^k_i))                                 # the model's own embedding and head

On a training window of T input tokens depth k covers positions 0..T-k-1 (its targets run
to the window's end: y[:, k:]). Depth k's prediction at position i reads t_0..t_{i+k} only,
so it is causal. The embedding and the output head are shared with the model; each module
owns its two input norms, the projection, one block built from the model's last layer's
parts (the block and part machinery of `smedjan.model.model`) and its final norm, named
`mtp.{k-1}.*` with the parts' roles, so optimizer groups, state_N.bin and resume treat
them as any other parameter. At decoding the modules draft tokens for self-speculative
decoding (`smedjan.infer.speculative`); exporters drop them (`without_mtp`).

    cfg = ModelConfig.make(vocab_size=97, dim=32, n_layers=2, n_heads=2, n_predict=3)
    model = Transformer(cfg)                                  # model.mtp: 2 modules
    x = model.trunk(idx)                                      # [B, T, dim], before the final norm
    for k, h in model.mtp.hidden(model, x, idx):              # k = 1, 2: normalised [B, T-k, dim]
        loss_k = F.cross_entropy(model.logits(h).flatten(0, 1), y[:, k:].flatten())
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import torch
from torch import nn

from smedjan.model.parts import MATRIX, NORM, Init

if TYPE_CHECKING:
    from smedjan.model.config import ModelConfig

MAX_PREDICT = 16
PREFIX = "mtp."  # the modules' parameter names: mtp.{k-1}.eh_proj.weight, mtp.{k-1}.block.mixer.wq.weight, ...
# Mixers whose forward reads more than its own layer's state (RWKV-7's first layer hands
# v_first to the later ones): a lone MTP block of them has no such neighbour.
UNSUPPORTED_MIXERS = ("rwkv",)


@dataclass
class MTPConfig:
    n_predict: int = 1  # tokens predicted per position: the next one, plus n_predict - 1 MTP modules

    @property
    def depth(self) -> int:
        return self.n_predict - 1

    def validate(self, mixers: list[str]) -> list[tuple[bool, str]]:
        return [(1 <= self.n_predict <= MAX_PREDICT, f"--n-predict {self.n_predict} must be in [1, {MAX_PREDICT}] "
                                                     "(1: the next token only, no MTP modules)"),
                (self.n_predict == 1 or mixers[-1] not in UNSUPPORTED_MIXERS,
                 f"--n-predict {self.n_predict}: an MTP module's block is the last layer's parts, and a lone "
                 f"{mixers[-1]} layer needs the layers before it; end the model with another mixer")]


class MTPModule(nn.Module):
    """One depth: [enorm(emb); hnorm(h)] -> eh_proj -> block -> (norm, for the shared head)."""

    def __init__(self, cfg: "ModelConfig"):
        super().__init__()
        from smedjan.model.model import Block, RMSNorm  # model.py builds these modules

        d = cfg.dim
        self.enorm = RMSNorm(d, cfg.norm_eps)
        self.hnorm = RMSNorm(d, cfg.norm_eps)
        self.eh_proj = nn.Linear(2 * d, d, bias=False)
        # the last layer's parts and settings (its window: the last layer is always L)
        self.block = Block(cfg, cfg.n_layers - 1, cfg.layer_mixers()[-1])
        self.norm = RMSNorm(d, cfg.norm_eps)

    def init_weights(self, init: Init) -> None:
        init.fill_(self.enorm.weight, 1.0)
        init.fill_(self.hnorm.weight, 1.0)
        init.normal_(self.eh_proj.weight)
        self.block.init_weights(init)
        init.fill_(self.norm.weight, 1.0)

    def param_roles(self) -> dict[str, str]:
        block = {"block." + k: v for k, v in self.block.param_roles().items()}
        return {"enorm.weight": NORM, "hnorm.weight": NORM, "eh_proj.weight": MATRIX, **block, "norm.weight": NORM}

    def forward(self, h_prev: torch.Tensor, emb: torch.Tensor, ctx, index: int) -> torch.Tensor:
        """h_prev, emb [B, n, dim] at ctx's positions -> this depth's hidden [B, n, dim] (before
        its norm); `index` (k - 1) picks the module's decode state in ctx.states."""
        return self.block(self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h_prev)], dim=-1)), ctx, index)


class MTPModules(nn.ModuleList):
    """The D modules of a model with `n_predict` = D + 1 (`Transformer.mtp`)."""

    def __init__(self, cfg: "ModelConfig"):
        # nn.Linear draws its default init from the global generator when built; the
        # model's own init (reset_parameters) overwrites it, and the draws it makes from
        # that generator must not depend on whether the modules exist.
        with torch.random.fork_rng(devices=[]):
            super().__init__(MTPModule(cfg) for _ in range(cfg.mtp.depth))

    def init_weights(self, init: Init) -> None:
        for m in self:
            m.init_weights(init)

    def param_roles(self) -> dict[str, str]:
        return {f"{k}.{n}": r for k, m in enumerate(self) for n, r in m.param_roles().items()}

    def flops_per_token(self, seq_len: int, vocab_size: int) -> float:
        """Training FLOPs per token of every depth: projection, block and the shared head."""
        per = [6.0 * m.eh_proj.weight.numel() + m.block.mixer.flops_per_token(seq_len)
               + m.block.ffn.flops_per_token(seq_len) + 6.0 * vocab_size * m.eh_proj.weight.shape[0] for m in self]
        return sum(per)

    def hidden(self, model, x: torch.Tensor, idx: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        """Training forward: (k, normalised hidden states of depth k [B, T-k, dim]) for k = 1..D,
        from the trunk output `x` [B, T, dim] and the input tokens `idx` [B, T]. Depth k at
        position i embeds idx[i + k] = t_{i+k}; it is scored on t_{i+k+1} = y[:, k:][i]."""
        B, T = idx.shape
        h = x
        for k, module in enumerate(self, 1):
            n = T - k
            assert n >= 1, f"a window of {T} tokens is too short for {len(self)} MTP modules"
            ctx = model.context(B, n, idx.device)
            h = module(h[:, :n], model.tok_embeddings(idx[:, k:]), ctx, k - 1)
            yield k, module.norm(h)

    def new_state(self, batch: int, max_len: int, device, dtype):
        """Decode state of every module's block (a ModelState over the D blocks)."""
        from smedjan.model.model import ModelState

        mixers = [m.block.mixer for m in self]
        return ModelState([m.new_state(batch, max_len, device, dtype) for m in mixers], max_len,
                          truncatable=all(m.TRUNCATABLE for m in mixers))


def without_mtp(cfg: "ModelConfig", tensors: dict[str, torch.Tensor]):
    """(config, tensors) of the same model without its MTP modules: what exporters and
    post-training start from (the trunk, embedding and head are untouched)."""
    if cfg.mtp.n_predict == 1:
        return cfg, tensors
    return cfg.replace(n_predict=1), {k: v for k, v in tensors.items() if not k.startswith(PREFIX)}


def checkpoint_without_mtp(ck):
    """A loaded Checkpoint (`smedjan.formats.checkpoint`) of the same model without its MTP
    modules: post-training (sft, dpo) trains the next-token objective only, so modules it
    never updates would drift from the trunk."""
    import dataclasses

    cfg = ck.config
    if cfg.mtp.n_predict == 1:
        return ck
    cfg, _ = without_mtp(cfg, {})
    tensors = {k: v for k, v in ck.tensors.items() if not k.startswith(PREFIX)}
    return dataclasses.replace(ck, tensors=tensors, meta={**ck.meta, "model_config": cfg.to_json()})
