"""Public value types that describe a pool: its sandbox and its counters."""

from __future__ import annotations

from dataclasses import dataclass, field

from ._landlock import LandlockStatus


@dataclass(frozen=True)
class SandboxStatus:
    """What the workers reported about their sandbox in their hello.

    ``landlock`` is the Landlock layer (ABI, rights handled, or why it is missing);
    ``self_check`` is the worker's own attempt, after restriction, to open its interpreter.
    """

    landlock: LandlockStatus
    self_check: str = ""

    @property
    def enforced(self) -> bool:
        return self.landlock.enforced

    @property
    def reason(self) -> str:
        """Why the sandbox is not enforced (empty when it is)."""
        return "" if self.enforced else self.landlock.reason or self.landlock.state.value

    def summary(self) -> str:
        return self.landlock.summary()


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
    errors: dict[str, int] = field(default_factory=dict)
    timeouts: int = 0
    crashes: int = 0
    respawns: int = 0
    start_failures: int = 0
    queue_depth: int = 0
    worker_pids: tuple[int, ...] = ()
