"""The framing between a pool and its workers, sans I/O (bytes in, events out).

Goals: one implementation of the frames that the worker loop, the pool's blocking fast path
and its asyncio path all share, and that no byte a snippet controls can subvert. What a frame
says is ``messages``' business: this module knows maps, not message types.

Plan: every frame is a 4-byte big-endian length and a msgpack map of that length. A
``FrameReader`` is fed whatever bytes arrived and yields ``Message`` events (a decoded map), or
one ``FrameTooLarge`` / ``MalformedFrame`` event. Length prefixes, not delimiters, mark frame
boundaries: Ory Kratos' NUL-terminated framing lets ``error "x\\u0000{...}"`` inject a response
for the next request; here an error text is just a msgpack string inside one frame.

A reader may carry ``UnpackLimits``: msgpack then refuses, while it decodes, any string, binary,
array or map longer than the limit (a hostile frame of a million tiny map keys costs the
parent's memory and GIL time long after its length passed the frame cap). The pool's side of
the conversation (``_pool.connection``) sets them per state; the worker reads requests without.

Weak spots: after ``FrameTooLarge`` the stream cannot be resynchronised cheaply, so both ends
treat it as the end of that peer; ``MalformedFrame`` keeps the boundary and may go on.

Its values are ``_wire.values.valueclass``es, not dataclasses: every worker imports this
module, and ``dataclasses`` (with ``inspect``) would cost each worker's start ~18 ms.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import msgpack

from .values import valueclass

TYPE_CHECKING = False  # typing's, without importing typing: a worker never loads it
if TYPE_CHECKING:
    from typing import Any

HEADER = struct.Struct(">I")
HEADER_SIZE = HEADER.size
# The largest request frame a worker reads unless the pool says otherwise (``max_request``).
DEFAULT_MAX_FRAME = 64 * 1024 * 1024


@valueclass
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


@valueclass
class Message:
    """One decoded frame: its msgpack map."""

    payload: dict[str, Any]


@valueclass
class FrameTooLarge:
    """A frame header announced more than the limit: the stream cannot be read on."""

    size: int
    limit: int


@valueclass
class MalformedFrame:
    """A frame whose bytes are not a msgpack map within the limits."""

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
    """A well-framed message with the wrong shape (``messages`` raises it, naming the field;
    ``request_id`` is the id of a request it could still read, for the error answer)."""

    def __init__(self, reason: str, request_id: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.request_id = request_id
