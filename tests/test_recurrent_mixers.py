"""The O(N) mixers' numerics: each chunked training form equals its per-token recurrence
(float64, 1e-10, several chunk sizes, lengths that are not a multiple of the chunk), the
recurrences equal explicit sums written from the definitions, splitting a sequence and
carrying the state equals the full run, gradients pass gradcheck, and RWKV-7 stays finite
in float32 at 2048 tokens; each block against a float64 per-token reference built from
its weights."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from smedjan.model import ModelConfig, Transformer
from smedjan.model.recurrent import chunked_linear_attention, stepwise_linear_attention
from smedjan.model.rwkv7 import DECAY_SCALE, wkv7_chunked, wkv7_steps

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def la_inputs(B=2, H=3, T=37, dk=5, dv=4, shared_qk=False, decay=True, seed=0, dtype=F64):
    """q, k ([B, 1 or H, T, dk]), v, log decay, S0 of decayed linear attention."""
    g = gen(seed)
    hq = 1 if shared_qk else H
    q, k = torch.randn(B, hq, T, dk, generator=g, dtype=dtype), torch.randn(B, hq, T, dk, generator=g, dtype=dtype)
    v = torch.randn(B, H, T, dv, generator=g, dtype=dtype)
    log_a = -torch.rand(B, H, T, generator=g, dtype=dtype) * 2 if decay else None
    return q, k, v, log_a, torch.randn(B, H, dk, dv, generator=g, dtype=dtype)


def wkv_inputs(B=2, H=2, T=37, N=8, seed=0, dtype=F64, key_scale=1.0, decay_logit=None):
    """RWKV-7's r, log w, k, v, a = -kk, b = kk * iclr and S0, as the mixer forms them."""
    g = gen(seed)
    r, k, v = (torch.randn(B, H, T, N, generator=g, dtype=dtype) for _ in range(3))
    k = k * key_scale
    z = torch.randn(B, H, T, N, generator=g, dtype=dtype) * 3 if decay_logit is None else \
        torch.full((B, H, T, N), decay_logit, dtype=dtype)
    log_w = -DECAY_SCALE * torch.sigmoid(z)
    kk = F.normalize(torch.randn(B, H, T, N, generator=g, dtype=dtype), dim=-1)
    iclr = torch.rand(B, H, T, N, generator=g, dtype=dtype)
    return r, log_w, k, v, -kk, kk * iclr, torch.randn(B, H, N, N, generator=g, dtype=dtype)


# ------------------------------------------------------------- chunked == per-token recurrence
@pytest.mark.parametrize("chunk", [1, 4, 16, 64])
@pytest.mark.parametrize("kind", ["ssd", "linear"])
def test_chunked_linear_attention_equals_the_recurrence(kind, chunk):
    q, k, v, log_a, S0 = la_inputs(shared_qk=kind == "ssd", decay=kind == "ssd")
    o1, S1 = stepwise_linear_attention(q, k, v, log_a, S0)
    o2, S2 = chunked_linear_attention(q, k, v, log_a, S0, chunk)
    torch.testing.assert_close(o2, o1, rtol=0, atol=1e-10)
    torch.testing.assert_close(S2, S1, rtol=0, atol=1e-10)


@pytest.mark.parametrize("chunk", [1, 3, 16, 64])
def test_chunked_wkv7_equals_the_recurrence(chunk):
    x = wkv_inputs()
    o1, S1 = wkv7_steps(*x)
    o2, S2 = wkv7_chunked(*x, chunk)
    torch.testing.assert_close(o2, o1, rtol=0, atol=1e-10)
    torch.testing.assert_close(S2, S1, rtol=0, atol=1e-10)


def test_linear_attention_recurrence_is_the_explicit_sum():
    """o_t = sum_{s<=t} (q_t . k_s) prod_{s<u<=t} a_u v_s + prod_{u<=t} a_u S0^T q_t."""
    q, k, v, log_a, S0 = la_inputs(B=1, H=2, T=9, shared_qk=True)
    o, _ = stepwise_linear_attention(q, k, v, log_a, S0)
    a = log_a.exp()
    for h in range(2):
        for t in range(9):
            want = torch.prod(a[0, h, :t + 1]) * (S0[0, h].T @ q[0, 0, t])
            for s in range(t + 1):
                want = want + float(q[0, 0, t] @ k[0, 0, s]) * torch.prod(a[0, h, s + 1:t + 1]) * v[0, h, s]
            torch.testing.assert_close(o[0, h, t], want, rtol=0, atol=1e-12)


def test_wkv7_recurrence_is_llama_cpps_kernel():
    """Element by element as ggml's rwkv_wkv7: sa_i = sum_j a_j S_ij; S_ij = S_ij w_j + v_i k_j
    + sa_i b_j; o_i = sum_j S_ij r_j."""
    x = wkv_inputs(B=1, H=1, T=5, N=3)
    o, S_end = wkv7_steps(*x)
    r, log_w, k, v, a, b, S = (t[0, 0].clone() for t in x)
    w = log_w.exp()
    for t in range(5):
        new = torch.zeros_like(S)
        for i in range(3):
            sa = sum(a[t, j] * S[i, j] for j in range(3))
            for j in range(3):
                new[i, j] = S[i, j] * w[t, j] + v[t, i] * k[t, j] + sa * b[t, j]
            assert abs(float(sum(new[i, j] * r[t, j] for j in range(3)) - o[0, 0, t, i])) < 1e-12
        S = new
    torch.testing.assert_close(S_end[0, 0], S, rtol=0, atol=1e-12)


# ------------------------------------------------------------------- split with state
@pytest.mark.parametrize("split", [1, 16, 23])
def test_splitting_and_carrying_the_state_equals_the_full_run(split):
    q, k, v, log_a, S0 = la_inputs(shared_qk=True)
    full, S_full = chunked_linear_attention(q, k, v, log_a, S0, 8)
    a, S = chunked_linear_attention(q[:, :, :split], k[:, :, :split], v[:, :, :split], log_a[:, :, :split], S0, 8)
    b, S = chunked_linear_attention(q[:, :, split:], k[:, :, split:], v[:, :, split:], log_a[:, :, split:], S, 8)
    torch.testing.assert_close(torch.cat([a, b], 2), full, rtol=0, atol=1e-10)
    torch.testing.assert_close(S, S_full, rtol=0, atol=1e-10)
    x = wkv_inputs()
    full, S_full = wkv7_chunked(*x, 16)
    first, S = wkv7_chunked(*(t[:, :, :split] for t in x[:-1]), x[-1], 16)
    second, S = wkv7_chunked(*(t[:, :, split:] for t in x[:-1]), S, 16)
    torch.testing.assert_close(torch.cat([first, second], 2), full, rtol=0, atol=1e-10)
    torch.testing.assert_close(S, S_full, rtol=0, atol=1e-10)


# ------------------------------------------------------------------------- gradients
def test_gradcheck_through_the_chunked_forms():
    q, k, v, log_a, S0 = (t.requires_grad_() for t in la_inputs(B=1, H=2, T=7, dk=3, dv=2, shared_qk=True))
    assert torch.autograd.gradcheck(lambda *t: chunked_linear_attention(*t, 3), (q, k, v, log_a, S0))
    assert torch.autograd.gradcheck(lambda q, k, v, S: chunked_linear_attention(q, k, v, None, S, 3), (q, k, v, S0))
    x = tuple(t.requires_grad_() for t in wkv_inputs(B=1, H=1, T=7, N=3))
    assert torch.autograd.gradcheck(lambda *t: wkv7_chunked(*t, 3), x)


# ------------------------------------------------------------------- RWKV-7 stability
def test_rwkv7_decay_stays_in_its_range():
    z = torch.cat([torch.linspace(-30, 30, 601, dtype=F64), torch.tensor([-1e4, 1e4], dtype=F64)])
    decay = torch.exp(-DECAY_SCALE * torch.sigmoid(z))
    assert decay.min() >= math.exp(-math.exp(-0.5)) > 0.545 and decay.max() <= 1.0
    assert ((decay > 0.545) & (decay < 1.0))[:601].all()  # strictly inside where sigmoid has not saturated


@pytest.mark.parametrize("decay_logit", [None, 50.0])  # random decays; every decay at its 0.545 floor
def test_wkv7_is_finite_and_accurate_in_float32_at_2048_with_large_keys(decay_logit):
    x = wkv_inputs(B=1, H=2, T=2048, N=64, dtype=torch.float32, key_scale=1e3, decay_logit=decay_logit)
    o32, S32 = wkv7_chunked(*x, 64)  # the longest chunk allowed: the largest decay factors
    assert torch.isfinite(o32).all() and torch.isfinite(S32).all()
    o64, _ = wkv7_chunked(*(t.double() for t in x), 16)
    assert float((o32.double() - o64).abs().max() / o64.abs().max()) < 1e-5


def test_rwkv7_mixer_is_finite_in_float32_at_2048():
    cfg = ModelConfig.make(vocab_size=97, dim=128, n_layers=2, n_heads=2, mixer="rwkv", mlp="rwkv",
                           max_seq_len=2048)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for block in model.layers:
            block.mixer.key.weight.mul_(1e3)  # large keys
            block.mixer.w0.fill_(-1e4)  # and decays at both ends of their range
            block.mixer.w0[::2] = 1e4
        loss = model(torch.randint(0, 97, (1, 2048), generator=gen(1)), torch.randint(0, 97, (1, 2048)))
    assert torch.isfinite(loss)


# ----------------------------------------------------------- blocks against per-token references
def cfg_of(**kw) -> ModelConfig:
    return ModelConfig.make(**{**dict(vocab_size=97, dim=32, n_layers=2, n_heads=4, max_seq_len=64), **kw})


def randomized(cfg: ModelConfig, seed=0) -> Transformer:
    """float64 with every parameter perturbed, so no zero or one init hides a term."""
    torch.manual_seed(seed)
    model = Transformer(cfg).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "norm", "ln_w")):
                p.uniform_(0.5, 1.5)
            else:
                p.add_(torch.randn_like(p) * 0.3)
    return model


def rms(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def mamba2_reference(m, x, eps):
    """One Mamba-2 layer token by token from its weights (x: [T, dim])."""
    E, N, H = m.d_inner, m.d_state, m.n_heads
    P = E // H
    W = {k: v.double() for k, v in m.state_dict().items()}
    window = torch.zeros(3, m.conv_dim, dtype=F64)
    h = torch.zeros(H, P, N, dtype=F64)
    out = []
    for t in range(x.shape[0]):
        zxbcdt = W["in_proj.weight"] @ x[t]
        z, xbc, dt = zxbcdt[:E], zxbcdt[E:E + m.conv_dim], zxbcdt[E + m.conv_dim:]
        cols = torch.cat([window, xbc[None]])  # the last 4 inputs
        window = cols[1:]
        xbc = (cols.T * W["conv_weight"]).sum(1) + W["conv_bias"]
        xbc = xbc * torch.sigmoid(xbc)
        xs, Bv, Cv = xbc[:E].view(H, P), xbc[E:E + N], xbc[E + N:]
        dt = torch.log1p(torch.exp(dt + W["dt_bias"]))
        A = -torch.exp(W["A_log"])
        y = torch.zeros(H, P, dtype=F64)
        for head in range(H):
            h[head] = math.exp(float(dt[head] * A[head])) * h[head] + dt[head] * torch.outer(xs[head], Bv)
            y[head] = h[head] @ Cv + W["D"][head] * xs[head]
        y = y.reshape(E) * (z * torch.sigmoid(z))
        out.append(W["out_proj.weight"] @ rms(y, W["norm"], eps))
    return torch.stack(out)


def rwkv7_reference(m, x, v_first=None):
    """One RWKV-7 time-mixing layer token by token, as llama.cpp's graph and wkv7 kernel."""
    W = {k: v.double() for k, v in m.state_dict().items()}
    C, N = x.shape[1], m.head_size
    H = C // N
    S = torch.zeros(H, N, N, dtype=F64)
    prev = torch.zeros(C, dtype=F64)
    out, vs = [], []
    sig = torch.sigmoid
    for t in range(x.shape[0]):
        xr, xw, xk, xv, xa, xg = (x[t] + (prev - x[t]) * W["lerp"][i] for i in range(6))
        prev = x[t]
        r, k, v = W["receptance.weight"] @ xr, W["key.weight"] @ xk, W["value.weight"] @ xv
        w = torch.exp(-math.exp(-0.5) * sig(W["w0"] + W["w2.weight"] @ torch.tanh(W["w1.weight"] @ xw)))
        if v_first is None:
            vs.append(v)
        else:
            v = v + (v_first[t] - v) * sig(W["v0"] + W["v2.weight"] @ (W["v1.weight"] @ xv))
        a = sig(W["a0"] + W["a2.weight"] @ (W["a1.weight"] @ xa))
        g = W["g2.weight"] @ sig(W["g1.weight"] @ xg)
        kk = (k * W["k_k"]).view(H, N)
        kk = kk / kk.norm(dim=-1, keepdim=True)
        k = k * (1 + (a - 1) * W["k_a"])
        o = torch.zeros(C, dtype=F64)
        for h in range(H):
            sl = slice(h * N, (h + 1) * N)
            ah, bh = -kk[h], kk[h] * a[sl]
            S[h] = S[h] * w[sl][None] + torch.outer(S[h] @ ah, bh) + torch.outer(v[sl], k[sl])
            oh = S[h] @ r[sl]
            oh = (oh - oh.mean()) / torch.sqrt(oh.var(unbiased=False) + 64e-5)
            o[sl] = oh * W["ln_w"][sl] + W["ln_b"][sl] + (r[sl] * k[sl] * W["r_k"][h]).sum() * v[sl]
        out.append(W["output.weight"] @ (o * g))
    return torch.stack(out), (torch.stack(vs) if vs else None)


def test_mamba2_block_matches_its_per_token_reference():
    model = randomized(cfg_of(mixer="ssm", ssm_head_dim=16, ssm_state=8, ssm_chunk=4, mlp="none", n_layers=1))
    x = torch.randn(1, 11, 32, generator=gen(2), dtype=F64)
    from smedjan.model.parts import Context

    ctx = Context(start=0, length=11, tables=model.rope_tables, device=x.device, dtype=F64)
    got = model.layers[0].mixer(x, ctx, 0)[0]
    torch.testing.assert_close(got, mamba2_reference(model.layers[0].mixer, x[0], model.cfg.norm_eps),
                               rtol=0, atol=1e-10)


def test_rwkv7_layers_match_their_per_token_reference():
    """Two layers: the first sets v_first, the second mixes it in (value residual)."""
    model = randomized(cfg_of(mixer="rwkv", rwkv_head_dim=8, rwkv_chunk=4, mlp="swiglu"))
    x = torch.randn(1, 11, 32, generator=gen(3), dtype=F64)
    from smedjan.model.parts import Context

    ctx = Context(start=0, length=11, tables=model.rope_tables, device=x.device, dtype=F64)
    first, v_first = rwkv7_reference(model.layers[0].mixer, x[0])
    torch.testing.assert_close(model.layers[0].mixer(x, ctx, 0)[0], first, rtol=0, atol=1e-10)
    second, _ = rwkv7_reference(model.layers[1].mixer, x[0], v_first)
    torch.testing.assert_close(model.layers[1].mixer(x, ctx, 1)[0], second, rtol=0, atol=1e-10)


def test_rwkv7_channel_mix_is_a_token_shifted_relu_squared():
    model = randomized(cfg_of(mixer="rwkv", rwkv_head_dim=8, mlp="rwkv", n_layers=1))
    ffn = model.layers[0].ffn
    x = torch.randn(2, 6, 32, generator=gen(4), dtype=F64)
    from smedjan.model.parts import Context

    ctx = Context(start=0, length=6, tables=model.rope_tables, device=x.device, dtype=F64)
    prev = torch.cat([torch.zeros(2, 1, 32, dtype=F64), x[:, :-1]], 1)
    mixed = x + (prev - x) * ffn.x_k
    want = torch.relu(mixed @ ffn.key.weight.T) ** 2 @ ffn.value.weight.T
    torch.testing.assert_close(ffn(x, ctx, 0), want, rtol=0, atol=1e-12)
    assert model.cfg.ffn.hidden == 4 * 32 * 2  # 4 x dim, rounded up to 256


def test_linear_attention_layer_is_the_normalised_feature_map_attention():
    model = randomized(cfg_of(mixer="linear_attn", n_layers=1, n_kv_heads=2, linear_attn_chunk=4))
    m = model.layers[0].mixer
    x = torch.randn(1, 10, 32, generator=gen(5), dtype=F64)
    from smedjan.model.parts import Context

    ctx = Context(start=0, length=10, tables=model.rope_tables, device=x.device, dtype=F64)
    H, d = 4, 8
    q = (x[0] @ m.wq.weight.T).view(10, H, d)
    k = (x[0] @ m.wk.weight.T).view(10, 2, d).repeat_interleave(2, 1)
    v = (x[0] @ m.wv.weight.T).view(10, 2, d).repeat_interleave(2, 1)
    phi = lambda t: F.elu(t) + 1  # noqa: E731
    y = torch.zeros(10, H, d, dtype=F64)
    for t in range(10):
        for h in range(H):
            wts = torch.stack([phi(q[t, h]) @ phi(k[s, h]) for s in range(t + 1)])
            y[t, h] = (wts[:, None] * v[:t + 1, h]).sum(0) / (wts.sum() + 1e-6)
    torch.testing.assert_close(m(x, ctx, 0)[0], y.reshape(10, H * d) @ m.wo.weight.T, rtol=0, atol=1e-10)


def test_the_recurrences_ignore_autocast():
    """bf16 autocast (training on CUDA) must not round the decay factors and states."""
    x = wkv_inputs(T=40, dtype=torch.float32)
    q, k, v, log_a, S0 = la_inputs(dtype=torch.float32, shared_qk=True)
    want = wkv7_chunked(*x, 16)[0], chunked_linear_attention(q, k, v, log_a, S0, 16)[0]
    with torch.autocast("cpu", torch.bfloat16):
        got = wkv7_chunked(*x, 16)[0], chunked_linear_attention(q, k, v, log_a, S0, 16)[0]
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("kw", [dict(mixer="ssm"), dict(mixer="linear_attn"), dict(mixer="rwkv", mlp="rwkv")])
def test_flops_per_token_do_not_grow_with_the_sequence(kw):
    """O(N): past one chunk, a token costs the same at any length (attention's cost grows)."""
    cfg = cfg_of(dim=128, n_heads=2, max_seq_len=8192, **kw)
    assert cfg.flops_per_token(512) == cfg.flops_per_token(8192) > 0
    attention = cfg_of(dim=128, n_heads=2, max_seq_len=8192)
    assert attention.flops_per_token(8192) > 2 * attention.flops_per_token(512)


def test_roles_of_the_recurrent_parts():
    model = Transformer(cfg_of(layer_pattern="rwkv,ssm,rwkv", n_layers=3, rwkv_head_dim=8))
    roles = model.param_roles()
    assert roles["layers.1.mixer.in_proj.weight"] == roles["layers.0.mixer.key.weight"] == "matrix"
    assert roles["layers.1.mixer.conv_weight"] == roles["layers.1.mixer.A_log"] == "scalar"
    assert roles["layers.0.mixer.w1.weight"] == roles["layers.0.mixer.lerp"] == "scalar"  # LoRAs: no decay, no Muon
    assert roles["layers.1.mixer.norm"] == roles["layers.0.mixer.ln_w"] == "norm"
    assert "layers.2.mixer.v0" in roles and "layers.0.mixer.v0" not in roles  # the first rwkv layer sets v_first
    none = Transformer(cfg_of(mixer="ssm", mlp="none")).param_roles()
    assert not any(".ffn" in n for n in none)  # --mlp none: no feed-forward and no norm for it
