"""The worker conversation, sans I/O: every state and event of ``WorkerConnection``, and what
a lying worker can send (nothing it sends raises; every lie is one ``ConnectionBroken``)."""

from __future__ import annotations

import copy
import json
import struct
import sys
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import seams
from jsonnet_worker._errors import WorkerStartError
from jsonnet_worker._pool.connection import (
    FRAME_MARGIN,
    MAX_MESSAGE_BYTES,
    MAX_RESULT_DEPTH,
    NEED_DATA,
    Answer,
    ConnectionBroken,
    ConnectionClosed,
    ConnectionEvent,
    ConnectionMisuse,
    ConnectionState,
    Failure,
    NeedData,
    WorkerConnection,
    sandbox_status,
)
from jsonnet_worker._pool.launch import launch_and_greet
from jsonnet_worker._pool.processes import WorkerSettings
from jsonnet_worker._report import SandboxStatus
from jsonnet_worker._sandbox.landlock import SupportState
from jsonnet_worker._wire.framing import DEFAULT_MAX_FRAME, encode
from jsonnet_worker._wire.layers import EXTRA_LAYERS, LayerState
from jsonnet_worker._wire.messages import (
    MAX_MESSAGE_CHARS,
    ErrorKind,
    EvalRequest,
    Operation,
    StartupFailure,
    WorkerHello,
    escape_controls,
)

MAX_OUTPUT = 1000
IDLE = ConnectionState.IDLE
EVENT_TYPES = (
    WorkerHello,
    StartupFailure,
    Answer,
    Failure,
    NeedData,
    ConnectionClosed,
    ConnectionBroken,
)

HELLO: dict[str, Any] = {
    "t": "hello",
    "protocol": 1,
    "pid": 4242,
    "engine": "go",
    "engine_version": "v0.22.0",
    "python": "3.11.7",
    "sandbox": {
        "enforced": True,
        "state": "available",
        "abi": 7,
        "errata": 3,
        "handled_fs": ["EXECUTE", "WRITE_FILE"],
        "handled_net": ["BIND_TCP"],
        "scoped": ["SIGNAL"],
        "restrict_flags": [],
        "dropped": [],
        "reason": "",
    },
    "layers": {
        "limits": {"state": "active", "detail": "RLIMIT_NPROC 1", "reason": ""},
        "privileges": {"state": "missing", "detail": "", "reason": "not root"},
        "seccomp": {"state": "active", "detail": "42 syscalls refused", "reason": ""},
    },
    "self_check": "refused: open('/usr/bin/python3') -> Permission denied (errno 13)",
    "startup_ms": 12.5,
}


def hello_frame(**changes: Any) -> bytes:
    payload = copy.deepcopy(HELLO)
    payload.update(changes)
    return encode(payload)


def greeted(max_output: int = MAX_OUTPUT) -> WorkerConnection:
    connection = WorkerConnection(max_output)
    connection.receive_data(hello_frame())
    assert isinstance(connection.next_event(), WorkerHello)
    return connection


def in_flight(
    request_id: int = 1, operation: Operation = Operation.EVAL, max_output: int = MAX_OUTPUT
) -> WorkerConnection:
    connection = greeted(max_output)
    # As the pool sends it: the request carries the max_output its answer is held to.
    request = EvalRequest(request_id, "{}", operation=operation, max_output=max_output)
    connection.send_request(request)
    return connection


def result(request_id: Any = 1, json_text: Any = '{"a": 1}', **extra: Any) -> bytes:
    return encode({"t": "result", "id": request_id, "json": json_text, **extra})


def error(request_id: Any = 1, kind: Any = "jsonnet", message: Any = "boom", **extra: Any) -> bytes:
    return encode({"t": "error", "id": request_id, "kind": kind, "message": message, **extra})


def events(connection: WorkerConnection) -> list[ConnectionEvent]:
    """Every event up to NEED_DATA (excluded) or a final event (included)."""
    found: list[ConnectionEvent] = []
    for _ in range(1000):
        event = connection.next_event()
        if event is NEED_DATA:
            return found
        found.append(event)
        if isinstance(event, ConnectionClosed | ConnectionBroken | StartupFailure):
            return found
    raise AssertionError("next_event() never asked for data")


def state(connection: WorkerConnection) -> ConnectionState:
    """The state now (mypy would keep an earlier ``connection.state`` narrowed)."""
    return connection.state


def broken(connection: WorkerConnection, *fragments: str) -> None:
    event = connection.next_event()
    assert isinstance(event, ConnectionBroken), event
    for fragment in fragments:
        assert fragment in event.reason, event.reason
    assert state(connection) is ConnectionState.BROKEN
    assert connection.next_event() == event  # final: the same event again


# -- the hello --------------------------------------------------------------------------------


def test_a_valid_hello_is_parsed_into_typed_fields() -> None:
    connection = WorkerConnection(MAX_OUTPUT)
    assert state(connection) is ConnectionState.AWAITING_HELLO
    assert connection.next_event() is NEED_DATA
    connection.receive_data(hello_frame(engine_api="capi"))
    hello = connection.next_event()
    assert isinstance(hello, WorkerHello)
    assert connection.hello == hello
    assert (hello.pid, hello.engine, hello.engine_version, hello.python) == (
        4242,
        "go",
        "v0.22.0",
        "3.11.7",
    )
    assert hello.startup_ms == 12.5 and hello.engine_api == "capi"
    assert hello.landlock.enforced and hello.landlock.state is SupportState.AVAILABLE
    assert hello.landlock.abi == 7 and hello.landlock.errata == 3
    assert hello.landlock.handled_fs == ("EXECUTE", "WRITE_FILE")
    assert [layer.name for layer in hello.layers] == list(EXTRA_LAYERS)
    layers = {layer.name: layer for layer in hello.layers}
    assert layers["limits"].state is LayerState.ACTIVE and layers["limits"].detail
    assert layers["privileges"].state is LayerState.MISSING and layers["privileges"].reason
    # A layer the hello leaves out is missing, never taken as active.
    assert layers["ipc_namespace"].state is LayerState.MISSING
    assert state(connection) is ConnectionState.IDLE
    assert connection.next_event() is NEED_DATA


def test_hello_sandbox_gives_the_status_the_pool_reports() -> None:
    connection = WorkerConnection(MAX_OUTPUT)
    connection.receive_data(hello_frame())
    hello = connection.next_event()
    assert isinstance(hello, WorkerHello)
    sandbox = sandbox_status(hello)
    assert isinstance(sandbox, SandboxStatus)
    assert sandbox.enforced and sandbox.self_check.startswith("refused")
    assert [layer.name for layer in sandbox.missing] == ["privileges"]
    assert sandbox.privileges.reason == "not root"


def test_missing_optional_hello_fields_take_their_defaults() -> None:
    payload = copy.deepcopy(HELLO)
    del payload["layers"]
    for key in ("abi", "errata", "handled_fs", "reason"):
        del payload["sandbox"][key]
    connection = WorkerConnection(MAX_OUTPUT)
    connection.receive_data(encode(payload))
    hello = connection.next_event()
    assert isinstance(hello, WorkerHello)
    assert hello.engine_api == "" and hello.landlock.abi == 0 and hello.landlock.handled_fs == ()
    assert all(layer.reason == "not reported by the worker" for layer in hello.layers)


def test_a_hello_dribbled_one_byte_at_a_time_arrives_once() -> None:
    connection = WorkerConnection(MAX_OUTPUT)
    data = hello_frame()
    for byte in data[:-1]:
        connection.receive_data(bytes([byte]))
        assert connection.next_event() is NEED_DATA
    assert connection.pending == len(data) - 1
    connection.receive_data(data[-1:])
    assert isinstance(connection.next_event(), WorkerHello)
    assert connection.pending == 0


HOSTILE_HELLOS: list[tuple[str, dict[str, Any]]] = [
    ("protocol", {"protocol": 2}),
    ("protocol", {"protocol": True}),
    ("protocol", {"protocol": "1"}),
    ("protocol", {"protocol": None}),
    ("pid", {"pid": "4242"}),
    ("pid", {"pid": 0}),
    ("pid", {"pid": -1}),
    ("pid", {"pid": True}),
    ("pid", {"pid": 4242.0}),
    ("engine", {"engine": 1}),
    ("engine", {"engine": None}),
    ("engine_version", {"engine_version": ["v"]}),
    ("python", {"python": {"v": 3}}),
    ("max_bin_len", {"self_check": b"refused"}),
    ("self_check", {"self_check": 1.5}),
    ("startup_ms", {"startup_ms": "12"}),
    ("startup_ms", {"startup_ms": True}),
    ("startup_ms", {"startup_ms": float("nan")}),
    ("startup_ms", {"startup_ms": float("inf")}),
    ("startup_ms", {"startup_ms": -1}),
    ("sandbox", {"sandbox": None}),
    ("sandbox", {"sandbox": "enforced"}),
    ("enforced", {"sandbox": {"enforced": 1, "state": "available"}}),
    ("enforced", {"sandbox": {"state": "available"}}),
    ("state", {"sandbox": {"enforced": True, "state": "enforced, honest"}}),
    ("state", {"sandbox": {"enforced": True, "state": 1}}),
    ("abi", {"sandbox": {"enforced": True, "state": "available", "abi": "7"}}),
    ("abi", {"sandbox": {"enforced": True, "state": "available", "abi": -7}}),
    ("handled_fs", {"sandbox": {"enforced": True, "state": "available", "handled_fs": "ab"}}),
    ("handled_fs", {"sandbox": {"enforced": True, "state": "available", "handled_fs": [1]}}),
    ("reason", {"sandbox": {"enforced": False, "state": "not built in", "reason": 0}}),
    ("layers", {"layers": ["limits"]}),
    ("'seccomp'", {"layers": {"seccomp": "active"}}),
    ("'seccomp'", {"layers": {"seccomp": {"state": "on"}}}),
    ("'seccomp'", {"layers": {"seccomp": {"state": "active", "detail": 5}}}),
    ("engine_api", {"engine_api": 1}),
]


@pytest.mark.parametrize(("named", "changes"), HOSTILE_HELLOS)
def test_a_hostile_hello_breaks_the_connection_and_names_the_field(
    named: str, changes: dict[str, Any]
) -> None:
    connection = WorkerConnection(MAX_OUTPUT)
    connection.receive_data(hello_frame(**changes))
    broken(connection, named)
    assert connection.hello is None


def test_a_hello_whose_fields_are_missing_breaks_the_connection() -> None:
    for key in ("protocol", "pid", "engine", "engine_version", "python", "sandbox"):
        payload = copy.deepcopy(HELLO)
        del payload[key]
        connection = WorkerConnection(MAX_OUTPUT)
        connection.receive_data(encode(payload))
        broken(connection)


def test_control_characters_in_hello_texts_are_escaped() -> None:
    connection = WorkerConnection(MAX_OUTPUT)
    connection.receive_data(hello_frame(engine_version="v1\x1b[2J\r", self_check="ok\u202eevil"))
    hello = connection.next_event()
    assert isinstance(hello, WorkerHello)
    assert hello.engine_version == "v1\\x1b[2J\\x0d"
    assert hello.self_check == "ok\\u202eevil"


def test_startup_failed_gives_the_reason_then_the_stream_is_closed() -> None:
    connection = WorkerConnection(MAX_OUTPUT)
    connection.receive_data(encode({"t": "startup_failed", "reason": "no memfd\x07"}))
    assert connection.next_event() == StartupFailure("no memfd\\x07")
    assert state(connection) is ConnectionState.CLOSED
    connection.receive_data(hello_frame())  # a worker that goes on is not read
    assert isinstance(connection.next_event(), ConnectionClosed)
    assert connection.hello is None


def test_a_startup_failed_without_a_string_reason_breaks_the_connection() -> None:
    connection = WorkerConnection(MAX_OUTPUT)
    connection.receive_data(encode({"t": "startup_failed", "reason": ["x"]}))
    broken(connection, "reason")


def test_an_answer_before_the_hello_breaks_the_connection() -> None:
    connection = WorkerConnection(MAX_OUTPUT)
    connection.receive_data(result())
    broken(connection, "instead of its hello")


def test_an_oversized_hello_frame_breaks_at_its_header() -> None:
    connection = WorkerConnection(MAX_OUTPUT, max_frame_hello=1024)
    connection.receive_data(struct.pack(">I", 1025))
    broken(connection, "1025 bytes", "limit of 1024")


def test_a_hello_fills_its_frame_cap_and_not_more() -> None:
    connection = WorkerConnection(MAX_OUTPUT, max_frame_hello=1024)
    connection.receive_data(hello_frame(self_check="x" * 500))
    assert isinstance(connection.next_event(), WorkerHello)
    connection = WorkerConnection(MAX_OUTPUT, max_frame_hello=1024)
    connection.receive_data(hello_frame(self_check="x" * 1000))
    broken(connection, "limit of 1024")


def test_a_hello_of_many_tiny_keys_breaks_the_connection() -> None:
    connection = WorkerConnection(MAX_OUTPUT)
    connection.receive_data(hello_frame(layers={str(i): {} for i in range(100)}))
    broken(connection, "malformed frame", "max_map_len")


def test_bytes_after_the_hello_break_the_connection() -> None:
    connection = WorkerConnection(MAX_OUTPUT)
    connection.receive_data(hello_frame() + b"\0")
    broken(connection, "1 bytes after the hello")


def test_the_end_of_the_stream_before_the_hello_is_closed_with_what_was_unread() -> None:
    connection = WorkerConnection(MAX_OUTPUT)
    connection.receive_data(hello_frame()[:10])
    connection.receive_data(b"")
    assert connection.next_event() == ConnectionClosed(ConnectionState.AWAITING_HELLO, 10)
    assert state(connection) is ConnectionState.CLOSED
    assert connection.next_event() == ConnectionClosed(ConnectionState.AWAITING_HELLO, 10)
    connection.receive_data(b"")  # more ends are harmless; more data is the caller's bug
    with pytest.raises(ConnectionMisuse):
        connection.receive_data(b"x")


def test_a_whole_hello_then_the_end_of_the_stream_gives_both() -> None:
    connection = WorkerConnection(MAX_OUTPUT)
    connection.receive_data(hello_frame())
    connection.receive_data(b"")
    assert isinstance(connection.next_event(), WorkerHello)
    assert connection.next_event() == ConnectionClosed(ConnectionState.IDLE, 0)


# -- requests and answers ---------------------------------------------------------------------


def test_send_request_gives_the_frame_and_expects_its_id() -> None:
    connection = greeted()
    request = EvalRequest(7, "1 + 1", max_output=MAX_OUTPUT)
    frame = connection.send_request(request)
    assert EvalRequest.from_message(msgpack.unpackb(frame[4:])) == request
    assert state(connection) is ConnectionState.AWAITING_ANSWER
    assert connection.expected_id == 7
    assert connection.next_event() is NEED_DATA
    connection.receive_data(result(7, "2"))
    assert connection.next_event() == Answer(7, "2", 2)
    assert state(connection) is ConnectionState.IDLE and connection.expected_id is None


def test_send_request_uses_a_frame_encoded_beforehand() -> None:
    connection = greeted()
    request = EvalRequest(3, "1")
    frame = encode(request.to_message())
    assert connection.send_request(request, encoded=frame) is frame
    assert connection.expected_id == 3


def test_send_request_out_of_turn_raises() -> None:
    connection = WorkerConnection(MAX_OUTPUT)
    with pytest.raises(ConnectionMisuse, match="awaiting hello"):
        connection.send_request(EvalRequest(1, "1"))
    connection = in_flight()
    with pytest.raises(ConnectionMisuse, match="awaiting answer"):
        connection.send_request(EvalRequest(2, "1"))
    connection.receive_data(struct.pack(">I", 1 << 30))
    broken(connection)
    with pytest.raises(ConnectionMisuse, match="broken"):
        connection.send_request(EvalRequest(2, "1"))


def test_many_calls_in_turn() -> None:
    connection = greeted()
    for request_id in range(1, 50):
        connection.send_request(EvalRequest(request_id, "x"))
        connection.receive_data(result(request_id, json.dumps([request_id])))
        assert connection.next_event() == Answer(request_id, f"[{request_id}]", [request_id])


def test_an_answer_dribbled_one_byte_at_a_time_arrives_once() -> None:
    connection = in_flight()
    data = result(1, '{"a": [1, 2, "three"]}')
    for byte in data[:-1]:
        connection.receive_data(bytes([byte]))
        assert connection.next_event() is NEED_DATA
    connection.receive_data(data[-1:])
    event = connection.next_event()
    assert isinstance(event, Answer) and event.value == {"a": [1, 2, "three"]}


@pytest.mark.parametrize("wrong", [2, 0, -1, None, True, 1.0, "1", [1]])
def test_an_answer_with_the_wrong_id_breaks_the_connection(wrong: Any) -> None:
    connection = in_flight(request_id=1)
    connection.receive_data(result(wrong))
    broken(connection, "with id")  # the id named


@pytest.mark.parametrize("wrong", [2, True, "1", 1.0])
def test_an_error_with_the_wrong_id_breaks_the_connection(wrong: Any) -> None:
    connection = in_flight(request_id=1)
    connection.receive_data(error(wrong))
    broken(connection, "with id")  # the id named


def test_an_error_for_a_frame_the_worker_could_not_read_needs_no_id() -> None:
    connection = in_flight(request_id=1)
    connection.receive_data(error(None, "protocol", "invalid msgpack"))
    assert connection.next_event() == Failure(None, ErrorKind.PROTOCOL, "invalid msgpack")
    connection = in_flight(request_id=1)
    connection.receive_data(error(None, "jsonnet", "forged"))
    broken(connection, "with id")  # the id named


@pytest.mark.parametrize("kind", list(ErrorKind))
def test_every_error_kind_is_a_failure(kind: ErrorKind) -> None:
    connection = in_flight()
    connection.receive_data(error(1, kind.value, "what went wrong"))
    assert connection.next_event() == Failure(1, kind, "what went wrong")
    assert state(connection) is ConnectionState.IDLE


def test_a_worker_may_ask_to_be_retired_after_a_result_or_an_error() -> None:
    connection = in_flight()
    connection.receive_data(result(1, "2", retire=True))
    assert connection.next_event() == Answer(1, "2", 2, retire=True)
    connection = in_flight()
    connection.receive_data(error(1, retire=True))
    assert connection.next_event() == Failure(1, ErrorKind.JSONNET, "boom", retire=True)
    connection = in_flight()
    connection.receive_data(result(1, "2", retire=False))
    assert connection.next_event() == Answer(1, "2", 2)


@pytest.mark.parametrize("value", [1, 0, "yes", None, [True]])
def test_a_retire_that_is_not_a_bool_breaks_the_connection(value: Any) -> None:
    connection = in_flight()
    connection.receive_data(result(1, "2", retire=value))
    broken(connection, "'retire'")


@pytest.mark.parametrize("kind", ["timeout", "", None, 1, "JSONNET"])
def test_an_error_of_an_unknown_kind_breaks_the_connection(kind: Any) -> None:
    connection = in_flight()
    connection.receive_data(error(1, kind))
    broken(connection, "unknown kind")


def test_an_error_message_over_the_documented_bound_breaks_the_connection() -> None:
    truncated = "x" * MAX_MESSAGE_CHARS + "... (99999 more characters truncated)"
    connection = in_flight()
    connection.receive_data(error(1, "jsonnet", truncated))
    assert connection.next_event() == Failure(1, ErrorKind.JSONNET, truncated)
    connection = in_flight()
    connection.receive_data(error(1, "jsonnet", "x" * (MAX_MESSAGE_CHARS + 100)))
    broken(connection, "characters")


@pytest.mark.parametrize(
    ("message", "named"),
    [(None, "'message'"), (5, "'message'"), (["x"], "'message'"), (b"bytes", "max_bin_len")],
)
def test_an_error_message_that_is_not_a_string_breaks_the_connection(
    message: Any, named: str
) -> None:
    connection = in_flight()
    connection.receive_data(error(1, "jsonnet", message))
    broken(connection, named)


def test_control_characters_in_error_messages_are_escaped() -> None:
    connection = in_flight()
    connection.receive_data(error(1, "jsonnet", "line 1\n\tline 2\x1b]0;owned\x07\r\x9b\u2066"))
    event = connection.next_event()
    assert isinstance(event, Failure)
    assert event.message == "line 1\n\tline 2\\x1b]0;owned\\x07\\x0d\\x9b\\u2066"


def test_a_nul_in_an_error_cannot_inject_an_answer_for_the_next_request() -> None:
    # Ory Kratos' NUL-terminated framing let error "x\u0000{...}" answer the next request.
    forged = '\0{"t": "result", "id": 2, "json": "{\\"admin\\": true}"}\0'
    connection = in_flight(request_id=1)
    connection.receive_data(error(1, "jsonnet", "x" + forged))
    event = connection.next_event()
    assert isinstance(event, Failure) and event.message.startswith("x\\x00{")
    assert "\0" not in event.message
    assert connection.next_event() is NEED_DATA
    connection.send_request(EvalRequest(2, "{}"))
    assert connection.next_event() is NEED_DATA  # nothing queued for request 2
    connection.receive_data(result(2, '{"admin": false}'))
    assert connection.next_event() == Answer(2, '{"admin": false}', {"admin": False})


def test_a_forged_second_answer_in_the_same_read_breaks_the_connection() -> None:
    connection = in_flight(request_id=1)
    connection.receive_data(result(1, "1") + result(2, '{"admin": true}'))
    broken(connection, "bytes after the answer")


def test_any_byte_while_idle_breaks_the_connection() -> None:
    connection = greeted()
    connection.receive_data(b"\0")
    broken(connection, "no request was in flight")
    connection = greeted()
    connection.receive_data(result(1, "1"))  # an answer nobody asked for
    broken(connection, "no request was in flight")
    with pytest.raises(ConnectionMisuse):
        connection.send_request(EvalRequest(1, "1"))


def test_bytes_after_an_answer_in_a_later_read_break_the_connection() -> None:
    connection = in_flight()
    connection.receive_data(result())
    assert isinstance(connection.next_event(), Answer)
    connection.receive_data(b"\x00\x00")
    broken(connection, "2 bytes")


def test_a_broken_connection_ignores_what_comes_next() -> None:
    connection = greeted()
    connection.receive_data(b"x")
    first = connection.next_event()
    connection.receive_data(result(1, "1"))
    connection.receive_data(b"")
    assert connection.next_event() == first
    assert connection.pending == 0


@pytest.mark.parametrize(
    "text",
    ["{", "", "{'a': 1}", "NaN", "[Infinity]", "-Infinity", "1 2", '{"a": 1} x', "\ud800"],
)
def test_a_result_that_is_not_json_breaks_the_connection(text: str) -> None:
    connection = in_flight()
    body = msgpack.packb(
        {"t": "result", "id": 1, "json": text}, use_bin_type=True, unicode_errors="surrogatepass"
    )
    connection.receive_data(struct.pack(">I", len(body)) + body)
    broken(connection)


@pytest.mark.parametrize("depth", [5_000, 100_000])
def test_a_result_nested_deeper_than_python_decodes_breaks_the_connection(depth: int) -> None:
    connection = in_flight(max_output=7 * depth)
    connection.receive_data(result(1, "[" * depth + "]" * depth))
    broken(connection, "nested deeper")
    connection = in_flight(max_output=7 * depth)
    connection.receive_data(result(1, '{"a":' * depth + "1" + "}" * depth))
    broken(connection, "nested deeper")


def test_the_depth_limit_is_the_same_on_every_python() -> None:
    """MAX_RESULT_DEPTH levels pass and one more breaks, whatever the decoder could do;
    brackets inside strings do not count."""
    depth = MAX_RESULT_DEPTH
    connection = in_flight(max_output=7 * depth)
    connection.receive_data(result(1, "[" * depth + "]" * depth))
    assert isinstance(connection.next_event(), Answer)
    connection = in_flight(max_output=7 * depth)
    connection.receive_data(result(1, json.dumps(["[{" * depth])))
    assert isinstance(connection.next_event(), Answer)
    connection = in_flight(max_output=7 * depth)
    connection.receive_data(result(1, "[" * (depth + 1) + "]" * (depth + 1)))
    broken(connection, "nested deeper")


def test_a_result_of_max_output_bytes_is_accepted_and_one_more_breaks() -> None:
    text = json.dumps("é" * ((MAX_OUTPUT - 2) // 2), ensure_ascii=False)  # 2 bytes each
    assert len(text.encode()) == MAX_OUTPUT
    connection = in_flight()
    connection.receive_data(result(1, text))
    assert isinstance(connection.next_event(), Answer)
    connection = in_flight()
    connection.receive_data(
        result(1, json.dumps("é" * ((MAX_OUTPUT - 2) // 2) + "x", ensure_ascii=False))
    )
    broken(connection, "over max_output")
    connection = in_flight()
    connection.receive_data(result(1, json.dumps("x" * MAX_OUTPUT)))
    broken(connection, "over max_output")


def test_an_answer_frame_over_its_cap_breaks_at_its_header() -> None:
    connection = in_flight(max_output=1 << 20)
    assert connection.answer_max_frame == (1 << 20) + FRAME_MARGIN
    connection.receive_data(struct.pack(">I", 32 << 20))  # the 32 MiB frame
    broken(connection, "limit of")
    small = in_flight(max_output=10)
    assert small.answer_max_frame == MAX_MESSAGE_BYTES + FRAME_MARGIN  # room for an error


def test_an_answer_of_many_tiny_keys_breaks_the_connection() -> None:
    connection = in_flight(max_output=1 << 20)
    payload = {"t": "result", "id": 1, "json": "1"} | {str(i): 0 for i in range(10_000)}
    connection.receive_data(encode(payload))
    broken(connection, "max_map_len")


def test_unknown_fields_of_an_answer_are_ignored() -> None:
    connection = in_flight()
    connection.receive_data(result(1, "1", note="from a later worker"))
    assert connection.next_event() == Answer(1, "1", 1)


@pytest.mark.parametrize(
    "payload",
    [
        {"t": "result", "id": 1},
        {"t": "result", "id": 1, "json": 1},
        {"t": "result", "id": 1, "json": b"1"},
        {"t": "hello"},
        {"t": "startup_failed", "reason": "late"},
        {"t": None, "id": 1},
        {"id": 1, "json": "1"},
    ],
)
def test_an_ill_shaped_answer_breaks_the_connection(payload: dict[str, Any]) -> None:
    connection = in_flight()
    connection.receive_data(encode(payload))
    broken(connection)


@pytest.mark.parametrize(
    "body", [b"", b"\xc1", b"\x91\x01", b"\x81\x01\x02", b"\xc4\x01x", b"\xd4\x01\x00"]
)
def test_a_malformed_frame_breaks_the_connection(body: bytes) -> None:
    connection = in_flight()
    connection.receive_data(struct.pack(">I", len(body)) + body)
    broken(connection, "malformed frame")


def test_check_answers_null_and_format_answers_a_string() -> None:
    connection = in_flight(operation=Operation.CHECK)
    connection.receive_data(result(1, "null"))
    assert connection.next_event() == Answer(1, "null", None)
    connection = in_flight(operation=Operation.FMT)
    connection.receive_data(result(1, json.dumps("{ a: 1 }\n")))
    assert connection.next_event() == Answer(1, '"{ a: 1 }\\n"', "{ a: 1 }\n")


@pytest.mark.parametrize(
    ("operation", "text"),
    [
        (Operation.CHECK, "{}"),
        (Operation.CHECK, "0"),
        (Operation.FMT, "null"),
        (Operation.FMT, "[]"),
    ],
)
def test_an_answer_of_the_wrong_type_for_its_operation_breaks_the_connection(
    operation: Operation, text: str
) -> None:
    connection = in_flight(operation=operation)
    connection.receive_data(result(1, text))
    broken(connection, operation.value)


def test_the_end_of_the_stream_during_a_call_is_closed_with_its_state() -> None:
    connection = in_flight()
    connection.receive_data(result()[:5])
    connection.receive_data(b"")
    assert connection.next_event() == ConnectionClosed(ConnectionState.AWAITING_ANSWER, 5)
    with pytest.raises(ConnectionMisuse):
        connection.send_request(EvalRequest(2, "1"))


def test_the_end_of_the_stream_while_idle_is_closed() -> None:
    connection = greeted()
    connection.receive_data(b"")
    assert connection.next_event() == ConnectionClosed(ConnectionState.IDLE, 0)


def test_escape_controls_keeps_newlines_tabs_and_text() -> None:
    assert escape_controls("plain ünïcödé\n\tok") == "plain ünïcödé\n\tok"
    assert escape_controls("\0\x1b\x7f\x85\u200f") == "\\x00\\x1b\\x7f\\x85\\u200f"


# -- real processes: launch_and_greet, and a pool whose workers lie in their hello ---------


def fake_worker(
    *, hello: dict[str, Any] | None = None, stderr: str = "", code: int = 0
) -> list[str]:
    """A process in place of the worker: it writes ``hello`` (if given) as a frame and
    ``stderr``, then exits with ``code`` (or, after a hello, waits to be killed)."""
    script = (
        "import os, struct, sys, time, msgpack\n"
        f"hello = {hello!r}\n"
        f"sys.stderr.write({stderr!r}); sys.stderr.flush()\n"
        "if hello is not None:\n"
        "    body = msgpack.packb(hello)\n"
        "    os.write(1, struct.pack('>I', len(body)) + body)\n"
        "    time.sleep(60)\n"
        f"sys.exit({code})\n"
    )
    return [sys.executable, "-c", script]


SETTINGS = WorkerSettings("go", 1 << 30, DEFAULT_MAX_FRAME)


def test_launch_and_greet_gives_the_process_and_its_hello() -> None:
    worker, hello = launch_and_greet(SETTINGS, fake_worker(hello=HELLO))
    try:
        assert hello.pid == 4242 and hello.landlock.enforced
        assert not worker.exited()
    finally:
        worker.close()


def test_launch_and_greet_refuses_a_hostile_hello_by_name() -> None:
    with pytest.raises(WorkerStartError, match="invalid hello: hello field 'pid'") as caught:
        launch_and_greet(SETTINGS, fake_worker(hello={**HELLO, "pid": "1; rm -rf /"}))
    assert "'pid'" in caught.value.cause


def test_launch_and_greet_says_how_a_worker_died_with_its_stderr_escaped() -> None:
    command = fake_worker(stderr="first\nboom \x1b[31mred\n", code=3)
    with pytest.raises(WorkerStartError, match="exited during start-up") as caught:
        launch_and_greet(SETTINGS, command)
    assert caught.value.cause == "exited during start-up: boom \\x1b[31mred"


def test_launch_and_greet_gives_up_after_its_timeout() -> None:
    silent = [sys.executable, "-c", "import time; time.sleep(60)"]
    with pytest.raises(WorkerStartError, match=r"no hello within 0\.5 s"):
        launch_and_greet(SETTINGS, silent, timeout=0.5)


def test_launch_and_greet_passes_on_a_startup_failure() -> None:
    command = fake_worker(hello={"t": "startup_failed", "reason": "no memfd"})
    with pytest.raises(WorkerStartError, match="start-up failed: no memfd"):
        launch_and_greet(SETTINGS, command)


def test_a_pool_whose_workers_lie_in_their_hello_fails_typed_and_cleanly() -> None:
    # Before the connection object, a hello with a bad field type killed the supervisor
    # thread, and the pool with it.
    command = fake_worker(hello={**HELLO, "layers": {"seccomp": {"state": ["active"]}}})
    with pytest.raises(WorkerStartError, match="invalid hello: layer 'seccomp'"):
        seams.pool_of(seams.re_exec(command), 1, spares=0)


# -- fuzzing: nothing a worker sends escapes as an exception ---------------------------------


def drive(connection: WorkerConnection, chunks: list[bytes], end: bool) -> list[ConnectionEvent]:
    """Feed ``chunks`` (then the end, if ``end``), sending a request whenever the connection
    is idle, and check what any worker's bytes may give: only events, a WorkerHello only first, an
    answer only for the id in flight and within the limits, nothing after a final event."""
    seen: list[ConnectionEvent] = []
    owed = connection.expected_id
    next_id = (owed or 0) + 1  # requests are numbered 1, 2, 3...: frames can guess them
    for chunk in [*chunks, *([b""] if end else [])]:
        connection.receive_data(chunk)
        while (event := connection.next_event()) is not NEED_DATA:
            assert isinstance(event, EVENT_TYPES)
            if isinstance(event, WorkerHello):
                assert not seen and connection.hello is event
            if isinstance(event, Answer):
                assert event.request_id == owed and len(event.json_text) <= MAX_OUTPUT
            if isinstance(event, Failure):
                assert event.request_id in (owed, None)
                assert len(event.message) <= 4 * (MAX_MESSAGE_CHARS + 64)
            seen.append(event)
            if isinstance(event, ConnectionClosed | ConnectionBroken | StartupFailure):
                assert connection.state in (ConnectionState.CLOSED, ConnectionState.BROKEN)
                assert connection.next_event() is not NEED_DATA  # final: it stays
                return seen
            if state(connection) is IDLE:
                owed, next_id = next_id, next_id + 1
                connection.send_request(EvalRequest(owed, "x"))
    return seen


def start_in(state: str) -> WorkerConnection:
    return {"hello": lambda: WorkerConnection(MAX_OUTPUT), "idle": greeted, "call": in_flight}[
        state
    ]()


@settings(max_examples=300, deadline=None)
@given(
    state=st.sampled_from(["hello", "idle", "call"]),
    chunks=st.lists(st.binary(max_size=64), max_size=8),
    end=st.booleans(),
)
def test_arbitrary_bytes_give_only_events(state: str, chunks: list[bytes], end: bool) -> None:
    drive(start_in(state), chunks, end)


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20)
    | st.sampled_from(["hello", "result", "error", "startup_failed", "jsonnet", "protocol", 1]),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from([*HELLO, "id", "json", "kind", "message"]), children)
    ),
    max_leaves=20,
)
frames = st.dictionaries(
    st.sampled_from([*HELLO, "id", "json", "kind", "message", "reason"]), msgpack_values
).map(encode)
hello_like = st.builds(
    lambda changes: {**copy.deepcopy(HELLO), **changes},
    st.dictionaries(st.sampled_from(list(HELLO)), msgpack_values, max_size=3),
).map(encode)
answer_like = st.builds(
    lambda t, request_id, json_text, kind, message: encode(
        {"t": t, "id": request_id, "json": json_text, "kind": kind, "message": message}
    ),
    st.sampled_from(["result", "result", "error", "hello"]),
    st.sampled_from([1, 1, 2, 2, 3, None, True]),
    st.sampled_from(["[" * 3000, "null", "1", '"s"', '{"a": [1, 2]}', "{"]) | st.text(max_size=30),
    st.sampled_from(["jsonnet", "protocol", "memory", "bogus"]),
    st.text(max_size=30),
)


@settings(max_examples=300, deadline=None)
@given(
    state=st.sampled_from(["hello", "idle", "call"]),
    sent=st.lists(frames | hello_like | answer_like, min_size=1, max_size=4),
    cut=st.integers(min_value=1, max_value=7),
    end=st.booleans(),
)
def test_arbitrary_frames_give_only_events(
    state: str, sent: list[bytes], cut: int, end: bool
) -> None:
    data = b"".join(sent)
    chunks = [data[i : i + cut] for i in range(0, len(data), cut)]
    drive(start_in(state), chunks, end)


@settings(max_examples=200, deadline=None)
@given(changes=st.dictionaries(st.sampled_from(list(HELLO)), msgpack_values, max_size=3))
def test_a_hello_is_a_hello_or_broken_never_an_exception(changes: dict[str, Any]) -> None:
    connection = WorkerConnection(MAX_OUTPUT)
    connection.receive_data(encode({**copy.deepcopy(HELLO), **changes}))
    event = connection.next_event()
    assert isinstance(event, WorkerHello | ConnectionBroken | StartupFailure), event


def test_each_request_holds_its_answer_to_its_own_cap_in_turn() -> None:
    """The reader's cap is set only when a request's max_output differs from the last
    one's (setting it builds the unpack options): an answer over the pool's cap is read
    under a call's own larger cap, and refused at its header under the pool's cap again,
    after one request or after two of the same."""
    pool_cap = greeted().answer_max_frame  # the pool's: room for the longest message too
    big = pool_cap * 4
    oversized = json.dumps("x" * pool_cap)  # over the pool's frame cap, under big's
    header = struct.pack(">I", pool_cap + 1)
    for caps in ((big, MAX_OUTPUT), (MAX_OUTPUT, MAX_OUTPUT), (MAX_OUTPUT, big, big)):
        connection = greeted()
        for request_id, max_output in enumerate(caps[:-1], start=1):
            connection.send_request(EvalRequest(request_id, "{}", max_output=max_output))
            text = oversized if max_output == big else json.dumps("y")
            connection.receive_data(result(request_id, text))
            assert isinstance(connection.next_event(), Answer)
        connection.send_request(EvalRequest(len(caps), "{}", max_output=caps[-1]))
        if caps[-1] == big:
            connection.receive_data(result(len(caps), oversized))
            assert isinstance(connection.next_event(), Answer)
        else:
            connection.receive_data(header)
            broken(connection, "limit of")
