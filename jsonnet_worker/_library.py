"""Library sets: files a call may import, read by the host and served from memory in the worker.

Goals: a tenant's mappers and templates share helpers (``import 'util.libsonnet'``) without
the sandbox ever getting a filesystem. The host reads the files once, bounds them, and each
worker receives a set once (keyed by its content digest) and serves its imports from memory;
every other name is refused, never looked up on disk.

Plan: ``Library`` is an immutable value: files by name (cleaned, relative to the library's
top unless the host chose other names, as the CLI does for go-jsonnet's own), the search
paths tried after the importing file's directory (go-jsonnet's ``-J``: the last wins), and
the boundaries no import may climb out of. ``from_files`` and ``from_directory`` build one
and check its bounds (``MAX_LIBRARY_FILES``, ``MAX_LIBRARY_BYTES``); ``digest`` is a SHA-256
of the whole set, so two equal sets are one set on the wire and in a worker's memory. The
wire frame (``_wire.messages.LibrarySet``) is encoded on first use and kept.

Weak spots: ``from_directory`` reads every regular file under the directory (symlinked
files are read, symlinked directories are not walked): point it at a library, not a home
directory. The bounds count file contents, not the Go heap their parsed ASTs take in a
worker (a few times more).
"""

from __future__ import annotations

import os
import stat
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property

import msgpack

from ._errors import InputTooLarge, InvalidArgument, InvalidType
from ._wire.framing import encode
from ._wire.imports import MAX_IMPORT_NAME, go_clean, within
from ._wire.messages import LibrarySet

MAX_LIBRARY_FILES = 4096
MAX_LIBRARY_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True, eq=False)
class Library:
    """A set of files that calls given it may ``import``, ``importstr`` and ``importbin``.

    ``files`` maps names to contents (``str`` is stored UTF-8 encoded). Names are
    go-jsonnet's: "util.libsonnet", "k8s/apps.libsonnet". An import resolves as go-jsonnet's
    does: beside the importing file (a snippet's ``filename`` "snippet.jsonnet" sits at the
    top), then in each of ``search`` from the last to the first ("" is the top). A name
    outside every one of ``boundaries``, or absolute, is refused; a name in bounds but not in
    the set fails as go-jsonnet's "couldn't open import". (The engines end a name at a NUL
    byte before the worker sees it: README.) Equal sets (``digest``) are equal values."""

    files: Mapping[str, bytes]
    search: tuple[str, ...] = ("",)
    boundaries: tuple[str, ...] = ("",)
    max_files: int = MAX_LIBRARY_FILES
    max_bytes: int = MAX_LIBRARY_BYTES
    size: int = field(init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.files, Mapping):
            raise InvalidType(f"files must be a mapping, not {type(self.files).__name__}")
        for label, paths in (("search", self.search), ("boundaries", self.boundaries)):
            if not isinstance(paths, tuple) or not all(isinstance(p, str) for p in paths):
                raise InvalidType(f"{label} must be a tuple of str")
            if any("\0" in path for path in paths):
                raise InvalidArgument(f"{label} holds a path with a NUL byte")
        if not self.boundaries:
            raise InvalidArgument("boundaries must name at least one directory")
        if len(self.files) > self.max_files:
            raise InputTooLarge(
                f"the library has {len(self.files)} files, over the limit of {self.max_files}"
            )
        stored: dict[str, bytes] = {}
        size = 0
        for name, content in self.files.items():
            _check_name(name, self.boundaries)
            if isinstance(content, str):
                data = _encoded(content)
            elif isinstance(content, bytes | bytearray | memoryview):
                data = bytes(content)
            else:
                raise InvalidType(
                    f"library file {name!r}: content must be str or bytes, "
                    f"not {type(content).__name__}"
                )
            size += len(data) + len(name)
            if size > self.max_bytes:
                raise InputTooLarge(
                    f"the library is over the limit of {self.max_bytes} bytes (at file {name!r})"
                )
            stored[name] = data
        object.__setattr__(self, "files", types.MappingProxyType(stored))
        object.__setattr__(self, "size", size)

    @classmethod
    def from_files(
        cls,
        files: Mapping[str, str | bytes],
        *,
        search: tuple[str, ...] = ("",),
        max_files: int = MAX_LIBRARY_FILES,
        max_bytes: int = MAX_LIBRARY_BYTES,
    ) -> Library:
        """A library of ``files`` (name -> source; ``str`` is stored UTF-8 encoded), names
        relative to its top."""
        if not isinstance(files, Mapping):
            raise InvalidType(f"files must be a mapping, not {type(files).__name__}")
        encoded = {
            name: _encoded(content) if isinstance(content, str) else content
            for name, content in files.items()
        }
        return cls(encoded, search, ("",), max_files, max_bytes)

    @classmethod
    def from_directory(
        cls,
        directory: str | os.PathLike[str],
        *,
        search: tuple[str, ...] = ("",),
        max_files: int = MAX_LIBRARY_FILES,
        max_bytes: int = MAX_LIBRARY_BYTES,
    ) -> Library:
        """Every regular file under ``directory``, named relative to it; the bounds are
        checked while reading, so a huge tree is refused without being read whole."""
        top = os.fspath(directory)
        if not os.path.isdir(top):
            raise InvalidArgument(f"library directory {top!r} is not a directory")
        files: dict[str, bytes] = {}
        total = 0
        for parent, directories, names in os.walk(top, onerror=_raise):
            directories.sort()
            for name in sorted(names):
                path = os.path.join(parent, name)
                relative = os.path.relpath(path, top).replace(os.sep, "/")
                try:
                    if not stat.S_ISREG(os.stat(path).st_mode):
                        continue
                    with open(path, "rb") as source:
                        data = source.read(max_bytes - total + 1)
                except OSError as exc:
                    raise InvalidArgument(f"cannot read library file {path!r}: {exc}") from None
                total += len(data) + len(relative)
                if total > max_bytes or len(files) >= max_files:
                    what = f"{max_bytes} bytes" if total > max_bytes else f"{max_files} files"
                    raise InputTooLarge(
                        f"library directory {top!r} is over the limit of {what} (at {relative!r})"
                    )
                files[relative] = data
        return cls(files, search, ("",), max_files, max_bytes)

    @cached_property
    def digest(self) -> str:
        """SHA-256 of the set (names, contents, search paths, boundaries), in hex."""
        import hashlib  # here: a process that sends no library (eval's) never loads it

        hasher = hashlib.sha256()
        hasher.update(msgpack.packb([list(self.search), list(self.boundaries)]))
        for name in sorted(self.files):
            hasher.update(msgpack.packb([name, self.files[name]], use_bin_type=True))
        return hasher.hexdigest()

    def frame(self, replace: bool = False) -> bytes:
        """The set's wire frame (``replace``: the worker drops the sets it held), encoded
        once and kept: a set is sent to each worker that serves it."""
        frames: dict[bool, bytes] = self.__dict__.setdefault("_frames", {})
        if replace not in frames:
            message = LibrarySet(
                self.digest, self.search, self.boundaries, dict(self.files), replace
            )
            frames[replace] = encode(message.to_message())
        return frames[replace]

    def __reduce__(self) -> tuple[type[Library], tuple[object, ...]]:
        """Pickled (a task queue's argument, ``copy.deepcopy``) as the arguments that build
        it again: its read-only view of the files is not picklable itself."""
        files = dict(self.files)
        return (Library, (files, self.search, self.boundaries, self.max_files, self.max_bytes))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Library) and other.digest == self.digest

    def __hash__(self) -> int:
        return hash(self.digest)

    def __repr__(self) -> str:
        return f"<Library {len(self.files)} files, {self.size} bytes, {self.digest[:12]}>"


def _encoded(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _raise(error: OSError) -> None:
    raise InvalidArgument(f"cannot read library directory: {error}")


def _check_name(name: object, boundaries: tuple[str, ...]) -> None:
    if not isinstance(name, str):
        raise InvalidType(f"library file names must be str, not {type(name).__name__}")
    if not name or "\0" in name or len(name.encode("utf-8", "surrogatepass")) > MAX_IMPORT_NAME:
        raise InvalidArgument(f"library file name {name!r} is empty, too long or has a NUL byte")
    if go_clean(name) != name:
        raise InvalidArgument(
            f"library file name {name!r} is not in its clean form {go_clean(name)!r}"
        )
    if not any(within(name, boundary) for boundary in boundaries):
        raise InvalidArgument(
            f"library file name {name!r} lies outside the library (absolute, or climbing out "
            f"with '..')"
        )
