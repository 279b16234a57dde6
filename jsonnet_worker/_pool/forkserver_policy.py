"""The fork server's lifecycle as a sans-I/O policy, in one place (h11's rule for ``_state.py``).

Goals: every decision about the pool's fork server lives here, testable with a fake clock and
no process (tests/test_forkserver_policy.py): what the next worker is (a fork, or a re-exec
worker and why), when to start a fork server, how long to back off after a failure (the
pool's one rule, ``backoff``), when a refusal is for good, when to replace a fork server
before its CPU limit runs out, and when to look at it again. No I/O, no threads, no clock
reads: every event carries the time, and a transition returns the ``Effect``s (start, close,
log) for its driver, ``forking.WorkerSource`` on the supervisor thread, to carry out.

Plan: ``ForkServerPolicy`` holds the ``ForkServerState``, the pid of the fork server it takes
to be up, the back-off (failures in a row, ``retry_at``), when the driver should next look
(``check_at``) and the counters. The driver asks ``next_worker(now)`` before each spawn and
reports what happened (``started``, ``start_failed``, ``forked``, ``fork_failed``, ``died``,
``cpu_used``). Events about a fork server name its pid: a report about one already given up
(its death seen after a failed fork closed it, a CPU sample of one replaced meanwhile)
changes nothing.

A failure says whether it is ``permanent``: this host refuses what forking needs (the
kernel or a container's seccomp profile refuses the clone flags, the fork server's sandbox
would isolate forked workers less than re-exec ones, its start-up fails as any would), so the
pool re-executes its workers for good and says why, never silently; otherwise the fork server
died or failed once and is started again after the back-off (re-exec workers meanwhile).

Weak spots: the CPU rule works on samples (every ``CHECK_INTERVAL``), so a fork server that
burns CPU between two samples is replaced at the next one, or dies of RLIMIT_CPU first (its
death is then a failure like any other). One driver thread only: no lock.
"""

from __future__ import annotations

import enum
import logging
import math
from dataclasses import dataclass
from typing import Any

from .._wire.layers import LayerState, LayerStatus
from .backoff import backoff_delay

# How often a fork server that is up is looked at (its death is seen at once through its
# pidfd; this is for its CPU time).
CHECK_INTERVAL = 0.5
# A fork server that has used this share of its CPU limit (beyond its start-up) is replaced:
# it never evaluates, only its forks count (about a millisecond each).
CPU_SHARE = 0.5
# Seconds a fork server that is retired (replaced, or the pool closing) has to exit at the end
# of its control socket before it is killed; a failed one is killed at once.
RETIRE_GRACE = 1.0
# The layer's name in ``pool.sandbox`` and ``doctor`` (public: kept from before the fork
# server was called so).
LAYER = "template"


class ForkServerState(enum.Enum):
    FORKING = "forking"  # a fork server is up: new workers are its forks
    WAITING = "waiting"  # none is up: re-exec workers until ``retry_at``, then start one
    REFUSED = "refused"  # this host refuses what forking needs: re-exec workers for good
    STOPPED = "stopped"  # the pool is closing: no fork server any more


class Next(enum.Enum):
    """How the next worker is made."""

    FORK = "fork"  # ask the fork server that is up
    START = "start"  # start a fork server first (report how it went), then ask again
    RE_EXEC = "re_exec"  # re-execute the interpreter


# -- effects: what a transition asks its driver to do -----------------------------------------


@dataclass(frozen=True)
class StartForkServer:
    """Start a fork server, then report ``started`` or ``start_failed``."""


@dataclass(frozen=True)
class CloseForkServer:
    """Stop the fork server ``pid`` (after ``grace`` seconds for an orderly exit), reap it and
    close its fds; the workers it forked live on."""

    pid: int
    grace: float


@dataclass(frozen=True)
class Log:
    level: int
    message: str
    args: tuple[Any, ...] = ()


Effect = StartForkServer | CloseForkServer | Log


@dataclass(frozen=True)
class SourceStats:
    """The fork server's part of ``PoolStats``."""

    fork_server_pid: int | None  # None: no fork server is up (re-exec workers meanwhile)
    forks: int  # workers forked from a fork server
    fallbacks: int  # workers re-executed because no fork server could give one
    fork_server_starts: int  # fork servers started (the first, restarts, replacements)


class ForkServerPolicy:
    """Whether the pool forks its workers, and every transition of its fork server's life.

    ``cpu_budget``: the pool's RLIMIT_CPU for one process (a fork server's too), or None;
    ``cpu_share``: the share of it after which a fork server is replaced; ``uid_range``: the
    pool gives each worker a uid of its own, which forked workers (sharing their fork
    server's) cannot have, so it never forks."""

    def __init__(
        self,
        *,
        cpu_budget: float | None = None,
        cpu_share: float = CPU_SHARE,
        uid_range: bool = False,
    ) -> None:
        self.state = ForkServerState.WAITING
        self.reason = "no fork server started yet"  # why workers are re-executed
        self.pid: int | None = None  # the fork server that is up
        self.failures_in_a_row = 0
        self.retry_at = 0.0
        self.forks = 0
        self.fallbacks = 0
        self.starts = 0
        # RLIMIT_CPU as the start-up sets it from the budget (whole seconds, at least one).
        self._cpu_limit = None if cpu_budget is None else max(1, math.ceil(cpu_budget))
        self._cpu_share = cpu_share
        self._cpu_due: float | None = None  # CPU seconds at which the one up is replaced
        self._next_look = 0.0
        if uid_range:
            self.state = ForkServerState.REFUSED
            self.reason = (
                "worker_user is a uid range (one uid per worker): a fork server's forked "
                "workers would share its uid"
            )

    # -- queries -------------------------------------------------------------------------

    def next_worker(self, now: float) -> Next:
        """How the next worker is made: a fork while a fork server is up; a fork server
        started first once its back-off has passed; a re-exec worker otherwise."""
        if self.state is ForkServerState.FORKING:
            return Next.FORK
        if self.state is ForkServerState.WAITING and now >= self.retry_at:
            return Next.START
        return Next.RE_EXEC

    @property
    def check_at(self) -> float:
        """When the driver should next look (``tend``): at the back-off's end while none is
        up, every CHECK_INTERVAL while one is (sooner after ``look_soon``), never once
        forking is refused or stopped."""
        if self.state is ForkServerState.FORKING:
            return self._next_look
        if self.state is ForkServerState.WAITING:
            return self.retry_at
        return math.inf

    def status(self) -> LayerStatus:
        """The fork server's layer in ``pool.sandbox`` and ``doctor``."""
        if self.pid is not None:
            return LayerStatus(
                LAYER,
                LayerState.ACTIVE,
                f"fork server pid {self.pid}: new workers are its forks (CLONE_PARENT), "
                f"each in its own nested Landlock domain; {self.forks} forked",
            )
        return LayerStatus(LAYER, LayerState.MISSING, reason=f"re-exec workers: {self.reason}")

    def stats(self) -> SourceStats:
        return SourceStats(self.pid, self.forks, self.fallbacks, self.starts)

    # -- transitions ---------------------------------------------------------------------

    def started(self, pid: int, cpu_at_hello: float, now: float) -> None:
        """A fork server said its hello (``cpu_at_hello``: the CPU seconds its start-up
        used, not counted against its share): new workers are its forks."""
        self.starts += 1
        self.state, self.pid, self.reason = ForkServerState.FORKING, pid, ""
        self.failures_in_a_row = 0
        self._next_look = now + CHECK_INTERVAL
        limit = self._cpu_limit
        self._cpu_due = (
            None if limit is None else cpu_at_hello + (limit - cpu_at_hello) * self._cpu_share
        )

    def start_failed(self, reason: str, permanent: bool, now: float) -> list[Effect]:
        """A fork server could not start (it closed itself): back off, or refuse for good."""
        self.starts += 1
        return self._failed(None, reason, permanent, now)

    def forked(self) -> None:
        self.forks += 1

    def re_executed(self) -> None:
        self.fallbacks += 1

    def fork_failed(self, pid: int, reason: str, permanent: bool, now: float) -> list[Effect]:
        """Fork server ``pid`` could not give a worker (it refused the clone, died in the
        middle of the fork without a child to adopt, or answered out of turn)."""
        if pid != self.pid:
            return []  # given up already
        return self._failed(pid, reason, permanent, now)

    def died(self, pid: int, how: str, now: float) -> list[Effect]:
        """Fork server ``pid`` has exited (``how``: "killed by SIGKILL", ...); the workers it
        forked live on."""
        if pid != self.pid:
            return []  # given up already: this is the end of one closed after a failure
        return self._failed(pid, f"the fork server (pid {pid}) {how}", False, now)

    def cpu_used(self, pid: int, seconds: float | None, now: float) -> list[Effect]:
        """A sample of fork server ``pid``'s CPU time (None: it is gone, its death is on its
        way): replaced once it has used its share of its limit."""
        due = self._cpu_due
        if pid != self.pid or due is None or seconds is None or seconds < due:
            return []
        log = Log(
            logging.INFO,
            "jsonnet_worker fork server %d used %.2f s of its %d s CPU limit; replacing it",
            (pid, seconds, self._cpu_limit),
        )
        return [log, *self.replace(now)]

    def replace(self, now: float) -> list[Effect]:
        """Start a new fork server now (``WorkerPool.replace_template``, or the CPU rule):
        the one up is retired (the workers it forked live on), the back-off forgotten."""
        if self.state in (ForkServerState.REFUSED, ForkServerState.STOPPED):
            return []
        effects: list[Effect] = []
        if self.pid is not None:
            effects.append(CloseForkServer(self.pid, RETIRE_GRACE))
        self.state, self.pid, self._cpu_due = ForkServerState.WAITING, None, None
        self.reason = "the fork server is being replaced"
        self.failures_in_a_row, self.retry_at = 0, now
        effects.append(StartForkServer())
        return effects

    def tend(self, now: float) -> list[Effect]:
        """The driver has looked (a death reported, a CPU sample given): a fork server is
        started if none is up and its back-off has passed; the next look is set."""
        self._next_look = now + CHECK_INTERVAL
        if self.next_worker(now) is Next.START:
            return [StartForkServer()]
        return []

    def look_soon(self) -> None:
        """The fork server's pidfd turned readable (it died): look on the next turn."""
        self._next_look = 0.0

    def stop(self) -> list[Effect]:
        """The pool is closing: the fork server up is retired, none is started again."""
        effects: list[Effect] = []
        if self.pid is not None:
            effects.append(CloseForkServer(self.pid, RETIRE_GRACE))
        self.state, self.pid, self._cpu_due = ForkServerState.STOPPED, None, None
        self.reason = "the pool is closed"
        return effects

    def _failed(self, pid: int | None, reason: str, permanent: bool, now: float) -> list[Effect]:
        effects: list[Effect] = []
        if pid is not None:
            effects.append(CloseForkServer(pid, 0.0))
        self.pid, self._cpu_due, self.reason = None, None, reason
        if self.state is ForkServerState.STOPPED:
            return effects
        if permanent:
            self.state = ForkServerState.REFUSED
            effects.append(
                Log(
                    logging.WARNING,
                    "jsonnet_worker: forked workers are unavailable on this host (%s); new "
                    "workers are re-executed interpreters (slower to start, as isolated)",
                    (reason,),
                )
            )
            return effects
        self.failures_in_a_row += 1
        delay = backoff_delay(self.failures_in_a_row)
        self.state, self.retry_at = ForkServerState.WAITING, now + delay
        effects.append(
            Log(
                logging.WARNING,
                "jsonnet_worker: the fork server failed (%s); re-exec workers until it is "
                "started again in %.1f s",
                (reason, delay),
            )
        )
        return effects
