"""`smedjan train` end to end on the shipped corpus: bit-exact resume (also after kill -9),
signals, --init, horizon, validation bits-per-byte, checkpoint files, --help."""

from __future__ import annotations

import math
import signal
import time

import pytest
import torch

from helpers import assert_user_error
from train_helpers import MICRO, for_optimizer, last_step, losses, metrics, popen_train, token_files, train

from smedjan.formats import constants as C
from smedjan.formats.checkpoint import load_checkpoint

# The long reference run: long enough that a kill lands mid-run, short enough for CI.
STEPS = 600
LONG = [*MICRO, "--steps", str(STEPS), "--checkpoint-every", "25", "--keep", "0", "--val-tokens", "1024"]


@pytest.fixture(scope="module")
def data(tmp_path_factory, tokenizer_path):
    train_bin, val_bin = token_files(tmp_path_factory, tokenizer_path)
    return {"train": train_bin, "val": val_bin, "tok": tokenizer_path}


def io(data, val=True):
    args = ["--dataset", data["train"], "--tokenizer", data["tok"]]
    return args + (["--val-dataset", data["val"]] if val else [])


@pytest.fixture(scope="module")
def base(data, tmp_path_factory):
    """The uninterrupted run every resumed run must repeat exactly."""
    folder = tmp_path_factory.mktemp("base")
    res = train(*io(data), *LONG, "--checkpoint-dir", folder, "--json")
    assert res.code == 0, res
    return folder


def test_base_run_writes_states_final_and_metrics(base, data):
    import json

    assert sorted(p.name for p in base.glob("state_*.bin")) == sorted(f"state_{s}.bin" for s in range(25, STEPS + 1, 25))
    rec = metrics(base)
    assert [r["step"] for r in rec if "loss" in r] == list(range(1, STEPS + 1))
    assert all(k in rec[0] for k in ("loss", "lr", "grad_norm", "tok_s", "skipped"))
    assert [r["step"] for r in rec if "val_bpb" in r] == list(range(25, STEPS + 1, 25))
    first, last = rec[0]["loss"], rec[-1]["loss"]
    assert abs(first - math.log(2048)) < 0.3  # GPT-2 init: the loss starts near ln(vocab)
    assert last < first - 1.5
    ck = load_checkpoint(base / "final.bin", kinds=(C.KIND_MODEL,))
    assert ck.tokenizer.fingerprint == ck.fingerprint and ck.json("step") == STEPS
    assert json.loads(ck.meta["run_config"])["lr_schedule"] == "cosine"
    st = load_checkpoint(base / "state_50.bin", kinds=(C.KIND_TRAIN_STATE,))
    assert st.meta["tool"] == "train" and st.json("source")["step"] == 50  # the loader's position


def test_resume_reproduces_the_uninterrupted_losses_bit_for_bit(base, data, tmp_path):
    res = train(*io(data), *LONG, "--checkpoint-dir", tmp_path, "--resume", base / "state_500.bin")
    assert res.code == 0, res
    a, b = losses(base), losses(tmp_path)
    assert sorted(b) == list(range(501, STEPS + 1))
    assert all(a[s] == b[s] for s in b)  # bitwise, not approximately
    va = {r["step"]: r["val_loss"] for r in metrics(base) if "val_loss" in r}
    vb = {r["step"]: r["val_loss"] for r in metrics(tmp_path) if "val_loss" in r}
    assert vb and all(va[s] == vb[s] for s in vb)


def _wait_for_step(proc, folder, step, timeout=300):
    t0 = time.monotonic()
    while last_step(folder) < step:
        assert proc.poll() is None, (proc.returncode, proc.communicate())
        assert time.monotonic() - t0 < timeout
        time.sleep(0.005)


def test_kill_9_mid_run_then_resume_repeats_the_run(base, data, tmp_path):
    proc = popen_train(*io(data), *LONG, "--checkpoint-dir", tmp_path)
    _wait_for_step(proc, tmp_path, 60)
    proc.kill()  # SIGKILL: no handler, no cleanup
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    states = sorted(tmp_path.glob("state_*.bin"), key=lambda p: int(p.stem.split("_")[1]))
    assert states, "a state must exist after 60 steps at --checkpoint-every 25"
    for p in states:  # every state under its real name is whole
        load_checkpoint(p, kinds=(C.KIND_TRAIN_STATE,))
    killed_at = last_step(tmp_path)
    assert killed_at < STEPS, "the run ended before the kill: make it longer"
    res = train(*io(data), *LONG, "--checkpoint-dir", tmp_path, "--resume", states[-1])
    assert res.code == 0, res
    assert not list(tmp_path.glob(".*.tmp"))
    a, b = losses(base), losses(tmp_path)
    assert sorted(b) == list(range(1, STEPS + 1))  # lines past the state were dropped, then rewritten
    assert all(a[s] == b[s] for s in a)


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_signal_writes_a_state_and_exits_cleanly(base, data, tmp_path, sig, code):
    proc = popen_train(*io(data), *LONG, "--checkpoint-dir", tmp_path)
    _wait_for_step(proc, tmp_path, 5)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == code, err
    assert "Traceback" not in err and signal.Signals(sig).name in err
    stopped = last_step(tmp_path)
    assert stopped < STEPS
    assert (tmp_path / f"state_{stopped}.bin").exists() and not (tmp_path / "final.bin").exists()
    if sig == signal.SIGTERM:  # and the run continues from it exactly
        res = train(*io(data), *LONG, "--checkpoint-dir", tmp_path, "--resume", tmp_path / f"state_{stopped}.bin")
        assert res.code == 0, res
        a, b = losses(base), losses(tmp_path)
        assert all(a[s] == b[s] for s in range(1, STEPS + 1))


def test_val_bpb_matches_an_independent_computation(base, data):
    """The logged val_bpb of final.bin, recomputed here from the model's logits, the token
    file and the tokenizer's byte lengths: nats of text targets / ln 2 / their bytes."""
    from smedjan.data.loader import iter_sequential
    from smedjan.model import load_model

    model, tok, _ = load_model(base / "final.bin")
    nbytes = torch.as_tensor(tok.token_byte_lengths)
    nll = n_bytes = n = total = 0.0
    with torch.no_grad():
        for x, y in iter_sequential(data["val"], 4, 32, max_batches=1024 // 128):
            logp = torch.log_softmax(model(x).double(), -1).gather(-1, y[..., None])[..., 0]
            b = nbytes[y]
            nll += float(-(logp * (b > 0)).sum())
            n_bytes += float(b.sum())
            total += float(-logp.sum())
            n += y.numel()
    last = [r for r in metrics(base) if r.get("step") == STEPS and "val_bpb" in r][-1]
    assert last["val_bpb"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-6)
    assert last["val_loss"] == pytest.approx(total / n, rel=1e-6)


def test_init_starts_from_the_weights_with_a_fresh_optimizer(base, data, tmp_path):
    res = train(*io(data, val=False), "--init", base / "final.bin", "--batch-size", "4", "--seq-len", "32",
                "--steps", "3", "--warmup", "1", "--checkpoint-dir", tmp_path, "--json")
    assert res.code == 0, res
    first = losses(tmp_path)[1]
    assert first < losses(base)[1] - 1.0  # trained weights, not a fresh init
    assert load_checkpoint(tmp_path / "final.bin").config == load_checkpoint(base / "final.bin").config


def test_horizon_from_the_param_data_ratio(data, tmp_path):
    import json

    res = train(*io(data, val=False), *MICRO, "--target-param-data-ratio", "0.01", "--checkpoint-dir", tmp_path,
                "--json")
    assert res.code == 0, res
    summary = json.loads(res.out)
    assert summary["steps"] == math.ceil(0.01 * summary["params"] / (4 * 32))
    assert "from --target-param-data-ratio" in res.err


def test_nonfinite_steps_stop_the_run_with_the_last_good_state(data, tmp_path):
    res = train(*io(data, val=False), *MICRO, "--steps", "40", "--checkpoint-every", "4", "--keep", "0",
                "--max-bad-steps", "3", "--checkpoint-dir", tmp_path,
                env={"SMEDJAN_FAULT_NONFINITE_STEPS": "3,10,11,12"})
    assert_user_error(res, "stopped at step 12", "3 steps in a row", "state_8.bin")
    assert sorted(p.name for p in tmp_path.glob("state_*.bin")) == ["state_4.bin", "state_8.bin"]
    assert not (tmp_path / "final.bin").exists()
    rec = metrics(tmp_path)
    assert [r["step"] for r in rec if r.get("bad_step")] == [3, 10, 11, 12]
    assert rec[-1]["skipped"] == 4


def test_help_lists_the_flags_and_defaults():
    from helpers import smedjan

    res = smedjan("train", "--help")
    assert res.code == 0
    text = " ".join(res.out.replace("│", " ").split())  # the help box wraps lines anywhere
    for flag in ("--dataset", "--tokenizer", "--size", "--batch-size", "--seq-len", "--steps", "--lr", "--warmup",
                 "--lr-schedule", "--checkpoint-dir", "--grad-accum", "--val-dataset", "--resume", "--init",
                 "--checkpoint-every", "--keep", "--seed", "--min-lr", "--target-flops", "--target-param-data-ratio",
                 "--optimizer", "--adamw-beta2", "--patience", "--device", "--compile", "--run", "--sample-every",
                 "--kv-heads", "--sliding-window", "--yarn-scale", "--ffn-mult", "--max-bad-steps", "--json",
                 "--adam-beta1", "--matrix-lr", "--embedding-lr", "--unembedding-lr", "--scalar-lr", "--normuon",
                 "--cautious", "--cautious-wd", "--muon-momentum", "--momentum-start", "--momentum-warmup",
                 "--momentum-end", "--wd-schedule", "--sophia-rho", "--hessian-interval", "--warmup-ratio",
                 "--final-lr-frac", "--total-batch-size"):
        assert flag in text, flag
    for default in ("default: 32", "default: 256", "default: 0.0003", "default: 2000", "default: cosine",
                    "default: checkpoints", "50000", "wso", "130", "adamw-8bit", "muon-adamw", "hybrid 0.85",
                    "default: constant", "(default 0.04)", "0.3 untied"):
        assert default in text, default


def test_a_second_train_into_a_busy_checkpoint_dir_is_refused(data, tmp_path):
    """Issue 20 item 9: both runs used to succeed, interleaving states and metrics."""
    first = popen_train(*io(data), *LONG, "--checkpoint-dir", tmp_path)
    try:
        _wait_for_step(first, tmp_path, 3)
        res = train(*io(data), *MICRO, "--steps", "5", "--checkpoint-dir", tmp_path)
        assert_user_error(res, str(tmp_path), f"PID {first.pid}", "--checkpoint-dir")
    finally:
        first.kill()
        first.communicate()
    assert not (tmp_path / "final.bin").exists()
    # the lock died with its holder: the next run goes ahead
    res = train(*io(data), *MICRO, "--steps", "5", "--checkpoint-dir", tmp_path)
    assert res.code == 0, res


# Every optimizer of the menu (a flag or two so its moving parts are on: Sophia refreshes its
# Hessian across the resume point, the hybrid's momentum schedule runs).
OPTIMIZERS = {"adamw": [], "adamw-cpu": [], "adamw-8bit": [], "sophia": ["--hessian-interval", "3"], "muon": [],
              "hybrid": ["--wd-schedule", "cosine"]}
# a state tensor each optimizer must have written, by parameter name
STATE_KEY = {"adamw": "tok_embeddings.weight.exp_avg_sq", "adamw-cpu": "tok_embeddings.weight.exp_avg",
             "adamw-8bit": "tok_embeddings.weight.exp_avg_sq_absmax", "sophia": "layers.1.ffn.w2.weight.hessian",
             "muon": "layers.0.mixer.wq.weight.momentum_buffer",
             "hybrid": "layers.0.mixer.wq.weight.second_momentum_buffer"}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_optimizer_resumes_bit_for_bit(data, tmp_path, name):
    flags = [*for_optimizer(MICRO, name), "--steps", "12", "--checkpoint-every", "4", "--keep", "0", "--optimizer", name,
             *OPTIMIZERS[name]]
    full, part = tmp_path / "full", tmp_path / "part"
    res = train(*io(data, val=False), *flags, "--checkpoint-dir", full)
    assert res.code == 0, res
    st = load_checkpoint(full / "state_8.bin", kinds=(C.KIND_TRAIN_STATE,))
    assert "optim.state." + STATE_KEY[name] in st.tensors
    res = train(*io(data, val=False), *flags, "--checkpoint-dir", part, "--resume", full / "state_8.bin")
    assert res.code == 0, res
    a, b = losses(full), losses(part)
    assert sorted(b) == list(range(9, 13)) and all(a[s] == b[s] for s in b)
    wa = load_checkpoint(full / "final.bin").model_state()
    wb = load_checkpoint(part / "final.bin").model_state()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("flags,message", [
    (["--optimizer", "lion"], "--optimizer 'lion' is not available"),
    (["--optimizer", "hybrid", "--matrix-lr", "-0.02"], "--matrix-lr -0.02 must be a positive number"),
    (["--optimizer", "hybrid", "--lr", "0.01"], "--lr does not apply to --optimizer hybrid"),
    (["--optimizer", "adamw", "--normuon"], "--normuon does not apply to --optimizer adamw"),
    (["--optimizer", "sophia", "--sophia-rho", "0"], "--sophia-rho 0.0 must be a positive number"),
    (["--optimizer", "muon", "--adam-beta1", "1.5"], "--adam-beta1 1.5 must be in [0, 1)"),
    (["--warmup-ratio", "0.1", "--warmup", "5"], "--warmup-ratio and --warmup exclude each other"),
    (["--total-batch-size", "100"], "--total-batch-size 100 is not a multiple"),
    (["--total-batch-size", "-1", "--steps", "5"], "--total-batch-size -1 derives the batch from the horizon"),
])
def test_bad_optimizer_flags_are_one_line_errors(data, tmp_path, flags, message):
    base = MICRO if "--lr" in flags else for_optimizer(MICRO, flags[flags.index("--optimizer") + 1]
                                                        if "--optimizer" in flags else "adamw")
    res = train(*io(data, val=False), *base, "--steps", "5", *flags, "--checkpoint-dir", tmp_path / "ck")
    assert_user_error(res, message)
    assert not (tmp_path / "ck").exists()


def test_total_batch_size_sets_grad_accum_and_scales_the_rates(data, tmp_path):
    import json

    res = train(*io(data, val=False), *for_optimizer(MICRO, "hybrid"), "--steps", "2", "--total-batch-size", "256",
                "--optimizer", "hybrid",
                "--checkpoint-dir", tmp_path, "--json")
    assert res.code == 0, res
    assert json.loads(res.out)["tokens"] == 2 * 256  # 4 x 32 per micro-batch, 2 micro-batches
    rc = load_checkpoint(tmp_path / "final.bin").json("run_config")
    assert rc["grad_accum"] == 2 and rc["total_batch_size"] == 256
    scale = (256 / 2 ** 19) ** 0.5
    assert f"matrix muon {0.02 * scale:.3g}" in res.err
