"""The sans-I/O framing (bytes in, events out), and the wire messages: each built and parsed
in one place."""

from __future__ import annotations

import errno
import re
import struct
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jsonnet_worker._wire.control import FORK_FLAGS
from jsonnet_worker._wire.framing import (
    FrameReader,
    FrameTooLarge,
    MalformedFrame,
    Message,
    ProtocolViolation,
    encode,
)
from jsonnet_worker._wire.layers import (
    EXTRA_LAYERS,
    LandlockStatus,
    LayerState,
    LayerStatus,
    SupportState,
)
from jsonnet_worker._wire.messages import (
    ErrorKind,
    EvalRequest,
    Failure,
    Forked,
    ForkRefused,
    ForkRequest,
    ForkServerHello,
    Operation,
    Result,
    StartupFailure,
    WorkerHello,
    escape_controls,
    read_answer,
    read_fork_answer,
    read_greeting,
)

REQUEST = {
    "t": "eval",
    "id": 7,
    "snippet": "1",
    "filename": "f",
    "ext_vars": {},
    "ext_codes": {},
    "tla_vars": {},
    "tla_codes": {},
    "max_stack": 500,
    "max_output": 100,
}


def test_frames_split_anywhere_reassemble() -> None:
    data = encode(REQUEST) + encode({"t": "x", "id": 8})
    for cut in range(len(data) + 1):
        reader = FrameReader()
        reader.feed(data[:cut])
        events = list(reader.events())
        reader.feed(data[cut:])
        events += list(reader.events())
        assert [e.payload for e in events if isinstance(e, Message)] == [
            REQUEST,
            {"t": "x", "id": 8},
        ]


def test_oversized_length_breaks_the_stream() -> None:
    reader = FrameReader(max_frame=10)
    reader.feed(struct.pack(">I", 11) + b"x" * 11 + encode({"a": 1}))
    assert reader.next_event() == FrameTooLarge(11, 10)
    assert reader.broken and reader.next_event() is None


def test_nul_inside_strings_is_just_data() -> None:
    message = {"t": "error", "id": 1, "message": "x\0" + encode({"t": "result"}).decode("latin-1")}
    reader = FrameReader()
    reader.feed(encode(message))
    assert list(reader.events()) == [Message(message)]


def test_a_request_parse_names_what_is_wrong() -> None:
    assert EvalRequest.from_message(REQUEST).id == 7
    for broken, needle in [
        ({**REQUEST, "snippet": 3}, "snippet"),
        ({**REQUEST, "id": "7"}, "id"),
        ({**REQUEST, "ext_vars": {"a": 1}}, "ext_vars"),
        ({**REQUEST, "max_output": -1}, "max_output"),
        ({**REQUEST, "t": "hello"}, "unknown message type"),
    ]:
        try:
            EvalRequest.from_message(broken)
        except ProtocolViolation as exc:
            assert needle in exc.reason
        else:
            raise AssertionError(f"accepted {broken}")


@given(st.binary(max_size=200))
def test_arbitrary_bodies_never_raise(body: bytes) -> None:
    reader = FrameReader()
    reader.feed(struct.pack(">I", len(body)) + body)
    events = list(reader.events())
    assert len(events) == 1
    assert isinstance(events[0], Message | MalformedFrame)


@given(
    st.recursive(
        st.none() | st.integers(-(2**63), 2**64 - 1) | st.text(),
        lambda c: st.lists(c) | st.dictionaries(st.text(), c),
    )
)
def test_any_msgpack_shape_is_a_message_or_malformed(value: object) -> None:
    reader = FrameReader()
    body = msgpack.packb(value)
    reader.feed(struct.pack(">I", len(body)) + body)
    (event,) = reader.events()
    assert isinstance(event, Message) == isinstance(value, dict)


def test_encode_is_the_bytes_of_framing_encode_of_to_message() -> None:
    request = EvalRequest(
        id=7,
        snippet="std.extVar('a') + 'é'",
        filename="x.jsonnet",
        ext_vars={"a": "1"},
        ext_codes={"b": "{}"},
        tla_vars={"c": "2"},
        tla_codes={"d": "[]"},
        max_stack=9,
        max_output=10,
        max_trace=3,
        operation=Operation.FMT,
    )
    assert request.encode() == encode(request.to_message())
    with pytest.raises(UnicodeEncodeError):
        EvalRequest(id=8, snippet="\udc80").encode()
    # the Packer kept for this thread is clean after that failure
    assert request.encode() == encode(request.to_message())


LANDLOCK = LandlockStatus(
    enforced=True,
    state=SupportState.AVAILABLE,
    abi=7,
    handled_fs=("READ_FILE",),
    scoped=("SIGNAL",),
)
LAYERS = tuple(LayerStatus(name, LayerState.ACTIVE, f"{name} on") for name in EXTRA_LAYERS)
MESSAGES: list[Any] = [
    EvalRequest(id=3, snippet="1", operation=Operation.CHECK, max_trace=0),
    Result(3, "[1]"),
    Result(3, "[1]", retire=True),
    Failure(3, ErrorKind.JSONNET, "boom"),
    Failure(None, ErrorKind.PROTOCOL, "unreadable", retire=True),
    StartupFailure("no memfd"),
    WorkerHello(
        pid=12,
        engine="go",
        engine_version="v0.21",
        python="3.11.7",
        landlock=LANDLOCK,
        self_check="refused: open('/x') -> EACCES",
        startup_ms=4.5,
        layers=LAYERS,
        engine_api="capi",
    ),
    ForkServerHello(
        pid=13,
        engine="cpp",
        python="3.11.7",
        landlock=LANDLOCK,
        self_check="refused",
        startup_ms=1.0,
        layers=LAYERS,
        fork_flags=FORK_FLAGS,
    ),
    ForkRequest(5),
    Forked(5, 99),
    ForkRefused(5, "no", errno.EPERM),
    ForkRefused(None, "unknown control message 'x'"),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_parses_back_to_itself(message: Any) -> None:
    payload = msgpack.unpackb(msgpack.packb(message.to_message()), raw=False)
    assert type(message).from_message(payload) == message


def test_the_readers_take_only_the_types_that_may_come_next() -> None:
    hello, failure = MESSAGES[6], StartupFailure("x")
    assert read_greeting(hello.to_message(), WorkerHello) == hello
    assert read_greeting(failure.to_message(), ForkServerHello) == failure
    assert read_answer(Result(1, "1").to_message()) == Result(1, "1")
    assert read_fork_answer(Forked(1, 2).to_message()) == Forked(1, 2)
    for reader, payload in [
        (lambda p: read_greeting(p, ForkServerHello), hello.to_message()),
        (lambda p: read_greeting(p, WorkerHello), Result(1, "1").to_message()),
        (read_answer, hello.to_message()),
        (read_fork_answer, ForkRequest(1).to_message()),
    ]:
        with pytest.raises(ProtocolViolation):
            reader(payload)


@pytest.mark.parametrize(
    ("message", "change"),
    [
        (Result(1, "1"), {"id": True}),
        (Result(1, "1"), {"json": b"1"}),
        (Result(1, "1"), {"retire": 1}),
        (Failure(1, ErrorKind.JSONNET, "x"), {"id": None}),  # only a protocol error has none
        (Failure(1, ErrorKind.JSONNET, "x"), {"kind": "panic"}),
        (Failure(1, ErrorKind.JSONNET, "x"), {"message": "x" * (16 * 1024 + 65)}),
        (StartupFailure("x"), {"reason": ["x"]}),
        (MESSAGES[6], {"protocol": 2}),
        (MESSAGES[6], {"pid": 0}),
        (MESSAGES[6], {"startup_ms": float("nan")}),
        (MESSAGES[6], {"sandbox": {"enforced": 1, "state": "available"}}),
        (MESSAGES[6], {"layers": {"seccomp": {"state": "on"}}}),
        (MESSAGES[7], {"fork_flags": "0x8000"}),
        (Forked(1, 2), {"pid": -1}),
        (ForkRefused(1, "no"), {"errno": "EPERM"}),
        (ForkRequest(1), {"id": 1.0}),
    ],
)
def test_a_lie_is_a_protocol_violation(message: Any, change: dict[str, object]) -> None:
    with pytest.raises(ProtocolViolation):
        type(message).from_message(message.to_message() | change)


def test_texts_are_escaped_and_layers_not_reported_are_missing() -> None:
    hello = MESSAGES[6].to_message()
    hello["engine"] = "go\x1b[2J"
    del hello["layers"]["uid"]
    parsed = WorkerHello.from_message(hello)
    assert parsed.engine == "go\\x1b[2J"
    assert [layer.name for layer in parsed.layers] == list(EXTRA_LAYERS)
    assert parsed.layers[EXTRA_LAYERS.index("uid")] == LayerStatus.unreported("uid")
    failure = StartupFailure("r" * 20_000).to_message()
    assert StartupFailure.from_message(failure).reason.endswith("more characters truncated)")


# What ``escape_controls`` escapes, as the regular expression it was written as until the
# worker stopped importing ``re``: its translation table must escape exactly these.
CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _escaped_as_the_expression_did(text: str) -> str:
    def escape(match: re.Match[str]) -> str:
        code = ord(match.group())
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"

    return CONTROLS.sub(escape, text)


@given(st.text())
def test_escape_controls_escapes_what_the_expression_did(text: str) -> None:
    assert escape_controls(text) == _escaped_as_the_expression_did(text)


def test_escape_controls_escapes_every_code_point_as_the_expression_did() -> None:
    every = "".join(chr(code) for code in range(0x110000) if not 0xD800 <= code < 0xE000)
    assert escape_controls(every) == _escaped_as_the_expression_did(every)
    for kept in ("plain\ttext\n", "\u00a0 and \u200d", "日本\U0001f600"):  # nothing to escape
        assert escape_controls(kept) == kept
