"""When a running call is looked at, and what is due then (``_pool/deadlines.py``), alone
with made-up times; then the CPU clock on a real pool: a call a stopped worker could not
run is not killed at its timeout, a looping call is (``clock == "cpu"``), and the wall
clock backstops a worker that never runs again.

No timed assertions: the real-pool tests check outcomes, never durations.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import threading

import pytest

from conftest import proc_stat, wait_until
from jsonnet_worker import EvaluationTimeout, InvalidArgument, WorkerPool
from jsonnet_worker._pool.deadlines import CPU_CLOCK_BACKSTOP, RECHECK, CallClock, Due

LOOP = (
    "local f(n) = if n == 0 then 0 else f(n - 1) + 0; "
    "std.foldl(function(a, b) a + f(300), std.range(1, 100000000), 0)"
)


# -- the rule alone ----------------------------------------------------------------------------


def test_on_the_wall_clock_the_deadline_is_the_timeout_whatever_the_cpu() -> None:
    clock = CallClock(100.0, 1.0, math.inf, "wall")
    assert clock.next_at == 101.0
    assert clock.look(100.5, 0.0) is Due.NOTHING
    assert clock.look(101.0, 0.0) is Due.EXPIRED and clock.expired_clock == "wall"


def test_demotion_counts_cpu_and_comes_once() -> None:
    clock = CallClock(0.0, 1.0, 0.05, "wall")
    assert clock.next_at == 0.05
    # Slowed down: 0.01 s of CPU in 0.05 s of wall time: looked at again when it could
    # have used the rest.
    assert clock.look(0.05, 0.01) is Due.NOTHING
    assert clock.next_at == pytest.approx(0.09)
    assert clock.look(0.09, 0.05) is Due.DEMOTE
    assert clock.next_at == 1.0  # never again: only the deadline is left
    # Unreadable CPU: the wall time decides.
    unread = CallClock(0.0, 1.0, 0.05, "wall")
    assert unread.look(0.05, None) is Due.DEMOTE


def test_on_the_cpu_clock_a_call_that_could_not_run_is_not_expired() -> None:
    clock = CallClock(0.0, 1.0, math.inf, "cpu")
    assert clock.wall_deadline == CPU_CLOCK_BACKSTOP
    # At two CPUs' rate it could have used its second at 0.5 s: looked at then.
    assert clock.next_at == 0.5
    assert clock.look(0.5, 0.1) is Due.NOTHING
    assert clock.next_at == pytest.approx(0.95)
    assert clock.look(1.5, 0.2) is Due.NOTHING  # past the wall timeout, little CPU used
    assert clock.look(2.0, 0.999) is Due.NOTHING
    assert clock.next_at == pytest.approx(2.0 + RECHECK)
    assert clock.look(2.005, 1.0) is Due.EXPIRED and clock.expired_clock == "cpu"


def test_on_the_cpu_clock_the_wall_clock_is_a_backstop() -> None:
    clock = CallClock(0.0, 1.0, math.inf, "cpu")
    for now in (0.5, 1.0, 2.0, 3.0, 3.9):
        assert clock.look(now, 0.0) is Due.NOTHING
    assert clock.look(CPU_CLOCK_BACKSTOP, 0.0) is Due.EXPIRED
    assert clock.expired_clock == "wall"


def test_on_the_cpu_clock_an_unreadable_cpu_falls_back_to_the_wall_timeout() -> None:
    clock = CallClock(0.0, 1.0, math.inf, "cpu")
    assert clock.look(0.5, None) is Due.NOTHING
    assert clock.next_at == 1.0
    assert clock.look(1.0, None) is Due.EXPIRED and clock.expired_clock == "wall"


def test_an_unknown_clock_is_refused() -> None:
    with pytest.raises(ValueError):
        CallClock(0.0, 1.0, math.inf, "sundial")
    with pytest.raises(InvalidArgument, match="timeout_clock"):
        WorkerPool(1, timeout_clock="sundial")


# -- a real pool -------------------------------------------------------------------------------


@pytest.mark.parametrize("use_async", [False, True], ids=["blocking", "asyncio"])
def test_a_stopped_worker_is_not_killed_as_a_slow_snippet_on_the_cpu_clock(
    use_async: bool,
) -> None:
    """The worker cannot run for longer than the call's timeout (stopped, as a worker on a
    very busy machine waits for a CPU), then answers: on the CPU clock the call succeeds
    and the worker stays; on the wall clock the same call times out."""
    for clock, succeeds in (("cpu", True), ("wall", False)):
        with WorkerPool(1, spares=0, timeout=0.5, timeout_clock=clock) as pool:
            assert pool.evaluate("1") == 1
            (pid,) = pool.stats().worker_pids
            _stop(pid)
            resume = threading.Timer(0.9, _continue, (pid,))
            resume.start()
            try:
                if use_async:
                    outcome: object = asyncio.run(_aevaluate(pool, "2 + 2"))
                else:
                    outcome = _evaluate(pool, "2 + 2")
            finally:
                resume.join()
                _continue(pid)
            if succeeds:
                assert outcome == 4, outcome
                assert pool.stats().worker_pids == (pid,)
            else:
                assert isinstance(outcome, EvaluationTimeout), outcome
                assert outcome.clock == "wall"


@pytest.mark.parametrize("use_async", [False, True], ids=["blocking", "asyncio"])
def test_a_looping_call_ends_on_the_cpu_clock(use_async: bool) -> None:
    # Not demoted: at SCHED_IDLE on a busy machine it could use its CPU too slowly to end
    # before the backstop, which is the next test's case.
    with WorkerPool(1, spares=0, timeout=0.3, timeout_clock="cpu", interactive_budget=None) as pool:
        if use_async:
            outcome: object = asyncio.run(_aevaluate(pool, LOOP))
        else:
            outcome = _evaluate(pool, LOOP)
        assert isinstance(outcome, EvaluationTimeout), outcome
        assert outcome.clock == "cpu"
        assert "CPU clock" in str(outcome)
        assert pool.evaluate("1 + 1") == 2  # the killed worker was replaced


def test_a_worker_that_never_runs_again_ends_at_the_wall_clock_backstop() -> None:
    with WorkerPool(1, spares=0, timeout=0.2, timeout_clock="cpu") as pool:
        assert pool.evaluate("1") == 1
        (pid,) = pool.stats().worker_pids
        _stop(pid)
        try:
            outcome = _evaluate(pool, "2 + 2")
        finally:
            _continue(pid)
        assert isinstance(outcome, EvaluationTimeout), outcome
        assert outcome.clock == "wall"
        assert "backstop" in str(outcome)
        assert pool.evaluate("1 + 1") == 2


def _evaluate(pool: WorkerPool, snippet: str) -> object:
    try:
        return pool.evaluate(snippet)
    except EvaluationTimeout as exc:
        return exc


async def _aevaluate(pool: WorkerPool, snippet: str) -> object:
    try:
        return await pool.aevaluate(snippet)
    except EvaluationTimeout as exc:
        return exc


def _stop(pid: int) -> None:
    """SIGSTOP ``pid`` and wait until it is stopped: the signal lands asynchronously, and a
    worker spinning for its next request could answer one before it does."""
    os.kill(pid, signal.SIGSTOP)
    wait_until(lambda: _state(pid) == "T")


def _state(pid: int) -> str:
    return proc_stat(pid)[0]


def _continue(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:  # killed at its deadline and reaped
        pass
