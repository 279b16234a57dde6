"""Public value types that describe a pool: its sandbox layers and its counters."""

from __future__ import annotations

import enum
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


class LayerState(enum.Enum):
    ACTIVE = "active"
    MISSING = "missing"  # the kernel, the architecture or the configuration lacks it


@dataclass(frozen=True)
class LayerStatus:
    """One isolation layer beyond Landlock (seccomp, privileges, limits), as a worker reported
    it: active with what it does (``detail``), or missing and why (``reason``)."""

    name: str
    state: LayerState
    detail: str = ""
    reason: str = ""

    @property
    def active(self) -> bool:
        return self.state is LayerState.ACTIVE

    @property
    def required(self) -> bool:
        """False for the defence-in-depth layers (``DEFENCE_IN_DEPTH``): reported, and
        logged when missing, but a sandbox without them is still enforced."""
        return self.name not in DEFENCE_IN_DEPTH

    @classmethod
    def unreported(cls, name: str) -> LayerStatus:
        return cls(name, LayerState.MISSING, reason="not reported by the worker")

    def to_dict(self) -> dict[str, object]:
        return {
            "state": self.state.value,
            "detail": self.detail,
            "reason": self.reason,
        }

    @classmethod
    def from_dict(cls, name: str, data: object) -> LayerStatus:
        if not isinstance(data, dict):
            return cls.unreported(name)
        try:
            state = LayerState(str(data.get("state")))
        except ValueError:
            return cls(name, LayerState.MISSING, reason=f"unknown state {data.get('state')!r}")
        return cls(name, state, str(data.get("detail", "")), str(data.get("reason", "")))

    def summary(self) -> str:
        if self.active:
            return f"{self.name}: active ({self.detail})" if self.detail else f"{self.name}: active"
        return f"{self.name}: MISSING ({self.reason})"


# The layers beyond Landlock, in the order the worker applies them.
EXTRA_LAYERS = ("ipc_namespace", "limits", "privileges", "uid", "seccomp")
# Layers a root parent can add on top (a uid per worker, an IPC namespace per worker); a
# non-root parent cannot, and the seccomp filter closes what they would close.
DEFENCE_IN_DEPTH = ("uid", "ipc_namespace")


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
        """The defence-in-depth layers that are not active (``uid`` under the default shared
        ``nobody``; both under a non-root parent), each with its reason."""
        return tuple(layer for layer in self.layers if not layer.active and not layer.required)

    def summary(self) -> str:
        extra = "; ".join(layer.summary() for layer in self.extra_layers)
        template = f"; {self.template.summary()}" if self.template is not None else ""
        return f"{self.landlock.summary()}; {extra}{template}"


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
    template_pid: int | None = None  # the template new workers are forked from; None: re-exec
    forks: int = 0  # workers forked from a template
    fork_fallbacks: int = 0  # workers re-executed because no template could give one
    template_starts: int = 0  # templates started: the first, respawns after a death, replacements
