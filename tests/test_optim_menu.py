"""The optimizer menu against references: Polar Express, NorMuon, the hybrid's AdamW branch
vs torch.optim.AdamW, plain Muon vs torch.optim.Muon, Sophia's bounds, 8-bit AdamW's
quantisation and state size, the CPU-offloaded AdamW vs AdamW, routing and refusals."""

from __future__ import annotations

import math

import pytest
import torch

from smedjan.errors import UserError
from smedjan.model import ModelConfig, Transformer
from smedjan.optim import OptimizerSettings, build_optimizer, param_groups
from smedjan.optim.adamw_8bit import BLOCK, SIGNED, UNSIGNED, AdamW8bit, dequantize, quantize
from smedjan.optim.adamw_cpu import OffloadAdamW
from smedjan.optim.common import StepSchedules
from smedjan.optim.muon import NS5, POLAR_EXPRESS, MuonAdamW, normuon, orthogonalize
from smedjan.optim.sophia import SophiaG
from smedjan.training.schedule import Schedule


def micro(**kw) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig.make(vocab_size=97, dim=32, n_layers=2, n_heads=4, max_seq_len=16, **kw))


def grads_for(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 97, (2, 16), generator=g)
    model.zero_grad(set_to_none=True)
    model(x, x.roll(-1, 1)).backward()


# --------------------------------------------------------------------------- Muon
@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (128, 384), (32, 512), (300, 17)])
def test_polar_express_maps_singular_values_near_one(shape):
    """Rectangular fp32 matrices, gaussian and with singular values spread over 100x (5 steps
    are tuned for that range: far smaller ones, as in a square gaussian's tail, stay below)."""
    g = torch.Generator().manual_seed(sum(shape))
    for cond in (1.0, 100.0):
        A = torch.randn(shape, generator=g)
        U, S, Vh = torch.linalg.svd(A, full_matrices=False)
        S = torch.logspace(0, -math.log10(cond), S.numel()) if cond > 1 else S
        G = (U * S) @ Vh
        sv = torch.linalg.svdvals(orthogonalize(G.float(), POLAR_EXPRESS).double())
        assert sv.min() >= 0.8 and sv.max() <= 1.2, (shape, cond, sv.min(), sv.max())
        # and the directions are G's: the polar factor's, up to the singular-value spread
        polar = (U @ Vh).double()
        cos = (orthogonalize(G.float()).double() * polar).sum() / (polar.norm() * orthogonalize(G.float()).norm())
        assert cos > 0.98


def test_newton_schulz_quintic_stays_in_its_documented_band():
    G = torch.randn(64, 192, generator=torch.Generator().manual_seed(1))
    sv = torch.linalg.svdvals(orthogonalize(G, NS5, safety=1.0, eps=1e-7).double())
    assert sv.min() >= 0.6 and sv.max() <= 1.25


def test_normuon_keeps_the_frobenius_norm_and_equalises_neurons():
    g = torch.Generator().manual_seed(2)
    for m, n in ((64, 32), (32, 64)):
        O = torch.randn(3, m, n, generator=g) * torch.linspace(0.1, 3, m if m >= n else n).view(
            (1, m, 1) if m >= n else (1, 1, n))
        v = torch.zeros((3, m, 1) if m >= n else (3, 1, n))
        out = normuon(O, v, beta2=0.0)  # beta2 0: v is this update's mean square exactly
        torch.testing.assert_close(out.norm(dim=(-2, -1)), O.norm(dim=(-2, -1)), rtol=1e-6, atol=0)
        red = -1 if m >= n else -2
        rms = out.square().mean(dim=red).sqrt()
        assert (rms.std(dim=-1) / rms.mean(dim=-1)).max() < 1e-4  # every neuron's update has the same RMS


def test_plain_muon_equals_torch_muon_where_the_definitions_agree(monkeypatch):
    """torch.optim.Muon: Nesterov momentum 0.95, the quintic NS iteration, lr x sqrt(max(1,
    rows/cols)), decoupled decay p (1 - lr wd). Ours with those settings, both iterating in
    fp32 (torch's iteration is bf16-only, so its function is swapped for ours in fp32; the
    bf16 functions are compared below), agree to float rounding over 5 steps."""
    import torch.optim._muon as tm

    monkeypatch.setattr(tm, "_zeropower_via_newtonschulz", lambda grad, coeffs, steps, eps: orthogonalize(
        grad, (tuple(coeffs),) * steps, dtype=torch.float32, safety=1.0, eps=eps))
    torch.manual_seed(0)
    shapes = [(48, 16), (16, 48), (32, 32)]
    ours = [torch.nn.Parameter(torch.randn(s) * 0.1) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    group = {"params": ours, "names": ["a", "b", "c"], "role": "matrix", "kind": "muon", "peak_lr": 0.02, "lr": 0.02,
             "momentum": 0.95, "nesterov": True, "orthogonalizer": "ns5", "orth_dtype": "fp32", "normuon": False,
             "beta2": 0.95, "cautious": False, "cautious_wd": False, "weight_decay": 0.1, "peak_wd": 0.1}
    opt = MuonAdamW([group])
    torch_opt = torch.optim.Muon(ref, lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True, adjust_lr_fn="original")
    g = torch.Generator().manual_seed(3)
    start = [p.detach().clone() for p in ours]
    for _ in range(5):
        for p, q in zip(ours, ref):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        opt.step()
        torch_opt.step()
    for p, q, p0 in zip(ours, ref, start):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        assert (p - p0).abs().max() > 1e-3


def test_bf16_iteration_matches_torch_muons_to_bf16_rounding():
    from torch.optim._muon import _zeropower_via_newtonschulz as torch_ns

    g = torch.Generator().manual_seed(0)
    for shape in ((48, 16), (16, 48), (32, 32)):
        G = torch.randn(shape, generator=g)
        ref = torch_ns(G, NS5[0], 5, 1e-7).float()
        ours = orthogonalize(G, NS5, dtype=torch.bfloat16, safety=1.0, eps=1e-7)
        assert ours.dtype == torch.float32
        assert (ours - ref).norm() / ref.norm() < 0.05  # bf16: 8 bits of mantissa, 5 rounds of three products


def test_hybrid_adamw_branch_equals_torch_adamw():
    m = micro(tie_embeddings=False)
    ref = micro(tie_embeddings=False)
    opt = build_optimizer("hybrid", param_groups(m, 0.1), OptimizerSettings(width=32))
    adam_groups = [g for g in opt.param_groups if g["kind"] == "adamw"]
    assert {g["role"] for g in adam_groups} == {"embedding", "head", "norm"}
    refp = dict(ref.named_parameters())
    torch_opt = torch.optim.AdamW([{"params": [refp[n] for n in g["names"]], "lr": g["lr"], "betas": g["betas"],
                                    "eps": g["eps"], "weight_decay": g["weight_decay"]} for g in adam_groups])
    for step in range(10):
        grads_for(m, step)  # the same gradients for both (ref's matrices do not move)
        for n, p in m.named_parameters():
            refp[n].grad = p.grad.clone()
        opt.step()
        torch_opt.step()
    for g in adam_groups:
        for n, p in zip(g["names"], g["params"]):
            torch.testing.assert_close(p, refp[n], rtol=1e-5, atol=1e-5)
    moved = [n for g in opt.param_groups if g["kind"] == "muon" for n in g["names"]]
    assert moved and all(not torch.equal(dict(m.named_parameters())[n], refp[n]) for n in moved)


def test_routing_roles_and_refusals():
    m = micro(tie_embeddings=False)
    opt = build_optimizer("muon-adamw", param_groups(m, 0.1), OptimizerSettings(width=32))
    kinds = {g["role"]: g["kind"] for g in opt.param_groups}
    assert kinds == {"matrix": "muon", "embedding": "adamw", "head": "adamw", "norm": "adamw"}
    # nanochat's width scaling of the AdamW rates (hybrid only), the batch scaling of all
    s = OptimizerSettings(width=32, role_lr={"embedding_lr": 0.3, "matrix_lr": 0.01}, lr_scale=0.5)
    by = {g["role"]: g for g in build_optimizer("hybrid", param_groups(m, 0.1), s).param_groups}
    assert by["embedding"]["peak_lr"] == pytest.approx(0.3 * (768 / 32) ** 0.5 * 0.5)
    assert by["matrix"]["peak_lr"] == pytest.approx(0.005)
    plain = {g["role"]: g for g in build_optimizer("muon", param_groups(m, 0.1), OptimizerSettings(lr=1e-3)).param_groups}
    assert plain["embedding"]["lr"] == 1e-3 and plain["matrix"]["lr"] == 0.02 and plain["norm"]["betas"] == (0.9, 0.95)
    # a 1-D tensor with the matrix role: muon refuses it, hybrid sends it to AdamW
    groups = param_groups(m, 0.1)
    mat = next(g for g in groups if g["role"] == "matrix")
    mat["params"].append(torch.nn.Parameter(torch.ones(4)))
    mat["names"].append("odd.gain")
    with pytest.raises(UserError, match="odd.gain has the role matrix but is 1-D"):
        build_optimizer("muon", groups, OptimizerSettings())
    hyb = build_optimizer("hybrid", groups, OptimizerSettings())
    assert any("odd.gain" in g["names"] and g["kind"] == "adamw" for g in hyb.param_groups)
    no_matrix = [g for g in param_groups(m, 0.1) if g["role"] != "matrix"]
    with pytest.raises(UserError, match="no hidden matrices"):
        build_optimizer("muon", no_matrix, OptimizerSettings())


@pytest.mark.parametrize("kw,match", [
    ({"normuon": True}, "`normuon` does not apply to `optimizer` adamw"),
    ({"sophia_rho": 0.1}, "`sophia_rho` does not apply"),
    ({"role_lr": {"matrix_lr": -1.0}}, "`matrix_lr` -1.0 must be a positive number"),
    ({"role_lr": {"embedding_lr": float("nan")}}, "`embedding_lr` nan"),
    ({"muon_momentum": 1.2}, "`muon_momentum` does not apply"),
    ({"wd_schedule": "sometimes"}, "`wd_schedule` 'sometimes'"),
])
def test_bad_settings_are_one_line_errors(kw, match):
    with pytest.raises(UserError, match=match):
        build_optimizer("adamw", param_groups(micro(), 0.1), OptimizerSettings(**kw))
    with pytest.raises(UserError, match="`muon_momentum` 1.2 must be in"):
        build_optimizer("hybrid", param_groups(micro(), 0.1), OptimizerSettings(muon_momentum=1.2))
    with pytest.raises(UserError, match="`hessian_interval` 0"):
        build_optimizer("sophia", param_groups(micro(), 0.1), OptimizerSettings(hessian_interval=0))


def test_step_schedules_follow_nanochat():
    lr = Schedule("trapezoid", total_steps=100, warmup=5, warmdown=0.4)
    s = StepSchedules(lr, "cosine", (0.85, 0.97, 0.9), 20)
    assert s.muon_momentum(0) == 0.85 and s.muon_momentum(10) == pytest.approx(0.91)
    assert s.muon_momentum(30) == 0.97 and s.muon_momentum(60) == 0.97
    assert s.muon_momentum(80) == pytest.approx(0.935) and s.muon_momentum(100) == pytest.approx(0.9)
    assert s.weight_decay(0) == 1 and s.weight_decay(50) == pytest.approx(0.5) and s.weight_decay(100) == 0
    assert StepSchedules(lr, "linear").weight_decay(25) == 0.75 and StepSchedules(lr).weight_decay(99) == 1


# ------------------------------------------------------------------------- Sophia
def test_sophia_moves_each_coordinate_at_most_lr_and_sign_m_without_curvature():
    m = micro()
    for p in m.parameters():
        p.requires_grad_(True)
    groups = param_groups(m, 0.0)
    for g in groups:
        g["peak_lr"] = g["lr"] = 1e-2
    opt = SophiaG(groups, rho=0.04)
    before = [p.detach().clone() for p in m.parameters()]
    grads_for(m, 0)
    opt.step()  # h = 0: every coordinate with m != 0 moves by exactly lr sign(m)
    for p, b in zip(m.parameters(), before):
        m1 = opt.state[p]["exp_avg"]
        torch.testing.assert_close(p - b, -1e-2 * m1.sign(), rtol=0, atol=1e-8)
    x = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(5))
    opt.update_hessian(m, (x, x.roll(-1, 1)), step=0)
    assert all((opt.state[p]["hessian"] >= 0).all() for p in m.parameters())
    assert any((opt.state[p]["hessian"] > 0).any() for p in m.parameters())
    for step in range(1, 4):
        before = [p.detach().clone() for p in m.parameters()]
        grads_for(m, step)
        opt.step()
        for p, b in zip(m.parameters(), before):
            assert (p - b).abs().max() <= 1e-2 * (1 + 1e-6)
    assert 0 < opt.after_step(m, (x, x), 0)["clip_rate"] <= 1


def test_sophia_label_draws_do_not_touch_the_global_rng():
    m = micro()
    opt = build_optimizer("sophia", param_groups(m, 0.1), OptimizerSettings(hessian_interval=1))
    x = torch.randint(0, 97, (2, 16))
    grads_for(m, 0)
    opt.step()
    state = torch.get_rng_state()
    opt.after_step(m, (x, x), 0)
    assert torch.equal(state, torch.get_rng_state())


# ------------------------------------------------------------------------- 8-bit
def test_dynamic_maps_and_round_trip_error():
    assert SIGNED.numel() == UNSIGNED.numel() == 256 and (SIGNED.diff() > 0).all() and (UNSIGNED.diff() > 0).all()
    assert SIGNED.min() == -SIGNED[SIGNED < 1].max() and SIGNED.max() == 1 and UNSIGNED.min() == 0
    x = torch.randn(10 * BLOCK + 17, generator=torch.Generator().manual_seed(0))
    codes, absmax = quantize(x, SIGNED)
    assert codes.dtype == torch.uint8 and codes.numel() == x.numel() and absmax.numel() == 11
    err = (dequantize(codes, absmax, SIGNED, x.shape) - x).abs()
    per_block = torch.nn.functional.pad(err, (0, (-x.numel()) % BLOCK)).view(-1, BLOCK).amax(1)
    assert (per_block <= 0.9 / 128 * (1 + 1e-5) * absmax).all()  # half the widest gap: 0.00703
    v = x.square()
    codes, absmax = quantize(v, UNSIGNED)
    err = (dequantize(codes, absmax, UNSIGNED, v.shape) - v).abs()
    assert err.max() <= 0.0036 * absmax.max()


def _train(opt_name: str, steps: int) -> tuple[float, torch.optim.Optimizer, torch.nn.Module]:
    m = micro()
    opt = build_optimizer(opt_name, param_groups(m, 0.1), OptimizerSettings(lr=3e-3))
    data = torch.randint(0, 97, (64, 17), generator=torch.Generator().manual_seed(7))
    for step in range(steps):
        batch = data[(step * 4) % 64:(step * 4) % 64 + 4]
        loss = m(batch[:, :-1], batch[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        return float(m(data[:, :-1], data[:, 1:])), opt, m


def test_adamw_8bit_state_bytes_and_loss_within_3_percent_of_fp32():
    loss8, opt, m = _train("adamw-8bit", 200)
    loss32, _, _ = _train("adamw", 200)
    assert abs(loss8 - loss32) <= 0.03 * loss32, (loss8, loss32)
    quantized = [p for p in m.parameters() if p.numel() >= 4096]
    assert quantized
    for p in quantized:
        st = opt.state[p]
        nbytes = sum(t.numel() * t.element_size() for k, t in st.items() if k != "step")
        assert nbytes / p.numel() <= 2.1, nbytes / p.numel()
        assert st["exp_avg"].dtype == st["exp_avg_sq"].dtype == torch.uint8


def test_adamw_8bit_state_dict_round_trip_keeps_codes():
    _, opt, m = _train("adamw-8bit", 3)
    fresh = AdamW8bit(param_groups(m, 0.1))
    fresh.load_state_dict(opt.state_dict())
    for p in m.parameters():
        for k, v in opt.state[p].items():
            assert fresh.state[p][k].dtype == v.dtype and torch.equal(fresh.state[p][k], v)


# ----------------------------------------------------------------------- offload
def test_offloaded_adamw_equals_adamw_bit_for_bit():
    """The offload path (CPU copies of weight and gradient, CPU update, copy back) run on CPU
    tensors: the same numbers as fused AdamW; and its state survives a state_dict round trip."""
    a, b = micro(), micro()
    ga, gb = param_groups(a, 0.1), param_groups(b, 0.1)
    for g in ga + gb:
        g["peak_lr"] = g["lr"] = 1e-2
    ref = torch.optim.AdamW(ga, lr=1e-2, betas=(0.9, 0.95), eps=1e-5, fused=True)
    off = OffloadAdamW(gb, betas=(0.9, 0.95), eps=1e-5)
    for step in range(4):
        grads_for(a, step)
        grads_for(b, step)
        ref.step()
        off.step()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    again = OffloadAdamW(param_groups(b, 0.1), betas=(0.9, 0.95), eps=1e-5)
    again.load_state_dict(off.state_dict())
    assert all(t.device.type == "cpu" for st in again.state.values() for t in st.values())


# ------------------------------------------------------------------ nanochat's knobs
def test_total_batch_size_rule_and_scaling():
    from smedjan.training.driver import resolve_total_batch
    from smedjan.training.options import RunOptions

    o = RunOptions(batch_size=4, total_batch_size=-1)
    assert resolve_total_batch(o, 32, 2, horizon=(5e9, 5e9)) == 1.0  # at the reference horizon: 2^19 tokens
    assert o.total_batch_size == 2 ** 19 and o.grad_accum == 2 ** 19 // (4 * 32 * 2)
    o = RunOptions(batch_size=4, total_batch_size=-1)
    scale = resolve_total_batch(o, 32, 1, horizon=(0.5 ** (1 / 0.383) * 1e9, 1e9))  # half the batch
    assert o.total_batch_size == 2 ** 18 and scale == pytest.approx(0.5 ** 0.5)
    o = RunOptions(batch_size=4, total_batch_size=512)
    assert resolve_total_batch(o, 32, 1) == pytest.approx((512 / 2 ** 19) ** 0.5) and o.grad_accum == 4
    assert resolve_total_batch(RunOptions(), 32, 1) == 1.0
    with pytest.raises(UserError, match="`grad_accum` 3 and `total_batch_size` 512 disagree"):
        resolve_total_batch(RunOptions(batch_size=4, grad_accum=3, total_batch_size=512), 32, 1)


def test_warmup_ratio_and_final_lr_frac():
    from smedjan.training.driver import check_run, resolve_warmup
    from smedjan.training.options import RunOptions
    from smedjan.training.pretrain import TrainArgs

    assert resolve_warmup(RunOptions(warmup_ratio=0.1), 480) == 48
    assert resolve_warmup(RunOptions(), 480) == 24 and resolve_warmup(RunOptions(warmup=7), 480) == 7
    args = TrainArgs(dataset="d", tokenizer="t", warmup_ratio=0.25)  # train's --warmup default 2000 is not "given"
    assert resolve_warmup(args, 100) == 25
    with pytest.raises(UserError, match="`warmup_ratio` and `warmup` exclude each other"):
        resolve_warmup(RunOptions(warmup=5, warmup_ratio=0.1), 100)
    with pytest.raises(UserError, match="`final_lr_frac` and `min_lr` exclude each other"):
        check_run(RunOptions(final_lr_frac=0.1, min_lr=1e-5))
    with pytest.raises(UserError, match="`min_lr` does not apply to `optimizer` hybrid"):
        check_run(RunOptions(optimizer="hybrid", min_lr=1e-5))
    check_run(RunOptions(optimizer="muon-adamw", final_lr_frac=0.05))
