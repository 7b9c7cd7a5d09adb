"""The model family: one config dataclass, parts from two registries, one Transformer.

    from smedjan.model import ModelConfig, Transformer
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=8192))
    model, tokenizer, checkpoint = load_model("final.bin")
"""

from smedjan.model.config import PRESETS, ModelConfig
from smedjan.model.load import load_model, model_from_checkpoint
from smedjan.model.model import ModelState, Transformer
from smedjan.model.registry import FEED_FORWARDS, MIXERS

__all__ = ["ModelConfig", "PRESETS", "Transformer", "ModelState", "MIXERS", "FEED_FORWARDS", "load_model",
           "model_from_checkpoint"]
