"""A drop-in for ``_jsonnet.evaluate_snippet`` and ``evaluate_file``: change one import,
keep the call sites.

    from jsonnet_worker.compat import evaluate_snippet   # was: from _jsonnet import ...

JSON text out; ``RuntimeError`` with the engine's message on any failure, as the binding
does. The evaluation runs in the default pool's sandboxed workers; a call that asks for its
own ``max_stack`` or ``max_trace`` runs in a pool with those settings (one per distinct
pair, started on first use and kept, as the default pool is, and like it terminated just
before a fork when nothing can be using it, and started afresh in a forked child: see
``_default``). ``import_callback`` and
``native_callbacks`` cannot cross into the sandbox and raise TypeError. ``jpathdir`` (a
directory or a list, the last searched first) is honoured as the host's side of imports
does it for the CLI (``_imports.collect``): this process reads the files the source imports
from those directories (and, for ``evaluate_file``, from the file's own), bounded, and the
worker serves them from memory. Without ``jpathdir`` every import is refused, as before; an
``evaluate_snippet`` source, often untrusted, never reaches its own directory (the process's
current one for a bare filename) unless a ``jpathdir`` holds it. Every remaining difference
from ``_jsonnet`` is listed in README.md ("Migrating from the C++ binding").
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from ._config import PoolConfig
from ._default import get_default_pool, why_kept_at_fork
from ._errors import Error, JsonnetError
from ._library import Library
from ._pool.facade import WorkerPool
from ._wire.imports import directory_of

_UNSUPPORTED = ("import_callback", "native_callbacks")
_WHY_UNSUPPORTED = {
    "import_callback": "pass jpathdir (the files are read here and served to the sandbox from "
    "memory), or a jsonnet_worker.Library to WorkerPool.evaluate(library=...)",
    "native_callbacks": "no Python code runs in the sandbox",
}
_IGNORED = ("gc_min_objects", "gc_growth_trigger")  # the engines' own GC tuning

logger = logging.getLogger("jsonnet_worker")

_lock = threading.Lock()
_pools: dict[tuple[int, int], WorkerPool] = {}


def _before_fork() -> None:
    """In the parent, just before ``os.fork()``: the pools started here are the library's, as
    the default pool is, and are terminated as it is when nothing can be using them."""
    if not _lock.acquire(blocking=False):
        return  # another thread is starting one: it is in use
    try:
        for key, pool in list(_pools.items()):
            reason = why_kept_at_fork(pool)
            if reason is not None:
                logger.info(
                    "fork: compat's pool for max_stack, max_trace=%s is kept: %s", key, reason
                )
                continue
            del _pools[key]
            pool.terminate()
    finally:
        _lock.release()


def _after_fork_in_child() -> None:
    # The parent's pools are not the child's to use (ForkedPool) or close; its lock may have
    # been held by a thread that does not exist here.
    global _lock
    _lock = threading.Lock()
    _pools.clear()


if hasattr(os, "register_at_fork"):  # POSIX; elsewhere no pool can start anyway
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


def _pool_for(max_stack: int | None, max_trace: int | None) -> WorkerPool:
    """The default pool, or the one with the ``max_stack``/``max_trace`` asked for."""
    if max_stack is None and max_trace is None:
        return get_default_pool()
    defaults = PoolConfig()
    key = (
        defaults.max_stack if max_stack is None else max_stack,
        defaults.max_trace if max_trace is None else max_trace,
    )
    with _lock:
        pool = _pools.get(key)
        if pool is None:
            try:
                config = defaults.replace(max_stack=key[0], max_trace=key[1])
            except Error as exc:
                raise ValueError(str(exc)) from None
            pool = _pools[key] = WorkerPool(config=config)
        return pool


def _check_arguments(
    function: str, ext_vars: dict[str, str] | None, tla_vars: dict[str, str] | None, **kwargs: Any
) -> None:
    for name in kwargs:
        if name in _UNSUPPORTED:
            raise TypeError(
                f"{function}: {name} is not supported inside the sandbox: {_WHY_UNSUPPORTED[name]}"
            )
        if name not in _IGNORED:
            raise TypeError(f"{function}() got an unexpected keyword argument {name!r}")
    for name, mapping in (("ext_vars", ext_vars), ("tla_vars", tla_vars)):
        if mapping and not all(isinstance(v, str) for v in mapping.values()):
            raise TypeError(f"{name} values must be str, as in _jsonnet")


def _search(function: str, jpathdir: str | list[str] | None) -> tuple[str, ...] | None:
    """``jpathdir`` as ``_jsonnet`` takes it (a str or a list of str), as a search list."""
    if jpathdir is None:
        return None
    directories = [jpathdir] if isinstance(jpathdir, str) else jpathdir
    if not isinstance(directories, list) or not all(isinstance(d, str) for d in directories):
        raise TypeError(f"{function}: jpathdir must be a str or a list of str, as in _jsonnet")
    return tuple(directories)


def _library(
    filename: str, src: str, search: tuple[str, ...] | None, boundaries: tuple[str, ...]
) -> Library | None:
    """The files ``src`` imports from ``boundaries`` (None: imports stay refused); a bound
    exceeded is the binding's RuntimeError with the library's message."""
    if search is None or not boundaries:
        return None
    from ._imports import collect

    try:
        return collect(filename, src, search, boundaries=boundaries)
    except Error as exc:
        raise RuntimeError(str(exc)) from None


def evaluate_snippet(
    filename: str,
    src: str,
    *,
    ext_vars: dict[str, str] | None = None,
    ext_codes: dict[str, str] | None = None,
    tla_vars: dict[str, str] | None = None,
    tla_codes: dict[str, str] | None = None,
    max_stack: int | None = None,
    max_trace: int | None = None,
    jpathdir: str | list[str] | None = None,
    **kwargs: Any,
) -> str:
    """``_jsonnet.evaluate_snippet``, in the sandbox; its imports served from ``jpathdir``
    only (the snippet's own directory too where a ``jpathdir`` holds it)."""
    _check_arguments("evaluate_snippet", ext_vars, tla_vars, **kwargs)
    search = _search("evaluate_snippet", jpathdir)
    library = _library(filename, src, search, search or ())
    return _evaluate(
        filename, src, ext_vars, ext_codes, tla_vars, tla_codes, max_stack, max_trace, library
    )


def _evaluate(
    filename: str,
    src: str,
    ext_vars: dict[str, str] | None,
    ext_codes: dict[str, str] | None,
    tla_vars: dict[str, str] | None,
    tla_codes: dict[str, str] | None,
    max_stack: int | None,
    max_trace: int | None,
    library: Library | None,
) -> str:
    pool = _pool_for(max_stack, max_trace)
    try:
        return pool.evaluate_json(
            src,
            ext_vars,
            tla_vars=tla_vars,
            ext_codes=ext_codes,
            tla_codes=tla_codes,
            filename=filename,
            library=library,
        )
    except JsonnetError as exc:
        raise RuntimeError(exc.message) from None
    except Error as exc:
        raise RuntimeError(str(exc)) from exc


def evaluate_file(
    filename: str,
    *,
    ext_vars: dict[str, str] | None = None,
    ext_codes: dict[str, str] | None = None,
    tla_vars: dict[str, str] | None = None,
    tla_codes: dict[str, str] | None = None,
    max_stack: int | None = None,
    max_trace: int | None = None,
    jpathdir: str | list[str] | None = None,
    **kwargs: Any,
) -> str:
    """``_jsonnet.evaluate_file``: the file is read here, in the parent (the worker can open
    nothing), and evaluated under its name; RuntimeError as the binding words it when it
    cannot be read. With ``jpathdir``, its imports are served from its own directory, then
    from ``jpathdir`` (the last first), as the binding finds them."""
    _check_arguments("evaluate_file", ext_vars, tla_vars, **kwargs)
    search = _search("evaluate_file", jpathdir)
    try:
        with open(filename, encoding="utf-8") as handle:
            source = handle.read()
    except IsADirectoryError as exc:
        raise RuntimeError(f"Reading input file: {filename}: {exc.strerror}") from None
    except OSError as exc:
        raise RuntimeError(f"Opening input file: {filename}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise RuntimeError(f"Reading input file: {filename}: not UTF-8") from None
    boundaries = (*(search or ()), directory_of(filename))  # the caller named this file
    library = _library(filename, source, search, boundaries)
    return _evaluate(
        filename, source, ext_vars, ext_codes, tla_vars, tla_codes, max_stack, max_trace, library
    )
