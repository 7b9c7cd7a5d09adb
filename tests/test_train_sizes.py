"""`smedjan sizes` and `smedjan bench`: the numbers come from ModelConfig and the Trainer."""

from __future__ import annotations

import json
import sys

import pytest

from helpers import REPO, assert_user_error, smedjan

from smedjan.model import PRESETS, ModelConfig, Transformer


def test_sizes_equal_the_model_and_the_documented_counts():
    res = smedjan("sizes", "--vocab-size", "8192", "--json")
    assert res.code == 0, res
    rows = {r["size"]: r for r in json.loads(res.out)["sizes"]}
    assert list(rows) == list(PRESETS)
    for name, r in rows.items():
        cfg = ModelConfig.from_preset(name, 8192)
        assert r["params"] == cfg.n_params() and r["non_embedding_params"] == cfg.n_params(embedding=False)
        assert r["train_flops_per_token"] == cfg.flops_per_token(256)
    # The documented sizes: small 7.2M, medium 45M (dim 512, 12 layers, 8 heads), tiny ~2M, max ~6.5B.
    assert round(rows["small"]["params"] / 1e6, 1) == 7.2
    assert round(rows["medium"]["params"] / 1e6) == 45 and (rows["medium"]["dim"], rows["medium"]["layers"],
                                                            rows["medium"]["heads"]) == (512, 12, 8)
    assert round(rows["tiny"]["params"] / 1e6) == 2 and round(rows["max"]["params"] / 1e9, 1) == 6.5
    # ... and they are what the model really holds (tied head counted once).
    for name in ("tiny", "small"):
        assert sum(p.numel() for p in Transformer(ModelConfig.from_preset(name, 8192)).parameters()) == rows[name]["params"]
    # non-embedding: everything but the vocab x dim table
    assert rows["small"]["params"] - rows["small"]["non_embedding_params"] == 8192 * 256


def test_sizes_table_and_custom_row():
    res = smedjan("sizes", "--vocab-size", "8192", "--dim", "1024", "--layers", "16", "--heads", "16",
                  "--ffn-mult", "4", "--kv-heads", "4")
    assert res.code == 0, res
    assert "7,212,288" in res.out and "45,101,568" in res.out
    custom = ModelConfig.custom(8192, dim=1024, n_layers=16, n_heads=16, ffn_mult=4, n_kv_heads=4)
    assert f"{custom.n_params():,}" in res.out
    assert_user_error(smedjan("sizes", "--dim", "64"), "--dim, --layers and --heads")


def test_initial_loss_is_near_ln_vocab():
    """GPT-2 init keeps the initial logits small: the first loss is about ln(vocab), a
    uniform predictor's. With the tied head a logit is a dot product of the normalized
    hidden state (RMS 1) with a N(0, 0.02) row, so its std is 0.02 sqrt(dim) and the loss
    sits about (0.02^2 dim) / 2 nats above ln(vocab): 0.1 at medium's width 512."""
    import math

    import torch

    for name in ("tiny", "small", "medium"):
        torch.manual_seed(0)
        model = Transformer(ModelConfig.from_preset(name, 8192, max_seq_len=32))
        x = torch.randint(0, 8192, (2, 32))
        with torch.no_grad():
            loss = model(x, torch.randint(0, 8192, (2, 32))).item()
        cfg = model.cfg
        assert abs(loss - math.log(8192) - 0.02 ** 2 * cfg.dim / 2) < 0.1, (name, loss)


def test_bench_tool_reports_both_numbers():
    res = smedjan("bench", "--size", "tiny", "--steps", "1", "--rounds", "1", "--json")
    assert res.code == 0, res
    row = json.loads(res.out)["rows"][0]
    assert row["size"] == "tiny" and row["params"] == ModelConfig.from_preset("tiny", 8192).n_params()
    assert row["forward_tok_s"] > 0 and row["train_tok_s"] > 0
    from smedjan_tools.train.bench import format_table

    table = format_table([row], cuda=False)
    assert "| tiny · 2.1M |" in table and "Train (fwd+bwd+step)" in table and f"{row['train_tok_s']:,.0f}" in table
    assert_user_error(smedjan("bench", "--size", "huge"), "--size 'huge'")


def test_bench_script_compares_with_the_plain_loop():
    import subprocess

    proc = subprocess.run([sys.executable, str(REPO / "bench" / "train.py"), "--size", "tiny", "--steps", "1",
                           "--rounds", "1", "--json"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = {r["loop"]: r for r in json.loads(proc.stdout)}
    import importlib.util

    has_hf = importlib.util.find_spec("transformers") is not None
    assert set(rows) == {"plain", "smedjan"} | ({"hf"} if has_hf else set())
    if has_hf:  # the transformers peer is timed in the same rounds and the ratio is recorded
        assert rows["smedjan"]["train_vs_hf"] > 0 and rows["hf"]["train_tok_s"] > 0
    assert rows["smedjan"]["train_ratio"] == pytest.approx(rows["smedjan"]["train_tok_s"] / rows["plain"]["train_tok_s"])


@pytest.mark.parametrize("name", sorted(__import__("smedjan_tools.train.bench", fromlist=["VARIANTS"]).VARIANTS))
def test_every_bench_variant_is_a_valid_distinct_model(name):
    import torch

    from smedjan_tools.train.bench import VARIANTS

    base = ModelConfig.from_preset("tiny", 512, max_seq_len=32)
    cfg = base.replace(**VARIANTS[name](base, 32))
    assert cfg != base
    torch.manual_seed(0)
    loss = Transformer(cfg)(torch.randint(0, 512, (1, 32)), torch.randint(0, 512, (1, 32)))
    assert torch.isfinite(loss)


def test_bench_variant_row_and_unknown_variant():
    res = smedjan("bench", "--size", "tiny", "--variant", "ssm", "--steps", "1", "--rounds", "1", "--batch-size", "1",
                  "--seq-len", "16", "--json")
    assert res.code == 0, res
    rows = json.loads(res.out)["rows"]
    assert [r["variant"] for r in rows] == [None, "ssm"] and rows[1]["params"] != rows[0]["params"]
    assert rows[1]["train_tok_s"] > 0 and rows[1]["decode_tok_s"] > 0
    assert_user_error(smedjan("bench", "--variant", "nope"), "--variant 'nope'")
