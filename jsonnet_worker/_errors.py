"""The exception hierarchy: everything raised on purpose is a ``jsonnet_worker.Error``.

Each class carries ``kind`` (a stable snake_case name, the one vocabulary used by
``PoolStats.errors``, the service's metrics labels and its HTTP bodies) and ``http_status``
(the status a service answers it with). Grouped by whose fault it is::

    Error (kind "error", 500)
    |
    |-- the snippet's: the same request fails the same way again
    |   |-- JsonnetError            jsonnet_error      422  syntax/runtime error, refused import
    |   |-- OutputTooLarge          output_too_large   422
    |   |-- MemoryLimitExceeded     memory_limit       422
    |   `-- EvaluationTimeout       timeout            504  (also TimeoutError)
    |
    |-- the caller's: bad arguments, refused before any worker sees them
    |   |-- InvalidArgument         invalid_argument   400  (also ValueError)
    |   |   |-- InputTooLarge       too_large          413
    |   |   `-- SandboxConfigError  sandbox_config     400
    |   `-- InvalidType             invalid_type       400  (also TypeError)
    |
    |-- the pool's: capacity and lifecycle
    |   |-- Overloaded              overloaded         503  (no worker within queue_timeout)
    |   |   `-- TenantOverloaded    tenant_overloaded  429  (this tenant's queue is full)
    |   |-- PoolClosed              unavailable        503
    |   |-- ForkedPool              forked_pool        500
    |   |-- WorkerCrashed           worker_crashed     502  (the snippet may have caused it)
    |   |-- ProtocolError           protocol_error     502  (a worker lied; it was replaced)
    |   |-- ConnectionMisuse        internal           500  (a bug of ours: _connection)
    |   `-- WorkerStartError        unavailable        503
    |       `-- ForkServerUnavailable fork_server_unavailable 503  (_pool.forking: re-exec)
    |
    |-- the sandbox's: where isolation is required but cannot be applied, nothing runs
    |   |-- SandboxUnavailable      sandbox_unavailable 503
    |   |-- UnsupportedPlatform     unsupported_platform 500
    |   `-- HostSandboxError        host_sandbox       500
    |
    `-- the tools' (defined beside their code, same contract)
        |-- SuiteError              invalid_suite      400  (_testrunner: a suite unreadable)
        |   `-- SuiteNotUpdated     suite_not_updated  500  (test --update left a suite as it was)
        |-- ApiError                api_error    (its own status) (service: an HTTP answer)
        |-- StartupCheckFailed      startup_check      500  (service: a mapper fails check)
        `-- ServerProcessesError    server_processes   500  (service: serve --workers N)
    (ConfigError, the service's bad config, is an InvalidArgument: kind service_config.)
"""

from __future__ import annotations


class Error(Exception):
    """Base class of every error jsonnet_worker raises."""

    kind = "error"
    http_status = 500


# -- the snippet's ---------------------------------------------------------------------------


class JsonnetError(Error):
    """The snippet failed: a syntax or runtime error, an ``error`` expression, or a refused
    import. ``message`` is the engine's text (bounded in size, valid UTF-8)."""

    kind = "jsonnet_error"
    http_status = 422

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class OutputTooLarge(Error):
    """The manifested JSON is larger than ``max_output``."""

    kind = "output_too_large"
    http_status = 422


class MemoryLimitExceeded(Error):
    """The evaluation needed more memory than the worker's limit allows."""

    kind = "memory_limit"
    http_status = 422


class EvaluationTimeout(Error, TimeoutError):
    """The evaluation ran past its deadline (or its worker's CPU budget); its worker was
    killed and replaced. ``clock`` says which clock ran out: ``"wall"`` (the call's
    deadline) or ``"cpu"`` (the worker's CPU budget: RLIMIT_CPU, SIGXCPU); the message
    says so too."""

    kind = "timeout"
    http_status = 504

    def __init__(self, message: str, *, clock: str = "wall") -> None:
        super().__init__(message)
        self.clock = clock


# -- the caller's ----------------------------------------------------------------------------


class InvalidArgument(Error, ValueError):
    """An argument has a bad value (a negative timeout, a name given twice, NaN)."""

    kind = "invalid_argument"
    http_status = 400


class InvalidType(Error, TypeError):
    """An argument has a type the call cannot take (a snippet that is not ``str``)."""

    kind = "invalid_type"
    http_status = 400


class InputTooLarge(InvalidArgument):
    """The request (snippet and variables) is larger than a frame may be."""

    kind = "too_large"
    http_status = 413


class SandboxConfigError(InvalidArgument):
    """The ``security.landlock`` section of the config given to ``restrict_host`` is invalid."""

    kind = "sandbox_config"


# -- the pool's ------------------------------------------------------------------------------


class Overloaded(Error):
    """No worker became free in time (``queue_timeout``); ``TenantOverloaded`` when the
    caller's tenant's queue is full."""

    kind = "overloaded"
    http_status = 503


class TenantOverloaded(Overloaded):
    """The caller's own tenant has as many calls waiting as it may (``queue_limit`` per
    tenant, or its part of ``queue_limit_total``): only that tenant is refused, others are
    served. ``tenant`` names it (None: the calls without a tenant)."""

    kind = "tenant_overloaded"
    http_status = 429

    def __init__(self, message: str, tenant: str | None = None) -> None:
        super().__init__(message)
        self.tenant = tenant


class PoolClosed(Error):
    """The pool was closed or terminated before or during the call."""

    kind = "unavailable"
    http_status = 503


class ForkedPool(Error):
    """An explicit ``WorkerPool`` created before ``fork()`` was used in the child; its
    workers belong to the parent. Create pools after the fork (README: prefork servers)."""

    kind = "forked_pool"


class WorkerCrashed(Error):
    """The worker died during the call (a signal, an abort, a kill from outside).

    ``returncode`` is the exit status (negative: the signal number), ``stderr_tail`` what the
    worker printed during this call (never an earlier call's output)."""

    kind = "worker_crashed"
    http_status = 502

    def __init__(
        self, message: str, *, returncode: int | None = None, stderr_tail: str = ""
    ) -> None:
        super().__init__(message)
        self.returncode = returncode
        self.stderr_tail = stderr_tail

    @property
    def signal(self) -> int | None:
        return -self.returncode if self.returncode is not None and self.returncode < 0 else None


class ProtocolError(Error):
    """A worker answered with something other than a well-formed response to the request; the
    worker was replaced."""

    kind = "protocol_error"
    http_status = 502


class WorkerStartError(Error):
    """Workers fail to start (a broken install, a sandbox that cannot be applied); ``cause``
    is what the last one reported."""

    kind = "unavailable"
    http_status = 503

    def __init__(self, message: str, cause: str = "") -> None:
        super().__init__(message)
        self.cause = cause


# -- the sandbox's ---------------------------------------------------------------------------


class SandboxUnavailable(Error):
    """``require_sandbox=True`` (the default) and the workers report no Landlock sandbox."""

    kind = "sandbox_unavailable"
    http_status = 503

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason


class UnsupportedPlatform(Error):
    """The worker sandbox needs Linux (Landlock, seccomp, pidfd); this platform or kernel
    lacks what the pool cannot do without."""

    kind = "unsupported_platform"


class HostSandboxError(Error):
    """Landlock is supported but the host's layer could not be applied: do not serve."""

    kind = "host_sandbox"
