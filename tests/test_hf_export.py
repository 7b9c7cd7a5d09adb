"""export-hf: smedjan checkpoints -> folders that transformers' Auto classes load, with the same
float32 logits (within 1e-4), the same tokenization and the same chat token stream."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import assert_user_error, smedjan
from smedjan.chat import CHAT_TEMPLATE, render
from smedjan.errors import UserError
from smedjan.export.hf_write import export_hf
from smedjan.export.load import load_source
from smedjan.formats import constants as C
from smedjan.formats.checkpoint import save_checkpoint
from smedjan.model import ModelConfig, Transformer, load_model

TEXTS = ["Hello world", "don't I'LL 12345 3.14", "  spaces\n\nnewlines\ttabs ", "Ünïcödé 日本語 🎉",
         "def f(x):\n    return x"]


@pytest.fixture(scope="module")
def hf_dir(trained_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("hfexp") / "model"
    res = smedjan("export-hf", "--checkpoint", trained_checkpoint, "--output", out, "--json")
    assert res.code == 0, res
    assert json.loads(res.out)["architecture"] == "LlamaForCausalLM"
    return out


def test_folder_contents(hf_dir, tokenizer):
    assert sorted(p.name for p in hf_dir.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                        "tokenizer.json", "tokenizer_config.json"]
    cfg = json.loads((hf_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"] is True
    assert (cfg["num_key_value_heads"], cfg["head_dim"], cfg["rope_scaling"]) == (2, 16, None)
    tc = json.loads((hf_dir / "tokenizer_config.json").read_text())
    assert tc["chat_template"] == CHAT_TEMPLATE and (tc["bos_token"], tc["eos_token"]) == (C.BOS, C.ASSISTANT_END)
    gen = json.loads((hf_dir / "generation_config.json").read_text())
    from smedjan.tokenizer.specials import end_ids

    assert gen["eos_token_id"] == sorted(end_ids(tokenizer))  # transformers stops where smedjan stops
    with safe_open(str(hf_dir / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys() and "model.layers.1.mlp.down_proj.weight" in f.keys()


def test_transformers_logits_match(hf_dir, trained_checkpoint, tokenizer):
    model, _, _ = load_model(trained_checkpoint)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = torch.tensor([[tokenizer.bos_id] + tokenizer.encode("First Citizen:\nBefore we proceed any further")] * 2)
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    assert ours.abs().max().item() > 1.0


def test_auto_tokenizer_encodes_and_chats_like_us(hf_dir, tokenizer):
    at = AutoTokenizer.from_pretrained(hf_dir)
    for text in TEXTS:
        assert at.encode(text) == tokenizer.encode(text), text  # no implicit BOS
        assert at.decode(tokenizer.encode(text)) == text
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    ids = at.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert list(ids) == render(tokenizer, msgs, add_generation_prompt=True).ids
    assert (at.bos_token_id, at.eos_token_id) == (tokenizer.bos_id, tokenizer.specials[C.ASSISTANT_END])


def sharp(cfg: ModelConfig) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():
        for layer in model.layers:
            layer.mixer.wq.weight.mul_(25)
            layer.mixer.wk.weight.mul_(25)
        model.tok_embeddings.weight.mul_(20)
    return model.eval()


@pytest.mark.parametrize("scaling", ["linear", "ntk", "yarn", "llama3"])
def test_rope_scaling_maps_to_transformers(tokenizer, tmp_path, scaling):
    cfg = ModelConfig.make(vocab_size=tokenizer.vocab_size, dim=64, n_layers=1, n_heads=4, n_kv_heads=2, max_seq_len=256,
                      rope_scaling=scaling, rope_factor=4.0, rope_original_max_seq_len=32, tie_embeddings=False,
                      yarn_beta_fast=16.0, preset="custom")
    model = sharp(cfg)
    ck = tmp_path / "m.bin"
    save_checkpoint(ck, model.state_dict(), kind=C.KIND_MODEL, config=cfg, tokenizer=tokenizer)
    export_hf(load_source(ck), tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = torch.randint(0, 2000, (1, 120), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert (ours - theirs).abs().max().item() < 1e-4, scaling
    plain = Transformer(cfg.replace(rope_scaling="none", rope_factor=1.0))
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert (plain.eval()(ids) - ours).abs().max().item() > 1e-2  # the scaling is really exercised


def test_bf16_checkpoint_stays_bf16(tokenizer, tmp_path):
    cfg = ModelConfig.make(vocab_size=tokenizer.vocab_size, dim=64, n_layers=1, n_heads=2, preset="custom")
    state = {k: v.to(torch.bfloat16) for k, v in sharp(cfg).state_dict().items()}
    ck = tmp_path / "bf16.bin"
    save_checkpoint(ck, state, kind=C.KIND_MODEL, config=cfg, tokenizer=tokenizer)
    summary = export_hf(load_source(ck), tmp_path / "hf")
    assert summary["dtype"] == "bfloat16"
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("model.layers.0.self_attn.v_proj.weight"), state["layers.0.mixer.wv.weight"])


def test_existing_folder_is_replaced_only_on_success(trained_checkpoint, tokenizer, tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "old.txt").write_text("old")
    cfg = ModelConfig.make(vocab_size=tokenizer.vocab_size, dim=64, n_layers=1, n_heads=2, preset="custom")
    notok = tmp_path / "notok.bin"
    save_checkpoint(notok, Transformer(cfg).state_dict(), kind=C.KIND_MODEL, config=cfg)
    res = smedjan("export-hf", "--checkpoint", notok, "--output", out)
    assert_user_error(res, str(notok), "no tokenizer", "--tokenizer")
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    export_hf(load_source(trained_checkpoint), out)
    assert not (out / "old.txt").exists() and (out / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporaries left


def test_refusals(trained_checkpoint, tokenizer, tmp_path):
    res = smedjan("export-hf", "--checkpoint", trained_checkpoint, "--output", tmp_path / "nope" / "hf")
    assert_user_error(res, "nope", "does not exist")
    (tmp_path / "file").write_text("x")
    res = smedjan("export-hf", "--checkpoint", trained_checkpoint, "--output", tmp_path / "file")
    assert_user_error(res, "not a folder")
    cfg = ModelConfig.make(vocab_size=tokenizer.vocab_size, dim=64, n_layers=1, n_heads=2, sliding_window=8,
                      preset="custom")
    ck = tmp_path / "sw.bin"
    save_checkpoint(ck, Transformer(cfg).state_dict(), kind=C.KIND_MODEL, config=cfg, tokenizer=tokenizer)
    with pytest.raises(UserError, match="8-token sliding window"):
        export_hf(load_source(ck), tmp_path / "sw")
    assert not (tmp_path / "sw").exists()
