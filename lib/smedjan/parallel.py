"""Worker processes that a signal, a crash or a kill can never wedge.

`ordered_map(fn, jobs, processes)` computes fn(job) in worker processes and yields the
results in job order, like `Pool.imap`, with at most 2 jobs per worker in flight.

Why not `multiprocessing.Pool`: its workers share two queues guarded by cross-process
locks. A worker that dies while it holds one (SIGTERM to the process group arrives while
it sends a result, or the OOM killer) leaves the lock taken for ever, and the parent's
`terminate()` then waits on it for ever; a worker that dies mid-job is silently
replaced and the parent waits for ever on the lost result. Here each worker has its own
two pipes and nothing is shared: the parent sends a job only to an idle worker (so no
two processes ever block writing to each other), waits on the result pipes of the busy
ones, and sees a dead worker as end-of-file at once. On the way out (normal end,
exception, Ctrl-C, SIGTERM) the parent kills and reaps every worker with signals
blocked, so a second signal cannot interrupt the cleanup; a worker whose parent was
SIGKILLed sees end-of-file on its job pipe (and, on Linux, gets SIGKILL from the kernel).

Workers start with SIGINT ignored (Ctrl-C reaches the whole process group: the parent
decides) and SIGTERM at its default action. A worker killed by a signal makes the
parent raise what that signal means to a tool: KeyboardInterrupt for SIGINT,
`Terminated` for SIGTERM, a one-line UserError otherwise (SIGKILL: out of memory?).

    for counts in ordered_map(count_job, jobs(), processes=2, initializer=init, initargs=(pattern,)):
        total.update(counts)
"""

from __future__ import annotations

import multiprocessing as mp
import signal
import sys
import traceback
from collections import deque
from multiprocessing.connection import wait
from typing import Any, Callable, Iterable, Iterator

from smedjan.errors import UserError

_SIGNALS = {signal.SIGINT, signal.SIGTERM}
IN_FLIGHT_PER_WORKER = 2  # jobs handed out or finished-but-not-yet-yielded, per worker


def fork_context():
    """fork on Linux (workers inherit ready state, no `__main__` guard needed); spawn
    elsewhere, where fork is unsafe with system frameworks."""
    return mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")


def _die_with_parent() -> None:
    # Linux: the kernel SIGKILLs this worker when the parent dies, even if the parent was
    # SIGKILLed before it could reap us. Elsewhere end-of-file on the job pipe suffices.
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):  # no prctl here: end-of-file on the job pipe still ends us
        pass


class _RemoteError(Exception):
    """A bug in a worker: carries the worker's traceback text."""


def _worker_main(fn: Callable, initializer: Callable | None, initargs: tuple, jobs, results, inherited) -> None:
    for conn in inherited:  # the parent's ends of every pipe, inherited by fork: keep none
        conn.close()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        signal.set_wakeup_fd(-1)  # a forked worker must not wake the parent's signal watcher
    except ValueError:
        pass
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
    _die_with_parent()
    init_error = None
    try:
        if initializer is not None:
            initializer(*initargs)
    except Exception as e:  # reported with the first job's result
        init_error = e
    while True:
        try:
            job = jobs.recv()
        except (EOFError, OSError):  # the parent closed the pipe or died
            return
        try:
            if init_error is not None:
                raise init_error
            reply: tuple = ("ok", fn(job))
        except UserError as e:
            reply = ("user", str(e))
        except Exception:
            reply = ("bug", traceback.format_exc())
        try:
            results.send(reply)
        except (BrokenPipeError, OSError):
            return
        except Exception:  # the result would not pickle: a bug
            results.send(("bug", traceback.format_exc()))


class _Worker:
    def __init__(self, ctx, fn, initializer, initargs, inherited: list):
        job_r, self.jobs = ctx.Pipe(duplex=False)
        self.results, res_w = ctx.Pipe(duplex=False)
        fork = ctx.get_start_method() == "fork"
        # Under fork the child inherits every open descriptor: it closes the parent's ends
        # of its own pipes and of the workers made before it, so each pipe has exactly one
        # writer and end-of-file means what it should.
        close = [*inherited, self.jobs, self.results] if fork else []
        self.proc = ctx.Process(target=_worker_main, args=(fn, initializer, initargs, job_r, res_w, close),
                                daemon=True, name="smedjan-worker")
        self.proc.start()
        job_r.close()
        res_w.close()
        self.job_index: int | None = None

    def death(self) -> BaseException:
        """The exception that a dead worker's exit means to the parent."""
        self.proc.join(timeout=5)
        code = self.proc.exitcode
        if code is not None and code < 0:
            sig = -code
            if sig == signal.SIGINT:
                return KeyboardInterrupt()
            if sig == signal.SIGTERM:
                from smedjan.cli import Terminated

                return Terminated()
            name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else f"signal {sig}"
            hint = " (out of memory? try fewer --workers)" if sig == signal.SIGKILL else ""
            return UserError(f"a worker process was killed by {name}{hint}")
        return _RemoteError(f"a worker process exited unexpectedly (exit status {code})")

    def close(self, kill: bool) -> None:
        for conn in (self.jobs, self.results):
            conn.close()
        if not kill:
            self.proc.join(timeout=5)  # it sees end-of-file and returns
        if self.proc.exitcode is None:
            self.proc.kill()
        self.proc.join()


def ordered_map(fn: Callable[[Any], Any], jobs: Iterable, processes: int, initializer: Callable | None = None,
                initargs: tuple = ()) -> Iterator:
    """Yield fn(job) for every job, in job order, computed by `processes` worker processes.

    `fn` and `initializer` run in the workers (module-level functions, so that spawn can
    find them). An exception in a worker is raised in the parent: a UserError as itself,
    anything else as an error carrying the worker's traceback, in job order (the earliest
    failing job's, as a serial loop would raise). The jobs iterator runs in
    the parent, between results, so reading input overlaps encoding.
    """
    ctx = fork_context()
    workers: list[_Worker] = []
    ok = False
    # Signals wait while the workers are made: a pool never exists half-built.
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        for _ in range(processes):
            inherited = [c for w in workers for c in (w.jobs, w.results)]
            workers.append(_Worker(ctx, fn, initializer, initargs, inherited))
    except BaseException:
        for w in workers:
            w.close(kill=True)
        raise
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    try:
        idle = deque(workers)
        busy: dict[Any, _Worker] = {}  # result pipe -> worker
        done: dict[int, Any] = {}  # finished results waiting for their turn
        limit = IN_FLIGHT_PER_WORKER * processes
        it = iter(jobs)
        exhausted = False
        submitted = yielded = 0
        while True:
            while idle and not exhausted and submitted - yielded < limit:
                try:
                    job = next(it)
                except StopIteration:
                    exhausted = True
                    break
                w = idle.popleft()
                w.job_index = submitted
                w.jobs.send(job)  # the worker is idle in its read: this never blocks for long
                busy[w.results] = w
                submitted += 1
            if yielded in done:
                status, value = done.pop(yielded)
                yielded += 1
                # A job's error is raised in its turn, as its result would have been: the
                # earliest failing job's error, whichever worker finished first.
                if status == "user":
                    raise UserError(value)
                if status == "bug":
                    raise _RemoteError(f"in a worker process:\n{value}")
                yield value
                continue
            if not busy:
                assert exhausted and yielded == submitted
                break
            for conn in wait(list(busy)):
                w = busy.pop(conn)
                try:
                    status, value = conn.recv()
                except (EOFError, OSError):
                    raise w.death() from None
                done[w.job_index] = (status, value)
                idle.append(w)
        ok = True
    finally:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            for w in workers:
                w.close(kill=not ok)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
