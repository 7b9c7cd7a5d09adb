"""import-hf: Hugging Face Llama folders -> smedjan checkpoints, checked against transformers'
own forward pass (float32 logits within 1e-4), and every kind of broken folder refused."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from helpers import assert_user_error, smedjan
from smedjan.errors import UserError
from smedjan.export.hf_write import import_hf
from smedjan.formats.checkpoint import load_checkpoint
from smedjan.model.load import model_from_checkpoint


def hf_logits(folder, ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def our_logits(ck_path, ids: torch.Tensor) -> torch.Tensor:
    model = model_from_checkpoint(load_checkpoint(ck_path)).eval()
    with torch.no_grad():
        return model(ids)


def save_hf(model, folder, **kw):
    model.save_pretrained(folder, **kw)
    return folder


def llama(seed=0, **cfg):
    base = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**base, **cfg})).eval()
    with torch.no_grad():  # larger q/k: attention (and so RoPE) shapes the logits; logits O(10)
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(20)
            layer.self_attn.k_proj.weight.mul_(20)
        model.model.embed_tokens.weight.mul_(10)
        if not model.config.tie_word_embeddings:
            model.lm_head.weight.mul_(10)
    return model


CASES = {
    # GQA, head_dim != hidden/heads, untied, llama3 RoPE, sharded safetensors
    "gqa_llama3_sharded": (lambda: llama(head_dim=16, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}), {"max_shard_size": "20KB"}),
    "tied_linear": (lambda: llama(tie_word_embeddings=True, num_key_value_heads=4,
                                  rope_scaling={"rope_type": "linear", "factor": 4.0}), {}),
    "yarn": (lambda: llama(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                                         "beta_fast": 16.0, "beta_slow": 2.0}), {}),
    "dynamic": (lambda: llama(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), {}),
    "bf16": (lambda: llama(rope_theta=1000.0).to(torch.bfloat16), {}),
    "f16": (lambda: llama().to(torch.float16), {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_imported_logits_equal_transformers(tmp_path, case):
    make, save_kw = CASES[case]
    hf = make()
    folder = save_hf(hf, tmp_path / "hf", **save_kw)
    if case == "gqa_llama3_sharded":
        assert (folder / "model.safetensors.index.json").is_file()
    summary, warnings = import_hf(folder, tmp_path / "m.bin")
    assert any("without a tokenizer" in w for w in warnings)
    assert (case == "dynamic") == any("dynamic NTK" in w for w in warnings)
    ids = torch.randint(0, 96, (2, 100), generator=torch.Generator().manual_seed(1))
    ours, theirs = our_logits(tmp_path / "m.bin", ids), hf_logits(folder, ids)
    assert (ours - theirs).abs().max().item() < 1e-4, case
    assert theirs.abs().max().item() > 1.0  # not a degenerate comparison
    if case in ("bf16", "f16"):
        stored = load_checkpoint(tmp_path / "m.bin").tensors
        raw = load_file(str(folder / "model.safetensors"))
        assert stored["layers.1.mixer.wk.weight"].dtype == hf.dtype
        assert torch.equal(stored["layers.1.mixer.wk.weight"], raw["model.layers.1.self_attn.k_proj.weight"])
        assert summary["dtype"] == {"bf16": "bfloat16", "f16": "float16"}[case]


def test_mistral_sliding_window(tmp_path):
    torch.manual_seed(0)
    hf = MistralForCausalLM(MistralConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                          sliding_window=8)).eval()
    folder = save_hf(hf, tmp_path / "hf")
    summary, _ = import_hf(folder, tmp_path / "m.bin")
    assert summary["architecture"] == "MistralForCausalLM"
    assert load_checkpoint(tmp_path / "m.bin").config.attention.sliding_window == 8
    ids = torch.randint(0, 96, (1, 40), generator=torch.Generator().manual_seed(2))
    assert (our_logits(tmp_path / "m.bin", ids) - hf_logits(folder, ids)).abs().max().item() < 1e-4


def test_tiny_random_llama_via_cli(shared_data, tmp_path):
    folder = shared_data / "model" / "tiny-random-llama"
    res = smedjan("import-hf", "--model-dir", folder, "--output", tmp_path / "tiny.bin", "--json")
    assert res.code == 0, res
    assert "without a tokenizer" in res.err and "has no tokenizer.json" in res.err
    summary = json.loads(res.out)
    assert (summary["vocab_size"], summary["head_dim"], summary["tied"]) == (32000, 4, False)
    ids = torch.tensor([[1, 450, 4996, 17354, 1701, 31999, 0]])
    assert (our_logits(tmp_path / "tiny.bin", ids) - hf_logits(folder, ids)).abs().max().item() < 1e-4
    ck = load_checkpoint(tmp_path / "tiny.bin")
    with pytest.raises(UserError, match="carries no tokenizer"):
        ck.tokenizer


def test_tokenizer_flag_embeds_a_matching_tokenizer(tokenizer, tokenizer_path, tmp_path):
    from smedjan.model import load_model

    folder = save_hf(llama(vocab_size=tokenizer.vocab_size), tmp_path / "hf")
    summary, warnings = import_hf(folder, tmp_path / "m.bin", tokenizer=tokenizer_path)
    assert summary["tokenizer"] == tokenizer.fingerprint and not warnings
    _, tok, _ = load_model(tmp_path / "m.bin")
    assert tok.fingerprint == tokenizer.fingerprint


def test_export_then_import_is_exact(trained_checkpoint, tokenizer, tmp_path):
    """export-hf then import-hf: same tensors bit for bit, and the tokenizer back from tokenizer.json."""
    res = smedjan("export-hf", "--checkpoint", trained_checkpoint, "--output", tmp_path / "hf")
    assert res.code == 0, res
    summary, warnings = import_hf(tmp_path / "hf", tmp_path / "back.bin")
    assert not warnings
    a, b = load_checkpoint(trained_checkpoint), load_checkpoint(tmp_path / "back.bin")
    assert b.tokenizer.fingerprint == tokenizer.fingerprint
    assert b.config.to_dict() | {"extra": {}} == a.config.to_dict() | {"extra": {}}
    sa, sb = a.model_state(), b.model_state()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------ bad folders
@pytest.fixture(scope="module")
def good(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("good") / "hf"
    save_hf(llama(num_hidden_layers=1), folder)
    return folder


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (folder / "config.json").write_text(json.dumps(cfg))


def _edit_tensors(folder, fn):
    f = folder / "model.safetensors"
    t = load_file(str(f))
    fn(t)
    save_file(t, str(f), metadata={"format": "pt"})


BAD = {
    "unknown_architecture": (lambda d: _edit_config(d, architectures=["GPT2LMHeadModel"]), "'architectures'"),
    "no_architectures": (lambda d: _edit_config(d, architectures=None), "lacks 'architectures'"),
    "missing_key": (lambda d: _edit_config(d, hidden_size=None), "lacks 'hidden_size'"),
    "wrong_type": (lambda d: _edit_config(d, num_attention_heads="4"), "'num_attention_heads'"),
    "malformed_json": (lambda d: (d / "config.json").write_text('{"architectures": ['), "malformed config.json"),
    "gelu": (lambda d: _edit_config(d, hidden_act="gelu"), "'hidden_act'"),
    "bias": (lambda d: _edit_config(d, attention_bias=True), "'attention_bias'"),
    "longrope": (lambda d: _edit_config(d, rope_parameters={"rope_type": "longrope", "factor": 2.0}),
                 "rope_type 'longrope'"),
    "truncated": (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:5000]),
                  "corrupt or truncated"),
    "missing_tensor": (lambda d: _edit_tensors(d, lambda t: t.pop("model.layers.0.mlp.up_proj.weight")),
                       "missing tensor 'model.layers.0.mlp.up_proj.weight'"),
    "extra_tensor": (lambda d: _edit_tensors(d, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias":
                                                                    torch.zeros(32)})),
                     "unexpected tensor 'model.layers.0.self_attn.q_proj.bias'"),
    "misshapen": (lambda d: _edit_tensors(d, lambda t: t.update({"model.norm.weight": torch.ones(33)})),
                  "'model.norm.weight' has shape (33,)"),
    "int8": (lambda d: _edit_tensors(d, lambda t: t.update({"lm_head.weight": t["lm_head.weight"].to(torch.int8)})),
             "'lm_head.weight' has dtype I8"),
    "float64": (lambda d: _edit_tensors(d, lambda t: t.update({"model.embed_tokens.weight":
                                                               t["model.embed_tokens.weight"].double()})),
                "'model.embed_tokens.weight' has dtype F64"),
    "pickle_only": (lambda d: (d / "model.safetensors").rename(d / "pytorch_model.bin"), "safetensors only"),
    "no_config": (lambda d: (d / "config.json").unlink(), "no config.json"),
    "missing_shard": (lambda d: (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}})), "model-00002-of-00002"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_folders_are_refused(good, tmp_path, case):
    mutate, needle = BAD[case]
    folder = tmp_path / "hf"
    shutil.copytree(good, folder)
    mutate(folder)
    with pytest.raises(UserError) as e:
        import_hf(folder, tmp_path / "out.bin")
    msg = str(e.value)
    assert needle in msg and str(folder) in msg and "\n" not in msg, msg
    assert not (tmp_path / "out.bin").exists()


def test_cli_bad_input_is_one_line_exit_2(good, tokenizer_path, tmp_path):
    res = smedjan("import-hf", "--model-dir", good, "--output", tmp_path / "missing" / "m.bin")
    assert_user_error(res, "missing", "does not exist")
    res = smedjan("import-hf", "--model-dir", good, "--output", tmp_path / "m.bin", "--tokenizer", tokenizer_path)
    assert_user_error(res, "2048", "96")  # tokenizer vocabulary vs the model's
    folder = tmp_path / "hf"
    shutil.copytree(good, folder)
    _edit_config(folder, architectures=["BertModel"])
    res = smedjan("import-hf", "--model-dir", folder, "--output", tmp_path / "m.bin")
    assert_user_error(res, "BertModel", "LlamaForCausalLM")
    assert not (tmp_path / "m.bin").exists()


def _index_to(folder, shard: str) -> None:
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: shard for k in load_file(str(folder / "model.safetensors"))}}))


@pytest.mark.parametrize("shard", ["../elsewhere/model.safetensors", "ABS", "sub/../../elsewhere/model.safetensors",
                                   "", ".", 7, ["model.safetensors"]])
def test_a_shard_outside_the_folder_is_refused_before_it_is_opened(good, tmp_path, shard):
    """Issue 20 item 8: a weight_map entry of '../../x' or an absolute path was followed
    (/etc/passwd was opened)."""
    folder = tmp_path / "hf"
    shutil.copytree(good, folder)
    (tmp_path / "elsewhere").mkdir()
    outside = tmp_path / "elsewhere" / "model.safetensors"
    shutil.copy(folder / "model.safetensors", outside)  # a valid file: only its place is wrong
    _index_to(folder, str(outside) if shard == "ABS" else shard)
    with pytest.raises(UserError, match="is not a file name inside") as e:
        import_hf(folder, tmp_path / "out.bin")
    assert "\n" not in str(e.value) and not (tmp_path / "out.bin").exists()
    if shard in ("ABS", "../elsewhere/model.safetensors"):  # the tool too, for a sample
        res = smedjan("export-gguf", "--checkpoint", folder, "--no-vocab", "--output", tmp_path / "m.gguf")
        assert_user_error(res, "is not a file name inside")
        assert not (tmp_path / "m.gguf").exists()


def test_shards_in_a_subfolder_or_symlinked_into_a_cache_still_load(good, tmp_path):
    # the Hugging Face hub's layout: snapshots/<rev>/model.safetensors -> ../../blobs/<sha>
    (tmp_path / "blobs").mkdir()
    shutil.copy(good / "model.safetensors", tmp_path / "blobs" / "abc123")
    folder = tmp_path / "snapshots" / "rev"
    folder.mkdir(parents=True)
    shutil.copy(good / "config.json", folder / "config.json")
    (folder / "sub").mkdir()
    (folder / "sub" / "model.safetensors").symlink_to("../../../blobs/abc123")
    (folder / "model.safetensors").symlink_to("sub/model.safetensors")
    _index_to(folder, "sub/model.safetensors")
    import_hf(folder, tmp_path / "out.bin")
    assert (tmp_path / "out.bin").is_file()
