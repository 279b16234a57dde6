"""Python values to Jsonnet variables: strings stay strings, everything else becomes JSON code."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

_encode_json = json.JSONEncoder(
    ensure_ascii=False, allow_nan=False, separators=(",", ":"), check_circular=True
).encode


def split_variables(
    kind: str, values: Mapping[str, Any] | None, codes: Mapping[str, str] | None
) -> tuple[dict[str, str], dict[str, str]]:
    """Split ``values`` into string variables and JSON code, merged with explicit ``codes``.

    ``kind`` ("ext" or "tla") names the variables in errors. Raises TypeError for a value
    JSON cannot carry and ValueError for a name given twice or a NaN/infinite float.
    """
    strings: dict[str, str] = {}
    code: dict[str, str] = {}
    for name, source in (codes or {}).items():
        if not isinstance(name, str) or not isinstance(source, str):
            raise TypeError(f"{kind}_codes must map str to str (Jsonnet code), got {name!r}")
        code[name] = source
    for name, value in (values or {}).items():
        if not isinstance(name, str):
            raise TypeError(f"{kind} variable names must be str, got {name!r}")
        if name in code:
            raise ValueError(f"{kind} variable {name!r} is given both as a value and as code")
        if isinstance(value, str):
            strings[name] = value
            continue
        try:
            code[name] = _encode_json(value)
        except RecursionError:
            raise ValueError(f"{kind} variable {name!r} is nested too deeply") from None
        except TypeError as exc:
            raise TypeError(
                f"{kind} variable {name!r}: a {type(value).__name__} cannot be passed to "
                f"Jsonnet ({exc})"
            ) from None
        except ValueError as exc:
            raise ValueError(
                f"{kind} variable {name!r}: NaN and infinite floats cannot be passed to "
                f"Jsonnet ({exc})"
            ) from None
    return strings, code
