"""Orderly shutdowns are quiet (issue 23, item 2): a worker the pool itself kills at
``close()``, ``terminate()`` or the exit hook is no death to warn of or to count; a real
death (a worker killed from outside) still is."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest

from conftest import wait_until
from jsonnet_worker import PoolClosed, WorkerPool

LONG = "std.foldl(function(a, b) a + b, std.range(1, 100000000), 0)"


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_close_and_terminate_log_no_warning(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="jsonnet_worker")
    with WorkerPool(2) as pool:
        assert pool.evaluate("1") == 1
    closed = WorkerPool(2)
    assert closed.evaluate("1") == 1
    outcome: list[BaseException] = []

    def busy() -> None:
        try:
            closed.evaluate(LONG, timeout=30)
        except BaseException as exc:
            outcome.append(exc)

    caller = threading.Thread(target=busy)
    caller.start()
    wait_until(lambda: closed.stats().busy == 1)
    closed.terminate()
    caller.join(30)
    assert len(outcome) == 1 and isinstance(outcome[0], PoolClosed)
    assert warnings(caplog) == []
    assert closed.stats().crashes == 0


def test_a_real_death_is_still_reported(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="jsonnet_worker")
    with WorkerPool(1, spares=0) as pool:
        assert pool.evaluate("1") == 1
        (pid,) = pool.stats().worker_pids
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: pool.stats().crashes == 1)
        assert pool.evaluate("2") == 2
    assert any(f"worker {pid}: idle worker died" in message for message in warnings(caplog))


def test_the_exit_hook_logs_no_warning() -> None:
    """A pool nobody closed is terminated by the exit hook: its workers' ends are not
    reported as deaths. Whether the supervisor sees them end before the interpreter does
    is a race, so the program runs a few times (before the fix, most runs warned)."""
    program = textwrap.dedent(
        """
        import logging, sys
        logging.basicConfig(level=logging.INFO, stream=sys.stderr)
        from jsonnet_worker import WorkerPool
        pool = WorkerPool(2)
        assert pool.evaluate("1") == 1
        print("evaluated", flush=True)
        """
    )
    for _ in range(RUNS):
        done = subprocess.run(
            [sys.executable, "-c", program],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert "evaluated" in done.stdout
        assert "WARNING" not in done.stderr, done.stderr


RUNS = 6
