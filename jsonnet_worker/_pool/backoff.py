"""How long to wait before trying again what failed in a row: one rule for the pool's worker
start-ups (``state``) and its fork server's (``forkserver_policy``).

Goals: a start-up that keeps failing (a broken engine, a full process table, a fork server
that dies at once) is retried soon after a first failure and at most every ``BACKOFF_MAX``
seconds after many, never in a tight loop. No clock is read here: callers add the delay to
the time they were given.
"""

from __future__ import annotations

BACKOFF_FIRST = 0.1  # seconds after the first failure in a row, doubling at each failure
BACKOFF_MAX = 5.0


def backoff_delay(failures_in_a_row: int) -> float:
    """Seconds to wait after the ``failures_in_a_row``-th failure in a row (1 or more)."""
    return min(BACKOFF_FIRST * 2.0 ** (failures_in_a_row - 1), BACKOFF_MAX)
