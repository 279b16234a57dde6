"""Calls/s of a call made in a closed loop by a few threads: the benchmarks' one rate loop
(``run.throughput``, ``bench_tenants``), and, run as a script, one tree's one-tenant rate in
a fresh process (``bench_tenants --baseline``).

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

MAX_CALLS = 100_000  # a thread stops after this many calls, whatever the time


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
