"""DDP: `torchrun --nproc-per-node 2` (gloo, CPU) with batch B per process equals one process
with batch 2B, within float tolerance (the gradient all-reduce sums in another order), for
every optimizer: each rank applies the same update to the all-reduced gradient (Muon and
the hybrid replicate their work rather than shard it; Sophia draws its Hessian labels for
the global batch and slices its rows)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from train_helpers import ENV1, MICRO, for_optimizer, losses, metrics, token_files, train

from smedjan.formats.checkpoint import load_checkpoint

FLAGS = [a for a in MICRO if a not in ("--batch-size", "4")] + ["--steps", "8", "--checkpoint-every", "4",
                                                                  "--grad-accum", "2", "--val-tokens", "512"]


def torchrun(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "SMEDJAN_PLAIN_PROGRESS": "1", **ENV1}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "smedjan_tools.cli", "train", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def one_and_two(flags: list, tmp_path) -> tuple:
    """Checkpoint folders of `flags` trained by one process at batch 4 and by two at batch 2."""
    one, two = tmp_path / "one", tmp_path / "two"
    res = train(*flags, "--batch-size", "4", "--checkpoint-dir", one)
    assert res.code == 0, res
    proc = torchrun(*flags, "--batch-size", "2", "--checkpoint-dir", two)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return one, two


# adamw also runs BitNet b1.58 (its ternary W_q follows every update on every rank), adamw-cpu
# µP (--mup-base: its per-role rates and multipliers are the same on every rank)
OPTIMIZERS = {"adamw": ["--bitnet"], "adamw-cpu": ["--mup-base", "16"], "adamw-8bit": [],
              "sophia": ["--hessian-interval", "3"], "muon": [], "hybrid": ["--cautious"]}
# optimizers with a threshold inside the update: 8-bit codes, Sophia's sign(m), the hybrid's cautious masks
ROUNDING = ("adamw-8bit", "sophia", "hybrid")


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_two_gloo_processes_equal_one_with_the_global_batch(tmp_path_factory, tokenizer_path, tmp_path, name):
    train_bin, val_bin = token_files(tmp_path_factory, tokenizer_path)
    io = ["--dataset", train_bin, "--tokenizer", tokenizer_path, "--val-dataset", val_bin]
    one, two = tmp_path / "one", tmp_path / "two"
    opt = ["--optimizer", name, *OPTIMIZERS[name]]
    flags = for_optimizer(FLAGS, name)
    res = train(*io, *flags, *opt, "--batch-size", "4", "--checkpoint-dir", one, "--json")
    assert res.code == 0, res
    proc = torchrun(*io, *flags, *opt, "--batch-size", "2", "--checkpoint-dir", two, "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert len(summaries) == 1 and summaries[0]["world_size"] == 2  # only rank 0 reports
    assert summaries[0]["tokens"] == json.loads(res.out)["tokens"] == 8 * 2 * 4 * 32
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert [b[s] for s in sorted(b)] == pytest.approx([a[s] for s in sorted(a)], rel=1e-5)
    va = [r["val_bpb"] for r in metrics(one) if "val_bpb" in r]
    vb = [r["val_bpb"] for r in metrics(two) if "val_bpb" in r]
    assert len(va) == len(vb) == 2 and vb == pytest.approx(va, rel=1e-5)
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    wa = load_checkpoint(one / "final.bin").model_state()
    wb = load_checkpoint(two / "final.bin").model_state()
    for k in wa:
        if name in ROUNDING:
            # a summation-order difference can move a value across a code boundary (8-bit) or
            # flip the sign of a near-zero momentum or product (Sophia's lr sign(m), cautious
            # masks): a few coordinates
            # differ by up to two steps, the rest as for any optimizer
            off = ((wb[k] - wa[k]).abs() > 1e-5 + 1e-4 * wa[k].abs()).double().mean()
            assert off <= 1e-3 and (wb[k] - wa[k]).abs().max() <= 2 * 3e-3, (k, off)
        else:
            torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)
    st = load_checkpoint(two / "state_8.bin")
    assert st.json("world_size") == 2 and st.json("source")["global_batch"] == 4


@pytest.mark.slow
def test_recurrent_mixers_under_ddp_equal_one_process(tmp_path_factory, tokenizer_path, tmp_path):
    """Every O(N) mixer's parameters take part in the loss (DDP would stop on an unused one),
    and two processes give one process's losses."""
    train_bin, val_bin = token_files(tmp_path_factory, tokenizer_path)
    flags = [a if a != "2" or FLAGS[i - 1] != "--layers" else "4" for i, a in enumerate(FLAGS)]
    flags += ["--layer-pattern", "ssm,linear_attn,rwkv,attention", "--ssm-head-dim", "16", "--rwkv-head-dim", "16",
              "--dataset", train_bin, "--val-dataset", val_bin, "--tokenizer", tokenizer_path, "--checkpoint-every",
              "0", "--steps", "4"]
    one, two = one_and_two(flags, tmp_path)
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert [b[s] for s in sorted(b)] == pytest.approx([a[s] for s in sorted(a)], rel=1e-5)
