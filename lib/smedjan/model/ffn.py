"""Feed-forward parts: SwiGLU (Llama) and ReLU^2 (Primer, nanochat).

SwiGLU: w2(silu(w1 x) * w3 x), hidden = 8/3 x dim rounded up to a multiple of 256 by
default, which keeps its parameter count at a 4x MLP's. ReLU^2: w2(relu(w1 x)^2),
hidden 4 x dim by default: one matrix fewer than SwiGLU at the same width, and the
square keeps the activations sparse. Both write into the residual stream through w2,
which gets the smaller residual init.

    cfg = ModelConfig.make(vocab_size=97, dim=64, n_layers=2, n_heads=4, mlp="relu2", ffn_mult=4)
    y = FEED_FORWARDS[cfg.ffn.kind](cfg, layer=0)(x)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from smedjan.errors import UserError
from smedjan.model.attention import fused_linear
from smedjan.model.parts import (MATRIX, External, FeedForward, Growth, Init, Unsupported, gguf_name, hf_name,
                                 matmul_flops)

if TYPE_CHECKING:
    from smedjan.model.config import ModelConfig

FFN_MULTIPLE = 256
DEFAULT_MULT = {"swiglu": 8 / 3, "relu2": 4.0, "rwkv": 4.0, "none": 8 / 3}


def ffn_hidden_for(dim: int, ffn_mult: float = 8 / 3) -> int:
    """ffn_mult x dim rounded up to a multiple of 256 (matmul-friendly widths)."""
    return int(math.ceil(ffn_mult * dim / FFN_MULTIPLE) * FFN_MULTIPLE)


@dataclass
class FFNConfig:
    kind: str = "swiglu"  # a FEED_FORWARDS name: swiglu | relu2 | rwkv | none
    hidden: int = 0  # 0 -> the kind's default multiple of dim, rounded up to 256

    def resolve(self, dim: int) -> None:
        if self.hidden == 0:
            self.hidden = ffn_hidden_for(dim, DEFAULT_MULT.get(self.kind, 8 / 3))

    def validate(self) -> list[tuple[bool, str]]:
        from smedjan.model.registry import FEED_FORWARDS

        return [(self.kind in FEED_FORWARDS, f"--mlp {self.kind!r} is not one of {', '.join(FEED_FORWARDS)}"),
                (1 <= self.hidden <= 1 << 20, f"feed-forward hidden size {self.hidden} must be in [1, 2^20]")]


class _Growable(FeedForward):
    """New hidden units read at random (new rows of the input matrices) and write zeros
    (new columns of w2), so they add nothing at step 0."""

    WRITERS = ("w2.weight",)
    READERS: tuple[str, ...] = ()

    @classmethod
    def check_growable(cls, src: "ModelConfig", dst: "ModelConfig") -> None:
        if dst.ffn.hidden < src.ffn.hidden:
            raise UserError(f"cannot grow to a smaller model: FFN hidden size {src.ffn.hidden} -> {dst.ffn.hidden}")

    @classmethod
    def grow(cls, t: dict[str, torch.Tensor], g: Growth) -> dict[str, torch.Tensor]:
        out = {n: g.readers(t[n], g.dst.ffn.hidden) for n in cls.READERS}
        out["w2.weight"] = g.writer(t["w2.weight"], g.dst.ffn.hidden)
        return out


class SwiGLU(_Growable):
    KIND = "swiglu"
    ROLES = {"w1.weight": MATRIX, "w3.weight": MATRIX, "w2.weight": MATRIX}
    READERS = ("w1.weight", "w3.weight")

    def __init__(self, cfg: "ModelConfig", layer: int):
        super().__init__()
        self.hidden = cfg.ffn.hidden
        # registration order (w1, w3, w2) is the init order: keep it
        self.w1 = nn.Linear(cfg.dim, cfg.ffn.hidden, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn.hidden, bias=False)
        self.w2 = nn.Linear(cfg.ffn.hidden, cfg.dim, bias=False)

    def init_weights(self, init: Init) -> None:
        init.normal_(self.w1.weight)
        init.normal_(self.w3.weight)
        init.resid_(self.w2.weight)

    def flops_per_token(self, seq_len: int) -> float:
        return matmul_flops(self.w1, self.w3, self.w2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = fused_linear(x, (self.w1.weight, self.w3.weight)).chunk(2, dim=-1)  # chunk: a cheap backward
        return self.w2(self.kernels.swiglu(gate, up))  # silu(gate) * up

    @classmethod
    def external(cls, cfg: "ModelConfig", layer: int, fmt: str) -> list[External]:
        if fmt == "hf":
            return [External("w1.weight", hf_name(layer, "mlp.gate_proj.weight")),
                    External("w3.weight", hf_name(layer, "mlp.up_proj.weight")),
                    External("w2.weight", hf_name(layer, "mlp.down_proj.weight"))]
        from gguf import MODEL_TENSOR as T

        return [External("w1.weight", gguf_name(T.FFN_GATE, layer)), External("w3.weight", gguf_name(T.FFN_UP, layer)),
                External("w2.weight", gguf_name(T.FFN_DOWN, layer))]


class ReLU2(_Growable):
    KIND = "relu2"
    ROLES = {"w1.weight": MATRIX, "w2.weight": MATRIX}
    READERS = ("w1.weight",)

    def __init__(self, cfg: "ModelConfig", layer: int):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn.hidden, bias=False)
        self.w2 = nn.Linear(cfg.ffn.hidden, cfg.dim, bias=False)

    def init_weights(self, init: Init) -> None:
        init.normal_(self.w1.weight)
        init.resid_(self.w2.weight)

    def flops_per_token(self, seq_len: int) -> float:
        return matmul_flops(self.w1, self.w2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.relu(self.w1(x)).square())

    @classmethod
    def external(cls, cfg: "ModelConfig", layer: int, fmt: str) -> list[External]:
        raise Unsupported("the feed-forward part 'relu2' (--mlp relu2): "
                          + ("llama.cpp's 'llama' architecture" if fmt == "gguf" else "LlamaForCausalLM")
                          + " has only SwiGLU")


class NoFeedForward(FeedForward):
    """`--mlp none`: blocks are `x + mixer(norm(x))` only (Mamba-2's blocks: the SSM's own
    gated expansion does the feed-forward's work). No parameters, no norm, no FLOPs."""

    KIND = "none"
    PRESENT = False

    def __init__(self, cfg: "ModelConfig", layer: int):
        super().__init__()

    def init_weights(self, init: Init) -> None:
        """No parameters to initialise."""

    def flops_per_token(self, seq_len: int) -> float:
        return 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("a block without a feed-forward never calls it")

    @classmethod
    def external(cls, cfg: "ModelConfig", layer: int, fmt: str) -> list[External]:
        if fmt == "hf":
            raise Unsupported("blocks without a feed-forward (--mlp none): LlamaForCausalLM has one in every layer")
        return []
