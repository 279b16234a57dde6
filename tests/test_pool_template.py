"""The pool's workers come from its template (issue 14): spares, replacements, tenant switches
and recycles are forks; a dead template is respawned and costs no call; a host that refuses
forking gets re-exec workers and says why. Real pools, real processes."""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

import seams
from conftest import full, proc_stat, wait_until
from jsonnet_worker import WorkerPool
from jsonnet_worker._config import PoolConfig
from jsonnet_worker._pool.forking import ForkedWorker, WorkerSource, fork_server_command
from jsonnet_worker._pool.forkserver_policy import CHECK_INTERVAL
from jsonnet_worker._pool.processes import settings_for
from jsonnet_worker._sandbox.landlock import probe
from jsonnet_worker._wire.layers import LayerState

HARNESS = Path(__file__).parent / "harness" / "template_harness.py"
LANDLOCK = probe()
pytestmark = pytest.mark.skipif(
    not LANDLOCK.available or LANDLOCK.abi < 6,
    reason="forked workers need Landlock with the signal scope (ABI 6)",
)


def harness(mode: str) -> list[str]:
    real = fork_server_command(settings_for(PoolConfig(size=1)))
    assert real[3] == "-c" and real[5] == "_template"
    return [sys.executable, "-I", str(HARNESS), mode, *real[6:]]


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("PPid:"):
                return int(line.split()[1])
    raise AssertionError(f"no PPid for {pid}")


def wait_for(condition: object, what: str, bound: float = 20.0) -> None:
    """Bounded polling for a state the supervisor reaches on its own (not a timed assertion:
    the bound only stops a broken run)."""
    deadline = time.monotonic() + bound
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"never: {what}")
        time.sleep(0.01)


def test_the_pools_workers_are_forks_of_its_template() -> None:
    with WorkerPool(1, spares=1) as pool:
        assert pool.evaluate("1 + 1") == 2
        wait_for(lambda: pool.stats().spares == 1, "the spare")  # started after the first
        stats = pool.stats()
        assert stats.template_pid is not None and stats.forks >= 2 and stats.fork_fallbacks == 0
        assert pool.sandbox is not None and pool.sandbox.template is not None
        assert pool.sandbox.template.state is LayerState.ACTIVE, pool.sandbox.template
        assert "template" in pool.sandbox.summary()
        # CLONE_PARENT: each worker is the pool's child, not the template's
        for pid in stats.worker_pids:
            assert parent_of(pid) == os.getpid()
        assert parent_of(stats.template_pid) == os.getpid()
        assert stats.template_pid not in stats.worker_pids


def test_tenant_switches_and_recycles_get_forked_workers() -> None:
    with WorkerPool(1, spares=1, max_calls_per_worker=2) as pool:
        before = pool.stats()
        for call in range(6):
            assert pool.evaluate(f"{call} * 2", tenant=f"tenant-{call}") == call * 2
        for _ in range(4):
            assert pool.evaluate("std.length('abc')", tenant="same") == 3
        # The last recycle's replacement starts after the call returns (a fork, slower on a
        # loaded machine): counted once it has said hello.
        wait_until(lambda: full(pool))
        after = pool.stats()
        assert after.recycles >= 6 + 1, after
        assert after.forks >= before.forks + after.recycles - before.recycles, after
        assert after.fork_fallbacks == 0 and after.template_starts == 1, after
        template = after.template_pid
        assert template is not None
        for pid in after.worker_pids:
            assert parent_of(pid) == os.getpid()


def test_forcing_re_exec_workers_says_so() -> None:
    with seams.pool_of(seams.re_exec(), 1, spares=1) as pool:
        assert pool.evaluate("3") == 3
        stats = pool.stats()
        assert stats.template_pid is None and stats.forks == 0 and stats.template_starts == 0
        assert pool.sandbox is not None and pool.sandbox.template is not None
        assert pool.sandbox.template.state is LayerState.MISSING
        assert "forking is off" in pool.sandbox.template.reason


def test_a_host_that_refuses_the_fork_gets_re_exec_workers_and_a_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="jsonnet_worker")
    with seams.pool_of(seams.forked_from(harness("clone-refused")), 1, spares=1) as pool:
        assert pool.evaluate("[1, 2]", tenant="a") == [1, 2]
        assert pool.evaluate("[3]", tenant="b") == [3]
        stats = pool.stats()
        assert stats.forks == 0 and stats.fork_fallbacks >= 3 and stats.template_pid is None
        assert stats.template_starts == 1  # a permanent refusal: never tried again
        layer = pool.sandbox.template if pool.sandbox else None
        assert layer is not None and layer.state is LayerState.MISSING
        assert "cannot fork" in layer.reason, layer.reason
    assert any("forked workers are unavailable" in r.getMessage() for r in caplog.records)


def test_the_template_is_replaced_on_demand_and_its_workers_serve_on() -> None:
    with WorkerPool(1, spares=1) as pool:
        assert pool.evaluate("1") == 1
        first = pool.stats()
        pool.replace_template()
        second = pool.stats()
        assert second.template_pid not in (None, first.template_pid)
        assert second.template_starts == first.template_starts + 1
        assert first.template_pid is not None
        wait_for(lambda: not os.path.exists(f"/proc/{first.template_pid}"), "old template reaped")
        assert pool.evaluate("2", tenant="other") == 2
        assert pool.stats().fork_fallbacks == 0


def zombie_children() -> set[int]:
    """This process's children that have exited and are not reaped."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = proc_stat(entry)
            except OSError:
                continue
            if fields[0] == "Z" and int(fields[1]) == os.getpid():
                found.add(int(entry))
    return found


def test_templates_dying_in_mid_fork_cost_no_worker_and_leave_no_zombie() -> None:
    before = zombie_children()
    # Every template started exits right after its first clone, before it sends the pidfd.
    with seams.pool_of(seams.forked_from(harness("die-after-clone")), 2, spares=1) as pool:
        for call in range(4):
            assert pool.evaluate(f"{call} + 1", tenant=f"t{call}") == call + 1
        stats = pool.stats()
        assert stats.forks >= 1 and stats.template_starts >= 1, stats
        for pid in stats.worker_pids:
            assert parent_of(pid) == os.getpid()
        workers = set(stats.worker_pids)
    wait_for(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in workers), "reaped")
    assert zombie_children() <= before


def test_killing_the_template_under_load_loses_no_call() -> None:
    """Four threads call with a new tenant each time (every call needs a new worker) while
    the template is SIGKILLed three times; every call gets its own answer, the template is
    respawned after each death, and new workers are forks again afterwards."""
    calls_per_thread = 25
    errors: list[str] = []
    with WorkerPool(2, spares=2, timeout=30) as pool:

        def caller(index: int) -> None:
            for call in range(calls_per_thread):
                value = index * 1000 + call
                try:
                    got = pool.evaluate(f"{value} + 0", tenant=f"t{index}-{call}")
                except Exception as exc:
                    errors.append(f"{value}: {exc!r}")
                    continue
                if got != value:
                    errors.append(f"{value}: got {got!r}")

        threads = [threading.Thread(target=caller, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        killed: list[int] = []
        for _ in range(3):
            wait_for(lambda: pool.stats().template_pid not in (None, *killed), "a new template")
            pid = pool.stats().template_pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            time.sleep(0.05)
        for thread in threads:
            thread.join(120)
            assert not thread.is_alive()
        assert errors == []
        wait_for(lambda: pool.stats().template_pid not in (None, *killed), "a respawned template")
        stats = pool.stats()
        assert stats.template_starts >= 4, stats
        assert stats.evaluations == 4 * calls_per_thread
        # New workers are forks again (a never-used worker takes a new tenant without a
        # spawn, so a few calls may pass before one is needed).
        forks = stats.forks
        for call in range(20):
            assert pool.evaluate(f"{call}", tenant=f"after-{call}") == call
            if pool.stats().forks > forks:
                break
        assert pool.stats().forks > forks, pool.stats()


def test_every_thread_of_a_pools_forked_worker_is_in_its_own_domain() -> None:
    """test_template's method through a real pool: a process cloned into exactly the worker's
    domain can signal every thread of that worker and neither the template nor a sibling."""
    with seams.pool_of(seams.forked_from(harness("domain-probe")), 1, spares=1) as pool:
        pid = pool.evaluate("result = __import__('os').getpid()")
        stats = pool.stats()
        template = stats.template_pid
        assert template is not None and pid in stats.worker_pids
        wait_for(lambda: len(pool.stats().worker_pids) == 2, "the spare")
        sibling = next(other for other in pool.stats().worker_pids if other != pid)
        tids = sorted(int(tid) for tid in os.listdir(f"/proc/{pid}/task"))
        assert len(tids) > 2  # the main thread, the loop thread and the Go runtime's
        targets = [[pid, tid] for tid in tids] + [[template, template], [sibling, sibling]]
        answer = pool.evaluate(f"result = probe({targets!r})")
        os.waitpid(answer["probe"], 0)  # the probe is our child too (CLONE_PARENT)
        assert answer["errors"] == [0] * len(tids) + [errno.EPERM, errno.EPERM]


def test_a_template_near_its_cpu_limit_is_replaced_and_its_workers_serve_on() -> None:
    """The share is made tiny so that the first tending finds the template due (a real
    template needs hundreds of forks to use half a second of CPU); the source's clock is
    moved on to that tending."""
    settings = settings_for(PoolConfig(size=1, cpu_budget=1.0))
    now = [1000.0]
    source = WorkerSource(settings, cpu_share=1e-9, clock=lambda: now[0])
    try:
        worker = source.spawn()
        try:
            first = source.fork_server
            assert isinstance(worker, ForkedWorker) and first is not None
            pid = first.pid
            spent = first.cpu_at_hello
            for _ in range(20):  # a fork or two: the template's clock counts nanoseconds
                used = first.cpu_seconds()
                if used is not None and used > spent:
                    break
                source.spawn().close()
            now[0] += CHECK_INTERVAL
            source.maintain()
            assert source.fork_server is not None and source.fork_server.pid != pid
            assert source.stats().fork_server_starts == 2
            assert worker.exited() is False  # the old template's worker lives on
        finally:
            worker.close()
    finally:
        source.close()
