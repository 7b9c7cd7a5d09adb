"""Post-training data: every SFT and DPO layout is detected and parsed, the SFT loss mask is
right token by token for each, pairs are tokenized and cut to the context, and bad records
get one line naming file:line (or file[index]) while unusable ones are skipped and counted."""

from __future__ import annotations

import gzip
import json

import pytest

from helpers import DATA

from smedjan.errors import UserError
from smedjan.formats import constants as C
from smedjan.post.formats import LoadReport, load_conversations, load_pairs, parse_hh_transcript


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_parquet(path, records):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), path)
    return path


def expected_rows(tok, turns):
    """(x, y) pairs the SFT example must have: turns = [(role, text)], assistant targets only."""
    sp, enc = tok.specials, tok.encode
    marks = {"system": (C.SYSTEM_START, C.SYSTEM_END), "user": (C.USER_START, C.USER_END),
             "assistant": (C.ASSISTANT_START, C.ASSISTANT_END)}
    stream = [(sp[C.BOS], False)]
    for role, text in turns:
        a, b = marks[role]
        learn = role == "assistant"
        stream += [(sp[a], False)] + [(i, learn) for i in enc(text)] + [(sp[b], learn)]
    return [(stream[t][0], stream[t + 1][0] if stream[t + 1][1] else -1) for t in range(len(stream) - 1)]


SFT_CASES = {
    "messages": ({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                               {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
                               {"role": "assistant", "content": "Bye."}]},
                 [("system", "Be brief."), ("user", "Hi there"), ("assistant", "Hello!"), ("user", "Bye"),
                  ("assistant", "Bye.")]),
    "sharegpt": ({"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q?"},
                                    {"from": "gpt", "value": "A."}]},
                 [("system", "S"), ("user", "Q?"), ("assistant", "A.")]),
    "alpaca": ({"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
               [("user", "Add the numbers.\n\n2 and 3"), ("assistant", "5")]),
    "prompt-response": ({"prompt": "### Instruction:\nSay hi\n\n### Response:\n", "response": "hi"},
                        [("user", "### Instruction:\nSay hi\n\n### Response:\n"), ("assistant", "hi")]),
}


@pytest.mark.parametrize("fmt", list(SFT_CASES))
def test_sft_mask_token_by_token_for_each_format(tmp_path, tokenizer, fmt):
    from smedjan.post.sft import tokenize_conversations

    record, turns = SFT_CASES[fmt]
    convs, report = load_conversations([write_jsonl(tmp_path / "d.jsonl", [record])])
    assert report.formats == {str(tmp_path / "d.jsonl"): fmt}
    [ex] = tokenize_conversations(tokenizer, convs, max_len=256, too_long="truncate", report=report)
    assert list(zip(ex.x.tolist(), ex.y.tolist())) == expected_rows(tokenizer, turns)


def test_alpaca_without_input_and_sharegpt_system_field(tmp_path):
    rec = {"instruction": "Hi", "input": "", "output": "Yo"}
    convs, _ = load_conversations([write_jsonl(tmp_path / "a.jsonl", [rec])])
    assert convs[0].messages == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    rec = {"system": "Sys", "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}
    convs, _ = load_conversations([write_jsonl(tmp_path / "s.jsonl", [rec])])
    assert convs[0].messages[0] == {"role": "system", "content": "Sys"}


@pytest.mark.parametrize("suffix", [".json", ".json.gz", ".jsonl.zst", ".parquet", ".parquet.zst"])
def test_containers(tmp_path, suffix):
    import zstandard

    recs = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(3)]
    path = tmp_path / f"d{suffix}"
    if suffix.startswith(".parquet"):
        raw = write_parquet(tmp_path / "raw.parquet", recs).read_bytes()
    elif suffix.startswith(".jsonl"):
        raw = "".join(json.dumps(r) + "\n" for r in recs).encode()
    else:
        raw = json.dumps(recs).encode()
    if suffix.endswith(".gz"):
        raw = gzip.compress(raw)
    elif suffix.endswith(".zst"):
        raw = zstandard.ZstdCompressor().compress(raw)
    path.write_bytes(raw)
    convs, report = load_conversations([path])
    assert [c.messages[1]["content"] for c in convs] == ["a0", "a1", "a2"]
    assert convs[2].where == (f"{path}:3" if ".jsonl" in suffix else f"{path}[2]")


def test_shipped_sets_load(tmp_path):
    convs, r = load_conversations([DATA / "sft" / "instruction-data.json.zst"])
    assert len(convs) == 1100 and r.formats[str(DATA / "sft" / "instruction-data.json.zst")] == "alpaca"
    convs, r = load_conversations([DATA / "sft" / "dolly_hhrlhf_train_small.jsonl.zst"])
    assert len(convs) == 1000 and set(r.formats.values()) == {"prompt-response"}
    # the dolly prompt is the user turn verbatim, Alpaca template included
    assert convs[0].messages[0]["content"].startswith("Below is an instruction") and not r.skipped
    pairs, r = load_pairs([DATA / "dpo" / "hh-rlhf_harmless-base_test.jsonl.zst"])
    assert set(r.formats.values()) == {"hh-rlhf"} and len(pairs) == 2303
    assert r.skipped == {"hh-rlhf transcripts with different prompts": 5, "empty chosen or rejected reply": 4}
    pairs, r = load_pairs([DATA / "dpo" / "instruction-data-with-preference.json.zst"])
    assert set(r.formats.values()) == {"alpaca"} and len(pairs) == 1094
    assert r.skipped == {"identical chosen and rejected replies": 6}


def test_hh_transcript_split(tmp_path):
    head = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Joke?\n\nHuman: Please?"
    rec = {"chosen": head + "\n\nAssistant:  Ok, one. ", "rejected": head + "\n\nAssistant: Go away."}
    pairs, _ = load_pairs([write_jsonl(tmp_path / "hh.jsonl", [rec])])
    # the prompt is everything before the last "Assistant:"; consecutive turns of one speaker join
    assert pairs[0].prompt == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                               {"role": "user", "content": "Joke?\n\nPlease?"}]
    assert (pairs[0].chosen, pairs[0].rejected) == ("Ok, one.", "Go away.")
    # "Human:" inside a turn (no blank line before it) is text
    assert parse_hh_transcript("\n\nHuman: a Human: b\n\nAssistant: c") == [
        {"role": "user", "content": "a Human: b"}, {"role": "assistant", "content": "c"}]


def test_dpo_formats(tmp_path):
    recs = {
        "prompt": {"prompt": "Q", "chosen": "good", "rejected": "bad"},
        "alpaca": {"instruction": "Do", "input": "this", "output": "x", "chosen": "good", "rejected": "bad"},
        "sharegpt": {"conversations": [{"from": "human", "value": "Q"}], "chosen": {"from": "gpt", "value": "good"},
                     "rejected": {"from": "gpt", "value": "bad"}},
        "hh-rlhf": {"chosen": "\n\nHuman: Q\n\nAssistant: good", "rejected": "\n\nHuman: Q\n\nAssistant: bad"},
    }
    for fmt, rec in recs.items():
        pairs, r = load_pairs([write_jsonl(tmp_path / f"{fmt}.jsonl", [rec])])
        assert set(r.formats.values()) == {fmt}
        assert (pairs[0].chosen, pairs[0].rejected) == ("good", "bad")
        want = "Do\n\nthis" if fmt == "alpaca" else "Q"
        assert pairs[0].prompt == [{"role": "user", "content": want}]
    # TRL's conversational layout: prompt messages, one-message replies
    rec = {"prompt": [{"role": "user", "content": "Q"}], "chosen": [{"role": "assistant", "content": "good"}],
           "rejected": [{"role": "assistant", "content": "bad"}]}
    pairs, _ = load_pairs([write_jsonl(tmp_path / "c.jsonl", [rec])])
    assert pairs[0].chosen == "good"


def test_sft_truncate_or_skip(tmp_path, tokenizer):
    from smedjan.post.sft import tokenize_conversations

    long = {"messages": [{"role": "user", "content": "x " * 300}, {"role": "assistant", "content": "y"}]}
    ok = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a " * 100}]}
    convs, report = load_conversations([write_jsonl(tmp_path / "d.jsonl", [long, ok])])
    out = tokenize_conversations(tokenizer, convs, max_len=32, too_long="truncate", report=report)
    # the long prompt leaves no assistant token within 32 positions: skipped; the long reply is cut
    assert len(out) == 1 and report.truncated == 2 and report.skipped == {"no assistant token within the context": 1}
    assert len(out[0].x) == 32 and (out[0].y >= 0).sum() == 32 - 4  # <|bos|> <|user_start|> q <|user_end|>
    report = LoadReport()
    out = tokenize_conversations(tokenizer, convs, max_len=32, too_long="skip", report=report)
    assert out == [] and report.skipped == {"longer than the context of 32 tokens": 2}


def test_unusable_records_are_skipped_and_counted(tmp_path):
    recs = [{"messages": [{"role": "user", "content": "no reply"}]},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}]
    path = write_jsonl(tmp_path / "d.jsonl", recs)
    convs, report = load_conversations([path])
    assert len(convs) == 1 and report.records == 3
    assert report.skipped == {"no assistant turn": 1, "empty assistant reply": 1}
    assert report.first_skipped["no assistant turn"] == f"{path}:1"
    with pytest.raises(UserError, match=r"no usable SFT records .*1 no assistant turn \(first: .*d\.jsonl:1\)"):
        load_conversations([write_jsonl(tmp_path / "bad.jsonl", recs[:1])])
    with pytest.raises(UserError, match="no usable preference records.*empty chosen or rejected"):
        load_pairs([write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "", "rejected": "r"}])])


@pytest.mark.parametrize("content,needle", [
    ('{"messages": [}\n', "d.jsonl:1: malformed JSON line"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n[1, 2]\n',
     "d.jsonl:2: expected a JSON object"),
    ('{"messages": "hi"}\n', "d.jsonl:1: field 'messages' is str"),
    ('{"messages": [{"role": "robot", "content": "x"}]}\n', "unknown role 'robot'"),
    ('{"messages": [{"role": "user", "content": 3}]}\n', "expected a string"),
    ('{"conversations": [{"from": "alien", "value": "x"}]}\n', "unknown speaker 'alien'"),
    ('{"instruction": "a", "output": 5}\n', "d.jsonl:1: field 'output' is int"),
    ('{"text": "plain"}\n', "cannot tell the SFT format from its fields (text)"),
    ('\n\n', "holds no records"),
])
def test_malformed_sft_records(tmp_path, content, needle):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(UserError) as e:
        load_conversations([path])
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("rec,fmt,needle", [
    ({"prompt": "q", "chosen": "a"}, "auto", "cannot tell the preference format"),
    ({"prompt": "q", "chosen": 1, "rejected": "b"}, "auto", "field 'chosen' is int"),
    ({"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "auto", "user message"),
    ({"chosen": "no markers", "rejected": "none"}, "auto", "not an hh-rlhf"),
    ({"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"}, "prompt",
     "no 'prompt' field (format prompt)"),
    ({"conversations": [{"from": "gpt", "value": "a"}], "chosen": "x", "rejected": "y"}, "auto",
     "must end with a user turn"),
])
def test_malformed_dpo_records(tmp_path, rec, fmt, needle):
    with pytest.raises(UserError) as e:
        load_pairs([write_jsonl(tmp_path / "p.jsonl", [rec])], fmt=fmt)
    assert needle in str(e.value) and "p.jsonl:1" in str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_conversations([tmp_path / "missing.jsonl"])
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(UserError, match="unsupported data file"):
        load_conversations([tmp_path / "d.txt"])
    (tmp_path / "o.json").write_text('{"messages": []}')
    with pytest.raises(UserError, match="one JSON array"):
        load_conversations([tmp_path / "o.json"])
    (tmp_path / "c.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd garbage")
    with pytest.raises(UserError, match="c.jsonl.zst"):
        load_conversations([tmp_path / "c.jsonl.zst"])
    (tmp_path / "p.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(UserError, match="not a readable parquet"):
        load_conversations([tmp_path / "p.parquet"])
    with pytest.raises(UserError, match="--format 'chatml' is not one of"):
        load_conversations([tmp_path / "o.json"], fmt="chatml")
