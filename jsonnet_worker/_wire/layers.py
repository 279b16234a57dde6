"""The sandbox layers a worker reports in its hello: each active with what it does, or
missing and why. Both processes use these values: the worker builds them, the pool reads them."""

from __future__ import annotations

import enum
from dataclasses import dataclass


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
