"""Start one worker and wait for its hello, blocking: for ``doctor``, the host probe, tests and
benchmarks (the pool's supervisor greets its workers on its own event loop instead).

Goals: one copy of "launch and read the hello", on the one conversation parser
(``connection.WorkerConnection``), with one typed failure (``WorkerStartError``) whatever
went wrong: the worker said why it could not start, died, lied, or said nothing in time.

Plan: poll the worker's response and stderr channels until the connection yields its hello;
stderr is drained meanwhile (a worker that fills it would block before its hello) and its
last line explains a death.
"""

from __future__ import annotations

import select
import time

from .._errors import WorkerStartError
from .._wire.messages import StartupFailure, WorkerHello, escape_controls
from .connection import (
    NEED_DATA,
    ConnectionBroken,
    ConnectionClosed,
    WorkerConnection,
)
from .processes import WorkerProcess, WorkerSettings

DEFAULT_GREET_TIMEOUT = 10.0
# How long a worker whose stream ended may take to exit before its stderr is read.
EXIT_GRACE = 1.0
# max_output for a connection made here: callers that send requests pass their own.
DEFAULT_MAX_OUTPUT = 1 << 20


def last_stderr_line(worker: WorkerProcess) -> str:
    text = worker.stderr.text().strip()
    return escape_controls(text.splitlines()[-1][:500]) if text else "no output"


def await_hello(
    worker: WorkerProcess,
    connection: WorkerConnection,
    timeout: float = DEFAULT_GREET_TIMEOUT,
) -> WorkerHello:
    """Read ``worker``'s response channel into ``connection`` until its hello; raise
    WorkerStartError otherwise. The worker is left as it is: the caller closes it."""
    deadline = time.monotonic() + timeout
    poller = select.poll()
    poller.register(worker.stdout, select.POLLIN)
    poller.register(worker.stderr_fd, select.POLLIN)
    while True:
        event = connection.next_event()
        if isinstance(event, WorkerHello):
            return event
        if isinstance(event, StartupFailure):
            raise WorkerStartError(f"worker start-up failed: {event.reason}", cause=event.reason)
        if isinstance(event, ConnectionBroken):
            raise WorkerStartError(f"worker sent an invalid hello: {event.reason}", event.reason)
        if isinstance(event, ConnectionClosed):
            worker.wait(EXIT_GRACE)
            worker.drain_stderr()
            reason = f"exited during start-up: {last_stderr_line(worker)}"
            raise WorkerStartError(f"worker {reason}", cause=reason)
        if event is not NEED_DATA:
            reason = f"sent {type(event).__name__} before its hello"
            raise WorkerStartError(f"worker {reason}", cause=reason)
        left = deadline - time.monotonic()
        if left <= 0:
            reason = f"no hello within {timeout} s"
            raise WorkerStartError(f"worker {reason}", cause=reason)
        for fd, _ in poller.poll(left * 1000 + 1):
            if fd == worker.stderr_fd:
                if not worker.drain_stderr():
                    poller.unregister(fd)
            elif (data := worker.read_stdout()) is not None:
                connection.receive_data(data)


def launch_and_greet(
    settings: WorkerSettings,
    command: list[str] | None = None,
    timeout: float = DEFAULT_GREET_TIMEOUT,
    *,
    connection: WorkerConnection | None = None,
) -> tuple[WorkerProcess, WorkerHello]:
    """Start a worker and wait for its hello. Raises WorkerStartError (the worker is closed
    then). Pass ``connection`` to go on talking to the worker through it (it is IDLE after
    the hello); the caller closes the worker."""
    worker = WorkerProcess(settings, command)
    try:
        hello = await_hello(worker, connection or WorkerConnection(DEFAULT_MAX_OUTPUT), timeout)
    except BaseException:
        worker.close()
        raise
    return worker, hello
