"""The model built from parts: each attention variant against a float64 reference, decoding
with per-layer state against the full forward, MLA's absorbed path against its naive one,
block-sparse attention against dense, optimizer roles, FLOPs and the depth dial."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from smedjan.errors import UserError
from smedjan.model import ModelConfig, Transformer
from smedjan.model.rope import rope_frequencies


def cfg_of(**kw) -> ModelConfig:
    return ModelConfig.make(**{**dict(vocab_size=97, dim=32, n_layers=2, n_heads=4, max_seq_len=64), **kw})


def random_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """float64, with random norm gains (a misplaced gain cannot hide behind ones)."""
    torch.manual_seed(seed)
    model = Transformer(cfg).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
    return model


def reference(model: Transformer, idx: torch.Tensor) -> torch.Tensor:
    """Logits of an attention/SwiGLU/ReLU^2 model written out in float64 from its weights:
    explicit per-head loops, RoPE by pair rotation, QK-norm, per-layer windows, softcap."""
    cfg = model.cfg
    W = {k: v.double() for k, v in model.state_dict().items()}
    a = cfg.attention
    hd, H, Hkv, eps = a.head_dim, a.n_heads, a.n_kv_heads, cfg.norm_eps
    inv_freq, mscale = rope_frequencies(cfg.rope, hd, cfg.max_seq_len)
    B, T = idx.shape

    def rms(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w

    def rope(v, t):
        out = v.clone()
        for i in range(hd // 2):
            ang = t * float(inv_freq[i])
            c, s = math.cos(ang) * mscale, math.sin(ang) * mscale
            out[i] = v[i] * c - v[i + hd // 2] * s
            out[i + hd // 2] = v[i + hd // 2] * c + v[i] * s
        return out

    x = W["tok_embeddings.weight"][idx]
    for layer in range(cfg.n_layers):
        p, window = f"layers.{layer}.", cfg.window(layer)
        h = rms(x, W[p + "mixer_norm.weight"])
        q = (h @ W[p + "mixer.wq.weight"].T).view(B, T, H, hd)
        k = (h @ W[p + "mixer.wk.weight"].T).view(B, T, Hkv, hd)
        v = (h @ W[p + "mixer.wv.weight"].T).view(B, T, Hkv, hd)
        if a.qk_norm:
            q, k = rms(q, W[p + "mixer.q_norm"]), rms(k, W[p + "mixer.k_norm"])
        att = torch.zeros(B, T, H, hd, dtype=torch.float64)
        for b in range(B):
            for head in range(H):
                g = head // (H // Hkv)
                qs = torch.stack([rope(q[b, t, head], t) for t in range(T)])
                ks = torch.stack([rope(k[b, t, g], t) for t in range(T)])
                scores = qs @ ks.T / math.sqrt(hd)
                for i in range(T):
                    for j in range(T):
                        if j > i or (window and i - j >= window):
                            scores[i, j] = -math.inf
                att[b, :, head] = torch.softmax(scores, -1) @ v[b, :, g]
        x = x + att.reshape(B, T, H * hd) @ W[p + "mixer.wo.weight"].T
        h = rms(x, W[p + "ffn_norm.weight"])
        if cfg.ffn.kind == "relu2":
            u = torch.relu(h @ W[p + "ffn.w1.weight"].T) ** 2
        else:
            gate = h @ W[p + "ffn.w1.weight"].T
            u = gate * torch.sigmoid(gate) * (h @ W[p + "ffn.w3.weight"].T)
        x = x + u @ W[p + "ffn.w2.weight"].T
    x = rms(x, W["norm.weight"])
    logits = x @ (W["tok_embeddings.weight"] if cfg.tie_embeddings else W["output.weight"]).T
    if cfg.logit_softcap:
        logits = cfg.logit_softcap * torch.tanh(logits / cfg.logit_softcap)
    return logits


VARIANTS = [
    {"qk_norm": True},
    {"logit_softcap": 3.0},
    {"mlp": "relu2"},
    {"mlp": "relu2", "ffn_mult": 2},
    {"window_pattern": "SL", "short_window": 3, "n_layers": 3},
    {"qk_norm": True, "n_kv_heads": 2, "logit_softcap": 2.0, "tie_embeddings": False},
]


@pytest.mark.parametrize("kw", VARIANTS)
def test_variant_matches_a_float64_reference(kw):
    model = random_model(cfg_of(**kw))
    idx = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model(idx), reference(model, idx), rtol=1e-10, atol=1e-10)
    model32 = model.float()
    torch.testing.assert_close(model32(idx).double(), reference(model, idx), rtol=1e-4, atol=1e-4)


def test_window_pattern_follows_nanochat():
    cfg = cfg_of(n_layers=5, window_pattern="SSL", max_seq_len=1000)
    short = math.ceil(1000 / 4 / 128) * 128  # 256: a quarter of the context, rounded up to 128
    assert [cfg.window(i) for i in range(5)] == [short, short, 0, short, 0]  # tiled; the last layer is L
    assert cfg_of(window_pattern="S", short_window=8).window(0) == 8
    assert cfg_of(window_pattern="S", n_layers=1).window(0) == 0  # the last layer is always L
    assert cfg_of(window_pattern="SL", max_seq_len=64).window(0) == 0  # a quarter rounded up to 128 >= context


# ---------------------------------------------------------------- decode with state
MIXERS = [
    {},
    {"n_kv_heads": 2, "qk_norm": True, "logit_softcap": 4.0},
    {"window_pattern": "SSL", "short_window": 5, "n_layers": 3},
    {"sliding_window": 6},
    {"mla_latent_dim": 16},
    {"mla_latent_dim": 12, "mla_q_latent_dim": 16, "mla_rope_dim": 4, "window_pattern": "SL", "short_window": 5},
    {"block_sparse_top_k": 1, "block_size": 4},
    {"layer_pattern": "attention,mla,block_sparse", "n_layers": 3, "mla_latent_dim": 16, "block_sparse_top_k": 2,
     "block_size": 3, "mixer": "attention"},
    # the recurrent mixers: chunks shorter than the prefill, so prefill, chunk and steps all differ
    {"mixer": "ssm", "ssm_head_dim": 16, "ssm_state": 8, "ssm_chunk": 4},
    {"mixer": "ssm", "ssm_head_dim": 32, "mlp": "none", "ssm_chunk": 3},
    {"mixer": "linear_attn", "n_kv_heads": 2, "linear_attn_chunk": 4},
    {"mixer": "rwkv", "rwkv_head_dim": 8, "rwkv_chunk": 4, "mlp": "rwkv"},
    {"mixer": "rwkv", "rwkv_head_dim": 16, "rwkv_chunk": 3},
    {"layer_pattern": "ssm,attention,linear_attn,rwkv", "n_layers": 4, "ssm_head_dim": 16, "rwkv_head_dim": 8,
     "ssm_chunk": 4, "rwkv_chunk": 4},
]


@pytest.mark.parametrize("kw", MIXERS)
def test_prefill_then_decode_equals_the_full_forward(kw):
    """Over 20 positions: longer than every short window and several sparse blocks."""
    model = random_model(cfg_of(**kw))
    idx = torch.randint(0, 97, (3, 20), generator=torch.Generator().manual_seed(2))
    full = model(idx)
    state = model.new_state(3, 32)
    out = [model(idx[:, :7], state=state)]  # prefill
    out.append(model(idx[:, 7:11], state=state, start=7))  # a chunk
    out += [model(idx[:, t:t + 1], state=state, start=t) for t in range(11, 20)]  # one token at a time
    torch.testing.assert_close(torch.cat(out, 1), full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kw", MIXERS)
def test_ragged_rows_decode_each_at_its_own_position(kw):
    """Continuous batching: rows at different lengths share a decode step."""
    from smedjan.infer.runner import ModelRunner

    model = random_model(cfg_of(**kw))
    idx = torch.randint(0, 97, (3, 20), generator=torch.Generator().manual_seed(3))
    full = model(idx)
    runner = ModelRunner(model)
    cache = runner.new_cache(3, 32)
    lens = [3, 8, 12]
    runner.prefill(cache, 0, [idx[r, :lens[r]].tolist() for r in range(3)])
    for step in range(7):
        cols = [n + step for n in lens]
        got = runner.decode(cache, torch.tensor([idx[r, c] for r, c in enumerate(cols)]), cols)
        torch.testing.assert_close(got, torch.stack([full[r, c] for r, c in enumerate(cols)]), rtol=1e-10,
                                   atol=1e-10)


@pytest.mark.parametrize("kw", [{"mixer": "ssm"}, {"mixer": "linear_attn"}, {"mixer": "rwkv", "mlp": "rwkv",
                                                                                 "rwkv_head_dim": 16}])
def test_recurrent_state_is_constant_in_the_context(kw):
    """Decoding memory per sequence does not grow with the context (no KV cache)."""
    model = Transformer(cfg_of(**kw, max_seq_len=4096))
    sizes = {n: sum(t.numel() for st in model.new_state(1, n).layers for t in st.tensors.values())
             for n in (16, 4096)}
    assert sizes[16] == sizes[4096] > 0 and not model.new_state(1, 16).truncatable


@pytest.mark.parametrize("kw", [{"mla_latent_dim": 16}, {"mixer": "rwkv", "mlp": "rwkv", "rwkv_head_dim": 8}])
def test_a_moved_row_keeps_its_sequence(kw):
    from smedjan.infer.runner import ModelRunner

    model = random_model(cfg_of(**kw))
    idx = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(4))
    runner = ModelRunner(model)
    cache = runner.new_cache(2, 16)
    runner.prefill(cache, 0, [idx[0, :5].tolist(), idx[1, :9].tolist()])
    runner.move_row(cache, 1, 0, 9)  # row 1's sequence now lives in row 0
    got = runner.decode(cache, idx[1, 9:10], [9])
    torch.testing.assert_close(got[0], model(idx[1:2, :10])[0, -1], rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------ MLA
def test_mla_absorbed_equals_naive_in_float64():
    model = random_model(cfg_of(mla_latent_dim=12, mla_rope_dim=6, n_layers=2))
    idx = torch.randint(0, 97, (2, 15), generator=torch.Generator().manual_seed(5))
    outs = {}
    for absorbed in (True, False):
        for block in model.layers:
            block.mixer.absorbed = absorbed
        state = model.new_state(2, 16)
        steps = [model(idx[:, :6], state=state)] + [model(idx[:, t:t + 1], state=state, start=t) for t in range(6, 15)]
        outs[absorbed] = torch.cat(steps, 1)
    torch.testing.assert_close(outs[True], outs[False], rtol=0, atol=1e-10)
    torch.testing.assert_close(outs[True], model(idx), rtol=0, atol=1e-10)


def test_mla_caches_the_latent_and_one_rope_key_per_token():
    cfg = cfg_of(mla_latent_dim=12, mla_rope_dim=6, dim=64, n_heads=4)
    state = Transformer(cfg).new_state(1, 50)
    per_token = sum(t[0].numel() for st in state.layers for t in st.tensors.values()) / 50
    assert per_token == cfg.n_layers * (12 + 6)  # against 2 x heads x head_dim = 128 per layer for attention
    attention = Transformer(cfg_of(dim=64, n_heads=4)).new_state(1, 50)
    assert sum(t[0].numel() for st in attention.layers for t in st.tensors.values()) / 50 == 2 * 2 * 64


def test_mla_is_causal():
    model = random_model(cfg_of(mla_latent_dim=16))
    a = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(6))
    b = a.clone()
    b[0, 8:] = (b[0, 8:] + 1) % 97
    torch.testing.assert_close(model(a)[:, :8], model(b)[:, :8], rtol=0, atol=1e-12)


# -------------------------------------------------------------- block-sparse
def test_block_sparse_covering_every_block_is_dense_attention():
    dense = random_model(cfg_of())
    sparse = Transformer(cfg_of(block_sparse_top_k=5, block_size=4)).double().eval()  # 20 tokens: 5 blocks
    sparse.load_state_dict(dense.state_dict())
    idx = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(sparse(idx), dense(idx), rtol=0, atol=1e-12)
    fewer = Transformer(cfg_of(block_sparse_top_k=1, block_size=4)).double().eval()
    fewer.load_state_dict(dense.state_dict())
    assert not torch.allclose(fewer(idx), dense(idx), atol=1e-6)  # the test can tell sparse from dense
    torch.testing.assert_close(fewer(idx)[:, :8], dense(idx)[:, :8], rtol=0, atol=1e-12)  # 2 blocks: all read


def test_block_sparse_selection_matches_a_per_query_loop():
    from smedjan.model.block_sparse import block_select_mask

    g = torch.Generator().manual_seed(8)
    B, H, Hkv, T, d, bs, k = 2, 4, 2, 13, 8, 3, 2
    q, keys = torch.randn(B, H, T, d, generator=g), torch.randn(B, Hkv, T, d, generator=g)
    mask = block_select_mask(q, keys, torch.arange(T), bs, k)
    for b in range(B):
        for h in range(H):
            for i in range(T):
                own = i // bs
                pooled = [keys[b, h // 2, j * bs:(j + 1) * bs].mean(0) for j in range(own)]
                scores = [float(q[b, h, i] @ p) for p in pooled]
                best = sorted(range(own), key=lambda j: -scores[j])[:k]
                want = [(j // bs) in best or j // bs == own for j in range(T)]
                assert mask[b, h, i].tolist() == want


# ------------------------------------------------------------- roles, FLOPs, dial
def test_every_parameter_has_a_role_from_its_part():
    cfg = cfg_of(layer_pattern="attention,mla", mla_latent_dim=16, mla_q_latent_dim=8, qk_norm=True,
                 tie_embeddings=False, mlp="relu2")
    model = Transformer(cfg)
    roles = model.param_roles()
    assert set(roles) == {n for n, _ in model.named_parameters()}
    assert roles["tok_embeddings.weight"] == "embedding" and roles["output.weight"] == "head"
    assert roles["layers.0.mixer.q_norm"] == "norm" and roles["layers.1.mixer.kv_norm"] == "norm"
    assert roles["layers.1.mixer.wkv_b.weight"] == "matrix" and roles["layers.0.ffn.w2.weight"] == "matrix"


def test_flops_come_from_the_parts():
    cfg = cfg_of(dim=64, n_heads=4, n_layers=2)
    a = cfg.attention
    per_layer = 6 * (4 * 64 * 64) + 12 * a.n_heads * a.head_dim * 128 + 6 * 3 * 64 * cfg.ffn.hidden
    assert cfg.flops_per_token(128) == 2 * per_layer + 6 * 97 * 64
    windowed = cfg_of(dim=64, n_heads=4, n_layers=2, sliding_window=16)
    assert cfg.flops_per_token(128) - windowed.flops_per_token(128) == 2 * 12 * 4 * 16 * (128 - 16)


@pytest.mark.parametrize("depth,dim,heads", [(4, 256, 2), (12, 768, 6), (20, 1280, 10), (3, 256, 2)])
def test_depth_dial_as_nanochat(depth, dim, heads):
    cfg = ModelConfig.from_depth(8192, depth)
    assert (cfg.n_layers, cfg.dim, cfg.attention.n_heads, cfg.attention.head_dim) == (depth, dim, heads, 128)


@pytest.mark.parametrize("kw,needle", [
    ({"window_pattern": "SXL"}, "window-pattern"),
    ({"layer_pattern": "attention,warp"}, "'warp'"),
    ({"layer_pattern": "attention*0"}, "NAME*N"),
    ({"mla_latent_dim": 16, "n_kv_heads": 2}, "kv-heads"),
    ({"mla_latent_dim": 64}, "mla-latent-dim 64"),
    ({"mixer": "mla"}, "needs --mla-latent-dim"),
    ({"block_sparse_top_k": 1, "block_size": 0}, "block-size"),
    ({"mlp": "geglu"}, "--mlp 'geglu'"),
    ({"logit_softcap": -1.0}, "logit-softcap"),
    ({"head_dim": 7}, "even"),
])
def test_bad_configs_are_one_line_errors(kw, needle):
    with pytest.raises(UserError) as e:
        cfg_of(**kw)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_relu2_and_swiglu_widths():
    assert cfg_of(dim=64, mlp="relu2").ffn.hidden == 256  # 4 x dim, a multiple of 256
    assert cfg_of(dim=64).ffn.hidden == 256  # 8/3 x 64 = 171 -> 256
    assert cfg_of(dim=64, mlp="relu2", ffn_mult=8).ffn.hidden == 512


def test_first_release_checkpoints_load(tmp_path, tokenizer):
    """Format 1: a flat model config and attention/feed_forward tensor names."""
    import json

    from safetensors.torch import save_file

    from smedjan.formats.checkpoint import TOKENIZER_TENSOR
    from smedjan.model import load_model

    cfg = ModelConfig.make(vocab_size=tokenizer.vocab_size, dim=32, n_layers=2, n_heads=2, n_kv_heads=1,
                           max_seq_len=64, sliding_window=8)
    model = Transformer(cfg)
    old = {}
    for k, v in model.state_dict().items():
        old[k.replace(".mixer_norm.", ".attention_norm.").replace(".mixer.", ".attention.").replace(".ffn.",
                                                                                                 ".feed_forward.")] = v
    old[TOKENIZER_TENSOR] = torch.frombuffer(bytearray(tokenizer.to_bytes()), dtype=torch.uint8)
    flat = {"vocab_size": cfg.vocab_size, "dim": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "head_dim": 16,
            "ffn_hidden": cfg.ffn.hidden, "max_seq_len": 64, "rope_theta": 10000.0, "rope_scaling": "none",
            "rope_factor": 1.0, "rope_original_max_seq_len": 0, "rope_low_freq_factor": 1.0,
            "rope_high_freq_factor": 4.0, "yarn_beta_fast": 32.0, "yarn_beta_slow": 1.0, "norm_eps": 1e-5,
            "tie_embeddings": True, "sliding_window": 8, "preset": "custom", "extra": {}}
    meta = {"kind": "model", "format_version": "1", "format": "smedjan", "model_config": json.dumps(flat),
            "tokenizer_fingerprint": tokenizer.fingerprint}
    path = tmp_path / "old.bin"
    save_file({k: v.contiguous() for k, v in old.items()}, str(path), metadata=meta)
    loaded, tok, ck = load_model(path)
    assert ck.config == cfg and tok.fingerprint == tokenizer.fingerprint
    idx = torch.randint(0, cfg.vocab_size, (1, 10))
    torch.testing.assert_close(loaded(idx), model.eval()(idx))


def test_decode_grows_the_rope_tables_only_as_far_as_needed():
    model = Transformer(cfg_of(max_seq_len=1 << 20))  # a million positions of context, declared
    model(torch.zeros(1, 8, dtype=torch.long))
    assert max(t[0].shape[0] for t in model.rope_tables._tables.values()) <= 256


def test_softcap_bounds_the_logits_and_loss_uses_them():
    model = random_model(cfg_of(logit_softcap=2.0))
    idx = torch.randint(0, 97, (2, 9))
    logits = model(idx)
    assert logits.abs().max() < 2.0
    tgt = torch.randint(0, 97, (2, 9))
    torch.testing.assert_close(model(idx, tgt), F.cross_entropy(logits.reshape(-1, 97), tgt.reshape(-1)))
