"""Helpers the adversarial tests share: waiting for a full pool, asking every worker of a
pool for an answer, and the parent's resident memory."""

from __future__ import annotations

import os
import time

import seams
from jsonnet_worker import WorkerPool

PAGE = os.sysconf("SC_PAGE_SIZE")


def wait_full(
    pool: WorkerPool,
    timeout: float = 15.0,
    *,
    capacity_only: bool = False,
    without: int | None = None,
) -> float:
    """Wait until the pool is back to full size: ``pool.size`` workers serving calls (none
    of them the killed worker ``without``) and, unless ``capacity_only``, its spares started
    too; returns the seconds waited."""
    started = time.monotonic()
    while True:
        stats = pool.stats()
        if (
            stats.alive == pool.size
            and without not in stats.worker_pids
            and (capacity_only or (stats.starting == 0 and stats.spares == pool.spares))
        ):
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"pool not back to full size within {timeout} s: {stats}")
        time.sleep(0.0005)


def each_worker_answers(pool: WorkerPool) -> int:
    """Check out every worker of a full, quiet pool at once and have each answer its own
    request correctly; returns how many answered. (Sequential calls would all reach the
    same worker: the idle list is last in, first out.)"""
    wait_full(pool)
    tickets = seams.hold_idle_workers(pool)
    assert len(tickets) == pool.size, "the pool is not quiet"
    answered = 0
    try:
        while tickets:
            ticket = tickets.pop()
            value = seams.call_on(pool, ticket, "{n: std.extVar('n') + 1}", {"n": answered})
            assert value == {"n": answered + 1}
            answered += 1
    finally:
        for ticket in tickets:
            seams.give_back(pool, ticket)
    return answered


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE
