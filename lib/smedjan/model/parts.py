"""What every part of the model owns, and the context a mixer runs in.

A block is `x + mixer(norm(x))`, then `x + ffn(norm(x))`. A `Mixer` (attention, MLA,
block-sparse attention, ...) and a `FeedForward` (SwiGLU, ReLU^2, ...) each own:
- their parameters and initialisation (`init_weights`, drawing from one `Init` so a
  model's weights depend only on the seed and the order of its parts);
- the optimizer role of each parameter (`ROLES`: local name -> role), which optimizers
  route by; nothing elsewhere looks at parameter names;
- their training FLOPs per token (`flops_per_token`), from which `sizes`, MFU and the
  horizon are computed;
- (mixers) their decode state (`new_state`), so every architecture generates through
  the model's own forward, one token at a time;
- their external tensor names for Hugging Face and GGUF (`external`), or an
  `Unsupported` error naming what the other format lacks.

    class MyFFN(FeedForward):
        ROLES = {"w.weight": MATRIX}
        def __init__(self, cfg, layer): ...
        def init_weights(self, init): init.normal_(self.w.weight)
        def flops_per_token(self, seq_len): return 6 * self.w.weight.numel()
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import numpy as np
import torch
from torch import nn

from smedjan.errors import UserError
from smedjan.kernels import KernelUser

if TYPE_CHECKING:
    from smedjan.model.config import ModelConfig

# Optimizer roles. `matrix`: hidden 2-D weights (decayed; Muon takes them). `embedding`:
# the token embedding (the head too when tied). `head`: an untied output head. `norm`:
# RMSNorm gains. `scalar`: other small learned vectors or scalars (gates, decays).
MATRIX, EMBEDDING, HEAD, NORM, SCALAR = "matrix", "embedding", "head", "norm", "scalar"
ROLES = (MATRIX, EMBEDDING, HEAD, NORM, SCALAR)

INIT_STD = 0.02  # GPT-2's init: about 1/sqrt(dim) at the presets' widths


class Unsupported(UserError):
    """A model a target format (llama.cpp's `llama`, transformers' Llama) cannot express."""


class Init:
    """The one generator and the two standard deviations every part draws from: N(0, std)
    for matrices, std / sqrt(2 x layers) for the projections that write into the residual
    stream (so its variance does not grow with depth). Draws happen in float32 on the CPU
    and are copied into the parameter, so meta-built and real models agree."""

    def __init__(self, n_layers: int, seed: int | None = None, std: float = INIT_STD):
        self.gen = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
        self.std = std
        self.resid_std = std / math.sqrt(2 * n_layers)

    @torch.no_grad()
    def normal_(self, p: torch.Tensor, std: float | None = None) -> None:
        if p.is_meta:  # a model built for its shapes only: draw nothing
            return
        s = self.std if std is None else std
        p.copy_(torch.randn(p.shape, generator=self.gen, dtype=torch.float32).mul_(s).to(p.dtype))

    @torch.no_grad()
    def resid_(self, p: torch.Tensor) -> None:
        self.normal_(p, self.resid_std)

    @torch.no_grad()
    def uniform_(self, p: torch.Tensor, lo: float, hi: float) -> None:
        if p.is_meta:
            return
        p.copy_((torch.rand(p.shape, generator=self.gen, dtype=torch.float64) * (hi - lo) + lo).to(p.dtype))

    @torch.no_grad()
    def fill_(self, p: torch.Tensor, value: float) -> None:
        p.fill_(value)


@dataclass(frozen=True)
class External:
    """One tensor of a part under another format's name."""

    local: str  # our name within the part, e.g. "wq.weight"
    name: str  # theirs, whole: "model.layers.0.self_attn.q_proj.weight" or "blk.0.attn_q.weight"
    rope_heads: int = 0  # GGUF: permute rows from half-split to interleaved RoPE over this many heads
    # GGUF: how their tensor follows from ours when it is not a copy (A = -exp(A_log), a
    # reshape), as a function of the float32 array; None: a copy.
    convert: Callable[[np.ndarray], np.ndarray] | None = None
    f32: bool = False  # GGUF: always float32 (small weights llama.cpp's quantizer leaves alone)


def hf_name(layer: int, rel: str) -> str:
    """A transformers Llama tensor name of `layer`."""
    return f"model.layers.{layer}.{rel}"


def gguf_name(tensor, layer: int | None = None) -> str:
    """llama.cpp's name of a `gguf.MODEL_TENSOR` (of `layer`), from the gguf package's table."""
    from gguf import TENSOR_NAMES

    return TENSOR_NAMES[tensor].format(bid=layer) + ".weight"


class Growth:
    """What a part needs to grow its tensors into a wider model (`smedjan grow`): the two
    configs, random readers for new capacity, and the RMSNorm gain rescaling."""

    def __init__(self, src: "ModelConfig", dst: "ModelConfig", gen: torch.Generator):
        self.src, self.dst, self.gen = src, dst, gen
        self.d, self.d2 = src.dim, dst.dim

    def rand(self, *shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=self.gen, dtype=torch.float64) * INIT_STD

    def norm(self, g: torch.Tensor) -> torch.Tensor:
        """[d] -> [d']: with zeros appended to the residual stream mean(x^2) shrinks by d/d', which
        the grown norm_eps (eps x d/d') and gains x sqrt(d/d') cancel; new gains read zeros."""
        g = g.double()
        scale = math.sqrt(self.d / self.d2)
        return torch.cat([g * scale, torch.full((self.d2 - self.d,), float(g.mean()) * scale, dtype=torch.float64)])

    def readers(self, w: torch.Tensor, rows: int) -> torch.Tensor:
        """A weight [r, d] that reads the stream, as [rows, d']: old values in the corner,
        random elsewhere (new dims read zeros at step 0; new rows are new units)."""
        out = self.rand(rows, self.d2)
        out[:w.shape[0], :self.d] = w
        return out

    def writer(self, w: torch.Tensor, cols: int) -> torch.Tensor:
        """A weight [d, c] that writes into the stream, as [d', cols]: zeros outside the corner."""
        out = torch.zeros(self.d2, cols, dtype=torch.float64)
        out[:self.d, :w.shape[1]] = w
        return out


class Part(KernelUser, nn.Module):
    """Base of mixers and feed-forwards (see the module docstring). `self.kernels` holds the
    model's choice of kernels (`smedjan.kernels`: RMSNorm, RoPE, SwiGLU, ...)."""

    KIND: ClassVar[str] = ""
    ROLES: ClassVar[dict[str, str]] = {}  # local parameter name -> role
    WRITERS: ClassVar[tuple[str, ...]] = ()  # projections into the residual stream (grow zeroes them)

    def param_roles(self) -> dict[str, str]:
        """Local parameter name -> role, for every parameter of this part."""
        names = [n for n, _ in self.named_parameters()]
        missing = [n for n in names if n not in self.ROLES]
        assert not missing, f"{type(self).__name__} declares no optimizer role for {missing}"
        return {n: self.ROLES[n] for n in names}

    def init_weights(self, init: Init) -> None:
        raise NotImplementedError

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3 x forward)."""
        raise NotImplementedError

    @classmethod
    def external(cls, cfg: "ModelConfig", layer: int, fmt: str) -> list[External]:
        """This part's tensors under `fmt`'s names ("hf" or "gguf"); Unsupported if it has none."""
        raise Unsupported(f"the {cls.KIND!r} part has no {FORMAT_NAMES[fmt]} equivalent")

    @classmethod
    def check_growable(cls, src: "ModelConfig", dst: "ModelConfig") -> None:
        """UserError when this part of `src` cannot grow exactly into `dst`'s."""
        raise UserError(f"grow: the {cls.KIND!r} part cannot be grown (only attention, swiglu and relu2 can)")

    @classmethod
    def grow(cls, t: dict[str, torch.Tensor], g: Growth) -> dict[str, torch.Tensor]:
        """This part's tensors (local names, float64) grown to `g.dst`'s shapes."""
        raise UserError(f"grow: the {cls.KIND!r} part cannot be grown")


FORMAT_NAMES = {"hf": "transformers LlamaForCausalLM", "gguf": "llama.cpp 'llama' architecture"}


def matmul_flops(*modules: nn.Module) -> float:
    """6 x the weights of these linear layers: 2 per multiply-add, forward + 2x backward."""
    return 6.0 * sum(m.weight.numel() for m in modules)


@dataclass
class Context:
    """Where a forward's tokens sit and what they may read, shared by every layer.

    `start` is the position of x[:, 0]: an int for every row (training, prefill), or a
    LongTensor [B] of per-row positions (a decode step of T = 1 over rows of different
    lengths). `states` holds each layer's decode state (None in training) and `rows`
    the state rows x's batch occupies. `rope(dim)` gives cos/sin for x's positions,
    broadcastable to [B, H, T, dim]; `cache` lets layers share masks within a forward."""

    start: int | torch.Tensor
    length: int  # T, tokens per row in this forward
    tables: Any  # RopeTables
    device: torch.device
    dtype: torch.dtype  # of the RoPE tables: float32, or float64 for a float64 model
    states: list | None = None
    rows: slice = field(default_factory=lambda: slice(None))
    cache: dict = field(default_factory=dict)

    @property
    def per_row(self) -> bool:
        return isinstance(self.start, torch.Tensor)

    def end(self) -> int:
        """One past the last position any row reaches."""
        if self.per_row:
            return int(self.start.max()) + self.length
        return self.start + self.length

    def positions(self) -> torch.Tensor:
        """Query positions: [T] for a shared start, [B, T] per row."""
        ar = torch.arange(self.length, device=self.device)
        if self.per_row:
            return self.start.to(self.device)[:, None] + ar
        return ar + self.start

    def rope(self, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = ("rope", dim)
        if key not in self.cache:
            cos, sin = self.tables.get(dim, self.end(), self.device, self.dtype)
            if self.per_row:
                pos = self.positions()  # [B, T]
                cos, sin = cos[pos][:, None], sin[pos][:, None]  # [B, 1, T, dim]
            else:
                cos, sin = cos[self.start:self.start + self.length], sin[self.start:self.start + self.length]
            self.cache[key] = (cos, sin)
        return self.cache[key]


class Mixer(Part):
    """A sequence mixer: [B, T, dim] -> [B, T, dim], causal."""

    # True when a state filled to n positions can be cut back to any m < n (a KV cache);
    # recurrent states cannot, so the engine reuses them only as a whole.
    TRUNCATABLE: ClassVar[bool] = True

    def forward(self, x: torch.Tensor, ctx: Context, layer: int) -> torch.Tensor:
        raise NotImplementedError

    def new_state(self, batch: int, max_len: int, device, dtype) -> "LayerState":
        raise NotImplementedError


class FeedForward(Part):
    """A position-wise feed-forward: [B, T, dim] -> [B, T, dim]."""

    # False: the block has no feed-forward half at all (no norm, nothing added), as in
    # Mamba-2's blocks.
    PRESENT: ClassVar[bool] = True
    # True: forward(x, ctx, layer) also reads earlier positions (RWKV's token shift) and
    # keeps what decoding needs in its layer's mixer state.
    CONTEXTUAL: ClassVar[bool] = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class LayerState:
    """A mixer's decode state for `batch` rows. Rows are independent sequences; the engine
    moves a row when it compacts its batch."""

    def move_row(self, src: int, dst: int, length: int) -> None:
        raise NotImplementedError


class TensorState(LayerState):
    """A state made of tensors whose first dimension is the row, and (when `seq_dim` is set)
    whose `seq_dim` indexes positions: a KV or latent cache."""

    def __init__(self, seq_dim: int | None = None, **tensors: torch.Tensor):
        self.seq_dim = seq_dim
        self.tensors = tensors

    def __getattr__(self, name):
        try:
            return self.__dict__["tensors"][name]
        except KeyError:
            raise AttributeError(name) from None

    def move_row(self, src: int, dst: int, length: int) -> None:
        for t in self.tensors.values():
            if self.seq_dim is None:
                t[dst] = t[src]
            else:
                idx = [slice(None)] * (t.dim() - 1)
                idx[self.seq_dim - 1] = slice(0, length)
                t[dst][tuple(idx)] = t[src][tuple(idx)]

    def write(self, name: str, rows: slice, start: int | torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Store `values` (rows x positions along seq_dim) at `start` and return the rows'
        cache up to the furthest position written."""
        t = self.tensors[name][rows]
        d, n = self.seq_dim, values.shape[self.seq_dim]
        if isinstance(start, torch.Tensor):
            assert n == 1, "per-row starts are for one-token decode steps"
            r = torch.arange(values.shape[0], device=values.device)
            pos = start.to(values.device)
            idx = [r] + [slice(None)] * (t.dim() - 1)
            idx[d] = pos
            t[tuple(idx)] = values.select(d, 0)
            end = int(pos.max()) + 1
        else:
            t.narrow(d, start, n).copy_(values)
            end = start + n
        return t.narrow(d, 0, end)


def check(checks: list[tuple[bool, str]]) -> None:
    """Raise a UserError with the first failing message."""
    for ok, msg in checks:
        if not ok:
            raise UserError(msg)
