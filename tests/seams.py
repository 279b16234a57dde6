"""The one seam between the tests and the pool's private parts.

Tests drive the real thing through the public API wherever they can. Where a test must see or
do something inside a pool that no public call offers (which worker is busy right now, run a
function on the supervisor's thread), it calls a function here instead of reaching into a
private attribute. So:

- this is the only test module allowed private access (ruff's SLF001 is ignored for this file
  alone, in pyproject.toml); every other test, harness and benchmark uses these functions;
- when the pool's internals change, this file changes, not the tests;
- each seam says what it exposes; add one here (with its docstring) rather than a
  ``pool._something`` in a test.

The seams are read-only views or actions a caller could also cause from outside (killing a
worker by its pid is the test's own doing, with ``os.kill``); none of them changes the pool's
state behind its back (``hold_idle_workers`` checks workers out through the pool's own
transitions, as a call would). ``pool_of`` starts a pool whose workers come from a test
harness, or are re-executed, instead of forked from the real template.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from jsonnet_worker import WorkerPool
from jsonnet_worker._pool import calls, exchange
from jsonnet_worker._pool.connection import ConnectionState
from jsonnet_worker._pool.exchange import NO_TENANT, Outcome, Worker
from jsonnet_worker._pool.facade import ThreadTicket
from jsonnet_worker._pool.identities import WorkerIdentities
from jsonnet_worker._pool.origin import FORKED, ForkedWorkers, ReExecWorkers, WorkerOrigin
from jsonnet_worker._pool.state import Ticket, WorkerStatus

STATUSES = tuple(status.value for status in WorkerStatus)


def re_exec(command: list[str] | None = None) -> WorkerOrigin:
    """Workers for ``pool_of``: each a fresh interpreter running ``command`` (a harness's
    worker, tests/harness), or the real worker when None (the path a host without what the
    template needs takes: tests and benchmarks compare it with forked workers)."""
    return ReExecWorkers(command)


def forked() -> WorkerOrigin:
    """Workers for ``pool_of``: forks of the real template, as a ``WorkerPool`` has by default
    (benchmarks compare it with ``re_exec()``)."""
    return FORKED


def forked_from(fork_server_command: list[str]) -> WorkerOrigin:
    """Workers for ``pool_of``: forks of the fork server ``fork_server_command`` runs (a
    harness's, tests/harness)."""
    return ForkedWorkers(fork_server_command)


def pool_of(origin: WorkerOrigin, size: int | None = None, **options: Any) -> WorkerPool:
    """``WorkerPool(size, **options)`` whose workers come from ``origin`` (``re_exec``,
    ``forked_from``) instead of forks of the real template."""
    return WorkerPool(size, _origin=origin, **options)


def workers(pool: WorkerPool, status: str) -> list[Worker]:
    """The pool's workers whose place in the pool is ``status`` ("starting", "spare", "idle",
    "busy", "dying"), at one instant (under the pool's lock)."""
    wanted = WorkerStatus(status)
    return [worker for worker, now, *_ in pool._state.roster().members if now is wanted]


def worker_pids(pool: WorkerPool, status: str) -> list[int]:
    """The pids of ``workers(pool, status)``: e.g. the busy worker to kill mid-call, or the
    spare (which ``stats().worker_pids`` does not tell apart)."""
    return [worker.pid for worker in workers(pool, status)]


def run_on_supervisor(pool: WorkerPool, function: Callable[[], object]) -> object:
    """Run ``function`` on the pool's supervisor thread and return what it returned: the
    thread that spawns every worker (the host sandbox tests check what it may read)."""
    return pool.run_on_supervisor(function)


def worker_identities(pool: WorkerPool) -> WorkerIdentities:
    """The pool's uid allocator (``worker_user`` as a range): how many of its uids are held
    by live workers right now (``in_use()``), so a test sees a dead worker's uid come back."""
    return pool._supervisor.settings.identities


def hold_idle_workers(pool: WorkerPool) -> list[Ticket]:
    """Check out every idle worker at once, each held by one ticket (sequential calls would
    all reach the same worker: the idle list is last in, first out). Give each back with
    ``call_on`` or ``give_back``."""
    tickets: list[Ticket] = []
    while True:
        ticket = ThreadTicket(None, NO_TENANT)
        if not pool._state.take(ticket):
            return tickets
        tickets.append(ticket)


def call_on(pool: WorkerPool, ticket: Ticket, snippet: str, ext_vars: dict[str, Any]) -> Any:
    """One evaluation on the worker ``ticket`` holds, through the pool's own exchange and
    settle (the worker is checked back in, or discarded, as after any call)."""
    variables = exchange.Variables(ext_vars=ext_vars)
    ticket.call = pool._prepare_eval(
        snippet, variables, "seams.jsonnet", 10.0, None, None, None, None, None
    )
    outcome = pool._exchange(ticket)
    return calls.settle(pool._state, pool._supervisor.perform, ticket, outcome).value


def give_back(pool: WorkerPool, ticket: Ticket) -> None:
    """Check in a worker ``hold_idle_workers`` took, unused (a call that ended without an
    answer or an error: nothing is counted)."""
    pool._supervisor.perform(pool._state.settle(ticket.worker, Outcome(keep=True)))


def pids_in_call(pool: WorkerPool) -> list[int]:
    """The busy workers whose caller has written its request (their conversation awaits the
    answer): a kill now lands during the evaluation, not between check-out and request,
    where the pool moves the call to another worker instead."""
    return [
        worker.pid
        for worker in workers(pool, "busy")
        if worker.connection.state is ConnectionState.AWAITING_ANSWER
    ]
