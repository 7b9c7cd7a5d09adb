"""Mixture-of-Experts (smedjan.model.moe): sorted dispatch against a per-token loop in
float64, top-k = E against the dense softmax mixture, the router losses against their
formulas, capacity drops, Muon per expert, decoding with state, the flags' one-line errors,
and `smedjan train --n-experts` end to end (below the unigram bound, bit-exact resume)."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from helpers import assert_user_error, smedjan
from train_helpers import MICRO, losses, metrics, token_files, train

from smedjan.model import ModelConfig, Transformer
from smedjan.model.moe import MoE, active_params, moe_layers, recording, router_losses


def cfg_of(**kw) -> ModelConfig:
    base = dict(vocab_size=97, dim=16, n_layers=2, n_heads=2, max_seq_len=64, ffn_hidden=24, n_experts=4,
                top_k_experts=2)
    return ModelConfig.make(**{**base, **kw})


def moe_of(seed: int = 0, **kw) -> MoE:
    """One MoE layer in float64 with random weights (router at a scale that routes unevenly)."""
    torch.manual_seed(seed)
    moe = MoE(cfg_of(**kw), 0).double()
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
    return moe


def swiglu(x, w1, w3, w2):
    return (F.silu(x @ w1.T) * (x @ w3.T)) @ w2.T


def per_token(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """The MoE written as a loop over tokens: softmax, top-k, renormalise, sum of gated experts."""
    E, K = moe.n_experts, moe.top_k
    out = []
    for h in x.reshape(-1, x.shape[-1]):
        p = torch.softmax(moe.router.weight @ h, dim=-1)
        best = sorted(range(E), key=lambda e: -float(p[e].detach()))[:K]
        total = sum(p[e] for e in best)
        y = sum(p[e] / total * swiglu(h, moe.w1[e], moe.w3[e], moe.w2[e]) for e in best)
        if moe.settings.shared:
            y = y + swiglu(h, moe.shared_w1, moe.shared_w3, moe.shared_w2)
        out.append(y)
    return torch.stack(out).reshape(x.shape)


@pytest.mark.parametrize("kw", [{}, {"top_k_experts": 1}, {"shared_experts": 2, "n_experts": 6, "top_k_experts": 3}])
def test_sorted_dispatch_equals_a_per_token_loop(kw):
    moe = moe_of(**kw).train()
    x = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    with recording([moe]):
        got = moe(x)
    ref = per_token(moe, x)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    # the gradients too (router through the gates, every expert through its slice)
    w = torch.randn_like(got)
    g_got = torch.autograd.grad((got * w).sum(), [x, *moe.parameters()])
    g_ref = torch.autograd.grad((ref * w).sum(), [x, *moe.parameters()])
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    counts = torch.bincount(torch.softmax(x.detach().reshape(-1, 16) @ moe.router.weight.T, -1)
                            .topk(moe.top_k).indices.reshape(-1), minlength=moe.n_experts)
    assert counts.min() < counts.max()  # uneven routing: the slices really differ in size


def test_top_k_equal_to_the_experts_is_the_dense_mixture():
    moe = moe_of(n_experts=4, top_k_experts=4).eval()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    p = torch.softmax(x @ moe.router.weight.T, dim=-1)  # [2, 5, E]
    dense = sum(p[..., e:e + 1] * swiglu(x, moe.w1[e], moe.w3[e], moe.w2[e]) for e in range(4))
    torch.testing.assert_close(moe(x), dense, rtol=0, atol=1e-12)


@pytest.mark.parametrize("k", [1, 2])
def test_aux_loss_is_one_when_uniform_and_grows_when_collapsed(k):
    E = 4
    moe = moe_of(n_experts=E, top_k_experts=k).train()
    x = torch.randn(64, 16, dtype=torch.float64)
    x[:, 0] = x[:, 0].abs() + 0.5  # feature 0 is positive everywhere
    with torch.no_grad():
        moe.router.weight.zero_()  # every probability 1/E: E x sum_i f_i / E = 1 whatever the choice
    with recording([moe]):
        moe(x)
    _, m = router_losses([moe])
    assert m["moe_aux_loss"].item() == pytest.approx(1.0, abs=1e-12)
    # balanced but confident: token n strongly prefers expert n mod E (equal shares)
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(E, 16, dtype=torch.float64) * 40)
    xb = torch.zeros(64, 16, dtype=torch.float64)
    xb[torch.arange(64), torch.arange(64) % E] = 1.0
    with recording([moe]):
        moe(xb)
    assert router_losses([moe])[1]["moe_aux_loss"].item() == pytest.approx(1.0, abs=1e-3)
    # collapsed: every token's first choice is expert 0 (probability ~1)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0, 0] = 50.0
    with recording([moe]):
        moe(x)
    aux = router_losses([moe])[1]["moe_aux_loss"].item()
    assert aux == pytest.approx(E / k, rel=1e-3)  # f_0 = 1 / K, P_0 = 1
    assert aux > 1.5


def test_z_loss_is_the_mean_squared_logsumexp_and_losses_are_weighted():
    moe = moe_of(z_loss=0.003, moe_aux_loss=0.02).train()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    with recording([moe]):
        moe(x)
        moe(x[:1])  # two forwards of one loss (DPO's chosen and rejected): averaged
    total, m = router_losses([moe])
    zs = [torch.logsumexp(h.reshape(-1, 16) @ moe.router.weight.T, dim=-1).square().mean() for h in (x, x[:1])]
    z = sum(zs) / 2
    torch.testing.assert_close(m["moe_z_loss"], z, rtol=0, atol=1e-12)
    torch.testing.assert_close(total, 0.02 * m["moe_aux_loss"] + 0.003 * z, rtol=0, atol=1e-12)
    assert not moe.records  # consumed
    moe(x)
    assert not moe.records  # nothing is kept outside `recording` (benchmarks, recomputation)
    # loads: assignments per expert summed over both forwards, 27 tokens x K = 54 in all
    assert m["moe_load_min"] <= 54 / 4 <= m["moe_load_max"]


def test_capacity_drops_the_latest_tokens_in_training_only():
    moe = moe_of(n_experts=2, top_k_experts=1, moe_capacity=1.0)
    x = torch.randn(1, 8, 16, dtype=torch.float64)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0] = x[0, :, :].sum(0) * 10  # a direction every token leans to...
        x[0] = x[0] * torch.where(x[0] @ moe.router.weight[0] > 0, 1.0, -1.0)[:, None]  # ...made positive
    assert bool((torch.softmax(x[0] @ moe.router.weight.T, -1).argmax(-1) == 0).all())
    dense = moe.eval()(x)  # evaluation: dropless
    torch.testing.assert_close(dense, per_token(moe, x), rtol=0, atol=1e-12)
    with recording([moe]):
        y = moe.train()(x)  # capacity ceil(1.0 x 8 x 1 / 2) = 4 for expert 0: tokens 4..7 dropped
    torch.testing.assert_close(y[0, :4], dense[0, :4], rtol=0, atol=1e-12)
    assert bool((y[0, 4:] == 0).all())
    assert router_losses([moe])[1]["moe_dropped"].item() == 0.5


def test_decoding_with_state_equals_the_full_forward_and_the_fast_path_refuses():
    from smedjan.infer.engine import Engine
    from smedjan.infer.runner import ModelRunner, fast_path_refusal

    torch.manual_seed(0)
    model = Transformer(cfg_of(shared_experts=1, moe_capacity=1.0)).double().eval()
    idx = torch.randint(0, 97, (3, 20), generator=torch.Generator().manual_seed(2))
    full = model(idx)
    state = model.new_state(3, 32)
    out = [model(idx[:, :7], state=state)] + [model(idx[:, t:t + 1], state=state, start=t) for t in range(7, 20)]
    torch.testing.assert_close(torch.cat(out, 1), full, rtol=1e-10, atol=1e-10)
    assert "moe" in fast_path_refusal(model)
    eng = Engine(model.float(), None, max_batch=2)
    assert isinstance(eng.runner, ModelRunner)


def test_muon_orthogonalises_each_expert_on_its_own():
    from smedjan.optim import OptimizerSettings, build_optimizer

    class One(torch.nn.Module):
        def __init__(self, *shape):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(shape))

        def param_roles(self):
            return {"w": "matrix"}

    torch.manual_seed(0)
    grads = torch.randn(3, 6, 4)
    stacked, singles = One(3, 6, 4), [One(6, 4) for _ in range(3)]
    opts = [build_optimizer("hybrid", [{"role": "matrix", "params": [m.w], "names": ["w"], "weight_decay": 0.0}],
                            OptimizerSettings(lr=0.02)) for m in (stacked, *singles)]
    for step in range(2):  # NorMuon's second moment carries over
        stacked.w.grad = grads * (step + 1)
        for e, m in enumerate(singles):
            m.w.grad = grads[e] * (step + 1)
        for o in opts:
            o.step()
    torch.testing.assert_close(stacked.w.detach(), torch.stack([m.w.detach() for m in singles]), rtol=1e-6, atol=1e-7)


def test_flops_and_active_parameters_count_the_routed_experts():
    cfg = cfg_of(n_experts=8, top_k_experts=2, shared_experts=1)
    dense = cfg_of(n_experts=0, ffn_hidden=24 * 3)  # one SwiGLU as wide as the 3 experts a token runs
    D, H = 16, 24
    assert cfg.flops_per_token(8) - dense.flops_per_token(8) == 2 * 6 * 8 * D  # only the routers
    assert active_params(cfg) == dense.n_params() + 2 * 8 * D
    assert cfg.n_params() - active_params(cfg) == 2 * 6 * 3 * D * H  # the 6 idle experts of each layer


def test_bench_variants_compare_moe_with_the_dense_model_of_equal_active_parameters():
    from smedjan_tools.train.bench import VARIANTS, format_table

    base = ModelConfig.from_preset("tiny", 8192, max_seq_len=128)
    moe, dense = (base.replace(**VARIANTS[v](base, 128)) for v in ("moe-8x2", "moe-dense-equal"))
    assert active_params(moe) - dense.n_params() == 4 * 8 * 128  # the routers: E x dim per layer
    row = {"size": "tiny", "variant": "moe-8x2", "params": moe.n_params(), "active_params": active_params(moe),
           "forward_tok_s": 1.0, "decode_tok_s": 1.0, "train_tok_s": 1.0}
    assert "| tiny moe-8x2 · 7.61M (2.89M active) |" in format_table([row], cuda=False)


def test_one_expert_is_the_dense_model():
    from smedjan.training.options import ModelOptions, model_config

    a = model_config(ModelOptions(size="tiny", n_experts=1), 97, 64)
    assert a == model_config(ModelOptions(size="tiny"), 97, 64) and a.ffn.kind == "swiglu" and not moe_layers(
        Transformer(a))


# ------------------------------------------------------------------ the CLI
@pytest.mark.parametrize("flags,needle", [
    (["--n-experts", "4", "--top-k-experts", "5"], "--top-k-experts 5 must be in [1, --n-experts 4]"),
    (["--n-experts", "4", "--z-loss", "-1"], "--z-loss -1.0 must be >= 0"),
    (["--n-experts", "4", "--moe-aux-loss", "-0.01"], "--moe-aux-loss -0.01 must be >= 0"),
])
def test_bad_moe_flags_are_one_line(flags, needle, tmp_path_factory, tokenizer_path, tmp_path):
    train_bin, _ = token_files(tmp_path_factory, tokenizer_path)
    res = train("--dataset", train_bin, "--tokenizer", tokenizer_path, *MICRO, *flags, "--steps", "1",
                "--checkpoint-dir", tmp_path / "ck")
    assert_user_error(res, needle)
    assert not (tmp_path / "ck").exists()


def test_help_documents_the_moe_flags_and_their_methods():
    res = smedjan("train", "--help", env={"COLUMNS": "300"})
    assert res.code == 0
    for text in ("--n-experts", "--top-k-experts", "--shared-experts", "--moe-capacity", "--moe-aux-loss", "--z-loss",
                 "Mixtral", "Switch Transformer", "ST-MoE", "DeepSeekMoE", "default 0.01", "default 0.001"):
        assert text in res.out, text


@pytest.mark.parametrize("kw,needle", [
    ({"n_experts": 4, "moe_capacity": -1.0}, "`moe_capacity` -1.0 must be >= 0"),
    ({"n_experts": 4, "shared_experts": -1}, "`shared_experts` -1 must be in [0, 64]"),
    ({"n_experts": 1, "top_k_experts": 2}, "`top_k_experts` need `n_experts` >= 2"),
    ({"n_experts": 4, "mlp": "relu2"}, "the experts are SwiGLU"),
    ({"n_experts": 2000}, "`n_experts` 2000 must be in [0, 1024]"),
])
def test_bad_moe_options(kw, needle):
    from smedjan.errors import UserError
    from smedjan.training.options import ModelOptions, model_config

    with pytest.raises(UserError) as e:
        model_config(ModelOptions(size="tiny", **kw), 97, 64)
    assert needle in str(e.value)


MOE = ["--n-experts", "4", "--top-k-experts", "2", "--shared-experts", "1", "--moe-capacity", "1.25"]


def test_moe_resumes_bit_for_bit_with_muon_state(tmp_path_factory, tokenizer_path, tmp_path):
    train_bin, _ = token_files(tmp_path_factory, tokenizer_path)
    flags = [*[f for f in MICRO if f not in ("--lr", "3e-3")], *MOE, "--optimizer", "hybrid", "--steps", "8",
             "--checkpoint-every", "4", "--keep", "0"]
    io = ["--dataset", train_bin, "--tokenizer", tokenizer_path]
    full, part = tmp_path / "full", tmp_path / "part"
    assert (res := train(*io, *flags, "--checkpoint-dir", full)).code == 0, res
    assert (res := train(*io, *flags, "--checkpoint-dir", part, "--resume", full / "state_4.bin")).code == 0, res
    a, b = losses(full), losses(part)
    assert sorted(b) == [5, 6, 7, 8] and all(a[s] == b[s] for s in b)
    from smedjan.formats.checkpoint import load_checkpoint

    wa, wb = load_checkpoint(full / "final.bin").model_state(), load_checkpoint(part / "final.bin").model_state()
    assert wa["layers.0.ffn.w1"].shape == (4, 256, 32) and all(torch.equal(wa[k], wb[k]) for k in wa)
    # the memory levers: a checkpointed block's recomputation routes as its forward did
    levers = tmp_path / "levers"
    res = train(*io, *flags, "--gradient-checkpointing", "--fused-ce", "--checkpoint-dir", levers)
    assert res.code == 0, res
    c = losses(levers)
    assert [c[s] for s in sorted(c)] == pytest.approx([a[s] for s in sorted(a)], rel=1e-5)
    rec = metrics(full)[-1]
    assert rec["moe_aux_loss"] >= 0.99 and rec["moe_z_loss"] > 0 and 0 <= rec["moe_dropped"] < 1
    assert 0 <= rec["moe_load_min"] <= 4 * 32 * 2 / 4 <= rec["moe_load_max"] <= 4 * 32  # 4 x 32 tokens, K = 2


@pytest.mark.slow
def test_moe_under_ddp_equals_one_process(tmp_path_factory, tokenizer_path, tmp_path):
    """The stacked experts take part in every step (DDP would stop on an unused parameter),
    and two processes give one process's losses. The load-balancing loss is off here: f_i P_i
    is computed per process (as Switch and Mixtral do), which is not the global batch's
    product; the z-loss is a mean over tokens, which the processes' mean reproduces."""
    from test_train_ddp import FLAGS, torchrun

    train_bin, val_bin = token_files(tmp_path_factory, tokenizer_path)
    flags = [*FLAGS, "--n-experts", "4", "--top-k-experts", "1", "--shared-experts", "1", "--moe-aux-loss", "0",
             "--z-loss", "0.01", "--dataset", train_bin, "--val-dataset", val_bin, "--tokenizer", tokenizer_path,
             "--checkpoint-every", "0", "--steps", "4"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert (res := train(*flags, "--batch-size", "4", "--checkpoint-dir", one)).code == 0, res
    proc = torchrun(*flags, "--batch-size", "2", "--checkpoint-dir", two)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert [b[s] for s in sorted(b)] == pytest.approx([a[s] for s in sorted(a)], rel=1e-5)
    za = [r["moe_z_loss"] for r in metrics(one) if "loss" in r]
    zb = [r["moe_z_loss"] for r in metrics(two) if "loss" in r]
    assert zb == pytest.approx(za, rel=1e-5)


# ------------------------------------------------------------------ export
def routed_model(tokenizer, **kw) -> Transformer:
    """A random MoE model whose router is decisive (scaled up), so float rounding in another
    implementation cannot flip a token's choice of experts."""
    cfg = ModelConfig.make(vocab_size=tokenizer.vocab_size, dim=64, n_layers=2, n_heads=2, max_seq_len=64,
                           preset="custom", n_experts=4, top_k_experts=2, **kw)
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():
        for m in moe_layers(model):
            m.router.weight.mul_(50)
    return model.eval()


def test_export_gguf_runs_in_llama_cpp_with_mixtral_experts(tokenizer, tmp_path):
    import llama_cpp
    import numpy as np

    from smedjan.export.gguf import export_gguf
    from smedjan.formats import constants as C
    from smedjan.formats.checkpoint import save_checkpoint

    model = routed_model(tokenizer)
    ck, out = tmp_path / "moe.bin", tmp_path / "moe.gguf"
    save_checkpoint(ck, model.state_dict(), kind=C.KIND_MODEL, config=model.cfg, tokenizer=tokenizer)
    export_gguf(ck, out, quant="f32")
    from gguf import GGUFReader

    r = GGUFReader(str(out))
    kv = {f.name: f.parts[f.data[0]].tolist() for f in r.fields.values() if f.data}
    assert kv["llama.expert_count"] == [4] and kv["llama.expert_used_count"] == [2]
    shapes = {t.name: tuple(int(d) for d in t.shape) for t in r.tensors}  # ggml order: fastest dimension first
    assert shapes["blk.1.ffn_gate_exps.weight"] == (64, 256, 4) and shapes["blk.1.ffn_down_exps.weight"] == (256, 64, 4)
    assert shapes["blk.0.ffn_gate_inp.weight"] == (64, 4)
    ids = [tokenizer.bos_id] + list(range(300, 340))

    def llama_logits(path):
        llm = llama_cpp.Llama(str(path), n_ctx=64, n_threads=2, verbose=False, logits_all=True, type_k=0, type_v=0)
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float64)

    theirs = llama_logits(out)
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].double().numpy()
        dense = Transformer(model.cfg.replace(top_k_experts=4))
        dense.load_state_dict(model.state_dict())
        other = dense.eval()(torch.tensor([ids]))[0].double().numpy()
    err = np.abs(ours - theirs).max() / np.abs(ours).max()
    assert err < 1e-5, err  # measured 2.5e-7; q8_0 below: 5.7e-3 (q4_0 would be 3.2e-2)
    assert np.abs(ours - other).max() / np.abs(ours).max() > 1e-2  # the routing matters at this tolerance
    # q8_0: the stacked experts quantize row by row like any matrix (a wrong layout would be noise)
    export_gguf(ck, tmp_path / "q8.gguf", quant="q8_0")
    assert np.abs(ours - llama_logits(tmp_path / "q8.gguf")).max() / np.abs(ours).max() < 2e-2


def test_export_hf_writes_mixtral_that_transformers_runs(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from smedjan.export.hf_write import export_hf
    from smedjan.export.load import load_source
    from smedjan.formats import constants as C
    from smedjan.formats.checkpoint import save_checkpoint

    model = routed_model(tokenizer)
    ck, out = tmp_path / "moe.bin", tmp_path / "hf"
    save_checkpoint(ck, model.state_dict(), kind=C.KIND_MODEL, config=model.cfg, tokenizer=tokenizer)
    summary = export_hf(load_source(ck), out)
    assert summary["architecture"] == "MixtralForCausalLM"
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == "MixtralForCausalLM"
    ids = torch.tensor([[tokenizer.bos_id] + list(range(300, 340))])
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


def test_exporters_refuse_what_they_cannot_express(tokenizer, tmp_path):
    from smedjan.errors import UserError
    from smedjan.export.gguf import export_gguf
    from smedjan.formats import constants as C
    from smedjan.formats.checkpoint import save_checkpoint

    model = routed_model(tokenizer, shared_experts=1)
    ck = tmp_path / "shared.bin"
    save_checkpoint(ck, model.state_dict(), kind=C.KIND_MODEL, config=model.cfg, tokenizer=tokenizer)
    with pytest.raises(UserError, match="not exportable to GGUF: --shared-experts"):
        export_gguf(ck, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
    res = smedjan("export-hf", "-c", ck, "-o", tmp_path / "hf")
    assert_user_error(res, "not exportable as a Hugging Face folder", "--shared-experts", "MixtralForCausalLM")
    assert not (tmp_path / "hf").exists()
