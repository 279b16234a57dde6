"""A process that forks after its default pool exists, for tests/test_prefork.py: run as
``python tests/forking_parent.py SCENARIO``, it prints one JSON line of what it saw in the
parent and in the forked child.

Scenarios: ``idle`` (the pool is idle and no other thread runs), ``thread`` (another thread
is alive), ``in_flight`` (an asyncio call is running on the forking thread's own loop),
``given`` (the default pool was given with ``set_default_pool``), ``compat`` (the default
pool is gone and ``compat``'s pool for a ``max_stack``, idle, is the one at the fork).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from typing import Any

import jsonnet_worker
from jsonnet_worker import compat

LONG_CALL = "std.foldl(function(a, b) a + b, std.range(1, 400000), 0)"  # CPU, ~0.3 s
LONG_CALL_TIMEOUT = 60.0


def fd_targets(skip: set[int] = frozenset()) -> list[str]:  # type: ignore[assignment]
    """What each open fd refers to (sockets, pipes and pidfds by inode), but the directory
    listing's own fd and ``skip``."""
    targets = []
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except FileNotFoundError:  # the listing's own fd, closed by now
            continue
        if int(name) not in skip and not target.startswith("/proc/"):
            targets.append(target)
    return sorted(targets)


def pool_pids(pool: jsonnet_worker.WorkerPool) -> list[int]:
    stats = pool.stats()
    return [*stats.worker_pids, *([stats.template_pid] if stats.template_pid else [])]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def children(pid: int) -> set[int]:
    """The children of process ``pid``, whichever of its threads started them."""
    found: set[int] = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as listing:
            found |= {int(kid) for kid in listing.read().split()}
    return found


def fork_and_report(
    baseline: list[str], parent_pids: list[int], use_compat: bool = False
) -> dict[str, Any]:
    """Fork; the child reports its fds (before any call of its own), then one call's value
    and its own pool's pids (and a compat call's value); the parent, which of
    ``parent_pids`` live right after."""
    read_end, write_end = os.pipe()
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        try:
            report = {
                "fds": fd_targets(skip={write_end}),
                "value": jsonnet_worker.evaluate("2 + 2"),
            }
            report["pool_pids"] = pool_pids(jsonnet_worker.get_default_pool())
            report["baseline_fds"] = baseline
            if use_compat:
                report["compat"] = compat.evaluate_snippet("c", "5", max_stack=100)
        except BaseException as exc:
            report = {"error": repr(exc)}
        os.write(write_end, json.dumps(report).encode())
        if use_compat:  # no event loop here: the exit hook terminates the child's pools
            sys.exit(0)
        jsonnet_worker.get_default_pool().terminate()  # os._exit runs no exit hook
        os._exit(0)
    fork_seconds = time.monotonic() - started
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        child = json.loads(reader.read())
    os.waitpid(pid, 0)
    alive_after = [other for other in parent_pids if alive(other)]
    return {"child": child, "fork_seconds": fork_seconds, "alive_after_fork": alive_after}


def scenario(name: str) -> dict[str, Any]:
    baseline = fd_targets()
    if name == "given":
        jsonnet_worker.set_default_pool(jsonnet_worker.WorkerPool(1, spares=0))
    assert jsonnet_worker.evaluate("1 + 1") == 2
    pool = jsonnet_worker.get_default_pool()
    before = pool_pids(pool)
    if name == "compat":  # only compat's pool at the fork: its processes are our children
        previous = jsonnet_worker.set_default_pool(None)
        assert previous is not None
        previous.terminate()
        assert compat.evaluate_snippet("c", "4", max_stack=100) == "4\n"
        time.sleep(1.0)  # its spare started (the pids compared are those alive now)
        before = sorted(children(os.getpid()))
    report: dict[str, Any] = {"pool_pids": before}
    if name in ("idle", "given", "compat"):
        report |= fork_and_report(baseline, before, use_compat=name == "compat")
    elif name == "thread":
        stop = threading.Event()
        other = threading.Thread(target=stop.wait, name="application-thread")
        other.start()
        report |= fork_and_report(baseline, before)
        stop.set()
        other.join()
    elif name == "in_flight":
        report |= asyncio.run(fork_during_a_call(pool, baseline, before))
    else:
        raise SystemExit(f"unknown scenario {name}")
    report["same_pool"] = jsonnet_worker.get_default_pool() is pool
    report["value_after"] = jsonnet_worker.evaluate("3 + 3")
    report["children"] = sorted(children(os.getpid()))
    return report


async def fork_during_a_call(
    pool: jsonnet_worker.WorkerPool, baseline: list[str], before: list[int]
) -> Any:
    call = asyncio.ensure_future(jsonnet_worker.aevaluate(LONG_CALL, timeout=LONG_CALL_TIMEOUT))
    for _ in range(1000):  # at most ~10 s for the call to reach its worker
        if pool.stats().busy:
            break
        await asyncio.sleep(0.01)
    report = fork_and_report(baseline, before)
    report["busy_at_fork"] = pool.stats().busy
    report["call"] = await call
    return report


if __name__ == "__main__":
    print(json.dumps(scenario(sys.argv[1])))
