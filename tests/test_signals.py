"""Ctrl-C caught by a helper thread still ends a blocking read in the main thread."""

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and threads")

# The main thread waits on a pipe nobody writes to; a helper thread takes SIGINT itself
# (thread-directed, so the kernel cannot choose the main thread instead), just as
# OpenBLAS's or OpenMP's threads may take a Ctrl-C meant for the process.
SCRIPT = textwrap.dedent("""
    import os, signal, sys, threading, time
    from smedjan.signals import route_signals_to_main_thread
    print(route_signals_to_main_thread(), flush=True)
    r, w = os.pipe()
    def catch():
        time.sleep(0.3)
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)
    threading.Thread(target=catch, daemon=True).start()
    try:
        os.read(r, 1)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        sys.exit(130)
    print("read returned", flush=True)
""")


def run(script: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)


def test_signal_caught_off_the_main_thread_interrupts_its_read():
    res = run(SCRIPT)
    assert (res.returncode, res.stdout.split()) == (130, ["True", "interrupted"]), res.stderr


def test_without_routing_the_read_would_hang():
    """The control: the same script minus the router is still blocked after 3 seconds,
    so the test above really exercises the watcher."""
    script = SCRIPT.replace("print(route_signals_to_main_thread(), flush=True)", "print(True, flush=True)")
    with pytest.raises(subprocess.TimeoutExpired):
        subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=3)


def test_router_declines_off_the_main_thread():
    script = textwrap.dedent("""
        import threading
        from smedjan.signals import route_signals_to_main_thread
        out = []
        t = threading.Thread(target=lambda: out.append(route_signals_to_main_thread()))
        t.start(); t.join()
        print(out[0])
    """)
    res = run(script)
    assert res.stdout.strip() == "False", res.stderr


def test_router_leaves_an_existing_wakeup_fd_alone():
    """An asyncio loop owns the wakeup fd while it handles signals: keep out of its way."""
    script = textwrap.dedent("""
        import os, signal
        from smedjan.signals import route_signals_to_main_thread
        r, w = os.pipe(); os.set_blocking(w, False)
        signal.set_wakeup_fd(w)
        print(route_signals_to_main_thread(), signal.set_wakeup_fd(-1) == w)
    """)
    res = run(script)
    assert res.stdout.split() == ["False", "True"], res.stderr
