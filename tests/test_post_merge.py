"""`smedjan merge`: the output is the (weighted) average of its inputs, carries their config
and tokenizer, and inputs of another architecture or tokenizer are refused by field."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import assert_user_error, smedjan
from test_post_sft import other_tokenizer_checkpoint

from smedjan.errors import UserError
from smedjan.formats import constants as C
from smedjan.formats.checkpoint import load_checkpoint, save_checkpoint
from smedjan.post.merge import merge_checkpoints


@pytest.fixture(scope="module")
def variants(tmp_path_factory, trained_checkpoint):
    """The micro checkpoint and two copies with noise added to every weight."""
    folder = tmp_path_factory.mktemp("merge")
    ck = load_checkpoint(trained_checkpoint)
    gen = torch.Generator().manual_seed(0)
    paths = [trained_checkpoint]
    for i in range(2):
        state = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in ck.model_state().items()}
        paths.append(folder / f"v{i}.bin")
        save_checkpoint(paths[-1], state, kind=C.KIND_MODEL, config=ck.config, tokenizer=ck.tokenizer)
    return paths


def states(paths):
    return [load_checkpoint(p).model_state() for p in paths]


def test_equal_weights_by_default(variants, tmp_path, tokenizer):
    res = smedjan("merge", *variants, "--output", tmp_path / "m.bin", "--json")
    assert res.code == 0, res
    assert json.loads(res.out)["weights"] == [pytest.approx(1 / 3)] * 3
    merged = load_checkpoint(tmp_path / "m.bin", kinds=(C.KIND_MODEL,))
    inputs = states(variants)
    for k, v in merged.model_state().items():
        want = (inputs[0][k].double() + inputs[1][k].double() + inputs[2][k].double()) / 3
        torch.testing.assert_close(v, want.float(), rtol=0, atol=1e-7)
    assert merged.config == load_checkpoint(variants[0]).config
    assert merged.tokenizer.fingerprint == tokenizer.fingerprint
    assert merged.json("merged_from") == [str(p) for p in variants]


def test_weights_are_normalised(variants, tmp_path):
    summary = merge_checkpoints([str(variants[0]), str(variants[1])], str(tmp_path / "m.bin"), [3.0, 1.0])
    assert summary["weights"] == [0.75, 0.25]
    a, b = states(variants[:2])
    m = load_checkpoint(tmp_path / "m.bin").model_state()
    for k in a:
        torch.testing.assert_close(m[k], (0.75 * a[k].double() + 0.25 * b[k].double()).float(), rtol=0, atol=1e-7)
    # a weight of 0 leaves that checkpoint out entirely
    merge_checkpoints([str(variants[0]), str(variants[1])], str(tmp_path / "z.bin"), [1.0, 0.0])
    z = load_checkpoint(tmp_path / "z.bin").model_state()
    assert all(torch.equal(z[k], a[k]) for k in a)


def test_merging_a_model_with_itself_keeps_its_logits(variants, tmp_path):
    from smedjan.model import load_model

    merge_checkpoints([str(variants[1])] * 2, str(tmp_path / "same.bin"))
    idx = torch.randint(0, 2048, (1, 20))
    with torch.no_grad():
        assert torch.equal(load_model(variants[1])[0](idx), load_model(tmp_path / "same.bin")[0](idx))


def test_mismatched_inputs_are_refused(variants, tmp_path, tokenizer):
    ck = load_checkpoint(variants[0])

    from smedjan.model import Transformer

    wide = ck.config.replace(ffn_hidden=512)
    save_checkpoint(tmp_path / "wide.bin", Transformer(wide).state_dict(), kind=C.KIND_MODEL, config=wide,
                    tokenizer=ck.tokenizer)
    cfg = ck.config
    other = other_tokenizer_checkpoint(tokenizer, tmp_path / "other.bin", dim=cfg.dim, n_layers=cfg.n_layers,
                                       n_heads=cfg.attention.n_heads, n_kv_heads=cfg.attention.n_kv_heads,
                                       max_seq_len=cfg.max_seq_len)
    out = tmp_path / "out" / "m.bin"
    out.parent.mkdir()
    assert_user_error(smedjan("merge", variants[0], tmp_path / "wide.bin", "-o", out),
                      "wide.bin", "model config differs", "ffn.hidden 256 vs 512")
    assert_user_error(smedjan("merge", variants[0], other, "-o", out), "other.bin", "tokenizer")
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint at all")
    assert_user_error(smedjan("merge", variants[0], tmp_path / "junk.bin", "-o", out), "junk.bin")
    assert_user_error(smedjan("merge", variants[0], variants[1], "-o", out, "-w", "1"), "--weights has 1 values")
    assert list(out.parent.iterdir()) == []


@pytest.mark.parametrize("weights,n,needle", [([1.0, -1.0], 2, "must be a finite number >= 0"),
                                              ([0.0, 0.0], 2, "sum to 0"), (None, 1, "at least two"),
                                              ([float("nan"), 1.0], 2, "finite")])
def test_bad_weights(variants, tmp_path, weights, n, needle):
    with pytest.raises(UserError, match=needle):
        merge_checkpoints([str(p) for p in variants[:n]], str(tmp_path / "m.bin"), weights)
    assert not (tmp_path / "m.bin").exists()
