"""The module-level ``evaluate``/``aevaluate``: a default pool, created on first use.

The default pool belongs to the process that created it: in a forked child (gunicorn
``--preload``, Celery, ``multiprocessing`` with fork) the first call starts a fresh pool and
never touches the parent's (its workers, channels and supervisor thread stay the parent's).
See docs/DESIGN.md ("Fork") and README.md ("Prefork servers").
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from typing import Any

from ._pool.facade import WorkerPool

logger = logging.getLogger("jsonnet_worker")

_lock = threading.Lock()
_pool: WorkerPool | None = None
_owner = os.getpid()  # the process _pool was created in


def _after_fork_in_child() -> None:
    # A thread of the parent may have held the lock at the fork: it never releases it here.
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):  # POSIX; elsewhere no pool can start anyway
    os.register_at_fork(after_in_child=_after_fork_in_child)


def get_default_pool() -> WorkerPool:
    """The default pool, started on first use with default settings (in each process)."""
    global _pool, _owner
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
            _owner = os.getpid()
        return _pool


def set_default_pool(pool: WorkerPool | None) -> WorkerPool | None:
    """Replace the default pool (None: the next call starts a fresh default one).

    Returns the previous pool, which the caller now owns and should close (None if it
    belongs to a parent process)."""
    global _pool, _owner
    with _lock:
        previous = _pool if _owner == os.getpid() else None
        _pool, _owner = pool, os.getpid()
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
    )
