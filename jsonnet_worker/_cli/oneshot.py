"""One call in one sandboxed worker, for a command that makes one call (``eval``): no pool,
no spare, no supervisor thread.

Goals: a quick command. A pool starts a supervisor thread, a fork server and a spare, and its
module pulls in asyncio; a command that evaluates one file and exits needs none of it, only
the worker. That worker is a pool's worker in every respect (the same command line,
environment, identity, limits and sandbox: ``processes.WorkerProcess`` from
``settings_for(config)``), and the call is judged as a pool judges it: the same hello, the
same sandbox verdict (``require_sandbox`` fails closed with ``SandboxUnavailable``), the same
checks and encoding (``exchange.prepare``), the same answers, deaths and deadline
(``exchange.read_answer``, ``exchange.death``, ``exchange.timed_out``): the steps of
one exchange the pool uses too, without the pool's state machine or supervisor.

Plan: ``OneShot(config)`` starts the worker at once, before the caller reads its input and
imports what the call needs, so that the worker's start-up (most of a command's time) runs
beside that work; or takes the one the console script started before its own imports
(``early``), when that one was started exactly as ``config``'s would be (``early`` says
which: True when it did). ``call`` waits for the hello, sends the one request and polls for the
answer until the deadline; once answered, the worker is killed at once, so that it dies while
the caller writes its output. ``close`` (also ``__exit__``, so on every path: an error,
Ctrl-C) kills and reaps it; the worker's process is owned by its ``WorkerProcess`` alone.

Weak spots: the worker is re-executed, never forked (a fork server would be one more process
to start); no demotion to SCHED_IDLE (no other call competes); nothing is accounted
(``last_call()`` and the pool's stats do not see the call).
"""

from __future__ import annotations

import select
import time
from typing import TYPE_CHECKING

from .._config import PoolConfig
from .._errors import SandboxUnavailable, WorkerStartError
from .._pool.processes import WorkerProcess, settings_for
from .closing import ClosedOnExit

if TYPE_CHECKING:
    from .._pool.connection import Answer
    from .._pool.exchange import Call, Worker
    from .._report import SandboxStatus
    from .early import EarlyWorker

# How long a worker whose response channel ended may take to exit, within the deadline (as
# the pool's DEATH_GRACE).
DEATH_GRACE = 1.0


class OneShot(ClosedOnExit):
    """One worker for one call; a context manager that kills and reaps it on exit."""

    def __init__(self, config: PoolConfig, early: EarlyWorker | None = None) -> None:
        self.config = config
        settings = settings_for(config)
        # the worker the command started with itself, if it is the one ``config`` asks for
        adopted = early.worker_for(settings) if early is not None else None
        self.early = adopted is not None
        try:
            self.process = adopted or WorkerProcess(settings)
        except OSError as exc:  # no pidfd_open, no socketpair, the interpreter missing
            raise WorkerStartError(f"cannot start a worker: {exc}", cause=str(exc)) from None

    def close(self) -> None:
        """Kill and reap the worker, close its channels. Idempotent."""
        self.process.close()

    def call(self, call: Call) -> Answer:
        """The answer to ``call`` (from ``exchange.prepare``), or its typed error."""
        from .._pool import exchange

        worker = self._greet()
        traces = call.traces
        if traces is not None:  # keep the call's stderr head: its std.trace lines
            self.process.stderr.mark(traces.max_bytes)
        deadline = time.monotonic() + call.time_left()
        sent = worker.send_request(call.request, call.frame, call.library)
        pending = exchange.write_rest(worker, memoryview(worker.outgoing)[sent:])
        if pending is not None:
            self.process.poller.register(self.process.stdin, select.POLLOUT)
        outcome = None
        while outcome is None and (now := time.monotonic()) < deadline:
            outcome, pending = exchange.poll_channels(
                worker, pending, (deadline - now) * 1000.0 + 1
            )
        if outcome is None:
            self.process.kill()
            outcome = exchange.timed_out(call)
        elif outcome is exchange.CLOSED:
            grace = min(DEATH_GRACE, max(0.0, deadline - time.monotonic()))
            self.process.wait(grace)
            outcome = exchange.death(worker, call, cut=grace < DEATH_GRACE)
        else:  # it answered its one call: it dies now, beside the caller's output, and
            if self.process.ready()[1]:  # (a trace line written just before the answer)
                self.process.drain_stderr()
            self.process.kill()  # ``close`` reaps it
        if traces is not None:  # before the result or the error, as the engines print them
            from .._pool.traces import deliver, lines_of

            deliver(traces, lines_of(self.process.stderr, traces))
        if outcome.error is not None:
            raise outcome.error
        answer: Answer = outcome.answer
        return answer

    def _greet(self) -> Worker:
        """Wait for the hello; refuse a worker without the sandbox the config requires."""
        from .._pool.connection import WorkerConnection, sandbox_status
        from .._pool.exchange import Worker
        from .._pool.launch import await_hello

        connection = WorkerConnection(self.config.max_output)
        hello = await_hello(self.process, connection, self.config.spawn_timeout)
        sandbox = sandbox_status(hello)
        if self.config.require_sandbox and not sandbox.enforced:
            raise SandboxUnavailable(
                f"require_sandbox=True, but the worker has no Landlock sandbox: {sandbox.reason}",
                reason=sandbox.reason,
            )
        _log_sandbox(sandbox)
        self.process.stderr.mark()  # what it printed while starting is no call's
        return Worker(self.process, connection)


def _log_sandbox(sandbox: SandboxStatus) -> None:
    """The one verdict ``doctor`` and the service's ``/healthz`` give: a WARNING when the
    worker runs without Landlock (``require_sandbox=False`` only), INFO when it is merely
    degraded (a non-root user's every command would warn of a uid it cannot drop:
    ``doctor`` is where that is reported). Written under the command's log handler
    (``command_logging``), entered here: an eval whose sandbox is complete loads no logging."""
    from .._report import judge_sandbox

    verdict = judge_sandbox(sandbox)
    if not verdict.complete:  # only then is logging imported (about 4 ms of a command)
        import logging

        from .terminal import command_logging

        level = logging.INFO if verdict.enforced else logging.WARNING
        with command_logging():
            logging.getLogger("jsonnet_worker").log(level, "the worker's %s", verdict.summary())
