"""The GGUF file itself (read back with gguf's reader): keys and their types, the tokenizer,
tensor types and blocks, the Q/K permutation, fallbacks, and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T, GGUFReader, GGUFValueType as V

from helpers import assert_user_error, smedjan
from smedjan.chat import CHAT_TEMPLATE
from smedjan.errors import UserError
from smedjan.export import quant as Q
from smedjan.export.gguf import export_gguf, permute_rope_rows, unpermute_rope_rows
from smedjan.formats import constants as C
from smedjan.formats.checkpoint import load_checkpoint, save_checkpoint
from smedjan.model import ModelConfig, Transformer
from smedjan.tokenizer.bytelevel import token_to_str

# llama.cpp's LLAMA3 pre-tokenizer (src/llama-vocab.cpp, "llama-bpe"): the regex of Llama 3's
# tokenizer.json, which it runs with (?i:...) spelled out as character classes.
LLAMA_CPP_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA_CPP_LLAMA3_ADAPTED = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
                            r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@pytest.fixture(scope="module")
def gguf_files(trained_checkpoint, tmp_path_factory):
    """The trained micro checkpoint exported by the CLI at each --quant (and q4_0 --pure)."""
    import json

    d = tmp_path_factory.mktemp("gguf")
    out = {q: d / f"m-{q}.gguf" for q in ("f32", "q8_0", "q4_0", "q4_0-pure")}
    res = smedjan("export-gguf", "--checkpoint", trained_checkpoint, "--output", out["q4_0"], "--quant", "q4_0",
                  "--json")
    assert res.code == 0, res
    summary = json.loads(res.out)
    assert summary["types"] == "f32=5, q4_0=14, q8_0=1" and summary["bytes"] == out["q4_0"].stat().st_size
    for q in ("f32", "q8_0", "q4_0-pure"):  # the library call the CLI makes, without a process start
        export_gguf(trained_checkpoint, out[q], quant=q.split("-")[0], pure=q.endswith("pure"))
    return out


def field(r: GGUFReader, key: str):
    f = r.fields[key]
    return f.types, f.contents()


def test_header_and_hyperparameter_types(gguf_files):
    with open(gguf_files["q4_0"], "rb") as f:
        assert f.read(4) == b"GGUF" and int.from_bytes(f.read(4), "little") == 3
    r = GGUFReader(gguf_files["q4_0"])
    # the types llama.cpp's loader checks (get_key refuses any other type)
    want = {
        "general.architecture": (V.STRING, "llama"),
        "general.file_type": (V.UINT32, 2),  # MOSTLY_Q4_0
        "general.quantization_version": (V.UINT32, 2),
        "llama.context_length": (V.UINT32, 256),
        "llama.embedding_length": (V.UINT32, 64),
        "llama.block_count": (V.UINT32, 2),
        "llama.feed_forward_length": (V.UINT32, 256),
        "llama.attention.head_count": (V.UINT32, 4),
        "llama.attention.head_count_kv": (V.UINT32, 2),
        "llama.attention.key_length": (V.UINT32, 16),
        "llama.attention.value_length": (V.UINT32, 16),
        "llama.rope.dimension_count": (V.UINT32, 16),
        "llama.rope.freq_base": (V.FLOAT32, 10000.0),
        "llama.attention.layer_norm_rms_epsilon": (V.FLOAT32, pytest.approx(1e-5)),
        "llama.vocab_size": (V.UINT32, 2048),
    }
    for key, (vtype, value) in want.items():
        types, got = field(r, key)
        assert types == [vtype], key
        assert got == value, key
    assert "llama.rope.scaling.type" not in r.fields  # plain RoPE
    assert field(GGUFReader(gguf_files["f32"]), "general.file_type")[1] == 0
    assert field(GGUFReader(gguf_files["q8_0"]), "general.file_type")[1] == 7


def test_tokenizer_is_embedded(gguf_files, tokenizer):
    r = GGUFReader(gguf_files["f32"])
    sp = tokenizer.specials
    assert field(r, "tokenizer.ggml.model") == ([V.STRING], "gpt2")
    assert field(r, "tokenizer.ggml.pre") == ([V.STRING], "llama-bpe")
    types, tokens = field(r, "tokenizer.ggml.tokens")
    assert types == [V.ARRAY, V.STRING] and len(tokens) == tokenizer.vocab_size
    assert tokens[tokenizer.encode(" the")[0]] == "Ġthe" and tokens[ord("\n")] == "Ċ"
    assert [tokens[i] for i in sp.values()] == list(sp)  # specials spelled literally
    assert tokens == [t.decode() if i in sp.values() else token_to_str(t) for i, t in enumerate(tokenizer.tokens)]
    types, ttypes = field(r, "tokenizer.ggml.token_type")
    assert types == [V.ARRAY, V.INT32]
    assert {i for i, t in enumerate(ttypes) if t == 3} == set(sp.values())  # CONTROL
    assert all(t == 1 for i, t in enumerate(ttypes) if i not in sp.values())  # NORMAL
    types, merges = field(r, "tokenizer.ggml.merges")
    a, b = tokenizer.merges[0]
    assert types == [V.ARRAY, V.STRING] and len(merges) == tokenizer.n_merges
    assert merges[0] == f"{token_to_str(tokenizer.tokens[a])} {token_to_str(tokenizer.tokens[b])}"
    assert field(r, "tokenizer.ggml.bos_token_id") == ([V.UINT32], sp[C.BOS])
    assert field(r, "tokenizer.ggml.eos_token_id") == ([V.UINT32], sp[C.ASSISTANT_END])
    # every smedjan end token sits in one of llama.cpp's end-of-generation keys
    eog = {k: field(r, f"tokenizer.ggml.{k}_token_id")[1] for k in ("eos", "eot", "eom", "fim_pad", "fim_rep",
                                                                     "fim_sep")}
    assert eog["eot"] == sp[C.BOS]
    from smedjan.tokenizer.specials import end_ids

    assert set(eog.values()) == end_ids(tokenizer) and len(set(eog.values())) == 6
    assert field(r, "tokenizer.ggml.padding_token_id") == ([V.UINT32], sp[C.PAD])
    assert field(r, "tokenizer.ggml.add_bos_token") == ([V.BOOL], True)
    assert field(r, "tokenizer.ggml.add_eos_token") == ([V.BOOL], False)
    assert field(r, "tokenizer.chat_template") == ([V.STRING], CHAT_TEMPLATE)


def test_pre_tokenizer_regex_is_ours():
    # "llama-bpe" is llama.cpp's name for exactly our llama3 split; it runs it case-insensitively
    # spelled out, which is the same language (the parity tests check it on real text).
    assert C.GGUF_PRETOKENIZER["llama3"] == "llama-bpe"
    assert C.PRETOKENIZER_PATTERNS["llama3"] == LLAMA_CPP_LLAMA3
    spelled = C.PRETOKENIZER_PATTERNS["llama3"].replace(
        "(?i:'s|'t|'re|'ve|'m|'ll|'d)", "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])")
    assert spelled == LLAMA_CPP_LLAMA3_ADAPTED


@pytest.mark.parametrize("q", ["f32", "q8_0", "q4_0", "q4_0-pure"])
def test_tensor_types(gguf_files, q):
    r = GGUFReader(gguf_files[q])
    types = {t.name: t.tensor_type for t in r.tensors}
    assert len(types) == 2 + 9 * 2 and "output.weight" not in types  # tied head: token_embd serves
    for name, ttype in types.items():
        if name.endswith("norm.weight"):
            assert ttype == T.F32, name
        elif q == "f32":
            assert ttype == T.F32, name
        elif name == "token_embd.weight" and q == "q4_0":
            assert ttype == T.Q8_0  # the tied output head stays q8_0 unless --pure
        else:
            assert ttype == {"q8_0": T.Q8_0, "q4_0": T.Q4_0, "q4_0-pure": T.Q4_0}[q], name


@pytest.mark.parametrize("q", ["q8_0", "q4_0-pure"])
def test_blocks_equal_both_reference_quantizers(gguf_files, trained_checkpoint, q):
    import gguf

    qtype = q.split("-")[0]
    r = GGUFReader(gguf_files[q])
    state = load_checkpoint(trained_checkpoint).model_state()
    t = next(t for t in r.tensors if t.name == "blk.1.attn_k.weight")
    wk = permute_rope_rows(state["layers.1.mixer.wk.weight"].numpy(), n_heads=2)
    assert list(t.shape) == [64, 32]  # GGUF lists ne0 (the row length) first
    stored = np.asarray(t.data).tobytes()
    assert stored == Q.quantize(wk, qtype).tobytes()
    assert stored == gguf.quants.quantize(wk, {"q8_0": T.Q8_0, "q4_0": T.Q4_0}[qtype]).tobytes()


def test_qk_rows_are_permuted_for_llama_cpp_rope(gguf_files, trained_checkpoint):
    r = GGUFReader(gguf_files["f32"])
    state = load_checkpoint(trained_checkpoint).model_state()
    data = {t.name: np.asarray(t.data) for t in r.tensors}
    wq, wk = state["layers.0.mixer.wq.weight"].numpy(), state["layers.0.mixer.wk.weight"].numpy()
    assert np.array_equal(data["blk.0.attn_q.weight"], permute_rope_rows(wq, 4))
    assert np.array_equal(unpermute_rope_rows(data["blk.0.attn_k.weight"], 2), wk)
    assert np.array_equal(data["blk.0.attn_v.weight"], state["layers.0.mixer.wv.weight"].numpy())
    assert not np.array_equal(data["blk.0.attn_q.weight"], wq)


def test_permutation_turns_half_split_rope_into_interleaved():
    """q.k with half-split RoPE on the original rows == q.k with llama.cpp's interleaved RoPE on
    the permuted rows, for every head and position pair."""
    rng = np.random.default_rng(0)
    heads, hd, dim = 2, 8, 16
    wq, wk = rng.standard_normal((heads * hd, dim)), rng.standard_normal((heads * hd, dim))
    x = rng.standard_normal((5, dim))
    freqs = 10000.0 ** (-np.arange(0, hd, 2) / hd)

    def half_split(v, pos):  # pairs (i, i + hd/2)
        a = pos * freqs
        v1, v2 = v[: hd // 2], v[hd // 2:]
        return np.r_[v1 * np.cos(a) - v2 * np.sin(a), v2 * np.cos(a) + v1 * np.sin(a)]

    def interleaved(v, pos):  # pairs (2i, 2i + 1), ggml's rope mode 0
        a = pos * freqs
        out = v.copy()
        out[0::2] = v[0::2] * np.cos(a) - v[1::2] * np.sin(a)
        out[1::2] = v[1::2] * np.cos(a) + v[0::2] * np.sin(a)
        return out

    pq, pk = permute_rope_rows(wq, heads), permute_rope_rows(wk, heads)
    for h in range(heads):
        s = slice(h * hd, (h + 1) * hd)
        for i in range(5):
            for j in range(5):
                ref = half_split(wq[s] @ x[i], i) @ half_split(wk[s] @ x[j], j)
                got = interleaved(pq[s] @ x[i], i) @ interleaved(pk[s] @ x[j], j)
                assert math.isclose(ref, got, rel_tol=1e-9, abs_tol=1e-9)


def test_hf_folder_falls_back_to_f16_with_a_warning(shared_data, tmp_path):
    out = tmp_path / "tiny.gguf"
    res = smedjan("export-gguf", "--checkpoint", shared_data / "model" / "tiny-random-llama", "--output", out,
                  "--quant", "q8_0", "--no-vocab", "--json")
    assert res.code == 0, res
    assert "warning: 14 tensor(s) stay f16, not q8_0: rows of 16 values are not a multiple of 32" in res.err
    r = GGUFReader(out)
    types = {t.name: t.tensor_type for t in r.tensors}
    assert types["output.weight"] == T.F16 and types["blk.0.ffn_down.weight"] == T.Q8_0  # rows of 64
    assert types["blk.1.attn_norm.weight"] == T.F32 and types["output_norm.weight"] == T.F32
    assert field(r, "tokenizer.ggml.model")[1] == "none" and field(r, "llama.vocab_size")[1] == 32000
    assert field(r, "llama.attention.key_length")[1] == 4  # head_dim of that model


# ------------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def small(tokenizer, tmp_path_factory):
    """A random one-layer model and its state, for building broken checkpoints quickly."""
    cfg = ModelConfig.make(vocab_size=tokenizer.vocab_size, dim=64, n_layers=1, n_heads=2, max_seq_len=64, preset="custom")
    torch.manual_seed(0)
    return cfg, Transformer(cfg).state_dict()


def _no_output(folder, name="out.gguf"):
    assert not (folder / name).exists()
    assert not [p for p in folder.iterdir() if p.name.startswith(".")], "temporary file left behind"


def test_cli_refuses_checkpoint_without_tokenizer(small, tmp_path):
    cfg, state = small
    ck = tmp_path / "notok.bin"
    save_checkpoint(ck, state, kind=C.KIND_MODEL, config=cfg)
    res = smedjan("export-gguf", "-c", ck, "-o", tmp_path / "out.gguf")
    assert_user_error(res, str(ck), "no tokenizer", "tokenizer.ggml.tokens", "--tokenizer", "--no-vocab")
    _no_output(tmp_path)


def test_cli_refuses_missing_output_folder(trained_checkpoint, tmp_path):
    res = smedjan("export-gguf", "-c", trained_checkpoint, "-o", tmp_path / "nope" / "out.gguf")
    assert_user_error(res, "nope", "does not exist")


def test_cli_refuses_tokenizer_of_another_vocabulary(shared_data, tokenizer_path, tmp_path):
    res = smedjan("export-gguf", "-c", shared_data / "model" / "tiny-random-llama", "-o", tmp_path / "out.gguf",
                  "--tokenizer", tokenizer_path)
    assert_user_error(res, "2048", "32000", str(tokenizer_path))
    _no_output(tmp_path)


def test_cli_refuses_misshapen_tensor(small, tokenizer, tmp_path):
    cfg, state = small
    bad = dict(state)
    bad["layers.0.ffn.w3.weight"] = torch.zeros(cfg.ffn.hidden, cfg.dim + 1)
    ck = tmp_path / "bad.bin"
    save_checkpoint(ck, bad, kind=C.KIND_MODEL, config=cfg, tokenizer=tokenizer)
    res = smedjan("export-gguf", "-c", ck, "-o", tmp_path / "out.gguf", "-q", "q4_0")
    assert_user_error(res, str(ck), "layers.0.ffn.w3.weight", "(256, 65)")
    _no_output(tmp_path)


@pytest.mark.parametrize("how,needle", [
    ("missing", "missing tensor 'norm.weight'"),
    ("extra", "unexpected tensor 'layers.9.mixer.wq.weight'"),
    ("int8", "'layers.0.mixer.wv.weight' has dtype int8"),
    ("float64", "'layers.0.mixer.wv.weight' has dtype float64"),
    ("nan", "'tok_embeddings.weight' holds NaN"),
    ("window", "16-token sliding window"),
    ("yarn_beta", "yarn beta_fast"),
    ("other_tokenizer", "--tokenizer is"),
    ("truncated", "corrupt or truncated"),
    ("quant", "--quant 'q5_1' is unknown"),
])
def test_refusals_name_the_problem(small, tokenizer, tmp_path, how, needle):
    from smedjan.tokenizer import Tokenizer

    cfg, state = small
    state, kw, ck = dict(state), {}, tmp_path / "ck.bin"
    if how == "missing":
        del state["norm.weight"]
    elif how == "extra":
        state["layers.9.mixer.wq.weight"] = torch.zeros(2)
    elif how in ("int8", "float64"):
        state["layers.0.mixer.wv.weight"] = state["layers.0.mixer.wv.weight"].to(getattr(torch, how))
    elif how == "nan":
        state["tok_embeddings.weight"] = state["tok_embeddings.weight"].clone()
        state["tok_embeddings.weight"][3, 5] = float("nan")
    elif how == "window":
        cfg = cfg.replace(sliding_window=16)
    elif how == "yarn_beta":
        cfg = cfg.replace(rope_scaling="yarn", rope_factor=2.0, yarn_beta_fast=16.0)
    elif how == "other_tokenizer":
        # same vocabulary size, another split: another fingerprint
        t2 = tmp_path / "t2.bin"
        Tokenizer(tokenizer.tokens, tokenizer.merges, tokenizer.specials, pattern="gpt2").save(t2)
        kw["tokenizer"] = t2
    elif how == "quant":
        kw["quant"] = "q5_1"
    save_checkpoint(ck, state, kind=C.KIND_MODEL, config=cfg, tokenizer=tokenizer)
    if how == "truncated":
        data = ck.read_bytes()
        ck.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError) as e:
        export_gguf(ck, tmp_path / "out.gguf", **kw)
    assert needle in str(e.value) and "\n" not in str(e.value)
    _no_output(tmp_path)
