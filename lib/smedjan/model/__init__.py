"""The model family: one config dataclass, one preset table, one Transformer.

    from smedjan.model import ModelConfig, Transformer
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=8192))
    model, tokenizer, checkpoint = load_model("final.bin")
"""

from smedjan.model.config import PRESETS, ModelConfig
from smedjan.model.load import load_model, model_from_checkpoint
from smedjan.model.model import KVCache, Transformer

__all__ = ["ModelConfig", "PRESETS", "Transformer", "KVCache", "load_model", "model_from_checkpoint"]
