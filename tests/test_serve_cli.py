"""`smedjan generate` (and the flags of generate, chat and serve) as subprocesses."""

from __future__ import annotations

import json

import pytest

from helpers import assert_user_error, smedjan


@pytest.fixture(scope="module")
def engine(trained_checkpoint):
    from smedjan.infer import Engine
    from smedjan.model import load_model

    model, tok, _ = load_model(trained_checkpoint)
    return Engine(model, tok, max_batch=2), tok


def test_generate_streams_the_greedy_continuation(trained_checkpoint, engine):
    from smedjan.infer import SamplingParams

    eng, tok = engine
    res = smedjan("generate", "--checkpoint", trained_checkpoint, "--prompt", "ROMEO:", "--temperature", "0",
                  "-n", "30")
    assert res.code == 0, res
    want = eng.generate([[tok.bos_id] + tok.encode("ROMEO:")], SamplingParams(temperature=0, max_new_tokens=30))[0]
    assert res.out == want.text
    assert f"{want.completion_tokens} tokens" in res.err and f"finish: {want.finish_reason}" in res.err


def test_generate_batches_several_prompts_and_chat_mode(trained_checkpoint, engine):
    from smedjan.chat import render
    from smedjan.infer import SamplingParams

    eng, tok = engine
    res = smedjan("generate", "-c", trained_checkpoint, "-p", "JULIET:", "-p", "First Citizen:\nWe are",
                  "--seed", "3", "--temperature", "0.9", "--top-k", "40", "-n", "20", "--stop", "\n\n", "--json")
    assert res.code == 0, res
    got = json.loads(res.out)["completions"]
    params = SamplingParams(temperature=0.9, top_k=40, seed=3, max_new_tokens=20, stop=("\n\n",))
    want = eng.generate([[tok.bos_id] + tok.encode(p) for p in ("JULIET:", "First Citizen:\nWe are")], params)
    assert [g["text"] for g in got] == [w.text for w in want]
    assert [g["completion_tokens"] for g in got] == [w.completion_tokens for w in want]

    res = smedjan("generate", "-c", trained_checkpoint, "--chat", "--system", "Be brief.", "-p", "Hello there",
                  "--temperature", "0", "-n", "15", "--json")
    ids = render(tok, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}],
                 add_generation_prompt=True).ids
    want = eng.generate([ids], SamplingParams(temperature=0, max_new_tokens=15))[0]
    got = json.loads(res.out)["completions"][0]
    assert (got["text"], got["prompt_tokens"]) == (want.text, len(ids))


def test_generate_reads_the_prompt_from_stdin(trained_checkpoint):
    a = smedjan("generate", "-c", trained_checkpoint, "--temperature", "0", "-n", "8", input="KING HENRY:")
    b = smedjan("generate", "-c", trained_checkpoint, "--temperature", "0", "-n", "8", "-p", "KING HENRY:")
    assert a.code == b.code == 0 and a.out == b.out and a.out


def test_generate_at_a_tiny_temperature_is_greedy_not_a_traceback(trained_checkpoint):
    greedy = smedjan("generate", "-c", trained_checkpoint, "-p", "ROMEO:", "--temperature", "0", "-n", "12")
    for t in ("1e-40", "2.57e-38"):
        res = smedjan("generate", "-c", trained_checkpoint, "-p", "ROMEO:", "--temperature", t, "-n", "12")
        assert res.code == 0 and "Traceback" not in res.err, res
        assert res.out == greedy.out


def test_generate_one_token_reports_no_nan_rate(trained_checkpoint):
    res = smedjan("generate", "-c", trained_checkpoint, "-p", "ROMEO:", "--temperature", "0", "-n", "1",
                  "--ignore-eos")
    assert res.code == 0, res
    assert "nan" not in res.err.lower() and "1 token," in res.err, res


@pytest.mark.parametrize("args,needle", [
    (["--temperature", "-1"], "temperature"),
    (["--temperature", "inf"], "--temperature"),
    (["--repetition-penalty", "0"], "--repetition-penalty"),
    (["--repetition-penalty", "1e-300"], "--repetition-penalty"),
    (["--repetition-penalty", "1e300"], "--repetition-penalty"),
    (["--repetition-penalty", "-2"], "--repetition-penalty"),
    (["--top-p", "0"], "--top-p"),
    (["--system", "x"], "--system needs --chat"),
    (["--dtype", "int3"], "--dtype"),
    (["--threads", "0"], "--threads"),
    (["-p", "word " * 400], "context is 256"),
])
def test_generate_refuses_bad_input_in_one_line(trained_checkpoint, args, needle):
    assert_user_error(smedjan("generate", "-c", trained_checkpoint, *(args if "-p" in args else ["-p", "hi", *args])),
                      needle)


def test_generate_refuses_a_missing_or_corrupt_checkpoint(tmp_path):
    assert_user_error(smedjan("generate", "-c", tmp_path / "nope.bin", "-p", "x"), "nope.bin", "does not exist")
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\x00" * 64)
    assert_user_error(smedjan("generate", "-c", bad, "-p", "x"), "bad.bin")


def test_serve_refuses_a_taken_port_and_bad_flags(trained_checkpoint):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert_user_error(smedjan("serve", "-c", trained_checkpoint, "--port", port), "cannot listen")
    assert_user_error(smedjan("serve", "-c", trained_checkpoint, "--max-batch", "0"), "--max-batch")
    assert_user_error(smedjan("serve", "-c", trained_checkpoint, "--max-body", "10"), "--max-body")
    assert_user_error(smedjan("serve", "-c", trained_checkpoint, "--port", "0", "--context", "100000"), "--context")
    for bad in ("evil.example:80", "http://evil.example", "", "a b"):
        assert_user_error(smedjan("serve", "-c", trained_checkpoint, "--allowed-host", bad), "--allowed-host")
    assert_user_error(smedjan("serve", "-c", trained_checkpoint, "--allowed-host", "chat.lan", "--api-key", "k"),
                      "--allowed-host", "--api-key")


@pytest.mark.parametrize("name,flags", [
    ("generate", ["--checkpoint", "--prompt", "--chat", "--max-new-tokens", "--temperature", "--top-k", "--top-p",
                  "--repetition-penalty", "--seed", "--stop", "--ignore-eos", "--device", "--dtype", "--threads"]),
    ("chat", ["--checkpoint", "--system", "--max-new-tokens", "--temperature", "--history-file"]),
    ("serve", ["--checkpoint", "--host", "--port", "--api-key", "--max-batch", "--max-queue", "--max-body",
               "--model-name", "--context", "--allowed-host"]),
])
def test_help_lists_every_flag_with_its_default(name, flags):
    res = smedjan(name, "--help", env={"COLUMNS": "200"})
    assert res.code == 0
    for f in flags:
        assert f in res.out, f
    assert "[default:" in res.out


def test_help_states_the_bounds_of_the_sampling_settings():
    from smedjan.infer.sampling import MAX_REPETITION_PENALTY, MIN_REPETITION_PENALTY, MIN_TEMPERATURE

    out = " ".join(smedjan("generate", "--help", env={"COLUMNS": "250"}).out.split())
    assert f"below {MIN_TEMPERATURE:g} is greedy" in out
    assert f"between {MIN_REPETITION_PENALTY:g} and {MAX_REPETITION_PENALTY:g}" in out
