"""Per-tenant accounting alone (``_pool/accounting.py``), with made-up measurements: the
counters, the percentiles read from the log-scale buckets, the bound on tracked domains
and the fold into "other", and the memory that stays constant under made-up names."""

from __future__ import annotations

import random
import threading

import pytest

from jsonnet_worker import TenantStats
from jsonnet_worker._pool.accounting import CANCELLED, FOLD_AT, Accounting, LogHistogram


def by_tenant(stats: tuple[TenantStats, ...]) -> dict[str | None, TenantStats]:
    return {s.tenant: s for s in stats if not s.other}


def test_counts_errors_cpu_and_sums_per_domain() -> None:
    accounting = Accounting()
    accounting.record("a", None, 0.25, 0.001, 0.01)
    accounting.record("a", "timeout", 1.0, 0.002, 1.0)
    accounting.record("a", "overloaded", 0.0, None, None)  # never reached a worker
    accounting.record(None, CANCELLED, 0.5, 0.003, 0.2)
    stats = by_tenant(accounting.snapshot())
    a, untenanted = stats["a"], stats[None]
    assert (a.calls, a.ran, a.cpu_seconds) == (3, 2, 1.25)
    assert a.errors == {"timeout": 1, "overloaded": 1}
    assert a.queue_wait_sum == pytest.approx(0.003)
    assert a.run_time_sum == pytest.approx(1.01)
    assert (untenanted.calls, untenanted.errors, untenanted.other) == (1, {CANCELLED: 1}, False)
    assert [s.tenant for s in accounting.snapshot()] == ["a", None]  # most CPU first


def test_percentiles_are_within_a_bucket_of_the_truth() -> None:
    rng = random.Random(7)
    samples = sorted(rng.lognormvariate(-6.0, 1.5) for _ in range(20_000))
    histogram = LogHistogram()
    for value in samples:
        histogram.add(value)
    for q in (0.5, 0.9, 0.99):
        truth = samples[int(q * len(samples))]
        assert histogram.quantile(q) == pytest.approx(truth, rel=0.25)
    assert histogram.count == len(samples)
    assert histogram.total == pytest.approx(sum(samples))


def test_percentiles_at_the_edges() -> None:
    histogram = LogHistogram()
    assert histogram.quantile(0.5) == 0.0  # no samples
    histogram.add(0.0)
    histogram.add(1e-9)  # below the first octave: the first bucket, under 1 µs
    assert histogram.quantile(0.99) < 1e-6
    huge = LogHistogram()
    huge.add(1e6)  # past the last octave: reported as its lower bound, 256 s
    assert huge.quantile(0.5) == 256.0
    one = LogHistogram()
    one.add(0.010)
    assert one.quantile(0.5) == pytest.approx(0.010, rel=0.25)


def test_a_domain_reports_its_percentiles() -> None:
    accounting = Accounting()
    for _ in range(99):
        accounting.record("t", None, 0.001, 0.0001, 0.002)
    accounting.record("t", None, 0.001, 0.5, 2.0)
    (stats,) = accounting.snapshot()
    assert stats.queue_wait_p50 == pytest.approx(0.0001, rel=0.25)
    assert stats.run_time_p50 == pytest.approx(0.002, rel=0.25)
    assert stats.run_time_p90 == pytest.approx(0.002, rel=0.25)
    assert stats.queue_wait_p99 <= stats.queue_wait_sum


def test_over_the_bound_the_lightest_domain_is_folded_into_other() -> None:
    accounting = Accounting(limit=3)
    accounting.record("heavy", None, 10.0, 0.001, 1.0)
    accounting.record("middle", "jsonnet_error", 5.0, 0.001, 1.0)
    accounting.record("light", "timeout", 1.0, 0.002, 1.0)
    accounting.record("new", None, 0.5, 0.003, 1.0)  # "light" goes to other
    stats = accounting.snapshot()
    assert [(s.tenant, s.other) for s in stats] == [
        ("heavy", False),
        ("middle", False),
        ("new", False),
        (None, True),
    ]
    other = stats[-1]
    assert (other.calls, other.cpu_seconds, other.errors, other.ran) == (1, 1.0, {"timeout": 1}, 1)
    accounting.record("light", None, 0.1, 0.001, 0.1)  # back: from zero; "new" folds
    again = by_tenant(accounting.snapshot())
    assert again["light"].calls == 1
    assert "new" not in again
    folded = accounting.snapshot()[-1]
    assert (folded.other, folded.calls, folded.cpu_seconds) == (True, 2, 1.5)


def test_totals_survive_any_churn_and_memory_stays_bounded() -> None:
    """Made-up names, one call each, interleaved with two steady tenants: at most ``limit``
    domains plus "other" are kept, the steady heavy ones stay, and no call or CPU second
    is lost in the folds."""
    accounting = Accounting(limit=4)
    calls = 0
    cpu = 0.0
    for index in range(5_000):
        accounting.record(f"attacker-{index}", "jsonnet_error", 0.01, 0.001, 0.01)
        accounting.record("steady-a", None, 0.02, 0.001, 0.02)
        accounting.record("steady-b", None, 0.03, 0.001, 0.03)
        calls += 3
        cpu += 0.06
        assert len(accounting.snapshot()) <= 5
    stats = accounting.snapshot()
    assert {"steady-a", "steady-b"} <= set(by_tenant(stats))
    assert sum(s.calls for s in stats) == calls
    assert sum(s.cpu_seconds for s in stats) == pytest.approx(cpu)
    assert sum(s.errors.get("jsonnet_error", 0) for s in stats) == 5_000
    assert stats[-1].other


def test_no_other_entry_before_a_fold_and_a_limit_of_at_least_one() -> None:
    accounting = Accounting(limit=1)
    assert accounting.snapshot() == ()
    accounting.record("a", None, 0.0, 0.0, 0.0)
    assert [s.other for s in accounting.snapshot()] == [False]
    with pytest.raises(ValueError):
        Accounting(limit=0)


def test_samples_from_many_threads_are_each_counted_once_and_pending_stays_bounded() -> None:
    """``record`` only appends; folds run from ``snapshot`` and from the caller that finds
    ``FOLD_AT`` samples pending, on any thread, while others append: no call is lost or
    counted twice, and at most about ``FOLD_AT`` samples wait unfolded."""
    accounting = Accounting()
    threads, per_thread = 4, 3 * FOLD_AT + 7
    largest_backlog = 0

    def caller(name: str) -> None:
        nonlocal largest_backlog
        for _ in range(per_thread):
            accounting.record(name, None, 0.001, 0.0001, 0.001)
            largest_backlog = max(largest_backlog, accounting.pending())
            if random.random() < 0.01:
                accounting.snapshot()

    workers = [threading.Thread(target=caller, args=(f"t{i % 2}",)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30.0)
    stats = by_tenant(accounting.snapshot())
    assert stats["t0"].calls + stats["t1"].calls == threads * per_thread
    assert stats["t0"].ran == stats["t0"].calls
    assert largest_backlog <= FOLD_AT + threads


def test_a_fold_in_runs_ends_as_one_sample_at_a_time() -> None:
    """``_fold`` takes runs of one tenant's samples at once; the tallies (which tenants are
    tracked and which folded into "other", counts, errors, sums, percentiles) are the same
    as when every sample is folded alone (a snapshot after each record)."""
    rng = random.Random(11)
    tenants = [f"t{i}" for i in range(7)] + [None]
    samples = []
    for _ in range(600):
        ran = rng.random() < 0.9
        samples.append(
            (
                rng.choice(tenants) if rng.random() < 0.3 else "t0",
                rng.choice([None, None, "timeout", CANCELLED]),
                rng.random() * 0.01,
                rng.lognormvariate(-8.0, 2.0) if ran else None,
                rng.lognormvariate(-7.0, 2.0) if ran else None,
            )
        )
    one_by_one, in_runs = Accounting(limit=4), Accounting(limit=4)
    for sample in samples:
        one_by_one.record(*sample)
        one_by_one.snapshot()
        in_runs.record(*sample)  # folded every FOLD_AT samples, then at the snapshot
    expected, got = one_by_one.snapshot(), in_runs.snapshot()
    assert [(s.tenant, s.other, s.calls, s.errors, s.ran) for s in got] == [
        (s.tenant, s.other, s.calls, s.errors, s.ran) for s in expected
    ]
    for mine, theirs in zip(got, expected, strict=True):
        assert mine.cpu_seconds == pytest.approx(theirs.cpu_seconds)
        assert mine.queue_wait_sum == pytest.approx(theirs.queue_wait_sum)
        assert (mine.queue_wait_p50, mine.run_time_p99) == (
            theirs.queue_wait_p50,
            theirs.run_time_p99,
        )
