"""The Jsonnet engines, loaded inside the sandbox and wrapped in an import barrier.

Goals: evaluate with go-jsonnet (``_gojsonnet``, what Ory Kratos runs) or the C++ binding
(``_jsonnet``) so that no thread of the engine exists outside the Landlock domain, no import
form reaches the filesystem, and no error text that leaves the worker is unbounded or invalid.

Plan: ``prepare()`` runs before restriction. It copies the extension into a memfd (the part the
loader maps, ``elf.loaded_size``: not its symbol tables and debug information) and loads the
extension's shared-library dependencies (read from its ELF ``DT_NEEDED`` entries) with
RTLD_GLOBAL, without loading the extension itself: importing ``_gojsonnet`` starts Go runtime
threads, and threads that exist before ``landlock_restrict_self`` stay unrestricted. ``load()``
runs after restriction and imports the module from ``/proc/self/fd/N``: memfds live on an
internal mount that Landlock does not mediate, and dlopen finds the dependencies already loaded
by soname.

Weak spots: where ``vm.memfd_noexec`` is 2 no memfd can be mapped executable, and the worker
refuses to start with a message saying so.

Its values are ``_wire.values.valueclass``es, not dataclasses: every worker imports this
module, and ``dataclasses`` (with ``inspect``) would cost each worker's start ~18 ms.
"""

from __future__ import annotations

import ctypes
import errno
import importlib.machinery  # not importlib.util: its imports (contextlib) are a worker's start-up
import os
import struct
import types

# json's own string encoders (json.dumps of a str calls them): ``json`` itself loads its
# decoder, scanner and ``re`` (about 2 ms of every worker's start, re aside).
from _json import encode_basestring, encode_basestring_ascii
from collections.abc import Callable

from .._sandbox.elf import elf_needed, loaded_size
from .._wire.imports import NO_MATCH, Found, Missing, refused_message, resolve
from .._wire.messages import (
    EngineKind,
    ErrorKind,
    EvalRequest,
    FormatStyle,
    LibrarySet,
    Operation,
    bound_text,
)
from .._wire.values import valueclass
from . import capi
from .capi import IMPORTER_PREFIX, unprefixed

TYPE_CHECKING = False  # typing's, without importing typing: a worker never loads it
if TYPE_CHECKING:
    from typing import Any, TypeVar

    _T = TypeVar("_T")

MFD_EXEC = 0x10  # Linux 6.3+: ask for an executable memfd whatever vm.memfd_noexec says
# The library sets a worker keeps: the pool sends each at most once and says when to drop
# the older ones (``LibrarySet.replace``), so this bound is a backstop against a pool bug.
MAX_HELD_LIBRARIES = 64

# What the Python bindings of jsonnet 0.22 link against, used if the ELF cannot be read.
_FALLBACK_NEEDED = ("libstdc++.so.6", "libgcc_s.so.1", "libpthread.so.0", "libm.so.6")
# Already in every Python process; loading them again is pointless.
_ALWAYS_LOADED = ("libc.so", "ld-linux", "libpython", "libdl.so", "librt.so")


class EngineLoadError(Exception):
    """The engine could not be prepared or loaded; the worker must not evaluate."""


class EvaluationFailed(Exception):
    """An evaluation ended without a result; carries the kind and a bounded message."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


@valueclass(frozen=False)
class PreparedEngine:
    """An engine ready to load after restriction: its memfd and the libraries preloaded."""

    kind: EngineKind
    memfd: int
    preloaded: tuple[str, ...]


def _memfd_noexec_setting() -> int:
    try:
        with open("/proc/sys/vm/memfd_noexec") as setting:
            return int(setting.read().strip() or 0)
    except (OSError, ValueError):
        return 0


def prepare(kind: EngineKind) -> PreparedEngine:
    """Before restriction: copy the extension into a memfd and load its dependencies."""
    spec = importlib.machinery.PathFinder.find_spec(kind.module_name)
    if spec is None or not spec.origin:
        raise EngineLoadError(
            f"engine {kind.value!r} is not installed (module {kind.module_name} not found)"
        )
    if _memfd_noexec_setting() >= 2:
        raise EngineLoadError(
            "vm.memfd_noexec is 2: the engine cannot be loaded from an executable memfd "
            "inside the sandbox; set the sysctl to 0 or 1"
        )
    try:
        needed = [n for n in elf_needed(spec.origin) if not n.startswith(_ALWAYS_LOADED)]
    except (OSError, ValueError, struct.error, IndexError):
        needed = list(_FALLBACK_NEEDED)
    try:
        # What dlopen maps: the symbol tables and debug information after it are half the
        # go extension and 94% of the C++ one, copied (and kept in memory) for nothing.
        copied: int | None = loaded_size(spec.origin)
    except (OSError, ValueError, struct.error):
        copied = None  # then the whole file
    for soname in needed:
        try:
            ctypes.CDLL(soname, mode=os.RTLD_GLOBAL)
        except OSError as exc:
            raise EngineLoadError(f"cannot load {soname} for {kind.module_name}: {exc}") from exc
    try:
        memfd = os.memfd_create(kind.module_name, os.MFD_CLOEXEC | MFD_EXEC)
    except OSError:
        memfd = os.memfd_create(kind.module_name, os.MFD_CLOEXEC)  # kernels before 6.3
    try:
        _copy_into(spec.origin, memfd, copied)
    except OSError:
        os.close(memfd)
        raise
    return PreparedEngine(kind, memfd, tuple(needed))


def _copy_into(path: str, memfd: int, size: int | None) -> None:
    """The first ``size`` bytes of the file at ``path`` (None: all of it) into ``memfd``,
    copied by the kernel (``sendfile``): nothing passes through this process's memory, half
    the time of a read and a write, which remain for a file system whose files sendfile
    cannot read (EINVAL)."""
    with open(path, "rb") as extension:
        file_size = os.fstat(extension.fileno()).st_size
        size = file_size if size is None else min(size, file_size)
        copied = 0
        while copied < size:
            try:
                sent = os.sendfile(memfd, extension.fileno(), copied, size - copied)
            except OSError as exc:
                if copied or exc.errno not in (errno.EINVAL, errno.ENOSYS):
                    raise
                view = memoryview(extension.read(size))
                while view:
                    view = view[os.write(memfd, view) :]
                return
            if sent == 0:  # the file shrank under us: what it holds now is copied
                break
            copied += sent


def load(prepared: PreparedEngine) -> types.ModuleType:
    """After restriction: import the engine from its memfd."""
    path = f"/proc/self/fd/{prepared.memfd}"
    name = prepared.kind.module_name
    loader = importlib.machinery.ExtensionFileLoader(name, path)
    spec = importlib.machinery.ModuleSpec(name, loader, origin=path)
    try:
        module = loader.create_module(spec)
        loader.exec_module(module)
    except Exception as exc:
        raise EngineLoadError(f"cannot load {name} from its memfd: {exc}") from exc
    finally:
        os.close(prepared.memfd)
    return module


class _ImportBarrier:
    """The binding's import callback: serves the call's library set from memory (``_wire.
    imports``: go-jsonnet's rule) and refuses everything else, ``import``, ``importstr`` and
    ``importbin`` alike. Nothing here ever opens a file.

    go-jsonnet's binding copies the callback's error text without a NUL terminator, so
    garbage bytes can follow it; the barrier remembers what it raised so ``clean`` can cut
    them. go-jsonnet's binding also prefixes it with "importer error: ", which its own
    importer does not say of a missing file: ``message`` removes it from those. The C++
    binding puts "couldn't open import <name>: " before it: a missing file then says only
    the rest of go-jsonnet's words (``NO_MATCH``), as the C++ file importer does."""

    def __init__(self, library: LibrarySet | None = None, kind: EngineKind = EngineKind.GO) -> None:
        self.library = library
        self.kind = kind
        self.refused: list[str] = []
        self.missing: list[str] = []

    def __call__(self, base: str, rel: str) -> tuple[str, bytes]:
        library = self.library
        if library is None:
            message = refused_message(rel)
        else:
            where = resolve(library.files, library.search, library.boundaries, base, rel)
            if isinstance(where, Found):
                return where.path, library.files[where.path]
            message = where.message
            if isinstance(where, Missing):
                if self.kind is EngineKind.CPP:
                    message = NO_MATCH
                self.missing.append(message)
        self.refused.append(message)
        raise RuntimeError(message)

    def message(self, text: str) -> str:
        """The engine's error ``text``, cleaned; where the binding lost it to the bytes that
        followed the barrier's message (an empty RuntimeError, or text that is not UTF-8),
        the refusal the engine was reporting."""
        if self.refused and not any(message in text for message in self.refused):
            lost = f"RUNTIME ERROR: {IMPORTER_PREFIX}{self.refused[-1]}"
            return unprefixed(lost, self.missing)
        return unprefixed(self.clean(text), self.missing) or (
            "the engine raised an error without a message"
        )

    def clean(self, text: str) -> str:
        for message in self.refused:
            start = text.find(message)
            while start != -1:
                end = start + len(message)
                line_end = text.find("\n", end)
                if line_end == -1:
                    line_end = len(text)
                text = text[:end] + text[line_end:]
                start = text.find(message, end)
        return text


def _without_nul(
    name: str, variables: dict[str, str], codes: dict[str, str]
) -> tuple[dict[str, str], dict[str, str]]:
    """The C bindings cut strings at NUL; pass such string variables as JSON code instead."""
    if not any("\0" in value for value in variables.values()):
        return variables, codes
    codes = dict(codes)
    plain = {}
    for key, value in variables.items():
        if "\0" in value:
            if key in codes:
                raise EvaluationFailed(ErrorKind.JSONNET, f"{name} {key!r} given twice")
            codes[key] = encode_basestring_ascii(value)  # json.dumps(value), to the byte
        else:
            plain[key] = value
    return plain, codes


def _refuse_nul(request: EvalRequest) -> None:
    """The C bindings cut source text at NUL: refuse it rather than evaluate a prefix."""
    texts = [request.snippet, request.filename, *request.ext_codes.values()]
    texts += request.tla_codes.values()
    if not any("\0" in text for text in texts):
        return
    sources = {"snippet": request.snippet, "filename": request.filename}
    for label, codes in (("ext code", request.ext_codes), ("TLA code", request.tla_codes)):
        sources.update({f"{label} {key!r}": value for key, value in codes.items()})
    for label, text in sources.items():
        if "\0" in text:
            raise EvaluationFailed(
                ErrorKind.JSONNET, f"{label} contains a NUL character, which Jsonnet cannot read"
            )


# What ``max_stack`` 0 makes each engine report once the snippet has been parsed and statically
# checked, before any of it is evaluated (see ``capi``: the go engine fails at the standard
# library's first frame, the C++ one at the snippet's).
_CHECK_PASSED = {
    EngineKind.GO: capi.CHECK_PASSED,
    EngineKind.CPP: "RUNTIME ERROR: max stack frames exceeded.\n\t\t\n",
}
_CPP_API = "binding: the C++ VM re-parses its standard library on every call; nothing to keep"


def _output_checked(result: str, max_output: int) -> str:
    size = len(result)
    if size > max_output or (
        size * 4 > max_output and len(result.encode("utf-8", "replace")) > max_output
    ):
        raise EvaluationFailed(
            ErrorKind.OUTPUT_TOO_LARGE,
            f"output of at least {size} bytes is over the limit of {max_output} bytes",
        )
    return result


class Engine:
    """One loaded engine; ``run`` answers a request with JSON text or raises EvaluationFailed.

    For the go engine the C API path (``capi``) is used where the extension offers it, else
    the binding; ``api`` says which, and why ("capi" or "binding: <reason>")."""

    def __init__(
        self, kind: EngineKind, module: types.ModuleType, prefer_capi: bool = True
    ) -> None:
        self.kind = kind
        self.version = str(getattr(module, "version", "unknown"))
        self._module_evaluate: Callable[..., str] = module.evaluate_snippet
        self._capi: capi.CapiEngine | None = None
        self.libraries: dict[str, LibrarySet] = {}  # by digest: the sets this worker holds
        if kind is EngineKind.CPP:
            self.api = _CPP_API
        elif not prefer_capi:
            self.api = "binding: the C API path was turned off (--engine-api binding)"
        else:
            try:
                library = capi.bind(str(module.__file__))
                self._capi = capi.CapiEngine(library)
                self.api = "capi"
            except capi.CapiUnavailable as exc:
                self.api = f"binding: {exc}"
        if kind is EngineKind.GO and self._capi is None:
            # go-jsonnet's extension starts the Go runtime on a thread of its own when it is
            # loaded, and dlopen returns before the runtime is ready; the C API path waits
            # for it in CapiEngine (its probe VM), the binding only at its first evaluation.
            # Until then the runtime maps its heap while the loop measures the memory headroom
            # (``loop.MemoryHeadroom`` maps most of what the limit leaves), and the runtime
            # can find no room: "fatal error: out of memory allocating heap arena map", a
            # worker dead after its hello (3 of ~70 test runs here). One evaluation waits for it.
            try:
                self._module_evaluate("<start>", "null")
            except Exception as exc:  # then no call could be served: fail at start, say why
                raise EngineLoadError(f"the engine cannot evaluate 'null': {exc}") from exc

    def keep(self, library: LibrarySet) -> None:
        """Hold ``library`` for the requests that name it; ``replace`` drops the others (and
        the kept VMs that parsed their files)."""
        if library.replace or len(self.libraries) >= MAX_HELD_LIBRARIES:
            self.libraries.clear()
            if self._capi is not None:
                self._capi.forget_libraries()
        self.libraries[library.digest] = library

    def _library(self, request: EvalRequest) -> LibrarySet | None:
        if not request.library:
            return None
        library = self.libraries.get(request.library)
        if library is None:  # the pool sends a set before the first request naming it
            raise EvaluationFailed(
                ErrorKind.INTERNAL, f"library set {request.library[:16]} was never received"
            )
        return library

    def run(self, request: EvalRequest) -> str:
        _refuse_nul(request)
        try:
            if request.operation is Operation.CHECK:
                self._check(request)
                return "null"
            if request.operation is Operation.FMT:
                formatted = encode_basestring(self._format(request))  # json.dumps, no ASCII
                return _output_checked(formatted, request.max_output)
            return _output_checked(self._evaluate(request), request.max_output)
        except MemoryError:
            raise EvaluationFailed(ErrorKind.MEMORY, "the worker ran out of memory") from None

    def _evaluate(self, request: EvalRequest) -> str:
        ext_vars, ext_codes = _without_nul("ext var", request.ext_vars, request.ext_codes)
        tla_vars, tla_codes = _without_nul("TLA var", request.tla_vars, request.tla_codes)
        variables = {
            "ext_vars": ext_vars,
            "ext_codes": ext_codes,
            "tla_vars": tla_vars,
            "tla_codes": tla_codes,
            "max_stack": request.max_stack,
            "max_trace": request.max_trace,
        }
        library = self._library(request)
        if self._capi is not None:
            return _as_engine_result(
                None,
                self._capi.evaluate_snippet,
                request.filename,
                request.snippet,
                library=library,
                **variables,
            )
        barrier = _ImportBarrier(library, self.kind)
        return _as_engine_result(
            barrier,
            self._module_evaluate,
            request.filename,
            request.snippet,
            import_callback=barrier,
            **variables,
        )

    def _check(self, request: EvalRequest) -> None:
        """Parse and statically check, never evaluate: with ``max_stack`` 0 both engines stop
        at the first stack frame, after the static checks and before the snippet runs.
        Validity is decided under a fixed filename (a static error then starts with it, never
        like the stack error); the message comes from a run under the caller's."""
        if self._capi is not None:
            _as_engine_result(None, self._capi.check_snippet, request.filename, request.snippet)
            return
        passed = _CHECK_PASSED[self.kind]
        for filename in (capi.PROBE_FILENAME.decode(), request.filename):
            barrier = _ImportBarrier()
            try:
                _as_engine_result(
                    barrier,
                    self._module_evaluate,
                    filename,
                    request.snippet,
                    max_stack=0,
                    import_callback=barrier,
                )
            except EvaluationFailed as exc:
                if exc.message == passed:
                    return
                if filename == request.filename:
                    raise
            else:  # the engine evaluated after all: never report that as a check
                raise EvaluationFailed(
                    ErrorKind.INTERNAL, f"engine {self.kind.value!r} evaluated under max_stack 0"
                )

    def _format(self, request: EvalRequest) -> str:
        if self._capi is None:
            why = (
                "the C++ engine has no formatter; use engine 'go'"
                if self.kind is EngineKind.CPP
                else f"it needs go-jsonnet's C API, and this worker uses the {self.api}"
            )
            raise EvaluationFailed(ErrorKind.JSONNET, f"action 'fmt' is not available: {why}")
        style = request.style or FormatStyle()
        return _as_engine_result(
            None, self._capi.format_snippet, request.filename, request.snippet, style
        )


def _as_engine_result(
    barrier: _ImportBarrier | None, function: Callable[..., _T], *args: Any, **kwargs: Any
) -> _T:
    """Call the engine; its failures become EvaluationFailed with a bounded message."""
    try:
        return function(*args, **kwargs)
    except RuntimeError as exc:
        text = str(exc) if barrier is None else barrier.message(str(exc))
        raise EvaluationFailed(ErrorKind.JSONNET, bound_text(text)) from None
    except MemoryError:
        raise
    except UnicodeDecodeError:  # the binding read past the barrier's message (see message)
        if barrier is None:
            raise EvaluationFailed(ErrorKind.JSONNET, "the engine's message is not UTF-8") from None
        raise EvaluationFailed(ErrorKind.JSONNET, bound_text(barrier.message(""))) from None
    except Exception as exc:  # e.g. UnicodeDecodeError from the binding's C glue
        raise EvaluationFailed(
            ErrorKind.JSONNET, bound_text(f"{type(exc).__name__}: {exc}")
        ) from None
