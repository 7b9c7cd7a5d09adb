"""Low-rank training and ReLoRA (`--lowrank`, `--relora-interval`): the merge keeps the
function (float64), the jagged LR schedule and the pruned optimizer state after a merge,
resume bit for bit across merges through `smedjan train` (in-process), final.bin holding the
plain model's names with merged weights (loaded by `smedjan generate`), sft's LoRA
fine-tuning, and bad flags refused with one line. Training below the unigram bound is in
tests/test_train_regularisers.py (OPTIONS)."""

from __future__ import annotations

import shutil

import pytest
import torch
from typer.testing import CliRunner

from test_train_errors import assert_refused
from test_train_errors import run as cli_train
from test_train_regularisers import micro_cfg, one_thread  # noqa: F401 (one_thread: autouse, one intra-op thread)
from train_helpers import MICRO, losses, metrics, token_files

from smedjan.formats.checkpoint import load_checkpoint
from smedjan.model import Transformer
from smedjan.optim import OptimizerSettings, build_optimizer, param_groups
from smedjan.training.relora import LowRank, ReLoRA, magnitude_prune_
from smedjan.training.schedule import Schedule


def micro() -> Transformer:
    torch.manual_seed(0)
    return Transformer(micro_cfg())


def test_adapters_read_as_w_plus_ba_and_the_merge_keeps_the_function_in_float64():
    model = micro().double()
    names = list(model.state_dict())
    relora = ReLoRA(model, LowRank(rank=3, alpha=6.0, interval=4))
    assert list(model.state_dict()) == names  # the model's own names, nothing added
    assert all(not p.requires_grad for n, p in model.named_parameters() if n.startswith("layers.") and p.dim() == 2)
    x = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        fresh = model(x)
        for a in relora.adapters:  # a trained adapter: B no longer zero
            a.B.copy_(torch.randn(a.B.shape, dtype=torch.float64))
        before = model(x)
        assert (before - fresh).abs().max() > 1e-3
        # the plain reference: a model holding W + B A alpha / R
        ref = micro().double()
        ref.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})
        for a in relora.adapters:
            ref.get_parameter(a.name).add_(a.B @ a.A * 2.0)
        torch.testing.assert_close(before, ref(x), rtol=0, atol=1e-12)
        raw = {k: v.clone() for k, v in model.state_dict().items()}
        with relora.merged():  # what final.bin holds: merged weights under plain names
            assert all(torch.equal(model.state_dict()[k], v) for k, v in ref.state_dict().items())
            torch.testing.assert_close(model(x), before, rtol=0, atol=1e-12)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in raw.items())  # restored bit for bit
        old_a = relora.adapters[0].A.clone()
        relora.merge()
        assert (model(x) - before).abs().max() <= 1e-6
        assert all(torch.count_nonzero(a.B) == 0 for a in relora.adapters)
        assert not torch.equal(relora.adapters[0].A, old_a) and relora.merges == 1


@pytest.mark.parametrize("kw", [{"n_experts": 4, "top_k_experts": 2},
                                {"layer_pattern": "ssm,linear_attn,rwkv,mla", "ssm_head_dim": 8, "rwkv_head_dim": 8,
                                 "mla_latent_dim": 8}])
def test_every_part_reads_its_adapters_and_the_merge_keeps_the_function(kw):
    """MoE experts (a batch of matrices: A [E, R, in]) and the other mixers' projections."""
    torch.manual_seed(0)
    model = Transformer(micro_cfg(**kw)).double()
    relora = ReLoRA(model, LowRank(rank=2, alpha=2.0, interval=1))
    assert any(a.A.dim() == 3 for a in relora.adapters) == ("n_experts" in kw)
    x = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        fresh = model(x)
        for a in relora.adapters:
            a.B.normal_()
        before = model(x)
        relora.merge()
        assert (before - fresh).abs().max() > 1e-3 and (model(x) - before).abs().max() <= 1e-6


def test_after_a_merge_the_lr_restarts_near_0_and_the_adapters_moments_are_pruned():
    sched = Schedule("cosine", total_steps=40, warmup=4, restart_every=10, restart_warmup=5)
    plain = Schedule("cosine", total_steps=40, warmup=4)
    assert [sched(s) for s in range(10)] == [plain(s) for s in range(10)]
    for k in (10, 20, 30):  # update k is the first after the merge at the end of update k - 1
        assert [sched(s) for s in range(k, k + 6)] == pytest.approx(
            [plain(s) * f for s, f in zip(range(k, k + 6), (0.2, 0.4, 0.6, 0.8, 1.0, 1.0))], rel=1e-15)
    t = torch.randn(1000, dtype=torch.float64)
    kept = t.clone()
    magnitude_prune_(kept, 0.9)
    thr = torch.quantile(t.abs(), 0.9)
    assert torch.equal(kept, torch.where(t.abs() > thr, t, 0.0)) and torch.count_nonzero(kept) == 100

    model = micro()
    relora = ReLoRA(model, LowRank(rank=2, alpha=2.0, interval=3, warmup=1, prune=0.9))
    opt = build_optimizer("adamw", param_groups(model, 0.1, relora.trainable()), OptimizerSettings(lr=1e-2))
    x = torch.randint(0, 64, (2, 16))
    for step in range(1, 4):
        model(x, x).backward()
        opt.step()
        opt.zero_grad()
        embed = opt.state[model.tok_embeddings.weight]["exp_avg"].clone()
        relora.after_step(step, opt)
        assert relora.merges == step // 3
    assert torch.equal(opt.state[model.tok_embeddings.weight]["exp_avg"], embed)  # not an adapter: untouched
    for a in relora.adapters:
        assert torch.count_nonzero(a.B) == 0
        for key in ("exp_avg", "exp_avg_sq"):
            st = opt.state[a.A][key]
            assert torch.count_nonzero(st) <= st.numel() // 10 + 1  # the top 10% by magnitude survive


def _run(io, folder, *extra):
    return cli_train(*io, *MICRO, "--steps", "8", "--checkpoint-every", "2", "--keep", "0", "--lowrank", "2",
                     "--relora-interval", "4", "--relora-warmup", "2", "--json", "--checkpoint-dir", folder, *extra)


def test_train_resumes_bit_for_bit_across_merges_and_final_bin_is_merged(tmp_path_factory, tokenizer_path, tmp_path):
    train_bin, val_bin = token_files(tmp_path_factory, tokenizer_path)
    io = ["--dataset", train_bin, "--val-dataset", val_bin, "--val-tokens", "512", "--tokenizer", tokenizer_path]
    full = tmp_path / "full"
    res = _run(io, full)
    assert res.code == 0, res
    assert "low rank 2 (alpha 2), ReLoRA merges every 4 steps" in res.err
    rec = {r["step"]: r for r in metrics(full) if "lr" in r}
    # the first update after the merge at step 4 runs at half the main schedule's rate (re-warmup 2)
    main = Schedule("cosine", total_steps=8, warmup=2)
    assert rec[5]["lr"] == pytest.approx(3e-3 * main(4) / 2, rel=1e-12)
    assert rec[6]["lr"] == pytest.approx(3e-3 * main(5), rel=1e-12)
    for at in (4, 6):  # a state written right at a merge, and one between merges
        again = tmp_path / f"again{at}"
        again.mkdir()
        shutil.copy(full / f"state_{at}.bin", again)
        res = _run(io, again, "--resume", again / f"state_{at}.bin")
        assert res.code == 0, res
        a, b = losses(full), losses(again)
        assert [b[s] for s in range(at + 1, 9)] == [a[s] for s in range(at + 1, 9)]
        fa, fb = load_checkpoint(full / "final.bin"), load_checkpoint(again / "final.bin")
        assert all(torch.equal(fa.tensors[k], fb.tensors[k]) for k in fa.tensors)
    st4, st8 = load_checkpoint(full / "state_4.bin"), load_checkpoint(full / "state_8.bin")
    assert st4.json("relora")["merges"] == 1 and st8.json("relora")["merges"] == 2
    assert all(torch.count_nonzero(v) == 0 for k, v in st4.prefixed("extra.relora.").items() if k.endswith(".B"))
    assert any(k.startswith("relora.") for k in st4.prefixed("optim.state."))
    final = load_checkpoint(full / "final.bin")
    plain = Transformer(final.config).state_dict()
    assert sorted(final.model_state()) == sorted(plain)
    assert not any("relora" in k for k in final.tensors)
    # final.bin = W + B A alpha / R of the last state (after the merge at step 8: B = 0, so W itself)
    w = st8.model_state()
    assert all(torch.equal(final.tensors[k], w[k]) for k in plain)
    assert not torch.equal(w["layers.0.mixer.wq.weight"], st4.model_state()["layers.0.mixer.wq.weight"])
    # a state read as a model (generate, export, --init) is its function: W + B A alpha / R
    st6 = load_checkpoint(full / "state_6.bin")
    raw, merged, ad = st6.model_state(merge_adapters=False), st6.model_state(), st6.prefixed("extra.relora.")
    w = "layers.1.ffn.w1.weight"
    assert torch.count_nonzero(ad[w + ".B"]) and torch.equal(merged[w], raw[w] + ad[w + ".B"] @ ad[w + ".A"])
    assert sorted(merged) == sorted(plain)
    best = load_checkpoint(full / "best.bin")  # written inside the Trainer's merged() at an evaluation
    at = best.json("best")["step"]
    assert at in (2, 4, 6, 8) and not any("relora" in k for k in best.tensors)
    want = load_checkpoint(full / f"state_{at}.bin").model_state()
    assert all(torch.equal(best.tensors[k], v) for k, v in want.items())
    from smedjan_tools.cli import app

    for ck in ("final.bin", "state_6.bin"):
        gen = CliRunner().invoke(app, ["generate", "-c", str(full / ck), "-p", "ROMEO:", "-n", "4",
                                       "--temperature", "0", "--json"])
        assert gen.exit_code == 0, gen.stderr[-2000:]


def test_sft_fine_tunes_with_lora(tmp_path_factory, tokenizer_path, tmp_path):
    from helpers import DATA
    from smedjan_tools.cli import app

    train_bin, _ = token_files(tmp_path_factory, tokenizer_path)
    res = cli_train("--dataset", train_bin, "--tokenizer", tokenizer_path, *MICRO, "--steps", "2",
                    "--checkpoint-dir", tmp_path / "base")
    assert res.code == 0, res
    r = CliRunner().invoke(app, ["sft", "-c", str(tmp_path / "base" / "final.bin"), "--data",
                                 str(DATA / "sft" / "instruction-data.json.zst"), "--max-len", "32", "--steps", "3",
                                 "--batch-size", "2", "--warmup", "0", "--val-fraction", "0", "--checkpoint-every", "3",
                                 "--checkpoint-dir", str(tmp_path / "sft"), "--output", str(tmp_path / "sft.bin"),
                                 "--lowrank", "2", "--lr", "1e-2"])
    assert r.exit_code == 0, r.stderr[-2000:]
    base, tuned = load_checkpoint(tmp_path / "base" / "final.bin"), load_checkpoint(tmp_path / "sft.bin")
    state = load_checkpoint(tmp_path / "sft" / "state_3.bin")
    assert sorted(tuned.model_state()) == sorted(base.model_state())
    w = "layers.1.ffn.w2.weight"
    assert torch.equal(state.tensors[w], base.tensors[w])  # W itself frozen, the adapters trained
    delta = tuned.tensors[w] - base.tensors[w]
    assert delta.abs().max() > 0 and torch.linalg.matrix_rank(delta.double(), rtol=1e-6) <= 2


@pytest.mark.parametrize("flags,needle", [
    (["--lowrank", "0"], "--lowrank 0 must be >= 1"),
    (["--lowrank", "33"], "--lowrank 33 is larger than the matrix layers.0.mixer.wq.weight (32, 32): at most 32"),
    (["--relora-interval", "10"], "--relora-interval needs --lowrank"),
    (["--lowrank", "2", "--relora-interval", "10", "--relora-warmup", "20"],
     "--relora-interval 10 is shorter than --relora-warmup 20"),
    (["--lowrank", "2", "--relora-interval", "10"], "--relora-interval 10 is shorter than --relora-warmup 50"),
    (["--lowrank", "2", "--relora-prune", "0.5"], "--relora-prune needs --relora-interval"),
    (["--lowrank", "2", "--optimizer", "muon"], "--lowrank needs --optimizer adamw"),
    (["--lowrank", "2", "--ema-decay", "0.9"], "--ema-decay does not combine with --lowrank"),
    (["--lowrank", "2", "--fsdp"], "--lowrank does not support --fsdp"),
])
def test_bad_flags_are_one_line(flags, needle, tmp_path_factory, tokenizer_path, tmp_path):
    train_bin, _ = token_files(tmp_path_factory, tokenizer_path)
    out = tmp_path / "ck"
    res = cli_train("--dataset", train_bin, "--tokenizer", tokenizer_path, *MICRO, "--steps", "200", *flags,
                    "--checkpoint-dir", out)
    assert_refused(res, out, needle)


def test_bench_runner_trains_low_rank_and_merges():
    from smedjan.training.bench import SmedjanRunner

    r = SmedjanRunner(micro_cfg(max_seq_len=32), 2, 32, options={"lowrank": 2, "relora_interval": 2})
    r.train(5)
    assert r.trainer.extras.relora.merges == 2 and len(r.trainer.extras.relora.adapters) == 4 * 7


def test_relora_under_ddp_equals_one_process(tmp_path_factory, tokenizer_path, tmp_path):
    """Two gloo processes with batch B (the adapters' gradients averaged by their hook):
    one process with batch 2B, across a merge, within the all-reduce's summation order."""
    from test_train_ddp import FLAGS, torchrun

    train_bin, val_bin = token_files(tmp_path_factory, tokenizer_path)
    flags = ["--dataset", train_bin, "--val-dataset", val_bin, "--tokenizer", tokenizer_path, *FLAGS,
             "--lowrank", "2", "--relora-interval", "4", "--relora-warmup", "2", "--json"]
    one, two = tmp_path / "one", tmp_path / "two"
    res = cli_train(*flags, "--batch-size", "4", "--checkpoint-dir", one)
    assert res.code == 0, res
    proc = torchrun(*flags, "--batch-size", "2", "--checkpoint-dir", two)
    assert proc.returncode == 0, proc.stderr[-3000:]
    la, lb = losses(one), losses(two)
    assert len(la) == 8 and [lb[s] for s in range(1, 9)] == pytest.approx([la[s] for s in range(1, 9)], rel=1e-5)
    fa, fb = load_checkpoint(one / "final.bin"), load_checkpoint(two / "final.bin")
    for k, v in fa.model_state().items():
        torch.testing.assert_close(fb.tensors[k], v, rtol=1e-4, atol=1e-5)
    assert load_checkpoint(two / "state_8.bin").json("relora")["merges"] == 2


def test_help_names_the_methods_and_sft_has_the_flags():
    from smedjan_tools.cli import app

    for tool in ("train", "sft"):
        out = CliRunner().invoke(app, [tool, "--help"], env={"COLUMNS": "400"}).stdout
        for text in ("--lowrank", "Hu et al. 2021", "--lowrank-alpha", "--relora-interval", "Lialin et al. 2023",
                     "--relora-warmup", "--relora-prune"):
            assert text in out, (tool, text)
