"""The model against a plain float64 reference, plus presets, GQA, decode state, RoPE scaling."""

from __future__ import annotations

import math

import pytest
import torch

from smedjan.model import ModelConfig, Transformer
from smedjan.model.rope import rope_frequencies


def reference_forward(model: Transformer, idx: torch.Tensor, window: int = 0) -> torch.Tensor:
    """Logits computed from the weights by explicit float64 loops over heads: no SDPA,
    no broadcasting tricks, RoPE by rotating each (i, i + hd/2) pair by its angle."""
    cfg = model.cfg
    W = {k: v.double() for k, v in model.state_dict().items()}
    B, T = idx.shape
    hd, H, Hkv = cfg.attention.head_dim, cfg.attention.n_heads, cfg.attention.n_kv_heads
    inv_freq, mscale = rope_frequencies(cfg.rope, hd, cfg.max_seq_len)

    def rms(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.norm_eps) * w

    def rope(v, t):  # v: [hd]
        out = v.clone()
        for i in range(hd // 2):
            a = t * inv_freq[i].item()
            c, s = math.cos(a) * mscale, math.sin(a) * mscale
            out[i] = v[i] * c - v[i + hd // 2] * s
            out[i + hd // 2] = v[i + hd // 2] * c + v[i] * s
        return out

    x = W["tok_embeddings.weight"][idx]  # [B, T, dim]
    for layer in range(cfg.n_layers):
        p = f"layers.{layer}."
        h = rms(x, W[p + "mixer_norm.weight"])
        q = (h @ W[p + "mixer.wq.weight"].T).view(B, T, H, hd)
        k = (h @ W[p + "mixer.wk.weight"].T).view(B, T, Hkv, hd)
        v = (h @ W[p + "mixer.wv.weight"].T).view(B, T, Hkv, hd)
        att = torch.zeros(B, T, H, hd, dtype=torch.float64)
        for b in range(B):
            for head in range(H):
                kvh = head // (H // Hkv)
                qs = torch.stack([rope(q[b, t, head], t) for t in range(T)])
                ks = torch.stack([rope(k[b, t, kvh], t) for t in range(T)])
                scores = qs @ ks.T / math.sqrt(hd)
                for i in range(T):
                    for j in range(T):
                        if j > i or (window and i - j >= window):
                            scores[i, j] = -math.inf
                att[b, :, head] = torch.softmax(scores, -1) @ v[b, :, kvh]
        x = x + att.reshape(B, T, H * hd) @ W[p + "mixer.wo.weight"].T
        h = rms(x, W[p + "ffn_norm.weight"])
        g = h @ W[p + "ffn.w1.weight"].T
        u = h @ W[p + "ffn.w3.weight"].T
        x = x + (g * torch.sigmoid(g) * u) @ W[p + "ffn.w2.weight"].T
    x = rms(x, W["norm.weight"])
    head = W["tok_embeddings.weight"] if cfg.tie_embeddings else W["output.weight"]
    return x @ head.T


def small_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=97, dim=32, n_layers=2, n_heads=4, max_seq_len=64)
    base.update(kw)
    return ModelConfig.make(**base)


@pytest.mark.parametrize("kw", [{}, {"n_kv_heads": 2}, {"n_kv_heads": 1, "tie_embeddings": False},
                                {"sliding_window": 3}, {"rope_scaling": "yarn", "rope_factor": 4.0,
                                                        "rope_original_max_seq_len": 16},
                                {"head_dim": 16}])
def test_forward_matches_float64_reference(kw):
    torch.manual_seed(0)
    cfg = small_cfg(**kw)
    model = Transformer(cfg)
    # random norm gains too, so a wrong norm placement cannot hide behind ones
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
    idx = torch.randint(0, cfg.vocab_size, (2, 9))
    ref = reference_forward(model, idx, cfg.attention.sliding_window)
    got64 = model.double()(idx)
    torch.testing.assert_close(got64, ref, rtol=1e-10, atol=1e-10)
    got32 = model.float()(idx)
    torch.testing.assert_close(got32.double(), ref, rtol=1e-4, atol=1e-4)


def test_loss_is_cross_entropy_with_ignore_index():
    torch.manual_seed(0)
    model = Transformer(small_cfg()).double()
    idx = torch.randint(0, 97, (2, 8))
    tgt = torch.randint(0, 97, (2, 8))
    tgt[0, :3] = -1
    logits = model(idx)
    logp = torch.log_softmax(logits, -1)
    keep = tgt != -1
    expected = -logp[keep].gather(-1, tgt[keep][:, None]).mean()
    torch.testing.assert_close(model(idx, tgt).double(), expected)


@pytest.mark.parametrize("name,total", [("tiny", 2_098_304), ("small", 7_212_288), ("medium", 45_101_568)])
def test_presets_have_the_documented_sizes(name, total):
    cfg = ModelConfig.from_preset(name, vocab_size=8192)
    assert cfg.n_params() == total
    if name != "medium":
        assert sum(p.numel() for p in Transformer(cfg).parameters()) == total


def test_max_preset_is_six_and_a_half_billion():
    assert 6.4e9 < ModelConfig.from_preset("max", vocab_size=8192).n_params() < 6.6e9


def test_ffn_hidden_rounds_up_to_256():
    assert ModelConfig.from_preset("small", 8192).ffn.hidden == 768  # 8/3 * 256 = 682.7
    assert ModelConfig.custom(8192, dim=1024, n_layers=2, n_heads=8, ffn_mult=4).ffn.hidden == 4096


def test_kv_cache_decoding_equals_full_forward():
    torch.manual_seed(0)
    cfg = small_cfg(n_kv_heads=2)
    model = Transformer(cfg).double().eval()
    idx = torch.randint(0, 97, (3, 12))
    full = model(idx)
    state = model.new_state(3, 32)
    out = [model(idx[:, :5], state=state, start=0)]  # prefill
    out.append(model(idx[:, 5:8], state=state, start=5))  # a chunk
    for t in range(8, 12):  # single steps
        out.append(model(idx[:, t:t + 1], state=state, start=t))
    torch.testing.assert_close(torch.cat(out, 1), full, rtol=1e-10, atol=1e-10)


def test_kv_cache_with_sliding_window():
    torch.manual_seed(0)
    cfg = small_cfg(sliding_window=4)
    model = Transformer(cfg).double().eval()
    idx = torch.randint(0, 97, (1, 10))
    state = model.new_state(1, 16)
    steps = [model(idx[:, :3], state=state)] + [model(idx[:, t:t + 1], state=state, start=t) for t in range(3, 10)]
    torch.testing.assert_close(torch.cat(steps, 1), model(idx), rtol=1e-10, atol=1e-10)


def test_positions_past_the_context_are_refused():
    model = Transformer(small_cfg(max_seq_len=8))
    with pytest.raises(ValueError, match="context"):
        model(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize("kind,hf_type,extra", [
    ("linear", "linear", {}),
    ("yarn", "yarn", {"original_max_position_embeddings": 512}),
    ("llama3", "llama3", {"original_max_position_embeddings": 512, "low_freq_factor": 1.0, "high_freq_factor": 4.0}),
    ("ntk", "dynamic", {}),
])
def test_rope_scaling_matches_transformers(kind, hf_type, extra):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    factor, dim, heads, theta = 4.0, 64, 2, 10000.0
    cfg = ModelConfig.make(vocab_size=10, dim=dim, n_heads=heads, n_layers=1, rope_theta=theta, rope_scaling=kind,
                           rope_factor=factor, rope_original_max_seq_len=extra.get("original_max_position_embeddings", 0),
                      max_seq_len=2048)
    ours, mscale = rope_frequencies(cfg.rope, cfg.attention.head_dim, cfg.max_seq_len)
    rope = {"rope_type": hf_type, "factor": factor, "rope_theta": theta, **extra}
    hf_cfg = LlamaConfig(hidden_size=dim, num_attention_heads=heads, rope_scaling=rope, rope_theta=theta,
                         max_position_embeddings=2048 if kind != "ntk" else 512)
    if kind == "ntk":
        # HF's dynamic NTK sets base * (factor * L / trained - (factor - 1)) ** (d / (d - 2))
        # for a sequence of length L; at L = trained * (2 factor - 1) / factor that is our
        # static NTK-aware base * factor ** (d / (d - 2)).
        inv, _ = ROPE_INIT_FUNCTIONS["dynamic"](hf_cfg, "cpu", seq_len=int(512 * (2 * factor - 1) / factor))
    else:
        inv, att = ROPE_INIT_FUNCTIONS[hf_type](hf_cfg, "cpu")
        assert math.isclose(att, mscale, rel_tol=1e-6)
    torch.testing.assert_close(ours.float(), inv.float(), rtol=1e-6, atol=0)
