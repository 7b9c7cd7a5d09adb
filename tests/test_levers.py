"""The training levers (smedjan.training.levers): gradients with and without each one, the
activation bytes a counting saved_tensors_hooks measures on the medium preset (fake
tensors: nothing is computed), FP8's filter, numbers and refusals on the CPU, and the
fused heads of sft, dpo and distill against their plain losses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from smedjan.errors import UserError
from smedjan.kernels.fp8 import eligible, eligible_shape, fp8_linear, quantize
from smedjan.model import ModelConfig, Transformer
from smedjan.training.heads import FusedCE
from smedjan.training.levers import Levers, MatmulMode, SavedBytes, apply_levers, check_device, levers_of
from smedjan.training.pretrain import TrainArgs

CPU = torch.device("cpu")
# one model with every mixer (attention, MLA, block-sparse), and one with ReLU^2
MIXED = dict(vocab_size=97, dim=32, n_layers=3, n_heads=2, max_seq_len=16, layer_pattern="attention,mla,block_sparse",
             mla_latent_dim=16, block_sparse_top_k=1, block_size=4)


def _batch(vocab=97, B=2, T=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (B, T), generator=g), torch.randint(0, vocab, (B, T), generator=g)


def _step(cfg, lv: Levers | None, head=None, seed=1):
    """(loss, {name: grad}) of one forward/backward of a freshly built model."""
    model = Transformer(cfg)
    model.reset_parameters(0)
    if lv is not None:
        apply_levers(model, lv, CPU)
    x, y = _batch(cfg.vocab_size, T=cfg.max_seq_len, seed=seed)
    loss = model(x, y, head=head)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def _rel(a: dict, b: dict) -> float:
    return max(float((a[n] - b[n]).norm() / b[n].norm()) for n in b)


# the O(N) mixers beside attention (their chunked scans recompute like any other part)
RECURRENT = dict(vocab_size=97, dim=32, n_layers=3, n_heads=2, max_seq_len=16, layer_pattern="ssm,linear_attn,attention")


@pytest.mark.parametrize("flat", [MIXED, {**MIXED, "mlp": "relu2", "layer_pattern": "", "qk_norm": True}, RECURRENT,
                                  {**RECURRENT, "layer_pattern": "", "mixer": "rwkv", "mlp": "rwkv", "rwkv_head_dim": 16}])
def test_checkpointing_gives_bitwise_equal_gradients(flat):
    cfg = ModelConfig.make(**flat)
    loss0, g0 = _step(cfg, None)
    for every in (1, 2):
        loss, g = _step(cfg, Levers(checkpoint_every=every))
        assert torch.equal(loss, loss0)
        assert all(torch.equal(g[n], g0[n]) for n in g0), every


def test_levers_leave_eval_and_names_alone():
    cfg = ModelConfig.make(**MIXED)
    model = Transformer(cfg)
    names = list(model.state_dict())
    apply_levers(model, Levers(checkpoint_every=1, fp16_activations=True, bf16_matmul=True), CPU)
    assert list(model.state_dict()) == names
    x, _ = _batch()
    plain = Transformer(cfg)
    plain.load_state_dict(model.state_dict())
    model.eval()
    with torch.no_grad():  # evaluation sees the plain model: no bf16 matmuls
        torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)


def test_fp16_activations_within_fp16_tolerance():
    cfg = ModelConfig.make(**MIXED)
    loss0, g0 = _step(cfg, None)
    for lv in (Levers(fp16_activations=True), Levers(fp16_activations=True, checkpoint_every=1)):
        loss, g = _step(cfg, lv)
        assert torch.equal(loss, loss0)  # storage only: the forward is untouched
        err = _rel(g, g0)
        assert 0 < err < 5e-3, (lv, err)  # fp16 rounding (2^-11) of the saved tensors, not more


def test_bf16_matmul_runs_matmuls_in_bf16_with_fp32_master_weights():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 32, generator=g)
    w = torch.randn(16, 32, generator=g, requires_grad=True)
    with MatmulMode(bf16=True):
        y = F.linear(x, w)
        a = x @ w.t()
    want = F.linear(x.bfloat16(), w.bfloat16()).float()
    assert y.dtype == a.dtype == torch.float32
    assert torch.equal(y, want) and torch.equal(a, want)
    y.sum().backward()
    assert w.grad.dtype == torch.float32
    cfg = ModelConfig.make(**MIXED)
    loss0, g0 = _step(cfg, None)
    loss, gb = _step(cfg, Levers(bf16_matmul=True))
    assert abs(float(loss - loss0)) < 1e-2 and 0 < _rel(gb, g0) < 5e-2


def test_fused_ce_head_equals_the_models_loss():
    cfg = ModelConfig.make(**{**MIXED, "logit_softcap": 5.0})
    loss0, g0 = _step(cfg, None)
    loss, g = _step(cfg, None, head=FusedCE(chunk=8))
    torch.testing.assert_close(loss, loss0, rtol=1e-6, atol=1e-6)
    assert _rel(g, g0) < 1e-5


# ---------------------------------------------------------------------------- counting
def _saved(lv: Levers | None, head=None, cfg_name="medium", vocab=32768, B=4, T=512) -> SavedBytes:
    """What one training forward of the preset keeps for the backward, on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        model = Transformer(ModelConfig.from_preset(cfg_name, vocab, max_seq_len=T))
        if lv is not None:
            apply_levers(model, lv, CPU)
        idx = torch.zeros(B, T, dtype=torch.long)
        with SavedBytes() as saved:
            model(idx, idx, head=head)
    return saved


@pytest.mark.slow
def test_saved_activation_bytes_of_the_medium_preset():
    base = _saved(None)
    N, V = 4 * 512, 32768
    assert any(s == (N, V) for s in base.shapes())  # the plain loss keeps [tokens, vocab] log-probs
    ckpt = _saved(Levers(checkpoint_every=1))
    assert ckpt.total <= 0.5 * base.total, (ckpt.total, base.total)
    fused = _saved(Levers(), head=FusedCE())
    assert not any(N in s and V in s for s in fused.shapes()), fused.shapes()
    D = 512  # it keeps the gradients of the hidden states and the head instead: [N, D] and [V, D]
    assert fused.total <= base.total - N * V * 4 + (N + V) * D * 4
    fp16 = _saved(Levers(fp16_activations=True))
    assert 0.45 <= fp16.total / base.total <= 0.6, fp16.total / base.total


def test_counter_sees_what_each_lever_keeps_on_a_tiny_model():
    every = _saved(Levers(checkpoint_every=1), cfg_name="tiny", vocab=97, B=2, T=32)
    half = _saved(Levers(checkpoint_every=2), cfg_name="tiny", vocab=97, B=2, T=32)
    base = _saved(None, cfg_name="tiny", vocab=97, B=2, T=32)
    assert every.total < half.total < base.total
    # checkpointed blocks keep their input (4 blocks: 4 x [2, 32, 128] float32 at least)
    assert every.total >= 4 * 2 * 32 * 128 * 4


# --------------------------------------------------------------------------------- FP8
def test_fp8_layer_filter():
    assert eligible_shape(512, 1536) and eligible_shape(128, 128)
    assert not eligible_shape(512, 97) and not eligible_shape(64, 512) and not eligible_shape(520, 1000)
    w = torch.zeros(256, 128)
    assert eligible(torch.zeros(4, 8, 128), w)
    assert not eligible(torch.zeros(3, 5, 128), w)  # 15 tokens: dW's contraction needs a multiple of 16
    assert not eligible(torch.zeros(16, 128, dtype=torch.long), w)


def test_fp8_mode_takes_the_eligible_block_linears_only():
    cfg = ModelConfig.make(vocab_size=256, dim=128, n_layers=2, n_heads=2, max_seq_len=16)
    model = Transformer(cfg)
    keep = (model.tok_embeddings.weight, model.head_weight)
    x, y = _batch(256, B=4, T=16)  # 64 tokens: the fused projections are one matmul each
    mode = MatmulMode(fp8="tensorwise", keep=keep)
    with mode:
        loss = model(x, y)
    loss.backward()
    # per block: the fused QKV, wo, the fused w1|w3 and w2; the tied head (256 x 128) is kept out
    assert mode.fp8_calls == 2 * 4
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_linear_equals_its_emulation(recipe):
    """torch._scaled_mm runs on the CPU too: the FP8 matmuls equal float32 matmuls of the
    quantized-dequantized operands, forward and backward."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 128, generator=g, requires_grad=True)
    w = torch.randn(256, 128, generator=g, requires_grad=True)
    y = fp8_linear(x, w, None, recipe)
    dy = torch.randn(y.shape, generator=g)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    rowwise = recipe == "rowwise"
    e4, gdt = torch.float8_e4m3fn, (torch.float8_e4m3fn if rowwise else torch.float8_e5m2)

    def emu(a, b, adt, bdt):  # a [M, K] @ b [K, N], each scaled along K
        qa, sa = quantize(a, adt, -1 if rowwise else None)
        qb, sb = quantize(b, bdt, 0 if rowwise else None)
        return (qa.float() * sa) @ (qb.float() * sb)

    tol = {"rtol": 1e-2, "atol": 1e-2} if rowwise else {"rtol": 1e-5, "atol": 1e-5}  # rowwise rounds via bf16
    torch.testing.assert_close(y, emu(x, w.t(), e4, e4), **tol)
    torch.testing.assert_close(dx, emu(dy, w, gdt, e4), **tol)
    torch.testing.assert_close(dw, emu(dy.t(), x, gdt, e4), **tol)
    ref = x @ w.t()
    assert float((y - ref).detach().norm() / ref.detach().norm()) < 0.06  # and FP8 is near the real product


@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)),
                    reason="FP8 training speed and stability need a GPU of compute capability 8.9+ (H100)")
def test_fp8_trains_on_a_gpu():  # pragma: no cover - GPU only
    cfg = ModelConfig.make(vocab_size=512, dim=256, n_layers=2, n_heads=2, max_seq_len=64)
    dev = torch.device("cuda")
    model = Transformer(cfg).to(dev)
    apply_levers(model, Levers(fp8="tensorwise"), dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 512, (8, 64), device=dev)
    losses = []
    for _ in range(20):
        with torch.autocast("cuda", torch.bfloat16):
            loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# ---------------------------------------------------------------------------- refusals
def _args(**kw) -> TrainArgs:
    return TrainArgs(dataset="d", tokenizer="t", **kw)


@pytest.mark.parametrize("kw,needle", [
    ({"checkpoint_layers": 2}, "`checkpoint_layers` needs `gradient_checkpointing`"),
    ({"gradient_checkpointing": True, "checkpoint_layers": 0}, "must be >= 1"),
    ({"kernels": "cuda"}, "`kernels` 'cuda' is not one of auto, triton, torch"),
    ({"fp8_recipe": "rowwise"}, "`fp8_recipe` needs `fp8`"),
    ({"fp8": True, "fp8_recipe": "blockwise"}, "is not one of tensorwise, rowwise"),
    ({"fp8": True, "bf16_matmul": True}, "exclude each other"),
    ({"bf16_matmul": True, "precision": "bf16"}, "replaces bf16 autocast"),
])
def test_contradictory_lever_flags_are_refused(kw, needle):
    with pytest.raises(UserError, match=needle.replace("(", r"\(")):
        levers_of(_args(**kw))


def test_fp8_and_triton_are_refused_where_the_device_cannot(monkeypatch):
    with pytest.raises(UserError, match=r"`fp8` needs a CUDA GPU of compute capability 8.9"):
        check_device(levers_of(_args(fp8=True)), CPU)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA A100")
    with pytest.raises(UserError, match=r"NVIDIA A100 has 8.0"):
        check_device(levers_of(_args(fp8=True)), torch.device("cuda"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(UserError, match="`kernels` triton needs a CUDA device"):
        check_device(levers_of(_args(kernels="triton")), CPU)
    check_device(levers_of(_args(kernels="auto", gradient_checkpointing=True, fused_ce=True)), CPU)


# ------------------------------------------------------------------ post-training losses
def _two(cfg):
    model = Transformer(cfg)
    model.reset_parameters(0)
    return model


def _loss_and_grads(model, loss_fn, batch):
    model.zero_grad()
    loss, metrics = loss_fn(model, batch)
    loss.backward()
    return loss.detach(), metrics, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_fused_heads_of_sft_dpo_and_distill_equal_their_plain_losses():
    import functools

    from smedjan.post.distill import make_distill_loss
    from smedjan.post.dpo import make_dpo_loss
    from smedjan.post.sft import sft_loss

    cfg = ModelConfig.make(**{**MIXED, "logit_softcap": 6.0})
    model = _two(cfg)
    x, y = _batch(T=16)
    y[:, :5] = -1  # prompt positions are not targets
    # sft: assistant-only cross-entropy
    a = _loss_and_grads(model, sft_loss, (x, y, 20))
    b = _loss_and_grads(model, functools.partial(sft_loss, head=FusedCE(ignore_index=-1)), (x, y, 20))
    torch.testing.assert_close(b[0], a[0], rtol=1e-6, atol=1e-6)
    assert _rel(b[2], a[2]) < 1e-5
    # dpo: per-token log-probs summed per row (rows: 1 chosen, 1 rejected)
    batch = (x, y, torch.tensor([11, 11]), torch.tensor([-30.0, -31.0], dtype=torch.float64), 32)
    a = _loss_and_grads(model, make_dpo_loss(0.1, "sigmoid", 0.0), batch)
    b = _loss_and_grads(model, make_dpo_loss(0.1, "sigmoid", 0.0, fused=True), batch)
    torch.testing.assert_close(b[0], a[0], rtol=1e-6, atol=1e-6)
    assert b[1]["logps/chosen"] == pytest.approx(float(a[1]["logps/chosen"]), rel=1e-6)
    assert _rel(b[2], a[2]) < 1e-5
    # distill: a teacher of another width, its own soft-cap; KL and CE both
    teacher = Transformer(ModelConfig.make(**{**MIXED, "dim": 48, "n_heads": 3, "logit_softcap": 9.0})).eval()
    xy = _batch(T=16)
    a = _loss_and_grads(model, make_distill_loss(teacher, 2.0, 0.4), xy)
    b = _loss_and_grads(model, make_distill_loss(teacher, 2.0, 0.4, fused=True), xy)
    torch.testing.assert_close(b[0], a[0], rtol=1e-6, atol=1e-6)
    for k in ("kl", "ce"):
        torch.testing.assert_close(b[1][k], a[1][k], rtol=1e-6, atol=1e-6)
    assert _rel(b[2], a[2]) < 1e-5


def test_compiled_checkpointing_with_bf16_matmuls_is_refused_on_the_cpu():
    lv = levers_of(_args(gradient_checkpointing=True, bf16_matmul=True))
    with pytest.raises(UserError, match="miscompiled by torch.compile on the CPU"):
        check_device(lv, CPU, compiled=True)
    check_device(lv, CPU)  # eager is fine (and tested above)


@pytest.mark.slow
def test_levers_under_torch_compile_train_like_eager():
    """Checkpointing, fp16 storage and the fused head traced by torch.compile: the same
    losses as eager with the same levers, and the fp16 storage still in effect."""
    cfg = ModelConfig.make(vocab_size=97, dim=32, n_layers=2, n_heads=2, max_seq_len=16)
    lv = Levers(checkpoint_every=1, fp16_activations=True)
    head = FusedCE(chunk=16)

    def run(levers, compiled):
        model = Transformer(cfg)
        model.reset_parameters(0)
        if levers is not None:
            apply_levers(model, levers, CPU, compiled=compiled)
        model.rope(CPU)
        fwd = torch.compile(model) if compiled else model
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        out, grads = [], None
        for seed in (1, 2, 3):
            x, y = _batch(T=16, seed=seed)
            loss = fwd(x, y, head=head if levers is not None else None)
            loss.backward()
            grads = grads or {n: p.grad.clone() for n, p in model.named_parameters()}
            opt.step()
            opt.zero_grad()
            out.append(loss.item())
        return out, grads

    torch._dynamo.reset()
    plain, g_plain = run(None, False)
    eager, g_eager = run(lv, False)
    comp, g_comp = run(lv, True)
    assert comp == pytest.approx(eager, rel=1e-5) and eager == pytest.approx(plain, rel=1e-3)
    # fp16 rounding in both (compiled, AOTAutograd chooses which tensors to save, so the
    # roundings differ), where plain float32 compiled and eager agree to ~1e-6
    assert 1e-4 < _rel(g_comp, g_plain) < 5e-3 and _rel(g_comp, g_eager) < 5e-3
