"""What a pool reports about its sandbox: the layers (``SandboxStatus``, from the workers'
hellos) and the one verdict on them (``judge_sandbox``). Its counters are ``_stats``'s: a
command that makes one call (``eval``) judges a sandbox and counts nothing.

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

``SandboxStatus`` and ``SandboxVerdict`` are value classes (``_wire.values``), as the
layers they hold are, not dataclasses: ``eval`` builds both, and as dataclasses they cost its
import ~3.5 ms of compiled methods. ``dataclasses.asdict`` and ``replace`` do not take them
(``_wire.values.replace`` does).
"""

from __future__ import annotations

from ._wire.layers import LandlockStatus, LayerState, LayerStatus
from ._wire.values import field, valueclass


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


@valueclass
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


@valueclass
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
