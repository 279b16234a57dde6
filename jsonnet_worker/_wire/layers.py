"""The sandbox layers a worker reports in its hello: Landlock (``LandlockStatus``, which
``_sandbox.landlock`` makes) and each layer beyond it (``LayerStatus``), active with what it
does or missing and why. Both processes use these values: the worker builds them, the pool
reads them (``messages`` turns them into a hello's fields and back).

Its values are ``_wire.values.valueclass``es, not dataclasses: every worker imports this
module, and ``dataclasses`` (with ``inspect``) would cost each worker's start ~18 ms.
"""

from __future__ import annotations

import enum

from .values import valueclass


class SupportState(enum.Enum):
    AVAILABLE = "available"
    NOT_BUILT_IN = "not built in"  # ENOSYS: kernel < 5.13, not compiled in, or gVisor
    DISABLED_AT_BOOT = "disabled at boot"  # EOPNOTSUPP: not in the lsm= list
    BLOCKED_BY_SECCOMP = "blocked by a seccomp profile"  # EPERM: Landlock never says this
    NOT_LINUX = "not Linux"


@valueclass
class LandlockStatus:
    """What a Landlock restriction achieved (``_sandbox.landlock``): one typed value for logs,
    hellos and ``doctor``."""

    enforced: bool
    state: SupportState
    abi: int = 0
    errata: int = 0
    handled_fs: tuple[str, ...] = ()
    handled_net: tuple[str, ...] = ()
    scoped: tuple[str, ...] = ()
    restrict_flags: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()
    reason: str = ""

    def to_dict(self) -> dict[str, object]:
        return {
            "enforced": self.enforced,
            "state": self.state.value,
            "abi": self.abi,
            "errata": self.errata,
            "handled_fs": list(self.handled_fs),
            "handled_net": list(self.handled_net),
            "scoped": list(self.scoped),
            "restrict_flags": list(self.restrict_flags),
            "dropped": list(self.dropped),
            "reason": self.reason,
        }

    def summary(self) -> str:
        if not self.enforced:
            return f"Landlock not enforced: {self.reason or self.state.value}"
        parts = [f"Landlock ABI {self.abi} enforced", f"fs rights: {len(self.handled_fs)}"]
        if self.handled_net:
            parts.append("net: " + ", ".join(self.handled_net))
        if self.scoped:
            parts.append("scoped: " + ", ".join(self.scoped))
        if self.dropped:
            parts.append("dropped (kernel lacks): " + ", ".join(self.dropped))
        return "; ".join(parts)


class LayerState(enum.Enum):
    ACTIVE = "active"
    MISSING = "missing"  # wanted, but the kernel, the architecture or the parent lacks it
    OFF = "off"  # the configuration chose to go without it (the reason says which option)


@valueclass
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

    @property
    def off(self) -> bool:
        """The configuration turned it off: not active, and not a shortfall of the host."""
        return self.state is LayerState.OFF

    def summary(self) -> str:
        if self.active:
            return f"{self.name}: active ({self.detail})" if self.detail else f"{self.name}: active"
        if self.off:
            return f"{self.name}: off ({self.reason})"
        return f"{self.name}: MISSING ({self.reason})"


# The layers beyond Landlock, in the order the worker applies them.
EXTRA_LAYERS = ("ipc_namespace", "limits", "privileges", "uid", "seccomp")
# Layers a root parent can add on top (a uid per worker, an IPC namespace per worker); a
# non-root parent cannot, and the seccomp filter closes what they would close.
DEFENCE_IN_DEPTH = ("uid", "ipc_namespace")
