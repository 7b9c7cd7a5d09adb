"""`smedjan chat` driven as a person would, through a pseudo-terminal: conversation
history, /reset, Ctrl-C to stop a reply, Ctrl-C twice and Ctrl-D to quit."""

from __future__ import annotations

import os
import platform
import pty
import re
import select
import sys
import time

import pytest

from test_serve_api import long_context_copy

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pseudo-terminal")

PROMPT = "you> "


class Terminal:
    """The chat tool on a pty: our writes are its keyboard, its output is our screen."""

    def __init__(self, *args: str):
        env = {**os.environ, "SMEDJAN_PLAIN_PROGRESS": "1", "TERM": "dumb", "COLUMNS": "200"}
        self.pid, self.fd = pty.fork()  # the child gets the pty as its controlling terminal
        if self.pid == 0:
            os.execvpe(sys.executable, [sys.executable, "-m", "smedjan_tools.cli", "chat", *args], env)
        self.buf = ""

    def expect(self, pattern: str, timeout: float = 120) -> str:
        """Read until `pattern` (a regex) appears; return everything before it and consume through it."""
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(pattern, self.buf)
            if m:
                before, self.buf = self.buf[:m.start()], self.buf[m.end():]
                return before
            left = deadline - time.monotonic()
            assert left > 0, f"timed out waiting for {pattern!r}; screen so far:\n{self.buf}"
            ready, _, _ = select.select([self.fd], [], [], min(left, 1.0))
            if ready:
                try:
                    data = os.read(self.fd, 65536)
                except OSError:  # the child exited and the pty closed
                    data = b""
                if not data:
                    raise AssertionError(f"the chat exited while waiting for {pattern!r}; screen:\n{self.buf}")
                self.buf += data.decode("utf-8", errors="replace").replace("\r\n", "\n")

    def type(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def ctrl_c_at_prompt(self) -> None:
        """Ctrl-C once the line editor is surely waiting for a key. CPython's readline loop
        notices SIGINT only while blocked in select(): one that lands just before (the
        prompt written, select not yet entered) waits for the next key press. No person
        is that fast; a test is, so it types a key, sees its echo, and waits until the
        chat's main thread sleeps in its input system call."""
        self.type("x")
        self.expect("x")
        deadline = time.monotonic() + 30
        while not self._waiting_for_input() and time.monotonic() < deadline:
            time.sleep(0.01)
        self.type("\x03")

    def _waiting_for_input(self) -> bool:
        # /proc/PID/syscall: the system call the main thread is blocked in (Linux only)
        waits = {"x86_64": {"0", "7", "23", "270", "271"}, "aarch64": {"63", "72", "73"}}.get(platform.machine())
        try:
            with open(f"/proc/{self.pid}/syscall") as f:
                call = f.read().split()[0]
        except (OSError, IndexError):
            waits = None
        if waits is None:  # cannot tell: give it a moment
            time.sleep(0.5)
            return True
        return call in waits

    def say(self, text: str) -> str:
        """Send a line and return what appears before the next prompt (the reply and notes)."""
        self.type(text + "\r")
        self.expect(re.escape(text) + "\n")  # the terminal echoes the typed line
        return self.expect(re.escape(PROMPT))

    def exit_code(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
            try:  # keep draining, so the child never blocks on a full terminal
                if select.select([self.fd], [], [], 0.2)[0]:
                    os.read(self.fd, 65536)
            except OSError:
                pass
        os.kill(self.pid, 9)
        raise AssertionError("the chat did not exit")


@pytest.fixture(scope="module")
def engine(trained_checkpoint):
    from smedjan.infer import Engine
    from smedjan.model import load_model

    model, tok, _ = load_model(trained_checkpoint)
    return Engine(model, tok), tok


def reply(engine, messages, n):
    from smedjan.chat import render
    from smedjan.infer import SamplingParams

    eng, tok = engine
    ids = render(tok, messages, add_generation_prompt=True).ids
    return eng.generate([ids], SamplingParams(temperature=0, max_new_tokens=n))[0]


def shown(r) -> str:
    """How a reply appears on the screen: its text, a newline, and a note if it was cut."""
    return r.text + "\n" + ("(reply cut at the length limit)\n" if r.finish_reason == "length" else "")


def test_a_conversation_keeps_its_history_until_reset(trained_checkpoint, engine):
    term = Terminal("--checkpoint", str(trained_checkpoint), "--temperature", "0", "--max-new-tokens", "12")
    term.expect(re.escape(PROMPT))
    first = reply(engine, [{"role": "user", "content": "Good morrow"}], 12)
    assert term.say("Good morrow") == shown(first)
    # a follow-up whose answer the history changes (a micro model often answers alike)
    for follow in ("What news?", "And then?", "Tell me more.", "Why so?", "Who art thou?"):
        history = [{"role": "user", "content": "Good morrow"}, {"role": "assistant", "content": first.text},
                   {"role": "user", "content": follow}]
        second = reply(engine, history, 12)
        if second.text != reply(engine, history[-1:], 12).text:
            break
    else:
        raise AssertionError("no follow-up's answer depends on the history")
    assert term.say(follow) == shown(second)
    assert "(conversation cleared)" in term.say("/reset")
    assert term.say("Good morrow") == shown(first)
    term.type("\x04")  # Ctrl-D at the prompt
    assert term.exit_code() == 0


def test_ctrl_c_stops_a_reply_and_twice_at_the_prompt_quits(trained_checkpoint, tmp_path):
    long = long_context_copy(trained_checkpoint, tmp_path / "long.bin", 4096)
    term = Terminal("--checkpoint", str(long), "--ignore-eos", "--max-new-tokens", "4000", "--seed", "1")
    term.expect(re.escape(PROMPT))
    term.type("Tell me a long story\r")
    term.expect("Tell me a long story\n")
    term.expect(r"\S{3}")  # the reply is streaming...
    term.type("\x03")  # ...Ctrl-C stops it, and the chat goes on
    term.expect(re.escape("(reply stopped)"))
    term.expect(re.escape(PROMPT))
    term.ctrl_c_at_prompt()  # once at the prompt: a hint, not an exit
    term.expect(re.escape("(Ctrl-C again or Ctrl-D to quit)"))
    term.expect(re.escape(PROMPT))
    assert "(conversation cleared)" in term.say("/reset")  # still alive and answering
    term.ctrl_c_at_prompt()
    term.expect(re.escape(PROMPT))
    term.ctrl_c_at_prompt()
    assert term.exit_code() == 0


def test_exit_command_and_a_bad_checkpoint(trained_checkpoint, tmp_path):
    from helpers import assert_user_error, smedjan

    term = Terminal("--checkpoint", str(trained_checkpoint))
    term.expect(re.escape(PROMPT))
    term.type("/exit\r")
    assert term.exit_code() == 0
    assert_user_error(smedjan("chat", "--checkpoint", tmp_path / "missing.bin"), "missing.bin")
    assert_user_error(smedjan("chat", "--checkpoint", trained_checkpoint, "--top-p", "0"), "top-p")
