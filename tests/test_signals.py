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
    main_tid = threading.get_native_id()
    def catch():
        # signal only once the main thread sleeps in the read (Linux shows it in wchan):
        # a signal that came earlier would be handled at the next bytecode anyway
        for _ in range(600):
            time.sleep(0.05)
            try:
                if "pipe" in open(f"/proc/self/task/{main_tid}/wchan").read():
                    break
            except OSError:  # no /proc: give the main thread time to get there
                time.sleep(1)
                break
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)
        os.write(1, b"sent\\n")  # one write each: the two threads' lines never interleave
    try:
        threading.Thread(target=catch, daemon=True).start()
        os.read(r, 1)
    except KeyboardInterrupt:
        os.write(1, b"interrupted\\n")
        sys.exit(130)
    os.write(1, b"read returned\\n")
""")


def run(script: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)


def test_signal_caught_off_the_main_thread_interrupts_its_read():
    res = run(SCRIPT)
    lines = res.stdout.split()  # "sent" may come before or after "interrupted", or not at all
    assert (res.returncode, lines[:1], "interrupted" in lines) == (130, ["True"], True), res.stderr


def test_without_routing_the_read_would_hang():
    """The control: without the router the main thread is still blocked 3 s after the
    helper took the signal, so the test above really exercises the watcher."""
    script = SCRIPT.replace("print(route_signals_to_main_thread(), flush=True)", "print(True, flush=True)")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert [proc.stdout.readline().strip() for _ in range(2)] == ["True", "sent"]
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=3)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


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
