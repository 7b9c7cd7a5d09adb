"""The smedjan model: token embedding, a stack of blocks built from parts, a final RMSNorm
and an output head (tied to the embedding unless untied).

A block is `x + mixer(mixer_norm(x))`, then `x + ffn(ffn_norm(x))` (pre-norm; `--mlp none`
drops the second half, as Mamba-2 does); each
layer's mixer and feed-forward come from the registries (`smedjan.model.registry`) as
the config says. The default parts make a Llama: RoPE attention (MHA or GQA) and SwiGLU.
Everything about a part (init, optimizer roles, FLOPs, decode state, external names)
lives in its file; this one assembles them.

    cfg = ModelConfig.from_preset("small", vocab_size=8192)
    model = Transformer(cfg)
    loss = model(idx, targets)                     # idx, targets: int64 [B, T]
    logits = model(idx)                            # [B, T, vocab]
    state = model.new_state(batch=1, max_len=64)   # decode: prefill, then one token at a time
    logits = model(prompt, state=state)            # prompt [1, T]: positions 0..T-1
    logits = model(next_tok, state=state, start=T) # [1, 1] at position T
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from smedjan.kernels import KernelUser
from smedjan.model import bitnet, mup, sharing
from smedjan.model.config import ModelConfig
from smedjan.model.parts import EMBEDDING, HEAD, INIT_STD, NORM, Context, Init, LayerState
from smedjan.model.mtp import PREFIX as MTP_PREFIX
from smedjan.model.mtp import MTPModules
from smedjan.model.registry import FEED_FORWARDS, MIXERS
from smedjan.model.rope import RopeTables


class RMSNorm(KernelUser, nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.rms_norm(x, self.weight, self.eps)  # in float32 at least, x's dtype out


def _prefixed(prefix: str, roles: dict[str, str]) -> dict[str, str]:
    return {prefix + k: v for k, v in roles.items()}


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, mixer: str):
        super().__init__()
        # registration order is init order: norm, mixer, norm, feed-forward
        self.mixer_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mixer = MIXERS[mixer](cfg, layer)
        ffn = FEED_FORWARDS[cfg.ffn.kind]
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps) if ffn.PRESENT else None  # None: a mixer-only block
        self.ffn = ffn(cfg, layer)

    def init_weights(self, init: Init) -> None:
        init.fill_(self.mixer_norm.weight, 1.0)
        self.mixer.init_weights(init)
        if self.ffn_norm is not None:
            init.fill_(self.ffn_norm.weight, 1.0)
            self.ffn.init_weights(init)

    def forward(self, x: torch.Tensor, ctx: Context, layer: int) -> torch.Tensor:
        x = x + self.mixer(self.mixer_norm(x), ctx, layer)
        if self.ffn_norm is None:
            return x
        h = self.ffn_norm(x)
        return x + (self.ffn(h, ctx, layer) if self.ffn.CONTEXTUAL else self.ffn(h))

    def param_roles(self) -> dict[str, str]:
        ffn = {} if self.ffn_norm is None else {"ffn_norm.weight": NORM, **_prefixed("ffn.", self.ffn.param_roles())}
        return {"mixer_norm.weight": NORM, **_prefixed("mixer.", self.mixer.param_roles()), **ffn}


def _check_shared_copies(module, state_dict, prefix, *args) -> None:
    ours = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    sharing.check_copies(ours, module.cfg, "the state to load")


class ModelState:
    """Decode state of every layer for `batch` rows of up to `max_len` positions."""

    def __init__(self, layers: list[LayerState], max_len: int, truncatable: bool):
        self.layers, self.max_len = layers, max_len
        self.truncatable = truncatable  # a row filled to n positions may be reused for any prefix

    def move_row(self, src: int, dst: int, length: int) -> None:
        for st in self.layers:
            st.move_row(src, dst, length)


class Transformer(KernelUser, nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        # --shared-layers N: a group of N layers is one Block object (smedjan.model.sharing)
        self.layers = nn.ModuleList(sharing.build_layers(cfg, lambda i, m: Block(cfg, i, m)))
        if cfg.shared_layers > 1:
            self.register_load_state_dict_pre_hook(_check_shared_copies)
        if cfg.bitnet:  # BitNet b1.58: the block linears become BitLinear (smedjan.model.bitnet)
            bitnet.convert(self.layers)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        # Tied: logits use the embedding matrix, so there is no separate head parameter
        # (and safetensors never sees two names for one storage).
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.rope_tables = RopeTables(cfg.rope, cfg.max_seq_len)
        # Multi-token prediction (--n-predict): DeepSeek-V3's sequential modules (smedjan.model.mtp)
        self.mtp = MTPModules(cfg) if cfg.mtp.depth else None
        self.reset_parameters()

    def reset_parameters(self, seed: int | None = None) -> None:
        """GPT-2's initialisation through the parts: N(0, 0.02) for the embedding and every
        matrix, std / sqrt(2 x layers) for the projections into the residual stream, norm
        gains 1. Draws follow the parameters' order, so a seed fixes the weights. Under µP
        the matrices' std is 0.02 / sqrt(width_mult); the embedding and head keep 0.02."""
        init = Init(self.cfg.n_layers, seed, std=mup.init_std(self.cfg))
        init.normal_(self.tok_embeddings.weight, INIT_STD)
        for _, block in sharing.first_uses(self.layers):
            init.fill_(block.mixer_norm.weight, 1.0)
            block.mixer.init_weights(init)
            if block.ffn_norm is not None:
                init.fill_(block.ffn_norm.weight, 1.0)
                block.ffn.init_weights(init)
        init.fill_(self.norm.weight, 1.0)
        if self.output is not None:
            init.normal_(self.output.weight, INIT_STD)
        if self.mtp is not None:  # drawn last: the rest of the model is the same with or without them
            self.mtp.init_weights(init)

    def param_roles(self) -> dict[str, str]:
        """Parameter name -> optimizer role (matrix, embedding, head, norm, scalar, ...)."""
        roles = {"tok_embeddings.weight": EMBEDDING}
        for i, block in sharing.first_uses(self.layers):
            roles.update(_prefixed(f"layers.{i}.", block.param_roles()))
        roles["norm.weight"] = NORM
        if self.output is not None:
            roles["output.weight"] = HEAD
        if self.mtp is not None:
            roles.update(_prefixed(MTP_PREFIX, self.mtp.param_roles()))
        names = [n for n, _ in self.named_parameters()]
        assert sorted(names) == sorted(roles), f"roles do not cover the parameters: {set(names) ^ set(roles)}"
        return {n: roles[n] for n in names}

    @property
    def head_weight(self) -> torch.Tensor:
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def rope(self, device, length: int | None = None) -> None:
        """Build the RoPE tables every layer needs up to `length` (default: the context)
        now: under torch.compile, a table built inside the graph would be a recompile."""
        dtype = torch.float64 if self.tok_embeddings.weight.dtype == torch.float64 else torch.float32
        dims = {m.head_dim for m in self.modules() if hasattr(m, "head_dim")}
        dims |= {m.rope_dim for m in self.modules() if hasattr(m, "rope_dim")}
        for d in dims:
            self.rope_tables.get(d, length or self.cfg.max_seq_len, device, dtype)

    # ---------------------------------------------------------------- forward
    def new_state(self, batch: int, max_len: int | None = None, device=None, dtype=None) -> ModelState:
        """Empty decode state for `batch` rows of up to `max_len` positions (default: the
        context), in the embedding's device and dtype unless given."""
        ref = self.tok_embeddings.weight
        n = max_len or self.cfg.max_seq_len
        mixers = [block.mixer for block in self.layers]
        return ModelState([m.new_state(batch, n, device or ref.device, dtype or ref.dtype) for m in mixers], n,
                          truncatable=all(m.TRUNCATABLE for m in mixers))

    def context(self, B: int, T: int, device, start: int | torch.Tensor = 0, state: ModelState | None = None,
                rows: slice | None = None) -> Context:
        """The Context of a forward of T tokens in B rows from `start` (see `hidden`), reading
        and writing the layers of `state` (a decode state, or None in training)."""
        per_row = isinstance(start, torch.Tensor)
        end = (int(start.max()) if per_row else start) + T
        if end > self.cfg.max_seq_len:
            raise ValueError(f"positions up to {end} exceed the model's context of {self.cfg.max_seq_len}")
        if state is None and (per_row or start):
            raise ValueError("a start position needs a decode state")
        dtype = torch.float64 if self.tok_embeddings.weight.dtype == torch.float64 else torch.float32
        return Context(start=start, length=T, tables=self.rope_tables, device=device, dtype=dtype,
                       states=state.layers if state is not None else None, rows=rows or slice(0, B))

    def trunk(self, idx: torch.Tensor, *, state: ModelState | None = None, start: int | torch.Tensor = 0,
              rows: slice | None = None) -> torch.Tensor:
        """The last block's output [B, T, dim] (before the final norm) of token ids `idx` [B, T]
        (see `hidden`)."""
        B, T = idx.shape
        ctx = self.context(B, T, idx.device, start, state, rows)
        x = self.tok_embeddings(idx)
        for i, layer in enumerate(self.layers):
            x = layer(x, ctx, i)
        return x

    def hidden(self, idx: torch.Tensor, *, state: ModelState | None = None, start: int | torch.Tensor = 0,
               rows: slice | None = None) -> torch.Tensor:
        """Final normalized hidden states [B, T, dim] of token ids `idx` [B, T].

        Without `state`: a training forward over positions 0..T-1. With one: the tokens
        continue rows `rows` (default 0..B-1) of the state from position `start` (an int, or
        a LongTensor [B] of per-row positions for a one-token decode step)."""
        return self.norm(self.trunk(idx, state=state, start=start, rows=rows))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        z = F.linear(mup.readout(self.cfg, h), self.head_weight)
        c = self.cfg.logit_softcap
        if c:
            zf = z.to(torch.promote_types(z.dtype, torch.float32))
            z = (torch.tanh(zf / c) * c).to(z.dtype)
        return z

    def forward(self, idx: torch.Tensor, targets=None, *, state: ModelState | None = None,
                start: int | torch.Tensor = 0, rows: slice | None = None, ignore_index: int = -1,
                head=None):
        """Logits [B, T, vocab] or, with targets [B, T], the mean cross-entropy over the
        targets that are not `ignore_index`. With `head`: head(model, final hidden states,
        targets) instead (a loss computed from the hidden states without full logits:
        `smedjan.training.heads`); a head with `from_trunk` (multi-token prediction,
        `smedjan.training.mtp`) gets head.trunk_loss(model, trunk output, idx, targets)."""
        if getattr(head, "from_trunk", False):
            return head.trunk_loss(self, self.trunk(idx, state=state, start=start, rows=rows), idx, targets)
        h = self.hidden(idx, state=state, start=start, rows=rows)
        if head is not None:
            return head(self, h, targets)
        logits = self.logits(h)
        if targets is None:
            return logits
        return self.cross_entropy(logits, targets, ignore_index)

    def cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -1) -> torch.Tensor:
        """Mean cross-entropy of logits [B, T, vocab] on targets [B, T] (in float32 at least)."""
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=ignore_index)


def meta_model(cfg: ModelConfig) -> Transformer:
    """`cfg`'s model on the meta device: shapes and structure, nothing allocated."""
    with torch.device("meta"):
        return Transformer(cfg)


def count_params(cfg: ModelConfig) -> tuple[int, int]:
    """(all parameters, parameters outside the embedding and head), the tied head once."""
    model = meta_model(cfg)
    roles = model.param_roles()
    total = sum(p.numel() for p in model.parameters())
    outside = sum(p.numel() for n, p in model.named_parameters() if roles[n] not in (EMBEDDING, HEAD))
    return total, outside


def model_flops(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token at `seq_len`, asked of every part, plus the output head."""
    model = meta_model(cfg)
    parts = sum(b.mixer.flops_per_token(seq_len) + b.ffn.flops_per_token(seq_len) for b in model.layers)
    if model.mtp is not None:
        parts += model.mtp.flops_per_token(seq_len, cfg.vocab_size)
    return parts + 6.0 * cfg.vocab_size * cfg.dim
