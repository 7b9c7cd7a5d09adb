"""Inference: KV-cache decoding, batched generation, sampling, streaming text.

    from smedjan.infer import Engine, SamplingParams
    model, tok, _ = load_model("final.bin")
    engine = Engine(model, tok)
    for delta in engine.stream(tok.encode("To be"), SamplingParams(temperature=0.8, seed=1)):
        print(delta.text, end="")
"""

from smedjan.infer.detok import Detokenizer, StopText
from smedjan.infer.engine import Completion, Delta, Engine, Sequence, decode_tokens_per_second
from smedjan.infer.runner import Runner
from smedjan.infer.sampling import SamplingParams, sample

__all__ = ["Engine", "SamplingParams", "Sequence", "Delta", "Completion", "Runner", "Detokenizer", "StopText",
           "sample", "decode_tokens_per_second"]
