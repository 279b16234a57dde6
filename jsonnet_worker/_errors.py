"""The exception hierarchy: everything raised on purpose is a ``jsonnet_worker.Error``."""

from __future__ import annotations


class Error(Exception):
    """Base class of every error jsonnet_worker raises."""


class JsonnetError(Error):
    """The snippet failed: a syntax or runtime error, an ``error`` expression, or a refused
    import. ``message`` is the engine's text (bounded in size, valid UTF-8)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class EvaluationTimeout(Error, TimeoutError):
    """The evaluation ran past its deadline; its worker was killed and replaced."""


class MemoryLimitExceeded(Error):
    """The evaluation needed more memory than the worker's limit allows."""


class OutputTooLarge(Error):
    """The manifested JSON is larger than ``max_output``."""


class InputTooLarge(Error, ValueError):
    """The request (snippet and variables) is larger than a frame may be."""


class WorkerCrashed(Error):
    """The worker died during the call (a signal, an abort, a kill from outside).

    ``returncode`` is the exit status (negative: the signal number), ``stderr_tail`` what the
    worker printed last."""

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


class Overloaded(Error):
    """No worker became free in time, or the queue of waiting calls is full."""


class PoolClosed(Error):
    """The pool was closed or terminated before or during the call."""


class SandboxUnavailable(Error):
    """``require_sandbox=True`` and the workers report no Landlock sandbox."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason


class WorkerStartError(Error):
    """Workers fail to start (a broken install, a sandbox that cannot be applied); ``cause``
    is what the last one reported."""

    def __init__(self, message: str, cause: str = "") -> None:
        super().__init__(message)
        self.cause = cause


class SandboxConfigError(Error, ValueError):
    """The ``security.landlock`` section of the config given to ``restrict_host`` is invalid."""


class HostSandboxError(Error):
    """Landlock is supported but the host's layer could not be applied: do not serve."""
