"""The module-level ``evaluate``/``aevaluate``: a default pool, created on first use.

Goals: one call needs no set-up, and a process that forks (gunicorn ``--preload``, Celery's
prefork parent, ``multiprocessing`` with fork) neither shares its pool with its children nor
keeps an idle one alive for its whole life after it has forked them.

Plan: the default pool belongs to the process that created it: in a forked child the first
call starts a fresh pool and never touches the parent's (its workers, channels and
supervisor thread stay the parent's). Just before ``os.fork()`` (``os.register_at_fork``'s
``before=``, in the forking thread) the default pool this module started is terminated if
nothing can be using it: no call on it running or queued, and no thread in the process but
the forking one and pools' supervisor threads (none of which calls it). Then the child
inherits no fd of it and the parent keeps no idle workers; the parent's next call, if any,
starts a new pool (about 0.1-0.2 s). See docs/DESIGN.md ("Fork") and README.md ("Prefork
servers").

Weak spots: the pool is kept (and the reason logged at INFO) when another thread exists,
since that thread could be starting a call on it in this very instant, and killing its
workers under it would fail that call; a multi-threaded process that forks keeps its pool,
as before (Python 3.12 warns against such forks). A pool given with ``set_default_pool`` is
the caller's and is never closed here. Terminating an idle pool delays the fork by the time
it takes to kill and reap its processes (a few milliseconds, measured in
benchmarks/bench_prefork.py); ``multiprocessing`` with fork, forking again and again
between calls, pays a pool start per call after each fork.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping
from typing import Any, Unpack

from ._library import Library
from ._pool.facade import EvaluateKeywords, WorkerPool

logger = logging.getLogger("jsonnet_worker")

_lock = threading.Lock()
_pool: WorkerPool | None = None
_owner = os.getpid()  # the process _pool was created in
_started_here = False  # _pool was started by get_default_pool (not given to set_default_pool)
# Threads that never call the default pool: every pool's supervisor (facade names them so).
_SUPERVISOR_THREAD = "jsonnet-worker-supervisor"


def why_kept_at_fork(pool: WorkerPool) -> str | None:
    """Why ``pool`` may be in use at a fork (None: it cannot be, and may be terminated).
    For the pools the library starts itself: this module's and ``compat``'s."""
    here = threading.current_thread()
    others = [t.name for t in threading.enumerate() if t is not here]
    others = [name for name in others if name != _SUPERVISOR_THREAD]
    if others:
        return f"other threads run ({', '.join(sorted(others)[:5])}) and could call it"
    stats = pool.stats()
    if stats.busy or stats.queue_depth:
        return f"calls are in flight ({stats.busy} running, {stats.queue_depth} queued)"
    return None


def _before_fork() -> None:
    """In the parent, just before ``os.fork()``: terminate the idle default pool started here,
    so that the child inherits none of it and the parent keeps no idle workers. Never
    blocks on another thread: if one holds the lock, the pool is kept."""
    global _pool
    if not _lock.acquire(blocking=False):
        logger.info("fork: the default pool is kept: another thread is using it")
        return
    try:
        pool = _pool
        if pool is None or not _started_here or _owner != os.getpid() or pool.closed:
            return
        reason = why_kept_at_fork(pool)
        if reason is not None:
            logger.info("fork: process %d keeps its default pool: %s", os.getpid(), reason)
            return
        _pool = None
        pool.terminate()
        logger.info(
            "fork: process %d terminated its idle default pool before forking (a child starts "
            "its own; this process starts a new one on its next call)",
            os.getpid(),
        )
    finally:
        _lock.release()


def _after_fork_in_child() -> None:
    # A thread of the parent may have held the lock at the fork: it never releases it here.
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):  # POSIX; elsewhere no pool can start anyway
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


def get_default_pool() -> WorkerPool:
    """The default pool, started on first use with default settings (in each process)."""
    global _pool, _owner, _started_here
    with _lock:
        if _pool is not None and _owner != os.getpid():
            logger.info(
                "fork detected: process %d starts its own default pool (the one of process "
                "%d is left to it)",
                os.getpid(),
                _owner,
                extra={"parent_pid": _owner},
            )
            _pool = None
        if _pool is None or _pool.closed:
            _pool = WorkerPool()
            _owner, _started_here = os.getpid(), True
        return _pool


def set_default_pool(pool: WorkerPool | None) -> WorkerPool | None:
    """Replace the default pool (None: the next call starts a fresh default one).

    Returns the previous pool, which the caller now owns and should close (None if it
    belongs to a parent process)."""
    global _pool, _owner, _started_here
    with _lock:
        previous = _pool if _owner == os.getpid() else None
        _pool, _owner, _started_here = pool, os.getpid(), False
        return previous


def evaluate(
    snippet: str,
    ext_vars: Mapping[str, Any] | None = None,
    *,
    tla_vars: Mapping[str, Any] | None = None,
    ext_codes: Mapping[str, str] | None = None,
    tla_codes: Mapping[str, str] | None = None,
    filename: str = "snippet.jsonnet",
    timeout: float | None = None,
    tenant: str | None = None,
    on_trace: Callable[[str], None] | None = None,
    max_stack: int | None = None,
    max_output: int | None = None,
    library: Library | None = None,
) -> Any:
    """``WorkerPool.evaluate`` on the default pool."""
    return get_default_pool().evaluate(
        snippet,
        ext_vars,
        tla_vars=tla_vars,
        ext_codes=ext_codes,
        tla_codes=tla_codes,
        filename=filename,
        timeout=timeout,
        tenant=tenant,
        on_trace=on_trace,
        max_stack=max_stack,
        max_output=max_output,
        library=library,
    )


async def aevaluate(
    snippet: str,
    ext_vars: Mapping[str, Any] | None = None,
    *,
    tla_vars: Mapping[str, Any] | None = None,
    ext_codes: Mapping[str, str] | None = None,
    tla_codes: Mapping[str, str] | None = None,
    filename: str = "snippet.jsonnet",
    timeout: float | None = None,
    tenant: str | None = None,
    on_trace: Callable[[str], None] | None = None,
    max_stack: int | None = None,
    max_output: int | None = None,
    library: Library | None = None,
) -> Any:
    """``WorkerPool.aevaluate`` on the default pool."""
    return await get_default_pool().aevaluate(
        snippet,
        ext_vars,
        tla_vars=tla_vars,
        ext_codes=ext_codes,
        tla_codes=tla_codes,
        filename=filename,
        timeout=timeout,
        tenant=tenant,
        on_trace=on_trace,
        max_stack=max_stack,
        max_output=max_output,
        library=library,
    )


def evaluate_string(
    snippet: str,
    ext_vars: Mapping[str, Any] | None = None,
    **keywords: Unpack[EvaluateKeywords],
) -> str:
    """``WorkerPool.evaluate_string`` (``jsonnet -S``) on the default pool."""
    return get_default_pool().evaluate_string(snippet, ext_vars, **keywords)


def evaluate_multi(
    snippet: str,
    ext_vars: Mapping[str, Any] | None = None,
    *,
    string: bool = False,
    **keywords: Unpack[EvaluateKeywords],
) -> dict[str, str]:
    """``WorkerPool.evaluate_multi`` (``jsonnet -m``) on the default pool."""
    return get_default_pool().evaluate_multi(snippet, ext_vars, string=string, **keywords)


def evaluate_stream(
    snippet: str,
    ext_vars: Mapping[str, Any] | None = None,
    **keywords: Unpack[EvaluateKeywords],
) -> str:
    """``WorkerPool.evaluate_stream`` (``jsonnet -y``) on the default pool."""
    return get_default_pool().evaluate_stream(snippet, ext_vars, **keywords)


async def aevaluate_string(
    snippet: str,
    ext_vars: Mapping[str, Any] | None = None,
    **keywords: Unpack[EvaluateKeywords],
) -> str:
    """``WorkerPool.aevaluate_string`` on the default pool."""
    return await get_default_pool().aevaluate_string(snippet, ext_vars, **keywords)


async def aevaluate_multi(
    snippet: str,
    ext_vars: Mapping[str, Any] | None = None,
    *,
    string: bool = False,
    **keywords: Unpack[EvaluateKeywords],
) -> dict[str, str]:
    """``WorkerPool.aevaluate_multi`` on the default pool."""
    return await get_default_pool().aevaluate_multi(snippet, ext_vars, string=string, **keywords)


async def aevaluate_stream(
    snippet: str,
    ext_vars: Mapping[str, Any] | None = None,
    **keywords: Unpack[EvaluateKeywords],
) -> str:
    """``WorkerPool.aevaluate_stream`` on the default pool."""
    return await get_default_pool().aevaluate_stream(snippet, ext_vars, **keywords)
