"""What a pool reports about itself: its sandbox (``SandboxStatus``, from the workers' hellos),
its counters (``PoolStats``) and the one verdict on its sandbox (``judge_sandbox``).

The one sandbox verdict: ``doctor``, the service's ``/healthz`` and ``/readyz``, the pool's
and the service's start-up logs all judge what the workers reported with
:func:`judge_sandbox`, so "ok" means the same thing everywhere:

- ``ok``: every layer is active, but those the configuration turned off (``LayerState.OFF``:
  one ``worker_user`` shared by every worker, ``task_limit=None``), which are listed as off
  with the option that turns them on;
- ``degraded``: Landlock is enforced (what ``require_sandbox`` demands, so a fail-closed
  pool serves), but a layer the configuration asks for is missing on this host (a uid drop
  or an IPC namespace under a non-root parent, seccomp on another architecture, no
  writable pids cgroup), or the worker's self-check did not refuse; ``reasons`` says which;
- ``unprotected``: Landlock is not enforced (a fail-closed pool refuses to evaluate).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ._wire.layers import LandlockStatus, LayerState, LayerStatus


def log_landlock(status: LandlockStatus, unprotected: str) -> None:
    """The one record that says whether a Landlock layer is in force; ``unprotected`` says
    what runs without it when it is not."""
    import logging  # here: ``eval`` reads a hello (this module) and logs nothing

    logger = logging.getLogger("jsonnet_worker")
    if status.enforced:
        logger.info(
            "Landlock filesystem sandbox is active.",
            extra={"landlock_abi": status.abi, "sandbox": status.to_dict()},
        )
    else:
        logger.warning(
            "Landlock filesystem sandbox is not available: %s. %s without a filesystem sandbox.",
            status.reason or status.state.value,
            unprotected,
        )


@dataclass(frozen=True)
class SandboxStatus:
    """What the workers reported about their sandbox in their hello.

    ``landlock`` is the Landlock layer (ABI, rights handled, or why it is missing);
    ``self_check`` is the worker's own attempt, after restriction, to open its interpreter;
    ``limits``, ``privileges``, ``seccomp``, ``uid`` and ``ipc_namespace`` are the layers
    beyond Landlock (see docs/ISOLATION.md). ``enforced`` and ``reason`` are about Landlock,
    which ``require_sandbox`` demands; ``missing`` lists every required layer that is not
    active, ``missing_in_depth`` the defence-in-depth ones (``DEFENCE_IN_DEPTH``).
    """

    landlock: LandlockStatus
    self_check: str = ""
    limits: LayerStatus = field(default_factory=lambda: LayerStatus.unreported("limits"))
    privileges: LayerStatus = field(default_factory=lambda: LayerStatus.unreported("privileges"))
    seccomp: LayerStatus = field(default_factory=lambda: LayerStatus.unreported("seccomp"))
    uid: LayerStatus = field(default_factory=lambda: LayerStatus.unreported("uid"))
    ipc_namespace: LayerStatus = field(
        default_factory=lambda: LayerStatus.unreported("ipc_namespace")
    )
    # How the pool makes workers (forks of a sandboxed template, or re-exec and why): not an
    # isolation layer of the workers (a forked worker is as isolated as a re-exec one), so
    # it is in neither ``layers`` nor ``missing``. None: not a pool's status (one worker's).
    template: LayerStatus | None = None
    # How the pool bounds each worker's tasks (threads and processes): a cgroup pids.max of
    # its own, or missing and why (RLIMIT_NPROC, shared by the uid's workers, is then the
    # only bound; docs/SANDBOX.md, "Task limits"). The parent's doing, not a worker's layer:
    # like ``template`` in neither ``layers`` nor ``missing``, and logged once when missing.
    # None: not a pool's status.
    tasks: LayerStatus | None = None

    @property
    def enforced(self) -> bool:
        return self.landlock.enforced

    @property
    def reason(self) -> str:
        """Why the sandbox is not enforced (empty when it is)."""
        return "" if self.enforced else self.landlock.reason or self.landlock.state.value

    @property
    def layers(self) -> tuple[LayerStatus, ...]:
        """Every layer, Landlock first, as active or missing with the reason."""
        landlock = (
            LayerStatus("landlock", LayerState.ACTIVE, self.landlock.summary())
            if self.enforced
            else LayerStatus("landlock", LayerState.MISSING, reason=self.reason)
        )
        return (landlock, *self.extra_layers)

    @property
    def extra_layers(self) -> tuple[LayerStatus, ...]:
        return (self.limits, self.privileges, self.seccomp, self.uid, self.ipc_namespace)

    @property
    def missing(self) -> tuple[LayerStatus, ...]:
        """The required layers that are not active (the pool logs a WARNING for them)."""
        return tuple(layer for layer in self.layers if not layer.active and layer.required)

    @property
    def missing_in_depth(self) -> tuple[LayerStatus, ...]:
        """The defence-in-depth layers that are missing (both under a non-root parent), each
        with its reason; not those the configuration turned off (``off``)."""
        return tuple(
            layer
            for layer in self.layers
            if not layer.active and not layer.off and not layer.required
        )

    @property
    def off(self) -> tuple[LayerStatus, ...]:
        """The layers the configuration turned off (the worker's and the pool's), each with
        the option that turns it on."""
        pool = tuple(layer for layer in (self.tasks,) if layer is not None)
        return tuple(layer for layer in (*self.layers, *pool) if layer.off)

    def summary(self) -> str:
        extra = "; ".join(layer.summary() for layer in self.extra_layers)
        pool = "".join(
            f"; {layer.summary()}" for layer in (self.template, self.tasks) if layer is not None
        )
        return f"{self.landlock.summary()}; {extra}{pool}"


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


@dataclass(frozen=True)
class SandboxVerdict:
    """The one verdict (see the module docstring): ``enforced`` (Landlock: what
    ``require_sandbox`` demands), ``complete`` (every layer the configuration asks for is
    active), ``reasons`` (what is missing, empty when complete) and ``off`` (the layers the
    configuration turned off, with the option that turns each on)."""

    enforced: bool
    complete: bool
    reasons: tuple[str, ...]
    off: tuple[str, ...] = ()

    @property
    def state(self) -> str:
        """``ok``, ``degraded`` or ``unprotected``."""
        if not self.enforced:
            return "unprotected"
        return "ok" if self.complete else "degraded"

    def summary(self) -> str:
        off = f" (off by configuration: {'; '.join(self.off)})" if self.off else ""
        if self.complete:
            return f"sandbox: every layer active{off}"
        return f"sandbox: {self.state}: " + "; ".join(self.reasons) + off


def judge_sandbox(sandbox: SandboxStatus | None) -> SandboxVerdict:
    """The verdict on what the workers reported (None: no worker has reported yet). Every
    layer counts, the defence-in-depth ones and the pool's task limit included; a layer the
    configuration turned off does not, and is listed as off."""
    if sandbox is None:
        return SandboxVerdict(False, False, ("no worker has reported its sandbox yet",))
    wanted = [
        layer for layer in (*sandbox.layers, sandbox.tasks) if layer is not None and not layer.off
    ]
    reasons = [f"{layer.name} missing: {layer.reason}" for layer in wanted if not layer.active]
    if not sandbox.self_check.startswith("refused"):
        reasons.append(f"self-check: {sandbox.self_check or 'not reported'}")
    off = tuple(f"{layer.name}: {layer.reason}" for layer in sandbox.off)
    return SandboxVerdict(sandbox.enforced, not reasons, tuple(reasons), off)
