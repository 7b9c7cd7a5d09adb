"""Bad input to `smedjan train`: one `error:` line naming the file, exit 2, nothing written.

Runs the tool in-process (typer's CliRunner): the checks happen before any training, and
one torch import for all cases keeps this fast."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from train_helpers import MICRO, token_files

from smedjan.formats.checkpoint import load_checkpoint, save_checkpoint
from smedjan.formats.tokens import TokenWriter


class Res:
    def __init__(self, r):
        self.code, self.out, self.err = r.exit_code, r.stdout, r.stderr

    def __repr__(self):
        return f"<exit {self.code}\nstdout: {self.out[-1500:]}\nstderr: {self.err[-1500:]}>"


def run(*args) -> Res:
    from smedjan_tools.cli import app

    return Res(CliRunner().invoke(app, ["train", *map(str, args)]))


def assert_refused(res: Res, folder, *needles):
    assert res.code == 2, res
    assert "Traceback" not in res.err, res
    lines = [ln for ln in res.err.splitlines() if "error:" in ln]
    assert len(lines) == 1 and lines[0].startswith("smedjan train: error: "), res
    for n in needles:
        assert n in lines[0], (n, res)
    assert not folder.exists(), "nothing may be written"


@pytest.fixture(scope="module")
def made(tmp_path_factory, tokenizer_path, tokenizer):
    """Token files, and a short run's state_4.bin and final.bin (context 32)."""
    train_bin, val_bin = token_files(tmp_path_factory, tokenizer_path)
    folder = tmp_path_factory.mktemp("run")
    res = run("--dataset", train_bin, "--tokenizer", tokenizer_path, *MICRO, "--steps", "4", "--checkpoint-every", "4",
              "--checkpoint-dir", folder)
    assert res.code == 0, res
    return {"train": train_bin, "val": val_bin, "tok": tokenizer_path, "state": folder / "state_4.bin",
            "final": folder / "final.bin", "tokenizer": tokenizer}


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory):
    from smedjan.tokenizer import train_bpe

    path = tmp_path_factory.mktemp("tok2") / "other.bin"
    train_bpe(["another tokenizer, trained on another text " * 50], vocab_size=300, workers=1).save(path)
    return path


def args(made, *extra, dataset=None, tok=None):
    return ["--dataset", dataset or made["train"], "--tokenizer", tok or made["tok"], *MICRO, "--steps", "2", *extra]


def token_file(path, tokenizer, n, fingerprint=None):
    with TokenWriter(path, vocab_size=tokenizer.vocab_size, tokenizer_fingerprint=fingerprint or tokenizer.fingerprint,
                     bos_id=tokenizer.bos_id) as w:
        w.write(np.array([tokenizer.bos_id] + [65] * (n - 1)))
    return path


def test_dataset_made_with_another_tokenizer(made, other_tokenizer, tmp_path):
    out = tmp_path / "ck"
    assert_refused(run(*args(made, "--checkpoint-dir", out, tok=other_tokenizer)), out, str(made["train"]),
                   "made with tokenizer", str(other_tokenizer))


def test_val_dataset_made_with_another_tokenizer(made, tmp_path):
    val = token_file(tmp_path / "val.bin", made["tokenizer"], 500, fingerprint="0123456789abcdef")
    out = tmp_path / "ck"
    assert_refused(run(*args(made, "--val-dataset", val, "--checkpoint-dir", out)), out, str(val),
                   "0123456789abcdef")


@pytest.mark.parametrize("which", ["train", "val"])
def test_dataset_shorter_than_one_window(made, tmp_path, which):
    short = token_file(tmp_path / "short.bin", made["tokenizer"], 20)  # < seq_len + 1 = 33
    out = tmp_path / "ck"
    extra = ["--val-dataset", short] if which == "val" else []
    res = run(*args(made, *extra, "--checkpoint-dir", out, dataset=short if which == "train" else None))
    assert_refused(res, out, str(short), "fewer than one window")


def test_resume_from_another_config(made, tmp_path):
    out = tmp_path / "ck"
    res = run(*args(made, "--resume", made["state"], "--checkpoint-dir", out)[:4], "--size", "custom", "--dim", "64",
              "--layers", "2", "--heads", "2", "--batch-size", "4", "--seq-len", "32", "--steps", "8",
              "--checkpoint-dir", out, "--resume", made["state"])
    assert_refused(res, out, str(made["state"]), "dim 32 -> 64")


def test_resume_from_another_tools_state(made, tmp_path):
    ck = load_checkpoint(made["state"])
    sft = tmp_path / "sft_state.bin"
    save_checkpoint(sft, ck.tensors, kind=ck.kind, meta={**{k: v for k, v in ck.meta.items()
                                                            if k not in ("kind", "format_version", "format")},
                                                         "tool": "sft"})
    out = tmp_path / "ck"
    assert_refused(run(*args(made, "--resume", sft, "--checkpoint-dir", out)), out, str(sft), "smedjan sft")


def test_resume_from_a_model_file(made, tmp_path):
    out = tmp_path / "ck"
    assert_refused(run(*args(made, "--resume", made["final"], "--checkpoint-dir", out)), out, str(made["final"]),
                   "expected train_state")


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_corrupt_checkpoint(made, tmp_path, how):
    bad = tmp_path / "state_4.bin"
    if how == "truncated":
        data = made["state"].read_bytes()
        bad.write_bytes(data[: len(data) * 2 // 3])
    else:
        bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + b"\0" * 100)
    out = tmp_path / "ck"
    for flag in ("--resume", "--init"):
        assert_refused(run(*args(made, flag, bad, "--checkpoint-dir", out)), out, str(bad))


def test_seq_len_past_the_rope_context(made, tmp_path):
    out = tmp_path / "ck"
    base = ["--dataset", made["train"], "--tokenizer", made["tok"], "--steps", "2", "--checkpoint-dir", out]
    assert_refused(run(*base, "--init", made["final"], "--seq-len", "64", "--batch-size", "2"), out,
                   "--seq-len 64", "context of 32", str(made["final"]))
    assert_refused(run(*args(made, "--max-seq-len", "16", "--checkpoint-dir", out)), out, "--seq-len 32",
                   "context of 16")


def test_init_with_a_different_size(made, tmp_path):
    out = tmp_path / "ck"
    assert_refused(run("--dataset", made["train"], "--tokenizer", made["tok"], "--init", made["final"], "--size", "tiny",
                       "--seq-len", "32", "--checkpoint-dir", out), out, str(made["final"]), "differs from --size tiny")


@pytest.mark.parametrize("extra,needle", [
    (["--lr-schedule", "linear"], "--lr-schedule 'linear'"),
    (["--optimizer", "sgd"], "--optimizer 'sgd'"),
    (["--patience", "2"], "--patience needs --val-dataset"),
    (["--eval-every", "5"], "--eval-every needs --val-dataset"),  # refused, not ignored
    (["--val-tokens", "1000"], "--val-tokens needs --val-dataset"),
    (["--grad-accum", "0"], "--grad-accum 0"),
    (["--dim", "64"], "only apply to --size custom"),
])
def test_bad_flags(made, tmp_path, extra, needle):
    out = tmp_path / "ck"
    a = args(made, "--checkpoint-dir", out)
    if extra[0] == "--dim":
        a = ["--dataset", made["train"], "--tokenizer", made["tok"], "--size", "tiny", "--checkpoint-dir", out]
    assert_refused(run(*a, *extra), out, needle)


def test_missing_and_wrong_files(made, tmp_path):
    out = tmp_path / "ck"
    assert_refused(run(*args(made, "--checkpoint-dir", out, dataset=tmp_path / "nope.bin")), out, "does not exist")
    assert_refused(run(*args(made, "--checkpoint-dir", out, dataset=made["tok"])), out, str(made["tok"]))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = run(*args(made, "--checkpoint-dir", blocker))
    assert res.code == 2 and "is a file" in res.err and blocker.read_text() == "x"


def test_a_good_run_after_all_that_still_works(made, tmp_path):
    out = tmp_path / "ck"
    shutil.rmtree(out, ignore_errors=True)
    res = run(*args(made, "--checkpoint-dir", out, "--resume", made["state"], "--steps", "6"))
    assert res.code == 0, res
    assert (out / "final.bin").exists() and (out / "state_6.bin").exists()


def test_wandb_run_needs_wandb_and_dummy_disables_it(made, tmp_path):
    import importlib.util

    out = tmp_path / "ck"
    if importlib.util.find_spec("wandb") is None:
        assert_refused(run(*args(made, "--checkpoint-dir", out, "--run", "myrun")), out, "needs the wandb package")
    res = run(*args(made, "--checkpoint-dir", out, "--run", "dummy"))
    assert res.code == 0, res


def test_architecture_flags_reach_the_model(made, tmp_path):
    """--kv-heads, --sliding-window, --rope-theta, --untied on a new model; --yarn-scale on --init."""
    out = tmp_path / "ck"
    res = run("--dataset", made["train"], "--tokenizer", made["tok"], "--size", "custom", "--dim", "32", "--layers", "1",
              "--heads", "4", "--kv-heads", "2", "--sliding-window", "8", "--rope-theta", "500", "--untied",
              "--batch-size", "2", "--seq-len", "16", "--steps", "1", "--checkpoint-dir", out)
    assert res.code == 0, res
    cfg = load_checkpoint(out / "final.bin").config
    assert (cfg.attention.n_kv_heads, cfg.attention.sliding_window, cfg.rope.theta, cfg.tie_embeddings,
            cfg.max_seq_len) == (2, 8, 500.0, False, 16)
    out2 = tmp_path / "ck2"
    res = run("--dataset", made["train"], "--tokenizer", made["tok"], "--init", made["final"], "--yarn-scale", "2",
              "--batch-size", "2", "--seq-len", "64", "--steps", "1", "--checkpoint-dir", out2)
    assert res.code == 0, res
    cfg = load_checkpoint(out2 / "final.bin").config
    assert (cfg.rope.scaling, cfg.rope.factor, cfg.rope.original_max_seq_len, cfg.max_seq_len) == ("yarn", 2.0, 32, 64)


def test_resume_with_another_batch_or_dataset_is_refused(made, tmp_path):
    out = tmp_path / "ck"
    a = ["--dataset", made["train"], "--tokenizer", made["tok"], "--resume", made["state"], "--steps", "8",
         "--checkpoint-dir", out]
    assert_refused(run(*a, "--batch-size", "8", "--seq-len", "32"), out, "global batch")
    other = token_file(tmp_path / "other.bin", made["tokenizer"], 5000)
    a[1] = other
    assert_refused(run(*a, "--batch-size", "4", "--seq-len", "32"), out, "another dataset")


def test_init_from_a_checkpoint_without_tokenizer(made, tmp_path):
    ck = load_checkpoint(made["final"])
    bare = tmp_path / "bare.bin"
    save_checkpoint(bare, ck.model_state(), kind=ck.kind, config=ck.config)  # no tokenizer, no fingerprint
    out = tmp_path / "ck"
    assert_refused(run("--dataset", made["train"], "--tokenizer", made["tok"], "--init", bare, "--seq-len", "32",
                       "--checkpoint-dir", out), out, str(bare), "no tokenizer fingerprint")


def test_progress_and_samples_go_to_stderr(made, tmp_path):
    res = run(*args(made, "--checkpoint-dir", tmp_path / "ck", "--sample-every", "2", "--json"))
    assert res.code == 0, res
    assert "sample at step 2: '" in res.err
    assert all(f in res.err for f in ("loss=", "lr=", "tok/s=")) and "mfu" not in res.err  # MFU only on GPU
    import json

    assert json.loads(res.out)["steps"] == 2  # stdout holds only the summary
