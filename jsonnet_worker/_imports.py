"""The host's side of imports from disk: the files a main file imports, read as go-jsonnet's
``jsonnet`` command would find them, for the CLI (``-J``/``JSONNET_PATH``), the test runner
and ``compat`` (``jpathdir``).

Goals: ``jsonnet-worker eval -J lib main.jsonnet`` behaves as ``jsonnet -J lib main.jsonnet``
does, while the sandboxed worker never reads a file: this process reads the files the
evaluation can import, bounded in count and size, and sends them with the call as a
``Library`` whose names are go-jsonnet's own (its found-at path: ``go_join(dir, name)`` with
the ``-J`` strings as given, relative or absolute), so that results, ``std.thisFile`` and
every message match go-jsonnet's byte for byte.

Plan: ``jsonnet_path`` builds the search list as go-jsonnet's command does (``JSONNET_PATH``
reversed, then the ``-J`` dirs; the importer tries the last first). ``collect`` finds the
imports of a source with ``import_names``, a small exact Jsonnet lexer (go-jsonnet's
``internal/parser/lexer.go``, in regular expressions where it can): it skips whitespace,
comments (``#``, ``//``, ``/* */``), strings and text blocks (``|||``), reads identifiers
whole, and after the keywords ``import``, ``importstr`` and ``importbin`` takes the string
literal that follows ("...", '...', @"...", @'...', unescaped as go-jsonnet's
``StringUnescape``; a text block or anything else there is go's "computed import" error, and
yields nothing). Each name walks
``_wire.imports.candidates`` on disk: the first candidate that exists is read (a regular
file) and the walk stops, as go-jsonnet's ``FileImporter`` stops at the first that exists;
``import`` files are scanned in turn, ``importstr``/``importbin`` files only read. A name
``refusal`` refuses and a candidate outside every boundary are never opened. Each path is
looked at once (go's ``fsCache``), so a cycle is read once.

Weak spots: the lexer finds import expressions, not the ones evaluation reaches: a file read
but never imported at run time is sent for nothing (over-inclusion is harmless; missing one
go-jsonnet would find is the bug to avoid). Where the first candidate that exists is not a
readable regular file (a directory, no permission), go-jsonnet fails with its read error;
here nothing is read for it, and the worker says "couldn't open import". Candidates outside
the boundaries (the main file's directory and the search paths), which go-jsonnet reads,
are skipped: the documented difference (README). The scan counts every lookup, not the
time: a 16 MiB file of distinct import names makes about one ``open`` per name and search
path. The lexer skips plain code with one regular expression and loops once per comment,
string or keyword: about 10 MB/s here (8 ms for a 1,000-line library).
"""

from __future__ import annotations

import codecs
import enum
import os
import re
import stat
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from ._errors import InputTooLarge, InvalidArgument
from ._library import MAX_LIBRARY_BYTES, MAX_LIBRARY_FILES, Library
from ._wire.imports import candidates, directory_of, refusal, within

JSONNET_PATH = "JSONNET_PATH"


def jsonnet_path(jpath: Sequence[str], environ: Mapping[str, str]) -> tuple[str, ...]:
    """The search paths as go-jsonnet's ``jsonnet`` command builds them: ``JSONNET_PATH``'s
    colon-separated entries reversed (its left-most wins), then the ``-J`` dirs in order (the
    right-most wins), in the order ``Library.search`` takes them (the last is tried first).
    Entries are kept as given, trailing slashes and empty ``JSONNET_PATH`` entries included
    (Go's ``filepath.SplitList``; an empty entry is the current directory); an empty ``-J``
    is ``InvalidArgument`` with go-jsonnet's message."""
    if any(not directory for directory in jpath):
        raise InvalidArgument("-J argument was empty string")
    from_environment = environ.get(JSONNET_PATH, "")
    listed = from_environment.split(os.pathsep) if from_environment else []
    return (*reversed(listed), *jpath)


# -- the lexer -----------------------------------------------------------------------------


class ImportKind(enum.Enum):
    """The keyword: ``import`` files are Jsonnet and are scanned in turn; the others are not."""

    CODE = "import"
    STRING = "importstr"
    BINARY = "importbin"


_KEYWORDS = {kind.value: kind for kind in ImportKind}
_WHITESPACE = re.compile(r"[ \t\r\n]*")
# What cannot start a comment, a string, a text block or an import: whitespace, digits,
# punctuation, operators but "/" and "|", and whole identifiers other than the keywords
# (an identifier is read whole, so "ximport" and "import_x" are plain). One regular
# expression skips it all, so the loop runs once per comment, string or keyword.
_PLAIN = re.compile(
    r"(?:[^#/\"'@|A-Za-z_]++"
    r"|(?!(?:import|importstr|importbin)(?![A-Za-z0-9_]))[A-Za-z_][A-Za-z0-9_]*+)*+"
)
_KEYWORD = re.compile(r"(?:import|importstr|importbin)(?![A-Za-z0-9_])")
# go's lexer: a backslash takes the next character whatever it is; a verbatim string's
# quote is escaped by doubling it. Possessive: never giving a character back is go's
# reading ('@"a""' is unterminated, not '@"a"' and a quote), and linear on any input.
_LITERALS = {
    '"': re.compile(r'"[^"\\]*+(?:\\.[^"\\]*+)*+"', re.DOTALL),
    "'": re.compile(r"'[^'\\]*+(?:\\.[^'\\]*+)*+'", re.DOTALL),
    '@"': re.compile(r'@"[^"]*+(?:""[^"]*+)*+"'),
    "@'": re.compile(r"@'[^']*+(?:''[^']*+)*+'"),
}
_SIMPLE_ESCAPES = {'"': '"', "'": "'", "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n"}
_SIMPLE_ESCAPES.update({"r": "\r", "t": "\t"})


@dataclass(frozen=True)
class ImportName:
    kind: ImportKind
    name: str


class _Unlexable(Exception):
    """The rest of the source is not Jsonnet go-jsonnet can lex (an unterminated string,
    comment or text block): go-jsonnet would import nothing from it."""


def import_names(source: str) -> Iterator[ImportName]:
    """The string literals that follow ``import``, ``importstr`` and ``importbin`` in
    ``source``, in order, as go-jsonnet's lexer and parser read them. Stops quietly where the
    source stops being lexable: nothing after that point can be imported."""
    position = 0
    end = len(source)
    try:
        while True:
            position = _PLAIN.match(source, position).end()  # type: ignore[union-attr]
            if position >= end:
                return
            skipped = _skip_comment(source, position)
            if skipped is not None:
                position = skipped
                continue
            literal = _string_literal(source, position)
            if literal is not None:
                position = literal[1]
            elif source.startswith("|||", position):
                position = _skip_text_block(source, position)
            elif keyword := _KEYWORD.match(source, position):
                # the literal may follow after whitespace and comments, as go's fodder
                position = _skip_blanks(source, keyword.end())
                literal = _string_literal(source, position) if position < end else None
                if literal is not None:
                    text, position = literal
                    if text is not None:
                        yield ImportName(_KEYWORDS[keyword.group()], text)
            else:  # "/" or "|" that starts no comment or text block: an operator
                position += 1
    except _Unlexable:
        return


def _skip_blanks(source: str, position: int) -> int:
    """Past the whitespace and comments at ``position``."""
    while True:
        position = _WHITESPACE.match(source, position).end()  # type: ignore[union-attr]
        if position >= len(source):
            return position
        skipped = _skip_comment(source, position)
        if skipped is None:
            return position
        position = skipped


def _skip_comment(source: str, position: int) -> int | None:
    """Where the comment at ``position`` ends (None: no comment starts there)."""
    if source[position] == "#" or source.startswith("//", position):
        newline = source.find("\n", position)
        return len(source) if newline < 0 else newline + 1
    if source.startswith("/*", position):
        # as go-jsonnet: the search starts after "/*", so "/*/" does not close it
        close = source.find("*/", position + 2)
        if close < 0:
            raise _Unlexable
        return close + 2
    return None


def _string_literal(source: str, position: int) -> tuple[str | None, int] | None:
    """The string literal at ``position`` (its value, None if go-jsonnet cannot unescape
    it) and where it ends; None if none starts there."""
    char = source[position]
    if char not in "\"'@":
        return None
    if char == "@" and source[position + 1 : position + 2] not in ("'", '"'):
        raise _Unlexable  # go: "Couldn't lex verbatim string, junk after '@'"
    literal = _LITERALS[source[position : position + 2] if char == "@" else char].match(
        source, position
    )
    if literal is None:
        raise _Unlexable  # "Unterminated String"
    if char == "@":
        quote = source[position + 1]
        return literal.group()[2:-1].replace(quote * 2, quote), literal.end()
    return _unescape(literal.group()[1:-1]), literal.end()


def _unescape(body: str) -> str | None:
    """go-jsonnet's ``StringUnescape``; None where it fails (the file does not parse)."""
    if "\\" not in body:
        return body
    out: list[str] = []
    index = 0
    while index < len(body):
        char = body[index]
        index += 1
        if char != "\\":
            out.append(char)
            continue
        if index >= len(body):
            return None
        escape = body[index]
        index += 1
        if escape in _SIMPLE_ESCAPES:
            out.append(_SIMPLE_ESCAPES[escape])
            continue
        if escape != "u":
            return None
        code = _hex4(body, index)
        if code is None:
            return None
        index += 4
        if 0xD800 <= code < 0xE000:  # a surrogate: go wants the pair's other half next
            low = _hex4(body, index + 2) if body.startswith("\\u", index) else None
            if low is None:
                return None
            index += 6
            # Go's utf16.DecodeRune: U+FFFD unless a high then a low surrogate
            valid = 0xD800 <= code < 0xDC00 and 0xDC00 <= low < 0xE000
            code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00) if valid else 0xFFFD
        out.append(chr(code))
    return "".join(out)


def _hex4(body: str, index: int) -> int | None:
    digits = body[index : index + 4]
    if len(digits) != 4 or not all(digit in "0123456789abcdefABCDEF" for digit in digits):
        return None
    return int(digits, 16)


def _skip_text_block(source: str, position: int) -> int:
    """Where the text block (``|||``) at ``position`` ends: go-jsonnet's rule, the first line's
    leading whitespace is the block's indent, and the block ends at the first line that does
    not start with it (blank lines aside), which must then be whitespace and ``|||``."""
    index = position + 3
    if source.startswith("-", index):  # |||- : chomp the last newline
        index += 1
    while index < len(source) and source[index] in " \t\r":
        index += 1
    if not source.startswith("\n", index):
        raise _Unlexable  # "Text block requires new line after |||."
    index += 1
    while source.startswith("\n", index):
        index += 1
    indent = _leading_blanks(source, index)
    if not indent:
        raise _Unlexable  # "Text block's first line must start with whitespace"
    while True:
        newline = source.find("\n", index + len(indent))
        if newline < 0:
            raise _Unlexable  # "Unexpected EOF"
        index = newline + 1
        while source.startswith("\n", index):
            index += 1
        if not source.startswith(indent, index):
            index += len(_leading_blanks(source, index))
            if not source.startswith("|||", index):
                raise _Unlexable  # "Text block not terminated with |||"
            return index + 3


def _leading_blanks(source: str, index: int) -> str:
    start = index
    while index < len(source) and source[index] in " \t":
        index += 1
    return source[start:index]


# -- reading the files ---------------------------------------------------------------------


def _go_replace(error: UnicodeError) -> tuple[str, int]:
    """Go's reading of bad UTF-8 (``utf8.DecodeRune``): one U+FFFD per byte it cannot decode."""
    if not isinstance(error, UnicodeDecodeError):
        raise error
    return "\ufffd" * (error.end - error.start), error.end


_GO_REPLACE = "jsonnet_worker.go_replace"
codecs.register_error(_GO_REPLACE, _go_replace)


class _Lookup(enum.Enum):
    ABSENT = "absent"  # nothing there: go-jsonnet tries the next candidate
    UNREADABLE = "unreadable"  # there, but not a regular file we could read: go fails


@dataclass
class _Collection:
    """The files read so far, and the bounds they are held to."""

    root: str  # the directory relative names are read from ("": the current one)
    max_files: int
    max_bytes: int
    files: dict[str, bytes]
    looked_up: dict[str, bytes | _Lookup]
    size: int = 0

    def lookup(self, path: str) -> bytes | _Lookup:
        """The content at ``path`` (a regular file), each path looked at once."""
        known = self.looked_up.get(path)
        if known is None:
            known = self.looked_up[path] = self._read(path)
        return known

    def _read(self, path: str) -> bytes | _Lookup:
        disk_path = os.path.join(self.root, path) if self.root else path
        flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK  # a FIFO never blocks
        try:
            descriptor = os.open(disk_path, flags)
        except FileNotFoundError:
            return _Lookup.ABSENT
        except (OSError, ValueError):  # ValueError: a name no file system path can hold
            return _Lookup.UNREADABLE
        try:
            if not stat.S_ISREG(os.fstat(descriptor).st_mode):
                return _Lookup.UNREADABLE
            if len(self.files) >= self.max_files:
                raise InputTooLarge(
                    f"the imports are over the limit of {self.max_files} files (at {path!r})"
                )
            budget = self.max_bytes - self.size - len(path)
            with os.fdopen(descriptor, "rb", closefd=False) as handle:
                data = handle.read(max(budget + 1, 0))  # one byte over says "too large"
        except OSError:
            return _Lookup.UNREADABLE
        finally:
            os.close(descriptor)
        self.size += len(data) + len(path)  # as ``Library`` counts a set's size
        if self.size > self.max_bytes:
            raise InputTooLarge(
                f"the imports are over the limit of {self.max_bytes} bytes (at {path!r})"
            )
        self.files[path] = data
        return data


def collect(
    filename: str,
    source: str,
    search: tuple[str, ...],
    *,
    max_files: int = MAX_LIBRARY_FILES,
    max_bytes: int = MAX_LIBRARY_BYTES,
    root: str = "",
    boundaries: tuple[str, ...] | None = None,
) -> Library:
    """The files the main ``source`` (named ``filename``) imports, transitively, read from
    disk as go-jsonnet's ``FileImporter`` would find them and named as it names them, with
    ``search`` (``jsonnet_path``) and ``boundaries`` (by default ``search`` plus the main
    file's directory; ``compat`` leaves an untrusted snippet's directory out). Relative names
    are read under ``root`` ("": the current directory; the test runner reads a suite's files
    relative to the suite). ``InputTooLarge`` naming the bound and the file when the files
    exceed ``max_files`` or ``max_bytes``."""
    if boundaries is None:
        boundaries = (*search, directory_of(filename))
    collection = _Collection(root, max_files, max_bytes, {}, {})
    scanned: set[str] = set()
    sources = [(directory_of(filename), source)]
    while sources:
        directory, text = sources.pop()
        for found in import_names(text):
            path = _find(collection, boundaries, search, directory, found.name)
            if path is None or found.kind is not ImportKind.CODE or path in scanned:
                continue
            scanned.add(path)
            code = collection.files[path].decode("utf-8", _GO_REPLACE)
            sources.append((directory_of(path), code))
    return Library(collection.files, search, boundaries, max_files, max_bytes)


def _find(
    collection: _Collection,
    boundaries: tuple[str, ...],
    search: tuple[str, ...],
    directory: str,
    name: str,
) -> str | None:
    """The name of the file ``import name`` in ``directory`` reads (read now), or None."""
    if refusal(name) is not None:
        return None
    for path in candidates(directory, name, search):
        if not any(within(path, boundary) for boundary in boundaries):
            continue  # never opened: the worker would not serve it either
        found = collection.lookup(path)
        if found is _Lookup.ABSENT:
            continue
        return None if found is _Lookup.UNREADABLE else path
    return None
