"""The pool's side of one worker conversation, sans I/O (h11 style: bytes in, events out).

Goals: one place that knows what a worker may say and when, and that believes none of it
unchecked. The supervisor (hello), both call paths (answers), ``doctor``, the host probe, the
tests and the benchmarks all drive this object; none of them parses a worker's frame itself.
A worker whose engine is compromised may send anything at any time, so every way a frame
can be wrong ends the conversation with one ``ConnectionBroken`` event, never an exception.

Plan: the caller feeds whatever its channel read with ``receive_data`` (``b""`` at the end
of the stream) and takes ``next_event()`` until it returns ``NEED_DATA``. The conversation is
a state machine:

    AWAITING_HELLO --Hello--> IDLE --send_request()--> AWAITING_ANSWER --Answer/Failure--> IDLE
          |                                                   |
          +--StartupFailed--> CLOSED    end of stream (any state) --ConnectionClosed--> CLOSED
    any lie (any state) --ConnectionBroken--> BROKEN

Lies that break it: a frame over the cap of its state (the hello's ``max_frame_hello``; an
answer's: what ``max_output`` or an error message can need, plus a small margin); a string,
array or map over the per-container limits msgpack enforces while it decodes; a malformed or
ill-typed hello; any byte while IDLE (nobody asked); an answer with the wrong id or shape;
bytes after the hello or after the answer; a result over ``max_output``, not valid JSON
(``NaN`` included), nested deeper than Python can decode, or of the wrong type for its
action; an error of an unknown kind or with a message over the documented bound. ``BROKEN``
and ``CLOSED`` are final and keep returning their event; the caller retires the worker
(``ProtocolError`` for a broken conversation).

Messages and reasons reach logs, terminals and HTTP bodies: control characters (and the
Unicode bidirectional overrides) in them are escaped (``escape_controls``), so a worker
cannot paint a terminal or forge log lines.

Weak spots: not thread-safe; whoever holds the worker owns its connection. JSON objects with
duplicate keys are accepted (``value`` keeps the last; a worker able to send them can forge
the whole answer anyway). A MemoryError in the parent while decoding is not the worker's
lie and propagates.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Literal

from .._errors import Error
from .._report import SandboxStatus
from .._sandbox.landlock import LandlockStatus, SupportState
from .._wire.layers import EXTRA_LAYERS, LayerState, LayerStatus
from .._wire.protocol import (
    MAX_MESSAGE_CHARS,
    MAX_NOTE_CHARS,
    PROTOCOL_VERSION,
    Action,
    ErrorKind,
    EvalRequest,
    FrameReader,
    FrameTooLarge,
    MalformedFrame,
    UnpackLimits,
    encode,
)

HELLO_MAX_FRAME = 64 * 1024
# Room in an answer frame beyond its one long string: the map, its keys, the id, the kind.
FRAME_MARGIN = 4096
# The longest message a worker may send, in UTF-8 bytes (a character takes at most 4).
MAX_MESSAGE_BYTES = (MAX_MESSAGE_CHARS + MAX_NOTE_CHARS) * 4

# A hello is a map of ~12 keys, a Landlock map and one map per extra layer, short name lists.
_HELLO_LIMITS = dict(max_array_len=64, max_map_len=64)
# An answer is one flat map of a few keys; arrays are room for fields a later worker adds.
_ANSWER_LIMITS = dict(max_array_len=64, max_map_len=16)


class ConnectionState(enum.Enum):
    AWAITING_HELLO = "awaiting hello"
    IDLE = "idle"
    AWAITING_ANSWER = "awaiting answer"
    CLOSED = "closed"  # the stream ended, or the worker said why it could not start
    BROKEN = "broken"  # the worker lied; nothing it sends is read any more


class NeedData(enum.Enum):
    NEED_DATA = "need data"


NEED_DATA: Literal[NeedData.NEED_DATA] = NeedData.NEED_DATA


class ConnectionMisuse(Error, RuntimeError):
    """The pool's own code drove a connection out of turn (a bug, never the worker's doing)."""

    kind = "internal"


@dataclass(frozen=True, slots=True)
class Hello:
    """A worker's validated hello: who it is and what its sandbox achieved."""

    pid: int
    engine: str
    engine_version: str
    python: str
    landlock: LandlockStatus
    self_check: str
    startup_ms: float
    layers: tuple[LayerStatus, ...] = ()  # one per name in _status.EXTRA_LAYERS, in order
    engine_api: str = ""  # e.g. "capi" or "binding: <reason>"; "" if the worker did not say

    def sandbox(self) -> SandboxStatus:
        reported = {layer.name: layer for layer in self.layers}
        names = {f.name for f in dataclasses.fields(SandboxStatus)}
        extra = {
            name: reported.get(name) or LayerStatus.unreported(name)
            for name in EXTRA_LAYERS
            if name in names
        }
        return SandboxStatus(self.landlock, self.self_check, **extra)


@dataclass(frozen=True, slots=True)
class StartupFailed:
    """The worker could not start and said why (it exits next: fail closed)."""

    reason: str


@dataclass(frozen=True, slots=True)
class Answer:
    """A result for the request in flight: its JSON text and that text decoded (for action
    ``fmt`` a str, for ``check`` None). ``retire``: the worker asks to be replaced after
    this answer (it has used over RETIRE_AT_MEMORY_SHARE of its starting memory headroom)."""

    request_id: int
    json_text: str
    value: Any
    retire: bool = False


@dataclass(frozen=True, slots=True)
class Failure:
    """The worker's error for the request in flight. ``request_id`` is None only for a
    ``protocol`` error about a frame the worker could not read. ``retire`` as in
    ``Answer``."""

    request_id: int | None
    kind: ErrorKind
    message: str
    retire: bool = False


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The stream ended. ``state`` is what the connection was waiting for; ``unread`` counts
    the bytes of an incomplete frame it was cut in."""

    state: ConnectionState
    unread: int = 0


@dataclass(frozen=True, slots=True)
class ConnectionBroken:
    """The worker broke the protocol; ``reason`` says how (escaped, bounded)."""

    reason: str


ConnectionEvent = (
    Hello | StartupFailed | Answer | Failure | NeedData | ConnectionClosed | ConnectionBroken
)

_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_controls(text: str) -> str:
    """``text`` with control characters other than newline and tab, and the bidirectional
    overrides, written as ``\\xNN`` / ``\\uNNNN``: safe for a terminal, a log line, a body."""
    return _CONTROL.sub(_escape, text) if _CONTROL.search(text) else text


class _Lie(Exception):
    """Internal: what a frame got wrong; becomes ConnectionBroken."""


class WorkerConnection:
    """One worker's conversation as the pool sees it. See the module docstring."""

    def __init__(self, max_output: int, max_frame_hello: int = HELLO_MAX_FRAME) -> None:
        self.max_output = max_output
        longest = max(max_output, MAX_MESSAGE_BYTES)
        self._answer_max_frame = longest + FRAME_MARGIN
        self._answer_limits = UnpackLimits(max_str_len=longest, **_ANSWER_LIMITS)
        self._reader = FrameReader(
            max_frame_hello, UnpackLimits(max_str_len=max_frame_hello, **_HELLO_LIMITS)
        )
        self._state = ConnectionState.AWAITING_HELLO
        self._ended = False
        self._expected: EvalRequest | None = None
        self._final: ConnectionClosed | ConnectionBroken | None = None
        self.hello: Hello | None = None

    def __repr__(self) -> str:
        return f"<WorkerConnection {self._state.value}>"

    @property
    def state(self) -> ConnectionState:
        return self._state

    @property
    def expected_id(self) -> int | None:
        """The id of the request whose answer is owed, if any."""
        return self._expected.id if self._expected is not None else None

    @property
    def pending(self) -> int:
        """Bytes received that do not make a whole frame yet."""
        return self._reader.pending

    @property
    def answer_max_frame(self) -> int:
        """The largest answer frame this connection accepts."""
        return self._answer_max_frame

    # -- the caller's side -----------------------------------------------------------------

    def send_request(self, request: EvalRequest, *, encoded: bytes | None = None) -> bytes:
        """The frame to write for ``request``; from now on only its answer is accepted.
        ``encoded`` is the request already encoded (``encode(request.to_message())``), for a
        caller that encoded it before it had a worker: it is returned as it is. Raises
        ConnectionMisuse unless IDLE."""
        if self._state is not ConnectionState.IDLE:
            raise ConnectionMisuse(f"cannot send a request while {self._state.value}")
        self._expected = request
        self._state = ConnectionState.AWAITING_ANSWER
        return encoded if encoded is not None else encode(request.to_message())

    def receive_data(self, data: bytes) -> None:
        """Bytes the worker's response channel gave; ``b""`` when it reached end of file."""
        if self._ended:
            if data:
                raise ConnectionMisuse("data received after the end of the stream")
            return
        if not data:
            self._ended = True
            return
        if self._final is not None:
            return  # closed or broken: nothing it says is read
        if self._state is ConnectionState.IDLE:
            self._break(f"{len(data)} bytes from the worker while no request was in flight")
            return
        self._reader.feed(data)

    def next_event(self) -> ConnectionEvent:
        """The next event, or NEED_DATA until more bytes (or the end) arrive. Never raises
        for anything the worker sent."""
        if self._final is not None:
            return self._final
        event = self._reader.next_event()
        if event is None:
            if not self._ended:
                return NEED_DATA
            closed = ConnectionClosed(self._state, self._reader.pending)
            self._finish(ConnectionState.CLOSED, closed)
            return closed
        if isinstance(event, FrameTooLarge):
            return self._break(f"a frame of {event.size} bytes is over the limit of {event.limit}")
        if isinstance(event, MalformedFrame):
            return self._break(f"malformed frame: {event.reason}")
        try:
            if self._state is ConnectionState.AWAITING_HELLO:
                return self._on_hello(event.payload)
            if self._state is ConnectionState.AWAITING_ANSWER:
                return self._on_answer(event.payload)
            raise _Lie(f"a frame while {self._state.value}")
        except _Lie as lie:
            return self._break(str(lie))

    # -- transitions -----------------------------------------------------------------------

    def _break(self, reason: str) -> ConnectionBroken:
        broken = ConnectionBroken(escape_controls(reason[: MAX_MESSAGE_CHARS // 4]))
        self._finish(ConnectionState.BROKEN, broken)
        return broken

    def _finish(self, state: ConnectionState, event: ConnectionClosed | ConnectionBroken) -> None:
        self._state = state
        self._final = event
        self._expected = None
        self._reader = FrameReader(0)  # drop what is buffered; read nothing more

    def _no_trailing_bytes(self, after: str) -> None:
        if self._reader.pending:
            raise _Lie(f"{self._reader.pending} bytes after the {after}")

    def _on_hello(self, payload: dict[str, Any]) -> Hello | StartupFailed:
        kind = payload.get("t")
        if kind == "startup_failed":
            reason = _message(payload, "reason")
            self._finish(ConnectionState.CLOSED, ConnectionClosed(ConnectionState.CLOSED))
            return StartupFailed(reason)
        if kind != "hello":
            raise _Lie(f"sent a message of type {_shown(kind)} instead of its hello")
        hello = _parse_hello(payload)
        self._no_trailing_bytes("hello")
        self.hello = hello
        self._state = ConnectionState.IDLE
        self._reader.max_frame = self._answer_max_frame
        self._reader.limits = self._answer_limits
        return hello

    def _on_answer(self, payload: dict[str, Any]) -> Answer | Failure:
        request = self._expected
        assert request is not None
        kind = payload.get("t")
        if kind == "result":
            answer: Answer | Failure = self._result(payload, request)
        elif kind == "error":
            answer = self._failure(payload, request)
        else:
            raise _Lie(f"sent a message of type {_shown(kind)} instead of an answer")
        self._no_trailing_bytes("answer")
        self._expected = None
        self._state = ConnectionState.IDLE
        return answer

    def _result(self, payload: dict[str, Any], request: EvalRequest) -> Answer:
        _check_id(payload.get("id"), request.id)
        text = payload.get("json")
        if not isinstance(text, str):
            raise _Lie(f"a result whose 'json' is a {type(text).__name__}")
        size = len(text)
        if size > self.max_output or (
            size * 4 > self.max_output and len(text.encode("utf-8")) > self.max_output
        ):
            raise _Lie(f"a result of at least {size} bytes, over max_output {self.max_output}")
        value = _decode_json(text)
        if request.action is Action.CHECK and value is not None:
            raise _Lie(f"the answer to a check is a {type(value).__name__}, not null")
        if request.action is Action.FMT and not isinstance(value, str):
            raise _Lie(f"the answer to a fmt is a {type(value).__name__}, not a string")
        return Answer(request.id, text, value, _retire(payload))

    def _failure(self, payload: dict[str, Any], request: EvalRequest) -> Failure:
        raw_kind = payload.get("kind")
        try:
            kind = ErrorKind(raw_kind)
        except ValueError:
            raise _Lie(f"an error of unknown kind {_shown(raw_kind)}") from None
        request_id = payload.get("id")
        if request_id is None and kind is ErrorKind.PROTOCOL:
            pass  # the worker could not read our frame, so it cannot know its id
        else:
            _check_id(request_id, request.id)
        return Failure(request_id, kind, _message(payload, "message"), _retire(payload))


def _shown(value: object) -> str:
    return escape_controls(repr(value)[:80])


def _check_id(value: object, expected: int) -> None:
    if type(value) is not int or value != expected:
        raise _Lie(f"an answer with id {_shown(value)}, expected {expected}")


def _retire(payload: dict[str, Any]) -> bool:
    value = payload.get("retire", False)
    if type(value) is not bool:
        raise _Lie(f"a 'retire' that is a {type(value).__name__}, not a bool")
    return value


def _message(payload: dict[str, Any], key: str) -> str:
    text = payload.get(key)
    if not isinstance(text, str):
        raise _Lie(f"a {key!r} that is a {type(text).__name__}, not a string")
    if len(text) > MAX_MESSAGE_CHARS + MAX_NOTE_CHARS:
        raise _Lie(f"a {key!r} of {len(text)} characters, over {MAX_MESSAGE_CHARS} + a note")
    return escape_controls(text)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# One decoder for every answer: json.loads with an option builds a new one per call.
_JSON = json.JSONDecoder(parse_constant=_refuse_constant)


# Results may nest this deep and no deeper, on every Python: 3.11's decoder stops near 990
# levels, 3.13's goes much further, and a caller's own code (json.dumps, a recursive walk)
# must not be the first to meet a depth the worker chose. Legitimate results are far below
# it: with max_stack=500 both engines manifest about 400 levels and refuse 1,200.
MAX_RESULT_DEPTH = 900
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_BRACKET = re.compile(r"[\[\]{}]")


def _too_deep(text: str) -> bool:
    """Whether ``text`` nests containers deeper than MAX_RESULT_DEPTH. Counting brackets is
    a C-speed pre-check; the exact walk (over brackets only, strings cut out) runs only for
    results with that many brackets at all."""
    if text.count("[") + text.count("{") <= MAX_RESULT_DEPTH:
        return False
    depth = 0
    for bracket in _BRACKET.findall(_STRING.sub("", text)):
        depth += 1 if bracket in "[{" else -1
        if depth > MAX_RESULT_DEPTH:
            return True
    return False


def _decode_json(text: str) -> Any:
    if _too_deep(text):
        raise _Lie(f"a result nested deeper than {MAX_RESULT_DEPTH} levels")
    try:
        return _JSON.decode(text)
    except RecursionError:
        raise _Lie("a result nested deeper than the parent can decode") from None
    except ValueError as exc:  # JSONDecodeError, and NaN/Infinity refused above
        raise _Lie(f"a result that is not valid JSON ({str(exc)[:200]})") from None


# -- the hello -------------------------------------------------------------------------------


def _field(data: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = data.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _types(kind)):
        raise _Lie(f"{where} field {key!r} is {_shown(value)}")
    return value


def _types(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _optional(data: dict[str, Any], key: str, kind: type, default: Any, where: str) -> Any:
    return _field(data, key, kind, where) if key in data else default


def _text(data: dict[str, Any], key: str, where: str, default: str | None = None) -> str:
    if default is not None and key not in data:
        return default
    return escape_controls(_field(data, key, str, where))


def _count(data: dict[str, Any], key: str, where: str) -> int:
    value = _optional(data, key, int, 0, where)
    if value < 0:
        raise _Lie(f"{where} field {key!r} is negative")
    return int(value)


def _names(data: dict[str, Any], key: str, where: str) -> tuple[str, ...]:
    items = _optional(data, key, list, [], where)
    if not all(isinstance(item, str) for item in items):
        raise _Lie(f"{where} field {key!r} holds a non-string")
    return tuple(escape_controls(item) for item in items)


def _parse_landlock(data: object) -> LandlockStatus:
    if not isinstance(data, dict):
        raise _Lie(f"hello field 'sandbox' is {_shown(data)}")
    where = "sandbox"
    try:
        state = SupportState(_field(data, "state", str, where))
    except ValueError:
        raise _Lie(f"sandbox field 'state' is {_shown(data.get('state'))}") from None
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


def _parse_layer(name: str, data: object) -> LayerStatus:
    if data is None:
        return LayerStatus.unreported(name)
    where = f"layer {name!r}"
    if not isinstance(data, dict):
        raise _Lie(f"{where} is {_shown(data)}")
    try:
        state = LayerState(_field(data, "state", str, where))
    except ValueError:
        raise _Lie(f"{where} field 'state' is {_shown(data.get('state'))}") from None
    detail = _text(data, "detail", where, default="")
    return LayerStatus(name, state, detail, _text(data, "reason", where, default=""))


def _parse_hello(payload: dict[str, Any]) -> Hello:
    """A ``hello`` message as a Hello; raises _Lie naming the first field that is wrong."""
    where = "hello"
    protocol = payload.get("protocol")
    if type(protocol) is not int or protocol != PROTOCOL_VERSION:
        raise _Lie(f"speaks protocol {_shown(protocol)}, not {PROTOCOL_VERSION}")
    pid = _field(payload, "pid", int, where)
    if pid <= 0:
        raise _Lie(f"hello field 'pid' is {pid}")
    startup_ms = _field(payload, "startup_ms", (int, float), where)
    if not math.isfinite(startup_ms) or startup_ms < 0:
        raise _Lie(f"hello field 'startup_ms' is {startup_ms!r}")
    layers = _optional(payload, "layers", dict, {}, where)
    return Hello(
        pid=pid,
        engine=_text(payload, "engine", where),
        engine_version=_text(payload, "engine_version", where),
        python=_text(payload, "python", where),
        landlock=_parse_landlock(payload.get("sandbox")),
        self_check=_text(payload, "self_check", where),
        startup_ms=float(startup_ms),
        layers=tuple(_parse_layer(name, layers.get(name)) for name in EXTRA_LAYERS),
        engine_api=_text(payload, "engine_api", where, default=""),
    )
