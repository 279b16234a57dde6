"""The fork server's control channel, spoken by the fork server (``_worker.forkserver``) and
the pool (``_pool.forking``): the clone flags both check, how many channels a fork carries, and
the codec of its messages (a msgpack map with a string ``t``, at most ``CONTROL_MAX`` bytes).
"""

from __future__ import annotations

import signal
from typing import Any

import msgpack

CLONE_PIDFD = 0x00001000
CLONE_PARENT = 0x00008000
# The one flag word the template's filter lets ``clone`` make a process with: the child is
# the template's sibling (the pool's child), its pidfd is returned, it signals SIGCHLD.
FORK_FLAGS = CLONE_PARENT | CLONE_PIDFD | signal.SIGCHLD
CHANNELS = 3  # requests, responses, stderr
CONTROL_MAX = 64 * 1024


class ControlError(Exception):
    """A control message that is not a map with a string ``t``."""


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
