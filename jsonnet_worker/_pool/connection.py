"""The pool's side of one worker conversation, sans I/O (h11 style: bytes in, events out).

Goals: one place that knows what a worker may say and when, and that believes none of it
unchecked. The supervisor (hello), both call paths (answers), ``doctor``, the host probe, the
tests and the benchmarks all drive this object; none of them parses a worker's frame itself.
What each message may hold is checked by its parser in ``_wire.messages``; what depends on the
conversation (the state, the id owed, the result against its request) is checked here. A
worker whose engine is compromised may send anything at any time, so every way a frame can be
wrong ends the conversation with one ``ConnectionBroken`` event, never an exception.

Plan: the caller feeds whatever its channel read with ``receive_data`` (``b""`` at the end
of the stream) and takes ``next_event()`` until it returns ``NEED_DATA``. The conversation is
a state machine:

    AWAITING_HELLO --WorkerHello--> IDLE --send_request()--> AWAITING_ANSWER
          |                          ^                               |
          |                          +------ Answer / Failure -------+
          +--StartupFailure--> CLOSED   end of stream (any state) --ConnectionClosed--> CLOSED
    any lie (any state) --ConnectionBroken--> BROKEN

Lies that break it: a frame over the cap of its state (the hello's ``max_frame_hello``; an
answer's: what its request's ``max_output`` or an error message can need, plus a small
margin: a call's own ``max_output`` sets its answer's cap); a string,
array or map over the per-container limits msgpack enforces while it decodes; a malformed or
ill-typed hello; any byte while IDLE (nobody asked); an answer with the wrong id or shape;
bytes after the hello or after the answer; a result over its request's ``max_output``, not
valid JSON (``NaN`` included), nested deeper than Python can decode, or of the wrong type for its
operation; an error of an unknown kind or with a message over the documented bound. ``BROKEN``
and ``CLOSED`` are final and keep returning their event; the caller retires the worker
(``ProtocolError`` for a broken conversation).

Messages and reasons reach logs, terminals and HTTP bodies: control characters (and the
Unicode bidirectional overrides) in them are escaped (``messages.escape_controls``, by every
parse, and here for the reason a conversation broke), so a worker cannot paint a terminal or
forge log lines. ``sandbox_status`` is the one reading of a hello (a worker's or a fork
server's) into the pool's ``SandboxStatus``.

Weak spots: not thread-safe; whoever holds the worker owns its connection. JSON objects with
duplicate keys are accepted (``value`` keeps the last; a worker able to send them can forge
the whole answer anyway). A MemoryError in the parent while decoding is not the worker's
lie and propagates.
"""

from __future__ import annotations

import enum
import json
import re
from typing import Any, Literal

from .._errors import Error
from .._library import MAX_LIBRARY_BYTES, Library
from .._report import SandboxStatus
from .._wire.framing import (
    DEFAULT_MAX_FRAME,
    FrameReader,
    FrameTooLarge,
    MalformedFrame,
    ProtocolViolation,
    UnpackLimits,
)
from .._wire.layers import LayerStatus
from .._wire.messages import (
    MAX_MESSAGE_CHARS,
    MAX_NOTE_CHARS,
    EvalRequest,
    ForkServerHello,
    Operation,
    Result,
    StartupFailure,
    WorkerHello,
    escape_controls,
    read_answer,
    read_greeting,
    shown,
)
from .._wire.messages import Failure as Failure
from .._wire.values import valueclass

HELLO_MAX_FRAME = 64 * 1024
# The library bytes one worker holds at most: a set that would go over replaces the others
# (its frame says so), so a tenant that rotates sets costs a resend, never unbounded memory.
MAX_HELD_LIBRARY_BYTES = 2 * MAX_LIBRARY_BYTES
# And the sets one worker holds at most, under the worker's own backstop (its engine drops
# every set it holds at 64, ``_worker.engines.MAX_HELD_LIBRARIES``): the pool replaces first,
# so a set it believes held is held, however many small sets a tenant rotates through.
MAX_HELD_LIBRARY_SETS = 32
# Room in an answer frame beyond its one long string: the map, its keys, the id, the kind.
FRAME_MARGIN = 4096
# The longest message a worker may send, in UTF-8 bytes (a character takes at most 4).
MAX_MESSAGE_BYTES = (MAX_MESSAGE_CHARS + MAX_NOTE_CHARS) * 4
# The largest max_output one call may ask for beyond its pool's: its answer frame then stays
# within the wire format's frame limit (what a request may be, and what the worker reads),
# and one caller's keyword cannot make the parent buffer an answer of any size (it holds an
# answer about three times: the frame, the text, the decoded value).
MAX_CALL_OUTPUT = DEFAULT_MAX_FRAME - FRAME_MARGIN

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


def sandbox_status(
    hello: WorkerHello | ForkServerHello, tasks: LayerStatus | None = None
) -> SandboxStatus:
    """What a worker's or a fork server's hello says of its sandbox: the one reading of a
    hello's layers (``messages`` parsed one per ``EXTRA_LAYERS`` name, a missing one as
    unreported). ``tasks``: how the pool bounds each worker's tasks (``tasklimit``), which no
    hello can tell (None: one worker's status, outside a pool)."""
    layers: dict[str, LayerStatus] = {layer.name: layer for layer in hello.layers}

    def layer(name: str) -> LayerStatus:
        return layers.get(name) or LayerStatus.unreported(name)

    return SandboxStatus(
        hello.landlock,
        hello.self_check,
        limits=layer("limits"),
        privileges=layer("privileges"),
        seccomp=layer("seccomp"),
        uid=layer("uid"),
        ipc_namespace=layer("ipc_namespace"),
        tasks=tasks,
    )


@valueclass(slots=True)
class Answer:
    """A ``Result`` for the request in flight: its JSON text and that text decoded (for
    operation ``fmt`` a str, for ``check`` None). ``retire``: the worker asks to be replaced after
    this answer (it has used over RETIRE_AT_MEMORY_SHARE of its starting memory headroom)."""

    request_id: int
    json_text: str
    value: Any
    retire: bool = False


@valueclass(slots=True)
class ConnectionClosed:
    """The stream ended. ``state`` is what the connection was waiting for; ``unread`` counts
    the bytes of an incomplete frame it was cut in."""

    state: ConnectionState
    unread: int = 0


@valueclass(slots=True)
class ConnectionBroken:
    """The worker broke the protocol; ``reason`` says how (escaped, bounded)."""

    reason: str


# A worker's hello and start-up failure and its error answers are the messages themselves;
# an answer's result is decoded here, against the request it answers.
ConnectionEvent = (
    WorkerHello | StartupFailure | Answer | Failure | NeedData | ConnectionClosed | ConnectionBroken
)


class WorkerConnection:
    """One worker's conversation as the pool sees it. See the module docstring."""

    def __init__(self, max_output: int, max_frame_hello: int = HELLO_MAX_FRAME) -> None:
        # The pool's max_output: the answer cap of a request that carries the same (most
        # do; another one's cap is made when it is sent).
        self.max_output = max_output
        self._answer_max_frame, self._answer_limits = _answer_cap(max_output)
        # The max_output whose answer cap the reader holds (None: the hello's). It is set
        # only when it changes: setting a FrameReader's limits builds its unpack options.
        self._reader_cap: int | None = None
        self._reader = FrameReader(
            max_frame_hello, UnpackLimits(max_str_len=max_frame_hello, **_HELLO_LIMITS)
        )
        self._state = ConnectionState.AWAITING_HELLO
        self._ended = False
        self._expected: EvalRequest | None = None
        self._final: ConnectionClosed | ConnectionBroken | None = None
        self.hello: WorkerHello | None = None
        # The digests of the library sets the worker was sent (it keeps them all, until a
        # set comes with ``replace``), and their bytes.
        self.held: set[str] = set()
        self._held_bytes = 0

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

    def send_request(
        self,
        request: EvalRequest,
        *,
        encoded: bytes | None = None,
        library: Library | None = None,
    ) -> bytes:
        """The bytes to write for ``request``; from now on only its answer is accepted.
        ``encoded`` is the request already encoded (``request.encode()``), for a
        caller that encoded it before it had a worker: it is returned as it is, after the
        ``library`` set's frame if this worker does not hold that set yet (``held``). Raises
        ConnectionMisuse unless IDLE."""
        if self._state is not ConnectionState.IDLE:
            raise ConnectionMisuse(f"cannot send a request while {self._state.value}")
        prefix = b"" if library is None else self._library_frame(library)
        self._expected = request
        self._state = ConnectionState.AWAITING_ANSWER
        cap = request.max_output
        if cap != self._reader_cap:
            reader = self._reader
            if cap == self.max_output:
                reader.max_frame, reader.limits = self._answer_max_frame, self._answer_limits
            else:  # a call's own max_output: its answer's cap is its own
                reader.max_frame, reader.limits = _answer_cap(cap)
            self._reader_cap = cap
        frame = encoded if encoded is not None else request.encode()
        return prefix + frame if prefix else frame

    def _library_frame(self, library: Library) -> bytes:
        """The set's frame if the worker does not hold it yet, else b"". A worker keeps what
        it is sent; past ``MAX_HELD_LIBRARY_BYTES`` or ``MAX_HELD_LIBRARY_SETS`` the new set
        replaces all it held."""
        if library.digest in self.held:
            return b""
        replace = (
            self._held_bytes + library.size > MAX_HELD_LIBRARY_BYTES
            or len(self.held) >= MAX_HELD_LIBRARY_SETS
        )
        if replace:
            self.held.clear()
            self._held_bytes = 0
        self.held.add(library.digest)
        self._held_bytes += library.size
        return library.frame(replace)

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
            raise ProtocolViolation(f"a frame while {self._state.value}")
        except ProtocolViolation as lie:
            return self._break(lie.reason)

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
            raise ProtocolViolation(f"{self._reader.pending} bytes after the {after}")

    def _on_hello(self, payload: dict[str, Any]) -> WorkerHello | StartupFailure:
        greeting = read_greeting(payload, WorkerHello)
        if isinstance(greeting, StartupFailure):
            self._finish(ConnectionState.CLOSED, ConnectionClosed(ConnectionState.CLOSED))
            return greeting
        self._no_trailing_bytes("hello")
        self.hello = greeting
        self._state = ConnectionState.IDLE
        return greeting

    def _on_answer(self, payload: dict[str, Any]) -> Answer | Failure:
        request = self._expected
        assert request is not None
        message = read_answer(payload)
        if message.request_id != request.id and not (
            # A worker that could not read our frame cannot know its id.
            isinstance(message, Failure) and message.request_id is None
        ):
            raise ProtocolViolation(
                f"an answer with id {shown(message.request_id)}, expected {request.id}"
            )
        answer = self._result(message, request) if isinstance(message, Result) else message
        self._no_trailing_bytes("answer")
        self._expected = None
        self._state = ConnectionState.IDLE
        return answer

    def _result(self, result: Result, request: EvalRequest) -> Answer:
        text = result.json_text
        size = len(text)
        limit = request.max_output
        if size > limit or (size * 4 > limit and len(text.encode("utf-8")) > limit):
            raise ProtocolViolation(f"a result of at least {size} bytes, over max_output {limit}")
        value = _decode_json(text)
        if request.operation is Operation.CHECK and value is not None:
            raise ProtocolViolation(f"the answer to a check is a {type(value).__name__}, not null")
        if request.operation is Operation.FMT and not isinstance(value, str):
            raise ProtocolViolation(
                f"the answer to a fmt is a {type(value).__name__}, not a string"
            )
        return Answer(request.id, text, value, result.retire)


def _answer_cap(max_output: int) -> tuple[int, UnpackLimits]:
    """The largest answer frame to a request with ``max_output``, and the limits msgpack
    decodes it with: room for the result or the longest error message, and the margin."""
    longest = max(max_output, MAX_MESSAGE_BYTES)
    return longest + FRAME_MARGIN, UnpackLimits(max_str_len=longest, **_ANSWER_LIMITS)


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
        raise ProtocolViolation(f"a result nested deeper than {MAX_RESULT_DEPTH} levels")
    try:
        return _JSON.decode(text)
    except RecursionError:
        raise ProtocolViolation("a result nested deeper than the parent can decode") from None
    except ValueError as exc:  # JSONDecodeError, and NaN/Infinity refused above
        raise ProtocolViolation(f"a result that is not valid JSON ({str(exc)[:200]})") from None
