"""The two part registries: mixers and feed-forwards by name.

A new mixer is one file (its config dataclass and its `Mixer` subclass) plus one line
here; `ModelConfig` gets a field for its config. Nothing else in the library names parts.

    MIXERS["attention"](cfg, layer=0)     # -> Attention
    FEED_FORWARDS[cfg.ffn.kind](cfg, 0)   # -> SwiGLU, ReLU2, RWKVChannelMix or NoFeedForward
"""

from __future__ import annotations

from smedjan.model.attention import Attention
from smedjan.model.block_sparse import BlockSparseAttention
from smedjan.model.ffn import NoFeedForward, ReLU2, SwiGLU
from smedjan.model.linear_attention import LinearAttention
from smedjan.model.mamba2 import Mamba2
from smedjan.model.mla import MLA
from smedjan.model.moe import MoE
from smedjan.model.parts import FeedForward, Mixer
from smedjan.model.rwkv7 import RWKV7, RWKVChannelMix

MIXERS: dict[str, type[Mixer]] = {
    "attention": Attention,
    "mla": MLA,
    "block_sparse": BlockSparseAttention,
    "ssm": Mamba2,
    "linear_attn": LinearAttention,
    "rwkv": RWKV7,
}

FEED_FORWARDS: dict[str, type[FeedForward]] = {
    "swiglu": SwiGLU,
    "relu2": ReLU2,
    "rwkv": RWKVChannelMix,
    "none": NoFeedForward,
    "moe": MoE,
}
