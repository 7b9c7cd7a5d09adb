"""Writing a Hugging Face Llama folder, and importing one as a smedjan checkpoint.

`export_hf(src, dir)` writes config.json, model.safetensors, tokenizer.json,
tokenizer_config.json (with the chat template) and generation_config.json that
transformers' Auto classes load; both sides use the half-split RoPE convention, so
weights are renamed (the parts give the names), never permuted.

    export_hf(load_source("final.bin"), "hf-out/")  # transformers.AutoModelForCausalLM loads hf-out/
    summary, warnings = import_hf("tiny-random-llama", "imported.bin")
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from smedjan.errors import UserError
from smedjan.export.hf_config import DTYPE_NAMES, config_to_hf, generation_config
from smedjan.export.names import Unsupported, external_names
from smedjan.export.source import ModelSource
from smedjan.formats import constants as C
from smedjan.formats.safetensors import safetensors_size, write_safetensors
from smedjan.io import atomic_dir
from smedjan.tokenizer.specials import special_ids


def export_hf(src: ModelSource, out_dir: str | os.PathLike) -> dict:
    """Write `src` as an HF LlamaForCausalLM folder (MixtralForCausalLM with experts); returns a summary."""
    from smedjan.chat import CHAT_TEMPLATE
    from smedjan.tokenizer.hf import to_hf_tokenizer_json

    cfg, tok = src.config, src.tokenizer
    if tok is None:
        raise UserError(f"{src.path}: has no tokenizer ({src.tokenizer_note or 'none embedded'}); pass --tokenizer")
    dtypes = {t.dtype for t in src.tensors.values()}
    # one dtype throughout (bf16 stays bf16, bit for bit); a mix is widened to float32, exactly
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    try:
        config = config_to_hf(cfg, tok, dtype)
    except Unsupported as e:
        raise UserError(f"{src.path}: not exportable as a Hugging Face folder: {e}") from None
    # one tensor each, or (MoE experts) a slice each of a stacked one: `convert`
    tensors = {e.name: (e.convert(src.tensors[e.local]) if e.convert else src.tensors[e.local]).to(dtype).contiguous()
               for e in external_names(cfg, "hf")}
    assert len(tensors) >= len(src.tensors), "a tensor without an HF name"
    ids = special_ids(tok)
    inv = {i: s for s, i in tok.specials.items()}
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": inv.get(ids.get("bos")),
        "eos_token": inv.get(ids.get("eos")),
        "pad_token": inv.get(ids.get("pad")),
        "add_bos_token": False,  # our text encoding has no implicit BOS; the chat template emits it
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": cfg.max_seq_len,
    }
    if tok.has_chat_tokens:
        tok_config["chat_template"] = CHAT_TEMPLATE
    gen = generation_config(tok)
    files = {
        "config.json": config,
        "generation_config.json": gen,
        "tokenizer.json": to_hf_tokenizer_json(tok),
        "tokenizer_config.json": tok_config,
    }
    md = {"format": "pt"}
    texts = {name: json.dumps(obj, indent=2, ensure_ascii=False) + "\n" for name, obj in files.items()}
    size = safetensors_size(tensors, md)
    with atomic_dir(out_dir, expected_size=size + sum(len(t.encode()) for t in texts.values()),
                    required_size=size) as tmp:
        with open(tmp / "model.safetensors", "wb") as f:
            write_safetensors(f, tensors, md)
        for name, text in texts.items():
            (tmp / name).write_text(text, encoding="utf-8")
    return {"output": str(out_dir), "architecture": config["architectures"][0], "dtype": DTYPE_NAMES[dtype],
            "tensors": len(tensors), "parameters": sum(t.numel() for t in tensors.values()),
            "vocab_size": cfg.vocab_size, "tokenizer_fingerprint": tok.fingerprint,
            "chat_template": tok.has_chat_tokens}


def import_hf(model_dir: str | os.PathLike, output: str | os.PathLike, tokenizer=None) -> tuple[dict, list[str]]:
    """HF folder -> smedjan `model` checkpoint (weights in their dtype); (summary, warnings)."""
    from smedjan.export.load import load_source
    from smedjan.formats.checkpoint import save_checkpoint
    from smedjan.io import check_output_path

    d = Path(model_dir)
    if not d.is_dir():
        raise UserError(f"{d}: not a folder (expected a Hugging Face model folder with config.json)")
    check_output_path(output)
    src = load_source(d, tokenizer)
    save_checkpoint(output, src.tensors, kind=C.KIND_MODEL, config=src.config, tokenizer=src.tokenizer,
                    meta={"source": "import-hf", "hf_config": src.meta["hf_config"]})
    dtypes = sorted({DTYPE_NAMES[t.dtype] for t in src.tensors.values()})
    cfg = src.config
    summary = {"output": str(output), "architecture": cfg.extra["hf_architecture"],
               "parameters": sum(t.numel() for t in src.tensors.values()), "dtype": ",".join(dtypes),
               "vocab_size": cfg.vocab_size, "dim": cfg.dim, "layers": cfg.n_layers,
               "heads": cfg.attention.n_heads, "kv_heads": cfg.attention.n_kv_heads,
               "head_dim": cfg.attention.head_dim, "tied": cfg.tie_embeddings, "rope_scaling": cfg.rope.active,
               "tokenizer": src.tokenizer.fingerprint if src.tokenizer is not None else None}
    warnings = list(src.warnings)
    if src.tokenizer is None:
        warnings.append(f"checkpoint written without a tokenizer ({src.tokenizer_note}); generation and export "
                        "will need --tokenizer")
    return summary, warnings


