"""Prometheus metrics of the service: the pool's counters, read at scrape time, and the
request latency, observed per request.

Goals: ``/metrics`` in the Prometheus text format via prometheus_client, with the figures an
operator alerts on, in one vocabulary: every ``kind`` label is the library's ``Error.kind``
(the word the HTTP body and ``PoolStats.errors`` use), and no second set of counters that
could drift from the pool's.

Plan: a custom collector turns ``WorkerPool.stats()`` into metric families on each scrape
(the pool already counts, under its own lock): ``errors_total{kind}``, crashes, respawns,
start failures, queue depth, workers by state, and the sandbox verdict
(``sandbox_enforced``, ``sandbox_complete``). The service counts every request outcome in
``evaluations_total{endpoint,outcome}`` (``ok`` or the error's kind: a 400 for bad JSON is
``bad_request``) and ``http_requests_total{endpoint,status}``, times it, and exports
``build_info{version,python,engine}``. Each app gets its own ``CollectorRegistry``, so
several apps (tests, embedding) never collide in the global one.

Weak spots: the counters restart at zero with the process, as Prometheus expects of a
counter; with several server processes each has its own pool and counters (README: "The
service", scaling out).
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .. import __version__
from .._errors import Error
from .._status import PoolStats, SandboxStatus
from .._verdict import judge

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "jsonnet_worker"
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


def _error_classes(base: type[Error]) -> list[type[Error]]:
    return [base, *(cls for sub in base.__subclasses__() for cls in _error_classes(sub))]


_KIND_OF_CLASS = {cls.__name__: cls.kind for cls in _error_classes(Error)}


class PoolCollector(Collector):
    """Reads the pool's stats at scrape time; ``read_stats`` returns None before the pool
    has started (then only the service's own metrics are shown)."""

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
        verdict = judge(self.read_sandbox())
        yield GaugeMetricFamily(
            f"{PREFIX}_sandbox_enforced",
            "1 while the workers report their Landlock sandbox enforced (require_sandbox).",
            value=int(verdict.enforced),
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_sandbox_complete",
            "1 while every isolation layer is active (the doctor's and /healthz's verdict).",
            value=int(verdict.complete),
        )
        counters = [
            ("crashes", "Workers that died (during a call or while idle).", stats.crashes),
            ("respawns", "Workers started to replace one that ended.", stats.respawns),
            ("start_failures", "Workers that failed before their hello.", stats.start_failures),
        ]
        for name, help_text, value in counters:
            yield CounterMetricFamily(f"{PREFIX}_{name}", help_text, value=value)
        errors = CounterMetricFamily(
            f"{PREFIX}_errors", "The pool's failed calls by error kind.", labels=["kind"]
        )
        by_kind: dict[str, int] = {}
        for key, count in stats.errors.items():
            kind = _KIND_OF_CLASS.get(key, key)  # stats keyed by class name (older pools)
            by_kind[kind] = by_kind.get(kind, 0) + count
        for kind, count in sorted(by_kind.items()):
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

    def __init__(
        self,
        read_stats: Callable[[], PoolStats | None],
        read_sandbox: Callable[[], SandboxStatus | None],
        engine: str,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(PoolCollector(read_stats, read_sandbox))
        build = Gauge(
            f"{PREFIX}_build_info",
            "The running version (always 1).",
            ["version", "python", "engine"],
            registry=self.registry,
        )
        build.labels(__version__, platform.python_version(), engine).set(1)
        self.outcomes = Counter(
            f"{PREFIX}_evaluations",
            "Evaluation requests by endpoint and outcome (ok, or the error's kind).",
            ["endpoint", "outcome"],
            registry=self.registry,
        )
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

        # labels() hashes and locks on every call: each child is looked up once (the label
        # values are few: endpoints, status codes, error kinds).
        self._children: dict[tuple[str, int, str], tuple[Counter, Counter, Histogram]] = {}

    def observe(self, endpoint: str, status: int, outcome: str, seconds: float) -> None:
        key = (endpoint, status, outcome)
        children = self._children.get(key)
        if children is None:
            children = (
                self.outcomes.labels(endpoint, outcome),
                self.requests.labels(endpoint, str(status)),
                self.latency.labels(endpoint),
            )
            self._children[key] = children
        children[0].inc()
        children[1].inc()
        children[2].observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
