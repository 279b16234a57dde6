"""The pool's shared state: idle workers, waiting callers, counters, under one lock.

Goals: the checkout and return of a worker cost one uncontended lock and no thread handoff;
a caller that waits is handed a worker directly by whoever returns one (FIFO), whether it
waits in a thread or in an asyncio task.

Plan: ``PoolCore`` holds the lists; callers ``take`` a worker or enqueue a ``Waiter``;
``give_back`` hands it to the first waiter still waiting, else to the idle list; ``retire``
marks a worker dead and wakes the supervisor, which reaps it and starts a replacement.

Weak spots: a waiter that gives up at the moment it is handed a worker is resolved under the
lock: the worker is either taken or passed on, never lost.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import Callable

from ._errors import Error, Overloaded, PoolClosed, WorkerStartError
from ._process import WorkerProcess, WorkerState
from ._status import PoolStats, SandboxStatus


class Waiter:
    """A caller waiting for a worker.

    ``frame`` is the caller's encoded request: whoever hands the waiter a worker writes it
    to the worker *before* waking the waiter, so the worker starts evaluating without waiting
    for the waiter's thread or task to be scheduled (tens of microseconds per call under
    load). ``written`` says how much of it went out; the caller writes the rest.
    """

    def __init__(self, frame: bytes | None = None) -> None:
        self.worker: WorkerProcess | None = None
        self.error: Error | None = None
        self.frame = frame
        self.written = 0

    def wake(self) -> bool:
        """Tell the caller its worker (or error) is there; False if nobody can be told."""
        raise NotImplementedError

    def fail(self, error: Error) -> None:
        self.error = error
        self.wake()


class ThreadWaiter(Waiter):
    def __init__(self, frame: bytes | None = None) -> None:
        super().__init__(frame)
        self._signal = threading.Lock()
        self._signal.acquire()

    def wake(self) -> bool:
        self._signal.release()
        return True

    def wait(self, timeout: float | None) -> bool:
        if timeout is None:
            return self._signal.acquire()
        return self._signal.acquire(timeout=max(timeout, 0.0))


class AsyncWaiter(Waiter):
    def __init__(self, loop: asyncio.AbstractEventLoop, frame: bytes | None = None) -> None:
        super().__init__(frame)
        self.loop = loop
        self.future: asyncio.Future[None] = loop.create_future()

    def _set(self) -> None:
        if not self.future.done():
            self.future.set_result(None)

    def wake(self) -> bool:
        try:
            self.loop.call_soon_threadsafe(self._set)
        except RuntimeError:  # its event loop is closed: nobody will take the worker
            return False
        return True


class PoolCore:
    def __init__(
        self, size: int, spares: int, queue_limit: int, wake_supervisor: Callable[[], None]
    ) -> None:
        self.size = size
        self.spares = spares
        self.queue_limit = queue_limit
        self.lock = threading.Lock()
        self.idle: list[WorkerProcess] = []
        self.waiters: collections.deque[Waiter] = collections.deque()
        self.workers: set[WorkerProcess] = set()
        self.retired: list[WorkerProcess] = []
        self.closed = False
        self.terminated = False
        self.in_flight = 0
        self.supervisor_stopped = False
        self.fatal: Error | None = None  # no worker can ever start (e.g. sandbox policy)
        self.start_failure: str = ""  # the last start-up failure while it is unresolved
        self.sandbox: SandboxStatus | None = None
        self.evaluations = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.timeouts = 0
        self.crashes = 0
        self.respawns = 0
        self.start_failures = 0
        self._wake_supervisor = wake_supervisor

    # -- callers -------------------------------------------------------------------------

    def take_idle(self) -> WorkerProcess | None:
        """An idle worker, or None (the common case is cheap: no waiter is built)."""
        with self.lock:
            return self._pop_idle_locked()

    def _pop_idle_locked(self) -> WorkerProcess | None:
        if not self.idle:
            return None
        worker = self.idle.pop()
        worker.state = WorkerState.BUSY
        return worker

    def take_or_wait(self, waiter: Waiter) -> WorkerProcess | None:
        """A worker at once, or None after enqueuing ``waiter``. Raises if it cannot wait."""
        with self.lock:
            worker = self._pop_idle_locked()
            if worker is not None:
                return worker
            self._raise_if_hopeless()
            if len(self.waiters) >= self.queue_limit:
                raise Overloaded(
                    f"all {self.size} workers are busy and {len(self.waiters)} calls are "
                    f"already waiting (queue_limit={self.queue_limit})"
                )
            self.waiters.append(waiter)
            return None

    def _raise_if_hopeless(self) -> None:
        if self.closed and self.terminated:
            raise PoolClosed("the pool was terminated")
        if self.fatal is not None:
            raise self.fatal
        if self.start_failure and not self.active():
            raise WorkerStartError(
                f"no worker is running: workers fail to start ({self.start_failure})",
                cause=self.start_failure,
            )

    def abandon(self, waiter: Waiter) -> WorkerProcess | None:
        """The waiter gives up; returns the worker it was handed meanwhile, if any (then
        the hand-over is under way and the waiter must still wait for its wake-up, which
        comes right after its request is written)."""
        with self.lock:
            if waiter.worker is None:
                try:
                    self.waiters.remove(waiter)
                except ValueError:
                    pass
            return waiter.worker

    def give_back(self, worker: WorkerProcess) -> None:
        """A caller is done with ``worker``: straight to the next waiter (its request
        written first, outside the lock), else to the idle list."""
        with self.lock:
            if worker.state is WorkerState.DEAD:
                return
            # It answered, then died; or the supervisor has stopped (terminate() while this
            # call ran) and nobody but us would close it.
            dying = worker.state is WorkerState.DYING or self.supervisor_stopped
            waiter = None if dying or not self.waiters else self.waiters.popleft()
            if waiter is not None:
                waiter.worker = worker
                worker.state = WorkerState.BUSY
            elif not dying:
                worker.state = WorkerState.IDLE
                self.idle.append(worker)
                return
        if waiter is None:
            self.retire(worker)
            return
        if waiter.frame is not None:
            waiter.written = worker.send(waiter.frame) or 0
        if not waiter.wake():
            worker.kill()  # its request may be in the pipe: nobody will read the answer
            self.retire(worker)

    def _hand_out_locked(self, worker: WorkerProcess) -> None:
        """Under the lock: to the first caller still waiting, else to the idle list. The
        caller writes its own request (start-up and promotion paths, not the hot one)."""
        while self.waiters:
            waiter = self.waiters.popleft()
            waiter.worker = worker
            if waiter.wake():
                worker.state = WorkerState.BUSY
                return
            waiter.worker = None
        worker.state = WorkerState.IDLE
        self.idle.append(worker)

    def active(self) -> int:
        """Workers serving calls (idle or busy); spares and starting ones not counted."""
        return sum(w.state in (WorkerState.IDLE, WorkerState.BUSY) for w in self.workers)

    def accept(self, worker: WorkerProcess) -> None:
        """A worker said hello: serve with it, or hold it back as a spare."""
        with self.lock:
            if self.active() < self.size:
                self._hand_out_locked(worker)
            else:
                worker.state = WorkerState.SPARE

    def retire(self, worker: WorkerProcess) -> None:
        """Take a worker out of service; the supervisor reaps it and starts another. After
        the supervisor has stopped (a call still running at ``terminate()``), the caller
        closes the worker itself: nobody else would."""
        with self.lock:
            self._retire_locked(worker)
            orphaned = self.supervisor_stopped
            if orphaned:
                self.retired.remove(worker)
        if orphaned:
            worker.close()
        else:
            self._wake_supervisor()

    def _retire_locked(self, worker: WorkerProcess) -> None:
        if worker.state is WorkerState.DEAD and worker not in self.workers:
            return
        was_active = worker.state in (WorkerState.IDLE, WorkerState.BUSY)
        if worker.state is WorkerState.IDLE:
            self.idle.remove(worker)
        worker.state = WorkerState.DEAD
        self.workers.discard(worker)
        self.retired.append(worker)
        if was_active:
            self._promote_spare_locked()

    def _promote_spare_locked(self) -> None:
        """Capacity comes back now, not after an interpreter start (~60 ms). Also while a
        graceful close() lets queued calls finish; not after terminate()."""
        if self.terminated:
            return
        spare = next((w for w in self.workers if w.state is WorkerState.SPARE), None)
        if spare is not None:
            self._hand_out_locked(spare)

    def mark_dying(self, worker: WorkerProcess) -> None:
        """Under the lock: a busy worker died; its caller has yet to notice and retire it."""
        if worker.state is WorkerState.BUSY:
            worker.state = WorkerState.DYING
            self._promote_spare_locked()

    def fail_waiters(self, error: Error) -> None:
        """Under the lock: every waiting caller gets ``error``."""
        while self.waiters:
            self.waiters.popleft().fail(error)

    def count_error(self, error: BaseException) -> None:
        with self.lock:
            self.errors[type(error).__name__] += 1

    def stats(self) -> PoolStats:
        with self.lock:
            states = collections.Counter(w.state for w in self.workers)
            return PoolStats(
                size=self.size,
                alive=states[WorkerState.IDLE] + states[WorkerState.BUSY],
                busy=states[WorkerState.BUSY],
                idle=states[WorkerState.IDLE],
                starting=states[WorkerState.STARTING],
                spares=states[WorkerState.SPARE],
                evaluations=self.evaluations,
                errors=dict(self.errors),
                timeouts=self.timeouts,
                crashes=self.crashes,
                respawns=self.respawns,
                start_failures=self.start_failures,
                queue_depth=len(self.waiters),
                worker_pids=tuple(sorted(w.pid for w in self.workers)),
            )
