"""µP (`--mup-base`, smedjan.model.mup): the coordinate check of Tensor Programs V (activation
scales flat with width under µP, logits growing under the standard parametrisation), the
multipliers and rates against plain float64 references, µP at its base width equal to SP,
and bad input refused with one line. Training below the unigram bound, bit-exact resume
through `smedjan train`, decoding and the exporters' refusal are the `mup` row of
tests/test_train_regularisers.py; DDP is the adamw-cpu row of tests/test_train_ddp.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from test_train_errors import assert_refused
from test_train_errors import run as cli_train
from test_train_regularisers import one_thread  # noqa: F401 (autouse: one thread, as the bit-exact runs)
from train_helpers import MICRO, token_files

from smedjan.errors import UserError
from smedjan.model import ModelConfig, Transformer
from smedjan.model.mup import attention_scale, scale_rates, width_mult
from smedjan.optim import OptimizerSettings, build_optimizer, param_groups


WIDTHS = (64, 128, 256, 512)


def coordinate_check(mup: bool, steps: int = 8, lr: float = 1e-2, V: int = 128, T: int = 32, B: int = 4):
    """Slope of log mean |activation| against log width after `steps` Adam steps on one fixed
    batch, for the embedding, each block's output (the residual stream) and the logits.
    2 layers, 2 heads (the head dim grows with the width), FFN 4 x dim so every matrix's
    fan-in grows with the width alike; µP's base is the narrowest width."""
    x = torch.randint(0, V, (B, T + 1), generator=torch.Generator().manual_seed(0))
    scales: dict[str, list[float]] = {}
    for w in WIDTHS:
        cfg = ModelConfig.make(V, dim=w, n_layers=2, n_heads=2, ffn_hidden=4 * w, max_seq_len=T,
                               mup_base=WIDTHS[0] if mup else 0)
        model = Transformer(cfg)
        model.reset_parameters(seed=0)
        opt = build_optimizer("adamw", param_groups(model, 0.0), OptimizerSettings(lr=lr))
        scale_rates(opt, cfg, "adamw")
        for _ in range(steps):
            model(x[:, :-1], x[:, 1:]).backward()
            opt.step()
            opt.zero_grad()
        seen: dict[str, float] = {}
        hooks = [m.register_forward_hook(lambda _m, _i, out, n=n, seen=seen: seen.__setitem__(n, out.abs().mean().item()))
                 for n, m in model.named_modules() if n in ("tok_embeddings", "layers.0", "layers.1")]
        with torch.no_grad():
            seen["logits"] = model(x[:, :-1]).abs().mean().item()
        for h in hooks:
            h.remove()
        for k, v in seen.items():
            scales.setdefault(k, []).append(v)
    return {k: float(np.polyfit(np.log(WIDTHS), np.log(v), 1)[0]) for k, v in scales.items()}


def test_coordinate_check_is_flat_under_mup_and_logits_grow_under_sp():
    sp, mup = coordinate_check(False), coordinate_check(True)
    print("slopes of log mean |h| vs log width: SP", {k: round(v, 3) for k, v in sp.items()}, "µP",
          {k: round(v, 3) for k, v in mup.items()})
    # SP: Adam moves each matrix entry by ~lr whatever the width, so a matrix's output moves
    # by ~lr x fan_in: the residual stream and the logits grow with the width.
    assert sp["logits"] > 0.15 and sp["layers.1"] > 0.15
    assert all(abs(s) < 0.15 for s in mup.values()), mup


def test_mup_at_its_base_width_is_the_standard_parametrisation():
    """width_mult 1: the same weights, logits and optimizer, bit for bit (rates tuned at the
    base width are SP's)."""
    sp = ModelConfig.make(97, dim=32, n_layers=2, n_heads=2, max_seq_len=16)
    mu = sp.replace(mup_base=32)
    a, b = Transformer(sp), Transformer(mu)
    a.reset_parameters(seed=3)
    b.reset_parameters(seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    x = torch.randint(0, 97, (2, 16))
    assert torch.equal(a(x), b(x))
    oa = build_optimizer("adamw", param_groups(a, 0.1), OptimizerSettings(lr=1e-3))
    ob = build_optimizer("adamw", param_groups(b, 0.1), OptimizerSettings(lr=1e-3))
    scale_rates(ob, mu, "adamw")
    assert [(g["peak_lr"], g["eps"]) for g in oa.param_groups] == [(g["peak_lr"], g["eps"]) for g in ob.param_groups]


def test_mup_forward_matches_a_float64_reference():
    """Logits = (h / width_mult) W^T and attention softmax(q k^T / sqrt(head_dim x width_mult))
    v, computed by hand in float64 from the model's weights."""
    cfg = ModelConfig.make(31, dim=32, n_layers=1, n_heads=2, max_seq_len=8, mup_base=8, rope_theta=10000.0)
    m = width_mult(cfg)
    assert m == 4 and cfg.attention.scale == attention_scale(cfg) == 1 / math.sqrt(16 * 4)
    model = Transformer(cfg).double()
    x = torch.randint(0, 31, (2, 8))
    with torch.no_grad():
        h = model.hidden(x)
        torch.testing.assert_close(model.logits(h), h @ model.tok_embeddings.weight.T / m, rtol=1e-12, atol=1e-12)
        att = model.layers[0].mixer
        from smedjan.model.parts import Context

        xn = model.layers[0].mixer_norm(model.tok_embeddings(x))
        ctx = Context(start=0, length=8, tables=model.rope_tables, device=x.device, dtype=torch.float64, states=None,
                      rows=slice(0, 2))
        q, k, v = att.qkv(xn, ctx)
        s = (q @ k.transpose(-1, -2)) / math.sqrt(16 * 4)
        s = s.masked_fill(~torch.ones(8, 8, dtype=torch.bool).tril(), float("-inf"))
        y = (s.softmax(-1) @ v).transpose(1, 2).reshape(2, 8, 32) @ att.wo.weight.T
        torch.testing.assert_close(att(xn, ctx, 0), y, rtol=1e-12, atol=1e-12)
        # the fused-CE head reads the same multiplier
        from smedjan.training.heads import FusedCE

        y_t = torch.randint(0, 31, (2, 8))
        torch.testing.assert_close(model(x, y_t, head=FusedCE()), model(x, y_t), rtol=1e-6, atol=1e-6,
                                   check_dtype=False)  # its chunks run in float32


def test_init_and_per_role_rates():
    cfg = ModelConfig.make(97, dim=256, n_layers=2, n_heads=4, max_seq_len=16, mup_base=64, tie_embeddings=False)
    model = Transformer(cfg)
    model.reset_parameters(seed=0)
    assert model.layers[0].mixer.wq.weight.std().item() == pytest.approx(0.02 / 2, rel=0.02)  # / sqrt(4)
    assert model.layers[0].mixer.wo.weight.std().item() == pytest.approx(0.02 / 2 / 2, rel=0.02)  # / sqrt(2 x 2)
    assert model.tok_embeddings.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert model.output.weight.std().item() == pytest.approx(0.02, rel=0.02)
    opt = build_optimizer("adamw", param_groups(model, 0.1), OptimizerSettings(lr=1e-3, eps=1e-6))
    scale_rates(opt, cfg, "adamw")
    got = {g["role"]: (g["peak_lr"], g["eps"]) for g in opt.param_groups}
    assert got == {"matrix": (1e-3 / 4, 1e-6 / 4), "embedding": (1e-3, 1e-6), "head": (1e-3, 1e-6),
                   "norm": (1e-3, 1e-6)}
    # muon: Muon's own width-aware update of the matrices is kept; its AdamW roles are µP's "unchanged"
    opt = build_optimizer("muon", param_groups(model, 0.1), OptimizerSettings(lr=1e-3))
    before = [g["peak_lr"] for g in opt.param_groups]
    scale_rates(opt, cfg, "muon")
    assert [g["peak_lr"] for g in opt.param_groups] == before
    opt = build_optimizer("hybrid", param_groups(model, 0.1), OptimizerSettings(lr=1e-3))
    with pytest.raises(UserError, match="`optimizer` hybrid"):
        scale_rates(opt, cfg, "hybrid")


@pytest.mark.parametrize("flags,needle", [
    (["--mup-base", "0"], "`mup_base` 0 must be a width >= 1"),
    (["--mup-base", "64"], "--mup-base 64 must be a width in [1, the model's dim 32]"),
    (["--mup-base", "5"], "--mup-base 5: the base model's head dim would be 2.5"),
    (["--mup-base", "8", "--ssm"], "not ssm"),
    (["--mup-base", "8", "--optimizer", "hybrid"], "`optimizer` hybrid"),
])
def test_bad_mup_base_is_one_line(flags, needle, tmp_path_factory, tokenizer_path, tmp_path):
    train_bin, _ = token_files(tmp_path_factory, tokenizer_path)
    out = tmp_path / "ck"
    args = [a for a in MICRO if a not in ("--lr", "3e-3")] if "hybrid" in flags else MICRO
    res = cli_train("--dataset", train_bin, "--tokenizer", tokenizer_path, *args, "--steps", "2", *flags,
                    "--checkpoint-dir", out)
    assert_refused(res, out, needle.replace("`mup_base`", "--mup-base").replace("`optimizer`", "--optimizer"))



def test_help_names_the_method_and_the_optimizers():
    from typer.testing import CliRunner

    from smedjan_tools.cli import app

    out = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "400"}).stdout
    for text in ("--mup-base", "Tensor Programs V", "Under muon", "hybrid is refused", "Default: off"):
        assert text in out, text
