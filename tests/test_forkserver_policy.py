"""The fork server's lifecycle policy alone, with a fake clock and fake fork servers: every
transition, the back-off, refusals and the races, with no process started.

Each test plays one story as ``forking.WorkerSource`` would drive the policy (``Driver``: it
starts fake fork servers when asked and closes the ones named), then checks the state, the
effects and that every fork server started is closed exactly once.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import pytest

from jsonnet_worker._pool.backoff import BACKOFF_FIRST, BACKOFF_MAX, backoff_delay
from jsonnet_worker._pool.forkserver_policy import (
    CHECK_INTERVAL,
    RETIRE_GRACE,
    CloseForkServer,
    Effect,
    ForkServerPolicy,
    ForkServerState,
    Log,
    Next,
    SourceStats,
    StartForkServer,
)
from jsonnet_worker._wire.layers import LayerState


@dataclass(eq=False)
class FakeForkServer:
    pid: int
    cpu_at_hello: float = 0.0
    closed_with: float | None = None  # the grace it was closed with
    closes: int = 0


class Driver:
    """A policy and the fake fork servers its effects start and close, at a fake time.
    ``start_fails`` makes the next starts fail: (reason, permanent) each."""

    def __init__(self, cpu_budget: float | None = None, uid_range: bool = False) -> None:
        self.policy = ForkServerPolicy(cpu_budget=cpu_budget, uid_range=uid_range)
        self.now = 1000.0
        self.next_pid = 100
        self.servers: list[FakeForkServer] = []
        self.start_fails: list[tuple[str, bool]] = []
        self.logs: list[Log] = []

    @property
    def up(self) -> FakeForkServer | None:
        live = [server for server in self.servers if not server.closes]
        assert len(live) <= 1, "two fork servers up at once"
        return live[0] if live else None

    def perform(self, effects: list[Effect]) -> list[Effect]:
        for effect in effects:
            if isinstance(effect, StartForkServer):
                self.start()
            elif isinstance(effect, CloseForkServer):
                (server,) = [s for s in self.servers if s.pid == effect.pid]
                server.closes += 1
                server.closed_with = effect.grace
            else:
                self.logs.append(effect)
        return effects

    def start(self) -> None:
        if self.start_fails:
            reason, permanent = self.start_fails.pop(0)
            self.perform(self.policy.start_failed(reason, permanent, self.now))
            return
        self.next_pid += 1
        server = FakeForkServer(self.next_pid)
        self.servers.append(server)
        self.policy.started(server.pid, server.cpu_at_hello, self.now)

    def spawn(self) -> str:
        """What ``WorkerSource.spawn`` does: "fork" or "re-exec"."""
        step = self.policy.next_worker(self.now)
        if step is Next.START:
            self.start()
            step = self.policy.next_worker(self.now)
        if step is Next.FORK:
            self.policy.forked()
            return "fork"
        self.policy.re_executed()
        return "re-exec"

    def fork_fails(self, reason: str, permanent: bool) -> list[Effect]:
        server = self.up
        assert server is not None
        return self.perform(self.policy.fork_failed(server.pid, reason, permanent, self.now))

    def dies(self, server: FakeForkServer, how: str = "killed by SIGKILL") -> list[Effect]:
        return self.perform(self.policy.died(server.pid, how, self.now))

    def every_server_closed_once(self) -> bool:
        return all(server.closes == 1 for server in self.servers)


def delays(logs: list[Log]) -> list[float]:
    return [log.args[1] for log in logs if log.message.startswith("jsonnet_worker: the fork")]


# -- the back-off helper -----------------------------------------------------------------------


def test_the_back_off_doubles_from_its_first_delay_to_its_cap() -> None:
    assert [backoff_delay(n) for n in range(1, 9)] == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]
    assert backoff_delay(1) == BACKOFF_FIRST and backoff_delay(1000) == BACKOFF_MAX


# -- starting ----------------------------------------------------------------------------------


def test_the_first_worker_starts_the_fork_server_and_is_its_fork() -> None:
    driver = Driver()
    policy = driver.policy
    assert policy.next_worker(driver.now) is Next.START and policy.check_at == 0.0
    assert policy.status().reason == "re-exec workers: no fork server started yet"
    assert driver.spawn() == "fork"
    assert policy.state is ForkServerState.FORKING and policy.pid == 101
    assert driver.spawn() == "fork"
    status = policy.status()
    assert status.name == "template" and status.state is LayerState.ACTIVE
    assert "fork server pid 101" in status.detail and "2 forked" in status.detail
    assert policy.stats() == SourceStats(101, 2, 0, 1)


def test_a_failed_start_backs_off_doubling_to_the_cap_with_re_exec_workers_meanwhile() -> None:
    driver = Driver()
    driver.start_fails = [("the fork server exited", False)] * 8
    for expected in [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]:
        assert driver.spawn() == "re-exec"
        assert driver.policy.retry_at == pytest.approx(driver.now + expected)
        assert driver.policy.next_worker(driver.now + expected / 2) is Next.RE_EXEC
        assert driver.policy.check_at == driver.policy.retry_at  # the supervisor wakes then
        driver.now = driver.policy.retry_at
    assert delays(driver.logs) == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]
    assert driver.spawn() == "fork"  # the ninth start succeeds
    assert driver.policy.stats().fork_server_starts == 9 and driver.policy.fallbacks == 8
    driver.dies(driver.servers[0])
    assert driver.policy.retry_at == pytest.approx(driver.now + BACKOFF_FIRST)  # reset


def test_a_start_that_fails_for_good_refuses_forking_with_the_reason() -> None:
    driver = Driver()
    driver.start_fails = [("forked workers refused: no Landlock layer", True)]
    assert driver.spawn() == "re-exec"
    policy = driver.policy
    assert policy.state is ForkServerState.REFUSED and policy.check_at == math.inf
    assert policy.status().reason == "re-exec workers: forked workers refused: no Landlock layer"
    (log,) = driver.logs
    assert log.level == logging.WARNING and "unavailable on this host" in log.message
    driver.now += 3600
    assert driver.spawn() == "re-exec" and policy.tend(driver.now) == []
    assert policy.replace(driver.now) == [] and not driver.servers


def test_an_interrupted_start_changes_nothing_and_is_tried_again() -> None:
    """The driver was interrupted while it started a fork server (which closed itself):
    nothing was reported, so the next spawn starts one."""
    driver = Driver()
    assert driver.policy.next_worker(driver.now) is Next.START
    assert driver.policy.next_worker(driver.now) is Next.START  # a question changes nothing
    assert driver.policy.stats() == SourceStats(None, 0, 0, 0)
    assert driver.spawn() == "fork"


def test_a_uid_range_never_forks() -> None:
    driver = Driver(uid_range=True)
    assert driver.spawn() == "re-exec" and not driver.servers
    assert driver.policy.state is ForkServerState.REFUSED
    assert "uid range" in driver.policy.status().reason


# -- forking -----------------------------------------------------------------------------------


def test_a_clone_refused_by_the_kernel_falls_back_to_re_exec_for_good_with_the_reason() -> None:
    driver = Driver()
    driver.spawn()
    server = driver.up
    assert server is not None
    reason = "the fork server cannot fork: clone(CLONE_PARENT|CLONE_PIDFD): Operation not permitted"
    effects = driver.fork_fails(reason, permanent=True)
    assert effects[0] == CloseForkServer(server.pid, 0.0)
    assert driver.policy.state is ForkServerState.REFUSED and driver.policy.pid is None
    assert driver.policy.status().reason == f"re-exec workers: {reason}"
    assert driver.logs[-1].level == logging.WARNING
    driver.now += 3600
    assert driver.spawn() == "re-exec" and driver.every_server_closed_once()


def test_a_fork_that_fails_once_closes_the_fork_server_and_backs_off() -> None:
    driver = Driver()
    driver.spawn()
    server = driver.up
    assert server is not None
    driver.fork_fails("the fork server exited (killed by SIGKILL)", permanent=False)
    assert server.closed_with == 0.0 and driver.policy.state is ForkServerState.WAITING
    assert driver.spawn() == "re-exec"
    driver.now += BACKOFF_FIRST
    assert driver.spawn() == "fork" and driver.policy.pid == server.pid + 1


def test_a_death_closes_the_fork_server_and_says_how_it_ended() -> None:
    driver = Driver()
    driver.spawn()
    server = driver.up
    assert server is not None
    assert driver.dies(server)[0] == CloseForkServer(server.pid, 0.0)
    assert driver.policy.status().reason == (
        f"re-exec workers: the fork server (pid {server.pid}) killed by SIGKILL"
    )
    assert driver.every_server_closed_once()


def test_death_while_forking_is_handled_once_whichever_report_comes_first() -> None:
    """The fork server dies in the middle of a fork: the failed fork and its death (its
    pidfd) both report it; the second report changes nothing."""
    for first in ("fork", "death"):
        driver = Driver()
        driver.spawn()
        server = driver.up
        assert server is not None
        if first == "fork":
            driver.fork_fails("the fork server exited", permanent=False)
            assert driver.dies(server) == []
        else:
            driver.dies(server)
            assert driver.policy.fork_failed(server.pid, "gone", True, driver.now) == []
        assert driver.policy.state is ForkServerState.WAITING  # not refused by a stale report
        assert driver.policy.failures_in_a_row == 1 and driver.every_server_closed_once()


def test_reports_about_a_replaced_fork_server_change_nothing() -> None:
    driver = Driver(cpu_budget=1.0)
    driver.spawn()
    old = driver.up
    assert old is not None
    driver.perform(driver.policy.replace(driver.now))
    new = driver.up
    assert new is not None and new is not old and old.closed_with == RETIRE_GRACE
    assert driver.dies(old) == []
    assert driver.policy.fork_failed(old.pid, "late", True, driver.now) == []
    assert driver.policy.cpu_used(old.pid, 100.0, driver.now) == []
    assert driver.policy.pid == new.pid and driver.policy.state is ForkServerState.FORKING


# -- tending: when to look, CPU, replacement ---------------------------------------------------


def test_tending_looks_every_interval_while_up_and_at_once_after_a_death() -> None:
    driver = Driver()
    assert driver.perform(driver.policy.tend(driver.now)) == [StartForkServer()]
    assert driver.up is not None
    assert driver.policy.tend(driver.now) == []
    assert driver.policy.check_at == driver.now + CHECK_INTERVAL
    driver.policy.look_soon()  # its pidfd turned readable
    assert driver.policy.check_at == 0.0


def test_a_dead_fork_server_is_started_again_by_tending_once_its_back_off_has_passed() -> None:
    driver = Driver()
    driver.spawn()
    server = driver.up
    assert server is not None
    driver.dies(server)
    assert driver.policy.tend(driver.now) == []  # too early
    assert driver.policy.check_at == driver.now + BACKOFF_FIRST
    driver.now = driver.policy.check_at
    driver.perform(driver.policy.tend(driver.now))
    assert driver.up is not None and driver.up is not server


def test_a_fork_server_near_its_cpu_limit_is_replaced_its_start_up_not_counted() -> None:
    driver = Driver(cpu_budget=0.5)  # RLIMIT_CPU: 1 s
    driver.next_pid = 201
    driver.policy.started(201, 0.3, driver.now)  # its start-up used 0.3 s
    driver.servers.append(FakeForkServer(201, 0.3))
    assert driver.policy.cpu_used(201, 0.64, driver.now) == []  # due at 0.3 + 0.7 / 2
    assert driver.policy.cpu_used(201, None, driver.now) == []  # gone: its death will say
    effects = driver.perform(driver.policy.cpu_used(201, 0.65, driver.now))
    log = effects[0]
    assert isinstance(log, Log) and log.level == logging.INFO and log.args == (201, 0.65, 1)
    assert effects[1:] == [CloseForkServer(201, RETIRE_GRACE), StartForkServer()]
    assert driver.policy.pid == 202 and driver.policy.stats().fork_server_starts == 2


def test_without_a_cpu_budget_a_fork_server_is_never_replaced_for_its_cpu() -> None:
    driver = Driver()
    driver.spawn()
    assert driver.policy.cpu_used(101, 1e9, driver.now) == []


def test_a_replacement_forgets_the_back_off_and_starts_at_once() -> None:
    driver = Driver()
    driver.start_fails = [("no processes left", False)] * 3
    for _ in range(3):
        driver.spawn()
        driver.now = driver.policy.retry_at
    driver.now -= 0.01  # backing off still
    assert driver.perform(driver.policy.replace(driver.now)) == [StartForkServer()]
    assert driver.policy.state is ForkServerState.FORKING and driver.policy.failures_in_a_row == 0
    driver.dies(driver.servers[0])
    assert delays(driver.logs)[-1] == BACKOFF_FIRST


def test_a_replacement_that_fails_to_start_backs_off() -> None:
    driver = Driver()
    driver.spawn()
    driver.start_fails = [("the fork server could not start", False)]
    driver.perform(driver.policy.replace(driver.now))
    assert driver.up is None and driver.policy.state is ForkServerState.WAITING
    assert driver.spawn() == "re-exec" and driver.every_server_closed_once()


# -- the end -----------------------------------------------------------------------------------


def test_stopping_retires_the_fork_server_and_starts_none_again() -> None:
    driver = Driver()
    driver.spawn()
    server = driver.up
    assert server is not None
    assert driver.perform(driver.policy.stop()) == [CloseForkServer(server.pid, RETIRE_GRACE)]
    assert driver.policy.state is ForkServerState.STOPPED and driver.policy.check_at == math.inf
    assert driver.dies(server) == []  # its end, seen late
    assert driver.policy.replace(driver.now) == [] and driver.policy.tend(driver.now) == []
    driver.now += 3600
    assert driver.spawn() == "re-exec" and driver.every_server_closed_once()
    assert driver.policy.stop() == []  # idempotent
