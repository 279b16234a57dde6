"""go-jsonnet's C API (``libjsonnet.h``) through ctypes: a worker that parses a snippet once.

Goals: inside a worker, evaluate with go-jsonnet faster than its Python binding, which builds
a new VM and parses, desugars and analyses the snippet again on every call, while every result
and every error message stays byte-identical to ``_gojsonnet.evaluate_snippet`` (``max_stack``,
``max_trace`` and static errors included), and no snippet can import anything but the files of
the library set its call was given (``_wire.imports``), served from memory.

Plan: the ``_gojsonnet`` extension exports the C API; ``bind()`` finds it in the already loaded
extension (dlopen by the name it was loaded under: no file is opened). A bounded LRU cache keyed
by the snippet's content (its text, its filename and the names of its variables) holds one VM
per snippet. That VM evaluates a fixed wrapper, ``import "<token>"`` under an unguessable path,
and its import callback serves the snippet for that one import: go-jsonnet keeps the parsed,
desugared and analysed AST of an imported file in the VM's import cache, and setting an ext var
flushes cached values, not parsed files. So from the second call on, a call costs the
evaluation and not the parse.

Why one VM per snippet, not one VM with a file per snippet: go-jsonnet caches an imported file
by the path the callback says it was found at, and that path is also ``std.thisFile`` and the
name in every error location. To be byte-identical it must be the caller's filename, so two
snippets with the same filename would share one cache entry in a shared VM. A VM per snippet
holds exactly one imported file, so no name a snippet guesses can reach another snippet's text,
and its import cache never grows (a refused import is not cached): evicting an entry destroys
its VM, which is how the cache stays within its bounds although go-jsonnet's never evicts.

Library sets: the key also holds the set's digest, and the entry its set, so the callback serves
the set's files (by ``_wire.imports.resolve``) to the VM evaluating, and go-jsonnet's import
cache keeps them parsed for the next call with the same snippet and set. A set's bytes count
against the cache's bounds. A missing file's message is go-jsonnet's file importer's: the
callback's "importer error: " prefix is taken off it (``unprefixed``).

Identical behaviour, case by case:
  * the first call of a snippet is evaluated directly (``jsonnet_evaluate_snippet``, exactly
    what the binding does); only after a success is the snippet known to parse and be
    statically valid, and only then is it served through the import (whose static errors would
    be reported differently, as a RUNTIME ERROR);
  * the import adds one frame, the wrapper's, to errors raised while the top-level expression
    is evaluated, and takes one stack slot. A success through the import is the binding's
    success (it had one slot less). An error whose trace lacks the wrapper's frame was raised
    in the manifestation or the top-level function call, where the stacks are the same. An
    error with it has that line removed, unless the trace was cut (``max_trace``: the frames
    kept would differ) or the stack overflowed (the binding had one slot more): then the call
    is evaluated again directly, which is exact and, for such rare errors, costs a second run;
  * values cached in the VM are flushed before every call (setting an ext var does it; with no
    ext var, registering a native function under an unguessable name does), so a call never
    sees a value computed under another call's ``max_stack``;
  * ``check`` evaluates with ``max_stack`` 0: go-jsonnet parses and statically checks the
    snippet, then fails at its first stack frame, which is the standard library's, before any
    of the snippet runs. Whether the snippet is valid is decided on a run under a fixed name
    (a static error then starts with that name, never like the stack error); its message comes
    from a run under the caller's filename.

Weak spots: the callbacks are libffi closures (anonymous private RWX pages), made once in
``CapiEngine.__init__`` before the seccomp filter; nothing here allocates one later. An error
that needs the second, direct run takes twice its time. The cache bounds count the snippet's
source bytes, not the Go heap its AST takes (a few times more).

Its values are ``_wire.values.valueclass``es, not dataclasses: every worker imports this
module, and ``dataclasses`` (with ``inspect``) would cost each worker's start ~18 ms.
"""

from __future__ import annotations

import ctypes
import os
from collections import OrderedDict
from collections.abc import Iterable, Mapping

from .._wire.imports import Found, Missing, refused_message, resolve
from .._wire.messages import FormatStyle, LibrarySet
from .._wire.values import valueclass

# The formatter's option setters (libjsonnet.h: jsonnet_fmt_<option>(vm, int)), in the
# order ``format_snippet`` sets them.
FORMAT_OPTIONS = (
    "indent",
    "max_blank_lines",
    "string",
    "comment",
    "pad_arrays",
    "pad_objects",
    "pretty_field_names",
    "sort_imports",
)
# The entry points used, all in libjsonnet.h since jsonnet 0.20.
REQUIRED_SYMBOLS = (
    "jsonnet_make",
    "jsonnet_destroy",
    "jsonnet_max_stack",
    "jsonnet_max_trace",
    "jsonnet_ext_var",
    "jsonnet_ext_code",
    "jsonnet_tla_var",
    "jsonnet_tla_code",
    "jsonnet_import_callback",
    "jsonnet_native_callback",
    "jsonnet_json_make_null",
    "jsonnet_evaluate_snippet",
    "jsonnet_fmt_snippet",
    "jsonnet_realloc",
    *(f"jsonnet_fmt_{option}" for option in FORMAT_OPTIONS),
)

TYPE_CHECKING = False  # typing's, without importing typing: a worker never loads it
if TYPE_CHECKING:
    from typing import Any
DEFAULT_CACHE_ENTRIES = 64
DEFAULT_CACHE_BYTES = 4 * 1024 * 1024
STACK_EXCEEDED = "RUNTIME ERROR: max stack frames exceeded."
# What go-jsonnet reports when max_stack is 0: its first frame, the standard library's.
CHECK_PASSED = f"{STACK_EXCEEDED}\n\tDuring evaluation of std\t\n"
CUT_TRACE = "\n\t...\n"
PROBE_FILENAME = b"check"
# What go-jsonnet puts before an import callback's error text; its own importer says nothing
# before a missing file's message, so ``unprefixed`` takes it off the ones we made.
IMPORTER_PREFIX = "importer error: "


def unprefixed(text: str, missing: Iterable[str]) -> str:
    """``text`` with go-jsonnet's callback prefix removed before each of the ``missing``
    messages (go-jsonnet's own words for a file found nowhere), so the error reads as its
    file importer's."""
    for message in missing:
        text = text.replace(IMPORTER_PREFIX + message, message)
    return text


_VM = ctypes.c_void_p
_IMPORT_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int,
    ctypes.c_void_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.POINTER(ctypes.c_void_p),
    ctypes.POINTER(ctypes.c_void_p),
    ctypes.POINTER(ctypes.c_size_t),
)
_NATIVE_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int)
)


class CapiUnavailable(Exception):
    """The loaded extension does not offer the C API; the reason says what is missing."""


def bind(extension_path: str) -> ctypes.CDLL:
    """The C API of the already loaded extension at ``extension_path``, with its signatures.

    ``RTLD_NOLOAD``: the loaded object is found by the name it was loaded under, so nothing is
    opened (inside the sandbox nothing could be)."""
    try:
        library = ctypes.CDLL(extension_path, mode=os.RTLD_NOLOAD | os.RTLD_LOCAL)
    except OSError as exc:
        raise CapiUnavailable(f"the engine's extension is not loaded as a library: {exc}") from None
    missing = [name for name in REQUIRED_SYMBOLS if not hasattr(library, name)]
    if missing:
        raise CapiUnavailable(f"the C API symbols are missing: {', '.join(missing)}")
    text, string, uint = ctypes.c_char_p, ctypes.c_void_p, ctypes.c_uint
    signatures: dict[str, tuple[list[Any], Any]] = {
        "jsonnet_make": ([], _VM),
        "jsonnet_destroy": ([_VM], None),
        "jsonnet_max_stack": ([_VM, uint], None),
        "jsonnet_max_trace": ([_VM, uint], None),
        "jsonnet_ext_var": ([_VM, text, text], None),
        "jsonnet_ext_code": ([_VM, text, text], None),
        "jsonnet_tla_var": ([_VM, text, text], None),
        "jsonnet_tla_code": ([_VM, text, text], None),
        "jsonnet_import_callback": ([_VM, _IMPORT_CALLBACK, ctypes.c_void_p], None),
        "jsonnet_native_callback": (
            [_VM, text, _NATIVE_CALLBACK, ctypes.c_void_p, ctypes.POINTER(text)],
            None,
        ),
        "jsonnet_json_make_null": ([_VM], ctypes.c_void_p),
        "jsonnet_evaluate_snippet": ([_VM, text, text, ctypes.POINTER(ctypes.c_int)], string),
        "jsonnet_fmt_snippet": ([_VM, text, text, ctypes.POINTER(ctypes.c_int)], string),
        "jsonnet_realloc": ([_VM, ctypes.c_void_p, ctypes.c_size_t], ctypes.c_void_p),
        **{f"jsonnet_fmt_{option}": ([_VM, ctypes.c_int], None) for option in FORMAT_OPTIONS},
    }
    for name, (argtypes, restype) in signatures.items():
        function = getattr(library, name)
        function.argtypes = argtypes
        function.restype = restype
    return library


@valueclass(frozen=False)
class _Entry:
    """One cached snippet and the VM that holds its parsed AST."""

    vm: int
    filename: bytes
    snippet: bytes
    size: int
    library: LibrarySet | None = None  # the set its imports are served from
    proven: bool = False  # evaluated once with success: it parses and is statically valid


@valueclass(frozen=False)
class CacheStats:
    """What the snippet cache has done (hits, misses, evictions, re-runs)."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    direct_reruns: int = 0
    uncached: int = 0


_Key = tuple[str, str, tuple[str, ...], tuple[str, ...], str]


class CapiEngine:
    """go-jsonnet through its C API, with the parsed-snippet cache described above.

    ``evaluate_snippet`` has the binding's signature and behaviour: it returns the JSON text or
    raises RuntimeError with go-jsonnet's message (UnicodeDecodeError where the binding would).
    Not thread-safe: the worker evaluates on one thread."""

    def __init__(
        self,
        library: ctypes.CDLL,
        max_entries: int = DEFAULT_CACHE_ENTRIES,
        max_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        self._lib = library
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.stats = CacheStats()
        self._entries: OrderedDict[_Key, _Entry] = OrderedDict()
        self._bytes = 0
        # Unguessable per worker: the wrapper's directory (the only base the callback serves)
        # and the native function whose registration flushes a VM's cached values.
        # os.urandom, not secrets: secrets imports random, which needs os.register_at_fork,
        # and `import jsonnet_worker` must work on every platform.
        secret = os.urandom(16).hex()
        self._wrapper_dir = f"/{secret}/".encode()
        self._wrapper_path = self._wrapper_dir + b"wrapper.jsonnet"
        self._wrapper_token = b"snippet"
        self._wrapper = b'import "' + self._wrapper_token + b'"'
        self._wrapper_frame = "\t" + self._wrapper_path.decode() + ":"
        self._flush_name = f"flush-{secret}".encode()
        self._no_params = (ctypes.c_char_p * 1)(None)
        self._armed: _Entry | None = None
        # The library set of the evaluation under way (None: every import is refused), and
        # the "missing" messages its imports got (``unprefixed``).
        self._library: LibrarySet | None = None
        self._missing: list[str] = []
        # Made here, before the seccomp filter: each is a libffi closure (an RWX page).
        self._import_callback = _IMPORT_CALLBACK(self._on_import)
        self._native_callback = _NATIVE_CALLBACK(self._on_native)
        self._probe = self._new_vm()
        library.jsonnet_max_stack(self._probe, 0)

    # -- callbacks (called by go-jsonnet on the evaluating thread) --------------------------

    def _malloc_copy(self, vm: int | None, data: bytes) -> int:
        pointer: int = self._lib.jsonnet_realloc(vm, None, len(data) + 1)
        ctypes.memmove(pointer, data + b"\0", len(data) + 1)
        return pointer

    def _on_import(
        self,
        ctx: int | None,
        base: bytes | None,
        rel: bytes | None,
        found_here: ctypes._Pointer[ctypes.c_void_p],
        buf: ctypes._Pointer[ctypes.c_void_p],
        buflen: ctypes._Pointer[ctypes.c_size_t],
    ) -> int:
        try:
            return self._import(ctx, base, rel, found_here, buf, buflen)
        except BaseException:  # never out of a ctypes callback: it would then return 0, "found"
            buf[0] = None
            buflen[0] = 0
            return 1

    def _import(
        self,
        ctx: int | None,
        base: bytes | None,
        rel: bytes | None,
        found_here: ctypes._Pointer[ctypes.c_void_p],
        buf: ctypes._Pointer[ctypes.c_void_p],
        buflen: ctypes._Pointer[ctypes.c_size_t],
    ) -> int:
        entry, self._armed = self._armed, None  # one import per evaluation: the wrapper's
        if (
            entry is not None
            and ctx == entry.vm
            and base == self._wrapper_dir
            and rel == self._wrapper_token
        ):
            found_here[0] = self._malloc_copy(ctx, entry.filename)
            buf[0] = self._malloc_copy(ctx, entry.snippet)
            buflen[0] = len(entry.snippet)
            return 0
        name = (rel or b"").decode("utf-8", "surrogateescape")
        library = self._library
        if library is None:
            message = refused_message(name)
        else:
            directory = (base or b"").decode("utf-8", "surrogateescape")
            where = resolve(library.files, library.search, library.boundaries, directory, name)
            if isinstance(where, Found):
                data = library.files[where.path]
                found_here[0] = self._malloc_copy(
                    ctx, where.path.encode("utf-8", "surrogateescape")
                )
                buf[0] = self._malloc_copy(ctx, data)
                buflen[0] = len(data)
                return 0
            message = where.message
            if isinstance(where, Missing):
                self._missing.append(message)
        buf[0] = self._malloc_copy(ctx, message.encode("utf-8", "replace"))
        buflen[0] = 0
        return 1

    def _on_native(
        self, ctx: int | None, argv: int | None, success: ctypes._Pointer[ctypes.c_int]
    ) -> int:
        success[0] = 0  # reachable only under the unguessable name; never a value
        result: int = self._lib.jsonnet_json_make_null(ctx)
        return result

    # -- VMs ------------------------------------------------------------------------------

    def _new_vm(self) -> int:
        vm: int = self._lib.jsonnet_make()
        self._lib.jsonnet_import_callback(vm, self._import_callback, vm)
        return vm

    def _run(self, function: object, vm: int, filename: bytes, code: bytes) -> tuple[bool, str]:
        """Call an evaluate/format entry point; (failed, text), text decoded as the binding
        decodes it (strict UTF-8: a UnicodeDecodeError propagates)."""
        failed = ctypes.c_int()
        pointer = function(vm, filename, code, ctypes.byref(failed))  # type: ignore[operator]
        try:
            text = ctypes.string_at(pointer).decode("utf-8")
        finally:
            self._lib.jsonnet_realloc(vm, pointer, 0)
        return bool(failed.value), text

    def _set_variables(
        self,
        vm: int,
        ext_vars: Mapping[str, str],
        ext_codes: Mapping[str, str],
        tla_vars: Mapping[str, str],
        tla_codes: Mapping[str, str],
    ) -> None:
        lib = self._lib
        for setter, variables in (
            (lib.jsonnet_ext_var, ext_vars),
            (lib.jsonnet_ext_code, ext_codes),
            (lib.jsonnet_tla_var, tla_vars),
            (lib.jsonnet_tla_code, tla_codes),
        ):
            for key, value in variables.items():
                setter(vm, key.encode(), value.encode())

    def _release(self, vm: int, ext_names: Iterable[str], tla_names: Iterable[str]) -> None:
        """After a call: drop its variables' values and the values the VM cached (setting
        an ext var flushes them; with none, registering the flush native does), so a kept VM
        holds nothing of a call once it is answered, and the next call starts clean."""
        lib = self._lib
        flushed = False
        for key in ext_names:
            lib.jsonnet_ext_var(vm, key.encode(), b"")
            flushed = True
        for key in tla_names:
            lib.jsonnet_tla_var(vm, key.encode(), b"")
        if not flushed:
            lib.jsonnet_native_callback(
                vm, self._flush_name, self._native_callback, vm, self._no_params
            )

    def forget_libraries(self) -> None:
        """Destroy the VMs that parsed files of a library set (the worker dropped its sets)."""
        for key in [key for key, entry in self._entries.items() if entry.library is not None]:
            entry = self._entries.pop(key)
            self._bytes -= entry.size
            self._lib.jsonnet_destroy(entry.vm)
            self.stats.evictions += 1

    def _evict_for(self, size: int) -> None:
        entries = self._entries
        while entries and (len(entries) >= self.max_entries or self._bytes + size > self.max_bytes):
            _, old = entries.popitem(last=False)
            self._bytes -= old.size
            self._lib.jsonnet_destroy(old.vm)
            self.stats.evictions += 1

    def _entry(self, key: _Key, library: LibrarySet | None) -> _Entry | None:
        """The cached entry of ``key`` (made on a miss), or None for a snippet (and library
        set: its parsed files stay in the VM) over the bounds. Encoded only on a miss: a hit
        costs a hash of the snippet's text."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            self.stats.hits += 1
            return entry
        filename, snippet = key[0].encode(), key[1].encode()
        size = len(snippet) + len(filename) + (0 if library is None else library.size)
        if size > self.max_bytes or self.max_entries <= 0:
            self.stats.uncached += 1
            return None
        self.stats.misses += 1
        self._evict_for(size)
        entry = _Entry(self._new_vm(), filename, snippet, size, library)
        self._entries[key] = entry
        self._bytes += size
        return entry

    # -- the binding's three operations ----------------------------------------------------

    def evaluate_snippet(
        self,
        filename: str,
        snippet: str,
        *,
        ext_vars: Mapping[str, str],
        ext_codes: Mapping[str, str],
        tla_vars: Mapping[str, str],
        tla_codes: Mapping[str, str],
        max_stack: int,
        max_trace: int,
        library: LibrarySet | None = None,
    ) -> str:
        lib = self._lib
        key = (
            filename,
            snippet,
            (*sorted(ext_vars), "", *sorted(ext_codes)),
            (*sorted(tla_vars), "", *sorted(tla_codes)),
            "" if library is None else library.digest,
        )
        entry = self._entry(key, library)
        cached = entry is not None
        if entry is None:  # too big to keep: a VM for this call only, as the binding does
            entry = _Entry(self._new_vm(), filename.encode(), snippet.encode(), 0, library)
        vm = entry.vm
        self._library, self._missing = library, []
        try:
            lib.jsonnet_max_stack(vm, max_stack)
            lib.jsonnet_max_trace(vm, max_trace)
            self._set_variables(vm, ext_vars, ext_codes, tla_vars, tla_codes)
            if entry.proven:
                failed, text = self._through_import(entry, max_trace)
            else:
                failed, text = self._run(
                    lib.jsonnet_evaluate_snippet, vm, entry.filename, entry.snippet
                )
                entry.proven = cached and not failed
        finally:
            self._library = None
            if cached:
                self._release(vm, (*ext_vars, *ext_codes), (*tla_vars, *tla_codes))
            else:
                lib.jsonnet_destroy(vm)
        if failed:
            raise RuntimeError(unprefixed(text, self._missing))
        return text

    def _through_import(self, entry: _Entry, max_trace: int) -> tuple[bool, str]:
        lib = self._lib
        self._armed = entry
        try:
            failed, text = self._run(
                lib.jsonnet_evaluate_snippet, entry.vm, self._wrapper_path, self._wrapper
            )
        finally:
            self._armed = None
        if not failed:
            return False, text
        cut = CUT_TRACE in text
        max_trace &= 0xFFFFFFFF  # what go-jsonnet got: an unsigned int, as from the binding
        frame = text.rfind(self._wrapper_frame)
        if frame == -1 and not (cut and max_trace in (1, 2)):
            # Raised after the top-level expression, where the stacks are the same. (A trace
            # cut to 1 or 2 frames may hide the wrapper's frame: those go the exact way.)
            return True, text
        if frame != -1 and not cut and not text.startswith(STACK_EXCEEDED):
            line_end = text.find("\n", frame)
            return True, text[:frame] + text[line_end + 1 :]
        self.stats.direct_reruns += 1
        return self._run(lib.jsonnet_evaluate_snippet, entry.vm, entry.filename, entry.snippet)

    def check_snippet(self, filename: str, snippet: str) -> None:
        """Parse and statically check, never evaluate; RuntimeError with the static error."""
        lib, probe, code = self._lib, self._probe, snippet.encode()
        failed, text = self._run(lib.jsonnet_evaluate_snippet, probe, PROBE_FILENAME, code)
        if failed and text == CHECK_PASSED:
            return
        failed, text = self._run(lib.jsonnet_evaluate_snippet, probe, filename.encode(), code)
        if failed and text == CHECK_PASSED:  # cannot happen: validity ignores the filename
            return
        raise RuntimeError(text)

    def format_snippet(self, filename: str, snippet: str, style: FormatStyle) -> str:
        """go-jsonnet's formatter with ``style``'s options (``FormatStyle()``: those of
        ``jsonnetfmt``), every option set on each call: the VM is kept, and one call's
        options must not be the next one's."""
        lib, vm = self._lib, self._probe
        values = (
            style.indent,
            style.max_blank_lines,
            ord(style.string_style),
            ord(style.comment_style),
            int(style.pad_arrays),
            int(style.pad_objects),
            int(style.pretty_field_names),
            int(style.sort_imports),
        )
        for option, value in zip(FORMAT_OPTIONS, values, strict=True):
            getattr(lib, f"jsonnet_fmt_{option}")(vm, value)
        failed, text = self._run(
            self._lib.jsonnet_fmt_snippet, self._probe, filename.encode(), snippet.encode()
        )
        if failed:
            raise RuntimeError(text)
        return text
