"""The supervisor thread: starts workers, accepts their hello, reaps the dead, replaces them.

Goals: the pool stays at full size without any caller paying for it; a death is noticed at
once, even of an idle worker; a worker that cannot start never makes the pool respawn in a
tight loop; every process it started is reaped and every fd closed.

Plan: one thread for the pool's whole life (PR_SET_PDEATHSIG fires when the *thread* that
forked a worker exits, so workers must be forked from a thread that lives as long as the
pool). It polls a wake-up pipe, the pidfd of every worker, and the stdout of workers still
starting; callers own the pipes of the workers they hold, so it never reads those.

Weak spots: a pidfd stays readable after death; the pidfd of a busy dead worker is left out
of the poll set until its caller retires it, so the loop does not spin.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

from ._core import PoolCore
from ._errors import SandboxUnavailable, WorkerStartError
from ._process import WorkerHello, WorkerProcess, WorkerSettings, WorkerState
from ._protocol import PROTOCOL_VERSION, Message
from ._status import SandboxStatus, log_landlock

logger = logging.getLogger("jsonnet_worker")

BACKOFF_FIRST = 0.1
BACKOFF_MAX = 5.0


class Supervisor:
    def __init__(
        self,
        core: PoolCore,
        settings: WorkerSettings,
        *,
        spawn_timeout: float,
        require_sandbox: bool,
        command: list[str] | None = None,
    ) -> None:
        self.core = core
        self.settings = settings
        self.spawn_timeout = spawn_timeout
        self.require_sandbox = require_sandbox
        self.command = command
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._wake_lock = threading.Lock()
        self._wake_open = True
        self._stopping = False
        self._grace = 0.0
        self._failures_in_a_row = 0
        self._next_spawn_at = 0.0
        self._spawned = 0
        self._initial_resolved = 0
        self._dead_busy: set[WorkerProcess] = set()
        self._sandbox_logged = False
        self._on_thread: list[tuple[Callable[[], object], Future[object]]] = []
        self.initial_done = threading.Event()
        self.thread = threading.Thread(
            target=self._run, name="jsonnet-worker-supervisor", daemon=True
        )

    def start(self) -> None:
        self.thread.start()

    def wake(self) -> None:
        with self._wake_lock:  # never write to the pipe's fd number once it is closed
            if not self._wake_open:
                return
            try:
                os.write(self._wake_w, b"\0")
            except BlockingIOError:
                pass  # already awake

    def run_on_thread(self, function: Callable[[], object], timeout: float = 10.0) -> object:
        """Run ``function`` on the supervisor thread and return its result.

        ``restrict_host`` uses it to apply the host's Landlock layer to this thread: before
        ABI 8 a layer binds only the calling thread and what it starts later, and workers
        are started from here."""
        if threading.current_thread() is self.thread:
            return function()
        future: Future[object] = Future()
        with self.core.lock:
            self._on_thread.append((function, future))
        self.wake()
        return future.result(timeout)

    def _run_requests(self) -> None:
        with self.core.lock:
            requests, self._on_thread = self._on_thread, []
        for function, future in requests:
            try:
                future.set_result(function())
            except BaseException as exc:
                future.set_exception(exc)

    def stop(self, grace: float) -> None:
        """Close every worker (after ``grace`` seconds for an orderly exit) and end the thread."""
        self._grace = grace
        self._stopping = True
        self.wake()
        if threading.current_thread() is not self.thread:
            self.thread.join()

    # -- the loop ------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._run_requests()
                self._spawn_missing()
                self._wait_and_handle()
        except BaseException:
            logger.exception("jsonnet_worker supervisor failed; stopping the pool's workers")
            with self.core.lock:
                self.core.fatal = WorkerStartError("the pool's supervisor failed")
                self.core.fail_waiters(self.core.fatal)
        finally:
            self._shutdown()

    def _spawn_missing(self) -> None:
        core = self.core
        with core.lock:
            # A graceful close() still serves the calls in flight and queued: keep the pool
            # whole until it stops us; terminate() needs no more workers.
            if core.terminated or core.fatal is not None:
                return
            # Spares start after the first wave: on a small machine they would slow it down.
            spares = core.spares if self.initial_done.is_set() else 0
            missing = core.size + spares - len(core.workers)
        now = time.monotonic()
        if missing <= 0 or now < self._next_spawn_at:
            return
        for _ in range(missing):
            try:
                worker = WorkerProcess(self.settings, self.command)
            except OSError as exc:
                self._start_failed(None, f"cannot start a worker process: {exc}")
                return
            with core.lock:
                core.workers.add(worker)
                if self._spawned >= core.size + core.spares:
                    core.respawns += 1  # beyond the first workers and spares: a replacement
            self._spawned += 1

    def _wait_and_handle(self) -> None:
        core = self.core
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        watched: dict[int, tuple[str, WorkerProcess]] = {}
        now = time.monotonic()
        timeout = None if now >= self._next_spawn_at else self._next_spawn_at - now
        with core.lock:
            workers = list(core.workers)
            retired, core.retired = core.retired, []
        for worker in retired:
            self._dead_busy.discard(worker)
            worker.close()
        for worker in workers:
            if worker.state is WorkerState.STARTING:
                poller.register(worker.stdout, select.POLLIN)
                poller.register(worker.stderr_fd, select.POLLIN)
                watched[worker.stdout] = ("hello", worker)
                watched[worker.stderr_fd] = ("stderr", worker)
                left = worker.started_at + self.spawn_timeout - now
                timeout = left if timeout is None else min(timeout, left)
            if worker not in self._dead_busy:
                poller.register(worker.pidfd, select.POLLIN)
                watched[worker.pidfd] = ("exit", worker)
        wait_ms = -1 if timeout is None else max(0, int(timeout * 1000) + 1)
        for fd, _ in poller.poll(wait_ms):
            if fd == self._wake_r:
                self._drain_wake()
                continue
            role, worker = watched[fd]
            if worker.state is WorkerState.DEAD:
                continue
            if role != "exit" and worker.state is not WorkerState.STARTING:
                continue  # greeted earlier in this batch: a caller may hold it now
            if role == "stderr":
                worker.drain_stderr()
            elif role == "hello":
                self._read_hello(worker)
            else:
                self._exited(worker)
        now = time.monotonic()
        for worker in workers:
            if (
                worker.state is WorkerState.STARTING
                and now - worker.started_at > self.spawn_timeout
            ):
                worker.kill()
                self._start_failed(worker, f"no hello within {self.spawn_timeout} s")

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    # -- start-up ------------------------------------------------------------------------

    def _read_hello(self, worker: WorkerProcess) -> None:
        if not worker.read_stdout():
            if self._killed_from_outside(worker):
                return
            worker.drain_stderr()
            self._start_failed(worker, "exited during start-up: " + self._stderr_line(worker))
            return
        event = worker.reader.next_event()
        if event is None:
            return
        payload = event.payload if isinstance(event, Message) else {}
        kind = payload.get("t")
        if kind == "startup_failed":
            self._start_failed(worker, str(payload.get("reason", "no reason given")))
        elif kind != "hello":
            self._start_failed(worker, f"sent {event!r} instead of a hello")
        elif payload.get("protocol") != PROTOCOL_VERSION:
            self._start_failed(worker, f"speaks protocol {payload.get('protocol')!r}")
        else:
            self._accept(worker, WorkerHello.from_message(payload))

    def _accept(self, worker: WorkerProcess, hello: WorkerHello) -> None:
        core = self.core
        sandbox = hello.sandbox()
        if self.require_sandbox and not sandbox.enforced:
            error = SandboxUnavailable(
                f"require_sandbox=True, but the workers have no Landlock sandbox: {sandbox.reason}",
                reason=sandbox.reason,
            )
            with core.lock:
                core.sandbox = sandbox
                core.fatal = error
                core.fail_waiters(error)
                core._retire_locked(worker)
            worker.kill()
            self._log_sandbox(sandbox)
            self._count_initial()
            return
        worker.hello = hello
        self._failures_in_a_row = 0
        with core.lock:
            core.sandbox = core.sandbox or sandbox
            core.start_failure = ""
        self._log_sandbox(sandbox)
        core.accept(worker)
        self._count_initial()

    def _log_sandbox(self, sandbox: SandboxStatus) -> None:
        if self._sandbox_logged:
            return
        self._sandbox_logged = True
        others = "; ".join(layer.summary() for layer in sandbox.missing if layer.name != "landlock")
        unprotected = "Jsonnet runs in worker processes"
        if not sandbox.enforced and others:
            unprotected += f" (also missing: {others})"
        log_landlock(sandbox.landlock, unprotected)
        if sandbox.enforced and others:
            logger.warning("Worker isolation layers missing: %s", others)

    def _start_failed(self, worker: WorkerProcess | None, reason: str) -> None:
        core = self.core
        self._failures_in_a_row += 1
        delay = min(BACKOFF_FIRST * 2 ** (self._failures_in_a_row - 1), BACKOFF_MAX)
        self._next_spawn_at = time.monotonic() + delay
        message = f"worker start-up failed: {reason}"
        if self._failures_in_a_row == 1 or self._failures_in_a_row % 10 == 0:
            logger.error("%s (attempt %d; next in %.1f s)", message, self._failures_in_a_row, delay)
        with core.lock:
            core.start_failures += 1
            core.start_failure = reason
            if worker is not None:
                core._retire_locked(worker)
            if not core.active():
                core.fail_waiters(WorkerStartError(message, cause=reason))
        if worker is not None:
            worker.kill()
        self._count_initial()

    def _count_initial(self) -> None:
        """The pool's constructor waits until every worker of the first wave said hello, or
        as many start-up attempts as the pool's size ended, or a fatal error."""
        core = self.core
        self._initial_resolved += 1
        with core.lock:
            done = (
                core.active() >= core.size
                or self._initial_resolved >= core.size
                or core.fatal is not None
            )
        if done:
            self.initial_done.set()

    @staticmethod
    def _stderr_line(worker: WorkerProcess) -> str:
        text = worker.stderr.text().strip()
        return text.splitlines()[-1][:500] if text else "no output"

    # -- deaths --------------------------------------------------------------------------

    def _killed_from_outside(self, worker: WorkerProcess) -> bool:
        """A starting worker SIGKILLed from outside (an operator, a chaos test) is replaced at
        once: it says nothing about whether workers can start, so it neither backs off nor
        fails waiting callers with WorkerStartError as a start-up failure would."""
        if worker.wait(0.05) != -signal.SIGKILL:
            return False
        with self.core.lock:
            self.core.crashes += 1
            self.core._retire_locked(worker)
        self._count_initial()
        return True

    def _exited(self, worker: WorkerProcess) -> None:
        core = self.core
        if worker.state is WorkerState.STARTING:
            if self._killed_from_outside(worker):
                return
            worker.read_stdout()
            event = worker.reader.next_event()
            if isinstance(event, Message) and event.payload.get("t") == "startup_failed":
                self._start_failed(worker, str(event.payload.get("reason")))
            else:
                worker.drain_stderr()
                self._start_failed(worker, "exited during start-up: " + self._stderr_line(worker))
            return
        with core.lock:
            if worker.state in (WorkerState.IDLE, WorkerState.SPARE):
                # No caller holds it: a spare left here would later be handed to one.
                core.crashes += 1
                core._retire_locked(worker)
                return
            # Busy: its caller sees the end of the pipe and retires it (and closes its fds,
            # which it is reading). Capacity comes back now: a spare takes its place.
            core.mark_dying(worker)
        self._dead_busy.add(worker)

    def _shutdown(self) -> None:
        """Close every worker no caller holds. A busy worker (a call still running at
        ``terminate()``) is only killed: its caller sees the end of the pipe, and closes it
        (``PoolCore.retire``), so no fd is closed under a caller's feet."""
        core = self.core
        with core.lock:
            core.supervisor_stopped = True
            workers = list(core.workers) + core.retired
            core.workers.clear()
            core.retired = []
            core.idle.clear()
        held = (WorkerState.BUSY, WorkerState.DYING)
        for worker in workers:
            if worker.state in held:
                worker.kill()
        idle = [w for w in workers if w.state not in held]
        for worker in idle:
            worker.end_input()
        deadline = time.monotonic() + self._grace
        for worker in idle:
            worker.close(grace=max(0.0, deadline - time.monotonic()))
        with self._wake_lock:
            self._wake_open = False
            for fd in (self._wake_r, self._wake_w):
                os.close(fd)
        self.initial_done.set()
