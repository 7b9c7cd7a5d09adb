"""BitNet b1.58 (`--bitnet`, smedjan.model.bitnet): the quantisers against float64 numpy
references, the straight-through gradient, what the forward really multiplies (at most 3
weight values per matrix, at most 256 activation levels per token, the head untouched),
decode with state against the full forward; the run through `smedjan train` (below the
unigram bound, resumed bit for bit, decoded, refused by both exporters) is a row of
tests/test_train_regularisers.py that calls `check_trained`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from typer.testing import CliRunner

from test_train_errors import Res

from smedjan.errors import UserError
from smedjan.infer.runner import ModelRunner, fast_path_refusal, runner_for
from smedjan.model import ModelConfig, Transformer
from smedjan.model.bitnet import BitLinear, act_codes, act_quant, bit_linear, weight_codes, weight_quant


def _cfg(**kw) -> ModelConfig:
    return ModelConfig.make(vocab_size=97, dim=32, n_layers=2, n_heads=2, max_seq_len=128, bitnet=True, **kw)


# ---------------------------------------------------------------------- quantisers
def test_weight_quantiser_matches_a_float64_reference():
    g = torch.Generator().manual_seed(0)
    for w in (torch.randn(48, 32, generator=g, dtype=torch.float64) * 0.02,
              torch.randn(7, 5, generator=g, dtype=torch.float64) * 3):
        a = w.numpy()
        s = math.fsum(np.abs(a).ravel()) / a.size  # the exact mean, rounded once
        t = np.clip(np.round(a / s), -1, 1)
        codes, scale = weight_codes(w)
        assert abs(scale.item() - s) <= 4 * math.ulp(s)  # a sum's order moves the last bits only
        assert np.array_equal(codes.numpy(), t)  # the ternary values: bit-exact
        assert np.array_equal(weight_quant(w).numpy(), t * scale.item())  # exactly {-s, 0, s}
        assert len(np.unique(weight_quant(w).numpy())) == 3
        # float32 weights: the same codes (computed in float32)
        assert np.array_equal(weight_codes(w.float())[0].numpy(), t)
    assert torch.equal(weight_quant(torch.zeros(3, 4)), torch.zeros(3, 4))  # no 0 / 0


def test_activation_quantiser_matches_a_float64_reference():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 64, generator=g, dtype=torch.float64) * torch.logspace(-3, 2, 5, dtype=torch.float64)[:, None]
    x[0, 0] = 0  # an all-zero token stays zero
    a = x.numpy()
    m = np.maximum(np.abs(a).max(-1, keepdims=True), 1e-5)
    q = np.clip(np.round(a * 127 / m), -128, 127)
    codes, scale = act_codes(x)
    assert np.array_equal(codes.numpy(), q) and np.array_equal(scale.numpy(), m / 127)
    xq = act_quant(x)
    assert np.array_equal(xq.numpy(), q * (m / 127))
    levels = [len(torch.unique(row)) for row in xq.reshape(-1, 64)]
    assert max(levels) <= 256 and levels[0] == 1
    assert torch.equal(codes.abs().amax(-1)[1:], torch.full((3, 5), 127.0, dtype=torch.float64)[1:])


def test_ste_gradient_is_the_linear_gradient_at_the_quantised_operands():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 6, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(8, 16, generator=g, dtype=torch.float64) * 0.1).requires_grad_()
    up = torch.randn(2, 6, 8, generator=g, dtype=torch.float64)
    bit_linear(x, w).backward(up)
    xq = act_quant(x.detach()).requires_grad_()
    wq = weight_quant(w.detach()).requires_grad_()
    y = F.linear(xq, wq)
    y.backward(up)
    assert torch.equal(bit_linear(x, w), y)
    assert torch.equal(x.grad, xq.grad) and torch.equal(w.grad, wq.grad)
    assert not torch.equal(x.grad, F.linear(up, w.detach().T))  # not the gradient of the float layer


# --------------------------------------------------------------------- the model
class _Linears(TorchFunctionMode):
    """Records every F.linear call's (input, weight) under the model's own modes."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.linear:
            self.calls.append((args[0].detach(), args[1].detach()))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mlp", ["swiglu", "relu2"])
def test_forward_multiplies_ternary_weights_and_8bit_activations_after_training(mlp):
    torch.manual_seed(0)
    model = Transformer(_cfg(mlp=mlp, tie_embeddings=False))
    names = {n for n, m in model.named_modules() if isinstance(m, BitLinear)}
    assert len(names) == 2 * (4 + (3 if mlp == "swiglu" else 2))
    assert sorted(n for n, _ in model.named_parameters()) == sorted(model.param_roles())  # names unchanged
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx = torch.randint(0, 97, (4, 80))
    for _ in range(4):
        opt.zero_grad()
        model(idx[:, :-1], idx[:, 1:]).backward()
        opt.step()
    with torch.no_grad(), _Linears() as rec:
        short = model(idx[:, :10])  # 40 tokens: a matmul per projection (not fused)
    hidden, head = rec.calls[:-1], rec.calls[-1]
    assert len(hidden) == len(names)
    for x, w in hidden:
        assert len(torch.unique(w)) <= 3
        assert max(len(torch.unique(row)) for row in x.reshape(-1, x.shape[-1])) <= 256
    assert head[1] is not None and len(torch.unique(head[1])) > 1000  # the head stays full precision
    with torch.no_grad():
        long = model(idx)  # 320 tokens: the fused q/k/v and gate/up matmuls; each matrix keeps its own scale
    torch.testing.assert_close(long[:, :10], short, rtol=1e-5, atol=1e-5)


def test_decode_with_state_matches_the_full_forward():
    torch.manual_seed(0)
    model = Transformer(_cfg(layer_pattern="attention,linear_attn")).double().eval()
    assert fast_path_refusal(model) == "BitNet b1.58 (quantised linear layers)"
    assert isinstance(runner_for(model), ModelRunner)  # generate, chat and serve decode through the model
    idx = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        full = model(idx)
        st = model.new_state(2, 32)
        steps = [model(idx[:, :7], state=st)] + [model(idx[:, t:t + 1], state=st, start=t) for t in range(7, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-10, atol=1e-10)
    plain = Transformer(_cfg(layer_pattern="attention,linear_attn").replace(bitnet=False)).double()
    plain.load_state_dict(model.state_dict())  # the same weights in full precision: another function
    with torch.no_grad():
        assert (plain(idx) - full).abs().max() > 1e-3


def test_config_keeps_the_flag_and_refuses_the_parts_it_cannot_quantise():
    cfg = _cfg()
    assert ModelConfig.from_dict(json.loads(cfg.to_json())).bitnet is True
    assert ModelConfig.from_dict({k: v for k, v in cfg.to_dict().items() if k != "bitnet"}).bitnet is False
    for kw, needle in (({"mixer": "ssm"}, "not ssm"), ({"mla_latent_dim": 16}, "not mla"),
                       ({"n_experts": 4}, "not --mlp moe")):
        with pytest.raises(UserError, match=needle):
            _cfg(**kw)


# ------------------------------------------------------------- through smedjan train
# tests/test_train_regularisers.py trains `--bitnet` below the unigram bound and resumes it
# bit for bit (its OPTIONS); then it calls this on the run's final.bin.
def _tool(*args) -> Res:
    from smedjan_tools.cli import app

    return Res(CliRunner().invoke(app, [*map(str, args)]))


def check_trained(final, state, folder):
    """The checkpoint says bitnet (so sft, dpo, generate, chat and serve build the quantised
    forward), its matrices quantise to 3 values, it decodes, and both exporters refuse it."""
    assert final.config.bitnet is True
    w = final.tensors["layers.1.ffn.w2.weight"]
    assert len(torch.unique(w)) > 3 and len(torch.unique(weight_quant(w))) == 3
    res = _tool("generate", "-c", folder / "final.bin", "-p", "ROMEO:", "-n", "4", "--temperature", "0", "--json")
    assert res.code == 0 and json.loads(res.out)["completions"][0]["completion_tokens"] >= 1, res
    for tool, out in (("export-gguf", folder / "m.gguf"), ("export-hf", folder / "hf")):
        res = _tool(tool, "-c", folder / "final.bin", "-o", out)
        assert res.code == 2 and "Traceback" not in res.err, res
        lines = [ln for ln in res.err.splitlines() if "error:" in ln]
        assert len(lines) == 1 and lines[0].startswith(f"smedjan {tool}: error: ") and "BitNet b1.58" in lines[0], res
        assert not out.exists()
