"""Block-sparse attention: each query reads its own block plus the top-K earlier key blocks.

Keys are pooled per block of `block_size` positions (their mean); a query scores every
block that lies wholly before its own block (q . pooled_k) and attends to the K best of
them, plus, causally, its own block. Selection is per query token and per head, and it
only ever looks at complete earlier blocks, so it is causal: decoding token by token
selects exactly what the full forward selects. With K at least the number of blocks it
is dense causal attention (tested). The selection is a boolean mask over the dense
scores (the `attention` part's SDPA path): correct everywhere, not yet faster than
dense; the training FLOPs count the dense work that actually runs.

    cfg = ModelConfig.make(vocab_size=97, dim=64, n_layers=2, n_heads=4, block_sparse_top_k=2, block_size=16)
    y = BlockSparseAttention(cfg, layer=0)(x, ctx, layer=0)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from smedjan.errors import UserError
from smedjan.model.attention import Attention
from smedjan.model.parts import Context

if TYPE_CHECKING:
    from smedjan.model.config import ModelConfig


@dataclass
class BlockSparseConfig:
    top_k: int = 0  # earlier key blocks each query attends to (0: block-sparse off)
    block_size: int = 64

    def validate(self, max_seq_len: int) -> list[tuple[bool, str]]:
        if not self.top_k:
            return []
        return [(self.top_k >= 1, f"--block-sparse-top-k {self.top_k} must be >= 1"),
                (1 <= self.block_size <= max_seq_len,
                 f"--block-size {self.block_size} must be in [1, context {max_seq_len}]")]


def block_select_mask(q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, block: int, top_k: int) -> torch.Tensor:
    """Which keys each query may read, [B, H, T, S]: keys in its own block, and in the
    `top_k` earlier blocks whose mean key scores highest against it. q: [B, H, T, d]
    (rotated), k: [B, Hkv, S, d], q_pos: [T] or [B, T] query positions."""
    B, H, T, d = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    nb = -(-S // block)
    pad = nb * block - S
    wide = torch.promote_types(q.dtype, torch.float32)  # scores in at least float32
    kf = torch.nn.functional.pad(k.to(wide), (0, 0, 0, pad)).view(B, Hkv, nb, block, d)
    counts = torch.full((nb,), float(block), device=k.device, dtype=wide)
    counts[-1] = block - pad
    pooled = kf.sum(3) / counts[:, None]  # [B, Hkv, nb, d]
    pooled = pooled.repeat_interleave(H // Hkv, dim=1)  # [B, H, nb, d]
    scores = q.to(wide) @ pooled.transpose(-1, -2)  # [B, H, T, nb]
    q_block = (q_pos // block)[..., None]  # [T, 1] or [B, T, 1]
    blocks = torch.arange(nb, device=q.device)
    earlier = blocks < q_block  # [T, nb] or [B, T, nb]
    if earlier.dim() == 3:
        earlier = earlier[:, None]  # [B, 1, T, nb]
    scores = scores.masked_fill(~earlier, float("-inf"))
    chosen = torch.zeros_like(scores, dtype=torch.bool)
    chosen.scatter_(-1, scores.topk(min(top_k, nb), dim=-1).indices, True)
    own = blocks == q_block
    allowed = (chosen & earlier) | (own[:, None] if own.dim() == 3 else own)  # [B, H, T, nb]
    key_block = torch.arange(S, device=q.device) // block
    return allowed[..., key_block]


class BlockSparseAttention(Attention):
    KIND = "block_sparse"

    def __init__(self, cfg: "ModelConfig", layer: int):
        super().__init__(cfg, layer)
        self.top_k, self.block = cfg.block_sparse.top_k, cfg.block_sparse.block_size

    @classmethod
    def check_growable(cls, src: "ModelConfig", dst: "ModelConfig") -> None:
        super().check_growable(src, dst)  # new heads select their own blocks; old heads' choices stay
        if src.block_sparse != dst.block_sparse:
            raise UserError("block-sparse settings cannot change when growing")

    def flops_per_token(self, seq_len: int) -> float:
        # dense attention (what runs) + the block scores: 2 x heads x head_dim x blocks, x3
        return super().flops_per_token(seq_len) + 6.0 * self.n_heads * self.head_dim * -(-seq_len // self.block)

    def extra_mask(self, q: torch.Tensor, k: torch.Tensor, ctx: Context) -> torch.Tensor:
        return block_select_mask(q, k, ctx.positions(), self.block, self.top_k)
