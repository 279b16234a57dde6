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
    """A caller waiting for a worker. ``deliver`` and ``fail`` run under the pool lock."""

    def __init__(self) -> None:
        self.worker: WorkerProcess | None = None
        self.error: Error | None = None

    def deliver(self, worker: WorkerProcess) -> bool:
        raise NotImplementedError

    def fail(self, error: Error) -> None:
        raise NotImplementedError


class ThreadWaiter(Waiter):
    def __init__(self) -> None:
        super().__init__()
        self._signal = threading.Lock()
        self._signal.acquire()

    def deliver(self, worker: WorkerProcess) -> bool:
        self.worker = worker
        self._signal.release()
        return True

    def fail(self, error: Error) -> None:
        self.error = error
        self._signal.release()

    def wait(self, timeout: float) -> bool:
        return self._signal.acquire(timeout=max(timeout, 0.0))


class AsyncWaiter(Waiter):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.loop = loop
        self.future: asyncio.Future[None] = loop.create_future()

    def _wake(self) -> None:
        if not self.future.done():
            self.future.set_result(None)

    def deliver(self, worker: WorkerProcess) -> bool:
        # The worker is set before the wake-up is scheduled: the event loop may resume the
        # waiting task before call_soon_threadsafe returns here.
        self.worker = worker
        try:
            self.loop.call_soon_threadsafe(self._wake)
        except RuntimeError:  # its event loop is closed: nobody will take the worker
            self.worker = None
            return False
        return True

    def fail(self, error: Error) -> None:
        self.error = error
        try:
            self.loop.call_soon_threadsafe(self._wake)
        except RuntimeError:
            pass


class PoolCore:
    def __init__(self, size: int, queue_limit: int, wake_supervisor: Callable[[], None]) -> None:
        self.size = size
        self.queue_limit = queue_limit
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.idle: list[WorkerProcess] = []
        self.waiters: collections.deque[Waiter] = collections.deque()
        self.workers: set[WorkerProcess] = set()
        self.retired: list[WorkerProcess] = []
        self.closed = False
        self.terminated = False
        self.in_flight = 0
        self.spinners = 0  # callers busy-waiting for an answer (see WorkerPool._may_spin)
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

    def take_or_wait(self, waiter: Waiter) -> WorkerProcess | None:
        """A worker at once, or None after enqueuing ``waiter``. Raises if it cannot wait."""
        with self.lock:
            if self.idle:
                worker = self.idle.pop()
                worker.state = WorkerState.BUSY
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
        if self.start_failure and not any(
            w.state in (WorkerState.IDLE, WorkerState.BUSY) for w in self.workers
        ):
            raise WorkerStartError(
                f"no worker is running: workers fail to start ({self.start_failure})",
                cause=self.start_failure,
            )

    def abandon(self, waiter: Waiter) -> WorkerProcess | None:
        """The waiter gives up; returns the worker it was handed meanwhile, if any."""
        with self.lock:
            if waiter.worker is None:
                try:
                    self.waiters.remove(waiter)
                except ValueError:
                    pass
            return waiter.worker

    def give_back(self, worker: WorkerProcess) -> None:
        with self.lock:
            if worker.state is WorkerState.DEAD:
                return
            while self.waiters:
                if self.waiters.popleft().deliver(worker):
                    worker.state = WorkerState.BUSY
                    return
            worker.state = WorkerState.IDLE
            self.idle.append(worker)

    def retire(self, worker: WorkerProcess) -> None:
        """Take a worker out of service; the supervisor reaps it and starts another."""
        with self.lock:
            self._retire_locked(worker)
        self._wake_supervisor()

    def _retire_locked(self, worker: WorkerProcess) -> None:
        if worker.state is WorkerState.DEAD and worker not in self.workers:
            return
        if worker.state is WorkerState.IDLE:
            self.idle.remove(worker)
        worker.state = WorkerState.DEAD
        self.workers.discard(worker)
        self.retired.append(worker)

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
                evaluations=self.evaluations,
                errors=dict(self.errors),
                timeouts=self.timeouts,
                crashes=self.crashes,
                respawns=self.respawns,
                start_failures=self.start_failures,
                queue_depth=len(self.waiters),
                worker_pids=tuple(sorted(w.pid for w in self.workers)),
            )
