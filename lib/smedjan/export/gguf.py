"""GGUF export: a smedjan checkpoint (or an HF Llama folder) -> one file llama.cpp runs alone.

The file is GGUF v3, written with the `gguf` package, in the llama.cpp architecture of
the model's mixer (the table `ARCHS`: attention -> `llama`, `--ssm --mlp none` ->
`mamba2`, `--rwkv --mlp swiglu` -> `arwkv7`; hybrids and other parts are refused with one
line naming what llama.cpp lacks):
- hyperparameters under `<arch>.*` with the types llama.cpp's loader demands (u32 sizes,
  f32 rope base and norm epsilon); for `llama`, RoPE scaling mapped to what llama.cpp
  computes (linear/yarn keys, the stretched base for static NTK, a `rope_freqs` tensor for
  llama3);
- the tokenizer (`tokenizer.ggml.model = gpt2`, `pre` naming our split regex, tokens in
  GPT-2 byte-to-unicode form, specials literal and CONTROL, merges, bos and pad ids, and
  every smedjan end token in one of llama.cpp's end-of-generation keys, so llama.cpp stops
  where smedjan stops: `smedjan.tokenizer.specials`) and the chat template (Jinja);
- tensors under the names the model's parts give (`smedjan.export.names`), converted where
  llama.cpp stores them otherwise (wq/wk rows permuted from the half-split RoPE layout to
  llama.cpp's interleaved one, Mamba-2's A as -exp(A_log), RWKV-7's six token-shift mixes
  as one tensor); 1-D gains and the small vectors, LoRAs and convolutions llama.cpp's own
  quantizer leaves alone always f32; matrices f32, q8_0 or q4_0 (`smedjan.export.quant`,
  bit-exact with ggml). With q4_0 the output head (the embedding, when tied) stays q8_0
  unless `pure`, as llama.cpp's own quantizer keeps the head at higher precision. A matrix
  whose rows are not a multiple of 32 values falls back to f16 (f32 beyond f16's range).

    summary = export_gguf("final.bin", "model-q4_0.gguf", quant="q4_0")
    summary = export_gguf("tiny-random-llama/", "m.gguf", tokenizer="tok.bin")
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from smedjan.errors import UserError
from smedjan.export import quant as Q
from smedjan.export.load import load_source
from smedjan.export.names import External, Unsupported, external_names
from smedjan.model.parts import gguf_name
from smedjan.export.source import ModelSource
from smedjan.formats import constants as C
from smedjan.io import atomic_path, check_output_path
from smedjan.model.config import ModelConfig
from smedjan.tokenizer.specials import eog_slots, special_ids

QUANTS = ("f32", "q8_0", "q4_0")
# ggml's CPU rwkv_wkv7 runs whole SIMD steps over a head (GGML_F32_STEP: 64 floats with
# AVX-512, 32 with AVX2) and mishandles the remainder: head sizes must be multiples of 64.
WKV7_BLOCK = 64
F16_MAX = 65504.0


def permute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """wq/wk [n_heads*hd, dim]: HF half-split rows (i, i + hd/2 rotate together) -> llama.cpp's
    interleaved pairs (2i, 2i+1). Within each head, new row 2i = old row i and new row 2i+1 =
    old row i + hd/2; q.k is unchanged because q and k are permuted alike."""
    out, inp = w.shape
    hd = out // n_heads
    return w.reshape(n_heads, 2, hd // 2, inp).swapaxes(1, 2).reshape(out, inp)


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of `permute_rope_rows`."""
    out, inp = w.shape
    hd = out // n_heads
    return w.reshape(n_heads, hd // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


@dataclass(frozen=True)
class Arch:
    """A llama.cpp architecture smedjan writes: the mixer of every layer, the feed-forward
    its blocks have, its hyperparameter keys (`keys(writer, cfg)` returns an extra f32
    tensor to write first, or None), and whether its loader insists on an `output` tensor
    when the head is tied to the embedding (then the embedding is written twice)."""

    name: str
    mixer: str
    ffn: str  # the FEED_FORWARDS kind its blocks have ("none": mixer-only blocks)
    ffn_text: str  # what its blocks have, for the refusal of any other feed-forward
    keys: Callable[..., np.ndarray | None]
    output_required: bool = False
    ffn_also: tuple[str, ...] = ()  # other feed-forward kinds its blocks take (llama: Mixtral's experts)


def _llama_keys(writer, cfg: ModelConfig) -> np.ndarray | None:
    from gguf import RopeScalingType

    a = cfg.attention
    writer.add_feed_forward_length(cfg.ffn.hidden)
    writer.add_head_count(a.n_heads)
    writer.add_head_count_kv(a.n_kv_heads)
    writer.add_key_length(a.head_dim)
    writer.add_value_length(a.head_dim)
    writer.add_rope_dimension_count(a.head_dim)
    rope, rope_freqs = rope_metadata(cfg)
    writer.add_rope_freq_base(rope["freq_base"])
    if "scaling_type" in rope:
        writer.add_rope_scaling_type(RopeScalingType(rope["scaling_type"]))
        writer.add_rope_scaling_factor(rope["scaling_factor"])
    if "orig_ctx" in rope:
        writer.add_rope_scaling_orig_ctx_len(rope["orig_ctx"])
    if cfg.moe.enabled:  # Mixtral: softmax over the experts, top-k, renormalised (smedjan's routing)
        writer.add_expert_count(cfg.moe.n_experts)
        writer.add_expert_used_count(cfg.moe.top_k)
    return rope_freqs


def _mamba2_keys(writer, cfg: ModelConfig) -> None:
    from smedjan.model.mamba2 import D_CONV

    s = cfg.ssm
    writer.add_feed_forward_length(0)  # llama.cpp reads both, uses neither
    writer.add_head_count(0)
    writer.add_ssm_conv_kernel(D_CONV)
    writer.add_ssm_inner_size(s.expand * cfg.dim)
    writer.add_ssm_state_size(s.state)
    writer.add_ssm_time_step_rank(s.expand * cfg.dim // s.head_dim)  # llama.cpp's name for the head count
    writer.add_ssm_group_count(1)  # one B and C for all heads; the gated norm spans all of d_inner


def _arwkv7_keys(writer, cfg: ModelConfig) -> None:
    r = cfg.rwkv
    writer.add_feed_forward_length(cfg.ffn.hidden)
    writer.add_head_count(0)  # read, unused
    writer.add_wkv_head_size(r.head_dim)
    writer.add_decay_lora_rank(r.decay_rank)
    writer.add_iclr_lora_rank(r.iclr_rank)
    writer.add_value_residual_mix_lora_rank(r.value_rank)
    writer.add_gate_lora_rank(r.gate_rank)
    writer.add_token_shift_count(1)  # one shifted input per layer: the time mix's (SwiGLU has none)


ARCHS = (Arch("llama", "attention", "swiglu", "only SwiGLU feed-forwards", _llama_keys, ffn_also=("moe",)),
         Arch("mamba2", "ssm", "none", "no feed-forward (train with --mlp none)", _mamba2_keys),
         Arch("arwkv7", "rwkv", "swiglu", "a SwiGLU feed-forward (train with --mlp swiglu; RWKV-7's own channel mix "
              "runs in llama.cpp's rwkv7, whose blocks normalise with LayerNorm, not smedjan's RMSNorm)",
              _arwkv7_keys, output_required=True))


def gguf_arch(cfg: ModelConfig, where: str) -> Arch | None:
    """The architecture of `cfg`'s mixer (None: no llama.cpp architecture has it; its part
    says so when asked for names); one line for a hybrid."""
    mixers = list(dict.fromkeys(cfg.layer_mixers()))
    if len(mixers) > 1:
        raise UserError(f"{where}: not exportable to GGUF: a hybrid of {' and '.join(mixers)} layers; each "
                        "llama.cpp architecture smedjan writes has one kind of mixer in every layer")
    return next((a for a in ARCHS if a.mixer == mixers[0]), None)


def gguf_tensors(cfg: ModelConfig, where: str) -> list[External]:
    """The model's tensors under llama.cpp's names, in file order; one line naming what the
    architecture would run differently from smedjan (a part, a setting)."""
    arch = gguf_arch(cfg, where)
    r = cfg.rope
    if arch is not None and arch.name == "llama" and r.active == "yarn" and (r.beta_fast, r.beta_slow) != (32.0, 1.0):
        raise UserError(f"{where}: model config yarn beta_fast/beta_slow = {r.beta_fast}/{r.beta_slow}: llama.cpp's "
                        "llama architecture uses 32/1 only")
    if arch is not None and cfg.ffn.kind not in (arch.ffn, *arch.ffn_also):
        raise UserError(f"{where}: not exportable to GGUF: the feed-forward part {cfg.ffn.kind!r} (--mlp "
                        f"{cfg.ffn.kind}): llama.cpp's {arch.name} blocks have {arch.ffn_text}")
    try:
        tensors = external_names(cfg, "gguf")
    except Unsupported as e:
        raise UserError(f"{where}: not exportable to GGUF: {e}") from None
    assert arch is not None, cfg.layer_mixers()  # a part without an architecture refuses above
    if arch.name == "arwkv7" and cfg.rwkv.head_dim % WKV7_BLOCK:
        raise UserError(f"{where}: not exportable to GGUF: --rwkv-head-dim {cfg.rwkv.head_dim}: llama.cpp's CPU wkv7 "
                        f"kernel walks each head in blocks of {WKV7_BLOCK} channels (AVX-512) and computes other "
                        "head sizes wrongly; train with --rwkv-head-dim 64")
    if arch.output_required and cfg.tie_embeddings:  # its loader needs `output`: the tied head, written out
        from gguf import MODEL_TENSOR as T

        tensors.append(External("tok_embeddings.weight", gguf_name(T.OUTPUT)))
    return tensors


def rope_metadata(cfg: ModelConfig) -> tuple[dict, np.ndarray | None]:
    """(extra llama.* keys, rope_freqs tensor or None) reproducing `rope_frequencies(cfg)`."""
    from smedjan.model.rope import rope_frequencies

    r, hd = cfg.rope, cfg.attention.head_dim
    kind = r.active
    keys: dict = {"freq_base": float(r.theta)}
    if kind == "ntk":
        # static NTK is plain RoPE with a stretched base
        keys["freq_base"] = r.theta * r.factor ** (hd / (hd - 2))
    elif kind == "linear":
        keys.update(scaling_type="linear", scaling_factor=r.factor)
    elif kind == "yarn":
        keys.update(scaling_type="yarn", scaling_factor=r.factor, orig_ctx=r.original_max_seq_len or cfg.max_seq_len)
    elif kind == "llama3":
        # llama.cpp divides each frequency by rope_freqs[i] ([head_dim/2], f32)
        plain = 1.0 / r.theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
        scaled, _ = rope_frequencies(r, hd, cfg.max_seq_len)
        return keys, (plain / scaled).numpy().astype(np.float32)
    return keys, None


def token_strings(tok) -> tuple[list[str], list[int]]:
    """tokenizer.ggml.tokens and token_type: GPT-2 byte-to-unicode strings (NORMAL) for ordinary
    tokens, the literal spelling (CONTROL) for specials. Strings must be unique for llama.cpp."""
    from gguf import TokenType

    from smedjan.tokenizer.bytelevel import token_to_str

    specials = set(tok.specials.values())
    strings, types = [], []
    for i, t in enumerate(tok.tokens):
        if i in specials:
            strings.append(t.decode())
            types.append(int(TokenType.CONTROL))
        else:
            strings.append(token_to_str(t))
            types.append(int(TokenType.NORMAL))
    seen: dict[str, int] = {}
    for i, s in enumerate(strings):
        if s in seen:
            raise UserError(f"tokens {seen[s]} and {i} are both spelled {s!r} in GGUF form; llama.cpp needs "
                            "unique token strings")
        seen[s] = i
    return strings, types


def add_tokenizer(writer, tok) -> dict:
    """Write the tokenizer keys; returns the special ids used."""
    from gguf import Keys

    from smedjan.chat import CHAT_TEMPLATE
    from smedjan.tokenizer.bytelevel import token_to_str

    strings, types = token_strings(tok)
    ids = special_ids(tok)
    if "bos" not in ids or "eos" not in ids:
        raise UserError(f"tokenizer has no {C.BOS} / {C.ASSISTANT_END} (or <|endoftext|>) token: llama.cpp needs "
                        "bos and eos ids (its defaults would point at ordinary tokens)")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(C.GGUF_PRETOKENIZER[tok.pattern])
    writer.add_token_list(strings)
    writer.add_token_types(types)
    writer.add_token_merges([f"{token_to_str(tok.tokens[a])} {token_to_str(tok.tokens[b])}" for a, b in tok.merges])
    writer.add_bos_token_id(ids["bos"])
    # llama.cpp stops at the ids of these six keys (its end-of-generation set): each holds one
    # of smedjan's end tokens, so both stop at the same tokens (eos is <|assistant_end|>).
    eog = eog_slots(tok)
    assert eog.get("eos") == ids["eos"], (eog, ids)
    keys = {"eos": Keys.Tokenizer.EOS_ID, "eot": Keys.Tokenizer.EOT_ID, "eom": Keys.Tokenizer.EOM_ID,
            "fim_pad": Keys.Tokenizer.FIM_PAD_ID, "fim_rep": Keys.Tokenizer.FIM_REP_ID,
            "fim_sep": Keys.Tokenizer.FIM_SEP_ID}
    for slot, tid in eog.items():
        writer.add_uint32(keys[slot], tid)
    if "pad" in ids:
        writer.add_pad_token_id(ids["pad"])
    # every training document and every conversation starts with BOS, so llama.cpp should add it
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    if tok.has_chat_tokens:
        writer.add_chat_template(CHAT_TEMPLATE)
    return ids


@dataclass
class _Planned:
    name: str
    gguf: str
    ggml: str  # f32 | f16 | q8_0 | q4_0
    note: str | None = None


def plan_type(t: External, shape: tuple[int, ...], quant: str, tied: bool, pure: bool) -> _Planned:
    """The GGML type of one tensor (before the f16-range check)."""
    name, g = t.local, t.name
    if len(shape) == 1 or quant == "f32" or t.f32:
        return _Planned(name, g, "f32")
    is_head = name == "output.weight" or (tied and name == "tok_embeddings.weight")
    want = "q8_0" if (quant == "q4_0" and is_head and not pure) else quant
    if shape[-1] % Q.BLOCK:
        return _Planned(name, g, "f16", f"rows of {shape[-1]} values are not a multiple of {Q.BLOCK}")
    return _Planned(name, g, want)


def _convert(src: ModelSource, t: External, plan: _Planned) -> tuple[np.ndarray, _Planned]:
    w = src.tensors[plan.name].to(torch.float32).numpy()  # bf16/f16 -> f32 is exact
    if t.convert is not None:
        w = t.convert(w)
    if t.rope_heads:
        w = permute_rope_rows(w, t.rope_heads)
    w = np.ascontiguousarray(w, dtype=np.float32)
    if plan.ggml == "f32":
        return w, plan
    if plan.ggml == "f16":
        if np.abs(w).max(initial=0.0) > F16_MAX:
            return w, _Planned(plan.name, plan.gguf, "f32", (plan.note or "") + "; values exceed f16's range")
        return w.astype(np.float16), plan
    return Q.quantize(w, plan.ggml), plan


def _write_tensors(writer) -> None:
    """GGUFWriter.write_tensors_to_file with plain file writes. Its `ndarray.tofile(fout)`
    asks whether the file object is os.PathLike, and numpy takes the error of a Ctrl-C
    that lands in that check for a yes: the KeyboardInterrupt came out as
    "TypeError: expected str, bytes or os.PathLike object, not BufferedWriter"."""
    from gguf.gguf_writer import WriterState

    writer.write_ti_data_to_file()
    for fout, tensors in zip(writer.fout, writer.tensors):
        writer.write_padding(fout, fout.tell())
        for ti in tensors.values():
            data = np.ascontiguousarray(ti.tensor).reshape(-1).view(np.uint8)
            assert data.nbytes == ti.nbytes
            fout.write(memoryview(data))
            writer.write_padding(fout, ti.nbytes)
            ti.tensor = None
    writer.state = WriterState.WEIGHTS


def export_gguf(src: str | os.PathLike | ModelSource, out_path: str | os.PathLike, quant: str = "f32",
                tokenizer: str | os.PathLike | None = None, no_vocab: bool = False, pure: bool = False,
                on_tensor: Callable[[str], None] | None = None, warn: Callable[[str], None] | None = None) -> dict:
    """Write `src` (checkpoint path, HF folder or ModelSource) as a GGUF; returns a summary dict.

    `tokenizer` supplies a tokenizer.bin when the source has none; `no_vocab` writes a
    weights-only file (`tokenizer.ggml.model = none`) that llama.cpp loads and runs on token
    ids. `on_tensor(name)` is called after each tensor; `warn(message)` gets the source's warnings
    and one line per kind of fallback."""
    from gguf import GGML_QUANT_VERSION, GGMLQuantizationType, GGUFWriter, LlamaFileType

    t0 = time.monotonic()
    if quant not in QUANTS:
        raise UserError(f"--quant {quant!r} is unknown; choose {', '.join(QUANTS)}")
    check_output_path(out_path)
    source = src if isinstance(src, ModelSource) else load_source(src, tokenizer)
    cfg, tok, where = source.config, source.tokenizer, str(source.path)
    tensors = gguf_tensors(cfg, where)
    arch = gguf_arch(cfg, where)
    warn = warn or (lambda message: None)
    if no_vocab:
        tok = None
    elif tok is None:
        raise UserError(f"{where}: no tokenizer to embed ({source.tokenizer_note}), and llama.cpp rejects a GGUF "
                        f"without tokenizer.ggml.tokens; pass --tokenizer with a {cfg.vocab_size}-token "
                        "tokenizer.bin, or --no-vocab for a weights-only GGUF that runs on token ids")
    for w in source.warnings:
        warn(w)

    writer = GGUFWriter(path=None, arch=arch.name)
    writer.add_name(source.name)
    file_type = {"f32": LlamaFileType.ALL_F32, "q8_0": LlamaFileType.MOSTLY_Q8_0,
                 "q4_0": LlamaFileType.MOSTLY_Q4_0}[quant]
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(GGML_QUANT_VERSION)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.dim)
    writer.add_block_count(cfg.n_layers)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    rope_freqs = arch.keys(writer, cfg)
    ids: dict = {}
    if tok is not None:
        ids = add_tokenizer(writer, tok)
        writer.add_string("smedjan.tokenizer_fingerprint", tok.fingerprint)
    else:
        writer.add_tokenizer_model("none")  # llama.cpp: LLAMA_VOCAB_TYPE_NONE, vocab size from llama.vocab_size

    ggml = {"f32": GGMLQuantizationType.F32, "f16": GGMLQuantizationType.F16,
            "q8_0": GGMLQuantizationType.Q8_0, "q4_0": GGMLQuantizationType.Q4_0}
    counts: dict[str, int] = {}
    fallback: list[str] = []
    notes: dict[str, list[str]] = {}
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs)
        counts["f32"] = 1
    for t in tensors:
        name = t.local
        plan = plan_type(t, tuple(source.tensors[name].shape), quant, cfg.tie_embeddings, pure)
        data, plan = _convert(source, t, plan)
        if plan.ggml in Q.QUANT_TYPES:
            writer.add_tensor(plan.gguf, data, raw_dtype=ggml[plan.ggml])
        else:
            writer.add_tensor(plan.gguf, data)
        counts[plan.ggml] = counts.get(plan.ggml, 0) + 1
        if plan.note and quant != "f32":
            fallback.append(plan.gguf)
            notes.setdefault(f"stay {plan.ggml}, not {quant}: {plan.note}", []).append(plan.gguf)
        if on_tensor:
            on_tensor(name)
    for note, names in notes.items():
        warn(f"{len(names)} tensor(s) {note} ({', '.join(names)})")
    # The tensors alone are checked against the free space; the estimate adds a bound on
    # the tokenizer (GPT-2 byte-to-unicode spelling at most doubles a token) and padding.
    tensor_bytes = sum(ti.nbytes for shard in writer.tensors for ti in shard.values())
    estimate = tensor_bytes + (1 << 16) + 96 * sum(len(shard) for shard in writer.tensors)
    if tok is not None:
        estimate += sum(2 * len(t) + 12 for t in tok.tokens) + 16 * len(tok.merges) + sum(
            2 * (len(tok.tokens[a]) + len(tok.tokens[b])) for a, b in tok.merges)
    with atomic_path(out_path, expected_size=estimate, required_size=tensor_bytes) as tmp:
        try:
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            _write_tensors(writer)
        finally:
            writer.close()
    return {
        "output": str(out_path),
        "source": where,
        "quant": quant,
        "bytes": Path(out_path).stat().st_size,
        "tensors": sum(counts.values()),
        "types": ", ".join(f"{k}={v}" for k, v in sorted(counts.items())),
        "fallback": fallback,
        "parameters": sum(t.numel() for t in source.tensors.values()),
        "vocab_size": cfg.vocab_size,
        "tokenizer": tok.fingerprint if tok is not None else "none (weights only)",
        "bos_id": ids.get("bos"),
        "eos_id": ids.get("eos"),
        "seconds": round(time.monotonic() - t0, 3),
    }
