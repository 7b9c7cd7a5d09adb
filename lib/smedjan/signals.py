"""Make Ctrl-C and SIGTERM reach the main thread, whichever thread the kernel picks.

A process-directed signal may be taken by any thread that does not block it, and the
native libraries start such threads behind our back (OpenBLAS when numpy is imported,
OpenMP when PyTorch first runs in parallel, Arrow's I/O pool). CPython's C handler then
runs on that thread: it only marks the signal as tripped, and the Python handler (the
`KeyboardInterrupt`) waits until the main thread next runs bytecode. A main thread that
sits in a blocking read on a FIFO or stdin never does, and Ctrl-C seems ignored.

`route_signals_to_main_thread()` closes that gap. CPython writes each caught signal's
number to the wakeup fd from whichever thread caught it; a small watcher thread (born
with every signal blocked) reads it and pokes the main thread with a thread-directed
SIGURG whose handler does nothing. That interrupts the main thread's system call with
EINTR, and CPython runs the pending handlers before it retries (PEP 475): the read
raises `KeyboardInterrupt` as it would have had the main thread caught the signal.

    from smedjan.signals import route_signals_to_main_thread
    route_signals_to_main_thread()  # from the main thread, once a tool starts
"""

from __future__ import annotations

import os
import signal
import threading

__all__ = ["route_signals_to_main_thread"]

# Signals worth waking the main thread for: the ones a tool turns into exceptions.
_FORWARD = {int(signal.SIGINT), int(signal.SIGTERM)}
# The poke: ignored by default, so nothing else in a CLI process uses it (Go runtimes
# use it for preemption, but none lives in ours).
_POKE = getattr(signal, "SIGURG", None)

_pipe: tuple[int, int] | None = None


def _ignore(signum, frame) -> None:
    pass  # its only job is to interrupt the main thread's system call


def _watch(read_fd: int, main_ident: int) -> None:
    while True:
        try:
            data = os.read(read_fd, 64)  # EINTR is retried by CPython (PEP 475)
        except OSError:
            return
        if not data:
            return
        if any(b in _FORWARD for b in data):
            try:
                signal.pthread_kill(main_ident, _POKE)
            except OSError:  # the main thread has exited
                return


def route_signals_to_main_thread() -> bool:
    """Install the watcher (once per process) and point the wakeup fd at it. False where
    that cannot be done: not the main thread, no POSIX threads, or the wakeup fd already
    belongs to someone else (an asyncio loop handles signals its own way)."""
    global _pipe
    if _POKE is None or not hasattr(signal, "pthread_kill"):
        return False
    if threading.current_thread() is not threading.main_thread():
        return False
    if _pipe is None:
        if signal.getsignal(_POKE) not in (signal.SIG_DFL, signal.SIG_IGN, None):
            return False  # someone else's handler: leave the signal theirs
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)  # the wakeup fd must never block a handler
        watcher = threading.Thread(target=_watch, args=(read_fd, threading.get_ident()),
                                   name="smedjan-signals", daemon=True)
        # the watcher inherits this mask: it never takes a signal itself
        old = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        try:
            watcher.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        signal.signal(_POKE, _ignore)
        _pipe = (read_fd, write_fd)
    previous = signal.set_wakeup_fd(_pipe[1], warn_on_full_buffer=False)
    if previous not in (-1, _pipe[1]):
        signal.set_wakeup_fd(previous, warn_on_full_buffer=False)  # not ours to take
        return False
    return True
