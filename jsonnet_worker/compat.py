"""A drop-in for ``_jsonnet.evaluate_snippet``: change one import, keep the call sites.

    from jsonnet_worker.compat import evaluate_snippet   # was: from _jsonnet import ...

JSON text out; ``RuntimeError`` with the engine's message on any failure, as the binding
does. The evaluation runs in the default pool's sandboxed workers. ``import_callback`` and
``native_callbacks`` cannot cross into the sandbox and raise TypeError; ``jpathdir`` is
refused because no import is allowed.
"""

from __future__ import annotations

from typing import Any

from ._default import get_default_pool
from ._errors import Error, JsonnetError

_UNSUPPORTED = ("import_callback", "native_callbacks", "jpathdir")
_IGNORED = ("gc_min_objects", "gc_growth_trigger", "max_trace")


def evaluate_snippet(
    filename: str,
    src: str,
    *,
    ext_vars: dict[str, str] | None = None,
    ext_codes: dict[str, str] | None = None,
    tla_vars: dict[str, str] | None = None,
    tla_codes: dict[str, str] | None = None,
    max_stack: int | None = None,
    **kwargs: Any,
) -> str:
    for name in kwargs:
        if name in _UNSUPPORTED:
            raise TypeError(f"evaluate_snippet: {name} is not supported inside the sandbox")
        if name not in _IGNORED:
            raise TypeError(f"evaluate_snippet() got an unexpected keyword argument {name!r}")
    for name, mapping in (("ext_vars", ext_vars), ("tla_vars", tla_vars)):
        if mapping and not all(isinstance(v, str) for v in mapping.values()):
            raise TypeError(f"{name} values must be str, as in _jsonnet")
    pool = get_default_pool()
    if max_stack is not None and max_stack != pool.max_stack:
        raise TypeError(
            f"max_stack={max_stack} differs from the default pool's {pool.max_stack}; "
            "set it on a WorkerPool and install it with set_default_pool()"
        )
    try:
        return pool.evaluate_json(
            src,
            ext_vars,
            tla_vars=tla_vars,
            ext_codes=ext_codes,
            tla_codes=tla_codes,
            filename=filename,
        )
    except JsonnetError as exc:
        raise RuntimeError(exc.message) from None
    except Error as exc:
        raise RuntimeError(str(exc)) from exc
