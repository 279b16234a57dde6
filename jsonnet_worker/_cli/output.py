"""The ``jsonnet`` CLI's output modes (``-S``, ``-m``, ``-y``) applied to the JSON text a
worker returned, byte for byte as go-jsonnet writes them.

Goals: the worker protocol carries one manifested JSON text per call; these modes are cut
out of that text in the parent, never re-serialized, so numbers and string escapes stay the
engine's own.

Plan: the engine indents every nesting level by three spaces and never puts a raw newline
inside a string, so a field's value is the slice of its text with one level of indent
removed. A value of the wrong type is a ``JsonnetError`` worded as go-jsonnet words it.

Weak spots: the messages are go-jsonnet's (v0.22), also with ``engine="cpp"``.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any, TextIO

from .._errors import JsonnetError

_INDENT = "   "
_SPACE = re.compile(r"[ \t\n\r]*")
_decoder = json.JSONDecoder()
_JSONNET_TYPES: dict[type, str] = {
    dict: "object",
    list: "array",
    str: "string",
    bool: "boolean",
    type(None): "null",
    int: "number",
    float: "number",
}
# go's %T of a decoded JSON value, as go-jsonnet's -m -S message prints it
_GO_TYPES: dict[type, str] = {
    dict: "map[string]interface {}",
    list: "[]interface {}",
    bool: "bool",
    type(None): "<nil>",
    int: "float64",
    float: "float64",
}


def _manifestation_error(message: str) -> JsonnetError:
    return JsonnetError(f"RUNTIME ERROR: {message}\n\tDuring manifestation\t\n")


def _skip(text: str, position: int) -> int:
    match = _SPACE.match(text, position)
    return position if match is None else match.end()


def _members(text: str, is_object: bool) -> list[tuple[str, str]]:
    """Each member of the top-level object (key, value text) or array ("", element text),
    each value's text dedented to the top level."""
    position = _skip(text, _skip(text, 0) + 1)
    closing = "}" if is_object else "]"
    members: list[tuple[str, str]] = []
    while text[position] != closing:
        key = ""
        if is_object:
            key, position = _decoder.raw_decode(text, position)
            position = _skip(text, _skip(text, position) + 1)  # past the colon
        _, end = _decoder.raw_decode(text, position)
        members.append((key, text[position:end].replace("\n" + _INDENT, "\n")))
        position = _skip(text, end)
        if text[position] == ",":
            position = _skip(text, position + 1)
    return members


def _type_name(value: Any) -> str:
    return _JSONNET_TYPES.get(type(value), "unknown")


def string(text: str) -> str:
    """``-S``: the result must be a string; it is written as is, with a newline."""
    value = json.loads(text)
    if not isinstance(value, str):
        raise _manifestation_error(f"expected string result, got: {_type_name(value)}")
    return value + "\n"


def multi(text: str, directory: str, *, string: bool = False) -> dict[str, str]:
    """``-m DIR``: one file per field of the top-level object, path -> content."""
    value = json.loads(text)
    if not isinstance(value, dict):
        raise _manifestation_error(
            f"multi mode: top-level object was a {_type_name(value)}, should be an object "
            "whose keys are filenames and values hold the JSON for that file."
        )
    prefix = directory if directory.endswith("/") else directory + "/"
    files: dict[str, str] = {}
    for key, member_text in _members(text, is_object=True):
        if string:
            member = value[key]
            if not isinstance(member, str):
                raise _manifestation_error(
                    f"multi mode: top-level object's key {key} has a value of type "
                    f"{_GO_TYPES.get(type(member), 'unknown')}, should be a string"
                )
            files[prefix + key] = member + "\n"
        else:
            files[prefix + key] = member_text + "\n"
    return files


def stream(text: str) -> str:
    """``-y``: the top-level array as a YAML stream of JSON documents."""
    value = json.loads(text)
    if not isinstance(value, list):
        raise _manifestation_error(
            f"stream mode: top-level object was a {_type_name(value)}, should be an array "
            "whose elements hold the JSON for each document in the stream."
        )
    documents = [member + "\n" for _, member in _members(text, is_object=False)]
    return "".join(f"---\n{document}" for document in documents) + ("...\n" if documents else "")


def write_text(text: str, path: str | None, *, create_dirs: bool) -> None:
    """To standard output without ``path``; else into the file (OSError on failure)."""
    if path is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    if create_dirs and os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as handle:
        handle.write(text)


def write_multi(files: dict[str, str], listing: TextIO, *, create_dirs: bool) -> None:
    """As jsonnet does: for each path, sorted, print it to ``listing``, then write the file
    (not when its content is already the same, so that its time stamp stays). OSError on a
    failure, after the paths written so far were listed."""
    for path in sorted(files):
        listing.write(f"{path}\n")
        listing.flush()
        try:
            with open(path, encoding="utf-8", newline="") as existing:
                if existing.read() == files[path]:
                    continue
        except (OSError, UnicodeDecodeError):
            pass
        write_text(files[path], path, create_dirs=create_dirs)
