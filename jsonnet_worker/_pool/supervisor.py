"""The supervisor thread: starts workers, greets them, samples the idle, reaps the dead.

Goals: the pool stays at full size without any caller paying for it; a death is noticed at
once, even of an idle worker; a worker that cannot start (or greets with a lie) never makes
the pool respawn in a tight loop and never stops this thread; an idle worker or spare that
writes or burns CPU is retired; every process started is reaped and every fd closed.

Plan: one thread for the pool's whole life (PR_SET_PDEATHSIG fires when the *thread* that
forked a worker exits, so workers must be forked from a thread that lives as long as the
pool). It polls a wake-up pipe, the pidfd of every worker, and the channels of workers still
starting (their hello goes through ``connection.WorkerConnection``); callers own the
channels of the workers they hold, so it never reads those. Each new worker goes into a task
cgroup of its own (``tasklimit``) before its hello is read, and ``Worker.close`` removes
that cgroup once the worker is reaped. Every decision is a transition
of ``state.PoolState`` (the hand-over's outcome too); ``perform`` carries out the effects a
transition returns, for the supervisor and for the callers alike. See docs/DESIGN.md, "Call flow".

Weak spots: a pidfd stays readable after death, so the pidfd of a busy dead worker (DYING)
is left out of the poll set until its caller discards it.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future

from .._errors import (
    Error,
    ProtocolError,
    WorkerStartError,
)
from .._report import SandboxStatus, judge_sandbox, log_landlock
from .._wire.layers import LayerState, LayerStatus
from .._wire.messages import StartupFailure, WorkerHello
from .connection import (
    NEED_DATA,
    ConnectionBroken,
    ConnectionClosed,
    WorkerConnection,
    sandbox_status,
)
from .exchange import Worker  # one worker as a call uses it, written there
from .forking import WorkerSource
from .forkserver_policy import LAYER, SourceStats
from .origin import WorkerOrigin
from .processes import WorkerProcess, WorkerSettings
from .state import (
    Close,
    Effect,
    HandOver,
    IdleSample,
    Kill,
    Log,
    PoolState,
    Ticket,
    Wake,
    WakeSupervisor,
    WorkerStatus,
)
from .tasklimit import TaskLimits

logger = logging.getLogger("jsonnet_worker")

IDLE_CHECK_INTERVAL = 0.5


class Supervisor:
    def __init__(
        self,
        state: PoolState[Worker],
        settings: WorkerSettings,
        origin: WorkerOrigin,
    ) -> None:
        self.state = state
        self.settings = settings
        self.origin = origin
        # New workers are forks of the origin's source (made on this thread, in _run), if
        # it gives one; re-executed by the origin otherwise.
        self.source: WorkerSource | None = None
        # Each worker's and fork server's task cgroup, under the pool's directory (made
        # now: ``restrict_host`` grants that directory to the host's layer).
        self.tasks = self._task_limits()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._wake_lock = threading.Lock()
        self._wake_open = True
        self._stopping = False
        self._grace = 0.0
        self._sandbox_logged = False
        self._next_idle_check = 0.0
        self._on_thread: list[tuple[Callable[[], object], Future[object]]] = []
        self._on_thread_lock = threading.Lock()
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
        with self._on_thread_lock:
            self._on_thread.append((function, future))
        self.wake()
        return future.result(timeout)

    def stop(self, grace: float) -> None:
        """Close every worker (after ``grace`` seconds for an orderly exit) and end the thread."""
        self._grace = grace
        self._stopping = True
        self.wake()
        if threading.current_thread() is not self.thread:
            self.thread.join()

    # -- performing effects (for every thread) -------------------------------------------

    def perform(self, effects: Iterable[Effect]) -> None:
        """Carry out what a transition asked for, outside the state's lock."""
        for effect in effects:
            if type(effect) is HandOver:  # the common one (a final class: no ``isinstance``)
                self._hand_over(effect.ticket, effect.worker)
            elif isinstance(effect, Kill):
                effect.worker.process.kill()
            elif isinstance(effect, WakeSupervisor):
                self.wake()
            elif isinstance(effect, Wake):
                effect.ticket.wake()
            elif isinstance(effect, Close):
                effect.worker.close()
            elif isinstance(effect, Log):
                logger.log(effect.level, effect.message, *effect.args, extra=effect.extra)

    def _hand_over(self, ticket: Ticket, worker: Worker) -> None:
        """The giver writes the waiting caller's request, then wakes it: the worker starts
        at once instead of idling until that caller's thread or task is scheduled."""
        call = ticket.call
        try:
            written = worker.send_request(call.request, call.frame, call.library)
        except Error as exc:  # a conversation out of turn: our bug, but never a lost caller
            logger.exception("worker %d: hand-over failed", worker.pid)
            error = ProtocolError(f"the worker handed to this call could not take it: {exc}")
            self.perform(self.state.hand_over_failed(ticket, error))
            return
        self.state.handed_over(ticket, written)
        if not ticket.wake():  # its event loop is closed: nobody will read the answer
            self.perform(self.state.abandon(ticket))

    # -- the loop ------------------------------------------------------------------------

    def fork_server_status(self) -> LayerStatus:
        """The fork server's layer (named ``template``): forked workers, or re-exec ones
        and why."""
        source = self.source
        if source is not None:
            return source.status()
        reason = f"re-exec workers: {self.origin.reason}"
        return LayerStatus(LAYER, LayerState.MISSING, reason=reason)

    def fork_server_stats(self) -> SourceStats:
        source = self.source
        return source.stats() if source is not None else SourceStats(None, 0, 0, 0)

    def replace_fork_server(self) -> None:
        """Start a new fork server now (on this thread); the old one's workers live on."""
        self.run_on_thread(self._replace_fork_server)

    def _replace_fork_server(self) -> None:
        if self.source is not None:  # made on this thread: after a request made at start
            self.source.replace()

    def _run(self) -> None:
        try:
            self.source = self.origin.fork_source(self.settings, self.tasks)
            while not self._stopping:
                self._run_requests()
                self._tend_fork_server()
                self._spawn_missing()  # first: a replacement starts before the dead are reaped
                self._reap_retired()
                self._wait_and_handle()
                self._check_idle()
                if self.state.initial_done():
                    self.initial_done.set()
        except BaseException:
            logger.exception("jsonnet_worker supervisor failed; stopping the pool's workers")
            self.perform(self.state.fail(WorkerStartError("the pool's supervisor failed")))
        finally:
            self._shutdown()

    def _run_requests(self) -> None:
        with self._on_thread_lock:
            requests, self._on_thread = self._on_thread, []
        for function, future in requests:
            try:
                future.set_result(function())
            except BaseException as exc:
                future.set_exception(exc)

    def _task_limits(self) -> TaskLimits:
        """The pool's task cgroups, made on this thread; without them, the fallback is said
        once: a WARNING where a root parent could have had them (the host lacks them), INFO
        where they were turned off or a non-root parent has no delegated cgroup (as usual:
        like the uid and IPC namespace layers, a root parent's, or a delegation's, to add)."""
        tasks = TaskLimits(self.state.config.task_limit)
        if not tasks.active:
            expected = tasks.limit is None or os.geteuid() != 0
            level = logging.INFO if expected else logging.WARNING
            logger.log(level, "Worker task limit missing: %s", tasks.status.reason)
        return tasks

    def _reap_retired(self) -> None:
        for worker in self.state.take_retired():
            worker.close()

    def _tend_fork_server(self) -> None:
        """Notice a dead fork server, restart it after its back-off, replace it before its
        CPU budget runs out: when its policy says (``WorkerSource.check_at``: at its death,
        seen through its pidfd, at the back-off's end, and every half second otherwise)."""
        if self.source is not None:
            self.source.maintain()

    def _new_process(self) -> WorkerProcess:
        if self.source is not None:
            return self.source.spawn()
        return self.origin.start(self.settings)

    def _spawn_missing(self) -> None:
        for _ in range(self.state.spawn_due(time.monotonic())):
            try:
                process = self._new_process()
            except OSError as exc:
                reason = f"cannot start a worker process: {exc}"
                self.perform(self.state.start_failed(None, reason, time.monotonic()))
                return
            worker = Worker(process, WorkerConnection(self._max_output()))
            self.state.started(worker, process.started_at)
            # Into its own task cgroup now, before this thread reads its hello: untrusted
            # code runs in a worker only once a caller writes a request to it, and that
            # needs it greeted (here, later), then IDLE and checked out (forked and re-exec
            # workers alike). Fail closed: a worker that cannot be bounded is not used.
            try:
                worker.tasks = self.tasks.place(process.pid)
            except OSError as exc:
                self._start_failed(worker, f"cannot put it in its task cgroup: {exc}")
                return

    def _max_output(self) -> int:
        return self.state.config.max_output

    def _wait_and_handle(self) -> None:
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        watched: dict[int, tuple[str, Worker]] = {}
        now = time.monotonic()
        deadlines = [self._next_idle_check]
        fork_server_pidfd = self._watch_fork_server(poller, deadlines)
        roster = self.state.roster()
        if roster.next_spawn_at > now:
            deadlines.append(roster.next_spawn_at)
        for worker, status, _, started_at in roster.members:
            process = worker.process
            if status is WorkerStatus.STARTING:
                poller.register(process.stdout, select.POLLIN)
                poller.register(process.stderr_fd, select.POLLIN)
                watched[process.stdout] = ("hello", worker)
                watched[process.stderr_fd] = ("stderr", worker)
                deadlines.append(started_at + self.state.config.spawn_timeout)
            if status is not WorkerStatus.DYING:
                poller.register(process.pidfd, select.POLLIN)
                watched[process.pidfd] = ("exit", worker)
        wait_ms = max(0, int((min(deadlines) - now) * 1000) + 1)
        for fd, _ in poller.poll(wait_ms):
            if fd in (self._wake_r, fork_server_pidfd):
                self._woken(fd)
                continue
            role, worker = watched[fd]
            now_status = self.state.status_of(worker)
            if now_status is None:
                continue  # retired earlier in this batch
            status = now_status
            if role != "exit" and status is not WorkerStatus.STARTING:
                continue  # greeted earlier in this batch: a caller may hold it now
            try:
                self._handle(role, worker, status)
            except Exception as exc:  # whatever a worker sent: never the end of this thread
                logger.exception("worker %d: unexpected failure while starting it", worker.pid)
                self._start_failed(worker, f"unexpected failure while starting it: {exc!r}")
        self._time_out_starts()

    def _watch_fork_server(self, poller: select.poll, deadlines: list[float]) -> int:
        """Watch the fork server's pidfd and its next tending time; the pidfd, or -1."""
        source = self.source
        pidfd = source.pidfd if source is not None else None
        if source is not None:
            deadlines.append(source.check_at)
        if pidfd is None:
            return -1
        poller.register(pidfd, select.POLLIN)
        return pidfd

    def _woken(self, fd: int) -> None:
        if fd == self._wake_r:
            self._drain_wake()
        elif self.source is not None:
            self.source.look_soon()  # the fork server died: tended on the next turn

    def _handle(self, role: str, worker: Worker, status: WorkerStatus) -> None:
        if role == "stderr":
            worker.process.drain_stderr()
        elif role == "hello":
            data = worker.process.read_stdout()
            if data is not None:
                worker.connection.receive_data(data)
                self._greet(worker)
        elif status is WorkerStatus.STARTING:
            data = worker.process.read_stdout()  # a startup_failed frame may still be there
            worker.connection.receive_data(data or b"")
            if data:
                worker.connection.receive_data(b"")
            self._greet(worker)
        else:
            worker.process.wait(0.0)
            self.perform(self.state.exited(worker, worker.process.how_it_ended()))

    def _time_out_starts(self) -> None:
        now = time.monotonic()
        limit = self.state.config.spawn_timeout
        for worker, status, _, started_at in self.state.roster().members:
            if status is WorkerStatus.STARTING and now - started_at > limit:
                self._start_failed(worker, f"no hello within {limit} s")

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    # -- start-up ------------------------------------------------------------------------

    def _greet(self, worker: Worker) -> None:
        event = worker.connection.next_event()
        if event is NEED_DATA:
            return
        if isinstance(event, WorkerHello):
            self._accept(worker, event)
        elif isinstance(event, StartupFailure):
            self._start_failed(worker, event.reason)
        elif isinstance(event, ConnectionBroken):
            self._start_failed(worker, f"sent an invalid hello: {event.reason}")
        elif isinstance(event, ConnectionClosed):
            self._died_starting(worker)
        else:
            self._start_failed(worker, f"sent {type(event).__name__} before its hello")

    def _accept(self, worker: Worker, hello: WorkerHello) -> None:
        sandbox = sandbox_status(hello, self.tasks.status)
        # Its start-up CPU is nobody's call: read here, on the supervisor's thread.
        worker.cpu_mark = worker.process.cpu_seconds() or 0.0
        self.perform(self.state.greeted(worker, sandbox))
        self._log_sandbox(sandbox)

    def _died_starting(self, worker: Worker) -> None:
        """A starting worker SIGKILLed from outside (an operator, a chaos test) is replaced at
        once: it says nothing about whether workers can start, so it neither backs off nor
        fails waiting callers as a start-up failure would."""
        process = worker.process
        returncode = process.wait(0.05)
        if returncode == -signal.SIGKILL:
            self.perform(self.state.exited(worker, process.how_it_ended()))
            return
        process.drain_stderr()
        text = process.stderr.text().strip()
        line = text.splitlines()[-1][:500] if text else "no output"
        self._start_failed(worker, f"exited during start-up: {line}")

    def _start_failed(self, worker: Worker | None, reason: str) -> None:
        self.perform(self.state.start_failed(worker, reason, time.monotonic()))

    def _log_sandbox(self, sandbox: SandboxStatus) -> None:
        if self._sandbox_logged:
            return
        self._sandbox_logged = True
        others = "; ".join(layer.summary() for layer in sandbox.missing if layer.name != "landlock")
        unprotected = "Jsonnet runs in worker processes"
        if not sandbox.enforced and others:
            unprotected += f" (also missing: {others})"
        log_landlock(sandbox.landlock, unprotected)
        verdict = judge_sandbox(sandbox)
        if sandbox.enforced and not verdict.complete:
            logger.warning("%s", verdict.summary(), extra={"sandbox_state": verdict.state})

    # -- the idle --------------------------------------------------------------------------

    def _check_idle(self) -> None:
        """Every IDLE_CHECK_INTERVAL: an idle worker or spare that wrote to its channel or
        whose CPU time grows is retired (its engine is doing what nobody asked for)."""
        now = time.monotonic()
        if now < self._next_idle_check:
            return
        self._next_idle_check = now + IDLE_CHECK_INTERVAL
        resting = [
            (worker, epoch)
            for worker, status, epoch, _ in self.state.roster().members
            if status in (WorkerStatus.IDLE, WorkerStatus.SPARE)
        ]
        if not resting:
            return
        # A poller of our own: a caller may be polling a worker's (after checking it out).
        poller = select.poll()
        for worker, _ in resting:
            poller.register(worker.process.stdout, select.POLLIN)
        wrote = {fd for fd, _ in poller.poll(0)}
        samples = [
            IdleSample(worker, epoch, worker.process.cpu_seconds(), worker.process.stdout in wrote)
            for worker, epoch in resting
        ]
        self.perform(self.state.idle_check(samples))

    # -- the end ---------------------------------------------------------------------------

    def _shutdown(self) -> None:
        """Close every worker no caller holds. A busy worker (a call still running at
        ``terminate()``) is only killed: its caller sees the end of its channel and closes
        it, so no fd is closed under a caller's feet."""
        free, held = self.state.supervisor_stopped()
        for worker in held:
            worker.process.kill()
        for worker in free:
            worker.process.end_input()
        deadline = time.monotonic() + self._grace
        for worker in free:
            worker.close(grace=max(0.0, deadline - time.monotonic()))
        if self.source is not None:
            self.source.close()  # the workers it forked were closed above
        self.tasks.close()  # now, or once the held workers' callers have closed them
        with self._wake_lock:
            self._wake_open = False
            for fd in (self._wake_r, self._wake_w):
                os.close(fd)
        self.initial_done.set()
