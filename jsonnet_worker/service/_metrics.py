"""Prometheus metrics of the service: the pool's counters, read at scrape time, and the
request latency, observed per request.

Goals: ``/metrics`` in the Prometheus text format via prometheus_client, with the figures an
operator alerts on (evaluations, errors by kind, timeouts, crashes, respawns, queue depth,
workers by state, latency), and no second set of counters that could drift from the pool's.

Plan: a custom collector turns ``WorkerPool.stats()`` into metric families on each scrape
(the pool already counts, under its own lock); the service adds a request counter by
endpoint and status and a latency histogram by endpoint. Each app gets its own
``CollectorRegistry``, so several apps (tests, embedding) never collide in the global one.

Weak spots: the pool's counters restart at zero with the process, as Prometheus expects of a
counter; ``errors`` counts the pool's typed errors only (a 400 never reaches the pool: it is
in the request counter's ``status`` label).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .._status import PoolStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "jsonnet_worker"
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


class PoolCollector(Collector):
    """Reads the pool's stats at scrape time; ``read_stats`` returns None before the pool
    has started (then only the service's own metrics are shown)."""

    def __init__(self, read_stats: Callable[[], PoolStats | None]) -> None:
        self.read_stats = read_stats

    def collect(self) -> Iterator[Metric]:
        stats = self.read_stats()
        if stats is None:
            return
        counters = [
            ("evaluations", "Evaluations that returned a result.", stats.evaluations),
            ("timeouts", "Evaluations killed at their deadline.", stats.timeouts),
            ("crashes", "Workers that died (during a call or while idle).", stats.crashes),
            ("respawns", "Workers started to replace one that ended.", stats.respawns),
            ("start_failures", "Workers that failed before their hello.", stats.start_failures),
        ]
        for name, help_text, value in counters:
            yield CounterMetricFamily(f"{PREFIX}_{name}", help_text, value=value)
        errors = CounterMetricFamily(
            f"{PREFIX}_errors", "Failed evaluations by error kind.", labels=["kind"]
        )
        for kind, count in sorted(stats.errors.items()):
            errors.add_metric([kind], count)
        yield errors
        yield GaugeMetricFamily(
            f"{PREFIX}_queue_depth", "Calls waiting for a free worker.", value=stats.queue_depth
        )
        workers = GaugeMetricFamily(
            f"{PREFIX}_workers", "Worker processes by state.", labels=["state"]
        )
        for state, count in (
            ("busy", stats.busy),
            ("idle", stats.idle),
            ("starting", stats.starting),
        ):
            workers.add_metric([state], count)
        yield workers
        yield GaugeMetricFamily(f"{PREFIX}_pool_size", "Configured pool size.", value=stats.size)


class ServiceMetrics:
    """The registry of one app: the pool collector plus per-request metrics."""

    def __init__(self, read_stats: Callable[[], PoolStats | None]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(PoolCollector(read_stats))
        self.requests = Counter(
            f"{PREFIX}_http_requests",
            "HTTP requests by endpoint and status code.",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "Time to answer an evaluation request (mapper, template or snippet), in seconds.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
