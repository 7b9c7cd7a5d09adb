"""Checkpoint files: round trip, safetensors compatibility, corrupt and foreign files."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from smedjan.errors import UserError
from smedjan.formats import constants as C
from smedjan.formats.checkpoint import load_checkpoint, read_metadata, save_checkpoint
from smedjan.model import ModelConfig, Transformer


@pytest.fixture
def saved(tmp_path, tokenizer):
    cfg = ModelConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size)
    model = Transformer(cfg)
    path = tmp_path / "final.bin"
    save_checkpoint(path, model.state_dict(), kind=C.KIND_MODEL, config=cfg, tokenizer=tokenizer,
                    meta={"step": 12, "note": "hello"})
    return path, model, cfg


def test_round_trip(saved, tokenizer):
    path, model, cfg = saved
    ck = load_checkpoint(path)
    assert ck.kind == C.KIND_MODEL
    assert ck.config == cfg
    assert ck.json("step") == 12 and ck.meta["note"] == "hello"
    assert ck.tokenizer.fingerprint == tokenizer.fingerprint == ck.fingerprint
    again = Transformer(ck.config)
    again.load_state_dict(ck.model_state())
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k])


def test_plain_safetensors_reads_it(saved):
    from safetensors import safe_open

    path, model, _ = saved
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["kind"] == "model"
        assert torch.equal(f.get_tensor("tok_embeddings.weight"), model.tok_embeddings.weight)


def test_file_mode_is_not_private(saved):
    path, _, _ = saved
    assert path.stat().st_mode & 0o044  # group/other readable under the usual umask


@pytest.mark.parametrize("how,needle", [
    ("truncated", "corrupt or truncated"),
    ("tiny", "truncated"),
    ("garbage", "not a safetensors"),
    ("wrong_version", "format version"),
    ("foreign", "without smedjan metadata"),
    ("wrong_kind", "expected"),
])
def test_bad_checkpoints(saved, tmp_path, how, needle):
    from safetensors.torch import save_file

    path, model, cfg = saved
    bad = tmp_path / "bad.bin"
    data = path.read_bytes()
    if how == "truncated":
        bad.write_bytes(data[: len(data) - 1000])
    elif how == "tiny":
        bad.write_bytes(data[:5])
    elif how == "garbage":
        bad.write_bytes(b"\x00" * 8 + b"hello world" * 10)
    elif how == "wrong_version":
        n = struct.unpack("<Q", data[:8])[0]
        header = json.loads(data[8:8 + n])
        # a version of the same length, so the header keeps its size whatever the config holds
        header["__metadata__"]["format_version"] = "9" * len(header["__metadata__"]["format_version"])
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # tensor offsets count from the header's end: any length works
        bad.write_bytes(struct.pack("<Q", len(blob)) + blob + data[8 + n:])
    elif how == "foreign":
        save_file({"w": torch.zeros(2)}, str(bad))
    elif how == "wrong_kind":
        save_checkpoint(bad, model.state_dict(), kind=C.KIND_TRAIN_STATE, config=cfg)
    kinds = (C.KIND_MODEL,) if how == "wrong_kind" else (C.KIND_MODEL, C.KIND_TRAIN_STATE)
    with pytest.raises(UserError) as e:
        load_checkpoint(bad, kinds=kinds)
    assert needle in str(e.value) and str(bad) in str(e.value)


def test_tokenizer_tampering_is_detected(saved, tmp_path):
    path, model, cfg = saved
    ck = load_checkpoint(path)
    tensors = dict(ck.tensors)
    raw = tensors["smedjan.tokenizer"].clone()
    raw[-1] ^= 1
    tensors["smedjan.tokenizer"] = raw
    from safetensors.torch import save_file

    bad = tmp_path / "t.bin"
    save_file(tensors, str(bad), metadata=ck.meta)
    with pytest.raises(UserError, match="corrupt"):
        load_checkpoint(bad).tokenizer


def test_metadata_only_read(saved):
    path, _, cfg = saved
    md = read_metadata(path)
    assert json.loads(md["model_config"])["dim"] == cfg.dim


def test_load_model_runs_and_names_bad_tensors(saved, tmp_path):
    from smedjan.model import load_model

    path, model, cfg = saved
    loaded, tok, ck = load_model(path)
    idx = torch.randint(0, cfg.vocab_size, (1, 7))
    torch.testing.assert_close(loaded(idx), model(idx))
    state = model.state_dict()
    state["layers.0.mixer.wq.weight"] = state["layers.0.mixer.wq.weight"][:-1]
    bad = tmp_path / "bad.bin"
    save_checkpoint(bad, state, kind=C.KIND_MODEL, config=cfg, tokenizer=tok)
    with pytest.raises(UserError, match="layers.0.mixer.wq.weight"):
        load_model(bad)
    del state["layers.0.mixer.wq.weight"]
    save_checkpoint(bad, state, kind=C.KIND_MODEL, config=cfg, tokenizer=tok)
    with pytest.raises(UserError, match="missing tensor 'layers.0.mixer.wq.weight'"):
        load_model(bad)
