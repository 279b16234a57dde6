"""Per-tenant accounting: what each trust domain's calls cost the pool (issue 21, item 6).

Goals: ``WorkerPool.stats().tenants`` answers "who is using the workers, and who is
waiting": per domain, calls, errors by ``Error.kind``, worker CPU seconds, and queue-wait
and run-time percentiles (p50/p90/p99); in memory that stays bounded however many tenant
names callers make up (the names may be attacker-chosen), at a cost of a few microseconds
per call. Sans-I/O: the numbers come in measured (``calls.settle`` and ``calls.abandon``
measure), so this module is tested alone with made-up values (tests/test_accounting.py).

Plan: one ``_Tally`` per domain: counters, and two ``LogHistogram``s, fixed log-scale
buckets (4 linear sub-buckets per octave, from about 1 µs to 256 s: 114 counts) from which
percentiles are read by interpolation inside the bucket, so a domain's memory is constant
and a percentile is within a bucket's width (at most 25 %) of the true one. At most
``limit`` domains (``TRACKED_TENANTS``) are tallied one by one; when a new one arrives over
the bound, the domain with the least CPU seconds is folded into the one "other" tally (its
counts added there) and the newcomer starts from zero. So the heavy users, the ones an
operator needs to see, stay; a stream of made-up names churns only the lightest slot.

The hot path: ``record`` runs on every caller's thread, after ``PoolState.settle`` has
released the state's lock, and only appends the call's five numbers to a deque (one C call,
thread-safe under the GIL, no lock: measured, a lock and the tally arithmetic on every call
cost the 4-caller light-mapper throughput several per cent). The samples are folded into the
tallies, under ``Accounting``'s own lock (never the state's, and the two never nest), by
``snapshot`` and by the caller whose append finds ``FOLD_AT`` samples pending: so at most
about ``FOLD_AT`` samples wait, and a fold's cost is spread over that many calls. A fold
takes runs of one tenant's samples at once: sums, and bucket counts from the run sorted
in C, a ``bisect`` per bucket it spans (measured: 0.76 µs a sample added one by one,
0.42-0.51 µs with a ``bisect`` per sample, 0.33 µs sorted).
``snapshot`` folds, then copies under the lock and computes the percentiles outside it, so
a scrape holds callers up for a copy only. The price: ``stats()`` reads the pool's counters
and the tenants at two instants, so they may differ by the calls that ended in between.

Weak spots: percentiles and counters are since the domain was first seen (no sliding
window; a rate needs two scrapes, a recent p99 a histogram in Prometheus). A domain folded
into "other" and seen again starts from zero (a counter reset to Prometheus, which
``rate()`` handles), and "other" jumps by what it had. A new domain is the lightest, so
under a churn of made-up names a legitimate domain lighter than one churned call's CPU
is folded too. Each new name over the bound costs a scan of the ``limit`` tallies and a
fold (about 10 µs); the names themselves are kept (at most ``limit`` of them).
"""

from __future__ import annotations

import bisect
import collections
import functools
import itertools
import operator
import threading
from collections.abc import Iterable, Sequence

from .._stats import TenantStats

TRACKED_TENANTS = 32  # domains tallied one by one; the rest share "other"
FOLD_AT = 256  # pending samples that make the caller who appends the next one fold them
CANCELLED = "cancelled"  # the kind of a call left by a non-Error exception (cancellation)

_MIN_EXP = -20  # 2**-20 s, about 1 µs: everything below shares the first bucket
_MAX_EXP = 8  # 256 s: everything above shares the last
_SUB = 4  # linear sub-buckets per octave: a bucket is at most 25 % wide
_BUCKETS = 1 + (_MAX_EXP - _MIN_EXP) * _SUB + 1
_QUANTILES = (0.5, 0.9, 0.99)
# One ended call as ``record`` takes it: tenant, error kind, CPU, queue wait, run time.
_Sample = tuple[str | None, str | None, float, float | None, float | None]


def _bounds(index: int) -> tuple[float, float]:
    """The seconds bucket ``index`` covers (the last one's upper bound is its lower)."""
    if index == 0:
        return 0.0, 2.0**_MIN_EXP
    if index == _BUCKETS - 1:
        return 2.0**_MAX_EXP, 2.0**_MAX_EXP
    octave, sub = divmod(index - 1, _SUB)
    base = 2.0 ** (_MIN_EXP + octave)
    return base * (1 + sub / _SUB), base * (1 + (sub + 1) / _SUB)


# The lower bound of every bucket but the first, in order: a duration's bucket is where
# ``bisect_right`` puts it (in C: the fold maps it over a whole batch of samples).
_LOWER_BOUNDS = [_bounds(index)[0] for index in range(1, _BUCKETS)]
_bucket = functools.partial(bisect.bisect_right, _LOWER_BOUNDS)
_TENANT = operator.itemgetter(0)


def _present(values: Sequence[float | None]) -> Sequence[float]:
    """``values`` without the Nones (a call that never reached a worker has no times): most
    batches have none, which one scan in C says."""
    if None not in values:
        return values  # type: ignore[return-value]  # no None in it, as just checked
    return [value for value in values if value is not None]


class LogHistogram:
    """Counts of durations in fixed log-scale buckets, their number and their sum."""

    __slots__ = ("count", "counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * _BUCKETS
        self.count = 0
        self.total = 0.0

    def add(self, seconds: float) -> None:
        self.counts[_bucket(seconds)] += 1
        self.count += 1
        self.total += seconds

    def add_many(self, durations: Sequence[float]) -> None:
        """``add`` each of ``durations``: sorted once (in C), a bucket's count is how many
        fall below its upper bound less how many fell below its lower one (``bisect``),
        over the buckets between the least and the greatest only (a batch of one
        tenant's light calls spans a few)."""
        if not durations:
            return
        ordered = sorted(durations)
        last = _bucket(ordered[-1])
        counts = self.counts
        below = 0  # how many fall below the bucket at hand
        for index in range(_bucket(ordered[0]), last):
            # ``_LOWER_BOUNDS[index]``: where the next bucket starts.
            below_next = bisect.bisect_left(ordered, _LOWER_BOUNDS[index], below)
            counts[index] += below_next - below
            below = below_next
        counts[last] += len(ordered) - below
        self.count += len(durations)
        self.total = sum(durations, self.total)  # in the order given: ``add``'s sum

    def absorb(self, other: LogHistogram) -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.count += other.count
        self.total += other.total

    def copy(self) -> LogHistogram:
        twin = LogHistogram()
        twin.counts = self.counts.copy()
        twin.count, twin.total = self.count, self.total
        return twin

    def quantile(self, q: float) -> float:
        """The ``q`` quantile, interpolated inside its bucket (0.0 with no samples)."""
        rank = q * self.count
        seen = 0
        for index, count in enumerate(self.counts):
            if count and seen + count >= rank:
                low, high = _bounds(index)
                return low + (high - low) * max(0.0, rank - seen) / count
            seen += count
        return 0.0


class _Tally:
    """One domain's counters and distributions."""

    __slots__ = ("calls", "cpu", "errors", "queue_wait", "run_time")

    def __init__(self) -> None:
        self.calls = 0
        self.cpu = 0.0
        self.errors: dict[str, int] = {}
        self.queue_wait = LogHistogram()
        self.run_time = LogHistogram()

    def absorb(self, other: _Tally) -> None:
        self.calls += other.calls
        self.cpu += other.cpu
        for kind, count in other.errors.items():
            self.errors[kind] = self.errors.get(kind, 0) + count
        self.queue_wait.absorb(other.queue_wait)
        self.run_time.absorb(other.run_time)

    def copy(self) -> _Tally:
        twin = _Tally()
        twin.calls, twin.cpu, twin.errors = self.calls, self.cpu, dict(self.errors)
        twin.queue_wait, twin.run_time = self.queue_wait.copy(), self.run_time.copy()
        return twin

    def report(self, tenant: str | None, other: bool) -> TenantStats:
        wait, run = self.queue_wait, self.run_time
        p_wait = [wait.quantile(q) for q in _QUANTILES]
        p_run = [run.quantile(q) for q in _QUANTILES]
        return TenantStats(
            tenant=tenant,
            other=other,
            calls=self.calls,
            errors=self.errors,
            cpu_seconds=self.cpu,
            ran=run.count,
            queue_wait_p50=p_wait[0],
            queue_wait_p90=p_wait[1],
            queue_wait_p99=p_wait[2],
            queue_wait_sum=wait.total,
            run_time_p50=p_run[0],
            run_time_p90=p_run[1],
            run_time_p99=p_run[2],
            run_time_sum=run.total,
        )


class Accounting:
    """Every domain's tally, at most ``limit`` of them one by one (see the module docstring)."""

    def __init__(self, limit: int = TRACKED_TENANTS) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        self._lock = threading.Lock()
        self._limit = limit
        self._tracked: dict[str | None, _Tally] = {}
        self._other = _Tally()
        self._pending: collections.deque[_Sample] = collections.deque()

    def record(
        self,
        tenant: str | None,
        kind: str | None,
        cpu: float,
        queue_wait: float | None,
        run_time: float | None,
    ) -> None:
        """One call of ``tenant`` ended: ``kind`` is its error's (None: it succeeded);
        ``cpu`` the worker CPU seconds it used; ``queue_wait`` and ``run_time`` None if it
        never reached a worker (its wait then says nothing about the wait for one)."""
        pending = self._pending
        pending.append((tenant, kind, cpu, queue_wait, run_time))
        if len(pending) >= FOLD_AT:
            self._fold()

    def pending(self) -> int:
        """How many recorded calls wait to be folded into the tallies (at most about
        ``FOLD_AT``)."""
        return len(self._pending)

    def _fold(self) -> None:
        """The pending samples into their tallies (any thread; one at a time). A sample
        appended meanwhile is folded by the next fold: ``popleft`` takes each once.

        In runs of one tenant's consecutive samples (a single tenant's batch is one run),
        each run's sums and bucket counts made in C: the tallies end as they would sample by
        sample (a new tenant is tracked where its first sample comes), at a fraction of the
        Python work a call."""
        pending = self._pending
        with self._lock:
            # Each taken once, in C (a ``popleft`` per sample from Python is most of a
            # fold's cost): a sample is a tuple, never the sentinel None.
            batch = list(itertools.islice(iter(pending.popleft, None), len(pending)))
            tracked = self._tracked
            for tenant, run in itertools.groupby(batch, key=_TENANT):
                tally = tracked.get(tenant)
                if tally is None:
                    tally = self._track(tenant)
                _, kinds, cpus, queue_waits, run_times = zip(*run, strict=True)
                tally.calls += len(kinds)
                tally.cpu = sum(cpus, tally.cpu)
                errors = tally.errors
                for kind in filter(None, kinds):
                    errors[kind] = errors.get(kind, 0) + 1
                tally.queue_wait.add_many(_present(queue_waits))
                tally.run_time.add_many(_present(run_times))

    def _track(self, tenant: str | None) -> _Tally:
        """Under the lock: a tally for a new domain; over the bound, the lightest domain
        is folded into "other" first (the oldest of equals: ``min`` keeps the first)."""
        if len(self._tracked) >= self._limit:
            lightest = min(self._tracked, key=lambda name: self._tracked[name].cpu)
            self._other.absorb(self._tracked.pop(lightest))
        tally = self._tracked[tenant] = _Tally()
        return tally

    def snapshot(self) -> tuple[TenantStats, ...]:
        """The tracked domains, most CPU first, then "other" if it has counted a call."""
        self._fold()
        with self._lock:
            tracked = [(tenant, tally.copy()) for tenant, tally in self._tracked.items()]
            other = self._other.copy()
        tracked.sort(key=lambda item: item[1].cpu, reverse=True)
        reports: Iterable[TenantStats] = (tally.report(t, False) for t, tally in tracked)
        if other.calls:
            return (*reports, other.report(None, True))
        return tuple(reports)
