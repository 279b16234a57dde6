"""Public value types that describe a pool: its sandbox and its counters."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ._landlock import LandlockStatus

logger = logging.getLogger("jsonnet_worker")


def log_landlock(status: LandlockStatus, unprotected: str) -> None:
    """The one record that says whether a Landlock layer is in force; ``unprotected`` says
    what runs without it when it is not."""
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
