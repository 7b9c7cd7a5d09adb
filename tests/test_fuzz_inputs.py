"""Fuzzing the outside files smedjan reads: Hugging Face folders (config.json, the shard
index, tokenizer.json, safetensors shards), GPT-2 vocab.json/merges.txt, SFT and DPO data,
eval task files and pipeline TOML. Each mutated file gives the reader's correct result or
one line of refusal (nothing written); never a traceback or a hang (see fuzzing.py)."""

from __future__ import annotations

import json
import shutil

import pytest
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from fuzzing import byte_mutation, cli_survives, dumps, fuzz_settings, json_mutation, put, survives
from helpers import smedjan

pytestmark = pytest.mark.slow


# ------------------------------------------------------------------------------- HF folders
@pytest.fixture(scope="module")
def hf_good(tmp_path_factory, tokenizer):
    """A small HF folder as export-hf writes it, sharded in two with an index."""
    import torch
    from safetensors.torch import load_file, save_file

    from smedjan.export.hf_write import export_hf
    from smedjan.export.load import load_source
    from smedjan.formats import constants as C
    from smedjan.formats.checkpoint import save_checkpoint
    from smedjan.model import ModelConfig, Transformer

    base = tmp_path_factory.mktemp("fuzz_hf")
    cfg = ModelConfig.make(vocab_size=tokenizer.vocab_size, dim=16, n_layers=1, n_heads=2, max_seq_len=32)
    torch.manual_seed(0)
    save_checkpoint(base / "m.bin", Transformer(cfg).state_dict(), kind=C.KIND_MODEL, config=cfg, tokenizer=tokenizer)
    export_hf(load_source(base / "m.bin"), base / "hf")
    tensors = load_file(str(base / "hf" / "model.safetensors"))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(base / "hf" / shard), metadata={"format": "pt"})
    (base / "hf" / "model.safetensors").unlink()
    (base / "hf" / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 1}, "weight_map": {k: s for s, ks in shards.items() for k in ks}}))
    return base / "hf"


def _import(folder, out):
    from smedjan.export.hf_write import import_hf

    try:
        return import_hf(folder, out)
    except BaseException:
        assert not out.exists()
        raise


def _mutated_folder(hf_good, tmp_path_factory, name: str, content: bytes):
    d = tmp_path_factory.getbasetemp() / "fuzz_hf_case"
    if d.exists():
        shutil.rmtree(d)
    shutil.copytree(hf_good, d)
    (d / name).write_bytes(content)
    out = tmp_path_factory.getbasetemp() / "fuzz_hf_out.bin"
    out.unlink(missing_ok=True)
    return d, out


HF_JSON = ["config.json", "model.safetensors.index.json", "tokenizer.json"]


@fuzz_settings()
@given(st.data())
def test_fuzz_hf_json_files_bytes(hf_good, tmp_path_factory, data):
    name = data.draw(st.sampled_from(HF_JSON))
    good = (hf_good / name).read_bytes()
    d, out = _mutated_folder(hf_good, tmp_path_factory, name, data.draw(byte_mutation(good, len(good) // 2)))
    survives("hf folder", _import, d, out, names=d)


@fuzz_settings()
@given(st.data())
def test_fuzz_hf_index_and_tokenizer_fields(hf_good, tmp_path_factory, data):
    name = data.draw(st.sampled_from(["model.safetensors.index.json", "tokenizer.json"]))
    obj = json.loads((hf_good / name).read_text())
    d, out = _mutated_folder(hf_good, tmp_path_factory, name, dumps(data.draw(json_mutation(obj))).encode())
    survives("hf folder", _import, d, out, names=d)


@fuzz_settings()
@given(st.data())
def test_fuzz_hf_shard_bytes(hf_good, tmp_path_factory, data):
    import struct

    name = data.draw(st.sampled_from(["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]))
    good = (hf_good / name).read_bytes()
    end = 8 + struct.unpack("<Q", good[:8])[0]
    d, out = _mutated_folder(hf_good, tmp_path_factory, name, data.draw(byte_mutation(good, end, ((0, 8),))))
    survives("hf folder", _import, d, out, names=d)


@fuzz_settings()
@given(st.data())
def test_fuzz_hf_config_fields(hf_good, tmp_path_factory, data):
    obj = json.loads((hf_good / "config.json").read_text())
    d, out = _mutated_folder(hf_good, tmp_path_factory, "config.json", dumps(data.draw(json_mutation(obj))).encode())
    survives("hf config.json", _import, d, out, names=d)


# -------------------------------------------------------------------- GPT-2 vocab.json + merges
@pytest.fixture(scope="module")
def gpt2_files(tokenizer):
    from smedjan.tokenizer.bytelevel import token_to_str

    ordinary = [i for i in range(tokenizer.vocab_size) if i not in tokenizer.specials.values()]
    vocab = {token_to_str(tokenizer.tokens[i]): i for i in ordinary}
    merges = "#version: 0.2\n" + "".join(f"{token_to_str(tokenizer.tokens[a])} {token_to_str(tokenizer.tokens[b])}\n"
                                         for a, b in tokenizer.merges)
    return vocab, merges.encode()


def _import_bpe(vocab_path, merges_path):
    from smedjan.tokenizer.hf import from_gpt2_files

    tok = from_gpt2_files(vocab_path, merges_path)
    assert tok.decode(tok.encode("a fuzzed vocabulary")) == "a fuzzed vocabulary"
    return tok


@fuzz_settings()
@given(st.data())
def test_fuzz_gpt2_vocab_and_merges(gpt2_files, tmp_path_factory, data):
    vocab, merges = gpt2_files
    base = tmp_path_factory.getbasetemp()
    vp, mp = base / "fuzz_vocab.json", base / "fuzz_merges.txt"
    if data.draw(st.booleans()):
        vp.write_text(dumps(data.draw(json_mutation(vocab))))
        put(mp, merges)
    else:
        vp.write_text(json.dumps(vocab))
        put(mp, data.draw(byte_mutation(merges, 200)))
    survives("vocab.json + merges.txt", _import_bpe, vp, mp)


# ---------------------------------------------------------------------------- SFT and DPO data
# One file holds one format (detected from its first record): three records of each.
SFT_RECORDS = {
    "messages": [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Hi {i}"},
                               {"role": "assistant", "content": f"Hello {i}."}]} for i in range(3)],
    "sharegpt": [{"conversations": [{"from": "human", "value": f"Name colour {i}."}, {"from": "gpt", "value": "Blue."}],
                  "system": "You help."} for i in range(3)],
    "alpaca": [{"instruction": "Add the numbers.", "input": f"2 and {i}", "output": str(2 + i)} for i in range(3)],
    "prompt-response": [{"prompt": f"Say yes {i}.", "response": "Yes."} for i in range(3)],
}
DPO_RECORDS = {
    "prompt": [{"prompt": f"Pick {i}.", "chosen": "A", "rejected": "B"} for i in range(2)]
    + [{"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello"}],
        "rejected": [{"role": "assistant", "content": "Go away"}]}],
    "hh-rlhf": [{"chosen": f"\n\nHuman: Hi {i}\n\nAssistant: Hello there",
                 "rejected": f"\n\nHuman: Hi {i}\n\nAssistant: No"} for i in range(3)],
    "alpaca": [{"instruction": f"Be kind {i}.", "input": "", "chosen": "Sure.", "rejected": "No."} for i in range(3)],
    "sharegpt": [{"conversations": [{"from": "human", "value": f"Q{i}?"}], "chosen": {"from": "gpt", "value": "Yes"},
                  "rejected": {"from": "gpt", "value": "No"}} for i in range(3)],
}


def _load_sft(paths, tok):
    from smedjan.post.formats import load_conversations
    from smedjan.post.sft import tokenize_conversations

    convs, report = load_conversations(paths)
    return tokenize_conversations(tok, convs, 64, "truncate", report)


def _load_dpo(paths, tok):
    from smedjan.post.dpo import tokenize_pairs
    from smedjan.post.formats import load_pairs

    pairs, report = load_pairs(paths)
    return tokenize_pairs(tok, pairs, 64, 16, "truncate", report)


def _data_file(base, records, layout: str, data) -> tuple:
    """The records as .jsonl / .json / .jsonl.zst, one of them (or none) mutated at record
    level, and the file (or not) at byte level."""
    recs = list(records)
    k = data.draw(st.integers(-1, len(recs) - 1))
    if k >= 0:
        recs[k] = data.draw(json_mutation(recs[k]))
    text = (dumps(recs) if layout == "json" else "".join(dumps(r) + "\n" for r in recs)).encode()
    if data.draw(st.booleans()):
        text = data.draw(byte_mutation(text, min(len(text), 120)))
    name = {"json": "d.json", "jsonl": "d.jsonl", "zst": "d.jsonl.zst"}[layout]
    if layout == "zst":
        text = zstandard.ZstdCompressor().compress(text)
        if data.draw(st.booleans()):
            text = data.draw(byte_mutation(text, 16))
    path = base / name
    put(path, text)
    return path


@pytest.mark.parametrize("kind", ["sft", "dpo"])
@fuzz_settings()
@given(data=st.data())
def test_fuzz_sft_and_dpo_data(kind, tokenizer, tmp_path_factory, data):
    formats, load = {"sft": (SFT_RECORDS, _load_sft), "dpo": (DPO_RECORDS, _load_dpo)}[kind]
    layout = data.draw(st.sampled_from(["jsonl", "json", "zst"]))
    records = formats[data.draw(st.sampled_from(sorted(formats)))]
    path = _data_file(tmp_path_factory.getbasetemp(), records, layout, data)
    survives(f"{kind} data", load, [path], tokenizer, names=path)


# ---------------------------------------------------------------------------------- eval tasks
EVAL_ITEMS = {
    "copa": [{"query": "The man broke his toe because", "choices": ["he dropped a hammer", "he sang"], "gold": 0}],
    "winograd": [{"context_options": ["The cat sat", "The dog sat"], "continuation": "on the mat.", "gold": 1}],
    "lambada_openai": [{"context": "The sky is", "continuation": "blue"}],
    "hellaswag_val": [{"activity_label": "Cooking", "ctx_a": "A man cuts onions.", "ctx_b": "he",
                       "endings": ["cries.", "sings.", "flies.", "sleeps."], "label": "0"}],
    "mmlu": [{"question": "2+2?", "subject": "math", "choices": ["3", "4", "5", "6"], "answer": 1}],
}


def _read_task(label, path):
    from smedjan.eval import tasks as T

    spec = {"copa": T.CORE_BY_LABEL["copa"], "winograd": T.CORE_BY_LABEL["winograd"],
            "lambada_openai": T.CORE_BY_LABEL["lambada_openai"], "hellaswag_val": T.HELLASWAG,
            "mmlu": T.mmlu_spec()}[label]
    return T.read_items(spec, path)


@fuzz_settings()
@given(st.data())
def test_fuzz_eval_task_files(tmp_path_factory, data):
    label = data.draw(st.sampled_from(sorted(EVAL_ITEMS)))
    layout = data.draw(st.sampled_from(["jsonl", "zst"]))
    path = _data_file(tmp_path_factory.getbasetemp(), EVAL_ITEMS[label] * 3, layout, data)
    survives("eval task file", _read_task, label, path, names=path)


# ------------------------------------------------------------------------------- pipeline TOML
PIPELINE = {
    "corpus": {"input": ["corpus.txt"]},
    "tokenizer": {"vocab_size": 300},
    "prepare": {"val_fraction": 0.05, "txt_split": "blank"},
    "train": {"size": "tiny", "steps": 10, "lr": 3e-3, "compile": False},
    "sft": {"data": ["sft.jsonl"], "steps": 2},
    "export": {"quant": ["q4_0", "q8_0"]},
    "eval": {"max_tokens": 1000},
}


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return {float("inf"): "inf", float("-inf"): "-inf"}.get(v, "nan" if v != v else repr(v))
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v if x is not None) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items() if x is not None) + "}"
    return json.dumps(str(v))


def _toml(obj) -> str:
    if not isinstance(obj, dict):
        return f"x = {_toml_value(obj)}\n"
    out = []
    for sec, body in obj.items():
        if isinstance(body, dict):
            out.append(f"[{json.dumps(sec)}]")
            out += [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in body.items() if v is not None]
        elif body is not None:
            out.insert(0, f"{json.dumps(sec)} = {_toml_value(body)}")
    return "\n".join(out) + "\n"


def _load_pipeline(path, base):
    from smedjan.pipeline.config import load_pipeline

    pipe = load_pipeline(path, runs=base / "runs", base=base)
    assert pipe.stages and all(isinstance(a, str) for s in pipe.stages for cmd in s.command for a in cmd)
    return pipe


@fuzz_settings()
@given(st.data())
def test_fuzz_pipeline_toml(tmp_path_factory, data):
    base = tmp_path_factory.getbasetemp() / "fuzz_pipe"
    base.mkdir(exist_ok=True)
    (base / "corpus.txt").write_text("Some text.\n")
    (base / "sft.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    text = _toml(PIPELINE).encode()
    if data.draw(st.booleans()):
        text = _toml(data.draw(json_mutation(PIPELINE))).encode()
    if data.draw(st.booleans()):
        text = data.draw(byte_mutation(text, len(text)))
    path = base / "mine.toml"
    put(path, text)
    survives("pipeline toml", _load_pipeline, path, base, names=path)


# ------------------------------------------------------------------------------ through the CLI
@fuzz_settings(n=3, shrink=False)
@given(st.data())
def test_fuzz_a_sample_through_the_tools(hf_good, gpt2_files, tmp_path_factory, data):
    base = tmp_path_factory.getbasetemp() / "fuzz_cli_in"
    base.mkdir(exist_ok=True)
    out = base / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    name = data.draw(st.sampled_from(HF_JSON))
    good = (hf_good / name).read_bytes()
    d, _ = _mutated_folder(hf_good, tmp_path_factory, name, data.draw(byte_mutation(good, len(good) // 2)))
    cli_survives("hf folder", smedjan("import-hf", "--model-dir", d, "--output", out / "m.bin"), out, {"m.bin"})
    vocab, merges = gpt2_files
    (base / "vocab.json").write_text(dumps(data.draw(json_mutation(vocab))))
    (base / "merges.txt").write_bytes(merges)
    cli_survives("vocab.json + merges.txt", smedjan("import-bpe", "--vocab", base / "vocab.json", "--merges",
                                                    base / "merges.txt", "--output", out / "tok.bin"),
                 out, {"m.bin", "tok.bin"})
