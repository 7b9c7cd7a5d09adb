"""One model, many callers: a background thread that owns the engine, admits queued
requests into free batch rows and steps all running ones together.

The engine is not thread-safe, so only the worker thread touches it. Callers `submit`
a `Request` from any thread and receive `(request, Delta)` pairs (or
`(request, Exception)`) through the request's `deliver` callback, called on the worker
thread: it must only hand the item over (a server passes
`loop.call_soon_threadsafe`). `cancel` may be called from any thread at any time: a
queued request is dropped at once, a running one loses its row before the next step.

    worker = Worker(engine).start()
    req = Request(prompt_ids, SamplingParams(temperature=0), deliver=print)
    worker.submit(req)
    ...
    worker.cancel(req)          # e.g. the HTTP client went away
    worker.stop()
"""

from __future__ import annotations

import collections
import functools
import sys
import threading
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

from smedjan.infer.engine import Delta, Engine, Sequence
from smedjan.infer.sampling import SamplingParams


class QueueFull(RuntimeError):
    """More requests are waiting than the worker accepts."""


@dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    deliver: Callable[["Request", Any], None]  # called with a Delta or an Exception, on the worker thread
    tag: Any = None  # the caller's own data (e.g. the choice index)
    seq: Sequence | None = field(default=None, repr=False)
    done: bool = False


class Worker:
    def __init__(self, engine: Engine, max_queue: int = 256):
        self.engine = engine
        self.max_queue = max_queue
        self._cond = threading.Condition()
        self._queue: collections.deque[Request] = collections.deque()
        self._cancel: list[Request] = []
        self._running: dict[int, Request] = {}  # seq.id -> request, for requests holding a row
        self._stop = False
        self._thread: threading.Thread | None = None
        self.served = 0  # requests that finished normally
        self.cancelled = 0  # requests cancelled while queued or running
        self.failed = 0

    # ------------------------------------------------------------ any thread
    def start(self) -> "Worker":
        self._thread = threading.Thread(target=self._loop, name="smedjan-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, req: Request) -> None:
        req.seq = Sequence(req.prompt_ids, req.params, tag=req)
        with self._cond:
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are already waiting")
            self._queue.append(req)
            self._cond.notify_all()

    def cancel(self, req: Request) -> None:
        with self._cond:
            if req.done:
                return
            if req in self._queue:
                self._queue.remove(req)
                req.done = True
                self.cancelled += 1
                return
            self._cancel.append(req)
            self._cond.notify_all()

    def stats(self) -> dict:
        with self._cond:
            return {"active": len(self._running), "queued": len(self._queue), "slots": self.engine.max_batch,
                    "served": self.served, "cancelled": self.cancelled, "failed": self.failed}

    # ---------------------------------------------------------- worker thread
    def _loop(self) -> None:
        engine = self.engine
        while True:
            with self._cond:
                while not self._stop and not self._queue and not self._cancel and not self._running:
                    self._cond.wait()
                if self._stop:
                    break
                cancels, self._cancel = self._cancel, []
                for req in cancels:
                    if not req.done and req.seq in engine.active:
                        engine.cancel(req.seq)
                        self._running.pop(req.seq.id, None)
                        req.done = True
                        self.cancelled += 1
                admit = []
                while self._queue and len(admit) < engine.free_slots:
                    admit.append(self._queue.popleft())
                for req in admit:
                    self._running[req.seq.id] = req
            if admit:
                self._run(functools.partial(engine.add, [r.seq for r in admit]), admit)
            if engine.active:
                self._run(engine.step, [self._running[s.id] for s in engine.active if s.id in self._running])
        # shutting down: whoever is still waiting gets an error rather than silence
        with self._cond:
            leftovers = list(self._queue) + list(self._running.values())
            self._queue.clear()
            self._running.clear()
        for req in leftovers:
            self._send(req, RuntimeError("the server is shutting down"))

    def _run(self, work: Callable[[], list], involved: list[Request]) -> None:
        """Run an engine call and route its deltas; a failure ends every request it involved."""
        try:
            results = work()
        except Exception as e:  # a bug or a device error: fail these requests, keep serving
            traceback.print_exc(file=sys.stderr)
            for req in involved:
                if req.seq in self.engine.active:
                    self.engine.cancel(req.seq)
                with self._cond:
                    self._running.pop(req.seq.id, None)
                    req.done = True
                    self.failed += 1
                self._send(req, e)
            return
        for seq, delta in results:
            req = seq.tag
            if delta.finish_reason is not None:
                with self._cond:
                    self._running.pop(seq.id, None)
                    req.done = True
                    self.served += 1
            self._send(req, delta)

    @staticmethod
    def _send(req: Request, item: Delta | Exception) -> None:
        try:
            req.deliver(req, item)
        except Exception:  # the receiver is gone (closed event loop): nothing to tell
            pass
