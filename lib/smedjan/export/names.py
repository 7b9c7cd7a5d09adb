"""A model's tensors under Hugging Face's or llama.cpp's names, asked of its parts.

The embedding, the final norm, the head and the block norms are the model's own; every
mixer and feed-forward names its tensors itself (`Part.external`) or raises
`Unsupported`, naming what transformers' LlamaForCausalLM or llama.cpp lacks (the
`llama`, `mamba2` and `arwkv7` names share llama.cpp's one table); exporters let that one
line reach the user. A block without a feed-forward (`--mlp none`) has no ffn norm.

    for t in external_names(cfg, "gguf"):     # in llama.cpp's tensor order
        print(t.local, "->", t.name)          # layers.0.mixer.wq.weight -> blk.0.attn_q.weight
"""

from __future__ import annotations

import dataclasses

from smedjan.model.config import ModelConfig
from smedjan.model.parts import External, Unsupported, gguf_name, hf_name
from smedjan.model.registry import FEED_FORWARDS, MIXERS

__all__ = ["external_names", "Unsupported"]

_TARGET = {"hf": "LlamaForCausalLM", "gguf": "llama.cpp"}


def _model_level(cfg: ModelConfig, fmt: str) -> None:
    if cfg.bitnet:  # llama.cpp's TQ1_0/TQ2_0 hold ternary weights, but its llama blocks do not quantise activations
        raise Unsupported(f"BitNet b1.58 (--bitnet: ternary weights, 8-bit activations): {_TARGET[fmt]}'s llama "
                          "blocks run full-precision linear layers")
    if cfg.logit_softcap:
        raise Unsupported(f"logit soft-capping (--logit-softcap {cfg.logit_softcap:g}): {_TARGET[fmt]} has none")
    if cfg.mup_base:  # folding would rescale the tied embedding too, and llama's attention scale is fixed
        raise Unsupported(f"µP (--mup-base {cfg.mup_base}: logits x base/dim, attention 1/d): {_TARGET[fmt]} has "
                          "neither multiplier")


def external_names(cfg: ModelConfig, fmt: str) -> list[External]:
    """Every tensor of `cfg`'s model, `local` = our full name, in the order a GGUF holds them
    (embedding, layer by layer, final norm, head)."""
    assert fmt in _TARGET, fmt
    _model_level(cfg, fmt)
    if fmt == "hf":
        out = [External("tok_embeddings.weight", "model.embed_tokens.weight")]
    else:
        from gguf import MODEL_TENSOR as T

        out = [External("tok_embeddings.weight", gguf_name(T.TOKEN_EMBD))]
    ffn_part = FEED_FORWARDS[cfg.ffn.kind]
    for i, mixer in enumerate(cfg.layer_mixers()):
        p = f"layers.{i}."
        if fmt == "hf":
            norms = (hf_name(i, "input_layernorm.weight"), hf_name(i, "post_attention_layernorm.weight"))
        else:
            norms = (gguf_name(T.ATTN_NORM, i), gguf_name(T.FFN_NORM, i))
        out.append(External(p + "mixer_norm.weight", norms[0]))
        out += [dataclasses.replace(e, local=p + "mixer." + e.local) for e in MIXERS[mixer].external(cfg, i, fmt)]
        ffn = ffn_part.external(cfg, i, fmt)
        if ffn_part.PRESENT:
            out.append(External(p + "ffn_norm.weight", norms[1]))
        out += [dataclasses.replace(e, local=p + "ffn." + e.local) for e in ffn]
    if fmt == "hf":
        out.append(External("norm.weight", "model.norm.weight"))
        if not cfg.tie_embeddings:
            out.append(External("output.weight", "lm_head.weight"))
    else:
        out.append(External("norm.weight", gguf_name(T.OUTPUT_NORM)))
        if not cfg.tie_embeddings:
            out.append(External("output.weight", gguf_name(T.OUTPUT)))
    return out
