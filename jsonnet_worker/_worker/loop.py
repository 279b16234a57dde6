"""The worker's evaluation loop: requests in, answers out, on the thread start-up leaves.

Goals: answer every request frame with exactly one answer frame (a result, or an error that
says why), never lose one to a bug, and never let a snippet's bytes reach the frame
boundaries. The loop runs inside every layer ``startup`` applied: it reads nothing but its
request stream and writes nothing but its response stream.

Plan: ``ProtocolStreams`` moves the two pipes off fds 0 and 1 (so nothing else can read the
requests or write into the answers); ``EvaluationLoop`` feeds a ``FrameReader``, parses each
frame into an ``EvalRequest`` (``messages``), runs it on the engine and sends a ``Result`` or
a ``Failure``. A ``LibrarySet`` frame is the one without an answer: the engine keeps the set
for the requests that name it. After an evaluation of ``MEMORY_PROBE_AFTER`` or more, and every
``MEMORY_PROBE_EVERY`` answers, it asks ``MemoryHeadroom`` whether this worker has used over
``RETIRE_AT_MEMORY_SHARE`` of the memory it started with; if so the answer asks the pool to
replace it (``retire``). ``serve`` starts the loop on a thread of its own, which sends the
hello first.

Weak spots: an oversized request frame ends the loop (a stream cannot be resynchronised
cheaply); the pool replaces the worker. The spin before a blocking read costs up to
``SPIN_FOR_REQUEST`` of CPU per request while it pays.
"""

from __future__ import annotations

import mmap
import os
import select
import threading
import time

from .._wire.framing import FrameReader, FrameTooLarge, MalformedFrame, ProtocolViolation, encode
from .._wire.messages import (
    LIBRARY,
    RETIRE_AT_MEMORY_SHARE,
    ErrorKind,
    EvalRequest,
    Failure,
    LibrarySet,
    Result,
    StartupFailure,
    WorkerHello,
    bound_text,
)
from .._wire.values import replace
from . import engines

TYPE_CHECKING = False  # typing's, without importing typing: a worker never loads it
if TYPE_CHECKING:
    from typing import Any

EXIT_PROTOCOL = 71
READ_SIZE = 256 * 1024
# A sequential caller's next request follows an answer within tens of microseconds on an idle
# machine; interleaved A/B runs on the busy 2-CPU machine (docs/DESIGN.md): a 60 us window,
# spun only while it pays, beat both a fixed 300 us spin (p50 1.09x vs 3.0-3.9x in-process)
# and none.
SPIN_FOR_REQUEST = 0.00006
# The memory headroom is probed (a few microseconds) after an evaluation that took at least
# this long, and after every MEMORY_PROBE_EVERY answers: mapping hundreds of megabytes takes
# an honest engine far longer than this, so the fast calls skip the probe.
MEMORY_PROBE_AFTER = 0.001
MEMORY_PROBE_EVERY = 256


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class ProtocolStreams:
    """The request and response pipes, moved to private fds at start-up.

    fd 0 becomes /dev/null (so ``/dev/stdin`` is not the request stream even without
    Landlock) and fd 1 a copy of stderr (so a stray write by the engine or by Python lands in
    the diagnostics, never inside a frame).
    """

    def __init__(self) -> None:
        self.requests = os.dup(0)
        self.responses = os.dup(1)
        os.set_inheritable(self.requests, False)
        os.set_inheritable(self.responses, False)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        os.dup2(2, 1)

    def send(self, message: WorkerHello | StartupFailure | Result | Failure) -> None:
        write_all(self.responses, encode(message.to_message()))


def can_map(size: int) -> bool:
    """Whether RLIMIT_DATA (and the kernel's overcommit policy) would let this process map
    ``size`` more bytes of private writable memory now: mapped and unmapped untouched, so
    it costs no page. No /proc: under the empty layer a forked worker cannot open its own."""
    try:
        mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS).close()
    except OSError:
        return False
    return True


class MemoryHeadroom:
    """Whether this worker has used over RETIRE_AT_MEMORY_SHARE of the headroom it started
    with. Measured at the start (a bisection of ``can_map``, to 1 MiB), then probed."""

    def __init__(self, memory_limit: int) -> None:
        can, cannot = 0, memory_limit + 1
        while cannot - can > 1 << 20:
            size = (can + cannot) // 2
            can, cannot = (size, cannot) if can_map(size) else (can, size)
        self.reserve = max(1, int(can * (1 - RETIRE_AT_MEMORY_SHARE)))
        self.unprobed = 0

    def spent(self, evaluation_seconds: float) -> bool:
        self.unprobed += 1
        if evaluation_seconds < MEMORY_PROBE_AFTER and self.unprobed < MEMORY_PROBE_EVERY:
            return False
        self.unprobed = 0
        return not can_map(self.reserve)


class EvaluationLoop:
    def __init__(
        self, streams: ProtocolStreams, engine: engines.Engine, max_frame: int, memory_limit: int
    ) -> None:
        self.streams = streams
        self.engine = engine
        self.reader = FrameReader(max_frame)
        self.headroom = MemoryHeadroom(memory_limit)
        os.set_blocking(streams.requests, False)
        self.wait_readable = select.poll()
        self.wait_readable.register(streams.requests, select.POLLIN)
        self.spin_pays = True

    def run(self) -> int:
        reader = self.reader
        while True:
            data = self.receive()
            if not data:
                return 0  # the pool closed our stdin: an orderly stop
            reader.feed(data)
            while (event := reader.next_event()) is not None:
                if isinstance(event, FrameTooLarge):
                    reason = f"frame of {event.size} bytes is over the limit of {event.limit}"
                    self.streams.send(Failure(None, ErrorKind.PROTOCOL, reason))
                    return EXIT_PROTOCOL
                if isinstance(event, MalformedFrame):
                    self.streams.send(Failure(None, ErrorKind.PROTOCOL, event.reason))
                    continue
                if event.payload.get("t") == LIBRARY:
                    self.keep_library(event.payload)
                    continue
                started = time.monotonic()
                answer = self.answer(event.payload)
                if self.headroom.spent(time.monotonic() - started):
                    answer = replace(answer, retire=True)
                self.streams.send(answer)

    def receive(self) -> bytes:
        """The next bytes of the request stream; b"" at EOF.

        Right after an answer a sequential caller often sends the next request within tens
        of microseconds, and waking a blocked reader costs an inter-processor interrupt,
        about 30 us on the virtual machines measured: so we may first poll without blocking
        for up to ``SPIN_FOR_REQUEST``. Only while it pays: after a wait longer than that
        window (the caller is slow, or the machine busy: then a spin only takes CPU from the
        caller and the other workers) the next wait blocks at once, until a request comes
        within the window again."""
        requests = self.streams.requests
        try:
            return os.read(requests, READ_SIZE)  # a hand-over: the next request is here
        except BlockingIOError:
            pass
        started = time.monotonic()
        if self.spin_pays:
            spin_until = started + SPIN_FOR_REQUEST
            while time.monotonic() < spin_until:
                os.sched_yield()  # spinning must not starve what else runs on this CPU
                try:
                    return os.read(requests, READ_SIZE)
                except BlockingIOError:
                    continue
        while True:
            self.wait_readable.poll()
            try:
                data = os.read(requests, READ_SIZE)
            except BlockingIOError:
                continue
            self.spin_pays = time.monotonic() - started < SPIN_FOR_REQUEST
            return data

    def keep_library(self, payload: dict[str, Any]) -> None:
        """A library set comes without an answer, before the first request that names it.
        One that cannot be read is dropped: that request then fails, naming it."""
        try:
            self.engine.keep(LibrarySet.from_message(payload))
        except ProtocolViolation:
            pass

    def answer(self, payload: dict[str, Any]) -> Result | Failure:
        try:
            request = EvalRequest.from_message(payload)
        except ProtocolViolation as exc:
            return Failure(exc.request_id, ErrorKind.PROTOCOL, exc.reason)
        try:
            return Result(request.id, self.engine.run(request))
        except engines.EvaluationFailed as exc:
            return Failure(request.id, exc.kind, exc.message)
        except MemoryError:
            return Failure(request.id, ErrorKind.MEMORY, "the worker ran out of memory")
        except Exception as exc:  # never lose a request to a bug: say what happened
            reason = bound_text(f"{type(exc).__name__}: {exc}")
            return Failure(request.id, ErrorKind.INTERNAL, reason)


def serve(
    streams: ProtocolStreams,
    engine: engines.Engine,
    hello: WorkerHello,
    max_frame: int,
    memory_limit: int,
) -> int:
    """The hello and the loop, on a thread born inside every layer (and off the main thread,
    where cgo's stack probing re-reads /proc/self/maps on every call and now fails)."""
    outcome: list[int] = []

    def run_loop() -> None:
        loop = EvaluationLoop(streams, engine, max_frame, memory_limit)
        streams.send(hello)
        outcome.append(loop.run())

    loop_thread = threading.Thread(target=run_loop, name="jsonnet-worker-loop")
    loop_thread.start()
    loop_thread.join()
    return outcome[0] if outcome else EXIT_PROTOCOL
