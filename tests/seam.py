"""The one test seam: the only place tests reach into a pool's private state.

Tests that need to know which worker is busy, idle or a spare, or to hold every idle worker
at once, go through these functions, so that a change to the pool's insides is mended here
and nowhere else.
"""

from __future__ import annotations

from typing import Any

from jsonnet_worker import WorkerPool
from jsonnet_worker._pool import ThreadTicket
from jsonnet_worker._state import NO_TENANT, Status


def pids(pool: WorkerPool, status: str) -> list[int]:
    """The pids of the pool's workers in ``status`` ("busy", "idle", "spare", "starting")."""
    state = pool._state
    with state.lock:
        return [m.worker.pid for m in state.members.values() if m.status is Status(status)]


def hold_idle_workers(pool: WorkerPool) -> list[ThreadTicket]:
    """Check out every idle worker at once (sequential calls would all reach the same worker:
    the idle list is last in, first out); each ticket holds one."""
    tickets = []
    while True:
        ticket = ThreadTicket(None, NO_TENANT)
        if not pool._state.take(ticket):
            return tickets
        tickets.append(ticket)


def call_on(pool: WorkerPool, ticket: ThreadTicket, snippet: str, ext_vars: dict[str, Any]) -> Any:
    """Run one evaluation on the worker ``ticket`` holds, and check the worker back in."""
    from jsonnet_worker._protocol import Action

    ticket.call = pool._prepare(
        Action.EVAL, snippet, ext_vars, None, None, None, "seam.jsonnet", 10.0, None
    )
    return pool._settle(ticket, pool._exchange(ticket)).value


def give_back(pool: WorkerPool, ticket: ThreadTicket) -> None:
    pool._supervisor.perform(pool._state.check_in(ticket.worker))
