"""The recurrent mixers llama.cpp has, exported and run there (llama-cpp-python, never skipped),
tested like the Llama export: `--ssm --mlp none` as llama.cpp's `mamba2`, `--rwkv --mlp
swiglu` as its `arwkv7`. For a micro model of each trained on tinyshakespeare: llama.cpp
tokenizes as we do with the embedded tokenizer, the f32 file's logits equal our forward,
its greedy 32 tokens equal ours (decoded with our recurrent state), and a q8_0 file stays
close. What llama.cpp lacks (linear attention, hybrids, RWKV's channel mix with our
RMSNorm blocks, a Mamba-2 block with a feed-forward) is refused with one line."""

from __future__ import annotations

import llama_cpp
import numpy as np
import pytest
import torch

from helpers import DATA
from smedjan.errors import UserError
from smedjan.export.gguf import export_gguf
from smedjan.formats import constants as C
from smedjan.formats.checkpoint import save_checkpoint
from smedjan.model import ModelConfig, Transformer
from test_export_llamacpp import STRINGS, greedy_ours, llama_logits, ours_logits, rel_err

ARCHS = {"mamba2": dict(mixer="ssm", mlp="none", ssm_head_dim=64, ssm_state=32, dim=64),
         "arwkv7": dict(mixer="rwkv", mlp="swiglu", rwkv_head_dim=64, dim=128)}


def train_micro(tokenizer, steps: int = 120, **kw) -> Transformer:
    """A plain AdamW loop over tinyshakespeare: enough for greedy text to mean something."""
    from smedjan.data.sources import iter_chunks

    text = "".join(c.text for c in iter_chunks([DATA / "pretrain" / "tinyshakespeare.txt.zst"], max_chars=200_000))
    data = torch.tensor(np.array(tokenizer.encode(text), dtype=np.int64))
    cfg = ModelConfig.make(vocab_size=tokenizer.vocab_size, n_layers=2, n_heads=2, max_seq_len=256, **kw)
    torch.manual_seed(0)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - 65, (16,), generator=gen)
        loss = model(torch.stack([data[s:s + 64] for s in starts]), torch.stack([data[s + 1:s + 65] for s in starts]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module", params=list(ARCHS))
def exported(request, tokenizer, tmp_path_factory):
    """(arch, model, {quant: gguf path}) for each architecture."""
    model = train_micro(tokenizer, **ARCHS[request.param])
    d = tmp_path_factory.mktemp(request.param)
    save_checkpoint(d / "final.bin", model.state_dict(), kind=C.KIND_MODEL, config=model.cfg, tokenizer=tokenizer)
    files = {q: d / f"m-{q}.gguf" for q in ("f32", "q8_0")}
    for q, path in files.items():
        export_gguf(d / "final.bin", path, quant=q)
    return request.param, model, files


def open_llama(path, **kw) -> llama_cpp.Llama:
    return llama_cpp.Llama(str(path), n_ctx=256, n_threads=2, n_threads_batch=2, verbose=False, logits_all=True, **kw)


@pytest.mark.slow  # the fixture trains two micro models
def test_the_file_names_llama_cpps_architecture(exported):
    from gguf import GGUFReader

    arch, _, files = exported
    r = GGUFReader(files["f32"])
    assert r.fields["general.architecture"].contents() == arch
    names = {t.name for t in r.tensors}
    assert ("blk.0.ssm_in.weight" if arch == "mamba2" else "blk.0.time_mix_lerp_fused.weight") in names
    assert "blk.0.ffn_norm.weight" in names or arch == "mamba2"


@pytest.mark.slow  # the fixture trains two micro models
def test_tokenization_with_the_embedded_tokenizer(exported, tokenizer):
    llm = open_llama(exported[2]["f32"], vocab_only=True)
    for text in STRINGS:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tokenizer.encode(text), text
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == [tokenizer.bos_id] + tokenizer.encode(text)


@pytest.mark.slow  # the fixture trains two micro models
def test_f32_logits_match(exported, tokenizer):
    _, model, files = exported
    ids = [tokenizer.bos_id] + tokenizer.encode("First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
                                                "All:\nSpeak, speak.")
    assert rel_err(ours_logits(model, ids), llama_logits(open_llama(files["f32"]), ids)) < 1e-4
    # q8_0: every projection quantized (the small vectors, LoRAs and conv stay f32), still close
    assert rel_err(ours_logits(model, ids), llama_logits(open_llama(files["q8_0"]), ids)) < 0.05


@pytest.mark.slow  # the fixture trains two micro models
def test_greedy_32_tokens_identical(exported, tokenizer):
    _, model, files = exported
    prompt = [tokenizer.bos_id] + tokenizer.encode("ROMEO:\nWhat light")
    ours = greedy_ours(model, prompt, 32)
    gen = open_llama(files["f32"]).generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True)
    theirs = [next(gen) for _ in range(32)]
    assert theirs == ours, (tokenizer.decode(ours), tokenizer.decode(theirs))
    assert len(set(ours)) > 3  # a real continuation, not one token repeated


@pytest.mark.parametrize("kw,needle", [
    (dict(mixer="linear_attn"), "'linear_attn' part"),
    (dict(layer_pattern="ssm*3,attention", n_layers=4, mlp="none"), "hybrid of ssm and attention"),
    (dict(mixer="rwkv", mlp="rwkv", rwkv_head_dim=64), "normalise with LayerNorm"),
    (dict(mixer="ssm"), "mamba2 blocks have no feed-forward"),
    (dict(mixer="rwkv", mlp="relu2", rwkv_head_dim=64), "arwkv7 blocks have a SwiGLU"),
    (dict(mixer="rwkv", mlp="swiglu", rwkv_head_dim=32), "--rwkv-head-dim 32"),
    (dict(mlp="none"), "llama blocks have only SwiGLU"),
])
def test_what_llama_cpp_lacks_is_refused_in_one_line(kw, needle, tokenizer, tmp_path):
    cfg = ModelConfig.make(vocab_size=tokenizer.vocab_size, **{**dict(dim=64, n_layers=2, n_heads=2, max_seq_len=64),
                                                               **kw})
    save_checkpoint(tmp_path / "m.bin", Transformer(cfg).state_dict(), kind=C.KIND_MODEL, config=cfg,
                    tokenizer=tokenizer)
    with pytest.raises(UserError) as e:
        export_gguf(tmp_path / "m.bin", tmp_path / "m.gguf")
    assert needle in str(e.value) and "not exportable to GGUF" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "m.gguf").exists()
