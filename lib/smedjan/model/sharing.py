"""Block-wise weight sharing (`--shared-layers N`): consecutive groups of N layers run one
block's weights (ALBERT, Lan et al. 2019, shares all layers; MobileLLM's "immediate
block-wise repeat", Liu et al. 2024, runs each block twice in a row: N = 2 here).

Layers g*N .. g*N+N-1 are the same `Block` object in `Transformer.layers`, so:
- parameters: `named_parameters()` lists each shared tensor once, under its first layer's
  name (`layers.0.*`, `layers.N.*`, ...): the blocks' parameter count drops N times;
  the optimizer, its state in state_N.bin and the EMA hold one copy, by that name;
- gradients: autograd sums the contributions of every use into the one tensor;
- `state_dict()` still names every layer (`layers.1.*` is the same tensor as `layers.0.*`),
  so checkpoints hold each layer's tensors (written as copies: equal by construction) and
  the exporters write a plain llama.cpp / transformers model with repeated weights.
  Loading checks the copies agree (`check_copies`): a file whose copies differ was not
  written by a shared model;
- decoding: every layer keeps its own decode state (`Transformer.new_state` asks each
  layer), and FLOPs count every use.
A block takes its per-layer settings (the attention window, the mixer kind) from its first
layer, so the layers of a group must agree on them (`checks`).

    cfg = ModelConfig.make(vocab_size=256, dim=32, n_layers=4, n_heads=2, shared_layers=2)
    model = Transformer(cfg)
    assert model.layers[0] is model.layers[1] and model.layers[2] is model.layers[3]
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterator

import torch
from torch import nn

from smedjan.errors import UserError

if TYPE_CHECKING:
    from smedjan.model.config import ModelConfig


def checks(cfg: "ModelConfig") -> list[tuple[bool, str]]:
    """Config checks: N in [1, layers] divides the layers; a group's layers agree on the mixer
    and the attention window."""
    n, layers = cfg.shared_layers, cfg.n_layers
    out = [(1 <= n <= layers, f"--shared-layers {n} must be in [1, the model's {layers} layers]"),
           (n < 1 or layers % n == 0, f"--shared-layers {n} must divide the model's {layers} layers")]
    if n > 1 and layers % n == 0:
        mixers = cfg.layer_mixers()
        for first in range(0, layers, n):
            group = range(first, first + n)
            kinds = {mixers[i] for i in group}
            windows = {cfg.window(i) for i in group}
            out.append((len(kinds) == 1, f"--shared-layers {n}: layers {first}-{first + n - 1} mix "
                                         f"{' and '.join(sorted(kinds))}; a shared block runs one mixer"))
            out.append((len(windows) == 1, f"--shared-layers {n}: layers {first}-{first + n - 1} have different "
                                           f"attention windows {sorted(windows)}; a shared block has one (the last "
                                           "layer is always L)"))
    return out


def build_layers(cfg: "ModelConfig", make: Callable[[int, str], nn.Module]) -> list[nn.Module]:
    """Each layer's block: `make(layer, mixer)` for the first layer of each group, the same
    object for the rest (N = 1: one block per layer, built in the same order)."""
    n = cfg.shared_layers
    blocks: list[nn.Module] = []
    for i, mixer in enumerate(cfg.layer_mixers()):
        blocks.append(make(i, mixer) if i % n == 0 else blocks[i - i % n])
    return blocks


def first_uses(layers) -> Iterator[tuple[int, nn.Module]]:
    """(layer, block) for each distinct block, at its first layer."""
    seen: set[int] = set()
    for i, block in enumerate(layers):
        if id(block) not in seen:
            seen.add(id(block))
            yield i, block


def check_copies(state: dict[str, torch.Tensor], cfg: "ModelConfig", where: str) -> None:
    """A shared model's state names every layer: each copy must equal its group's first."""
    n = cfg.shared_layers
    if n == 1:
        return
    for name, t in state.items():
        if not name.startswith("layers."):
            continue
        _, layer, rest = name.split(".", 2)
        first = int(layer) - int(layer) % n
        src = state.get(f"layers.{first}.{rest}")
        if src is not None and src is not t and not torch.equal(src, t):
            raise UserError(f"{where}: tensor {name!r} differs from {f'layers.{first}.{rest}'!r}, which "
                            f"--shared-layers {n} shares with it (not a checkpoint of this shared model)")
