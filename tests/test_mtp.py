"""Multi-token prediction (`smedjan train --n-predict N`, smedjan.model.mtp and
smedjan.training.mtp): λ = 0 is the baseline exactly, depth k at position i is scored on
t_{i+k+1}, every depth is causal, training resumes bit for bit, exports drop the modules,
bad input is one line; and self-speculative decoding (smedjan.infer.speculative) gives
exactly greedy decoding's tokens."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_user_error, smedjan
from train_helpers import MICRO, losses, metrics, token_files, train

from smedjan.formats.checkpoint import load_checkpoint
from smedjan.model import ModelConfig, Transformer
from smedjan.training.heads import FusedCE
from smedjan.training.mtp import MTPObjective


def _model(n_predict: int, dtype=torch.float64, seed: int = 0, **kw) -> Transformer:
    cfg = ModelConfig.make(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                           n_predict=n_predict, **kw)
    torch.manual_seed(seed)
    return Transformer(cfg).to(dtype)


def _batch(T: int = 16, B: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, 61, (B, T + 1), generator=g)
    return seq[:, :-1], seq[:, 1:], seq


@pytest.mark.parametrize("fused", [False, True])
def test_weight_zero_is_the_baseline_loss_and_gradients_exactly(fused):
    base, mtp = _model(1, torch.float32), _model(3, torch.float32)
    x, y, _ = _batch()
    loss_base = base(x, y, head=FusedCE() if fused else None)
    obj = MTPObjective(weight=0.0, final_weight=0.0, fused=fused)
    loss, main, depths = mtp(x, y, head=obj)
    assert torch.equal(loss, loss_base) and torch.equal(main, loss_base.detach())
    assert depths.shape == (2,) and bool((depths > 1.0).all())  # the depths were computed, weighted 0
    loss_base.backward()
    loss.backward()
    grads = dict(mtp.named_parameters())
    for name, p in base.named_parameters():
        assert torch.equal(p.grad, grads[name].grad), name
    extra = [p for n, p in mtp.named_parameters() if n.startswith("mtp.")]
    assert extra and all(p.grad is not None and not p.grad.any() for p in extra)
    # and a weight above 0 does move the shared parameters (so the comparison above can fail)
    mtp.zero_grad()
    obj.weight = 0.3
    mtp(x, y, head=obj)[0].backward()
    assert not torch.equal(grads["tok_embeddings.weight"].grad, dict(base.named_parameters())["tok_embeddings.weight"].grad)


def _reference_depth_losses(model: Transformer, seq: torch.Tensor) -> list[torch.Tensor]:
    """Depth k's mean CE written from the definition with explicit indices into the full
    sequence t_0..t_T: at position i the module embeds t_{i+k} and is scored on t_{i+k+1}."""
    T = seq.shape[1] - 1
    h = model.trunk(seq[:, :T])
    out = []
    for k, m in enumerate(model.mtp, 1):
        n = T - k
        emb = torch.stack([model.tok_embeddings(seq[:, i + k]) for i in range(n)], dim=1)
        x = m.eh_proj(torch.cat([m.enorm(emb), m.hnorm(h[:, :n])], dim=-1))
        h = m.block(x, model.context(seq.shape[0], n, seq.device), k - 1)
        logp = F.log_softmax(model.logits(m.norm(h)), dim=-1)
        target = torch.stack([seq[:, i + k + 1] for i in range(n)], dim=1)
        out.append(-logp.gather(-1, target[..., None]).mean())
    return out


def test_depth_k_at_position_i_is_scored_on_token_i_plus_k_plus_1():
    model = _model(4)
    x, y, seq = _batch(T=12)
    _, main, depths = model(x, y, head=MTPObjective())
    ref = _reference_depth_losses(model, seq)
    assert len(ref) == 3
    for k in range(3):
        assert torch.allclose(depths[k], ref[k], rtol=0, atol=1e-12), (k, depths[k], ref[k])
    # One scored target: y[:, p] = t_{p+1} alone is kept, so depth k's loss is its prediction at
    # position i = p - k of that token (inputs are read from x, never from the targets).
    p = 9
    masked = torch.full_like(y, -1)
    masked[:, p] = y[:, p]
    _, _, one = model(x, masked, head=MTPObjective())
    hidden = dict(model.mtp.hidden(model, model.trunk(x), x))
    for k in (1, 2, 3):
        logp = F.log_softmax(model.logits(hidden[k][:, p - k]), dim=-1)  # [B, vocab]
        want = -logp.gather(-1, y[:, p, None]).mean()
        assert torch.allclose(one[k - 1], want, rtol=0, atol=1e-12), k


def test_every_depth_is_causal():
    model = _model(3)
    x, _, _ = _batch(T=16, B=1)
    j = 9
    x2 = x.clone()
    x2[0, j] = (x[0, j] + 7) % 61

    def predictions(idx):
        trunk = model.trunk(idx)
        return {0: model.logits(model.norm(trunk)), **{k: model.logits(h) for k, h in model.mtp.hidden(model, trunk, idx)}}

    a, b = predictions(x), predictions(x2)
    for k in (0, 1, 2):
        # depth k at position i reads t_0..t_{i+k}: positions i < j - k cannot see token j ...
        assert torch.allclose(a[k][:, :j - k], b[k][:, :j - k], rtol=0, atol=1e-12), k
        # ... and position j - k does (its input embedding is t_j), so the check above can fail
        assert (a[k][:, j - k] - b[k][:, j - k]).abs().max() > 1e-6, k


def test_parameters_have_roles_and_the_trunk_is_drawn_as_without_mtp():
    base, mtp = _model(1), _model(3)
    roles = mtp.param_roles()
    assert roles["mtp.0.eh_proj.weight"] == "matrix" and roles["mtp.1.block.mixer.wq.weight"] == "matrix"
    assert roles["mtp.1.enorm.weight"] == roles["mtp.1.norm.weight"] == "norm"
    sd = mtp.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in base.state_dict().items())
    assert set(sd) - set(base.state_dict()) == {k for k in sd if k.startswith("mtp.")}
    assert mtp.cfg.n_params() > base.cfg.n_params() and mtp.cfg.flops_per_token(16) > base.cfg.flops_per_token(16)


# ------------------------------------------------------------------ through the CLI
@pytest.fixture(scope="module")
def data(tmp_path_factory, tokenizer_path):
    train_bin, val_bin = token_files(tmp_path_factory, tokenizer_path)
    return ["--dataset", train_bin, "--tokenizer", tokenizer_path], val_bin


RUN = [*MICRO, "--n-predict", "3", "--steps", "12", "--checkpoint-every", "4", "--keep", "0"]


@pytest.fixture(scope="module")
def mtp_run(data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("mtp")
    res = train(*data[0], *RUN, "--checkpoint-dir", folder)
    assert res.code == 0, res
    return folder


def test_training_logs_each_depth_and_resumes_bit_for_bit(data, mtp_run, tmp_path):
    rec = [r for r in metrics(mtp_run) if "loss" in r]
    # λ: 0.3 for the first 10/14.8 of the 12 steps (8), then 0.1
    for r in rec:
        lam = 0.3 if r["step"] <= 8 else 0.1
        assert abs(r["loss"] - (r["lm_loss"] + lam * (r["mtp_loss_1"] + r["mtp_loss_2"]) / 2)) < 1e-5, r
    res = train(*data[0], *RUN, "--checkpoint-dir", tmp_path, "--resume", mtp_run / "state_4.bin")
    assert res.code == 0, res
    a, b = losses(mtp_run), losses(tmp_path)
    assert sorted(b) == list(range(5, 13)) and all(a[s] == b[s] for s in b)
    wa, wb = (load_checkpoint(f / "final.bin").model_state() for f in (mtp_run, tmp_path))
    assert any(k.startswith("mtp.1.block.") for k in wa) and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_exports_drop_the_modules(mtp_run, tmp_path):
    """The exported files of a model with MTP modules are those of the same model without them."""
    from gguf import GGUFReader

    from smedjan.export.gguf import export_gguf
    from smedjan.export.hf_write import export_hf
    from smedjan.export.load import load_source
    from smedjan.formats import constants as C
    from smedjan.formats.checkpoint import save_checkpoint
    from smedjan.model.mtp import without_mtp

    ck = load_checkpoint(mtp_run / "final.bin")
    cfg, state = without_mtp(ck.config, ck.model_state())
    assert cfg.mtp.n_predict == 1 and len(state) < len(ck.model_state())
    (tmp_path / "plain").mkdir()
    save_checkpoint(tmp_path / "plain" / "final.bin", state, kind=C.KIND_MODEL, config=cfg, tokenizer=ck.tokenizer)
    out = {}
    for name, src in (("mtp", mtp_run / "final.bin"), ("plain", tmp_path / "plain" / "final.bin")):
        export_gguf(src, tmp_path / f"{name}.gguf", quant="f32")  # what export-gguf and export-hf run
        export_hf(load_source(src), tmp_path / f"{name}-hf")
        out[name] = {t.name: t.data.tobytes() for t in GGUFReader(tmp_path / f"{name}.gguf").tensors}
    assert out["mtp"] == out["plain"] and not any("mtp" in n for n in out["mtp"])
    assert (tmp_path / "mtp.gguf").read_bytes() == (tmp_path / "plain.gguf").read_bytes()
    assert ((tmp_path / "mtp-hf" / "model.safetensors").read_bytes()
            == (tmp_path / "plain-hf" / "model.safetensors").read_bytes())


@pytest.mark.parametrize("flags,needle", [
    (["--n-predict", "0"], "--n-predict 0 must be in [1, 16] (1: the next token only"),
    (["--mtp-weight", "0.5"], "--mtp-weight needs --n-predict >= 2"),
    (["--n-predict", "2", "--mtp-weight-final", "-1"], "--mtp-weight-final -1.0 must be in [0, 100]"),
    (["--n-predict", "3", "--seq-len", "2"], "--n-predict 3 needs --seq-len >= 3"),
])
def test_bad_mtp_flags_are_one_line(data, flags, needle, tmp_path):
    res = train(*data[0], *MICRO, *flags, "--steps", "1", "--checkpoint-dir", tmp_path / "ck")
    assert_user_error(res, needle)
    assert not (tmp_path / "ck").exists()


def test_resume_keeps_n_predict(data, mtp_run, tmp_path):
    res = train(*data[0], *MICRO, "--n-predict", "2", "--steps", "12", "--checkpoint-dir", tmp_path / "ck",
                "--resume", mtp_run / "state_4.bin")
    assert_user_error(res, "--n-predict 2: the state was saved with --n-predict 3")


# ------------------------------------------------------------- speculative decoding
def _greedy(model, prompt, n, path="model", **kw):
    from smedjan.infer import Engine, SamplingParams

    p = SamplingParams(max_new_tokens=n, temperature=0, **kw)
    return Engine(model, None, path=path).generate([prompt], p)[0]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_speculative_decoding_gives_greedy_tokens(dtype):
    from smedjan.infer import SamplingParams
    from smedjan.infer.speculative import SpeculativeEngine

    model = _model(3, dtype, tie_embeddings=False).eval()  # untied: a random model that does not just repeat
    prompt = [5, 9, 3, 17, 2, 40]
    want = _greedy(model, prompt, 40)
    assert want.token_ids == _greedy(model, prompt, 40, path="auto").token_ids  # the fast path agrees
    eng = SpeculativeEngine(model, None)
    got = eng.generate([prompt], SamplingParams(max_new_tokens=40, temperature=0))[0]
    assert got.token_ids == want.token_ids and got.finish_reason == want.finish_reason == "length"
    assert eng.proposed > 0  # it drafted (a random model's drafts are mostly rejected: see below for runs)
    # up to the end of the context, where drafts are cut short
    got = eng.generate([prompt], SamplingParams(max_new_tokens=100, temperature=0))[0]
    assert got.token_ids == _greedy(model, prompt, 100).token_ids and len(prompt) + len(got.token_ids) == 64


def test_accepted_runs_and_a_stop_token_inside_one():
    """Drafts from an oracle that knows greedy's continuation (wrong every fifth draft): whole
    runs are accepted, rejections are replaced, and a stop token inside an accepted run ends
    the text where greedy decoding ends it."""
    from smedjan.infer import SamplingParams
    from smedjan.infer.speculative import SpeculativeEngine

    model = _model(4, tie_embeddings=False).eval()
    prompt = [5, 9, 3, 17, 2, 40]
    full = _greedy(model, prompt, 30).token_ids

    class Oracle(SpeculativeEngine):
        def _draft(self, s, before):
            super()._draft(s, before)  # the modules' own drafts, replaced by the oracle's
            n = len(s.tokens)
            self.drafts = [t if (n + i) % 5 else (t + 1) % 61 for i, t in enumerate(full[n:n + self.depth])]

    eng = Oracle(model, None)
    got = eng.generate([prompt], SamplingParams(max_new_tokens=30, temperature=0))[0]
    assert got.token_ids == full and eng.accepted > 10 and eng.accepted < eng.proposed
    at = next(i for i in range(8, 30) if full[i] not in full[:i])  # a token greedy emits first at `at`
    for stop in (full[at], full[at + 1]):
        want = _greedy(model, prompt, 30, stop_token_ids=(stop,))
        got = eng.generate([prompt], SamplingParams(max_new_tokens=30, temperature=0, stop_token_ids=(stop,)))[0]
        assert got.token_ids == want.token_ids and got.finish_reason == want.finish_reason == "stop"
        assert got.token_ids[-1] == stop and len(got.token_ids) <= at + 2


def test_speculative_refuses_models_it_cannot_roll_back_or_draft_with():
    from smedjan.errors import UserError
    from smedjan.infer.speculative import SpeculativeEngine

    with pytest.raises(UserError, match="no multi-token-prediction modules"):
        SpeculativeEngine(_model(1), None)
    with pytest.raises(UserError, match="its ssm layers keep a recurrent state"):
        SpeculativeEngine(_model(2, mixer="ssm", ssm_head_dim=16), None)


def test_generate_speculative_through_the_cli_prints_greedy_text(mtp_run):
    """`generate --speculative` on a trained MTP checkpoint prints plain greedy decoding's
    text (the tiny preset's run below the unigram bound: test_train_regularisers' mtp row)."""
    gen = ["generate", "-c", mtp_run / "final.bin", "-p", "ROMEO:", "-p", "Thou art", "-n", "24", "--temperature", "0",
           "--json"]
    plain, spec = smedjan(*gen), smedjan(*gen, "--speculative")
    assert plain.code == 0 and spec.code == 0, (plain, spec)
    assert json.loads(spec.out)["completions"] == json.loads(plain.out)["completions"]
    drafts = json.loads(spec.out)["drafts"]
    assert 0 <= drafts["accepted"] <= drafts["proposed"] and drafts["proposed"] > 0, drafts
    assert_user_error(smedjan("generate", "-c", mtp_run / "final.bin", "-p", "x", "--speculative"),
                      "--speculative decodes greedily", "--temperature 0")
    assert_user_error(smedjan("serve", "-c", mtp_run / "final.bin", "--speculative", "--port", "0"),
                      "--speculative decodes one request at a time: give --max-batch 1")


def test_two_gloo_processes_equal_one_with_the_global_batch(data, tmp_path):
    """Under DDP every MTP parameter takes part in the loss (DDP stops on an unused one) and
    the losses of each depth are those of one process with the doubled batch."""
    from test_train_ddp import FLAGS, torchrun

    flags = [*data[0], "--val-dataset", data[1], *FLAGS, "--n-predict", "3"]
    one, two = tmp_path / "one", tmp_path / "two"
    res = train(*flags, "--batch-size", "4", "--checkpoint-dir", one)
    assert res.code == 0, res
    proc = torchrun(*flags, "--batch-size", "2", "--checkpoint-dir", two)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = ([r for r in metrics(f) if "loss" in r] for f in (one, two))
    assert len(a) == len(b) == 8
    for key in ("loss", "lm_loss", "mtp_loss_1", "mtp_loss_2"):
        assert [r[key] for r in b] == pytest.approx([r[key] for r in a], rel=1e-5), key
