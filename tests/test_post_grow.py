"""`smedjan grow`: the grown model's logits equal the source's at step 0 (depth, width, both,
GQA regrouping, small -> medium), `smedjan train --init` continues training it, and growths
that cannot be exact are refused with one line."""

from __future__ import annotations

import json
import math

import pytest
import torch

from helpers import assert_user_error, smedjan
from test_post_sft import ENV1
from train_helpers import losses, token_files

from smedjan.errors import UserError
from smedjan.formats.checkpoint import load_checkpoint
from smedjan.model import ModelConfig, Transformer, load_model
from smedjan.post.grow import grow_state, grown_config


def logits_pair(src_cfg, state, dst_cfg, dtype=torch.float64, seed=0, T=40):
    """(source logits, grown logits) of the same random ids, with weights and compute in `dtype`
    (the growth itself is computed in float64 and stored in the state's dtype)."""
    state = {k: v.to(dtype) for k, v in state.items()}
    src = Transformer(src_cfg).to(dtype)
    src.load_state_dict(state)
    dst = Transformer(dst_cfg).to(dtype)
    dst.load_state_dict(grow_state(state, src_cfg, dst_cfg, seed))
    idx = torch.randint(0, src_cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return src(idx), dst(idx)


@pytest.mark.parametrize("kw", [dict(layers=5), dict(dim=128, heads=8), dict(dim=96, heads=6, ffn_mult=4),
                                dict(dim=128, heads=8, layers=4), dict(dim=128, heads=8, kv_heads=2)],
                         ids=["depth", "width", "width-ffn4", "both", "gqa-regroup"])
def test_grown_logits_equal_the_source(trained_checkpoint, kw):
    ck = load_checkpoint(trained_checkpoint)
    dst = grown_config(ck.config, "custom", **kw)
    a, b = logits_pair(ck.config, ck.model_state(), dst)
    assert (a - b).abs().max() <= 1e-10 * a.abs().max(), (a - b).abs().max()


def test_small_to_medium_preset(tmp_path):
    """A small-preset model (norm gains perturbed so none is 1) grows into medium exactly."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("small", vocab_size=2048, max_seq_len=64)
    state = Transformer(cfg).state_dict()
    state = {k: v * (1 + 0.3 * torch.randn(v.shape)) if v.ndim == 1 else v for k, v in state.items()}
    dst = grown_config(cfg, "medium")
    a = dst.attention
    assert (dst.dim, dst.n_layers, a.n_heads, a.n_kv_heads, a.head_dim) == (512, 12, 8, 8, 64)
    assert dst.norm_eps == pytest.approx(cfg.norm_eps / 2)
    a, b = logits_pair(cfg, state, dst, dtype=torch.float32, T=24)
    assert (a - b).abs().max() <= 1e-4 * a.abs().max()


def test_new_capacity_gets_gradients(trained_checkpoint):
    """Zero writers must not freeze the new dimensions: one backward reaches every new weight."""
    ck = load_checkpoint(trained_checkpoint)
    dst = grown_config(ck.config, "custom", dim=128, heads=8, layers=3)
    model = Transformer(dst)
    model.load_state_dict(grow_state(ck.model_state(), ck.config, dst))
    idx = torch.randint(0, 2048, (2, 33))
    model(idx[:, :-1], idx[:, 1:]).backward()
    emb = model.tok_embeddings.weight.grad
    assert emb[:, 64:].abs().sum() > 0  # new residual dims get gradient
    assert model.layers[1].mixer.wo.weight.grad.abs().sum() > 0  # the identity block's writers
    assert model.layers[1].ffn.w2.weight.grad.abs().sum() > 0


def test_grow_cli_and_train_init_continues(trained_checkpoint, tokenizer, tokenizer_path, tmp_path_factory, tmp_path):
    res = smedjan("grow", "-c", trained_checkpoint, "--size", "custom", "--dim", "128", "--heads", "8",
                  "--layers", "3", "-o", tmp_path / "grown.bin", "--json")
    assert res.code == 0, res
    s = json.loads(res.out)
    assert s["dim"] == "64 -> 128" and s["layers"] == "2 -> 3" and s["kv_heads"] == "2 -> 4"
    (m0, _, _), (m1, _, ck) = load_model(trained_checkpoint), load_model(tmp_path / "grown.bin")
    assert ck.fingerprint == tokenizer.fingerprint and ck.meta["tool"] == "grow"
    idx = torch.randint(0, 2048, (2, 50))
    with torch.no_grad():
        a, b = m0(idx), m1(idx)
    assert (a - b).abs().max() <= 1e-4 * a.abs().max()  # float32 on disk
    train_bin, _ = token_files(tmp_path_factory, tokenizer_path)
    run = tmp_path / "run"
    res = smedjan("train", "--dataset", train_bin, "--tokenizer", tokenizer_path, "--init", tmp_path / "grown.bin",
                  "--batch-size", "8", "--seq-len", "64", "--steps", "30", "--warmup", "3", "--lr", "1e-3",
                  "--checkpoint-dir", run, "--json", env=ENV1)
    assert res.code == 0, res
    ls = losses(run)
    first, last = sum(ls[s] for s in range(1, 6)) / 5, sum(ls[s] for s in range(26, 31)) / 5
    # it starts where the trained source is (far below a new model's ln(vocab)) and keeps improving
    assert ls[1] < math.log(2048) - 1.5 and last < first - 0.1, ls


@pytest.mark.parametrize("kw,needles", [
    (dict(layers=1), ["smaller model", "layers 2 -> 1"]),
    (dict(size="small"), ["head dim 16 -> 64", "--heads 16"]),
    (dict(dim=128, heads=8, kv_heads=8), ["per key/value head 2 -> 1"]),
    (dict(), ["nothing to grow"]),
    (dict(max_seq_len=128), ["context (max_seq_len) 256 -> 128"]),
    (dict(dim=100, heads=8), ["not divisible"]),
    (dict(size="huge"), ["unknown size 'huge'"]),
    (dict(size="medium", dim=64), ["only apply to --size custom"]),
])
def test_grow_refusals(trained_checkpoint, tmp_path, kw, needles):
    from smedjan.post.grow import grow_checkpoint

    with pytest.raises(UserError) as e:
        grow_checkpoint(str(trained_checkpoint), str(tmp_path / "g.bin"), **{"size": "custom", **kw})
    assert all(n in str(e.value) for n in needles), e.value
    assert list(tmp_path.iterdir()) == []


def test_grow_refusal_on_the_command_line(trained_checkpoint, tmp_path):
    assert_user_error(smedjan("grow", "-c", trained_checkpoint, "-o", tmp_path / "g.bin", "--layers", "1"),
                      "smaller model", "layers 2 -> 1")
    assert list(tmp_path.iterdir()) == []


def test_grow_garbage_checkpoint(tmp_path):
    (tmp_path / "junk.bin").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    assert_user_error(smedjan("grow", "-c", tmp_path / "junk.bin", "-o", tmp_path / "g.bin", "--layers", "3"),
                      "junk.bin")
    assert not (tmp_path / "g.bin").exists()


def test_grow_state_checks_itself():
    cfg = ModelConfig.make(vocab_size=300, dim=32, n_layers=2, n_heads=2)
    with pytest.raises(UserError, match="layers 2 -> 1"):
        grow_state(Transformer(cfg).state_dict(), cfg, grown_config(cfg, "custom", layers=1))
    wide_ffn = ModelConfig.make(vocab_size=300, dim=64, n_layers=1, n_heads=4, ffn_hidden=768)
    with pytest.raises(UserError, match="FFN hidden size 768 -> 512"):
        grow_state(Transformer(wide_ffn).state_dict(), wide_ffn, grown_config(wide_ffn, "custom", dim=128, heads=8))
