"""smedjan.parallel.ordered_map: results in order, errors carried over, and no hang and no
worker left behind when a worker dies (issue 20 item 2: multiprocessing.Pool waited for
ever on a worker killed mid-job or while it held a queue lock)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from smedjan.errors import UserError
from smedjan.parallel import ordered_map

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


def _square_after(job):
    import time

    n, delay = job
    time.sleep(delay)
    return n * n


def _fail(job):
    if job == 3:
        raise UserError(f"job {job} is bad")
    if job == 5:
        raise KeyError("a bug")
    return job


_init_value = None


def _init(v):
    global _init_value
    _init_value = v


def _with_init(job):
    return (_init_value, job)


def test_results_come_in_job_order_whatever_finishes_first():
    # early jobs are the slow ones: later results must wait for their turn
    jobs = [(i, 0.05 if i % 3 == 0 else 0.0) for i in range(20)]
    assert list(ordered_map(_square_after, jobs, 3)) == [i * i for i in range(20)]
    assert list(ordered_map(_with_init, range(4), 2, _init, ("x",))) == [("x", i) for i in range(4)]
    assert list(ordered_map(_square_after, [], 2)) == []


def test_user_error_in_a_worker_is_a_user_error_and_a_bug_keeps_its_traceback():
    with pytest.raises(UserError, match="job 3 is bad"):
        list(ordered_map(_fail, range(10), 2))
    with pytest.raises(Exception, match="KeyError: 'a bug'") as info:
        list(ordered_map(_fail, [0, 5], 2))
    assert not isinstance(info.value, UserError)
    assert "Traceback" in str(info.value)


# A worker that dies mid-job. The old pool replaced it silently and waited for ever on
# the lost result; the subprocess and its timeout keep a regression from hanging the suite.
DIE = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    from smedjan.data.prepare import encode_jobs

    class Tok:
        bos_id = 0
        def encode_numpy(self, text):
            if text == "die":
                os.kill(os.getpid(), getattr(signal, sys.argv[1]))
            return np.frombuffer(text.encode(), np.uint8).astype(np.uint32)

    jobs = [[("ab", True, 0)], [("die", True, 0)]] + [[("x" * 10, True, 0)]] * 20
    try:
        n = sum(1 for _ in encode_jobs(iter(jobs), Tok(), np.dtype("<u2"), 2))
        print("finished", n)
    except BaseException as e:
        print("raised", type(e).__name__, e)
    try:
        os.waitpid(-1, os.WNOHANG)
        print("a worker is left")
    except ChildProcessError:
        print("no worker left")
""")


@pytest.mark.parametrize("sig, raised", [
    ("SIGKILL", "UserError a worker process was killed by SIGKILL"),
    ("SIGTERM", "Terminated"),
    ("SIGSEGV", "UserError a worker process was killed by SIGSEGV"),
])
def test_a_worker_killed_mid_job_stops_the_parent_at_once_and_leaves_no_worker(sig, raised):
    proc = subprocess.run([sys.executable, "-c", DIE, sig], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"raised {raised}"), proc.stdout
    assert lines[1] == "no worker left", proc.stdout
