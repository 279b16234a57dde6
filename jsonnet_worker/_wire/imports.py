"""Where an import goes: go-jsonnet's resolution rule, applied to a set of files in memory.

Goals: one rule, shared by the worker (which serves a call's library set from memory and
refuses everything else) and by the host (which reads a main file's imports from disk,
``_imports``): a name resolves to the same file on both sides, under the same name as
go-jsonnet's own importer gives it (its ``found_here``, which becomes ``std.thisFile`` and the
file name in every error), so results and messages match go-jsonnet's byte for byte.

Plan: go-jsonnet's ``FileImporter`` tries ``path.Join(dir of the importing file, name)``, then
each library search path from the last to the first (``-J`` right-most wins). ``go_clean`` and
``go_join`` are Go's ``path.Clean`` and ``path.Join``. ``resolve`` walks those candidates
through a set's files and says ``Found`` (the name to report and serve), ``Missing`` (go's
own "couldn't open import" message) or ``Refused``: an empty, absolute or over-long name, one
with a NUL byte, or one whose every candidate lies outside every boundary of the set (``..``
climbing out of the library). A refusal reads as before libraries existed ("import not
available <name>"), and nothing on either side ever opens such a name.

Weak spots: go-jsonnet also takes absolute names, which a set never serves (a documented
difference); the NUL rule is a backstop: every engine's C glue ends a name at its first NUL
byte before the callback is called, so the part before it is what gets resolved;
``go_quote`` is Go's ``%#v`` of a string for what names hold in practice (printable text),
not every corner of ``strconv.Quote``.

Its values are ``_wire.values.valueclass``es, not dataclasses: every worker imports this
module, and ``dataclasses`` (with ``inspect``) would cost each worker's start ~18 ms.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from .values import valueclass

IMPORT_REFUSED = "import not available"
NO_MATCH = "no match locally or in the Jsonnet library paths"
MAX_IMPORT_NAME = 4096  # bytes of one import name; longer ones are refused unread


def go_clean(path: str) -> str:
    """Go's ``path.Clean``: the shortest equivalent path, lexically ("" becomes ".")."""
    if not path:
        return "."
    rooted = path.startswith("/")
    parts: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if parts and parts[-1] != "..":
                parts.pop()
            elif not rooted:
                parts.append("..")
            continue
        parts.append(part)
    cleaned = "/".join(parts)
    if rooted:
        return "/" + cleaned
    return cleaned or "."


def go_join(*elements: str) -> str:
    """Go's ``path.Join``: the non-empty elements joined by "/" and cleaned ("" if none)."""
    kept = [element for element in elements if element]
    return go_clean("/".join(kept)) if kept else ""


def directory_of(path: str) -> str:
    """Go's ``path.Split`` directory: up to and including the last "/" ("" if none), as
    go-jsonnet passes an importing file's directory to its importer."""
    return path[: path.rfind("/") + 1]


def go_quote(text: str) -> str:
    """Go's ``%#v`` of a string (``strconv.Quote``), as in go-jsonnet's import messages."""
    escapes = {'"': '\\"', "\\": "\\\\", "\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n"}
    escapes.update({"\r": "\\r", "\t": "\\t", "\v": "\\v"})
    out = []
    for char in text:
        if char in escapes:
            out.append(escapes[char])
        elif char.isprintable() or char == " ":
            out.append(char)
        elif ord(char) < 0x80:
            out.append(f"\\x{ord(char):02x}")
        elif ord(char) <= 0xFFFF:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(f"\\U{ord(char):08x}")
    return '"' + "".join(out) + '"'


def missing_message(name: str) -> str:
    """go-jsonnet's ``FileImporter`` message for a name found nowhere."""
    return f"couldn't open import {go_quote(name)}: {NO_MATCH}"


def refused_message(name: str) -> str:
    return f"{IMPORT_REFUSED} {name}"


@valueclass(slots=True)
class Found:
    """The name resolves to a file of the set: its name there (what is served and reported)."""

    path: str  # the set's name of the file: go-jsonnet's found_here


@valueclass(slots=True)
class Missing:
    """No file of the set has the name: go-jsonnet's message for it."""

    message: str


@valueclass(slots=True)
class Refused:
    """The name is never served (empty, absolute, over-long, with a NUL, or outside every
    boundary): the refusal's message."""

    message: str


Resolution = Found | Missing | Refused


def within(path: str, boundary: str) -> bool:
    """Whether the cleaned ``path`` lies inside ``boundary`` ("" or ".": the relative names
    that do not climb out with ``..``)."""
    boundary = go_clean(boundary) if boundary else "."
    if boundary == ".":
        return not path.startswith("/") and path != ".." and not path.startswith("../")
    if boundary == "/":
        return path.startswith("/")
    return path == boundary or path.startswith(boundary + "/")


def candidates(directory: str, name: str, search: Iterable[str]) -> list[str]:
    """go-jsonnet's order: beside the importing file, then the search paths, last first."""
    return [go_join(directory, name), *(go_join(root, name) for root in reversed(list(search)))]


def refusal(name: str) -> str | None:
    """Why ``name`` is refused whatever the set holds, or None."""
    if not name:
        return "an empty import name"
    if "\0" in name:
        return "a NUL byte in the import name"
    if name.startswith("/"):
        return "an absolute import name"
    if len(name.encode("utf-8", "surrogatepass")) > MAX_IMPORT_NAME:
        return f"an import name over {MAX_IMPORT_NAME} bytes"
    return None


def resolve(
    files: Mapping[str, object],
    search: tuple[str, ...],
    boundaries: tuple[str, ...],
    directory: str,
    name: str,
) -> Resolution:
    """Where ``import name`` from a file in ``directory`` goes within a set of ``files``
    (keyed by cleaned names), its ``search`` paths and its ``boundaries``."""
    if refusal(name) is not None:
        return Refused(refused_message(name))
    tried = candidates(directory, name, search)
    for path in tried:
        if path in files:
            return Found(path)
    if not any(within(path, boundary) for path in tried for boundary in boundaries):
        return Refused(refused_message(name))
    return Missing(missing_message(name))
