"""encode / decode / tokenizer-info / --help from the command line."""

from __future__ import annotations

import json

import pytest

from helpers import assert_user_error, smedjan
from smedjan_tools.cli import COMMANDS


def test_encode_decode_pipe(tokenizer_path, tokenizer):
    text = "To be, or not to be: that is the question. 日本語 😀"
    res = smedjan("encode", "-t", tokenizer_path, text)
    assert res.code == 0, res
    ids = [int(x) for x in res.out.split()]
    assert ids == tokenizer.encode(text)
    res = smedjan("decode", "-t", tokenizer_path, input=res.out)
    assert res.code == 0 and res.out == text
    res = smedjan("encode", "-t", tokenizer_path, "--bos", "--json", text)
    assert json.loads(res.out) == [tokenizer.bos_id] + ids


def test_decode_errors(tokenizer_path):
    assert_user_error(smedjan("decode", "-t", tokenizer_path, "1", "x2"), "integers")
    assert_user_error(smedjan("decode", "-t", tokenizer_path, "999999"), "out of range")


def test_tokenizer_info_measures_compression(tokenizer_path, tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("the theory of the thing " * 100)
    res = smedjan("tokenizer-info", tokenizer_path, "--input", f, "--json")
    assert res.code == 0, res
    info = json.loads(res.out)
    assert info["vocab_size"] == 2048 and info["llama_cpp_pre"] == "llama-bpe"
    assert info["text_bytes"] == 2400 and info["bytes_per_token"] > 2


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_tool_has_help_with_defaults(name):
    res = smedjan(name, "--help")
    assert res.code == 0, res
    assert "Usage" in res.out


def test_umbrella_lists_tools():
    res = smedjan("--help")
    assert res.code == 0
    for name in COMMANDS:
        assert name in res.out


def test_sigterm_leaves_no_temporary_file(tmp_path, tokenizer_path, shared_data):
    """A tool killed by SIGTERM while it streams its output to a temporary file unwinds:
    exit 143, no output, no temporary file, no worker tracebacks."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "train.bin"
    proc = subprocess.Popen([sys.executable, "-m", "smedjan_tools.cli", "prepare", "-i", shared_data / "pretrain", "-i", shared_data / "pretrain", "-i", shared_data / "eval",
                             "-t", tokenizer_path, "--workers", "2", "-o", out],
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    deadline = time.time() + 60
    while not list(tmp_path.glob(".train.bin.*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert list(tmp_path.glob(".train.bin.*")), "prepare never started writing"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "terminated" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("delay", [0.4, 0.7, 1.0])
def test_sigterm_at_any_moment_leaves_no_orphan_workers(tmp_path, tokenizer_path, shared_data, delay):
    """SIGTERM while the worker pool is being built must not orphan workers: they would
    keep our stderr pipe open (communicate() would hang) and burn CPU forever."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "train.bin"
    proc = subprocess.Popen([sys.executable, "-m", "smedjan_tools.cli", "prepare", "-i", shared_data / "pretrain",
                             "-t", tokenizer_path, "--workers", "2", "-o", out],
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    time.sleep(delay)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)  # hangs if an orphan holds the pipe
    # -15: the signal came during interpreter start-up, before the tool ran (nothing to clean)
    assert proc.returncode in (143, 0, -signal.SIGTERM), err
    assert "Traceback" not in err
    assert not list(tmp_path.glob(".train.bin.*"))
