"""When a running call is looked at, and what is due then: its demotion and its deadline.

Goals: one rule, for both call paths, for the two things that happen to a call while its
caller waits for the answer: its worker is demoted once the call has used its interactive
budget of CPU (``scheduling``), and the call ends at its deadline, counted on the clock the
pool's ``timeout_clock`` names. Sans-I/O: the caller reads the worker's CPU clock and
performs what a look returns, so the rule is tested alone with made-up times
(tests/test_deadlines.py), as ``state`` is.

Plan: a ``CallClock`` is made when the call's request goes out. ``next_at`` is when
the caller must look again (the blocking path's ``poll`` timeout, the asyncio path's one
timer); ``look(now, used)``, with ``used`` the CPU seconds the worker has spent on this call
(None: its clock cannot be read), returns what is due: ``Due.EXPIRED`` (``expired_clock``
says which clock ran out), ``Due.DEMOTE`` (once), or ``Due.NOTHING``.

- **Demotion** counts CPU, not wall time: a call that a busy machine only slowed down (it
  waited for a CPU) is looked at again once it could have used the rest of its budget, so
  load alone never demotes, and so recycles, a light call's worker. Where the CPU clock
  cannot be read, the wall time decides.
- **The deadline on the wall clock** (``timeout_clock="wall"``, the default): ``timeout``
  seconds after the request went out, whatever the worker did.
- **The deadline on the CPU clock** (``timeout_clock="cpu"``): the call ends once the worker
  has used ``timeout`` CPU seconds for it, so a call that a busy machine slowed down is not
  killed as a slow snippet. It is looked at when it could have used the rest at two CPUs'
  rate (the engine's threads run in parallel: a call may use more CPU than wall time), so it
  overruns by at most ``RECHECK`` of CPU. The wall clock stays a backstop at
  ``CPU_CLOCK_BACKSTOP`` times the timeout: a worker that sleeps, or waits on a stopped
  machine, still ends. Where the CPU clock cannot be read, the wall clock at ``timeout``
  decides.

Weak spots: a look costs one read of the worker's CPU clock (``clock_gettime``), at most
every ``RECHECK``; between looks a call runs on. The CPU clock counts every thread of the
worker, the runtime's housekeeping included (a Go collector's threads are the call's work).
"""

from __future__ import annotations

import enum
import math

from .._config import TIMEOUT_CLOCKS

__all__ = ["CPU_CLOCK_BACKSTOP", "RECHECK", "CallClock", "Due"]

# On the CPU clock, the wall-clock backstop, in timeouts.
CPU_CLOCK_BACKSTOP = 4.0
# A call is looked at again no sooner than this (a demotion or a CPU deadline not yet due).
RECHECK = 0.005
# The CPU a call can use per second of wall time, at most, for the CPU deadline's looks: a
# worker's engine threads in parallel on two CPUs (more CPUs only make the overrun larger
# by RECHECK each).
_CPU_RATE = 2.0


class Due(enum.Enum):
    """What a look at a running call finds due."""

    NOTHING = "nothing"
    DEMOTE = "demote"  # its worker is to be demoted (at most once per call)
    EXPIRED = "expired"  # its deadline has come: ``CallClock.expired_clock`` says which


class CallClock:
    """One running call's demotion and deadline (see the module docstring). Times are
    ``time.monotonic()`` seconds; ``math.inf`` means never. ``next_at`` is when the caller
    must look at the call again (at the latest): a plain attribute, kept by ``look``,
    since the blocking path reads it before every ``poll``."""

    __slots__ = (
        "budget",
        "clock",
        "cpu_check_at",
        "demote_at",
        "expired_clock",
        "next_at",
        "started",
        "timeout",
        "wall_deadline",
    )

    def __init__(self, now: float, timeout: float, budget: float, clock: str) -> None:
        """The clock of a call whose request went out ``now``, with ``timeout`` seconds left
        on ``clock`` and ``budget`` CPU seconds before its worker is demoted."""
        self.timeout = timeout  # what is left of the call's timeout when its request went out
        self.clock = clock  # "wall" or "cpu": what the timeout counts
        self.budget = budget  # the interactive budget, CPU seconds (inf: never demoted)
        self.started = now
        self.expired_clock = ""
        demote_at = self.demote_at = now + budget
        if clock == "wall":
            wall = self.wall_deadline = now + timeout
            self.cpu_check_at = math.inf
            self.next_at = demote_at if demote_at < wall else wall
        elif clock == "cpu":
            self.wall_deadline = now + CPU_CLOCK_BACKSTOP * timeout
            self.cpu_check_at = now + timeout / _CPU_RATE
            self.next_at = min(self.wall_deadline, demote_at, self.cpu_check_at)
        else:
            raise ValueError(f"timeout clock must be one of {TIMEOUT_CLOCKS}: {clock!r}")

    def look(self, now: float, used: float | None) -> Due:
        """What is due at ``now``, the worker having used ``used`` CPU seconds for the call
        (None: its CPU clock cannot be read). Moves the next looks on."""
        due = self._due(now, used)
        self.next_at = min(self.wall_deadline, self.demote_at, self.cpu_check_at)
        return due

    def _due(self, now: float, used: float | None) -> Due:
        if now >= self.wall_deadline:
            self.expired_clock = "wall"
            return Due.EXPIRED
        if now >= self.cpu_check_at:
            if used is None:  # no CPU clock: the wall clock at the timeout decides
                if now - self.started >= self.timeout:
                    self.expired_clock = "wall"
                    return Due.EXPIRED
                self.cpu_check_at = self.started + self.timeout
            elif used >= self.timeout:
                self.expired_clock = "cpu"
                return Due.EXPIRED
            else:
                self.cpu_check_at = now + max((self.timeout - used) / _CPU_RATE, RECHECK)
        if now >= self.demote_at:
            if used is not None and used < self.budget:
                self.demote_at = now + max(self.budget - used, RECHECK)
            else:
                self.demote_at = math.inf
                return Due.DEMOTE
        return Due.NOTHING
