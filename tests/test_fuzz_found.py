"""What the fuzzers (test_fuzz_formats.py, test_fuzz_inputs.py) found, kept as plain
regression tests: each case died with a traceback (or, for a huge id, a MemoryError that
the OOM killer turned into SIGKILL) before its fix, and is one line of refusal now."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from smedjan.errors import UserError


# ----------------------------------------------------------------- HF tokenizer.json, vocab.json
def _tokenizer_json(tokenizer) -> dict:
    from smedjan.tokenizer.hf import to_hf_tokenizer_json

    return to_hf_tokenizer_json(tokenizer)


@pytest.mark.parametrize("edit", [
    lambda d: d["added_tokens"].append({"content": "<|x|>"}),  # no id: KeyError
    lambda d: d["added_tokens"].append(7),  # not an object: TypeError
    lambda d: d["added_tokens"][0].update(id=2**62),  # [b""] * (2**62 + 1): MemoryError / the OOM killer
    lambda d: d["model"]["vocab"].update({"Ġzzz": "9"}),  # a string id: TypeError in max()
    lambda d: d["model"]["merges"].append(["a"]),  # one token: ValueError on unpacking
    lambda d: d["model"]["merges"].append(5),  # TypeError
    lambda d: d.update(model=[1]),  # AttributeError on .get
    lambda d: d.update(pre_tokenizer={"type": "Sequence", "pretokenizers": [1, 2]}),  # AttributeError
])
def test_a_damaged_tokenizer_json_is_refused(tokenizer, tmp_path, edit):
    from smedjan.export.hf_tokenizer import tokenizer_from_hf_json

    data = _tokenizer_json(tokenizer)
    edit(data)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data))
    with pytest.raises(UserError) as e:
        tokenizer_from_hf_json(path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("value", [2**62, -1, True, 10**30])
def test_a_vocab_json_id_out_of_range_is_refused_without_allocating_it(tokenizer, tmp_path, value):
    from smedjan.tokenizer.bytelevel import token_to_str
    from smedjan.tokenizer.hf import from_gpt2_files

    vocab = {token_to_str(bytes([b])): b for b in range(256)}
    vocab[token_to_str(b"zz")] = value
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(UserError, match="vocab.json"):
        from_gpt2_files(tmp_path / "vocab.json", tmp_path / "merges.txt")


# --------------------------------------------------------------------------------- pipelines
@pytest.mark.parametrize("edit, needle", [
    ('[sft]\ndata = [0]\n', "[sft] needs data"),
    ('[corpus]\ninput = [["corpus.txt"]]\n', "[corpus] needs input"),
    ('[export]\nquant = [4]\n', "[export] quant"),
    ('[train]\nlr = [[1]]\n', "[train] flag 'lr' lists a list"),
    ('[train]\nlr = {a = 1}\n', "[train] flag 'lr' has a dict value"),
])
def test_a_pipeline_value_of_the_wrong_type_is_one_line_naming_the_file(tmp_path, edit, needle):
    from smedjan.pipeline.config import load_pipeline

    sections = {"corpus": 'input = ["corpus.txt"]', "tokenizer": "vocab_size = 300", "prepare": "", "train": "",
                "export": "", "sft": 'data = ["sft.jsonl"]'}
    name = edit.split("]")[0][1:]
    sections[name] = edit.split("\n", 1)[1]
    text = "".join(f"[{k}]\n{v}\n" for k, v in sections.items())
    (tmp_path / "corpus.txt").write_text("text\n")
    (tmp_path / "sft.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    (tmp_path / "p.toml").write_text(text)
    with pytest.raises(UserError) as e:
        load_pipeline(tmp_path / "p.toml", runs=tmp_path / "runs", base=tmp_path)
    assert str(e.value).startswith(f"{tmp_path / 'p.toml'}: ") and needle in str(e.value), str(e.value)


# ------------------------------------------------------------------------- SFT / DPO records
@pytest.mark.parametrize("role", [[], {"a": 1}])
def test_a_role_that_is_not_a_string_is_a_malformed_record(tmp_path, role):
    from smedjan.post.formats import load_conversations, load_pairs

    sft = tmp_path / "sft.jsonl"
    sft.write_text(json.dumps({"messages": [{"role": role, "content": "hi"}]}) + "\n")
    with pytest.raises(UserError, match=f"{sft}:1"):
        load_conversations([sft])
    dpo = tmp_path / "dpo.jsonl"
    dpo.write_text(json.dumps({"prompt": "Hi", "chosen": [{"role": role, "content": "a"}], "rejected": "b"}) + "\n")
    with pytest.raises(UserError, match=f"{dpo}:1"):
        load_pairs([dpo])


# ----------------------------------------------------------------------------- train states
@pytest.fixture
def state(tmp_path):
    from test_train_loop import make

    make(tmp_path / "run", steps=2, checkpoint_every=2).fit()
    return tmp_path / "run" / "state_2.bin"


def _edit_state(path, tensors=None, meta=None):
    """Rewrite a state with some tensors and metadata entries changed (None deletes)."""
    from safetensors import safe_open

    from smedjan.formats import safetensors as st

    with safe_open(str(path), "pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
        md = dict(f.metadata())
    for k, v in (tensors or {}).items():
        if v is None:
            t.pop(k)
        elif callable(v):
            t.update(v(t))
        else:
            t[k] = v
    for k, v in (meta or {}).items():
        md[k] = v(json.loads(md[k])) if callable(v) else v
    from smedjan.io import atomic_write

    with atomic_write(path) as f:  # a new file: the tensors read above may map the old one
        st.write_safetensors(f, t, md)


def _drop_eps(opt):
    opt["param_groups"][0].pop("eps")
    return json.dumps(opt)


@pytest.mark.parametrize("tensors, meta, needle", [
    ({"rng.python": torch.full((625,), -5, dtype=torch.int64)}, None, "RNG state"),  # OverflowError
    ({"rng.cuda.x": torch.zeros(3, dtype=torch.uint8)}, None, "RNG state"),  # ValueError: int('x')
    (None, {"optimizer": _drop_eps}, "'eps'"),  # KeyError: 'eps' at the first step
    ({"optim.state.norm.weight.exp_avf": lambda t: {"optim.state.norm.weight.exp_avf":
                                                    t["optim.state.norm.weight.exp_avg"]},
      "optim.state.norm.weight.exp_avg": None},
     None, "optimizer state of 'norm.weight'"),  # KeyError: 'exp_avg' at the first step
    ({"optim.state.norm.weight.exp_avg": torch.zeros(3)}, None, "shape (3,)"),  # RuntimeError at the step
])
def test_a_damaged_train_state_is_refused_before_the_first_step(state, tmp_path, tensors, meta, needle):
    from test_train_loop import make

    _edit_state(state, tensors, meta)
    tr = make(tmp_path / "resume", steps=8)
    with pytest.raises(UserError) as e:
        tr.resume(state)
        tr.train_step()
    assert str(e.value).startswith(f"{state}: ") and needle in str(e.value), str(e.value)


def test_fuzz_found_cases_use_the_same_header_layout():
    # the helpers above rewrite states with smedjan's own writer: its header is the format's
    from smedjan.formats.safetensors import safetensors_size, write_safetensors
    import io

    buf = io.BytesIO()
    write_safetensors(buf, {"a": torch.zeros(2)}, {"k": "v"})
    n = struct.unpack("<Q", buf.getvalue()[:8])[0]
    assert json.loads(buf.getvalue()[8:8 + n])["__metadata__"] == {"k": "v"}
    assert len(buf.getvalue()) == safetensors_size({"a": torch.zeros(2)}, {"k": "v"})
