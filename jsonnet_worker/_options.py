"""``PoolOptions``: ``WorkerPool``'s keyword options as a ``TypedDict``, so a type checker
sees each option's name and type.

Goals: ``WorkerPool(2, timout=1.0)`` is an error in ``mypy --strict`` (and any checker that
reads PEP 692's ``**kwargs: Unpack[...]``), not only at run time; a wrongly typed option
(``timeout="1"``) too.

Plan: one key per ``PoolConfig`` field except ``size`` (``WorkerPool``'s positional
parameter), each with the field's type; ``total=False``, since every option has its
default in ``PoolConfig``. ``WorkerPool.__init__`` takes ``**options: Unpack[PoolOptions]``
and passes them to ``PoolConfig.replace``, which checks them again at run time.

Weak spots: the keys and types are written again here, beside ``PoolConfig``'s fields (a
checker cannot see a TypedDict built at run time). ``tests/test_options.py`` keeps the two
in step (names and types, nothing missing or extra), so an option added to ``PoolConfig``
without its key here fails the suite. ``WIDENED`` lists the options ``WorkerPool`` accepts
beyond ``PoolConfig``'s type (the test allows exactly those).
"""

from __future__ import annotations

from typing import TypedDict

# Options whose key here also takes None (WorkerPool's signature before PoolConfig took
# queue_limit=None for its default; it still does, and maps it to the default).
WIDENED = ("queue_limit",)


class PoolOptions(TypedDict, total=False):
    """``WorkerPool``'s keyword options; see ``PoolConfig`` for each one's meaning."""

    engine: str
    timeout: float
    memory_limit: int
    max_output: int
    max_stack: int
    max_trace: int
    queue_limit: int | None
    queue_limit_total: int | None
    queue_timeout: float
    spawn_timeout: float
    max_request: int
    spares: int
    require_sandbox: bool
    worker_user: str | range | None
    max_calls_per_worker: int | None
    tenant_share: float | None
    max_workers: int | None
    cpu_budget: float | None
    interactive_budget: float | None
    timeout_clock: str
    task_limit: int | None
    max_trace_lines: int
    max_trace_bytes: int
