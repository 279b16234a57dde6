"""The Jsonnet engines, loaded inside the sandbox and wrapped in an import barrier.

Goals: evaluate with go-jsonnet (``_gojsonnet``, what Ory Kratos runs) or the C++ binding
(``_jsonnet``) so that no thread of the engine exists outside the Landlock domain, no import
form reaches the filesystem, and no error text that leaves the worker is unbounded or invalid.

Plan: ``prepare()`` runs before restriction. It copies the extension into a memfd and loads the
extension's shared-library dependencies (read from its ELF ``DT_NEEDED`` entries) with
RTLD_GLOBAL, without loading the extension itself: importing ``_gojsonnet`` starts Go runtime
threads, and threads that exist before ``landlock_restrict_self`` stay unrestricted. ``load()``
runs after restriction and imports the module from ``/proc/self/fd/N``: memfds live on an
internal mount that Landlock does not mediate, and dlopen finds the dependencies already loaded
by soname.

Weak spots: where ``vm.memfd_noexec`` is 2 no memfd can be mapped executable, and the worker
refuses to start with a message saying so.
"""

from __future__ import annotations

import ctypes
import enum
import importlib.machinery
import importlib.util
import json
import os
import struct
import types
from collections.abc import Callable
from dataclasses import dataclass

from ._elf import elf_needed
from ._protocol import ErrorKind, EvalRequest

MFD_EXEC = 0x10  # Linux 6.3+: ask for an executable memfd whatever vm.memfd_noexec says
MAX_ERROR_CHARS = 16 * 1024
IMPORT_REFUSED = "import not available"

# What the Python bindings of jsonnet 0.22 link against, used if the ELF cannot be read.
_FALLBACK_NEEDED = ("libstdc++.so.6", "libgcc_s.so.1", "libpthread.so.0", "libm.so.6")
# Already in every Python process; loading them again is pointless.
_ALWAYS_LOADED = ("libc.so", "ld-linux", "libpython", "libdl.so", "librt.so")


class EngineKind(enum.Enum):
    GO = "go"
    CPP = "cpp"

    @property
    def module_name(self) -> str:
        return "_gojsonnet" if self is EngineKind.GO else "_jsonnet"


class EngineLoadError(Exception):
    """The engine could not be prepared or loaded; the worker must not evaluate."""


class EvaluationFailed(Exception):
    """An evaluation ended without a result; carries the kind and a bounded message."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass
class PreparedEngine:
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
    spec = importlib.util.find_spec(kind.module_name)
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
    for soname in needed:
        try:
            ctypes.CDLL(soname, mode=os.RTLD_GLOBAL)
        except OSError as exc:
            raise EngineLoadError(f"cannot load {soname} for {kind.module_name}: {exc}") from exc
    try:
        memfd = os.memfd_create(kind.module_name, os.MFD_CLOEXEC | MFD_EXEC)
    except OSError:
        memfd = os.memfd_create(kind.module_name, os.MFD_CLOEXEC)  # kernels before 6.3
    with open(spec.origin, "rb") as extension:
        data = extension.read()
    view = memoryview(data)
    while view:
        view = view[os.write(memfd, view) :]
    return PreparedEngine(kind, memfd, tuple(needed))


def load(prepared: PreparedEngine) -> types.ModuleType:
    """After restriction: import the engine from its memfd."""
    path = f"/proc/self/fd/{prepared.memfd}"
    name = prepared.kind.module_name
    loader = importlib.machinery.ExtensionFileLoader(name, path)
    spec = importlib.util.spec_from_file_location(name, path, loader=loader)
    if spec is None:
        raise EngineLoadError(f"cannot make an import spec for {name}")
    try:
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
    except Exception as exc:
        raise EngineLoadError(f"cannot load {name} from its memfd: {exc}") from exc
    finally:
        os.close(prepared.memfd)
    return module


def bound_text(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """Valid UTF-8 (lone surrogates replaced), at most ``limit`` characters plus a marker."""
    if len(text) > limit:
        text = f"{text[:limit]}... ({len(text) - limit} more characters truncated)"
    return text.encode("utf-8", "replace").decode("utf-8")


class _ImportBarrier:
    """The import callback: refuses every import, importstr and importbin.

    go-jsonnet's binding copies the callback's error text without a NUL terminator, so
    garbage bytes can follow it; the barrier remembers what it raised so ``clean`` can cut them.
    """

    def __init__(self) -> None:
        self.refused: list[str] = []

    def __call__(self, base: str, rel: str) -> tuple[str, bytes]:
        message = f"{IMPORT_REFUSED} {rel}"
        self.refused.append(message)
        raise RuntimeError(message)

    def message(self, text: str) -> str:
        """The engine's error ``text``, cleaned; where the binding lost it to the bytes that
        followed the barrier's message (an empty RuntimeError, or text that is not UTF-8),
        the refusal the engine was reporting."""
        if self.refused and not any(message in text for message in self.refused):
            return f"RUNTIME ERROR: importer error: {self.refused[-1]}"
        return self.clean(text) or "the engine raised an error without a message"

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
            codes[key] = json.dumps(value)
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


class Engine:
    """One loaded engine; ``evaluate`` returns manifested JSON or raises EvaluationFailed."""

    def __init__(self, kind: EngineKind, module: types.ModuleType) -> None:
        self.kind = kind
        self.version = str(getattr(module, "version", "unknown"))
        self._evaluate: Callable[..., str] = module.evaluate_snippet

    def evaluate(self, request: EvalRequest) -> str:
        _refuse_nul(request)
        ext_vars, ext_codes = _without_nul("ext var", request.ext_vars, request.ext_codes)
        tla_vars, tla_codes = _without_nul("TLA var", request.tla_vars, request.tla_codes)
        barrier = _ImportBarrier()
        try:
            result = self._evaluate(
                request.filename,
                request.snippet,
                ext_vars=ext_vars,
                ext_codes=ext_codes,
                tla_vars=tla_vars,
                tla_codes=tla_codes,
                max_stack=request.max_stack,
                import_callback=barrier,
            )
        except RuntimeError as exc:
            raise EvaluationFailed(
                ErrorKind.JSONNET, bound_text(barrier.message(str(exc)))
            ) from None
        except MemoryError:
            raise EvaluationFailed(ErrorKind.MEMORY, "the worker ran out of memory") from None
        except UnicodeDecodeError:
            raise EvaluationFailed(ErrorKind.JSONNET, barrier.message("")) from None
        except Exception as exc:  # any other failure of the binding's C glue
            raise EvaluationFailed(
                ErrorKind.JSONNET, bound_text(f"{type(exc).__name__}: {exc}")
            ) from None
        size = len(result)
        if size > request.max_output or (
            size * 4 > request.max_output
            and len(result.encode("utf-8", "replace")) > request.max_output
        ):
            raise EvaluationFailed(
                ErrorKind.OUTPUT_TOO_LARGE,
                f"output of at least {size} bytes is over the limit of {request.max_output} bytes",
            )
        return result
