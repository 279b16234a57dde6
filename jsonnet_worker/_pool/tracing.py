"""Each call's measurements for its caller: ``last_call()``, and OpenTelemetry span attributes.

Goals: a caller can put the queue wait, worker CPU time and worker pid of the call it just
made on its trace (Ory Kratos puts the worker's CPU time and run-queue wait on its span),
on both call paths, without a change to any return type, and without the pool paying for
tracing nobody does.

Plan: ``publish`` (from ``calls``, as a call ends, success or error) sets a
``contextvars.ContextVar`` that ``last_call()`` reads. A context variable, not a pool
attribute or a callback: it is per thread and per asyncio task by construction, so two
callers never see each other's call, and reading it costs the caller nothing it did not ask
for (a callback would run the caller's code on the call path, inside the pool's error
handling). With ``opentelemetry-api`` installed (the ``otel`` extra), it also sets
``jsonnet_worker.*`` attributes on the caller's current span, if that span records (no SDK,
or no span: one ``get_current_span`` and nothing else). It is never imported here: only a
process that has imported it can have a span (``OTEL_TRACE``).

Weak spots: ``last_call()`` sees the calls made in its own thread or task: not those of
``submit()`` (an executor thread) nor those of a task the caller created and awaited (its
context is a copy). The span is whatever is current in the caller's context: a caller that
wants one span per evaluation starts it around the call.
"""

from __future__ import annotations

import contextvars
import sys

from .._stats import CallInfo

# The OpenTelemetry API module, looked up when a call ends, never imported here: a span can
# be current only in a process that has imported it (the API or an SDK), and importing it
# costs every process that never traces ~15 ms at start (the CLI's ``eval`` among them).
OTEL_TRACE = "opentelemetry.trace"

# The last call's measurements as ``publish`` got them: a plain tuple, turned into a
# ``CallInfo`` only when ``last_call()`` asks (most callers never do; building a frozen
# dataclass on every call costs the hot path more than the tuple).
_Measured = tuple[str | None, int | None, float, float, float, str | None]
_last_call: contextvars.ContextVar[_Measured | None] = contextvars.ContextVar(
    "jsonnet_worker_last_call", default=None
)


def last_call() -> CallInfo | None:
    """The measurements of the last call this thread or asyncio task made on any pool
    (None before its first): tenant, worker pid, queue wait, run time, worker CPU seconds,
    error kind. Set when the call returns or raises, so read it right after."""
    measured = _last_call.get()
    return None if measured is None else CallInfo(*measured)


def publish(
    tenant: str | None,
    worker_pid: int | None,
    queue_wait: float,
    run_time: float,
    worker_cpu: float,
    error: str | None,
) -> None:
    """A call ended: its measurements (``CallInfo``'s fields, in its order) for
    ``last_call()`` and the caller's current span."""
    _last_call.set((tenant, worker_pid, queue_wait, run_time, worker_cpu, error))
    if OTEL_TRACE not in sys.modules:  # not imported: no span to add to (a test, no call)
        return
    span = sys.modules[OTEL_TRACE].get_current_span()
    if not span.is_recording():
        return
    attributes: dict[str, str | int | float] = {
        "jsonnet_worker.queue_wait_ms": queue_wait * 1000.0,
        "jsonnet_worker.run_time_ms": run_time * 1000.0,
        "jsonnet_worker.worker_cpu_ms": worker_cpu * 1000.0,
    }
    if tenant is not None:  # OpenTelemetry attributes have no None
        attributes["jsonnet_worker.tenant"] = tenant
    if worker_pid is not None:
        attributes["jsonnet_worker.worker_pid"] = worker_pid
    if error is not None:
        attributes["jsonnet_worker.error"] = error
    span.set_attributes(attributes)
