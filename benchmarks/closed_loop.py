"""Calls/s of a call made in a closed loop by a few threads: the benchmarks' one rate loop
(``run.throughput``, ``bench_tenants``); a call made at a steady pace (``paced``: a victim
tenant's calls in ``bench_tenants`` and ``bench_service``); and, run as a script, one
tree's one-tenant rate in a fresh process (``bench_tenants --baseline``).

This module imports the standard library only, so that the script can run in a process
whose ``jsonnet_worker`` comes from another checkout (PYTHONPATH names it first; running a
file by its path puts this directory, not the repository, first on ``sys.path``):

    python benchmarks/closed_loop.py '[snippet, ext_codes, filename, callers, seconds]'

warms a default ``WorkerPool()`` up (200 calls, then 0.5 s), measures ``callers`` threads of
tenant "solo" for ``seconds`` and prints ``[jsonnet_worker.__file__, calls/s]`` as JSON.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from typing import TypeVar

MAX_CALLS = 100_000  # a thread stops after this many calls, whatever the time
T = TypeVar("T")


def bounded_rate(
    call: Callable[[], object],
    callers: int,
    seconds: float,
    max_calls: int = MAX_CALLS,
    join_timeout: float | None = None,
) -> float:
    """Calls/s with ``callers`` threads in a closed loop, for ``seconds`` (and at most
    ``max_calls`` calls per thread); each thread is waited for ``seconds + join_timeout``
    at most (None: until it ends)."""
    stop = time.monotonic() + seconds
    counts = [0] * callers

    def loop(index: int) -> None:
        for _ in range(max_calls):
            if time.monotonic() >= stop:
                return
            call()
            counts[index] += 1

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(callers)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(None if join_timeout is None else seconds + join_timeout)
    return sum(counts) / (time.monotonic() - started)


def paced(call: Callable[[], T], calls: int, period: float, window: float) -> list[tuple[float, T]]:
    """``call`` made every ``period`` seconds (the next one ``period`` after the last one
    started, at once when that one took longer), at most ``calls`` times and ``window``
    seconds: each call's seconds, from its own start, and what it returned."""
    results: list[tuple[float, T]] = []
    end = time.monotonic() + window
    next_start = time.monotonic()
    for _ in range(calls):
        now = time.monotonic()
        if now >= end:
            break
        if next_start > now:
            time.sleep(next_start - now)
        next_start = time.monotonic() + period
        began = time.perf_counter()
        result = call()
        results.append((time.perf_counter() - began, result))
    return results


def one_tenant_rate(
    snippet: str, ext_codes: dict[str, str], filename: str, callers: int, seconds: float
) -> float:
    """``callers`` threads of tenant "solo" on a default pool, warmed up first."""
    from jsonnet_worker import WorkerPool

    with WorkerPool() as pool:

        def call() -> object:
            return pool.evaluate_json(
                snippet, ext_codes=ext_codes, filename=filename, tenant="solo"
            )

        for _ in range(200):
            call()
        time.sleep(0.5)
        return bounded_rate(call, callers, seconds)


if __name__ == "__main__":
    import jsonnet_worker

    rate = one_tenant_rate(*json.loads(sys.argv[1]))
    print(json.dumps([jsonnet_worker.__file__, rate]))
