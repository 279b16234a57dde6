"""What a pool counts: its workers and calls (``PoolStats``, ``WorkerPool.stats()``), each
trust domain's share (``TenantStats``) and one call as the pool measured it (``CallInfo``,
``jsonnet_worker.last_call()``).

Apart from ``_report`` (the sandbox and its verdict) so that a command that makes one call
(``eval``) builds none of these values: each dataclass costs its import a few compiled
methods.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class PoolStats:
    """A snapshot of a pool's workers and counters (``WorkerPool.stats()``)."""

    size: int
    alive: int
    busy: int
    idle: int
    starting: int
    spares: int
    evaluations: int
    errors: dict[str, int] = field(default_factory=dict)  # by ``Error.kind``
    timeouts: int = 0
    crashes: int = 0
    respawns: int = 0
    start_failures: int = 0
    queue_depth: int = 0
    worker_pids: tuple[int, ...] = ()
    recycles: int = 0  # healthy workers replaced (call or CPU budget spent, another tenant)
    burst: int = 0  # workers alive beyond ``size`` (every worker was held by a demoted call)
    template_pid: int | None = None  # the template new workers are forked from; None: re-exec
    forks: int = 0  # workers forked from a template
    fork_fallbacks: int = 0  # workers re-executed because no template could give one
    template_starts: int = 0  # templates started: the first, respawns after a death, replacements
    # Per trust domain, most worker CPU first: at most 32 tenants, then the one ``other``.
    tenants: tuple[TenantStats, ...] = ()


@dataclass(frozen=True)
class TenantStats:
    """What one trust domain's calls cost the pool since it was first seen
    (``PoolStats.tenants``).

    ``tenant`` is the calls' tenant (None: calls without one); ``other`` marks the one
    entry that sums the domains not tallied one by one (its ``tenant`` is None). ``calls``
    counts every call that ended, ``errors`` those that failed, by ``Error.kind`` (and
    ``cancelled``: a caller interrupted or cancelled). ``cpu_seconds`` is the worker CPU
    time the calls used. ``ran`` counts the calls that reached a worker: the samples of the
    percentiles (seconds, read from log-scale buckets: within 25 %) and sums of
    ``queue_wait`` (admitted to holding a worker) and ``run_time`` (request written to
    answer)."""

    tenant: str | None
    other: bool = False
    calls: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    cpu_seconds: float = 0.0
    ran: int = 0
    queue_wait_p50: float = 0.0
    queue_wait_p90: float = 0.0
    queue_wait_p99: float = 0.0
    queue_wait_sum: float = 0.0
    run_time_p50: float = 0.0
    run_time_p90: float = 0.0
    run_time_p99: float = 0.0
    run_time_sum: float = 0.0


@dataclass(frozen=True, slots=True)
class CallInfo:
    """One call as the pool measured it (``jsonnet_worker.last_call()``; with
    ``opentelemetry-api`` installed, also attributes of the caller's current span).

    ``worker_pid`` is None, and ``run_time`` and ``worker_cpu`` 0.0, for a call that never
    reached a worker; ``queue_wait`` then is how long it waited before it failed. ``error``
    is the call's ``Error.kind`` (``cancelled`` for a cancellation), None on success."""

    tenant: str | None
    worker_pid: int | None
    queue_wait: float
    run_time: float
    worker_cpu: float
    error: str | None = None
