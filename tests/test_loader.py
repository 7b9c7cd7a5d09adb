"""The training loader: it yields what the file holds, resumes exactly, and shards like one process."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch

from smedjan.data.loader import Loader, iter_sequential, n_sequential_batches
from smedjan.errors import UserError
from smedjan.formats import constants as C
from smedjan.formats.tokens import TokenFile, TokenWriter, check_tokenizer_match

BOS, VOCAB = 999, 1000
MODES = [dict(), dict(bos_aligned=True), dict(stream=True)]
MODE_IDS = ["random", "bos", "stream"]


def make_file(path, n_docs=60, seed=0, max_len=200):
    rng = np.random.default_rng(seed)
    with TokenWriter(path, vocab_size=VOCAB, tokenizer_fingerprint="0123456789abcdef", bos_id=BOS) as w:
        for _ in range(n_docs):
            w.write(np.concatenate([[BOS], rng.integers(0, BOS, size=rng.integers(1, max_len))]))
    return TokenFile.open(path)


@pytest.fixture(scope="module")
def tf(tmp_path_factory) -> TokenFile:
    return make_file(tmp_path_factory.mktemp("loader") / "train.bin")


def as_np(t: torch.Tensor) -> np.ndarray:
    return t.numpy().astype(np.int64)


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_batches_are_windows_of_the_file(tf, mode):
    B, T = 4, 16
    loader = Loader(tf, batch_size=B, seq_len=T, seed=3, **mode)
    tokens = np.asarray(tf.tokens, dtype=np.int64)
    for _ in range(5):
        x, y = loader.next_batch()
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (B, T)
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row_x, row_y in zip(as_np(x), as_np(y)):
            # every row is a real window of the file: find it and compare all T+1 tokens
            window = np.concatenate([row_x, row_y[-1:]])
            hits = [p for p in np.flatnonzero(tokens[: len(tokens) - T] == window[0])
                    if np.array_equal(tokens[p:p + T + 1], window)]
            assert hits


def test_random_windows_follow_the_documented_rng(tf):
    B, T, seed = 3, 20, 11
    loader = Loader(tf, batch_size=B, seq_len=T, seed=seed)
    for k in range(3):
        starts = np.random.default_rng([seed, k]).integers(0, tf.n_tokens - T, size=B)
        want = np.stack([tf.tokens[p:p + T + 1] for p in starts]).astype(np.int64)
        x, y = loader.next_batch()
        assert np.array_equal(as_np(x), want[:, :-1]) and np.array_equal(as_np(y), want[:, 1:])


def test_bos_aligned_windows_start_with_bos(tf):
    loader = Loader(tf, batch_size=8, seq_len=32, seed=0, bos_aligned=True)
    for _ in range(10):
        x, _ = loader.next_batch()
        assert (x[:, 0] == BOS).all()


def test_stream_reads_the_file_in_order_without_memmap(tmp_path):
    tf = make_file(tmp_path / "s.bin", n_docs=10)
    B, T = 3, 16
    loader = Loader(tf, batch_size=B, seq_len=T, stream=True)
    nw = (tf.n_tokens - 1) // T
    steps = -(-nw // B) + 2  # past the end: wraps into epoch 1
    xs = torch.cat([loader.next_batch()[0] for _ in range(steps)])
    tokens = np.asarray(np.memmap(tf.path, dtype=tf.dtype, mode="r", offset=tf.data_offset), dtype=np.int64)
    windows = tokens[: nw * T].reshape(nw, T)
    assert np.array_equal(as_np(xs[:nw]), windows)
    assert np.array_equal(as_np(xs[nw:]), windows[: len(xs) - nw])  # wrapped to the start
    assert loader.state_dict()["epoch"] == 1
    assert tf._tokens is None  # the loader never mapped the file


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_resume_from_state_continues_the_same_stream(tf, mode):
    ref = Loader(tf, batch_size=4, seq_len=16, seed=5, **mode)
    batches = [ref.next_batch() for _ in range(6)]
    first = Loader(tf, batch_size=4, seq_len=16, seed=5, **mode)
    for _ in range(3):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))  # it survives JSON (checkpoint metadata)
    resumed = Loader(tf.path, batch_size=4, seq_len=16, seed=5, **mode)
    resumed.load_state_dict(state)
    for want in batches[3:]:
        got = resumed.next_batch()
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_rank_sharding_equals_one_process(tf, mode):
    B, T, world = 3, 8, 2
    single = Loader(tf, batch_size=B * world, seq_len=T, seed=2, **mode)
    ranks = [Loader(tf, batch_size=B, seq_len=T, seed=2, rank=r, world_size=world, **mode) for r in range(world)]
    for _ in range(4):
        x, y = single.next_batch()
        parts = [r.next_batch() for r in ranks]
        assert torch.equal(x, torch.cat([p[0] for p in parts])) and torch.equal(y, torch.cat([p[1] for p in parts]))
    # a state saved on 2 ranks resumes on 1 process with the same global batch
    one = Loader(tf, batch_size=B * world, seq_len=T, seed=2, **mode)
    one.load_state_dict(ranks[0].state_dict())
    x, _ = one.next_batch()
    assert torch.equal(x, single.next_batch()[0])


def test_iter_sequential_covers_every_window_once(tf):
    T = 16
    nw = (tf.n_tokens - 1) // T
    tokens = np.asarray(tf.tokens, dtype=np.int64)
    xs, ys = zip(*iter_sequential(tf, batch_size=5, seq_len=T))
    assert np.array_equal(as_np(torch.cat(xs)), tokens[: nw * T].reshape(nw, T))
    assert np.array_equal(as_np(torch.cat(ys)), tokens[1: nw * T + 1].reshape(nw, T))
    assert len(xs) == n_sequential_batches(tf, 5, T) == -(-nw // 5)
    assert len(list(iter_sequential(tf, batch_size=5, seq_len=T, max_batches=2))) == 2
    # sharded: same number of batches on every rank (collectives stay in step), union = all
    per_rank = [list(iter_sequential(tf, batch_size=3, seq_len=T, rank=r, world_size=2)) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == n_sequential_batches(tf, 3, T, world_size=2)
    merged = torch.cat([torch.cat([a[0], b[0]]) for a, b in zip(*per_rank)])
    assert np.array_equal(as_np(merged), tokens[: nw * T].reshape(nw, T))
    dropped = list(iter_sequential(tf, batch_size=5, seq_len=T, drop_last=True))
    assert len(dropped) == nw // 5 and all(x.shape == (5, T) for x, _ in dropped)


def test_loader_refuses_bad_settings_and_foreign_state(tf, tmp_path):
    with pytest.raises(UserError, match=f"{tf.path}.*fewer than one window"):
        Loader(tf, batch_size=1, seq_len=tf.n_tokens)
    Loader(tf, batch_size=1, seq_len=tf.n_tokens - 1)  # exactly one window fits
    with pytest.raises(UserError, match="rank"):
        Loader(tf, batch_size=1, seq_len=8, rank=2, world_size=2)
    with pytest.raises(UserError, match="cannot be combined"):
        Loader(tf, batch_size=1, seq_len=8, bos_aligned=True, stream=True)
    state = Loader(tf, batch_size=2, seq_len=8, seed=1).state_dict()
    for other, needle in [(dict(seed=2), "data seed"), (dict(stream=True, seed=1), "sampling mode"),
                          (dict(seed=1, batch_size=4), "global batch"), (dict(seed=1, seq_len=16), "seq_len")]:
        kw = dict(batch_size=2, seq_len=8) | other
        with pytest.raises(UserError, match=needle):
            Loader(tf, **kw).load_state_dict(state)
    other_file = make_file(tmp_path / "other.bin", seed=9)
    with pytest.raises(UserError, match="another dataset"):
        Loader(other_file, batch_size=2, seq_len=8, seed=1).load_state_dict(state)
    with pytest.raises(UserError, match="not a smedjan loader state"):
        Loader(tf, batch_size=2, seq_len=8).load_state_dict({"step": 3})


def test_short_dataset_is_refused_by_iter_sequential_too(tmp_path):
    tf = make_file(tmp_path / "tiny.bin", n_docs=1, max_len=3)
    with pytest.raises(UserError, match="tiny.bin"):
        list(iter_sequential(tf, batch_size=1, seq_len=64))
    with pytest.raises(UserError, match="tiny.bin"):
        Loader(tf.path, batch_size=1, seq_len=64, stream=True)


@pytest.mark.parametrize("how,needle", [("magic", "wrong magic"), ("version", "version"), ("truncated", "truncated")])
def test_loader_refuses_corrupt_files(tf, tmp_path, how, needle):
    data = tf.path.read_bytes()
    bad = {"magic": b"XXXXXXXX" + data[8:],
           "version": data[:8] + struct.pack("<I", C.TOKENS_VERSION + 1) + data[12:],
           "truncated": data[:-10]}[how]
    path = tmp_path / "bad.bin"
    path.write_bytes(bad)
    with pytest.raises(UserError, match=needle):
        Loader(path, batch_size=2, seq_len=8)


def test_out_of_range_ids_are_caught_per_batch(tmp_path):
    # A file whose header claims a smaller vocabulary than its ids use (hand-made corruption).
    path = tmp_path / "t.bin"
    with TokenWriter(path, vocab_size=VOCAB, tokenizer_fingerprint="f", bos_id=5) as w:
        w.write(np.array([5] + [900] * 100))
    data = bytearray(path.read_bytes())
    n = struct.unpack("<I", data[12:16])[0]
    meta = json.loads(data[16:16 + n])
    meta["vocab_size"] = 500
    blob = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
    data[12:16 + n] = struct.pack("<I", len(blob)) + blob + b"\0" * (n - len(blob))
    path.write_bytes(bytes(data))
    for mode in MODES:
        with pytest.raises(UserError, match="out of range"):
            Loader(path, batch_size=2, seq_len=8, **mode).next_batch()


def test_check_tokenizer_match(tokenizer, tokenizer_path, tmp_path):
    path = tmp_path / "t.bin"
    with TokenWriter(path, vocab_size=tokenizer.vocab_size, tokenizer_fingerprint=tokenizer.fingerprint,
                     bos_id=tokenizer.bos_id) as w:
        w.write(np.array([tokenizer.bos_id] + tokenizer.encode("hello")))
    check_tokenizer_match(TokenFile.open(path), tokenizer, tokenizer_path)  # same tokenizer: fine
    fake = make_file(tmp_path / "fake.bin")
    with pytest.raises(UserError) as e:
        check_tokenizer_match(fake, tokenizer, tokenizer_path)
    assert str(fake.path) in str(e.value) and str(tokenizer_path) in str(e.value)
