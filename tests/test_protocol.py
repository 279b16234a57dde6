"""The sans-I/O framing: bytes in, events out."""

from __future__ import annotations

import struct

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jsonnet_worker._wire.protocol import (
    Action,
    EvalRequest,
    FrameReader,
    FrameTooLarge,
    MalformedFrame,
    Message,
    ProtocolViolation,
    encode,
    encode_request,
    parse_request,
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


def test_parse_request_names_what_is_wrong() -> None:
    assert parse_request(REQUEST).id == 7
    for broken, needle in [
        ({**REQUEST, "snippet": 3}, "snippet"),
        ({**REQUEST, "id": "7"}, "id"),
        ({**REQUEST, "ext_vars": {"a": 1}}, "ext_vars"),
        ({**REQUEST, "max_output": -1}, "max_output"),
        ({**REQUEST, "t": "hello"}, "unknown message type"),
    ]:
        try:
            parse_request(broken)
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


def test_encode_request_is_the_bytes_of_encode_to_message() -> None:
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
        action=Action.FMT,
    )
    assert encode_request(request) == encode(request.to_message())
    with pytest.raises(UnicodeEncodeError):
        encode_request(EvalRequest(id=8, snippet="\udc80"))
    # the Packer kept for this thread is clean after that failure
    assert encode_request(request) == encode(request.to_message())
