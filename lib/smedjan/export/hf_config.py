"""Hugging Face Llama config.json <-> ModelConfig.

HF `rope_scaling` maps as: default -> none, linear -> linear, yarn -> yarn, llama3 ->
llama3, dynamic -> none (dynamic NTK leaves frequencies untouched up to
max_position_embeddings, so logits agree there; the stretch beyond is not reproduced,
with a warning). Our static "ntk" goes out as plain RoPE with the stretched base in
rope_theta, which is the same thing. A model with a part transformers' Llama lacks is
refused with one line naming the part (the parts say so: `smedjan.export.names`).

    cfg, warnings = config_from_hf(json.load(open("config.json")), "tiny-random-llama")
    raw = config_to_hf(cfg, tok, torch.bfloat16)
"""

from __future__ import annotations

import math

import torch

from smedjan.errors import UserError
from smedjan.export.names import Unsupported, external_names
from smedjan.model.config import ModelConfig
from smedjan.tokenizer.specials import end_ids, special_ids

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _get(raw: dict, key: str, kind: type, where: str, default=None, required: bool = False):
    """config.json value `key` of type `kind` (int or float); names the key when wrong."""
    if key not in raw or raw[key] is None:
        if required:
            raise UserError(f"{where}: config.json lacks {key!r}")
        return default
    v = raw[key]
    ok = isinstance(v, int) if kind is int else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok:
        raise UserError(f"{where}: config.json {key!r} is {v!r}, expected {'an integer' if kind is int else 'a number'}")
    return kind(v)


def _rope_from_hf(raw: dict, where: str, max_pos: int) -> tuple[float, dict, list[str]]:
    """(rope_theta, ModelConfig rope fields, warnings) from `rope_parameters` (transformers 5)
    or `rope_theta` + `rope_scaling` (transformers 4)."""
    rp = raw.get("rope_parameters")
    key = "rope_parameters"
    if not rp:
        rp, key = raw.get("rope_scaling"), "rope_scaling"
    if rp is not None and not isinstance(rp, dict):
        raise UserError(f"{where}: config.json {key!r} must be an object or null")
    rp = dict(rp or {})
    theta = _get(rp, "rope_theta", float, where) or _get(raw, "rope_theta", float, where, 10000.0)
    kind = rp.get("rope_type", rp.get("type", "default"))
    if _get(rp, "partial_rotary_factor", float, where, 1.0) != 1.0 or \
            _get(raw, "partial_rotary_factor", float, where, 1.0) != 1.0:
        raise UserError(f"{where}: config.json 'partial_rotary_factor' != 1 is not supported")
    warnings: list[str] = []
    if kind == "default":
        return theta, {}, warnings
    factor = _get(rp, "factor", float, where, required=True)
    if kind == "dynamic":
        warnings.append(f"{where}: dynamic NTK RoPE scaling equals plain RoPE up to max_position_embeddings "
                        f"({max_pos}); imported as plain RoPE, without the stretch beyond it")
        return theta, {}, warnings
    if kind == "linear":
        return theta, {"rope_scaling": "linear", "rope_factor": factor}, warnings
    original = _get(rp, "original_max_position_embeddings", int, where) or \
        _get(raw, "original_max_position_embeddings", int, where, max_pos)
    if kind == "yarn":
        for k in ("mscale", "mscale_all_dim"):
            if rp.get(k) not in (None, 0, 1, 1.0):
                raise UserError(f"{where}: config.json {key}.{k} is not supported (only YaRN's default attention factor)")
        af = rp.get("attention_factor")
        if af is not None and not math.isclose(float(af), 0.1 * math.log(factor) + 1.0, rel_tol=1e-6):
            raise UserError(f"{where}: config.json {key}.attention_factor {af} differs from YaRN's default; unsupported")
        if rp.get("truncate", True) is not True:
            raise UserError(f"{where}: config.json {key}.truncate=false is not supported")
        return theta, {"rope_scaling": "yarn", "rope_factor": factor, "rope_original_max_seq_len": original,
                       "yarn_beta_fast": _get(rp, "beta_fast", float, where, 32.0),
                       "yarn_beta_slow": _get(rp, "beta_slow", float, where, 1.0)}, warnings
    if kind == "llama3":
        return theta, {"rope_scaling": "llama3", "rope_factor": factor, "rope_original_max_seq_len": original,
                       "rope_low_freq_factor": _get(rp, "low_freq_factor", float, where, required=True),
                       "rope_high_freq_factor": _get(rp, "high_freq_factor", float, where, required=True)}, warnings
    raise UserError(f"{where}: config.json {key}.rope_type {kind!r} is not supported "
                    "(default, linear, dynamic, yarn, llama3)")


def config_from_hf(raw: dict, where: str) -> tuple[ModelConfig, list[str]]:
    """ModelConfig (and warnings) for an HF LlamaForCausalLM-like config.json."""
    if not isinstance(raw, dict):
        raise UserError(f"{where}: config.json is not a JSON object")
    archs = raw.get("architectures")
    if not archs:
        raise UserError(f"{where}: config.json lacks 'architectures' (supported: {', '.join(ARCHITECTURES)})")
    if not isinstance(archs, list) or len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise UserError(f"{where}: config.json 'architectures' {archs!r} is not supported "
                        f"(supported: {', '.join(ARCHITECTURES)})")
    if raw.get("quantization_config"):
        raise UserError(f"{where}: config.json 'quantization_config': quantized HF checkpoints are not supported")
    if raw.get("hidden_act", "silu") != "silu":
        raise UserError(f"{where}: config.json 'hidden_act' {raw['hidden_act']!r} is not supported (silu only)")
    for k in ("attention_bias", "mlp_bias"):
        if raw.get(k):
            raise UserError(f"{where}: config.json {k!r} is true; smedjan's model has no biases")
    dim = _get(raw, "hidden_size", int, where, required=True)
    n_heads = _get(raw, "num_attention_heads", int, where, required=True)
    max_pos = _get(raw, "max_position_embeddings", int, where, 2048)
    theta, rope, warnings = _rope_from_hf(raw, where, max_pos)
    window = _get(raw, "sliding_window", int, where, 0) if raw.get("use_sliding_window", True) else 0
    if window >= max_pos:
        window = 0  # a window as long as the context masks nothing
    try:
        cfg = ModelConfig.make(
            vocab_size=_get(raw, "vocab_size", int, where, required=True),
            dim=dim,
            n_layers=_get(raw, "num_hidden_layers", int, where, required=True),
            n_heads=n_heads,
            n_kv_heads=_get(raw, "num_key_value_heads", int, where, n_heads),
            head_dim=_get(raw, "head_dim", int, where, 0),
            ffn_hidden=_get(raw, "intermediate_size", int, where, required=True),
            max_seq_len=max_pos,
            rope_theta=theta,
            norm_eps=_get(raw, "rms_norm_eps", float, where, 1e-6),
            tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
            sliding_window=window,
            preset="custom",
            extra={"hf_architecture": archs[0]},
            **rope,
        )
    except UserError as e:
        raise UserError(f"{where}: config.json: {e}") from None
    return cfg, warnings


def config_to_hf(cfg: ModelConfig, tok, dtype: torch.dtype) -> dict:
    """config.json for LlamaForCausalLM (transformers 4 keys, which transformers 5 also reads).
    Unsupported (one line naming the part) for a model transformers' Llama cannot express."""
    external_names(cfg, "hf")  # the parts refuse what Llama lacks
    windows = [(i, cfg.window(i)) for i in range(cfg.n_layers) if cfg.window(i)]
    if windows:
        i, w = windows[0]
        raise Unsupported(f"attention with a {w}-token sliding window (layer {i}): LlamaForCausalLM has no "
                          "sliding-window attention")
    a, r = cfg.attention, cfg.rope
    kind = r.active
    theta, scaling = r.theta, None
    if kind == "ntk":
        # static NTK-aware scaling is plain RoPE with a stretched base (see rope_frequencies)
        theta = r.theta * r.factor ** (a.head_dim / (a.head_dim - 2))
    elif kind == "linear":
        scaling = {"rope_type": "linear", "factor": r.factor}
    elif kind == "yarn":
        scaling = {"rope_type": "yarn", "factor": r.factor, "beta_fast": r.beta_fast, "beta_slow": r.beta_slow,
                   "original_max_position_embeddings": r.original_max_seq_len or cfg.max_seq_len}
    elif kind == "llama3":
        scaling = {"rope_type": "llama3", "factor": r.factor, "low_freq_factor": r.low_freq_factor,
                   "high_freq_factor": r.high_freq_factor,
                   "original_max_position_embeddings": r.original_max_seq_len or 8192}
    ids = special_ids(tok) if tok is not None else {}
    if cfg.moe.enabled:  # Mixtral: Llama with experts routed as ours (softmax, top-k, renormalised)
        return {**_llama_keys(cfg, ids, theta, scaling, dtype), "architectures": ["MixtralForCausalLM"],
                "model_type": "mixtral", "num_local_experts": cfg.moe.n_experts,
                "num_experts_per_tok": cfg.moe.top_k, "router_aux_loss_coef": cfg.moe.aux_loss,
                "output_router_logits": False, "sliding_window": None}
    return _llama_keys(cfg, ids, theta, scaling, dtype)


def _llama_keys(cfg: ModelConfig, ids: dict, theta: float, scaling: dict | None, dtype: torch.dtype) -> dict:
    a = cfg.attention
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn.hidden,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": a.n_heads,
        "num_key_value_heads": a.n_kv_heads,
        "head_dim": a.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": theta,
        "rope_scaling": scaling,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "bos_token_id": ids.get("bos"),
        "eos_token_id": ids.get("eos"),
        "pad_token_id": ids.get("pad"),
        "torch_dtype": DTYPE_NAMES[dtype],
        "use_cache": True,
    }


def generation_config(tok) -> dict:
    """generation_config.json: generation stops at every smedjan end token (a list of eos ids)."""
    ids = special_ids(tok)
    ends = sorted(end_ids(tok))
    gen = {"bos_token_id": ids.get("bos"), "eos_token_id": ends if len(ends) > 1 else ids.get("eos"),
           "pad_token_id": ids.get("pad")}
    return {k: v for k, v in gen.items() if v is not None}
