"""The model family: one config dataclass, one preset table, one Transformer.

    from smedjan.model import ModelConfig, Transformer
    model = Transformer(ModelConfig.preset("tiny", vocab_size=8192))
"""

from smedjan.model.config import PRESETS, ModelConfig
from smedjan.model.model import KVCache, Transformer

__all__ = ["ModelConfig", "PRESETS", "Transformer", "KVCache"]
