"""A call's ``std.trace`` lines: captured in the parent from the call's stderr, bounded.

Goals: a mapper author sees what ``std.trace`` printed, as go-jsonnet prints it
(``TRACE: <file>:<line> <message>``), and only for the call that printed it; a caller that
does not ask pays nothing (the light call costs ~100 us of the caller's CPU); nothing a
worker writes is believed or let through unbounded; nothing is logged (a trace may carry
personal data: claims, addresses).

Plan: both engines write ``std.trace`` to the worker's stderr (go-jsonnet's C API and its
binding through Go's unbuffered ``os.Stderr``, the C++ binding through ``std::cerr``), and
the pool already reads each worker's stderr per call: drained while the call runs (so a
flood never blocks the engine), kept in ``processes.StderrCapture`` from the moment the
call's request is written (``calls.start`` marks it), drained once more when the answer
has come (``calls._after_call``). A caller that asks (``on_trace``) has the capture's head
cut into lines here (``lines_of``): at most ``max_trace_lines`` lines and
``max_trace_bytes`` bytes, each line decoded (invalid UTF-8 replaced) and its control
characters escaped, then a marker line when anything was cut. ``calls.settle`` gives the
lines to the caller's ``on_trace``, one call per line, before the call returns or raises.

Why in the parent, not in the worker (a trace callback whose lines travel in the answer
frame):

- a trace line is written before the answer that follows it, and a write to a unix socket
  is in the reader's queue when it returns: once the answer is read, every line the call
  printed is in the call's own stderr, which nothing else shares. So the lines of a call
  are exactly what its stderr held between its request and its answer; a truthful worker
  cannot mix two calls;
- a compromised worker gains nothing either way: in the answer frame it could put any
  line it likes, and on stderr it can write any bytes it likes; both are its own call's
  data. What it must not do is make the pool hand its bytes to a caller of another trust
  domain, and that cannot happen: a worker serves one domain only, its capture is cleared
  when each request is written, and a worker that writes to its stderr while idle after
  a call (late, or early for the next one) is discarded at its next check-out
  (``calls.ready_for_call``), as one that writes to its response channel is;
- the hot path is unchanged: the parent polls and drains stderr already, and with nobody
  asking the only addition is one attribute test at settle. A callback in the worker would
  cost every call a redirect of fd 2 (go-jsonnet's C API has no trace hook: its VM's trace
  writer is not exported) and a frame field, and would need the C++ binding patched too;
- both engines, both call paths (blocking and asyncio), and the re-exec and forked
  workers are served by the same code.

Weak spots: the lines are stderr's, so anything else an engine prints during the call (a Go
runtime warning) comes with them; a worker that writes in the instant between the
check-out's look at its stderr and its next request (or between its answer and a
hand-over's request) is not caught, and those bytes reach the next caller of its own trust
domain only (which a compromised worker could serve any bytes to anyway, in its answer);
a timed-out call gets the lines read before its deadline; a call whose error the C API
path had to re-run directly (a stack overflow, a trace cut by ``max_trace``:
``_worker/capi.py``) prints its lines twice, as the engine ran it twice.
"""

from __future__ import annotations

from collections.abc import Callable

from .._wire.messages import escape_controls
from .._wire.values import valueclass
from .processes import StderrCapture

TraceReceiver = Callable[[str], None]


@valueclass(slots=True)
class TraceRequest:
    """A caller's ask for its call's ``std.trace`` lines: who receives each line, and the
    bounds (``PoolConfig.max_trace_lines``/``max_trace_bytes``)."""

    receiver: TraceReceiver
    max_lines: int
    max_bytes: int


def truncation_marker(more: int, request: TraceRequest) -> str:
    """The last line of a call's traces when some were cut: how much, and which bounds."""
    return (
        f"... ({more} more bytes of trace output not kept: max_trace_lines="
        f"{request.max_lines}, max_trace_bytes={request.max_bytes})"
    )


def lines_of(capture: StderrCapture, request: TraceRequest) -> tuple[str, ...]:
    """The call's stderr (what ``capture`` kept since the call's request) as lines:
    bounded by ``request``, decoded, control characters escaped, a marker when cut."""
    head = capture.head
    if not head:
        return ()
    kept = bytes(head[: request.max_bytes])
    more = len(head) - len(kept) + len(capture.tail) + capture.dropped
    pieces = kept.split(b"\n")
    if not pieces[-1]:
        pieces.pop()  # the output ended with a newline
    if len(pieces) > request.max_lines:
        shown = sum(len(piece) + 1 for piece in pieces[: request.max_lines])
        more += len(kept) - shown
        del pieces[request.max_lines :]
    lines = [escape_controls(piece.decode("utf-8", "replace")) for piece in pieces]
    if more > 0:
        lines.append(truncation_marker(more, request))
    return tuple(lines)


def deliver(request: TraceRequest, lines: tuple[str, ...]) -> None:
    """Each line to the caller's receiver, in order (an exception from it propagates)."""
    receiver = request.receiver
    for line in lines:
        receiver(line)
