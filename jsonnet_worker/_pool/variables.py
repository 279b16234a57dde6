"""Python values to Jsonnet variables: strings stay strings, everything else becomes JSON code."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from .._errors import InvalidArgument, InvalidType

# Deeper values are refused before encoding, on every Python version alike (3.13's C encoder
# no longer stops at the recursion limit); no claim set or template context nests this deep.
MAX_VALUE_DEPTH = 500

_encode_json = json.JSONEncoder(
    ensure_ascii=False, allow_nan=False, separators=(",", ":"), check_circular=True
).encode


def _too_deep(value: Any) -> bool:
    """True when ``value`` nests lists/dicts deeper than ``MAX_VALUE_DEPTH`` (iterative: a
    deep value must not exhaust the stack here either)."""
    pending: list[tuple[Any, int]] = [(value, 1)]
    while pending:
        current, depth = pending.pop()
        children = current.values() if isinstance(current, dict) else current
        if depth > MAX_VALUE_DEPTH:
            return True
        pending.extend(
            (child, depth + 1) for child in children if isinstance(child, dict | list | tuple)
        )
    return False


def split_variables(
    kind: str, values: Mapping[str, Any] | None, codes: Mapping[str, str] | None
) -> tuple[dict[str, str], dict[str, str]]:
    """Split ``values`` into string variables and JSON code, merged with explicit ``codes``.

    ``kind`` ("ext" or "tla") names the variables in errors. Raises InvalidType (a
    TypeError) for a value JSON cannot carry and InvalidArgument (a ValueError) for a name
    given twice, a NaN/infinite float or a value nested deeper than ``MAX_VALUE_DEPTH``.
    """
    strings: dict[str, str] = {}
    code: dict[str, str] = {}
    if values is None and codes is None:  # most calls give one kind of variable, or none
        return strings, code
    for name, source in (codes or {}).items():
        if not isinstance(name, str) or not isinstance(source, str):
            raise InvalidType(f"{kind}_codes must map str to str (Jsonnet code), got {name!r}")
        code[name] = source
    for name, value in (values or {}).items():
        if not isinstance(name, str):
            raise InvalidType(f"{kind} variable names must be str, got {name!r}")
        if name in code:
            raise InvalidArgument(f"{kind} variable {name!r} is given both as a value and as code")
        if isinstance(value, str):
            strings[name] = value
            continue
        code[name] = _encode(kind, name, value)
    return strings, code


def _encode(kind: str, name: str, value: Any) -> str:
    too_deep = InvalidArgument(
        f"{kind} variable {name!r} is nested too deeply (more than {MAX_VALUE_DEPTH} levels)"
    )
    if isinstance(value, dict | list | tuple) and _too_deep(value):
        raise too_deep
    try:
        return _encode_json(value)
    except RecursionError:
        raise too_deep from None
    except TypeError as exc:
        raise InvalidType(
            f"{kind} variable {name!r}: a {type(value).__name__} cannot be passed to "
            f"Jsonnet ({exc})"
        ) from None
    except ValueError as exc:
        raise InvalidArgument(
            f"{kind} variable {name!r}: NaN and infinite floats cannot be passed to Jsonnet ({exc})"
        ) from None
