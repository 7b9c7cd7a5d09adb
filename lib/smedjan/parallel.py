"""Process pools that stop cleanly on Ctrl-C and SIGTERM.

`worker_pool` forks (on Linux; spawns elsewhere) with SIGINT and SIGTERM blocked, so a
signal can never land while the pool is half-built, which would leave orphaned workers
holding the parent's pipes open. Workers get the default actions back (the parent owns
cleanup: it terminates them on the way out); the parent's pending signal is delivered
as soon as the pool exists and its `with` block guarantees termination.

    with worker_pool(2, init_fn, (arg,)) as pool:
        for result in pool.imap(job_fn, jobs):
            ...
"""

from __future__ import annotations

import multiprocessing as mp
import signal
import sys
from contextlib import contextmanager
from typing import Callable, Iterator

_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _worker_init(initializer: Callable | None, initargs: tuple) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the whole group: the parent handles it
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
    try:
        signal.set_wakeup_fd(-1)  # a forked worker must not wake the parent's signal watcher
    except ValueError:  # not the main thread: nothing was inherited to undo
        pass
    if initializer is not None:
        initializer(*initargs)


def fork_context():
    """fork on Linux (workers inherit ready state, no `__main__` guard needed); spawn
    elsewhere, where fork is unsafe with system frameworks."""
    return mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")


@contextmanager
def worker_pool(processes: int, initializer: Callable | None = None, initargs: tuple = ()) -> Iterator:
    ctx = fork_context()
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        pool = ctx.Pool(processes, initializer=_worker_init, initargs=(initializer, initargs))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)  # a pending signal fires here, pool assigned
    with pool:
        yield pool
