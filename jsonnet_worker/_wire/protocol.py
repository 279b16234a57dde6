"""The framing protocol between a pool and its workers, sans I/O (bytes in, events out).

Goals: one implementation of the wire format that the worker loop, the pool's blocking fast
path and its asyncio path all share, and that no byte a snippet controls can subvert.

Plan: every frame is a 4-byte big-endian length and a msgpack map of that length. A
``FrameReader`` is fed whatever bytes arrived and yields ``Message`` events, or one
``FrameTooLarge`` / ``MalformedFrame`` event. Length prefixes, not delimiters, mark frame
boundaries: Ory Kratos' NUL-terminated framing lets ``error "x\\u0000{...}"`` inject a response
for the next request; here an error text is just a msgpack string inside one frame.

Messages (key ``t``):
  worker -> pool  ``hello``   protocol, pid, engine, engine_version, sandbox, self_check
                  ``startup_failed`` reason (the worker then exits: fail closed)
                  ``result``  id, json (the manifested JSON text)
                  ``error``   id (None if the request had none), kind, message
  pool -> worker  ``eval``    id, action, snippet, filename, ext_vars, ext_codes, tla_vars,
                              tla_codes, max_stack, max_trace, max_output
                  ``action`` is ``eval`` (manifest JSON), ``check`` (parse and statically
                  check only: the result is ``null``) or ``fmt`` (the result is the
                  formatted source as a JSON string)

A reader may carry ``UnpackLimits``: msgpack then refuses, while it decodes, any string, binary,
array or map longer than the limit (a hostile frame of a million tiny map keys costs the
parent's memory and GIL time long after its length passed the frame cap). The pool's side of
the conversation (``_connection``) sets them per state; the worker reads requests without.

Weak spots: after ``FrameTooLarge`` the stream cannot be resynchronised cheaply, so both ends
treat it as the end of that peer; ``MalformedFrame`` keeps the boundary and may go on.
"""

from __future__ import annotations

import enum
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import msgpack

PROTOCOL_VERSION = 1
# The mode a fresh interpreter is started in (its ``sys.argv[1]``, read by
# ``_worker.bootstrap``): one worker, or a fork server that forks workers.
WORKER_COMMAND = "_worker"
FORK_SERVER_COMMAND = "_template"
# A worker that has used more than this share of the memory headroom it started with (what
# RLIMIT_DATA still let it map) asks, in its answer, to be replaced: go-jsonnet's heap and
# stacks never give their mappings back, so the next call, maybe another caller's small one,
# would start with what is left and could die of the last call's memory (seen in CI: a
# trivial call killed by SIGABRT on the worker whose deep-nesting snippet had just ended in a
# JsonnetError, with its mapped memory still at the limit).
RETIRE_AT_MEMORY_SHARE = 0.5
HEADER = struct.Struct(">I")
HEADER_SIZE = HEADER.size
DEFAULT_MAX_FRAME = 64 * 1024 * 1024
# An error message or start-up reason is at most this many characters, plus a truncation
# note of at most MAX_NOTE_CHARS ("... (N more characters truncated)").
MAX_MESSAGE_CHARS = 16 * 1024
MAX_NOTE_CHARS = 64


class EngineKind(enum.Enum):
    """The engine a worker runs, as its command line names it (``--engine``)."""

    GO = "go"
    CPP = "cpp"

    @property
    def module_name(self) -> str:
        return "_gojsonnet" if self is EngineKind.GO else "_jsonnet"


class Action(enum.Enum):
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


@dataclass(frozen=True)
class UnpackLimits:
    """Per-container limits msgpack enforces while it decodes one frame."""

    max_str_len: int
    max_array_len: int
    max_map_len: int
    max_bin_len: int = 0
    max_ext_len: int = 0

    def as_kwargs(self) -> dict[str, int]:
        return {
            "max_str_len": self.max_str_len,
            "max_bin_len": self.max_bin_len,
            "max_array_len": self.max_array_len,
            "max_map_len": self.max_map_len,
            "max_ext_len": self.max_ext_len,
        }


@dataclass(frozen=True)
class Message:
    payload: dict[str, Any]


@dataclass(frozen=True)
class FrameTooLarge:
    size: int
    limit: int


@dataclass(frozen=True)
class MalformedFrame:
    reason: str


Event = Message | FrameTooLarge | MalformedFrame


def encode(message: dict[str, Any]) -> bytes:
    body: bytes = msgpack.packb(message, use_bin_type=True)
    return HEADER.pack(len(body)) + body


class FrameReader:
    """Turns a byte stream into events. Feed it bytes, then drain ``events()``."""

    def __init__(
        self, max_frame: int = DEFAULT_MAX_FRAME, limits: UnpackLimits | None = None
    ) -> None:
        self.max_frame = max_frame
        self._options: dict[str, int] = {}
        self.limits = limits
        self._buffer = bytearray()
        self._broken = False

    @property
    def limits(self) -> UnpackLimits | None:
        """The per-container limits applied to the frames read from now on."""
        return self._limits

    @limits.setter
    def limits(self, limits: UnpackLimits | None) -> None:
        self._limits = limits
        self._options = limits.as_kwargs() if limits is not None else {}

    @property
    def broken(self) -> bool:
        """True after an oversized frame: nothing more can be read from this stream."""
        return self._broken

    @property
    def pending(self) -> int:
        """Bytes received that do not make a whole frame yet."""
        return len(self._buffer)

    def feed(self, data: bytes) -> None:
        if not self._broken:
            self._buffer += data

    def next_event(self) -> Event | None:
        """The next whole frame as an event, or None until more bytes arrive."""
        buffer = self._buffer
        if self._broken or len(buffer) < HEADER_SIZE:
            return None
        (size,) = HEADER.unpack_from(buffer)
        if size > self.max_frame:
            self._broken = True
            buffer.clear()
            return FrameTooLarge(size, self.max_frame)
        end = HEADER_SIZE + size
        if len(buffer) < end:
            return None
        body = bytes(buffer[HEADER_SIZE:end])
        del buffer[:end]
        return _unpack(body, self._options)

    def events(self) -> Iterator[Event]:
        while (event := self.next_event()) is not None:
            yield event


def decode_body(body: bytes, limits: UnpackLimits | None = None) -> Event:
    return _unpack(body, limits.as_kwargs() if limits is not None else {})


def _unpack(body: bytes, options: dict[str, int]) -> Event:
    if not body:
        return MalformedFrame("empty frame")
    try:
        payload = msgpack.unpackb(body, raw=False, strict_map_key=True, **options)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        detail = str(exc)[:120]
        return MalformedFrame(
            f"invalid msgpack: {type(exc).__name__}" + (f" ({detail})" if detail else "")
        )
    if not isinstance(payload, dict):
        return MalformedFrame(f"frame is a {type(payload).__name__}, not a map")
    return Message(payload)


class ProtocolViolation(Exception):
    """A well-framed message with the wrong shape."""

    def __init__(self, reason: str, request_id: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.request_id = request_id


@dataclass(frozen=True)
class EvalRequest:
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
    action: Action = Action.EVAL

    def to_message(self) -> dict[str, Any]:
        return {
            "t": "eval",
            "id": self.id,
            "action": self.action.value,
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


_packers = threading.local()


def encode_request(request: EvalRequest) -> bytes:
    """``encode(request.to_message())`` in under half the time (the caller's hot path): the
    message built in one go and a Packer kept per thread (a Packer is not thread-safe, and
    ``packb`` makes one per call). Raises UnicodeEncodeError like ``encode``."""
    packer = getattr(_packers, "packer", None)
    if packer is None:
        packer = _packers.packer = msgpack.Packer(use_bin_type=True)
    body: bytes = packer.pack(
        {
            "t": "eval",
            "id": request.id,
            "action": request.action.value,
            "snippet": request.snippet,
            "filename": request.filename,
            "ext_vars": request.ext_vars,
            "ext_codes": request.ext_codes,
            "tla_vars": request.tla_vars,
            "tla_codes": request.tla_codes,
            "max_stack": request.max_stack,
            "max_trace": request.max_trace,
            "max_output": request.max_output,
        }
    )
    return HEADER.pack(len(body)) + body


def _string_map(payload: dict[str, Any], key: str, request_id: int) -> dict[str, str]:
    value = payload.get(key, {})
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ProtocolViolation(f"field {key!r} must map strings to strings", request_id)
    return value


def _positive_int(payload: dict[str, Any], key: str, request_id: int) -> int:
    value = payload.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ProtocolViolation(f"field {key!r} must be a positive integer", request_id)
    return value


def parse_request(payload: dict[str, Any]) -> EvalRequest:
    """Validate an ``eval`` message; raise ProtocolViolation naming what is wrong."""
    raw_id = payload.get("id")
    request_id = raw_id if isinstance(raw_id, int) and not isinstance(raw_id, bool) else None
    if payload.get("t") != "eval":
        raise ProtocolViolation(f"unknown message type {payload.get('t')!r}", request_id)
    if request_id is None:
        raise ProtocolViolation("missing or non-integer field 'id'")
    snippet, filename = payload.get("snippet"), payload.get("filename", "snippet.jsonnet")
    if not isinstance(snippet, str):
        raise ProtocolViolation("missing or non-string field 'snippet'", request_id)
    if not isinstance(filename, str):
        raise ProtocolViolation("field 'filename' must be a string", request_id)
    try:
        action = Action(payload.get("action", "eval"))
    except ValueError:
        raise ProtocolViolation(f"unknown action {payload.get('action')!r}", request_id) from None
    max_trace = payload.get("max_trace", 20)
    if not isinstance(max_trace, int) or isinstance(max_trace, bool) or max_trace < 0:
        raise ProtocolViolation("field 'max_trace' must be a non-negative integer", request_id)
    return EvalRequest(
        id=request_id,
        snippet=snippet,
        filename=filename,
        ext_vars=_string_map(payload, "ext_vars", request_id),
        ext_codes=_string_map(payload, "ext_codes", request_id),
        tla_vars=_string_map(payload, "tla_vars", request_id),
        tla_codes=_string_map(payload, "tla_codes", request_id),
        max_stack=_positive_int(payload, "max_stack", request_id),
        max_output=_positive_int(payload, "max_output", request_id),
        max_trace=max_trace,
        action=action,
    )


def result_message(request_id: int, json_text: str) -> dict[str, Any]:
    return {"t": "result", "id": request_id, "json": json_text}


def error_message(request_id: int | None, kind: ErrorKind, message: str) -> dict[str, Any]:
    return {"t": "error", "id": request_id, "kind": kind.value, "message": message}
