"""The ``jsonnet`` command's output modes (``-S``, ``-m``, ``-y``) applied to the JSON text a
worker returned, byte for byte as go-jsonnet writes them: for the library
(``WorkerPool.evaluate_string``/``evaluate_multi``/``evaluate_stream``) and the CLI.

Goals: the worker protocol carries one manifested JSON text per call; these modes are cut
out of that text in the parent, never re-serialized, so numbers and string escapes stay the
engine's own. Pure functions: text in, text out, no disk.

Plan: the engine indents every nesting level by three spaces and never puts a raw newline
inside a string, so a field's value is the slice of its text with one level of indent
removed. A value of the wrong type is a ``JsonnetError`` worded as go-jsonnet words it.
``multi`` gives names, not paths: the library refuses a name that would leave the output
directory (``check_multi_name``); the CLI (``_cli.output``) joins each to its directory.

Weak spots: the messages are go-jsonnet's (v0.22), also with ``engine="cpp"``. The names
are checked as POSIX paths (``/`` separators), the only kind this package runs on.
"""

from __future__ import annotations

import json
import posixpath
import re
from typing import Any

from ._errors import InvalidArgument, JsonnetError

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


def multi(text: str, *, string: bool = False) -> dict[str, str]:
    """``-m``: one file per field of the top-level object, name -> content (``string``: as
    ``-m -S``, each field's string as is). The names are the keys, as go-jsonnet writes
    them under its directory; nothing touches a disk. A key that would be written outside
    that directory (``check_multi_name``) raises ``InvalidArgument``."""
    files = multi_unchecked(text, string=string)
    for name in files:
        check_multi_name(name)
    return files


def check_multi_name(name: str) -> None:
    """Refuse a ``-m`` file name that does not name a file inside the output directory:
    empty, absolute, with a NUL byte (no file system takes one), naming a directory
    (``.``, ``a/``), or one whose ``..``
    parts leave the directory once the path is normalized (``a/../../b``). ``a/b`` and
    ``a/../b`` stay inside and pass; the directories a name implies are the caller's to
    make."""
    normal = posixpath.normpath(name) if name else ""
    if not name or "\0" in name or posixpath.isabs(name):
        reason = "is empty" if not name else "has a NUL byte" if "\0" in name else "is absolute"
    elif normal == ".." or normal.startswith("../"):
        reason = "leaves the output directory"
    elif normal == "." or name.endswith("/"):
        reason = "names a directory, not a file"
    else:
        return
    raise InvalidArgument(f"multi mode: the file name {name!r} {reason}")


def multi_unchecked(text: str, *, string: bool = False) -> dict[str, str]:
    """``multi`` without the check of the names (the CLI writes each under its directory
    as go-jsonnet does, names as they are)."""
    value = json.loads(text)
    if not isinstance(value, dict):
        raise _manifestation_error(
            f"multi mode: top-level object was a {_type_name(value)}, should be an object "
            "whose keys are filenames and values hold the JSON for that file."
        )
    files: dict[str, str] = {}
    for key, member_text in _members(text, is_object=True):
        if string:
            member = value[key]
            if not isinstance(member, str):
                raise _manifestation_error(
                    f"multi mode: top-level object's key {key} has a value of type "
                    f"{_GO_TYPES.get(type(member), 'unknown')}, should be a string"
                )
            files[key] = member + "\n"
        else:
            files[key] = member_text + "\n"
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
