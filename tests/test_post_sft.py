"""`smedjan sft` end to end on the micro checkpoint: assistant-token loss drops on its data,
the output is a self-contained model checkpoint, --resume repeats the run exactly, and bad
input gets one line, exit 2 and no file."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import DATA, assert_user_error, smedjan

from smedjan.formats import constants as C
from smedjan.formats.checkpoint import load_checkpoint

ENV1 = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
SFT_DATA = DATA / "sft" / "instruction-data.json.zst"
# 24 steps of 8 short conversations at a high LR: enough to move a 250k-parameter model.
QUICK = ["--max-len", "96", "--batch-size", "8", "--lr", "3e-3", "--warmup", "2"]


def sft(*args):
    return smedjan("sft", *args, env=ENV1)


def no_chat_checkpoint(tokenizer, path):
    """A model checkpoint whose tokenizer has <|bos|> but no chat tokens."""
    from smedjan.formats.checkpoint import save_checkpoint
    from smedjan.model import ModelConfig, Transformer
    from smedjan.tokenizer import Tokenizer

    n = tokenizer.vocab_size - len(tokenizer.specials)
    plain = Tokenizer(tokenizer.tokens[:n] + [C.BOS.encode()], tokenizer.merges, {C.BOS: n})
    cfg = ModelConfig.make(vocab_size=plain.vocab_size, dim=32, n_layers=1, n_heads=2, max_seq_len=64)
    save_checkpoint(path, Transformer(cfg).state_dict(), kind=C.KIND_MODEL, config=cfg, tokenizer=plain)
    return path


def other_tokenizer_checkpoint(tokenizer, path, **cfg_kw):
    """A model checkpoint with a chat-capable tokenizer of another fingerprint (the GPT-2
    pre-tokenizer over the same vocabulary)."""
    from smedjan.formats.checkpoint import save_checkpoint
    from smedjan.model import ModelConfig, Transformer
    from smedjan.tokenizer import Tokenizer

    other = Tokenizer(tokenizer.tokens, tokenizer.merges, tokenizer.specials, pattern="gpt2")
    assert other.fingerprint != tokenizer.fingerprint and other.has_chat_tokens
    cfg = ModelConfig.make(vocab_size=other.vocab_size, **{"dim": 32, "n_layers": 1, "n_heads": 2, "max_seq_len": 64,
                                                      **cfg_kw})
    save_checkpoint(path, Transformer(cfg).state_dict(), kind=C.KIND_MODEL, config=cfg, tokenizer=other)
    return path


def train_examples(tok, path=SFT_DATA, max_len=96):
    from smedjan.post.formats import load_conversations
    from smedjan.post.sft import tokenize_conversations

    convs, report = load_conversations([path])
    return tokenize_conversations(tok, convs, max_len, "truncate", report)


def mean_assistant_loss(ckpt, examples) -> float:
    from smedjan.model import load_model
    from smedjan.post.sft import assistant_nll

    model, _, _ = load_model(ckpt)
    with torch.no_grad():
        acc = assistant_nll(model, examples, 32, torch.device("cpu"))
    return float(acc[0] / acc[1])


@pytest.fixture(scope="module")
def run(tmp_path_factory, trained_checkpoint):
    folder = tmp_path_factory.mktemp("sft")
    res = sft("-c", trained_checkpoint, "--data", SFT_DATA, "--output", folder / "sft.bin", "--steps", "24",
              "--val-fraction", "0.05", "--checkpoint-every", "12", "--keep", "0", *QUICK, "--json")
    assert res.code == 0, res
    return folder, json.loads(res.out)


def test_sft_lowers_assistant_loss(run, trained_checkpoint, tokenizer):
    folder, summary = run
    assert summary["reason"] == "done" and summary["steps"] == 24 and summary["batching"] == "padded"
    assert summary["formats"] == ["alpaca"] and summary["examples"] + summary["val_examples"] == 1100
    assert summary["val_loss"] < summary["val_loss_start"] - 0.5
    examples = train_examples(tokenizer)
    before, after = mean_assistant_loss(trained_checkpoint, examples), mean_assistant_loss(folder / "sft.bin", examples)
    assert after < before - 0.5, (before, after)
    ck = load_checkpoint(folder / "sft.bin", kinds=(C.KIND_MODEL,))
    assert ck.tokenizer.fingerprint == tokenizer.fingerprint and ck.meta["tool"] == "sft"
    assert ck.config == load_checkpoint(trained_checkpoint).config
    rec = [json.loads(line) for line in (folder / "sft-checkpoints" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rec if "loss" in r] == list(range(1, 25))
    assert sorted(p.name for p in (folder / "sft-checkpoints").glob("state_*.bin")) == ["state_12.bin", "state_24.bin"]


def test_sft_resume_repeats_the_run(run, trained_checkpoint, tmp_path):
    folder, _ = run
    res = sft("-c", trained_checkpoint, "--data", SFT_DATA, "--output", tmp_path / "resumed.bin", "--steps", "24",
              "--val-fraction", "0.05", "--checkpoint-every", "12", "--checkpoint-dir", tmp_path / "ck", *QUICK,
              "--resume", folder / "sft-checkpoints" / "state_12.bin", "--json")
    assert res.code == 0, res
    a, b = load_checkpoint(folder / "sft.bin").model_state(), load_checkpoint(tmp_path / "resumed.bin").model_state()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_example_batches_shard_shuffle_and_resume():
    from smedjan.errors import UserError
    from smedjan.post.batching import ShuffledBatches

    def make(batch, rank=0, world=1, n=10, seed=3):
        return ShuffledBatches(n, batch, seed, lambda idx: idx.tolist(), rank=rank, world_size=world,
                               identity={"examples": "abc"})

    one, r0, r1 = make(4), make(2, 0, 2), make(2, 1, 2)
    batches = [one.next_batch() for _ in range(10)]  # 40 positions: 4 epochs of 10 examples
    assert all(b == r0.next_batch() + r1.next_batch() for b in batches)  # two ranks = one with the global batch
    flat = sum(batches, [])
    assert all(sorted(flat[e * 10:(e + 1) * 10]) == list(range(10)) for e in range(4))  # each epoch once
    assert flat[:10] != flat[10:20] and one.epochs == 4.0  # reshuffled per epoch
    again = make(4)
    again.load_state_dict(make(4).state_dict() | {"batch": 6})
    assert [again.next_batch() for _ in range(4)] == batches[6:]
    with pytest.raises(UserError, match="other data"):
        make(4, n=11).load_state_dict(one.state_dict())


def write(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", ["no_chat_tokens", "no_assistant", "malformed", "missing_data", "no_folder",
                                  "too_long_all", "bad_flag"])
def test_sft_bad_input(case, trained_checkpoint, tokenizer, tmp_path):
    ckpt, out = trained_checkpoint, tmp_path / "out" / "sft.bin"
    out.parent.mkdir()
    good = write(tmp_path / "good.jsonl", json.dumps({"prompt": "q", "response": "a"}) + "\n")
    data, extra, needles = good, [], []
    if case == "no_chat_tokens":
        ckpt, needles = no_chat_checkpoint(tokenizer, tmp_path / "plain.bin"), ["plain.bin", "no chat tokens"]
    elif case == "no_assistant":
        data = write(tmp_path / "d.jsonl", json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
        needles = ["no usable SFT records", "1 no assistant turn (first:", "d.jsonl:1"]
    elif case == "malformed":
        data = write(tmp_path / "d.jsonl", json.dumps({"prompt": "q", "response": "a"}) + "\n{oops\n")
        needles = ["d.jsonl:2: malformed JSON line"]
    elif case == "missing_data":
        data, needles = tmp_path / "nope.jsonl", ["nope.jsonl", "does not exist"]
    elif case == "no_folder":
        out, needles = tmp_path / "missing" / "sft.bin", ["output folder", "does not exist"]
    elif case == "too_long_all":
        data = write(tmp_path / "d.jsonl", json.dumps({"prompt": "word " * 300, "response": "a"}) + "\n")
        extra, needles = ["--too-long", "skip"], ["no conversation fits the context of 256", "longer than the context"]
    elif case == "bad_flag":
        extra, needles = ["--too-long", "wrap"], ["--too-long 'wrap'"]
    res = sft("-c", ckpt, "--data", data, "--output", out, "--steps", "2", "--val-fraction", "0", *extra)
    assert_user_error(res, *needles)
    assert not out.parent.exists() or list(out.parent.iterdir()) == []  # no output, no checkpoint folder
