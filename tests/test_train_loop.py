"""The Trainer with synthetic batch sources: NaN/Inf skipping and stopping, checkpoint
cadence and rotation, atomic states, in-process resume, tool checks, early stopping,
gradient accumulation, signals."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from smedjan.errors import UserError
from smedjan.formats import constants as C
from smedjan.formats.checkpoint import load_checkpoint
from smedjan.model import ModelConfig, Transformer
from smedjan.optim import OptimizerSettings, build_optimizer, param_groups
from smedjan.training import Schedule, Trainer, TrainerConfig
from smedjan.training.pretrain import lm_loss
from smedjan.training.state import list_states, read_train_state

CFG = ModelConfig.make(vocab_size=64, dim=16, n_layers=1, n_heads=2, max_seq_len=16)


class Rows:
    """Row k of an endless stream is random tokens seeded by k; each call takes the next
    `batch` rows, so two sources with batch B and 2B see the same rows."""

    def __init__(self, batch: int, seq: int = 8):
        self.batch, self.seq, self.k = batch, seq, 0

    def next_batch(self):
        rows = [torch.randint(0, CFG.vocab_size, (self.seq + 1,), generator=torch.Generator().manual_seed(self.k + i))
                for i in range(self.batch)]
        self.k += self.batch
        r = torch.stack(rows)
        return r[:, :-1], r[:, 1:]

    def state_dict(self):
        return {"k": self.k}

    def load_state_dict(self, s):
        self.k = s["k"]


def make(folder, steps=8, batch=4, seed=0, tool="train", loss_fn=lm_loss, evaluator=None, **kw):
    torch.manual_seed(seed)
    model = Transformer(CFG)
    opt = build_optimizer("adamw", param_groups(model, 0.1), OptimizerSettings(lr=1e-2))
    kw.setdefault("handle_signals", False)
    cfg = TrainerConfig(tool=tool, steps=steps, checkpoint_dir=folder, **kw)
    return Trainer(model, opt, Schedule("cosine", steps, 2), Rows(batch), loss_fn, cfg, model_config=CFG,
                   run_config={"test": True}, evaluator=evaluator)


def metric_lines(folder):
    return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]


def steps_of(folder):
    return [s for s, _ in list_states(folder)]


def test_nonfinite_step_is_skipped_and_counted(tmp_path):
    tr = make(tmp_path, steps=6, fault_steps=frozenset({3}), checkpoint_every=0)
    res = tr.fit()
    assert res.reason == "done" and res.step == 6 and res.skipped_steps == 1
    lines = metric_lines(tmp_path)
    assert lines[2]["step"] == 3 and lines[2]["loss"] is None and lines[2]["bad_step"] is True
    assert [ln["skipped"] for ln in lines] == [0, 0, 1, 1, 1, 1]
    # AdamW counts its own updates: one of the six steps never reached it.
    assert all(int(s["step"]) == 5 for s in tr.optimizer.state.values())
    assert all(torch.isfinite(p).all() for p in tr.model.parameters())


def test_bad_steps_apart_do_not_stop_the_run(tmp_path):
    res = make(tmp_path, steps=8, fault_steps=frozenset({2, 4, 6}), max_bad_steps=2, checkpoint_every=0).fit()
    assert res.reason == "done" and res.skipped_steps == 3


def test_consecutive_bad_steps_stop_and_keep_the_last_good_state(tmp_path):
    tr = make(tmp_path, steps=20, fault_steps=frozenset({5, 6, 7}), max_bad_steps=3, checkpoint_every=2, keep=0)
    res = tr.fit()
    assert res.reason == "diverged" and res.step == 7
    assert steps_of(tmp_path) == [2, 4]  # nothing written after the last good step
    assert not (tmp_path / "final.bin").exists()
    assert "state_4.bin" in res.message and "3 steps in a row" in res.message
    st = read_train_state(tmp_path / "state_4.bin", "train")
    assert st.step == 4 and st.trainer["bad_in_a_row"] == 0
    assert all(torch.isfinite(t).all() for t in st.ck.model_state().values())


def test_checkpoint_every_and_keep(tmp_path):
    res = make(tmp_path, steps=10, checkpoint_every=3, keep=2).fit()
    assert steps_of(tmp_path) == [9, 10]  # 3 and 6 rotated out; 10 written at the end
    assert res.last_state == tmp_path / "state_10.bin"
    ck = load_checkpoint(tmp_path / "final.bin", kinds=(C.KIND_MODEL,))
    assert ck.json("step") == 10 and ck.config == CFG and ck.meta["tool"] == "train"
    assert make(tmp_path / "all", steps=6, checkpoint_every=2, keep=0).fit().reason == "done"
    assert steps_of(tmp_path / "all") == [2, 4, 6]


def test_a_crash_mid_write_leaves_no_state_file(tmp_path, monkeypatch):
    from smedjan.formats import safetensors as st

    tr = make(tmp_path, steps=10, checkpoint_every=2, keep=0)
    tr.cfg.steps = 4
    tr.fit()
    assert steps_of(tmp_path) == [2, 4]
    good = (tmp_path / "state_4.bin").read_bytes()
    real = st.write_safetensors

    def crash(f, tensors, metadata=None):
        real(f, tensors, metadata)
        f.flush()
        f.truncate(f.tell() // 2)  # half a file, then the "power cut"
        raise OSError("simulated crash mid-write")

    monkeypatch.setattr(st, "write_safetensors", crash)
    tr.train_step()
    with pytest.raises(OSError, match="simulated"):
        tr.save_state()
    assert steps_of(tmp_path) == [2, 4]
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    assert (tmp_path / "state_4.bin").read_bytes() == good
    assert read_train_state(tmp_path / "state_4.bin", "train").step == 4


def test_resume_in_process_repeats_the_losses_bit_for_bit(tmp_path):
    make(tmp_path / "a", steps=8, checkpoint_every=4, keep=0).fit()
    tr = make(tmp_path / "b", steps=8, seed=123)  # other init: everything must come from the state
    tr.resume(tmp_path / "a" / "state_4.bin")
    assert tr.step == 4
    tr.fit()
    a = {r["step"]: r["loss"] for r in metric_lines(tmp_path / "a")}
    b = {r["step"]: r["loss"] for r in metric_lines(tmp_path / "b")}
    assert sorted(b) == [5, 6, 7, 8]
    assert all(a[s] == b[s] for s in b)


def test_a_state_of_another_tool_or_model_is_refused(tmp_path):
    make(tmp_path, steps=2, checkpoint_every=2).fit()
    with pytest.raises(UserError, match="state of `smedjan train`, not of `smedjan sft`"):
        make(tmp_path / "x", steps=2, tool="sft").resume(tmp_path / "state_2.bin")
    other = make(tmp_path / "y", steps=2)
    other.model_config = ModelConfig.make(vocab_size=64, dim=32, n_layers=1, n_heads=2, max_seq_len=16)
    with pytest.raises(UserError, match="another model config"):
        other.resume(tmp_path / "state_2.bin")
    with pytest.raises(UserError, match="past this run"):
        make(tmp_path / "z", steps=1).resume(tmp_path / "state_2.bin")


def test_early_stopping_after_patience_evaluations(tmp_path):
    scripted = iter([3.0, 2.0, 2.5, 2.4, 9.0, 9.0])
    tr = make(tmp_path, steps=20, evaluator=lambda m: {"val_loss": next(scripted)}, eval_every=1, patience=2,
              checkpoint_every=0)
    res = tr.fit()
    assert res.reason == "early_stop" and res.step == 4  # 2.5 and 2.4 do not beat 2.0
    assert res.best == {"step": 2, "val_loss": 2.0}
    assert load_checkpoint(tmp_path / "best.bin").json("step") == 2
    assert (tmp_path / "final.bin").exists() and steps_of(tmp_path) == [4]
    assert [r.get("val_loss") for r in metric_lines(tmp_path)] == [3.0, 2.0, 2.5, 2.4]


def test_grad_accumulation_equals_the_bigger_batch(tmp_path):
    a = make(None, steps=4, batch=4, grad_accum=2)
    b = make(None, steps=4, batch=8, grad_accum=1)
    la = [a.train_step()["loss"] for _ in range(4)]
    lb = [b.train_step()["loss"] for _ in range(4)]
    assert la == pytest.approx(lb, rel=1e-5)
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("sig,reason", [(signal.SIGTERM, "terminated"), (signal.SIGINT, "interrupted")])
def test_a_signal_finishes_the_step_and_writes_a_state(tmp_path, sig, reason):
    def loss_then_signal(model, batch):
        if tr.step == 2:  # during the third step
            os.kill(os.getpid(), sig)
        return lm_loss(model, batch)

    tr = make(tmp_path, steps=50, loss_fn=loss_then_signal, checkpoint_every=0, handle_signals=True)
    old = signal.getsignal(sig)
    res = tr.fit()
    assert signal.getsignal(sig) == old  # handlers restored
    assert res.reason == reason and res.step == 3
    assert steps_of(tmp_path) == [3] and not (tmp_path / "final.bin").exists()
    assert read_train_state(tmp_path / "state_3.bin", "train").source == {"k": 12}


def test_a_second_run_into_the_same_folder_is_refused_naming_the_holder(tmp_path):
    """Issue 20 item 9: two runs into one --checkpoint-dir both succeeded and interleaved
    their states, final.bin and metrics."""
    from smedjan.training.files import LOCK_NAME

    refused = []

    def loss_and_a_rival(model, batch):
        if tr.step == 2 and not refused:
            with pytest.raises(UserError) as e:
                make(tmp_path, steps=2).fit()
            refused.append(str(e.value))
        return lm_loss(model, batch)

    tr = make(tmp_path, steps=4, loss_fn=loss_and_a_rival, checkpoint_every=2)
    assert tr.fit().reason == "done"
    assert refused == [f"{tmp_path}: another run (PID {os.getpid()}) is writing to this checkpoint folder; wait for "
                       "it to finish or choose another --checkpoint-dir"]
    assert [r["step"] for r in metric_lines(tmp_path)] == [1, 2, 3, 4]  # the rival wrote nothing
    assert not (tmp_path / LOCK_NAME).exists()  # released
    assert make(tmp_path, steps=2).fit().reason == "done"  # and the next run goes ahead


def test_a_lock_file_left_by_a_killed_run_is_taken_over(tmp_path):
    from smedjan.training.files import LOCK_NAME

    tmp_path.mkdir(exist_ok=True)
    (tmp_path / LOCK_NAME).write_text("999999999\n")  # a dead run's: the kernel dropped its flock
    assert make(tmp_path, steps=2).fit().reason == "done"
    assert not (tmp_path / LOCK_NAME).exists()
