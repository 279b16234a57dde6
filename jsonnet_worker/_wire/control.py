"""The fork server's control channel, spoken by the fork server (``_worker.forkserver``) and
the pool (``_pool.forking``): the clone flags both check, how many channels a fork carries, and
the codec of its datagrams (a msgpack map with a string ``t``, at most ``CONTROL_MAX`` bytes).
What the maps say, and their parsing, are ``messages``' (``ForkRequest``, ``Forked``, ...).
"""

from __future__ import annotations

import signal

import msgpack

from .framing import ProtocolViolation
from .messages import MAX_MESSAGE_CHARS, MAX_NOTE_CHARS

TYPE_CHECKING = False  # typing's, without importing typing: a worker never loads it
if TYPE_CHECKING:
    from typing import Any

CLONE_PIDFD = 0x00001000
CLONE_PARENT = 0x00008000
# The one flag word the fork server's filter lets ``clone`` make a process with: the child
# is the fork server's sibling (the pool's child), its pidfd is returned, it signals SIGCHLD.
FORK_FLAGS = CLONE_PARENT | CLONE_PIDFD | signal.SIGCHLD
CHANNELS = 3  # requests, responses, stderr
# A datagram's largest size: room for a start-up reason or refusal of the longest a message
# may be (4 bytes a character at worst) and the map around it.
CONTROL_MAX = (MAX_MESSAGE_CHARS + MAX_NOTE_CHARS) * 4 + 4096


class ControlError(ProtocolViolation):
    """A control datagram that is not a map with a string ``t``, or too long to send."""


def encode_control(message: dict[str, Any]) -> bytes:
    data: bytes = msgpack.packb(message, use_bin_type=True)
    if len(data) > CONTROL_MAX:
        raise ControlError(f"control message of {len(data)} bytes is over {CONTROL_MAX}")
    return data


def decode_control(data: bytes) -> dict[str, Any]:
    try:
        message = msgpack.unpackb(
            data,
            raw=False,
            max_str_len=CONTROL_MAX,
            max_bin_len=0,
            max_array_len=256,
            max_map_len=256,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several unrelated types
        raise ControlError(f"undecodable control message: {type(exc).__name__}") from None
    if not isinstance(message, dict) or not isinstance(message.get("t"), str):
        raise ControlError("a control message must be a map with a string 't'")
    return message
