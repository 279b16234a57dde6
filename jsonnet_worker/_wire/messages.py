"""Every message the pool, its workers and its fork server exchange: one frozen value each
(``values.valueclass``: a dataclass's shape without ``dataclasses``, which would cost every
worker's start ~18 ms of imports), built (``to_message``) and parsed (``from_message``) here
and nowhere else.

Goals: both processes and every reader (the supervisor, both call paths, launching, ``doctor``,
the host probe, the tests, the benchmarks) use these values; no code reads a message's map by
hand. A worker runs untrusted code and may be compromised, so a parse believes nothing: every
field's type is checked, texts are bounded and their control characters escaped, and any lie
is one typed ``ProtocolViolation`` naming what is wrong (the pool's conversation turns it into
``ConnectionBroken``, a worker into a ``protocol`` error answer).

Plan: a message is a msgpack map whose ``t`` names its type.
  worker -> pool, in frames (``framing``):
    ``hello``           WorkerHello: protocol (1), pid, engine, engine_version, engine_api,
                        python, sandbox (Landlock), layers (one per ``EXTRA_LAYERS`` name),
                        self_check, startup_ms
    ``startup_failed``  StartupFailure: reason (the worker then exits: fail closed)
    ``result``          Result: id, json (the answer's JSON text), retire
    ``error``           Failure: id (None if the request had none), kind, message, retire
  pool -> worker, in frames:
    ``eval``            EvalRequest: id, action (the ``Operation``: ``eval`` manifests JSON,
                        ``check`` only parses and checks, its result ``null``, ``fmt`` formats,
                        its result the source as a JSON string), snippet, filename, ext_vars,
                        ext_codes, tla_vars, tla_codes, max_stack, max_trace, max_output,
                        library (the digest of the set its imports are served from; "": none)
    ``library``         LibrarySet: digest, search, boundaries, files (name -> bytes), replace
                        (drop the sets held before). No answer: it comes before the first
                        request that names it, and a worker keeps it for later requests.
  fork server <-> pool, one control datagram each (``control``):
    ``template_hello``  ForkServerHello: as a worker's hello, without engine_version and
                        engine_api, with fork_flags
    ``startup_failed``  StartupFailure
    ``fork``            ForkRequest: id; SCM_RIGHTS: the new worker's three channels
    ``forked``          Forked: id, pid; SCM_RIGHTS: the worker's pidfd
    ``fork_failed``     ForkRefused: id, reason, errno
``read_greeting``, ``read_answer`` and ``read_fork_answer`` take whichever of a few types may
come next. What depends on the conversation (the id owed, the result's size, JSON and type for
the operation) is checked by the pool's ``_pool.connection``, which knows the request.

Weak spots: unknown fields are ignored (within the frame's limits), so a later worker may add
some. ``EvalRequest.encode`` is the caller's hot path and packs ``to_message()`` with a
per-thread Packer; ``Result.to_message`` leaves ``retire`` out unless it is set.
"""

from __future__ import annotations

import enum
import math
from _thread import _local as thread_local  # threading.local, without threading's import

import msgpack

from .framing import HEADER, ProtocolViolation
from .layers import EXTRA_LAYERS, LandlockStatus, LayerState, LayerStatus, SupportState
from .modes import FORK_SERVER_COMMAND as FORK_SERVER_COMMAND  # the start-up modes, here too
from .modes import WORKER_COMMAND as WORKER_COMMAND
from .values import field, fields, valueclass

# typing's, without importing typing: a worker never loads it (~3 ms of its start). A
# message's constants (``TYPE``, the style tables) are plain class attributes, never fields
# (``values``: a field is an annotated attribute).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, TypeGuard, TypeVar

PROTOCOL_VERSION = 1
# A worker that has used more than this share of the memory headroom it started with (what
# RLIMIT_DATA still let it map) asks, in its answer, to be replaced: go-jsonnet's heap and
# stacks never give their mappings back, so the next call, maybe another caller's small one,
# would start with what is left and could die of the last call's memory (seen in CI: a
# trivial call killed by SIGABRT on the worker whose deep-nesting snippet had just ended in a
# JsonnetError, with its mapped memory still at the limit).
RETIRE_AT_MEMORY_SHARE = 0.5
# An error message or start-up reason is at most this many characters, plus a truncation
# note of at most MAX_NOTE_CHARS ("... (N more characters truncated)").
MAX_MESSAGE_CHARS = 16 * 1024
MAX_NOTE_CHARS = 64

# The ``t`` of each message type.
HELLO = "hello"
STARTUP_FAILED = "startup_failed"
EVAL = "eval"
LIBRARY = "library"
RESULT = "result"
ERROR = "error"
FORK_SERVER_HELLO = "template_hello"
FORK = "fork"
FORKED = "forked"
FORK_REFUSED = "fork_failed"


class EngineKind(enum.Enum):
    """The engine a worker runs, as its command line names it (``--engine``)."""

    GO = "go"
    CPP = "cpp"

    @property
    def module_name(self) -> str:
        return "_gojsonnet" if self is EngineKind.GO else "_jsonnet"


class Operation(enum.Enum):
    """What a worker does with a request's snippet."""

    EVAL = "eval"
    CHECK = "check"
    FMT = "fmt"


class ErrorKind(enum.Enum):
    """Why a worker could not return a result for a request."""

    JSONNET = "jsonnet"
    OUTPUT_TOO_LARGE = "output_too_large"
    MEMORY = "memory"
    PROTOCOL = "protocol"
    INTERNAL = "internal"


# -- texts -----------------------------------------------------------------------------------

# What is escaped, each as its escape: the C0 and C1 controls but newline and tab, and the
# bidirectional marks and overrides. A table for ``str.translate``, not a regular expression:
# ``re`` costs every worker's start ~2 ms, and nothing else a worker imports needs it.
_CONTROLS = (
    *range(0x00, 0x09),
    *range(0x0B, 0x20),
    *range(0x7F, 0xA0),
    0x061C,
    0x200E,
    0x200F,
    *range(0x202A, 0x202F),
    *range(0x2066, 0x206A),
)
_ESCAPES = {code: f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" for code in _CONTROLS}


def escape_controls(text: str) -> str:
    """``text`` with control characters other than newline and tab, and the bidirectional
    overrides, written as ``\\xNN`` / ``\\uNNNN``: safe for a terminal, a log line, a body.
    Every text a parse returns has been through it: messages and reasons reach all three."""
    # Every character escaped is one ``isprintable`` refuses (Unicode's Cc and Cf): text
    # that is printable but for its newlines and tabs is returned as it is, at C speed.
    if text.isprintable() or text.replace("\n", "").replace("\t", "").isprintable():
        return text
    return text.translate(_ESCAPES)


def bound_text(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """Valid UTF-8 (lone surrogates replaced), at most ``limit`` characters plus a note: what
    a sender does to every message and reason it writes."""
    if len(text) > limit:
        text = f"{text[:limit]}... ({len(text) - limit} more characters truncated)"
    return text.encode("utf-8", "replace").decode("utf-8")


def shown(value: object) -> str:
    """A value a peer sent, for an error text: its repr, cut short and escaped."""
    return escape_controls(repr(value)[:80])


# -- field checks: each raises ProtocolViolation naming the field -----------------------------


def _is_int(value: object) -> TypeGuard[int]:
    return type(value) is int  # booleans and floats are not ints here


def _field(data: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = data.get(key)
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in kinds):
        raise ProtocolViolation(f"{where} field {key!r} is {shown(value)}")
    return value


def _optional(data: dict[str, Any], key: str, kind: type, default: Any, where: str) -> Any:
    return _field(data, key, kind, where) if key in data else default


def _text(data: dict[str, Any], key: str, where: str, default: str | None = None) -> str:
    if default is not None and key not in data:
        return default
    return escape_controls(_field(data, key, str, where))


def _count(data: dict[str, Any], key: str, where: str) -> int:
    value = _optional(data, key, int, 0, where)
    if value < 0:
        raise ProtocolViolation(f"{where} field {key!r} is negative")
    return int(value)


def _positive(data: dict[str, Any], key: str, where: str) -> int:
    value = _field(data, key, int, where)
    if value <= 0:
        raise ProtocolViolation(f"{where} field {key!r} is {value}")
    return int(value)


def _names(data: dict[str, Any], key: str, where: str) -> tuple[str, ...]:
    items = _optional(data, key, list, [], where)
    if not all(isinstance(item, str) for item in items):
        raise ProtocolViolation(f"{where} field {key!r} holds a non-string")
    return tuple(escape_controls(item) for item in items)


def _bounded(data: dict[str, Any], key: str, where: str) -> str:
    """A message or reason: a string of at most the documented bound, escaped."""
    text = data.get(key)
    if not isinstance(text, str):
        raise ProtocolViolation(f"{where} field {key!r} is a {type(text).__name__}, not a string")
    if len(text) > MAX_MESSAGE_CHARS + MAX_NOTE_CHARS:
        raise ProtocolViolation(
            f"{where} field {key!r} of {len(text)} characters, over {MAX_MESSAGE_CHARS} + a note"
        )
    return escape_controls(text)


def _retire(data: dict[str, Any], where: str) -> bool:
    value = data.get("retire", False)
    if type(value) is not bool:
        raise ProtocolViolation(f"{where} field 'retire' is a {type(value).__name__}, not a bool")
    return value


def _type_of(payload: dict[str, Any], expected: str) -> None:
    if payload.get("t") != expected:
        raise ProtocolViolation(f"a message of type {shown(payload.get('t'))}, not {expected!r}")


# -- the request -------------------------------------------------------------------------------


@valueclass(slots=True)
class FormatStyle:
    """go-jsonnet's formatter options, as ``jsonnetfmt``'s flags name them, with its defaults:
    ``indent`` (``-n``), ``max_blank_lines``, ``string_style`` (``d`` double quotes, ``s``
    single, ``l`` leave), ``comment_style`` (``h`` hash, ``s`` slash, ``l`` leave),
    ``pad_arrays``, ``pad_objects``, ``pretty_field_names``, ``sort_imports``. A value out of
    range is refused where the style enters (``problem``), not when it is made: this module
    knows nothing of the library's errors."""

    indent: int = 2
    max_blank_lines: int = 2
    string_style: str = "s"
    comment_style: str = "s"
    pad_arrays: bool = False
    pad_objects: bool = True
    pretty_field_names: bool = True
    sort_imports: bool = True

    STRING_STYLES = "dsl"
    COMMENT_STYLES = "hsl"
    MAX_INDENT = 100  # jsonnetfmt takes any; a bound keeps output sizes sane

    def problem(self) -> str:
        """What is wrong with these options, naming the first one ("" when nothing is):
        checked where a style enters, by the pool (``InvalidArgument``), the command line
        and the worker (a protocol violation)."""
        for name in ("indent", "max_blank_lines"):
            value = getattr(self, name)
            if not _is_int(value) or not 0 <= value <= self.MAX_INDENT:
                return f"{name} must be an integer in 0-{self.MAX_INDENT}, not {value!r}"
        if not isinstance(self.string_style, str) or self.string_style not in self.STRING_STYLES:
            return f"string_style must be one of d, s, l, not {self.string_style!r}"
        if not isinstance(self.comment_style, str) or self.comment_style not in self.COMMENT_STYLES:
            return f"comment_style must be one of h, s, l, not {self.comment_style!r}"
        for name in ("pad_arrays", "pad_objects", "pretty_field_names", "sort_imports"):
            if not isinstance(getattr(self, name), bool):
                return f"{name} must be a bool, not {getattr(self, name)!r}"
        return ""

    def to_message(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _STYLE_FIELDS}

    @classmethod
    def from_message(cls, value: object, request_id: int) -> FormatStyle:
        if not isinstance(value, dict) or set(value) != set(_STYLE_FIELDS):
            raise ProtocolViolation(
                f"field 'style' must map exactly {', '.join(_STYLE_FIELDS)}", request_id
            )
        style = cls(**value)
        if problem := style.problem():
            raise ProtocolViolation(f"field 'style': {problem}", request_id)
        return style


_STYLE_FIELDS = fields(FormatStyle)


@valueclass
class EvalRequest:
    """pool -> worker: evaluate (check, format) one snippet."""

    TYPE = EVAL

    id: int
    snippet: str
    filename: str = "snippet.jsonnet"
    ext_vars: dict[str, str] = field(default_factory=dict)
    ext_codes: dict[str, str] = field(default_factory=dict)
    tla_vars: dict[str, str] = field(default_factory=dict)
    tla_codes: dict[str, str] = field(default_factory=dict)
    max_stack: int = 500
    max_output: int = 1024 * 1024
    max_trace: int = 20
    operation: Operation = Operation.EVAL
    style: FormatStyle | None = None  # ``fmt`` only: the formatter's options (None: defaults)
    library: str = ""  # the digest of the LibrarySet its imports are served from ("": none)

    def to_message(self) -> dict[str, Any]:
        message = {
            "t": EVAL,
            "id": self.id,
            "action": self.operation.value,
            "snippet": self.snippet,
            "filename": self.filename,
            "ext_vars": self.ext_vars,
            "ext_codes": self.ext_codes,
            "tla_vars": self.tla_vars,
            "tla_codes": self.tla_codes,
            "max_stack": self.max_stack,
            "max_trace": self.max_trace,
            "max_output": self.max_output,
        }
        if self.style is not None:
            message["style"] = self.style.to_message()
        if self.library:
            message["library"] = self.library
        return message

    def encode(self) -> bytes:
        """The request's frame, in under half the time of ``framing.encode`` (the caller's
        hot path): a Packer kept per thread (a Packer is not thread-safe, and ``packb`` makes
        one per call). Raises UnicodeEncodeError like ``framing.encode``."""
        packer = getattr(_packers, "packer", None)
        if packer is None:
            packer = _packers.packer = msgpack.Packer(use_bin_type=True)
        body: bytes = packer.pack(self.to_message())
        return HEADER.pack(len(body)) + body

    @classmethod
    def from_message(cls, payload: dict[str, Any]) -> EvalRequest:
        """Raises ProtocolViolation naming what is wrong, with the request's id if it has
        one (the worker's error answer carries it)."""
        raw_id = payload.get("id")
        request_id = raw_id if _is_int(raw_id) else None
        if payload.get("t") != EVAL:
            raise ProtocolViolation(f"unknown message type {payload.get('t')!r}", request_id)
        if request_id is None:
            raise ProtocolViolation("missing or non-integer field 'id'")
        snippet, filename = payload.get("snippet"), payload.get("filename", "snippet.jsonnet")
        if not isinstance(snippet, str):
            raise ProtocolViolation("missing or non-string field 'snippet'", request_id)
        if not isinstance(filename, str):
            raise ProtocolViolation("field 'filename' must be a string", request_id)
        try:
            operation = Operation(payload.get("action", EVAL))
        except ValueError:
            raise ProtocolViolation(
                f"unknown action {payload.get('action')!r}", request_id
            ) from None
        max_trace = payload.get("max_trace", 20)
        if not _is_int(max_trace) or max_trace < 0:
            raise ProtocolViolation("field 'max_trace' must be a non-negative integer", request_id)
        raw_style = payload.get("style")
        style = None if raw_style is None else FormatStyle.from_message(raw_style, request_id)
        library = payload.get("library", "")
        if not isinstance(library, str):
            raise ProtocolViolation("field 'library' must be a string", request_id)
        return cls(
            id=request_id,
            snippet=snippet,
            filename=filename,
            ext_vars=_string_map(payload, "ext_vars", request_id),
            ext_codes=_string_map(payload, "ext_codes", request_id),
            tla_vars=_string_map(payload, "tla_vars", request_id),
            tla_codes=_string_map(payload, "tla_codes", request_id),
            max_stack=_positive_limit(payload, "max_stack", request_id),
            max_output=_positive_limit(payload, "max_output", request_id),
            max_trace=max_trace,
            operation=operation,
            style=style,
            library=library,
        )


_packers = thread_local()  # one Packer per thread


def _paths(payload: dict[str, Any], key: str) -> tuple[str, ...]:
    """A list of paths as the pool wrote them (not escaped: they are names to match)."""
    value = payload.get(key)
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ProtocolViolation(f"library: field {key!r} must be a list of strings")
    return tuple(value)


@valueclass
class LibrarySet:
    """pool -> worker: a set of library files, kept by the worker under its ``digest`` for
    the requests that name it (``_library.Library`` builds it; ``_wire.imports`` resolves
    within it). ``replace``: drop every set held before this one."""

    TYPE = LIBRARY

    digest: str
    search: tuple[str, ...]
    boundaries: tuple[str, ...]
    files: dict[str, bytes]
    replace: bool = False

    @property
    def size(self) -> int:
        return sum(len(name) + len(data) for name, data in self.files.items())

    def to_message(self) -> dict[str, Any]:
        return {
            "t": LIBRARY,
            "digest": self.digest,
            "search": list(self.search),
            "boundaries": list(self.boundaries),
            "files": self.files,
            "replace": self.replace,
        }

    @classmethod
    def from_message(cls, payload: dict[str, Any]) -> LibrarySet:
        _type_of(payload, LIBRARY)
        where = "library"
        digest = _text(payload, "digest", where)
        search, boundaries = _paths(payload, "search"), _paths(payload, "boundaries")
        files = payload.get("files")
        if not isinstance(files, dict) or not all(
            isinstance(name, str) and isinstance(data, bytes) for name, data in files.items()
        ):
            raise ProtocolViolation("library: field 'files' must map strings to bytes")
        replace = payload.get("replace", False)
        if not isinstance(replace, bool):
            raise ProtocolViolation("library: field 'replace' must be a boolean")
        return cls(digest, search, boundaries, files, replace)


def _string_map(payload: dict[str, Any], key: str, request_id: int) -> dict[str, str]:
    value = payload.get(key, {})
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ProtocolViolation(f"field {key!r} must map strings to strings", request_id)
    return value


def _positive_limit(payload: dict[str, Any], key: str, request_id: int) -> int:
    value = payload.get(key)
    if not _is_int(value) or value <= 0:
        raise ProtocolViolation(f"field {key!r} must be a positive integer", request_id)
    return int(value)


# -- the answers -------------------------------------------------------------------------------


@valueclass(slots=True)
class Result:
    """worker -> pool: the answer's JSON text (``fmt``: the formatted source as a JSON
    string; ``check``: ``null``). ``retire``: the worker asks to be replaced after this
    answer (it has used over RETIRE_AT_MEMORY_SHARE of its starting memory headroom)."""

    TYPE = RESULT

    request_id: int
    json_text: str
    retire: bool = False

    def to_message(self) -> dict[str, Any]:
        message: dict[str, Any] = {"t": RESULT, "id": self.request_id, "json": self.json_text}
        if self.retire:
            message["retire"] = True
        return message

    @classmethod
    def from_message(cls, payload: dict[str, Any]) -> Result:
        _type_of(payload, RESULT)
        request_id = payload.get("id")
        if not _is_int(request_id):
            raise ProtocolViolation(f"a result with id {shown(request_id)}")
        text = payload.get("json")
        if not isinstance(text, str):
            raise ProtocolViolation(f"a result whose 'json' is a {type(text).__name__}")
        return cls(request_id, text, _retire(payload, "result"))


@valueclass(slots=True)
class Failure:
    """worker -> pool: why there is no result. ``request_id`` is None only for a
    ``protocol`` error about a frame the worker could not read. ``retire`` as in
    ``Result``."""

    TYPE = ERROR

    request_id: int | None
    kind: ErrorKind
    message: str
    retire: bool = False

    def to_message(self) -> dict[str, Any]:
        message: dict[str, Any] = {
            "t": ERROR,
            "id": self.request_id,
            "kind": self.kind.value,
            "message": self.message,
        }
        if self.retire:
            message["retire"] = True
        return message

    @classmethod
    def from_message(cls, payload: dict[str, Any]) -> Failure:
        _type_of(payload, ERROR)
        raw_kind = payload.get("kind")
        try:
            kind = ErrorKind(raw_kind)
        except ValueError:
            raise ProtocolViolation(f"an error of unknown kind {shown(raw_kind)}") from None
        request_id = payload.get("id")
        # Only a worker that could not read our frame cannot know its id.
        if not _is_int(request_id) and not (request_id is None and kind is ErrorKind.PROTOCOL):
            raise ProtocolViolation(f"an error with id {shown(request_id)}")
        message = _bounded(payload, "message", "error")
        return cls(request_id, kind, message, _retire(payload, "error"))


def read_answer(payload: dict[str, Any]) -> Result | Failure:
    """A worker's answer to a request; ProtocolViolation for anything else."""
    kind = payload.get("t")
    if kind == RESULT:
        return Result.from_message(payload)
    if kind == ERROR:
        return Failure.from_message(payload)
    raise ProtocolViolation(f"sent a message of type {shown(kind)} instead of an answer")


# -- start-up ----------------------------------------------------------------------------------


@valueclass(slots=True)
class StartupFailure:
    """worker or fork server -> pool: it could not start, and why (it exits next: fail
    closed). The reason is bounded when the message is built."""

    TYPE = STARTUP_FAILED

    reason: str

    def to_message(self) -> dict[str, Any]:
        return {"t": STARTUP_FAILED, "reason": bound_text(self.reason)}

    @classmethod
    def from_message(cls, payload: dict[str, Any]) -> StartupFailure:
        _type_of(payload, STARTUP_FAILED)
        return cls(_bounded(payload, "reason", "startup_failed"))


def _landlock_from_message(data: object) -> LandlockStatus:
    where = "sandbox"
    if not isinstance(data, dict):
        raise ProtocolViolation(f"hello field 'sandbox' is {shown(data)}")
    try:
        state = SupportState(_field(data, "state", str, where))
    except ValueError:
        raise ProtocolViolation(f"sandbox field 'state' is {shown(data.get('state'))}") from None
    return LandlockStatus(
        enforced=_field(data, "enforced", bool, where),
        state=state,
        abi=_count(data, "abi", where),
        errata=_count(data, "errata", where),
        handled_fs=_names(data, "handled_fs", where),
        handled_net=_names(data, "handled_net", where),
        scoped=_names(data, "scoped", where),
        restrict_flags=_names(data, "restrict_flags", where),
        dropped=_names(data, "dropped", where),
        reason=_text(data, "reason", where, default=""),
    )


def _layers_to_message(layers: tuple[LayerStatus, ...]) -> dict[str, Any]:
    return {layer.name: layer.to_dict() for layer in layers}


def _layer_from_message(name: str, data: object) -> LayerStatus:
    if data is None:
        return LayerStatus.unreported(name)
    where = f"layer {name!r}"
    if not isinstance(data, dict):
        raise ProtocolViolation(f"{where} is {shown(data)}")
    try:
        state = LayerState(_field(data, "state", str, where))
    except ValueError:
        raise ProtocolViolation(f"{where} field 'state' is {shown(data.get('state'))}") from None
    detail = _text(data, "detail", where, default="")
    return LayerStatus(name, state, detail, _text(data, "reason", where, default=""))


def _sandbox_fields(payload: dict[str, Any], where: str) -> dict[str, Any]:
    """What both hellos say about the process and its sandbox, validated."""
    protocol = payload.get("protocol")
    if not _is_int(protocol) or protocol != PROTOCOL_VERSION:
        raise ProtocolViolation(f"speaks protocol {shown(protocol)}, not {PROTOCOL_VERSION}")
    startup_ms = _field(payload, "startup_ms", (int, float), where)
    if not math.isfinite(startup_ms) or startup_ms < 0:
        raise ProtocolViolation(f"{where} field 'startup_ms' is {startup_ms!r}")
    layers = _optional(payload, "layers", dict, {}, where)
    return {
        "pid": _positive(payload, "pid", where),
        "engine": _text(payload, "engine", where),
        "python": _text(payload, "python", where),
        "landlock": _landlock_from_message(payload.get("sandbox")),
        "self_check": _text(payload, "self_check", where),
        "startup_ms": float(startup_ms),
        # One per EXTRA_LAYERS name, in that order: a layer not reported is missing.
        "layers": tuple(_layer_from_message(name, layers.get(name)) for name in EXTRA_LAYERS),
    }


@valueclass(slots=True)
class WorkerHello:
    """worker -> pool, once its start-up is over: who it is and what its sandbox achieved.
    ``layers``: one per name in ``EXTRA_LAYERS``, in that order, once parsed."""

    TYPE = HELLO

    pid: int
    engine: str
    engine_version: str
    python: str
    landlock: LandlockStatus
    self_check: str
    startup_ms: float
    layers: tuple[LayerStatus, ...] = ()
    engine_api: str = ""  # e.g. "capi" or "binding: <reason>"; "" if the worker did not say

    def to_message(self) -> dict[str, Any]:
        return {
            "t": HELLO,
            "protocol": PROTOCOL_VERSION,
            "pid": self.pid,
            "engine": self.engine,
            "engine_version": self.engine_version,
            "engine_api": self.engine_api,
            "python": self.python,
            "sandbox": self.landlock.to_dict(),
            "layers": _layers_to_message(self.layers),
            "self_check": self.self_check,
            "startup_ms": self.startup_ms,
        }

    @classmethod
    def from_message(cls, payload: dict[str, Any]) -> WorkerHello:
        _type_of(payload, HELLO)
        return cls(
            **_sandbox_fields(payload, "hello"),
            engine_version=_text(payload, "engine_version", "hello"),
            engine_api=_text(payload, "engine_api", "hello", default=""),
        )


@valueclass(slots=True)
class ForkServerHello:
    """fork server -> pool, once its start-up is over: as a worker's hello, and the one
    clone flag word its seccomp filter lets it fork with."""

    TYPE = FORK_SERVER_HELLO

    pid: int
    engine: str
    python: str
    landlock: LandlockStatus
    self_check: str
    startup_ms: float
    layers: tuple[LayerStatus, ...]
    fork_flags: int

    def to_message(self) -> dict[str, Any]:
        return {
            "t": FORK_SERVER_HELLO,
            "protocol": PROTOCOL_VERSION,
            "pid": self.pid,
            "engine": self.engine,
            "python": self.python,
            "sandbox": self.landlock.to_dict(),
            "layers": _layers_to_message(self.layers),
            "self_check": self.self_check,
            "startup_ms": self.startup_ms,
            "fork_flags": self.fork_flags,
        }

    @classmethod
    def from_message(cls, payload: dict[str, Any]) -> ForkServerHello:
        where = "fork server hello"
        _type_of(payload, FORK_SERVER_HELLO)
        return cls(
            **_sandbox_fields(payload, where), fork_flags=_count(payload, "fork_flags", where)
        )


if TYPE_CHECKING:
    Hello = TypeVar("Hello", WorkerHello, ForkServerHello)


def read_greeting(payload: dict[str, Any], hello: type[Hello]) -> Hello | StartupFailure:
    """The first message of a worker (``hello`` WorkerHello) or fork server (ForkServerHello):
    its hello, or why it could not start; ProtocolViolation for anything else."""
    kind = payload.get("t")
    if kind == STARTUP_FAILED:
        return StartupFailure.from_message(payload)
    if kind != hello.TYPE:
        raise ProtocolViolation(f"sent a message of type {shown(kind)} instead of its hello")
    return hello.from_message(payload)


# -- the fork server's control messages --------------------------------------------------------


@valueclass(slots=True)
class ForkRequest:
    """pool -> fork server: fork a worker on the three channels this datagram carries."""

    TYPE = FORK

    request_id: int

    def to_message(self) -> dict[str, Any]:
        return {"t": FORK, "id": self.request_id}

    @classmethod
    def from_message(cls, payload: dict[str, Any]) -> ForkRequest:
        """Raises ProtocolViolation with the id, if it has one, to refuse it by."""
        raw_id = payload.get("id")
        request_id = raw_id if _is_int(raw_id) else None
        if payload.get("t") != FORK:
            raise ProtocolViolation(
                f"unknown control message {shown(payload.get('t'))}", request_id
            )
        if request_id is None:
            raise ProtocolViolation(f"a fork request with id {shown(raw_id)}")
        return cls(request_id)


@valueclass(slots=True)
class Forked:
    """fork server -> pool: the worker is forked; its pidfd comes with this datagram."""

    TYPE = FORKED

    request_id: int
    pid: int

    def to_message(self) -> dict[str, Any]:
        return {"t": FORKED, "id": self.request_id, "pid": self.pid}

    @classmethod
    def from_message(cls, payload: dict[str, Any]) -> Forked:
        _type_of(payload, FORKED)
        return cls(_field(payload, "id", int, FORKED), _positive(payload, "pid", FORKED))


@valueclass(slots=True)
class ForkRefused:
    """fork server -> pool: no worker for this request, and why (``errno``: 0, or the
    clone's, which says whether every later fork would be refused the same way).
    ``request_id`` None: the request had no id the fork server could read."""

    TYPE = FORK_REFUSED

    request_id: int | None
    reason: str
    errno: int = 0

    def to_message(self) -> dict[str, Any]:
        return {
            "t": FORK_REFUSED,
            "id": self.request_id,
            "reason": bound_text(self.reason),
            "errno": self.errno,
        }

    @classmethod
    def from_message(cls, payload: dict[str, Any]) -> ForkRefused:
        _type_of(payload, FORK_REFUSED)
        request_id = payload.get("id")
        if request_id is not None and not _is_int(request_id):
            raise ProtocolViolation(f"a refused fork with id {shown(request_id)}")
        reason = _bounded(payload, "reason", FORK_REFUSED)
        return cls(request_id, reason, _count(payload, "errno", FORK_REFUSED))


def read_fork_answer(payload: dict[str, Any]) -> Forked | ForkRefused:
    """The fork server's answer to a fork request; ProtocolViolation for anything else."""
    kind = payload.get("t")
    if kind == FORKED:
        return Forked.from_message(payload)
    if kind == FORK_REFUSED:
        return ForkRefused.from_message(payload)
    raise ProtocolViolation(f"answered a fork with a message of type {shown(kind)}")
