"""Prometheus metrics of any ``WorkerPool``: the pool's counters and its tenants, read at
scrape time, under the names the service's ``/metrics`` uses (needs ``prometheus_client``:
the ``metrics`` extra, which the ``serve`` extra includes).

An application that embeds a pool registers one collector and serves its registry as it
serves the rest of its metrics::

    from prometheus_client import REGISTRY
    from jsonnet_worker.metrics import PoolCollector

    REGISTRY.register(PoolCollector.of(pool))

Goals: one vocabulary with the service (every ``kind`` label is the library's
``Error.kind``; the same metric names), and no second set of counters that could drift
from the pool's: the collector turns ``WorkerPool.stats()`` and ``pool.sandbox`` into metric
families on each scrape (the pool already counts, under its own lock).

The families: ``jsonnet_worker_sandbox_enforced`` and ``_sandbox_complete`` (the one verdict,
``judge_sandbox``), ``_crashes_total``, ``_respawns_total``, ``_start_failures_total``,
``_errors_total{kind}``, ``_queue_depth``, ``_workers{state}``, ``_pool_size``, and per
tenant (the pool's own bound: its top tenants by CPU, then ``tenant="other"``, so the
label's cardinality stays bounded however many tenant names callers make up):
``_tenant_calls_total``, ``_tenant_errors_total{kind}``, ``_tenant_cpu_seconds_total`` and
the summaries ``_tenant_queue_wait_seconds`` and ``_tenant_run_time_seconds`` (p50, p90,
p99, sum, count).

Weak spots: the counters restart at zero with the pool, as Prometheus expects of a counter,
and a tenant's series restart at zero when it comes back after being folded into
``other``. Several processes (a prefork server) each export their own pool: sum them in
the query, or use the service's multiprocess mode.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from . import Error, PoolStats, SandboxStatus, TenantStats, WorkerPool, judge_sandbox

__all__ = ["PREFIX", "PoolCollector"]

PREFIX = "jsonnet_worker"


def _error_classes(base: type[Error]) -> list[type[Error]]:
    return [base, *(cls for sub in base.__subclasses__() for cls in _error_classes(sub))]


_KIND_OF_CLASS = {cls.__name__: cls.kind for cls in _error_classes(Error)}
SANDBOX_HELP = {
    "enforced": "1 while the workers report their Landlock sandbox enforced (require_sandbox).",
    "complete": "1 while every layer the configuration asks for is active (the one verdict).",
}
POOL_COUNTERS = {
    "crashes": "Workers that died (during a call or while idle).",
    "respawns": "Workers started to replace one that ended.",
    "start_failures": "Workers that failed before their hello.",
}
ERRORS_HELP = "The pool's failed calls by error kind."
QUEUE_HELP = "Calls waiting for a free worker."
WORKERS_HELP = "Worker processes by state."
POOL_SIZE_HELP = "Configured pool size."
OTHER_TENANTS = "other"  # the label of the tenants the pool does not tally one by one


def errors_by_kind(stats: PoolStats) -> dict[str, int]:
    """The pool's error counts keyed by ``Error.kind``."""
    by_kind: dict[str, int] = {}
    for key, count in stats.errors.items():
        kind = _KIND_OF_CLASS.get(key, key)  # stats keyed by class name (older pools)
        by_kind[kind] = by_kind.get(kind, 0) + count
    return by_kind


def tenant_label(tenant: TenantStats) -> str:
    if tenant.other:
        return OTHER_TENANTS
    return "" if tenant.tenant is None else tenant.tenant


@dataclasses.dataclass
class TenantRow:
    """One tenant's series: what ``TenantStats`` gives, or the merge of several processes'
    (``quantiles`` None: they cannot be merged)."""

    label: str
    calls: int
    errors: dict[str, int]
    cpu_seconds: float
    ran: int
    queue_wait_sum: float
    run_time_sum: float
    quantiles: tuple[tuple[float, float, float], tuple[float, float, float]] | None = None

    @classmethod
    def of(cls, tenant: TenantStats) -> TenantRow:
        return cls(
            tenant_label(tenant),
            tenant.calls,
            dict(tenant.errors),
            tenant.cpu_seconds,
            tenant.ran,
            tenant.queue_wait_sum,
            tenant.run_time_sum,
            (
                (tenant.queue_wait_p50, tenant.queue_wait_p90, tenant.queue_wait_p99),
                (tenant.run_time_p50, tenant.run_time_p90, tenant.run_time_p99),
            ),
        )

    def absorb(self, other: TenantRow) -> None:
        self.calls += other.calls
        self.cpu_seconds += other.cpu_seconds
        self.ran += other.ran
        self.queue_wait_sum += other.queue_wait_sum
        self.run_time_sum += other.run_time_sum
        for kind, count in other.errors.items():
            self.errors[kind] = self.errors.get(kind, 0) + count
        self.quantiles = None


def tenant_families(rows: Iterable[TenantRow]) -> Iterator[Metric]:
    """The per-tenant series: as many label values as ``rows`` has entries."""
    calls = CounterMetricFamily(
        f"{PREFIX}_tenant_calls", "Calls that ended, by tenant.", labels=["tenant"]
    )
    errors = CounterMetricFamily(
        f"{PREFIX}_tenant_errors",
        "Failed calls by tenant and error kind (cancelled: the caller left).",
        labels=["tenant", "kind"],
    )
    cpu = CounterMetricFamily(
        f"{PREFIX}_tenant_cpu_seconds",
        "Worker CPU seconds the tenant's calls used.",
        labels=["tenant"],
    )
    waits = SummaryMetricFamily(
        f"{PREFIX}_tenant_queue_wait_seconds",
        "Seconds from admission to holding a worker, by tenant (since first seen).",
        labels=["tenant"],
    )
    runs = SummaryMetricFamily(
        f"{PREFIX}_tenant_run_time_seconds",
        "Seconds from request written to answer, by tenant (since first seen).",
        labels=["tenant"],
    )
    for row in rows:
        label = row.label
        calls.add_metric([label], row.calls)
        cpu.add_metric([label], row.cpu_seconds)
        for kind, count in sorted(row.errors.items()):
            errors.add_metric([label, kind], count)
        summaries = ((waits, row.queue_wait_sum), (runs, row.run_time_sum))
        for index, (family, total) in enumerate(summaries):
            if row.quantiles is not None:
                values = row.quantiles[index]
                for quantile, value in zip(("0.5", "0.9", "0.99"), values, strict=True):
                    family.add_sample(family.name, {"tenant": label, "quantile": quantile}, value)
            family.add_metric([label], row.ran, total)
    yield from (calls, errors, cpu, waits, runs)


def worker_states(stats: PoolStats) -> tuple[tuple[str, int], ...]:
    return (("busy", stats.busy), ("idle", stats.idle), ("starting", stats.starting))


class PoolCollector(Collector):
    """Reads a pool's stats at scrape time (``PoolCollector.of(pool)``); ``read_stats``
    returns None before the pool has started (then nothing is shown)."""

    @classmethod
    def of(cls, pool: WorkerPool) -> PoolCollector:
        """The collector of ``pool``: its ``stats()`` and ``sandbox`` at each scrape."""
        return cls(pool.stats, lambda: pool.sandbox)

    def __init__(
        self,
        read_stats: Callable[[], PoolStats | None],
        read_sandbox: Callable[[], SandboxStatus | None],
    ) -> None:
        self.read_stats = read_stats
        self.read_sandbox = read_sandbox

    def collect(self) -> Iterator[Metric]:
        stats = self.read_stats()
        if stats is None:
            return
        verdict = judge_sandbox(self.read_sandbox())
        for name, value in (("enforced", verdict.enforced), ("complete", verdict.complete)):
            yield GaugeMetricFamily(
                f"{PREFIX}_sandbox_{name}", SANDBOX_HELP[name], value=int(value)
            )
        values = {"crashes": stats.crashes, "respawns": stats.respawns}
        values["start_failures"] = stats.start_failures
        for name, help_text in POOL_COUNTERS.items():
            yield CounterMetricFamily(f"{PREFIX}_{name}", help_text, value=values[name])
        errors = CounterMetricFamily(f"{PREFIX}_errors", ERRORS_HELP, labels=["kind"])
        for kind, count in sorted(errors_by_kind(stats).items()):
            errors.add_metric([kind], count)
        yield errors
        yield GaugeMetricFamily(f"{PREFIX}_queue_depth", QUEUE_HELP, value=stats.queue_depth)
        workers = GaugeMetricFamily(f"{PREFIX}_workers", WORKERS_HELP, labels=["state"])
        for state, count in worker_states(stats):
            workers.add_metric([state], count)
        yield workers
        yield GaugeMetricFamily(f"{PREFIX}_pool_size", POOL_SIZE_HELP, value=stats.size)
        yield from tenant_families(TenantRow.of(tenant) for tenant in stats.tenants)
