"""Fuzzing smedjan's own binary files as every tool reads them: tokenizer.bin, train.bin /
val.bin, model checkpoints and training states (the safetensors header JSON, its tensor
table and metadata, and the payload). Each mutated file gives the reader's correct result
or one line of refusal; never a traceback or a hang (see fuzzing.py for the mutations,
the bounds and SMEDJAN_FUZZ_EXAMPLES)."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzzing import byte_mutation, cli_survives, dumps, fuzz_settings, json_mutation, put, survives
from helpers import smedjan
from smedjan.formats import constants as C

pytestmark = pytest.mark.slow


# ------------------------------------------------------------------------------ tokenizer.bin
def _smedjan_header(data: bytes) -> tuple[dict, int]:
    n = struct.unpack("<I", data[12:16])[0]
    return json.loads(data[16:16 + n]), 16 + n


def _with_smedjan_header(data: bytes, meta, pad_to: int | None = None) -> bytes | None:
    _, end = _smedjan_header(data)
    blob = dumps(meta).encode()
    head = data[:12] + struct.pack("<I", len(blob)) + blob
    if pad_to is not None:
        if len(head) > pad_to:
            return None
        head += b"\0" * (pad_to - len(head))
        return head + data[pad_to:]
    return head + data[end:]


def _use_tokenizer(path, base=None):
    from smedjan.tokenizer import Tokenizer

    tok = Tokenizer.load(path)
    ids = tok.encode("Hello, world: a fuzzed tokenizer that loads must still work.")
    assert tok.decode(ids) == "Hello, world: a fuzzed tokenizer that loads must still work."
    return tok


@pytest.fixture(scope="module")
def tok_bytes(tokenizer) -> bytes:
    return tokenizer.to_bytes()


# --------------------------------------------------------------------------- train.bin / val.bin
@pytest.fixture(scope="module")
def tokens_bytes(tmp_path_factory, tokenizer) -> bytes:
    from smedjan.data.prepare import prepare

    folder = tmp_path_factory.mktemp("fuzz_tokens")
    (folder / "c.txt").write_text("".join(f"Document {i}. Some words to encode here.\n\n" for i in range(300)))
    prepare([folder / "c.txt"], tokenizer, folder / "train.bin", txt_split="blank", workers=1)
    return (folder / "train.bin").read_bytes()


def _use_tokens(path, base=None):
    from smedjan.data.loader import Loader, iter_sequential
    from smedjan.formats.tokens import TokenFile

    tf = TokenFile.open(path)
    tf.verify()
    assert len(tf.doc_starts()) == tf.n_docs
    for kw in ({}, {"bos_aligned": True}, {"stream": True}):
        loader = Loader(tf, batch_size=2, seq_len=8, **kw)
        for _ in range(3):
            x, y = loader.next_batch()
            assert int(x.max()) < tf.vocab_size
        loader.close()
    for x, y in iter_sequential(tf, batch_size=2, seq_len=8, max_batches=3):
        assert int(y.max()) < tf.vocab_size
    return tf


# ---------------------------------------------------------------------- checkpoints and states
def _st_header(data: bytes) -> tuple[dict, int]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), 8 + n


def _with_st_header(data: bytes, header) -> bytes:
    _, end = _st_header(data)
    blob = dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + data[end:]


@pytest.fixture(scope="module")
def model_bytes(tmp_path_factory, tokenizer) -> bytes:
    from smedjan.formats.checkpoint import save_checkpoint
    from smedjan.model import ModelConfig, Transformer

    cfg = ModelConfig.make(vocab_size=tokenizer.vocab_size, dim=16, n_layers=1, n_heads=2, max_seq_len=32)
    path = tmp_path_factory.mktemp("fuzz_ck") / "final.bin"
    save_checkpoint(path, Transformer(cfg).state_dict(), kind=C.KIND_MODEL, config=cfg, tokenizer=tokenizer,
                    meta={"step": 3, "tool": "train"})
    return path.read_bytes()


def _use_model(path, base=None):
    import torch

    from smedjan.export.load import load_source
    from smedjan.model.load import load_model

    model, tok, ck = load_model(path)
    with torch.no_grad():
        model(torch.tensor([[tok.bos_id, 5, 6]]))
    load_source(path)
    return model


def _mutate_header(header: dict, data, config: bool) -> dict:
    """A header edit: of the model config (item 5's ground) or of anything else."""
    header = json.loads(json.dumps(header))
    md = header["__metadata__"]
    if config:
        md["model_config"] = dumps(data.draw(json_mutation(json.loads(md["model_config"]))))
        return header
    rest = {k: v for k, v in header.items() if k != "__metadata__"}
    rest["__metadata__"] = {k: v for k, v in md.items() if k != "model_config"}
    out = data.draw(json_mutation(rest))
    if isinstance(out, dict) and isinstance(out.get("__metadata__"), dict):
        out["__metadata__"]["model_config"] = md["model_config"]
    return out


# The training state of the Trainer tests' micro model: resumed into a fresh Trainer.
@pytest.fixture(scope="module")
def state_bytes(tmp_path_factory) -> bytes:
    from test_train_loop import make

    folder = tmp_path_factory.mktemp("fuzz_state")
    make(folder, steps=2, checkpoint_every=2).fit()
    return (folder / "state_2.bin").read_bytes()


def _resume(path, base):
    from test_train_loop import make

    tr = make(base / "fuzz_resume", steps=8)
    tr.resume(path)
    tr.train_step()
    return tr


# ------------------------------------------------------------------------ every format, two ways
# reader -> (fixture with a good file's bytes, framing, what a tool does with the file)
FORMATS = {
    "tokenizer.bin": ("tok_bytes", "smedjan", _use_tokenizer),
    "train.bin": ("tokens_bytes", "smedjan", _use_tokens),
    "checkpoint": ("model_bytes", "safetensors", _use_model),
    "train state": ("state_bytes", "safetensors", _resume),
}


def _framing(kind: str, good: bytes) -> tuple[int, tuple]:
    """(header end, little-endian length fields) of a smedjan binfile or a safetensors file."""
    if kind == "smedjan":
        return _smedjan_header(good)[1], ((12, 4),)
    return _st_header(good)[1], ((0, 8),)


@pytest.mark.parametrize("reader", list(FORMATS))
@fuzz_settings()
@given(data=st.data())
def test_fuzz_bytes(reader, request, tmp_path_factory, data):
    """Truncation, bit flips in header and payload, extreme length fields."""
    fixture, kind, use = FORMATS[reader]
    good = request.getfixturevalue(fixture)
    end, lengths = _framing(kind, good)
    base = tmp_path_factory.getbasetemp()
    path = put(base / f"fuzz_{fixture}.bin", data.draw(byte_mutation(good, end, lengths)))
    survives(reader, use, path, base, names=path)


@pytest.mark.parametrize("reader", list(FORMATS))
@fuzz_settings()
@given(data=st.data())
def test_fuzz_header_fields(reader, request, tmp_path_factory, data):
    """JSON header fields deleted, mistyped or extreme (framing kept valid); for safetensors
    files the tensor table and the metadata, the model config aside (item 5, below)."""
    fixture, kind, use = FORMATS[reader]
    good = request.getfixturevalue(fixture)
    if kind == "smedjan":
        meta, _ = _smedjan_header(good)
        bad = _with_smedjan_header(good, data.draw(json_mutation(meta)), pad_to=meta.get("data_offset"))
        if bad is None:  # the mutated header no longer fits its reserved region: not a file prepare writes
            return
    else:
        bad = _with_st_header(good, _mutate_header(_st_header(good)[0], data, config=False))
    base = tmp_path_factory.getbasetemp()
    path = put(base / f"fuzz_{fixture}_h.bin", bad)
    survives(reader, use, path, base, names=path)


# ------------------------------------------------------------------------------ through the CLI
@fuzz_settings(n=4, shrink=False)
@given(st.data())
def test_fuzz_a_sample_through_the_tools(tok_bytes, tokens_bytes, model_bytes, tokenizer_path, tmp_path_factory, data):
    base = tmp_path_factory.getbasetemp() / "fuzz_cli"
    base.mkdir(exist_ok=True)
    out = base / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    tok = base / "tokenizer.bin"
    put(tok, data.draw(byte_mutation(tok_bytes, _smedjan_header(tok_bytes)[1], ((12, 4),))))
    cli_survives("tokenizer.bin", smedjan("encode", "-t", tok, "fuzzed text"))
    tokens = base / "train.bin"
    put(tokens, data.draw(byte_mutation(tokens_bytes, _smedjan_header(tokens_bytes)[1], ((12, 4),))))
    cli_survives("train.bin", smedjan("data-info", tokens, "--verify"))
    ck = base / "final.bin"
    put(ck, data.draw(byte_mutation(model_bytes, _st_header(model_bytes)[1], ((0, 8),))))
    cli_survives("checkpoint", smedjan("export-gguf", "-c", ck, "-o", out / "m.gguf", "--quant", "q8_0"), out)


# ------------------------------------------------------------------- model configs (item 5)
@pytest.mark.parametrize("reader", ["checkpoint", "train state"])
@fuzz_settings()
@given(data=st.data())
def test_fuzz_model_config(reader, request, tmp_path_factory, data):
    fixture, _, use = FORMATS[reader]
    good = request.getfixturevalue(fixture)
    base = tmp_path_factory.getbasetemp()
    path = put(base / f"fuzz_{fixture}_c.bin", _with_st_header(good, _mutate_header(_st_header(good)[0], data, True)))
    survives(f"{reader} model config", use, path, base, names=path)
