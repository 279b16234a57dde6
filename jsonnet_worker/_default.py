"""The module-level ``evaluate``/``aevaluate``: a default pool, created on first use."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from ._pool import WorkerPool

_lock = threading.Lock()
_pool: WorkerPool | None = None


def get_default_pool() -> WorkerPool:
    """The default pool, started on first use with default settings."""
    global _pool
    with _lock:
        if _pool is None or _pool._core.closed:
            _pool = WorkerPool()
        return _pool


def set_default_pool(pool: WorkerPool | None) -> WorkerPool | None:
    """Replace the default pool (None: the next call starts a fresh default one).

    Returns the previous pool, which the caller now owns and should close."""
    global _pool
    with _lock:
        previous, _pool = _pool, pool
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
    )
