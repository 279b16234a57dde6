"""The steps of one call that the blocking and asyncio paths share (``facade.WorkerPool``).

Goals: the two call paths differ only in how they wait (a lock and ``poll``, or a future
and the event loop's readers), as httpx's ``Client`` and ``AsyncClient`` do; everything
else (checking and encoding a call, starting its exchange, reading what the worker sent,
turning an answer, a failure, a death or the deadline into one ``Outcome``, and the outcome
into a result or a typed error) is written once, here.

Plan: a call's variables travel as one ``Variables`` value; ``prepare`` checks and encodes
a call into a ``Call`` before any worker is involved; ``ready_for_call`` vets a worker just
checked out; ``start``/``write_rest`` write the frame; ``read_answer`` feeds the worker's
connection (``poll_channels``: one poll of its channels, for the blocking path and the CLI's
one-shot worker); ``death``/``timed_out`` are the other ways a call ends; ``settle`` records the
outcome through the pool's state and returns the answer or raises; ``abandon`` is the end of
a call its caller left. Functions, not a class: each takes what it reads, so the per-call
path pays no extra object. A caller's ask for its ``std.trace`` lines travels as
``Call.traces``; ``settle`` cuts them from the call's stderr capture (``traces``) and gives
them to the caller before it returns or raises; a caller that did not ask pays one test.

Measurement, for per-tenant accounting and ``last_call()``: ``settle`` and ``abandon`` (every
call that was admitted ends in one of them) put each call in ``state.accounting`` and
``tracing.publish`` it. Its queue wait runs from ``Call.ready_at`` (encoded: admission
follows at once) to ``Worker.sent_at`` (its request written, by the caller or by the giver
of a hand-over); its run time from there to settle; its CPU is the worker's CPU clock read
once at settle (the read ``cpu_budget`` needs, now made on every call: one
``clock_gettime``) minus the worker's ``cpu_mark`` (that clock at its previous settle or its
hello). So the CPU a worker spends idle between two calls (a Go runtime's housekeeping, far
under ``IDLE_CPU_ALLOWANCE``) is charged to its next call. Everything is read before the
settle's effects are performed: a hand-over there writes the next caller's request.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

from .._config import PoolConfig
from .._errors import (
    Error,
    EvaluationTimeout,
    InputTooLarge,
    InvalidArgument,
    InvalidType,
    JsonnetError,
    MemoryLimitExceeded,
    OutputTooLarge,
    Overloaded,
    PoolClosed,
    ProtocolError,
)
from .._library import Library
from .._wire.messages import (
    RETIRE_AT_MEMORY_SHARE,
    ErrorKind,
    EvalRequest,
    FormatStyle,
    Operation,
)
from . import tracing
from .accounting import CANCELLED
from .connection import (
    MAX_CALL_OUTPUT,
    NEED_DATA,
    Answer,
    ConnectionBroken,
    ConnectionClosed,
    ConnectionEvent,
    Failure,
)
from .deadlines import CPU_CLOCK_BACKSTOP
from .state import CPU_HEADROOM_TIMEOUTS, NO_TENANT, Domain, Effect, Outcome, PoolState, Ticket
from .supervisor import Worker
from .traces import TraceReceiver, TraceRequest, deliver, lines_of
from .variables import split_variables

Perform = Callable[[Iterable[Effect]], None]
# Room in a library set's frame beyond its names and contents: the map, its keys, the digest,
# and a header of a few bytes per name and content (4,096 files at most).
LIBRARY_FRAME_MARGIN = 64 * 1024


class Variables(NamedTuple):
    """A call's Jsonnet variables as its caller gave them (checked and encoded by
    ``prepare``): external and top-level, as Python values or as Jsonnet code. A named
    tuple, as ``Call``."""

    ext_vars: Mapping[str, Any] | None = None
    tla_vars: Mapping[str, Any] | None = None
    ext_codes: Mapping[str, str] | None = None
    tla_codes: Mapping[str, str] | None = None


NO_VARIABLES = Variables()  # check and format take none


class Call(NamedTuple):
    """One encoded call: the request and its frame, its timeout, the seconds encoding took
    (they count against the timeout), its trust domain, when it was ready (its
    ``time.monotonic()``: where its queue wait starts), and its caller's ask for its
    ``std.trace`` lines (None: nobody asked).

    A named tuple, as ``state.Domain`` and ``state.Outcome``: one is made on every call,
    and a frozen dataclass's ``__init__`` (an ``object.__setattr__`` per field) costs three
    times a tuple's."""

    request: EvalRequest
    frame: bytes
    timeout: float
    spent: float
    domain: Domain
    ready_at: float
    traces: TraceRequest | None = None
    library: Library | None = None

    def time_left(self) -> float:
        return self.timeout - self.spent


# -- before a worker: check and encode ---------------------------------------------------


def prepare(
    config: PoolConfig,
    request_id: int,
    operation: Operation,
    snippet: str,
    filename: str,
    timeout: float | None,
    tenant: str | None,
    *,
    variables: Variables,
    on_trace: TraceReceiver | None = None,
    max_stack: int | None = None,
    max_output: int | None = None,
    style: FormatStyle | None = None,
    library: Library | None = None,
) -> Call:
    """Check and encode a call before any worker is involved; the time encoding takes
    (tens of milliseconds for a 10 MB snippet) counts against its timeout. ``on_trace``:
    the caller's receiver of the call's ``std.trace`` lines (``traces``); ``max_stack``,
    ``max_output``: the call's own (None: the pool's), checked as the pool's are;
    ``style``: a ``fmt`` call's formatter options (None: jsonnetfmt's defaults);
    ``library``: the set its imports are served from (None: every import is refused)."""
    seconds = config.timeout if timeout is None else _timeout(timeout)
    if max_stack is not None or max_output is not None:
        config = _with_limits(config, max_stack, max_output)
    budget = config.cpu_budget
    if budget is not None and CPU_HEADROOM_TIMEOUTS * seconds >= budget:
        # No worker, even a fresh one, could be trusted to finish it before RLIMIT_CPU.
        raise InvalidArgument(
            f"timeout={seconds:g} s cannot fit a worker's cpu_budget={budget:g} CPU seconds "
            f"(a call needs {CPU_HEADROOM_TIMEOUTS:g} x its timeout of CPU left): give a "
            f"timeout under {budget / CPU_HEADROOM_TIMEOUTS:g} s or a larger cpu_budget"
        )
    started = time.monotonic()
    traces = None
    if on_trace is not None:
        if not callable(on_trace):
            raise InvalidType(f"on_trace must be callable, not {type(on_trace).__name__}")
        traces = TraceRequest(on_trace, config.max_trace_lines, config.max_trace_bytes)
    if not isinstance(snippet, str):
        raise InvalidType(f"snippet must be str, not {type(snippet).__name__}")
    if not isinstance(filename, str):
        raise InvalidType(f"filename must be str, not {type(filename).__name__}")
    if style is not None:
        if not isinstance(style, FormatStyle):
            raise InvalidType(f"style must be a FormatStyle, not {type(style).__name__}")
        if problem := style.problem():
            raise InvalidArgument(f"style: {problem}")
    digest = "" if library is None else _library_digest(config, library)
    domain = _domain(tenant)
    ext_strings, ext_code = split_variables("ext", variables.ext_vars, variables.ext_codes)
    tla_strings, tla_code = split_variables("tla", variables.tla_vars, variables.tla_codes)
    request = EvalRequest(
        id=request_id,
        snippet=snippet,
        filename=filename,
        ext_vars=ext_strings,
        ext_codes=ext_code,
        tla_vars=tla_strings,
        tla_codes=tla_code,
        max_stack=config.max_stack,
        max_output=config.max_output,
        max_trace=config.max_trace,
        operation=operation,
        style=style,
        library=digest,
    )
    try:
        frame = request.encode()
    except UnicodeEncodeError as exc:
        raise InvalidArgument(
            f"the snippet, its file name or a variable is not valid Unicode ({exc.reason} "
            f"at position {exc.start}: a lone surrogate?)"
        ) from None
    if len(frame) - 4 > config.max_request:
        raise InputTooLarge(
            f"the request is {len(frame)} bytes, over max_request={config.max_request}"
        )
    ready_at = time.monotonic()
    return Call(request, frame, seconds, ready_at - started, domain, ready_at, traces, library)


def _with_limits(config: PoolConfig, max_stack: int | None, max_output: int | None) -> PoolConfig:
    """The pool's config with a call's own ``max_stack``/``max_output``: checked by
    ``PoolConfig`` as a pool's are; a ``max_output`` over both the pool's and
    ``MAX_CALL_OUTPUT`` (the answer cap the parent keeps) is refused."""
    changes: dict[str, int] = {}
    if max_stack is not None:
        changes["max_stack"] = max_stack
    if max_output is not None:
        changes["max_output"] = max_output
    try:
        limited = config.replace(**changes)
    except InvalidArgument as exc:
        raise InvalidArgument(f"this call's {exc}") from None
    except InvalidType as exc:
        raise InvalidType(f"this call's {exc}") from None
    if limited.max_output > max(config.max_output, MAX_CALL_OUTPUT):
        raise InvalidArgument(
            f"max_output={limited.max_output} is over the {MAX_CALL_OUTPUT} bytes a call may "
            f"ask for (its answer must fit the wire format's frame limit; the pool's own "
            f"max_output={config.max_output} is the other ceiling)"
        )
    return limited


def _library_digest(config: PoolConfig, library: Library) -> str:
    """The digest a request names its library set by, once the set is checked to be a
    ``Library`` whose frame a worker will read (``max_request``)."""
    if not isinstance(library, Library):
        raise InvalidType(f"library must be a Library, not {type(library).__name__}")
    if library.size + LIBRARY_FRAME_MARGIN > config.max_request:
        raise InputTooLarge(
            f"the library set is {library.size} bytes, over max_request={config.max_request}"
        )
    return library.digest


def _timeout(timeout: float) -> float:
    """A call's own timeout, checked."""
    if not isinstance(timeout, int | float) or isinstance(timeout, bool):
        raise InvalidType(f"timeout must be a number of seconds, not {type(timeout).__name__}")
    if not math.isfinite(timeout) or timeout <= 0:
        raise InvalidArgument(f"timeout must be a positive number of seconds, not {timeout}")
    return float(timeout)


def _domain(tenant: str | None) -> Domain:
    if tenant is None:
        return NO_TENANT
    if not isinstance(tenant, str):
        raise InvalidType(f"tenant must be a str or None, not {type(tenant).__name__}")
    return Domain(tenant)


def queue_timed_out(config: PoolConfig) -> Overloaded:
    return Overloaded(f"no worker became free within {config.queue_timeout} s")


# -- with a worker: vet it, write, read --------------------------------------------------


def ready_for_call(state: PoolState[Worker], perform: Perform, ticket: Ticket) -> bool:
    """A worker just taken from the idle list: what it printed before its first call (its
    start-up's) is dropped; one that wrote to its stderr after a call (every line a call
    prints is written before its answer: these would be late, or early for the next call),
    or to its response channel while idle, or whose channels ended, is discarded (False:
    take another). So stderr never crosses calls (``traces``)."""
    worker: Worker = ticket.worker
    process = worker.process
    stdout, stderr = process.ready()
    if stderr:
        process.drain_stderr(keep=False)
        if worker.sent_id:  # it has served a call: nothing may follow its answer
            reason = (
                "wrote to its stderr while idle" if process.stderr_open else "closed its stderr"
            )
            perform(state.reject(ticket, reason))
            return False
    if not stdout:
        return True
    data = process.read_stdout()
    if data is None:
        return True
    worker.connection.receive_data(data)
    if data:
        perform(state.reject(ticket, "wrote to its channel while idle"))
    else:  # it died while idle (its pidfd may not have been seen yet)
        perform(state.reject(ticket, "died while idle", died=True))
    return False


def start(ticket: Ticket) -> memoryview | None:
    """Register the request with the conversation (unless the hand-over did) and write
    what the channel takes of its frame now; the rest, if any. What the worker prints
    from now on is this call's (stderr was drained before it came to us), its head kept up
    to the bytes of trace its caller may get."""
    worker, call = ticket.worker, ticket.call
    sent = (
        ticket.written
        if ticket.handed
        else worker.send_request(call.request, call.frame, call.library)
    )
    traces = call.traces
    if traces is None:
        worker.process.stderr.mark()
    else:
        worker.process.stderr.mark(traces.max_bytes)
    return write_rest(worker, memoryview(worker.outgoing)[sent:])


def write_rest(worker: Worker, data: memoryview) -> memoryview | None:
    """Write what the channel takes now; the rest, or None when all is written (or the
    worker is gone, which the caller learns from its response channel)."""
    if not data:
        return None
    written = worker.process.send(data)
    if written is None:
        return None
    rest = data[written:]
    return rest if rest else None


def poll_channels(
    worker: Worker, pending: memoryview | None, wait_ms: float
) -> tuple[Outcome | None, memoryview | None]:
    """One poll of the worker's channels (its ``poller``, with its request channel registered
    for POLLOUT while ``pending`` is not None), up to ``wait_ms``: an outcome read from its
    response channel, its stderr drained, the rest of the frame written. Returns the outcome
    (or None) and what is still to write."""
    process = worker.process
    poller = process.poller
    for fd, _ in poller.poll(wait_ms):
        if fd == process.stdout:
            outcome = read_answer(worker)
            if outcome is not None:
                return outcome, pending
        elif fd == process.stderr_fd:
            if not process.drain_stderr():
                poller.unregister(process.stderr_fd)
        elif pending is not None:
            pending = write_rest(worker, pending)
            if pending is None:
                poller.unregister(process.stdin)
    return None, pending


def read_answer(worker: Worker) -> Outcome | None:
    """Feed what the response channel holds to the conversation: an outcome, or None."""
    data = worker.process.read_stdout()
    if data is None:
        return None
    worker.connection.receive_data(data)
    return _outcome(worker, worker.connection.next_event())


# -- how a call ended ----------------------------------------------------------------------

# What a worker's error kind means, and whether the worker may serve again.
_FAILURES: dict[ErrorKind, tuple[type[Error], bool]] = {
    ErrorKind.JSONNET: (JsonnetError, True),
    ErrorKind.OUTPUT_TOO_LARGE: (OutputTooLarge, True),
    ErrorKind.MEMORY: (MemoryLimitExceeded, False),
    ErrorKind.PROTOCOL: (ProtocolError, False),
    ErrorKind.INTERNAL: (ProtocolError, False),
}
# The end of a worker's response channel: each path waits for its exit in its own way,
# then calls ``death``.
CLOSED = Outcome(reason="closed")


def _retire_reason(retire: bool) -> str:
    if not retire:
        return ""
    return f"it used over {RETIRE_AT_MEMORY_SHARE:.0%} of the memory headroom it started with"


def _outcome(worker: Worker, event: ConnectionEvent) -> Outcome | None:
    """What one event of the conversation means for the call (None: need more data)."""
    if event is NEED_DATA:
        return None
    if isinstance(event, Answer):
        return Outcome(answer=event, keep=True, recycle=_retire_reason(event.retire))
    if isinstance(event, Failure):
        error_type, keep = _FAILURES[event.kind]
        message = event.message
        if error_type is ProtocolError:
            message = f"the worker reported {event.kind.value}: {message}"
            return Outcome(error=ProtocolError(message), reason=f"reported {event.kind.value}")
        if error_type is MemoryLimitExceeded:
            return Outcome(error=MemoryLimitExceeded(message), reason="ran out of memory")
        return Outcome(error=error_type(message), keep=keep, recycle=_retire_reason(event.retire))
    if isinstance(event, ConnectionClosed):
        return CLOSED
    reason = event.reason if isinstance(event, ConnectionBroken) else type(event).__name__
    return Outcome(
        error=ProtocolError(f"worker {worker.pid} broke the protocol ({reason}); replaced"),
        reason=f"broke the protocol: {reason}",
    )


def death(worker: Worker, call: Call, cut: bool) -> Outcome:
    """After the end of its response channel: why it died; or, still running, that the
    deadline came first (``cut``: the wait for its exit was cut short by the deadline),
    or that it closed its channel in mid-call and went on, which is a lie."""
    process = worker.process
    if process.wait(0.0) is None:
        process.kill()
        if cut:
            return timed_out(call)
        return Outcome(
            error=ProtocolError(
                f"worker {worker.pid} closed its response channel during the call; replaced"
            ),
            reason="closed its response channel during the call",
        )
    error, reason = worker.why_it_died()
    return Outcome(error=error, died=True, reason=reason)


def timed_out(call: Call, expired: str = "wall", counted: str = "wall") -> Outcome:
    """The call's deadline came: on the clock ``expired`` ("wall" or "cpu"), its timeout
    being ``counted`` on that clock (``timeout_clock``): on the CPU clock, a wall-clock
    expiry is the backstop's (``deadlines.CPU_CLOCK_BACKSTOP``)."""
    if expired == "cpu":
        what = f"used its {call.timeout} s of CPU (CPU clock)"
    elif counted == "cpu":
        backstop = CPU_CLOCK_BACKSTOP * call.timeout
        what = (
            f"ran past the {backstop:g} s wall-clock backstop of its {call.timeout} s "
            "CPU-clock timeout"
        )
    else:
        what = f"ran past its {call.timeout} s deadline (wall clock)"
    return Outcome(
        error=EvaluationTimeout(f"the evaluation {what}; its worker was killed", clock=expired),
        reason=f"{what}; killed",
    )


def settle(state: PoolState[Worker], perform: Perform, ticket: Ticket, outcome: Outcome) -> Answer:
    """Record how the call ended (the pool's counters, the tenant's accounting); check the
    worker in or discard it; its ``std.trace`` lines to a caller that asked; the answer,
    or the call's typed error."""
    worker: Worker = ticket.worker
    call: Call = ticket.call
    if outcome.keep:
        outcome = _after_call(worker, outcome)
    # Before perform: a hand-over there writes the next caller's request to this worker
    # (from then on, what it prints is that call's).
    traces = call.traces
    lines = () if traces is None else lines_of(worker.process.stderr, traces)
    cpu, used = _cpu_since_mark(worker)
    sent_at, now = worker.sent_at, time.monotonic()
    budget_cpu = cpu if outcome.keep and state.config.cpu_budget is not None else None
    perform(state.settle(worker, outcome, budget_cpu))
    error = outcome.error
    if error is not None and state.view().terminated:
        error = PoolClosed("the pool was terminated during the call")
    kind = None if error is None else error.kind
    _record(state, call, worker.pid, sent_at - call.ready_at, now - sent_at, used, kind)
    if traces is not None and lines:
        deliver(traces, lines)
    if error is not None:
        raise error
    answer: Answer = outcome.answer
    return answer


def abandon(state: PoolState[Worker], perform: Perform, ticket: Ticket, exc: BaseException) -> None:
    """The caller left its call (``exc``: an error before or during the exchange, a
    cancellation, an interrupt): the state's ``abandon`` (out of the queue, its worker
    discarded), and the call accounted, its worker's CPU read before the kill."""
    call: Call = ticket.call
    worker: Worker | None = ticket.worker
    now = time.monotonic()
    pid, wait, run, used = None, now - call.ready_at, None, 0.0
    if worker is not None:
        pid, used = worker.pid, _cpu_since_mark(worker)[1]
        if worker.sent_id == call.request.id:  # its request went out: it ran
            wait, run = worker.sent_at - call.ready_at, now - worker.sent_at
    perform(state.abandon(ticket))
    kind = exc.kind if isinstance(exc, Error) else CANCELLED
    _record(state, call, pid, wait, run, used, kind)


def _cpu_since_mark(worker: Worker) -> tuple[float | None, float]:
    """The worker's CPU clock (for one that died and was reaped, as read before the reap;
    None: unreadable), and the CPU seconds since its mark, which moves there (nothing is
    charged for an unreadable clock)."""
    process = worker.process
    cpu = process.cpu_seconds()
    if cpu is None:
        cpu = process.cpu_at_exit
        if cpu is None:
            return None, 0.0
    used = cpu - worker.cpu_mark
    worker.cpu_mark = cpu
    return cpu, used if used > 0.0 else 0.0


def _record(
    state: PoolState[Worker],
    call: Call,
    pid: int | None,
    wait: float,
    run: float | None,
    used: float,
    kind: str | None,
) -> None:
    """One ended call into the tenant's accounting and to its caller (``run`` None: it
    never reached a worker, so its wait is no sample of the wait for one)."""
    tenant = call.domain.tenant
    state.accounting.record(tenant, kind, used, None if run is None else wait, run)
    tracing.publish(tenant, pid, wait, run or 0.0, used, kind)


def _after_call(worker: Worker, outcome: Outcome) -> Outcome:
    """Before the worker serves again: its stderr drained into the call's capture (a trace
    line written just before the answer may not have been read yet); bytes after its
    answer, or a closed stderr, mean it is not to be trusted."""
    process = worker.process
    stdout, stderr = process.ready()
    if stderr:
        process.drain_stderr()
    if stdout:
        return outcome._replace(keep=False, reason="wrote to its channel after its answer")
    if not process.stderr_open:
        return outcome._replace(keep=False, reason="closed its stderr")
    return outcome
