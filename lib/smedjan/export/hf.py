"""Hugging Face Llama folders in and out: config.json <-> ModelConfig, tensor names, safetensors.

- `read_hf_dir(dir)`: config.json + model.safetensors (or shards listed in
  model.safetensors.index.json), F32/BF16/F16, LlamaForCausalLM or MistralForCausalLM,
  mapped onto smedjan's names; tensors keep their dtype, so bf16 stays bit-exact.
  A `tokenizer.json` (byte-level BPE) beside it is imported when it is one we encode exactly.
- `export_hf(src, dir)`: config.json, model.safetensors, tokenizer.json, tokenizer_config.json
  (with the chat template), generation_config.json that transformers' Auto classes load.

RoPE: both sides use the half-split convention, so weights are renamed, never permuted.
HF `rope_scaling` maps as: default -> none, linear -> linear, yarn -> yarn, llama3 -> llama3,
dynamic -> none (dynamic NTK leaves frequencies untouched up to max_position_embeddings,
so logits agree there; the stretch beyond is not reproduced, with a warning). Our static
"ntk" goes out as plain RoPE with the stretched base in rope_theta, which is the same thing.

    src = read_hf_dir("tiny-random-llama")          # -> ModelSource (config, tensors, tokenizer)
    export_hf(load_source("final.bin"), "hf-out/")  # transformers.AutoModelForCausalLM loads hf-out/
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from smedjan.errors import UserError
from smedjan.export.source import ALLOWED_DTYPES, ModelSource, check_tensors
from smedjan.formats import constants as C
from smedjan.formats.safetensors import safetensors_size, write_safetensors
from smedjan.io import atomic_dir
from smedjan.model.config import ModelConfig

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


# --------------------------------------------------------------------------- config
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
        cfg = ModelConfig(
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
    """config.json for LlamaForCausalLM (transformers 4 keys, which transformers 5 also reads)."""
    if cfg.sliding_window:
        raise UserError(f"sliding_window={cfg.sliding_window}: LlamaForCausalLM has no sliding window; not exportable")
    kind = cfg.rope_scaling if cfg.rope_factor > 1.0 else "none"
    theta, scaling = cfg.rope_theta, None
    if kind == "ntk":
        # static NTK-aware scaling is plain RoPE with a stretched base (see rope_frequencies)
        theta = cfg.rope_theta * cfg.rope_factor ** (cfg.head_dim / (cfg.head_dim - 2))
    elif kind == "linear":
        scaling = {"rope_type": "linear", "factor": cfg.rope_factor}
    elif kind == "yarn":
        scaling = {"rope_type": "yarn", "factor": cfg.rope_factor, "beta_fast": cfg.yarn_beta_fast,
                   "beta_slow": cfg.yarn_beta_slow,
                   "original_max_position_embeddings": cfg.rope_original_max_seq_len or cfg.max_seq_len}
    elif kind == "llama3":
        scaling = {"rope_type": "llama3", "factor": cfg.rope_factor, "low_freq_factor": cfg.rope_low_freq_factor,
                   "high_freq_factor": cfg.rope_high_freq_factor,
                   "original_max_position_embeddings": cfg.rope_original_max_seq_len or 8192}
    ids = special_ids(tok) if tok is not None else {}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
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
        "torch_dtype": _DTYPE_NAMES[dtype],
        "use_cache": True,
    }


def special_ids(tok) -> dict[str, int]:
    """bos/eos/pad ids for configs and GGUF: <|bos|> starts every document and conversation;
    <|assistant_end|> ends a reply, the natural stop of a chat model. A tokenizer without
    them (GPT-2 imported with --no-chat-specials) uses <|endoftext|> for both."""
    sp = tok.specials
    out = {}
    if C.BOS in sp:
        out["bos"] = sp[C.BOS]
    elif "<|endoftext|>" in sp:
        out["bos"] = sp["<|endoftext|>"]
    if C.ASSISTANT_END in sp:
        out["eos"] = sp[C.ASSISTANT_END]
    elif "<|endoftext|>" in sp:
        out["eos"] = sp["<|endoftext|>"]
    if C.PAD in sp:
        out["pad"] = sp[C.PAD]
    return out


# --------------------------------------------------------------------------- names
def hf_names(cfg: ModelConfig) -> dict[str, str]:
    """HF tensor name -> smedjan tensor name (both [out_features, in_features])."""
    m = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight"}
    for i in range(cfg.n_layers):
        h, s = f"model.layers.{i}.", f"layers.{i}."
        m.update({
            h + "input_layernorm.weight": s + "attention_norm.weight",
            h + "self_attn.q_proj.weight": s + "attention.wq.weight",
            h + "self_attn.k_proj.weight": s + "attention.wk.weight",
            h + "self_attn.v_proj.weight": s + "attention.wv.weight",
            h + "self_attn.o_proj.weight": s + "attention.wo.weight",
            h + "post_attention_layernorm.weight": s + "ffn_norm.weight",
            h + "mlp.gate_proj.weight": s + "feed_forward.w1.weight",
            h + "mlp.up_proj.weight": s + "feed_forward.w3.weight",
            h + "mlp.down_proj.weight": s + "feed_forward.w2.weight",
        })
    if not cfg.tie_embeddings:
        m["lm_head.weight"] = "output.weight"
    return m


# --------------------------------------------------------------------------- reading
def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: malformed {what} ({e.__class__.__name__}: {e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: {what} is not a JSON object")
    return data


def _weight_files(d: Path) -> list[Path]:
    index = d / "model.safetensors.index.json"
    if index.is_file():
        wm = _read_json(index, "safetensors index").get("weight_map")
        if not isinstance(wm, dict) or not wm:
            raise UserError(f"{index}: lacks a 'weight_map' object")
        files = []
        for key, name in wm.items():
            # A shard is a file of this folder, named relative to it: an absolute name or
            # one that climbs out with '..' is refused before anything is opened. Checked
            # on the name, not the resolved path, so that shards which are symlinks into a
            # cache (the Hugging Face hub's snapshots/ -> blobs/) still load.
            parts = Path(name).parts if isinstance(name, str) and "\0" not in name else ()
            if not parts or Path(name).is_absolute() or ".." in parts:
                raise UserError(f"{index}: shard {name!r} of tensor {key!r} is not a file name inside {d} "
                                "(a shard must lie in the model folder)")
        for name in dict.fromkeys(wm.values()):
            f = d / name
            if not f.is_file():
                raise UserError(f"{index}: shard {name!r} (holding e.g. {next(k for k, v in wm.items() if v == name)!r}) "
                                "does not exist")
            files.append(f)
        return files
    single = d / "model.safetensors"
    if single.is_file():
        return [single]
    if any(d.glob("pytorch_model*.bin")) or any(d.glob("*.pt")):
        raise UserError(f"{d}: holds only PyTorch pickle weights; smedjan reads safetensors only (no pickle)")
    raise UserError(f"{d}: no model.safetensors or model.safetensors.index.json")


def read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    """All tensors of the (sharded) files, in their stored dtype; names any bad one."""
    from safetensors import SafetensorError, safe_open

    out: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    dt = st.get_slice(name).get_dtype()
                    if dt not in SAFETENSORS_DTYPES:
                        raise UserError(f"{f}: tensor {name!r} has dtype {dt}; supported: "
                                        f"{', '.join(SAFETENSORS_DTYPES)}")
                    if name in out:
                        raise UserError(f"{f}: tensor {name!r} also appears in another shard")
                    out[name] = st.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            if isinstance(e, UserError):
                raise
            raise UserError(f"{f}: corrupt or truncated safetensors file ({str(e).splitlines()[0]})") from None
    return out


def read_hf_dir(d: str | os.PathLike, tokenizer=None) -> ModelSource:
    """An HF Llama folder as a ModelSource with smedjan tensor names."""
    d = Path(d)
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"{d}: no config.json (not a Hugging Face model folder)")
    raw = _read_json(cfg_path, "config.json")
    cfg, warnings = config_from_hf(raw, str(d))
    hf = read_safetensors(_weight_files(d))
    for name in [n for n in hf if n.endswith("rotary_emb.inv_freq")]:
        del hf[name]  # a buffer old transformers saved; recomputed from the config
    names = hf_names(cfg)
    if cfg.tie_embeddings and "lm_head.weight" in hf:
        # some tied checkpoints store the head anyway; fine when it is the embedding
        if not torch.equal(hf["lm_head.weight"], hf.get("model.embed_tokens.weight", torch.empty(0))):
            raise UserError(f"{d}: tensor 'lm_head.weight' differs from the embedding although "
                            "tie_word_embeddings is true")
        del hf["lm_head.weight"]
    extra = sorted(set(hf) - set(names))
    if extra:
        raise UserError(f"{d}: unexpected tensor {extra[0]!r} for a {raw['architectures'][0]} with this config")
    missing = sorted(set(names) - set(hf))
    if missing:
        raise UserError(f"{d}: missing tensor {missing[0]!r}")
    tensors = {names[k]: v for k, v in hf.items()}
    back = {v: k for k, v in names.items()}
    check_tensors(cfg, tensors, str(d), display=back)
    tok, note = tokenizer, None
    if tok is None:
        tj = d / "tokenizer.json"
        if tj.is_file():
            try:
                tok = tokenizer_from_hf_json(tj)
            except UserError as e:
                note = str(e)
                warnings.append(f"{tj}: not imported: {e}")
        else:
            note = f"{d} has no tokenizer.json"
    name = str(raw.get("_name_or_path") or d.name).rstrip("/").split("/")[-1]
    return ModelSource(path=d, config=cfg, tensors=tensors, tokenizer=tok, name=name, kind="hf",
                       meta={"hf_config": raw}, warnings=warnings, tokenizer_note=note)


# --------------------------------------------------------------------------- tokenizer.json
def tokenizer_from_hf_json(path: str | os.PathLike):
    """A smedjan Tokenizer from a byte-level BPE tokenizer.json whose pre-tokenizer is the
    GPT-2 split or one of our split regexes (what `to_hf_tokenizer_json` writes). Every
    part is type-checked before use: anything else is a UserError (a one-line reason)."""
    from smedjan.tokenizer import Tokenizer
    from smedjan.tokenizer.bytelevel import str_to_token

    def table(x, what: str) -> dict:
        if x is None:
            return {}
        if not isinstance(x, dict):
            raise UserError(f"{what} is {type(x).__name__}, expected an object")
        return x

    def index(i) -> bool:
        return isinstance(i, int) and not isinstance(i, bool)

    p = Path(path)
    data = _read_json(p, "tokenizer.json")
    model = table(data.get("model"), "model")
    if model.get("type") != "BPE":
        raise UserError(f"model.type {model.get('type')!r} is not a byte-level BPE")
    if model.get("byte_fallback") or data.get("normalizer"):
        raise UserError("byte_fallback or a normalizer (SentencePiece-style BPE) is not supported")
    pt = table(data.get("pre_tokenizer"), "pre_tokenizer")
    pattern = None
    steps = pt.get("pretokenizers")
    if pt.get("type") == "ByteLevel" and pt.get("use_regex", True) and not pt.get("add_prefix_space"):
        pattern = "gpt2"  # HF's ByteLevel regex is GPT-2's split
    elif (pt.get("type") == "Sequence" and isinstance(steps, list) and len(steps) == 2
          and all(isinstance(x, dict) for x in steps)):
        split, bl = steps
        regex = table(split.get("pattern"), "pre_tokenizer pattern").get("Regex")
        names = {v: k for k, v in C.PRETOKENIZER_PATTERNS.items()}
        if (split.get("type") == "Split" and isinstance(regex, str) and regex in names
                and split.get("behavior") == "Isolated" and not split.get("invert")
                and bl.get("type") == "ByteLevel" and not bl.get("use_regex", True)):
            pattern = names[regex]
    if pattern is None:
        raise UserError("pre_tokenizer is neither the GPT-2 nor the Llama-3 split")
    vocab, merges = model.get("vocab"), model.get("merges")
    if not isinstance(vocab, dict) or not isinstance(merges, list) or not all(index(i) for i in vocab.values()):
        raise UserError("model.vocab / model.merges are missing or malformed")
    added_list = data.get("added_tokens") or []
    if not isinstance(added_list, list) or not all(
            isinstance(t, dict) and isinstance(t.get("content"), str) and index(t.get("id")) for t in added_list):
        raise UserError("added_tokens is not a list of {content, id}")
    added = {t["content"]: t["id"] for t in added_list}
    both = {**vocab, **added}
    n = len(both)
    # ids exactly 0..n-1: checked without building anything of the size an id claims
    if len(set(both.values())) != n or not all(0 <= i < n for i in both.values()):
        raise UserError(f"token ids are not exactly 0..{n - 1}")
    tokens: list[bytes] = [b""] * n
    for s, i in both.items():
        if s in added:
            try:
                tokens[i] = s.encode()
            except UnicodeEncodeError:  # a lone surrogate
                raise UserError(f"added token {s!r} is not valid Unicode") from None
            continue
        try:
            tokens[i] = str_to_token(s)
        except KeyError:
            raise UserError(f"token {s!r} is not in byte-level form") from None
    pairs = []
    for m in merges:
        parts = m.split(" ", 1) if isinstance(m, str) else m
        if not (isinstance(parts, list) and len(parts) == 2 and all(isinstance(x, str) for x in parts)):
            raise UserError(f"merge {m!r} is not two tokens")
        a, b = parts
        if a not in vocab or b not in vocab:
            raise UserError(f"merge {m!r} names a token missing from the vocabulary")
        pairs.append((vocab[a], vocab[b]))
    return Tokenizer(tokens, pairs, added, pattern=pattern, source=f"hf:{p.name}")


# --------------------------------------------------------------------------- writing
def export_hf(src: ModelSource, out_dir: str | os.PathLike) -> dict:
    """Write `src` as an HF LlamaForCausalLM folder; returns a summary."""
    from smedjan.chat import CHAT_TEMPLATE
    from smedjan.tokenizer.hf import to_hf_tokenizer_json

    cfg, tok = src.config, src.tokenizer
    if tok is None:
        raise UserError(f"{src.path}: has no tokenizer ({src.tokenizer_note or 'none embedded'}); pass --tokenizer")
    dtypes = {t.dtype for t in src.tensors.values()}
    # one dtype throughout (bf16 stays bf16, bit for bit); a mix is widened to float32, exactly
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    config = config_to_hf(cfg, tok, dtype)
    back = {v: k for k, v in hf_names(cfg).items()}
    tensors = {back[k]: v.to(dtype).contiguous() for k, v in src.tensors.items()}
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
    gen = {k: v for k, v in {"bos_token_id": ids.get("bos"), "eos_token_id": ids.get("eos"),
                              "pad_token_id": ids.get("pad")}.items() if v is not None}
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
    return {"output": str(out_dir), "architecture": "LlamaForCausalLM", "dtype": _DTYPE_NAMES[dtype],
            "tensors": len(tensors), "parameters": sum(t.numel() for t in tensors.values()),
            "vocab_size": cfg.vocab_size, "tokenizer_fingerprint": tok.fingerprint,
            "chat_template": tok.has_chat_tokens}


def import_hf(model_dir: str | os.PathLike, output: str | os.PathLike, tokenizer=None) -> tuple[dict, list[str]]:
    """HF folder -> smedjan `model` checkpoint (weights in their dtype); (summary, warnings)."""
    from smedjan.export.source import load_source
    from smedjan.formats.checkpoint import save_checkpoint
    from smedjan.io import check_output_path

    d = Path(model_dir)
    if not d.is_dir():
        raise UserError(f"{d}: not a folder (expected a Hugging Face model folder with config.json)")
    check_output_path(output)
    src = load_source(d, tokenizer)
    save_checkpoint(output, src.tensors, kind=C.KIND_MODEL, config=src.config, tokenizer=src.tokenizer,
                    meta={"source": "import-hf", "hf_config": src.meta["hf_config"]})
    dtypes = sorted({_DTYPE_NAMES[t.dtype] for t in src.tensors.values()})
    cfg = src.config
    summary = {"output": str(output), "architecture": cfg.extra["hf_architecture"],
               "parameters": sum(t.numel() for t in src.tensors.values()), "dtype": ",".join(dtypes),
               "vocab_size": cfg.vocab_size, "dim": cfg.dim, "layers": cfg.n_layers, "heads": cfg.n_heads,
               "kv_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "tied": cfg.tie_embeddings,
               "rope_scaling": cfg.rope_scaling if cfg.rope_factor > 1 else "none",
               "tokenizer": src.tokenizer.fingerprint if src.tokenizer is not None else None}
    warnings = list(src.warnings)
    if src.tokenizer is None:
        warnings.append(f"checkpoint written without a tokenizer ({src.tokenizer_note}); generation and export "
                        "will need --tokenizer")
    return summary, warnings


__all__ = ["ARCHITECTURES", "config_from_hf", "config_to_hf", "hf_names", "read_hf_dir", "read_safetensors",
           "tokenizer_from_hf_json", "export_hf", "import_hf", "special_ids", "ALLOWED_DTYPES"]
