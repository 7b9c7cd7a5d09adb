"""One model, many callers: a background thread that owns the engine, admits queued
requests into free batch rows and steps all running ones together.

The engine is not thread-safe, so only the worker thread touches it. Callers `submit`
a `Request` from any thread and receive `(request, Delta)` pairs (or
`(request, Exception)`) through the request's `deliver` callback, called on the worker
thread: it must only hand the item over (a server passes
`loop.call_soon_threadsafe`). `cancel` may be called from any thread at any time: a
queued request is dropped at once, a running one loses its row before the next step.

One request's failure never ends another's: a sequence whose sampling raises is failed
alone by the engine, and requests admitted together whose joint prefill raises are
retried one by one, so only the one that fails alone gets the error. Only a failure of
a whole decode step (the device) fails every request in it.

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
                self._admit(admit)
            if engine.active:
                self._run(engine.step, [self._running[s.id] for s in engine.active if s.id in self._running])
        # shutting down: whoever is still waiting gets an error rather than silence
        with self._cond:
            leftovers = list(self._queue) + list(self._running.values())
            self._queue.clear()
            self._running.clear()
        for req in leftovers:
            self._send(req, RuntimeError("the server is shutting down"))

    def _admit(self, admit: list[Request]) -> None:
        """Prefill the admitted requests together; if that raises before any of them took
        a row, prefill each alone, so a prompt that fails (or runs out of memory) fails alone."""
        engine = self.engine
        if len(admit) == 1:
            self._run(functools.partial(engine.add, [admit[0].seq]), admit)
            return
        try:
            results = engine.add([r.seq for r in admit])
        except Exception as e:
            if any(r.seq in engine.active for r in admit):  # it failed after some took rows: no retry
                self._fail_all(admit, e)
            else:
                for r in admit:
                    self._run(functools.partial(engine.add, [r.seq]), [r])
            return
        self._route(results)

    def _run(self, work: Callable[[], list], involved: list[Request]) -> None:
        """Run an engine call and route its results; if the call itself raises, every
        request it involved fails (a single sequence's failure comes back in the results)."""
        try:
            results = work()
        except Exception as e:  # a bug or a device error: fail these requests, keep serving
            self._fail_all(involved, e)
            return
        self._route(results)

    def _route(self, results: list) -> None:
        for seq, item in results:
            req = seq.tag
            if isinstance(item, Exception):
                traceback.print_exception(item, file=sys.stderr)  # a bug or a broken model: show the operator
                self._fail(req, item)
                continue
            if item.finish_reason is not None:
                with self._cond:
                    self._running.pop(seq.id, None)
                    req.done = True
                    self.served += 1
            self._send(req, item)

    def _fail_all(self, involved: list[Request], e: Exception) -> None:
        traceback.print_exception(e, file=sys.stderr)
        for req in involved:
            if req.seq in self.engine.active:
                self.engine.cancel(req.seq)
            self._fail(req, e)

    def _fail(self, req: Request, e: Exception) -> None:
        with self._cond:
            self._running.pop(req.seq.id, None)
            req.done = True
            self.failed += 1
        self._send(req, e)

    @staticmethod
    def _send(req: Request, item: Delta | Exception) -> None:
        try:
            req.deliver(req, item)
        except Exception:  # the receiver is gone (closed event loop): nothing to tell
            pass
