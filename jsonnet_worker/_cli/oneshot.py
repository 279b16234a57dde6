"""One call in one sandboxed worker, for a command that makes one call (``eval``): no pool,
no spare, no supervisor thread.

Goals: a quick command. A pool starts a supervisor thread, a fork server and a spare, and its
module pulls in asyncio; a command that evaluates one file and exits needs none of it, only
the worker. That worker is a pool's worker in every respect (the same command line,
environment, identity, limits and sandbox: ``processes.WorkerProcess`` from
``settings_for(config)``), and the call is judged as a pool judges it: the same hello, the
same sandbox verdict (``require_sandbox`` fails closed with ``SandboxUnavailable``), the same
checks and encoding (``calls.prepare``), the same answers, deaths and deadline
(``calls.read_answer``, ``calls.death``, ``calls.timed_out``).

Plan: ``OneShot(config)`` starts the worker at once, before the caller reads its input and
imports what the call needs, so that the worker's start-up (most of a command's time) runs
beside that work. ``call`` waits for the hello, sends the one request and polls for the
answer until the deadline. ``close`` (also ``__exit__``, so on every path: an error, Ctrl-C)
kills and reaps the worker; the worker's process is owned by its ``WorkerProcess`` alone.

Weak spots: the worker is re-executed, never forked (a fork server would be one more process
to start); no demotion to SCHED_IDLE (no other call competes); nothing is accounted
(``last_call()`` and the pool's stats do not see the call).
"""

from __future__ import annotations

import logging
import select
import time
from types import TracebackType
from typing import TYPE_CHECKING

from .._config import PoolConfig
from .._errors import SandboxUnavailable, WorkerStartError
from .._pool.processes import WorkerProcess, settings_for

if TYPE_CHECKING:
    from .._pool.calls import Call
    from .._pool.connection import Answer
    from .._pool.state import Outcome
    from .._pool.supervisor import Worker
    from .._report import SandboxStatus

logger = logging.getLogger("jsonnet_worker")

# How long a worker whose response channel ended may take to exit, within the deadline (as
# the pool's DEATH_GRACE).
DEATH_GRACE = 1.0


class OneShot:
    """One worker for one call; a context manager that kills and reaps it on exit."""

    def __init__(self, config: PoolConfig) -> None:
        self.config = config
        try:
            self.process = WorkerProcess(settings_for(config))
        except OSError as exc:  # no pidfd_open, no socketpair, the interpreter missing
            raise WorkerStartError(f"cannot start a worker: {exc}", cause=str(exc)) from None

    def __enter__(self) -> OneShot:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Kill and reap the worker, close its channels. Idempotent."""
        self.process.close()

    def call(self, call: Call) -> Answer:
        """The answer to ``call`` (from ``calls.prepare``), or its typed error."""
        from .._pool import calls

        worker = self._greet()
        deadline = time.monotonic() + call.time_left()
        pending = calls.write_rest(
            worker, memoryview(call.frame)[worker.send_request(call.request, call.frame) :]
        )
        outcome = self._poll_for_answer(worker, pending, deadline)
        if outcome is None:
            self.process.kill()
            outcome = calls.timed_out(call)
        elif outcome is calls.CLOSED:
            grace = min(DEATH_GRACE, max(0.0, deadline - time.monotonic()))
            self.process.wait(grace)
            outcome = calls.death(worker, call, cut=grace < DEATH_GRACE)
        if outcome.error is not None:
            raise outcome.error
        answer: Answer = outcome.answer
        return answer

    def _greet(self) -> Worker:
        """Wait for the hello; refuse a worker without the sandbox the config requires."""
        from .._pool.connection import WorkerConnection, sandbox_status
        from .._pool.launch import await_hello
        from .._pool.supervisor import Worker

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

    def _poll_for_answer(
        self, worker: Worker, pending: memoryview | None, deadline: float
    ) -> Outcome | None:
        """Poll the worker's channels (writing the rest of the frame) until an outcome or
        the deadline (None)."""
        from .._pool import calls

        process = self.process
        poller = select.poll()
        poller.register(process.stdout, select.POLLIN)
        poller.register(process.stderr_fd, select.POLLIN)
        if pending is not None:
            poller.register(process.stdin, select.POLLOUT)
        while (now := time.monotonic()) < deadline:
            for fd, _ in poller.poll((deadline - now) * 1000.0 + 1):
                if fd == process.stdout:
                    outcome = calls.read_answer(worker)
                    if outcome is not None:
                        return outcome
                elif fd == process.stderr_fd:
                    if not process.drain_stderr():
                        poller.unregister(process.stderr_fd)
                elif pending is not None:
                    pending = calls.write_rest(worker, pending)
                    if pending is None:
                        poller.unregister(process.stdin)
        return None


def _log_sandbox(sandbox: SandboxStatus) -> None:
    """What a pool logs of its first worker's sandbox (its supervisor's ``_log_sandbox``)."""
    from .._report import log_landlock

    others = "; ".join(layer.summary() for layer in sandbox.missing if layer.name != "landlock")
    unprotected = "Jsonnet runs in a worker process"
    if not sandbox.enforced and others:
        unprotected += f" (also missing: {others})"
    log_landlock(sandbox.landlock, unprotected)
    if sandbox.enforced and others:
        logger.warning("Worker isolation layers missing: %s", others)
