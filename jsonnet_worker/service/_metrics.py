"""Prometheus metrics of the service: the pool's counters, read at scrape time, and the
request latency, observed per request.

Goals: ``/metrics`` in the Prometheus text format via prometheus_client, with the figures an
operator alerts on, in one vocabulary: every ``kind`` label is the library's ``Error.kind``
(the word the HTTP body and ``PoolStats.errors`` use), and no second set of counters that
could drift from the pool's.

Plan: the collector any embedding application can use, ``jsonnet_worker.metrics.PoolCollector``,
turns ``WorkerPool.stats()`` into metric families on each scrape (the pool already counts,
under its own lock): ``errors_total{kind}``, crashes, respawns,
start failures, queue depth, workers by state, and the sandbox verdict
(``sandbox_enforced``, ``sandbox_complete``). The service counts every request outcome in
``evaluations_total{endpoint,outcome}`` (``ok`` or the error's kind: a 400 for bad JSON is
``bad_request``) and ``http_requests_total{endpoint,status}``, times it, and exports
``build_info{version,python,engine}``. Per tenant, from ``PoolStats.tenants``:
``tenant_calls_total``, ``tenant_errors_total{kind}``, ``tenant_cpu_seconds_total`` and the
summaries ``tenant_queue_wait_seconds`` and ``tenant_run_time_seconds`` (p50, p90, p99, sum,
count), each labelled ``tenant``: the pool's own bound (its top tenants by CPU, then
``other``) bounds their cardinality, however many tenant names requests carry. A service
tenant is always ``config:...`` or ``adhoc:...`` (or those words alone), so ``other`` names
no tenant. Each app gets its own ``CollectorRegistry``, so
several apps (tests, embedding) never collide in the global one.

Several server processes (``serve --workers N``): prometheus_client's multiprocess mode,
in a private directory the parent process makes (``multiprocess_dir``; the same path in
``PROMETHEUS_MULTIPROC_DIR`` before prometheus_client is imported, which is what selects
its file-backed values). Every process writes its own files there and ``/metrics``, in
whichever process answers, reads them all. A collector cannot read another process's
pool, so each process copies its pool's stats into file-backed metrics (``PoolFigures``):
at every scrape it answers, and every ``REFRESH_INTERVAL`` seconds. The pool's counters
are added as deltas (a sum over every process that ever ran, as a counter should be); the
gauges are ``livesum`` (workers, queue depth, pool size: the service's totals) and
``livemin`` (the sandbox gauges: 1 only when every live process has its sandbox);
``build_info`` is ``livemax``. The parent marks a process dead when it ends, so its
gauges leave the sums. The per-tenant series cannot be file-backed metrics (those keep
every label set ever written, so the bound would not hold): each process writes its pool's
tenant tallies to a file of its own in the same directory (``tenants-<pid>.json``, replaced
whole at each copy), and the process that answers a scrape merges every file (the files of
processes that ended included: counters never go down), sums by tenant, and exports the
``MERGED_TENANTS`` tenants with the most CPU one by one and the rest as ``other``. Quantiles
cannot be merged from quantiles, so there the two summaries have their sum and count only.

Weak spots: the counters restart at zero with the service, as Prometheus expects of a
counter, and a tenant's series restart at zero when it comes back after being folded into
``other`` (with several processes, also when the merge's top tenants change: a tenant's
counts then move between its series and ``other``); with several processes another
process's pool gauges and tenants are up to ``REFRESH_INTERVAL`` old, and
``_created`` samples are not exported (prometheus_client's multiprocess mode has none).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import platform
import tempfile
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import (
    Metric,
)
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from .. import InvalidArgument, PoolStats, SandboxStatus, __version__, judge_sandbox
from ..metrics import (
    ERRORS_HELP,
    OTHER_TENANTS,
    POOL_COUNTERS,
    POOL_SIZE_HELP,
    PREFIX,
    QUEUE_HELP,
    SANDBOX_HELP,
    WORKERS_HELP,
    PoolCollector,
    TenantRow,
    errors_by_kind,
    tenant_families,
    worker_states,
)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
REFRESH_INTERVAL = 1.0  # seconds between two copies of a process's pool stats to its files
# Multiprocess mode: tenants exported one by one after merging every process's (the pool's
# own default bound), and the files each process writes its tenants to.
MERGED_TENANTS = 32
TENANT_FILES = "tenants-*.json"


def merged_tenants(
    files: Iterable[list[TenantRow]], limit: int = MERGED_TENANTS
) -> list[TenantRow]:
    """Every process's tenant rows summed by label; the ``limit`` with the most CPU one by
    one, most first, the rest folded into ``other`` (last, when it counted a call)."""
    by_label: dict[str, TenantRow] = {}
    for rows in files:
        for row in rows:
            mine = by_label.get(row.label)
            if mine is None:
                by_label[row.label] = dataclasses.replace(
                    row, errors=dict(row.errors), quantiles=None
                )
            else:
                mine.absorb(row)
    other = by_label.pop(OTHER_TENANTS, None)
    ranked = sorted(by_label.values(), key=lambda row: row.cpu_seconds, reverse=True)
    for row in ranked[limit:]:
        if other is None:
            other = dataclasses.replace(row, label=OTHER_TENANTS, errors=dict(row.errors))
        else:
            other.absorb(row)
    return ranked[:limit] + ([other] if other is not None and other.calls else [])


def write_tenant_file(directory: str, pid: int, stats: PoolStats) -> None:
    """This process's tenant rows to its own file, replaced whole (a reader never sees a
    half-written one)."""
    rows = [dataclasses.asdict(TenantRow.of(tenant)) for tenant in stats.tenants]
    for row in rows:
        row["quantiles"] = None  # not mergeable: not written
    fd, temporary = tempfile.mkstemp(prefix=".tenants-", dir=directory)
    try:
        with os.fdopen(fd, "w") as file:
            json.dump(rows, file)
        os.replace(temporary, os.path.join(directory, f"tenants-{pid}.json"))
    except BaseException:
        os.unlink(temporary)
        raise


def read_tenant_files(directory: str) -> Iterator[list[TenantRow]]:
    """Every process's tenant rows. A file that cannot be read or parsed is skipped: it is
    written whole by one of ours, so that is a disk failure or a stranger's file."""
    for path in sorted(glob.glob(os.path.join(directory, TENANT_FILES))):
        try:
            with open(path) as file:
                rows = json.load(file)
            yield [TenantRow(**row) for row in rows]
        except (OSError, ValueError, TypeError):
            continue


class TenantFilesCollector(Collector):
    """Multiprocess mode: the merged per-tenant series of every process's tenant file."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def collect(self) -> Iterator[Metric]:
        yield from tenant_families(merged_tenants(read_tenant_files(self.directory)))


class PoolFigures:
    """Multiprocess mode: this process's pool stats copied into file-backed metrics, so
    that the process that answers a scrape shows every process's pool (see the module's
    docstring for each metric's mode)."""

    def __init__(
        self,
        read_stats: Callable[[], PoolStats | None],
        read_sandbox: Callable[[], SandboxStatus | None],
        registry: CollectorRegistry,
        directory: str,
    ) -> None:
        self.read_stats = read_stats
        self.read_sandbox = read_sandbox
        self.directory = directory
        self.sandbox = {
            name: Gauge(
                f"{PREFIX}_sandbox_{name}",
                help_text,
                registry=registry,
                multiprocess_mode="livemin",
            )
            for name, help_text in SANDBOX_HELP.items()
        }
        self.counters = {
            name: Counter(f"{PREFIX}_{name}", help_text, registry=registry)
            for name, help_text in POOL_COUNTERS.items()
        }
        self.errors = Counter(f"{PREFIX}_errors", ERRORS_HELP, ["kind"], registry=registry)
        self.queue_depth = Gauge(
            f"{PREFIX}_queue_depth", QUEUE_HELP, registry=registry, multiprocess_mode="livesum"
        )
        self.workers = Gauge(
            f"{PREFIX}_workers",
            WORKERS_HELP,
            ["state"],
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.pool_size = Gauge(
            f"{PREFIX}_pool_size", POOL_SIZE_HELP, registry=registry, multiprocess_mode="livesum"
        )
        self.copied: dict[tuple[str, str], int] = {}  # counter values already added

    def refresh(self) -> None:
        stats = self.read_stats()
        if stats is None:
            return
        verdict = judge_sandbox(self.read_sandbox())
        self.sandbox["enforced"].set(int(verdict.enforced))
        self.sandbox["complete"].set(int(verdict.complete))
        values = {"crashes": stats.crashes, "respawns": stats.respawns}
        values["start_failures"] = stats.start_failures
        for name, counter in self.counters.items():
            self._add(counter, (name, ""), values[name])
        for kind, count in errors_by_kind(stats).items():
            self._add(self.errors.labels(kind), ("errors", kind), count)
        self.queue_depth.set(stats.queue_depth)
        for state, count in worker_states(stats):
            self.workers.labels(state).set(count)
        self.pool_size.set(stats.size)
        write_tenant_file(self.directory, os.getpid(), stats)

    def _add(self, counter: Counter, key: tuple[str, str], value: int) -> None:
        """Add what the pool counted since the last copy (a counter only goes up)."""
        delta = value - self.copied.get(key, 0)
        if delta > 0:
            counter.inc(delta)
            self.copied[key] = value


class ServiceMetrics:
    """The registry of one app: the pool collector plus per-request metrics; with
    ``multiprocess_dir``, file-backed metrics that ``render`` reads for every process."""

    def __init__(
        self,
        read_stats: Callable[[], PoolStats | None],
        read_sandbox: Callable[[], SandboxStatus | None],
        engine: str,
        multiprocess_dir: str | None = None,
    ) -> None:
        self.multiprocess_dir = multiprocess_dir
        self.registry = CollectorRegistry(auto_describe=True)
        self.pool_figures: PoolFigures | None = None
        if multiprocess_dir is None:
            self.registry.register(PoolCollector(read_stats, read_sandbox))
        else:
            if os.environ.get(MULTIPROC_ENV) != multiprocess_dir:
                # prometheus_client chose in-memory values at import: nothing would be shared
                raise InvalidArgument(
                    f"multiprocess metrics in {multiprocess_dir} need {MULTIPROC_ENV} set to "
                    "it before prometheus_client is imported"
                )
            self.pool_figures = PoolFigures(
                read_stats, read_sandbox, self.registry, multiprocess_dir
            )
        build = Gauge(
            f"{PREFIX}_build_info",
            "The running version (always 1).",
            ["version", "python", "engine"],
            registry=self.registry,
            multiprocess_mode="livemax",
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

    def refresh(self) -> None:
        """Copy this process's pool stats to the shared files (multiprocess mode only)."""
        if self.pool_figures is not None:
            self.pool_figures.refresh()

    def render(self) -> bytes:
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        self.refresh()
        # A registry per scrape, holding only the reader of every process's files.
        every_process = CollectorRegistry()
        MultiProcessCollector(every_process, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
        every_process.register(TenantFilesCollector(self.multiprocess_dir))
        return generate_latest(every_process)
