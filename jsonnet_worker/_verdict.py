"""The one sandbox verdict: ``doctor``, the service's ``/healthz`` and ``/readyz`` and its
start-up log all judge what the workers reported with :func:`judge_sandbox`, so "healthy" means the
same thing everywhere.

``enforced`` is what ``require_sandbox`` demands (the workers' Landlock layer); ``complete``
adds every other layer and the worker's self-check; ``reasons`` says what is missing.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._status import SandboxStatus


@dataclass(frozen=True)
class SandboxVerdict:
    enforced: bool
    complete: bool
    reasons: tuple[str, ...]

    def summary(self) -> str:
        if self.complete:
            return "sandbox: every layer active"
        return "sandbox: degraded: " + "; ".join(self.reasons)


def judge_sandbox(sandbox: SandboxStatus | None) -> SandboxVerdict:
    """The verdict on what the workers reported (None: no worker has reported yet)."""
    if sandbox is None:
        return SandboxVerdict(False, False, ("no worker has reported its sandbox yet",))
    reasons = [f"{layer.name} missing: {layer.reason}" for layer in sandbox.missing]
    if not sandbox.self_check.startswith("refused"):
        reasons.append(f"self-check: {sandbox.self_check or 'not reported'}")
    return SandboxVerdict(sandbox.enforced, not reasons, tuple(reasons))
