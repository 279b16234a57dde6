"""``PoolConfig``: every option of a pool, its default, its check and its help text, once.

Goals: ``WorkerPool``, the CLI's pool flags, the service's ``pool:`` section, ``doctor`` and
the host probe all derive from this one frozen dataclass, so an option added here is
reachable everywhere and they all take its default from here.

Plan: each field's ``metadata`` holds its help text (and, for the CLI, its flag's value
type). ``__post_init__`` validates; a bad value raises ``InvalidArgument``/``InvalidType``
(also ``ValueError``/``TypeError``). ``from_mapping`` takes the service's YAML section,
refusing unknown keys; ``replace`` derives a changed copy.

Weak spots: ``worker_user`` is resolved to numbers later (``_pool.identities``), in the
parent, because only a root parent can drop to it. A few of these numbers are written again
where this module is not consulted: the worker's own command-line defaults (the worker side
imports nothing of the host's), ``_pool.identities.DEFAULT_WORKER_USER`` and
``_pool.launch``'s greeting defaults (for callers that have no PoolConfig), and the
service's packaged ``default.yaml``, which states its pool options explicitly (its memory
limit differs on purpose). ``max_request``'s default is the wire format's frame limit.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ._errors import InvalidArgument, InvalidType
from ._wire.framing import DEFAULT_MAX_FRAME
from ._wire.messages import EngineKind

DEFAULT_TIMEOUT = 1.0
DEFAULT_MEMORY_LIMIT = 1024 * 1024 * 1024
DEFAULT_MAX_OUTPUT = 1024 * 1024
DEFAULT_MAX_STACK = 500
DEFAULT_MAX_TRACE = 20
# std.trace output kept per call for a caller that asks (``on_trace``); the rest is cut.
DEFAULT_MAX_TRACE_LINES = 1000
DEFAULT_MAX_TRACE_BYTES = 64 * 1024
DEFAULT_SPAWN_TIMEOUT = 10.0
DEFAULT_QUEUE_TIMEOUT = 5.0
DEFAULT_QUEUE_LIMIT = 1000
# queue_limit_total's default, as a multiple of queue_limit: a few tenants may each fill
# their own queue, while a flood of many tenant names stays bounded in memory (each waiting
# call holds its encoded request).
QUEUE_LIMIT_TOTAL_FACTOR = 4
DEFAULT_MAX_REQUEST = DEFAULT_MAX_FRAME  # a request is one frame
DEFAULT_SPARES = 1
DEFAULT_WORKER_USER = "nobody"
DEFAULT_CPU_BUDGET = 300.0
DEFAULT_INTERACTIVE_BUDGET = 0.05
# Threads and processes per worker (a cgroup pids.max each, _pool/tasklimit.py). Measured as
# each worker cgroup's pids.peak under load (benchmarks' light and heavy mappers, both
# engines): a go worker peaks at 8 (the interpreter's two, the Go runtime's with
# GOMAXPROCS=2), a cpp one at 2. Four times the go figure; and 256 / 32 = 8 workers bombing
# at once before their uid's RLIMIT_NPROC headroom (TASK_HEADROOM) is gone.
DEFAULT_TASK_LIMIT = 32
ENGINES = tuple(kind.value for kind in EngineKind)
# What a call's timeout may count: the caller's wall clock, or the worker's CPU for the call.
TIMEOUT_CLOCKS = ("wall", "cpu")
# The least memory_limit a worker of each engine starts with and answers under: measured
# (2026-12, Python 3.11, x86_64), a go worker needs 104 MiB (the Go runtime reserves its
# heap arenas and thread stacks at start) and a C++ one 32 MiB; below that the worker dies
# at start with a MemoryError or "pthread_create failed". The floors leave a margin for
# other builds, so that such a config is refused when it is made, not at the first call.
MIN_MEMORY_LIMIT = {EngineKind.GO.value: 128 << 20, EngineKind.CPP.value: 64 << 20}


def _option(default: Any, help: str, **metadata: Any) -> Any:
    return field(default=default, metadata={"help": help, **metadata})


@dataclass(frozen=True)
class PoolConfig:
    """The settings of one ``WorkerPool``."""

    size: int | None = _option(
        None, "worker processes serving calls (default: the CPUs this process may use, >= 2)"
    )
    engine: str = _option("go", f"Jsonnet engine: one of {', '.join(ENGINES)}")
    timeout: float = _option(DEFAULT_TIMEOUT, "seconds one evaluation may run")
    memory_limit: int = _option(DEFAULT_MEMORY_LIMIT, "bytes of memory per worker")
    max_output: int = _option(DEFAULT_MAX_OUTPUT, "bytes of manifested JSON per call")
    max_stack: int = _option(DEFAULT_MAX_STACK, "Jsonnet stack frames per evaluation")
    max_trace: int = _option(
        DEFAULT_MAX_TRACE, "stack frames shown in an error's trace (0: all, as jsonnet)"
    )
    max_trace_lines: int = _option(
        DEFAULT_MAX_TRACE_LINES,
        "std.trace lines (stderr lines) kept per call for a caller that asks; then a marker",
    )
    max_trace_bytes: int = _option(
        DEFAULT_MAX_TRACE_BYTES,
        "bytes of std.trace output (stderr) kept per call for a caller that asks; then a marker",
    )
    queue_limit: int = _option(
        DEFAULT_QUEUE_LIMIT, "calls of one tenant that may wait for a busy pool (per tenant)"
    )
    queue_limit_total: int | None = _option(
        None,
        "calls of all tenants that may wait (default: 4 x queue_limit); when full, the "
        "tenant with the most waiting loses its newest call",
    )
    queue_timeout: float = _option(DEFAULT_QUEUE_TIMEOUT, "seconds a call may wait for a worker")
    spawn_timeout: float = _option(DEFAULT_SPAWN_TIMEOUT, "seconds a worker may take to start")
    max_request: int = _option(DEFAULT_MAX_REQUEST, "bytes of one encoded request")
    spares: int = _option(DEFAULT_SPARES, "started workers held back to replace one that dies")
    require_sandbox: bool = _option(
        True, "refuse to evaluate unless the workers' Landlock sandbox is enforced"
    )
    worker_user: str | range | None = _option(
        DEFAULT_WORKER_USER,
        "user a root parent's workers run as, or a uid range 'FIRST-LAST' (one uid each)",
    )
    max_calls_per_worker: int | None = _option(
        None, "calls one worker process serves before it is recycled (default: no bound)"
    )
    tenant_share: float | None = _option(
        None,
        "share of the workers (0-1] one tenant may hold while another waits "
        "(default: all but one; at least one); alone, a tenant may use every worker",
    )
    max_workers: int | None = _option(
        None,
        "workers, burst ones included, when every worker is held by a demoted long call "
        "and another tenant waits (default: 2 x size)",
    )
    cpu_budget: float | None = _option(
        DEFAULT_CPU_BUDGET,
        "CPU seconds one worker process may use in its life (RLIMIT_CPU); recycled before",
    )
    interactive_budget: float | None = _option(
        DEFAULT_INTERACTIVE_BUDGET,
        "worker CPU seconds a call may use before its worker is moved to SCHED_IDLE (nice 19 "
        "where that is refused), so that it runs only when no other call wants the CPU; "
        "looked at once the call has run that long, so a call a busy machine only slowed "
        "down is not demoted; a demoted worker is recycled after its call (None: never)",
    )
    timeout_clock: str = _option(
        "wall",
        "what a call's timeout counts: 'wall' (seconds from its request) or 'cpu' (the "
        "worker's CPU seconds for the call, with a wall-clock backstop at 4 x the timeout), "
        "so that a call a busy machine slowed down is not killed as a slow snippet",
    )
    task_limit: int | None = _option(
        DEFAULT_TASK_LIMIT,
        "threads and processes one worker may have at once (a cgroup pids.max of its own; "
        "where no pids cgroup is writable, or None: RLIMIT_NPROC alone, shared by the "
        "workers of one uid)",
    )

    def __post_init__(self) -> None:
        _check_int(self, "size", minimum=1, optional=True)
        if not isinstance(self.engine, str):
            raise InvalidType(f"engine must be a str, not {type(self.engine).__name__}")
        if self.engine not in ENGINES:
            raise InvalidArgument(f"engine must be one of {', '.join(ENGINES)}: {self.engine!r}")
        if self.engine == "cpp" and importlib.util.find_spec("_jsonnet") is None:
            raise InvalidArgument(
                "engine 'cpp' needs the C++ binding (the jsonnet package): "
                "pip install 'jsonnet-worker[cpp]'"
            )
        for name in ("timeout", "queue_timeout", "spawn_timeout"):
            _check_seconds(self, name)
        _check_seconds(self, "cpu_budget", optional=True)
        _check_seconds(self, "interactive_budget", optional=True)
        _check_memory_limit(self)
        for name in ("max_output", "max_stack", "max_request"):
            _check_int(self, name, minimum=1)
        _check_int(self, "max_trace", minimum=0)
        _check_int(self, "max_trace_lines", minimum=1)
        _check_int(self, "max_trace_bytes", minimum=1)
        _check_int(self, "queue_limit", minimum=0)
        _check_int(self, "queue_limit_total", minimum=0, optional=True)
        _check_share(self)
        _check_int(self, "max_workers", minimum=1, optional=True)
        if self.size is not None and self.max_workers is not None and self.max_workers < self.size:
            raise InvalidArgument(
                f"max_workers must be at least size={self.size}, not {self.max_workers}"
            )
        _check_int(self, "spares", minimum=0)
        _check_int(self, "max_calls_per_worker", minimum=1, optional=True)
        if self.timeout_clock not in TIMEOUT_CLOCKS:
            raise InvalidArgument(
                f"timeout_clock must be one of {', '.join(TIMEOUT_CLOCKS)}: {self.timeout_clock!r}"
            )
        _check_int(self, "task_limit", minimum=1, optional=True)
        if not isinstance(self.require_sandbox, bool):
            raise InvalidType("require_sandbox must be a bool")
        if self.worker_user is not None and not isinstance(self.worker_user, str | range):
            raise InvalidType("worker_user must be a user name, a uid range or None")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], where: str = "pool") -> PoolConfig:
        """A config from a mapping (the service's ``pool:`` section); unknown keys refused."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise InvalidArgument(
                f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}"
            )
        try:
            return cls(**dict(values))
        except (InvalidArgument, InvalidType) as exc:
            raise type(exc)(f"{where}.{exc}") from None

    def total_queue_limit(self) -> int:
        """Calls of all tenants that may wait: bounds the memory of a many-tenant flood."""
        if self.queue_limit_total is not None:
            return self.queue_limit_total
        return QUEUE_LIMIT_TOTAL_FACTOR * self.queue_limit

    def tenant_workers(self, size: int) -> int:
        """Workers one tenant may hold while another waits, in a pool of ``size``."""
        if self.tenant_share is None:
            return max(1, size - 1)
        return max(1, math.floor(self.tenant_share * size + 1e-9))

    def burst_limit(self, size: int) -> int:
        """Workers at most, burst ones included."""
        return max(size, 2 * size if self.max_workers is None else self.max_workers)

    def replace(self, **changes: Any) -> PoolConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def help(cls) -> dict[str, str]:
        """Each option's help text, by name."""
        return {f.name: str(f.metadata["help"]) for f in dataclasses.fields(cls)}


def _check_int(config: PoolConfig, name: str, *, minimum: int, optional: bool = False) -> None:
    value = getattr(config, name)
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidType(f"{name} must be an int, not {type(value).__name__}")
    if value < minimum:
        raise InvalidArgument(f"{name} must be at least {minimum}, not {value}")


def _check_memory_limit(config: PoolConfig) -> None:
    _check_int(config, "memory_limit", minimum=1)
    floor = MIN_MEMORY_LIMIT[config.engine]
    if config.memory_limit < floor:
        raise InvalidArgument(
            f"memory_limit must be at least {floor} bytes ({floor >> 20} MiB): a "
            f"{config.engine} worker cannot start with less, not {config.memory_limit}"
        )


def _check_share(config: PoolConfig) -> None:
    value = config.tenant_share
    if value is None:
        return
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise InvalidType(f"tenant_share must be a number, not {type(value).__name__}")
    if not math.isfinite(value) or not 0 < value <= 1:
        raise InvalidArgument(f"tenant_share must be in (0, 1], not {value}")


def _check_seconds(config: PoolConfig, name: str, *, optional: bool = False) -> None:
    value = getattr(config, name)
    if value is None and optional:
        return
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise InvalidType(f"{name} must be a number of seconds, not {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise InvalidArgument(f"{name} must be a positive number of seconds, not {value}")
