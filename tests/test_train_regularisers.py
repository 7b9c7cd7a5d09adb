"""EMA and the regularisers of the research menu (`--ema-decay`, `--dropout`,
`--stochastic-depth`, `--noise-scale`, `--shared-layers`, `--freeze-fraction`,
`--curriculum`): each against its formula (float64 where it is arithmetic, statistics on a
seeded draw where it is random), off in evaluation, and through `smedjan train` (in-process,
typer's CliRunner: one torch import for all runs): below the unigram bound, resumed bit for
bit, bad values refused with one line."""

from __future__ import annotations

import copy
import json
import math
import shutil

import pytest
import torch

from test_bitnet import check_trained as check_bitnet
from test_train_errors import assert_refused
from test_train_errors import run as cli_train
from test_train_quality import unigram_bound_bpb
from train_helpers import MICRO, losses, metrics, token_files

from smedjan.errors import UserError
from smedjan.formats.checkpoint import load_checkpoint
from smedjan.model import ModelConfig, Transformer
from smedjan.training.curriculum import CurriculumSource, length_at
from smedjan.training.ema import EMA, decay_at
from smedjan.training.regularisers import Extras, Regularisers, add_gradient_noise, noise_std, survival


@pytest.fixture(autouse=True)
def one_thread():
    """Bit-exact comparisons need one thread count in both runs; one is also the fastest here."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def micro_cfg(**kw) -> ModelConfig:
    return ModelConfig.make(vocab_size=64, dim=16, n_layers=4, n_heads=2, **{"max_seq_len": 16, **kw})


# ------------------------------------------------------------------------------ EMA
class _Weights(torch.nn.Module):
    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = torch.nn.Parameter(w.clone())


def test_ema_matches_the_closed_form_of_a_step_change():
    beta = 0.9
    w0 = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    w1 = w0 + torch.linspace(-2, 3, 15, dtype=torch.float64).view(5, 3)
    m = _Weights(w0)
    ema = EMA(m, beta)
    assert decay_at(beta, 0) == 0.0 and decay_at(beta, 7) == 1 - 8 ** (-2 / 3) and decay_at(beta, 31) == beta
    for _ in range(40):  # past the warmup (decay reaches beta after 31 updates); w0 held, so ema == w0
        ema.update()
    assert torch.equal(ema.shadows[0], w0)
    with torch.no_grad():
        m.w.copy_(w1)
    for k in range(1, 26):
        ema.update()
        torch.testing.assert_close(ema.shadows[0], beta ** k * w0 + (1 - beta ** k) * w1, rtol=1e-13, atol=1e-13)


def test_ema_warmup_follows_its_recursion_and_applied_restores_the_raw_weights():
    m = _Weights(torch.zeros(4, dtype=torch.float64))
    ema = EMA(m, 0.99)
    ref = None
    for t in range(12):
        with torch.no_grad():
            m.w.copy_(torch.full((4,), float(t * t), dtype=torch.float64))
        ema.update()
        d = decay_at(0.99, t)
        ref = float(t * t) if ref is None else d * ref + (1 - d) * t * t  # the first update copies the weights
        assert ema.shadows[0][0].item() == pytest.approx(ref, rel=1e-14)
    raw = m.w.detach().clone()
    with ema.applied():
        assert torch.equal(m.w.detach(), ema.shadows[0])
    assert torch.equal(m.w.detach(), raw)


# -------------------------------------------------------------------- gradient noise
def test_gradient_noise_has_the_annealed_variance_and_is_a_function_of_seed_and_step():
    eta, n = 0.3, 400_000
    for t in (0, 9, 99):
        p = torch.nn.Parameter(torch.zeros(n))
        p.grad = torch.zeros(n)
        add_gradient_noise([p], eta, t, seed=5)
        g = p.grad.double()
        var = eta / (1 + t) ** 0.55  # Neelakantan et al.: sigma_t^2 = eta / (1 + t)^gamma, gamma = 0.55
        assert noise_std(eta, t) ** 2 == pytest.approx(var, rel=1e-12)
        assert g.var().item() == pytest.approx(var, rel=0.02)  # the sample variance's sd is sqrt(2/n) = 0.2%
        assert abs(g.mean().item()) < 5 * math.sqrt(var / n)
    again = torch.nn.Parameter(torch.zeros(n))
    again.grad = torch.zeros(n)
    add_gradient_noise([again], eta, 99, seed=5)
    assert torch.equal(again.grad, p.grad)  # same (seed, step): same noise (resume, DDP ranks)
    add_gradient_noise([again], eta, 98, seed=5)
    assert not torch.equal(again.grad, 2 * p.grad)
    off = torch.nn.Parameter(torch.zeros(8))
    off.grad = torch.arange(8.0)
    Extras(Regularisers(noise_scale=0.0)).before_update([off], 0)
    assert torch.equal(off.grad, torch.arange(8.0))


# ------------------------------------------------------------ dropout, stochastic depth
def test_dropout_and_stochastic_depth_are_off_in_eval():
    torch.manual_seed(0)
    plain = Transformer(micro_cfg())
    reg = copy.deepcopy(plain)
    Extras(Regularisers(dropout=0.3, stochastic_depth=0.5)).wrap(reg)
    x = torch.randint(0, 64, (3, 16))
    plain.eval(), reg.eval()
    with torch.no_grad():
        ref = plain(x)
        assert torch.equal(reg(x), ref) and torch.equal(reg(x), ref)
    reg.train()
    with torch.no_grad():
        assert not torch.equal(reg(x), ref)


def test_drop_path_survival_falls_linearly_and_scales_the_kept_branch():
    torch.manual_seed(1)
    p, rows = 0.6, 3000
    model = Transformer(micro_cfg())
    Extras(Regularisers(stochastic_depth=p)).wrap(model)
    seen = {}

    def hook(block, args, out):
        x, ctx, layer = args
        plain = type(block).forward(block, x, ctx, layer)
        dropped = (out == x).flatten(1).all(1)
        kept = ~dropped
        s = survival(p, layer, 4)
        torch.testing.assert_close(out[kept], (x + (plain - x) / s)[kept], rtol=1e-5, atol=1e-6)
        seen[layer] = dropped.double().mean().item()

    for block in model.layers:
        block.register_forward_hook(hook)
    with torch.no_grad():
        model(torch.randint(0, 64, (rows, 2)))
    for layer in range(4):
        q = p * (layer + 1) / 4  # drop probability: 0.15, 0.3, 0.45, 0.6 (Huang et al.'s linear rule)
        assert abs(seen[layer] - q) < 4 * math.sqrt(q * (1 - q) / rows), (layer, seen)


# --------------------------------------------------------------------- shared layers
def test_shared_layers_divide_the_parameters_and_sum_the_gradients_of_every_use():
    shared_cfg, plain_cfg = micro_cfg(shared_layers=2), micro_cfg()
    norm = plain_cfg.dim  # the final norm, outside the blocks
    assert plain_cfg.n_params(embedding=False) - norm == 2 * (shared_cfg.n_params(embedding=False) - norm)
    shared = Transformer(shared_cfg).double()
    plain = Transformer(plain_cfg).double()
    state = shared.state_dict()  # names every layer; layers.1.* is layers.0.*
    assert state["layers.1.mixer.wq.weight"].data_ptr() == state["layers.0.mixer.wq.weight"].data_ptr()
    plain.load_state_dict(state)
    x = torch.randint(0, 64, (2, 16))
    shared(x, x).backward()
    plain(x, x).backward()
    sp, pp = dict(shared.named_parameters()), dict(plain.named_parameters())
    assert "layers.1.mixer.wq.weight" not in sp and len(pp) - len(sp) == 2 * 9  # two of four blocks' 9 tensors
    for name, p in sp.items():
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            want = pp[name].grad + pp[f"layers.{int(i) + 1}.{rest}"].grad
        else:
            want = pp[name].grad
        torch.testing.assert_close(p.grad, want, rtol=1e-12, atol=1e-15)
    # decoding keeps a state per layer, not per block: one token at a time equals the forward
    with torch.no_grad():
        state = shared.new_state(2, 16)
        steps = [shared(x[:, :8], state=state)] + [shared(x[:, t:t + 1], state=state, start=t) for t in range(8, 16)]
        torch.testing.assert_close(torch.cat(steps, 1), shared(x), rtol=1e-10, atol=1e-12)
    from smedjan.post.grow import grown_config

    with pytest.raises(UserError, match="--shared-layers 2 cannot be grown"):
        grown_config(shared_cfg, layers=8)


# ------------------------------------------------------------------------ curriculum
def test_curriculum_grows_prefixes_of_the_loaders_windows(tmp_path_factory, tokenizer_path):
    from smedjan.data.loader import Loader

    assert [length_at(t, 100, 64) for t in (0, 10, 50, 99, 100, 500)] == [8, 8, 32, 56, 64, 64]
    assert all(length_at(t, 100, 64) % 8 == 0 and length_at(t, 100, 64) <= length_at(t + 1, 100, 64)
               for t in range(120))
    train_bin, _ = token_files(tmp_path_factory, tokenizer_path)
    plain, cur = Loader(train_bin, 2, 64, seed=3), CurriculumSource(Loader(train_bin, 2, 64, seed=3), 4, 64, 2)
    for micro in range(10):  # grad_accum 2: steps 0 0 1 1 2 2 3 3 4 4
        x, y = cur.next_batch()
        px, py = plain.next_batch()
        L = length_at(micro // 2, 4, 64)
        assert x.shape == (2, L) and torch.equal(x, px[:, :L]) and torch.equal(y, py[:, :L])
    assert cur.state_dict() == plain.state_dict()


# ------------------------------------------------------------- through smedjan train
STEPS = 150
OPTIONS = {
    "ema": ["--ema-decay", "0.95"],
    "dropout": ["--dropout", "0.1"],
    "stochastic-depth": ["--stochastic-depth", "0.2"],
    "noise": ["--noise-scale", "1e-6"],
    "shared-layers": ["--shared-layers", "2"],
    "freeze": ["--freeze-fraction", "0.5"],
    "curriculum": ["--curriculum", "60"],
    "mup": ["--mup-base", "16"],  # µP (smedjan.model.mup), width_mult 2
    "mtp": ["--n-predict", "2"],  # multi-token prediction (smedjan.training.mtp): one module
    "relora": ["--lowrank", "8", "--relora-interval", "50", "--relora-warmup", "5"],  # resumed between merges
    "bitnet": ["--bitnet"],
    "moe": ["--n-experts", "4", "--top-k-experts", "2", "--z-loss", "1e-3"],  # smedjan.model.moe  # an architecture flag, but trained and resumed the same way (tests/test_bitnet.py)
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tokenizer_path, tokenizer):
    train_bin, val_bin = token_files(tmp_path_factory, tokenizer_path)
    return (["--dataset", train_bin, "--val-dataset", val_bin, "--tokenizer", tokenizer_path],
            unigram_bound_bpb(train_bin, tokenizer)[0])


def flags_for(name: str) -> list:
    base = [a for a in MICRO if a not in ("--batch-size", "4", "--lr", "3e-3")]
    return [*base, "--batch-size", "8", "--lr", "1e-2", "--steps", str(STEPS), "--checkpoint-every", str(STEPS // 2),
            "--val-tokens", "4096", "--json", *OPTIONS[name]]


@pytest.mark.parametrize("name", list(OPTIONS))
def test_option_trains_below_the_unigram_bound_and_resumes_bit_for_bit(name, corpus, tmp_path):
    io, bound = corpus
    full, again = tmp_path / "full", tmp_path / "again"
    res = cli_train(*io, *flags_for(name), "--checkpoint-dir", full)
    assert res.code == 0, res
    summary = json.loads(res.out)
    print(f"{name}: val bpb {summary['val_bpb']:.4f} = {summary['val_bpb'] / bound:.3f} x the unigram bound")
    assert summary["val_bpb"] < bound
    half = STEPS // 2
    again.mkdir()
    shutil.copy(full / f"state_{half}.bin", again / f"state_{half}.bin")
    res = cli_train(*io, *flags_for(name), "--checkpoint-dir", again, "--resume", again / f"state_{half}.bin")
    assert res.code == 0, res
    a, b = losses(full), losses(again)
    assert [b[s] for s in range(half + 1, STEPS + 1)] == [a[s] for s in range(half + 1, STEPS + 1)]
    assert json.loads(res.out)["val_bpb"] == summary["val_bpb"]
    fa, fb = load_checkpoint(full / "final.bin"), load_checkpoint(again / "final.bin")
    assert fa.tensors.keys() == fb.tensors.keys() and all(torch.equal(fa.tensors[k], fb.tensors[k]) for k in fa.tensors)
    st = load_checkpoint(full / f"state_{STEPS}.bin")
    CHECKS[name](fa, st, full)


def _ema(final, state, folder):
    """final.bin holds the averages; the state the raw weights beside them."""
    raw, avg = state.model_state(), state.prefixed("extra.ema.")
    assert state.json("ema") == {"decay": 0.95, "updates": STEPS}
    assert sorted(avg) == sorted(raw)  # tied: the embedding once, as the optimizer holds it
    assert all(torch.equal(final.tensors[k], avg[k]) for k in avg)
    assert not torch.equal(final.tensors["layers.0.mixer.wq.weight"], raw["layers.0.mixer.wq.weight"])


def _freeze(final, state, folder):
    """Layer 0 of 2 is bit-identical to the initialisation and has no optimizer state."""
    torch.manual_seed(0)  # the run's --seed: the init `smedjan train` draws
    init = Transformer(final.config).state_dict()
    names = [k for k in init if k.startswith("layers.0.")]
    assert names and all(torch.equal(final.tensors[k], init[k]) for k in names)
    assert not torch.equal(final.tensors["layers.1.mixer.wq.weight"], init["layers.1.mixer.wq.weight"])
    optim = state.prefixed("optim.state.")
    assert optim and not any(k.startswith("layers.0.") for k in optim)
    assert any(k.startswith("layers.1.") for k in optim)


def _shared(final, state, folder):
    """One block for the two layers: its tensors written for both, optimized once."""
    assert final.config.shared_layers == 2
    assert all(torch.equal(v, final.tensors["layers.0." + k[len("layers.1."):]])
               for k, v in final.tensors.items() if k.startswith("layers.1."))
    optim = state.prefixed("optim.state.")
    assert any(k.startswith("layers.0.") for k in optim) and not any(k.startswith("layers.1.") for k in optim)
    # the export is a plain llama: every block's tensors, the shared ones repeated
    from gguf import GGUFReader

    from smedjan.export.gguf import export_gguf

    export_gguf(folder / "final.bin", folder / "m.gguf", quant="f32")
    t = {x.name: x.data for x in GGUFReader(folder / "m.gguf").tensors}
    assert (t["blk.1.attn_q.weight"] == t["blk.0.attn_q.weight"]).all() and (t["blk.1.ffn_down.weight"] ==
                                                                                t["blk.0.ffn_down.weight"]).all()


def _curriculum(final, state, folder):
    """Tokens per step grow from 8 x 8 to 8 x 32 over the first 60 steps."""
    tokens = {r["step"]: r["tokens"] for r in metrics(folder) if "tokens" in r}
    assert tokens[1] == 8 * 8 and tokens[31] == 8 * length_at(30, 60, 32) == 8 * 16 and tokens[61] == 8 * 32


def _mup(final, state, folder):
    """The multiplier is part of the saved config; the exporters refuse it with one line."""
    from smedjan.export.gguf import export_gguf

    assert final.config.mup_base == 16 and final.config.attention.scale == 1 / math.sqrt(16 * 2)
    # decoding (the engine's auto path, with its KV cache) continues as the model's full forward
    from smedjan.infer.engine import Engine
    from smedjan.infer.sampling import SamplingParams
    from smedjan.model.load import model_from_checkpoint

    model = model_from_checkpoint(final).eval()
    ids = [5, 17, 300]
    out = Engine(model).generate([ids], SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True))[0]
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert out.token_ids == ids[3:]
    with pytest.raises(UserError, match="not exportable to GGUF: µP"):
        export_gguf(folder / "final.bin", folder / "m.gguf", quant="f32")
    assert not (folder / "m.gguf").exists()


def _mtp(final, state, folder):
    """final.bin keeps the module (for --speculative); metrics log the next-token CE apart."""
    assert final.config.mtp.n_predict == 2 and any(k.startswith("mtp.0.") for k in final.tensors)
    rec = [r for r in metrics(folder) if "mtp_loss_1" in r]
    assert len(rec) == STEPS and all(r["loss"] > r["lm_loss"] for r in rec)


def _relora(final, state, folder):
    """final.bin: the plain names, holding the last state's W (merged at step 150, so B = 0)."""
    assert state.json("relora")["merges"] == 3 and not any("relora" in k for k in final.tensors)
    assert all(torch.equal(final.tensors[k], v) for k, v in state.model_state().items())


def _moe(final, state, folder):
    """The router's losses and the experts' load are logged every step; generate decodes it."""
    rec = [r for r in metrics(folder) if "loss" in r]
    assert len(rec) == STEPS and all(math.isfinite(r["moe_aux_loss"]) and r["moe_aux_loss"] > 0 for r in rec)
    assert all(0 <= r["moe_load_min"] <= r["moe_load_max"] for r in rec)
    from smedjan.infer.engine import Engine
    from smedjan.infer.sampling import SamplingParams
    from smedjan.model.load import model_from_checkpoint

    out = Engine(model_from_checkpoint(final).eval()).generate([[5, 17, 300]], SamplingParams(max_new_tokens=4))[0]
    assert len(out.token_ids) >= 1


CHECKS = {"relora": _relora, "moe": _moe, "ema": _ema, "mtp": _mtp, "freeze": _freeze, "shared-layers": _shared,
          "curriculum": _curriculum, "mup": _mup, "dropout": lambda *a: None, "stochastic-depth": lambda *a: None,
          "noise": lambda *a: None, "bitnet": check_bitnet}


@pytest.mark.parametrize("flags,needle", [
    (["--ema-decay", "1.2"], "--ema-decay 1.2 must be in [0, 1)"),
    (["--dropout", "-0.1"], "--dropout -0.1 must be in [0, 1)"),
    (["--stochastic-depth", "1"], "--stochastic-depth 1.0 must be in [0, 1)"),
    (["--noise-scale", "-1"], "--noise-scale -1.0 must be >= 0"),
    (["--freeze-fraction", "1.5"], "--freeze-fraction 1.5 must be in [0, 1)"),
    (["--freeze-fraction", "0.4"], "--freeze-fraction 0.4 freezes none of the model's 2 layers"),
    (["--shared-layers", "3"], "--shared-layers 3 must be in [1, the model's 2 layers]"),
    (["--curriculum", "-5"], "--curriculum -5 must be >= 0"),
])
def test_bad_values_are_one_line(flags, needle, tmp_path_factory, tokenizer_path, tmp_path):
    train_bin, _ = token_files(tmp_path_factory, tokenizer_path)
    out = tmp_path / "ck"
    res = cli_train("--dataset", train_bin, "--tokenizer", tokenizer_path, *MICRO, "--steps", "2", *flags,
                    "--checkpoint-dir", out)
    assert_refused(res, out, needle)


def test_ema_under_ddp_equals_one_process(corpus, tmp_path):
    """Two gloo processes with batch B: the averages (validation, final.bin) of one process
    with batch 2B, within the all-reduce's summation-order tolerance."""
    from test_train_ddp import FLAGS, torchrun

    io, _ = corpus
    one, two = tmp_path / "one", tmp_path / "two"
    flags = [*io, *FLAGS, "--ema-decay", "0.9", "--json"]
    res = cli_train(*flags, "--batch-size", "4", "--checkpoint-dir", one)
    assert res.code == 0, res
    proc = torchrun(*flags, "--batch-size", "2", "--checkpoint-dir", two)
    assert proc.returncode == 0, proc.stderr[-3000:]
    va = [r["val_bpb"] for r in metrics(one) if "val_bpb" in r]
    vb = [r["val_bpb"] for r in metrics(two) if "val_bpb" in r]
    assert len(va) == len(vb) == 2 and vb == pytest.approx(va, rel=1e-5)
    fa, fb = load_checkpoint(one / "final.bin"), load_checkpoint(two / "final.bin")
    for k, v in fa.model_state().items():
        torch.testing.assert_close(fb.tensors[k], v, rtol=1e-4, atol=1e-5)
    ema = load_checkpoint(two / "state_8.bin").prefixed("extra.ema.")
    assert ema and all(torch.equal(fb.tensors[k], v) for k, v in ema.items())


def test_sft_takes_the_training_side_options(corpus, tmp_path):
    """The flags live in RunOptions, so sft (and dpo, distill: the same driver) has them."""
    from typer.testing import CliRunner

    from helpers import DATA
    from smedjan_tools.cli import app

    io, _ = corpus
    res = cli_train(*io[:2], *io[4:], *MICRO, "--steps", "2", "--checkpoint-dir", tmp_path / "base")
    assert res.code == 0, res
    out = tmp_path / "sft"
    r = CliRunner().invoke(app, ["sft", "-c", str(tmp_path / "base" / "final.bin"), "--data",
                                 str(DATA / "sft" / "instruction-data.json.zst"), "--max-len", "32", "--steps", "3",
                                 "--batch-size", "2", "--warmup", "0", "--val-fraction", "0", "--checkpoint-every", "3",
                                 "--checkpoint-dir", str(out), "--output", str(tmp_path / "sft.bin"), "--ema-decay", "0.9",
                                 "--dropout", "0.1", "--stochastic-depth", "0.1", "--noise-scale", "1e-6",
                                 "--freeze-fraction", "0.5"])
    assert r.exit_code == 0, r.stderr[-2000:]
    assert ("regularisers: EMA 0.9, dropout 0.1, stochastic depth 0.1, gradient noise 1e-06, frozen fraction 0.5"
            in r.stderr)
    final, state = load_checkpoint(tmp_path / "sft.bin"), load_checkpoint(out / "state_3.bin")
    base = load_checkpoint(tmp_path / "base" / "final.bin")
    assert all(torch.equal(final.tensors[k], base.tensors[k]) for k in base.model_state() if k.startswith("layers.0."))
    assert all(torch.equal(final.tensors[k], v) for k, v in state.prefixed("extra.ema.").items())


def test_help_names_each_published_method():
    from typer.testing import CliRunner

    from smedjan_tools.cli import app

    out = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "400"}).stdout
    for text in ("--ema-decay", "ema-pytorch", "--dropout", "resid_pdrop", "--stochastic-depth", "Huang et al. 2016",
                 "--noise-scale", "Neelakantan et al. 2015", "--shared-layers", "ALBERT", "--freeze-fraction",
                 "--curriculum", "Li et al. 2022"):
        assert text in out, text
    sft = CliRunner().invoke(app, ["sft", "--help"], env={"COLUMNS": "400"}).stdout
    assert all(f in sft for f in ("--ema-decay", "--dropout", "--stochastic-depth", "--noise-scale",
                                  "--freeze-fraction")) and "--curriculum" not in sft


def test_bench_runner_trains_with_the_options_and_counts_the_curriculum_tokens():
    from smedjan.training.bench import SmedjanRunner

    cfg = micro_cfg(max_seq_len=32)
    r = SmedjanRunner(cfg, 2, 32, options={"curriculum": 4, "ema_decay": 0.9, "freeze_fraction": 0.5})
    r.train(4)
    assert r.tokens_per_step == 2 * sum(length_at(t, 4, 32) for t in range(4)) // 4 == 2 * 14
    assert r.trainer.extras.ema.updates == 4 and len(r.trainer.extras.frozen) == 2 * 9
    r.forward(1)
    assert r.tokens_per_step == 2 * 32
