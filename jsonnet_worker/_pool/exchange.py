"""One call's exchange with one worker: the steps of a call that need no pool, for the
pool's two call paths (``calls``) and for ``eval``'s one worker (``_cli.oneshot``).

Goals: ``eval`` makes one call in one worker, and pays for the imports of what it runs only.
The pool's state machine, its supervisor, fairness, accounting and tracing (with logging,
``concurrent.futures`` and ``socket``: about 20 ms of a command's imports on these machines)
are no part of one call; what is (checking and encoding the call, writing its frame, reading
the answer, how a call ended) is written once, here, below ``state`` and ``supervisor`` in
the pool's layers, and ``calls`` builds the pool's steps on it.

Plan: ``Worker`` is one worker as a call uses it (its process, its conversation, its
task cgroup if any, what was sent); a call's variables travel as one ``Variables`` value;
``prepare`` checks and encodes a call into a ``Call`` (its trust ``Domain``) before any
worker is involved; ``write_rest`` writes what is left of its frame; ``poll_channels`` is
one poll of the worker's channels (the blocking path and the one-shot worker),
``read_answer`` feeds what the response channel holds to the conversation; ``death`` and
``timed_out`` are the other ways a call ends. Each ends in one ``Outcome``. Every module
that uses these names imports them from here.

Weak spots: nothing here records a call (``calls.settle`` does, through the pool's state):
the one-shot worker's call is not accounted.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any, NamedTuple

from .._errors import (
    Error,
    EvaluationTimeout,
    InputTooLarge,
    InvalidArgument,
    InvalidType,
    JsonnetError,
    MemoryLimitExceeded,
    OutputTooLarge,
    ProtocolError,
    WorkerCrashed,
)
from .._library import Library
from .._wire.messages import (
    RETIRE_AT_MEMORY_SHARE,
    ErrorKind,
    EvalRequest,
    FormatStyle,
    Operation,
    escape_controls,
)
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
from .traces import TraceReceiver, TraceRequest
from .variables import split_variables

if TYPE_CHECKING:
    from collections.abc import Mapping

    from .._config import PoolConfig
    from .connection import WorkerConnection
    from .processes import WorkerProcess
    from .tasklimit import TaskCgroup

# A worker is recycled once fewer CPU seconds than this many call timeouts are left of its
# budget (a Go worker evaluates on up to two threads, GOMAXPROCS=2).
CPU_HEADROOM_TIMEOUTS = 2.0
# Room in a library set's frame beyond its names and contents: the map, its keys, the digest,
# and a header of a few bytes per name and content (4,096 files at most).
LIBRARY_FRAME_MARGIN = 64 * 1024


class Domain(NamedTuple):
    """A trust domain: the calls of one tenant, or (``tenant=None``) the calls without one.

    A named tuple, not a dataclass: it is a key of several dicts on every call (the queue,
    the workers each domain holds, the accounting), and a tuple's hash and equality run in C,
    where a frozen dataclass's generated ``__hash__``/``__eq__`` cost microseconds a call."""

    tenant: str | None

    def describe(self) -> str:
        return "no tenant" if self.tenant is None else f"tenant {self.tenant!r}"


NO_TENANT = Domain(None)
# The ``Domain`` of each tenant name seen lately, so that one tenant's calls share one (a
# named tuple's construction costs three dict lookups); forgotten all at once past
# ``DOMAINS_KEPT`` names, since callers may make names up. Equal by value: which one a call
# gets never matters.
DOMAINS_KEPT = 1024
_domains: dict[str, Domain] = {}


class Outcome(NamedTuple):
    """How one call on a worker ended, on either call path: an answer (the connection's
    ``Answer``) or a typed error, and whether the worker may serve again.

    ``reason`` says, for the log, why the worker goes (never a snippet's text or value);
    ``recycle``, why a worker that may be kept is replaced all the same (it asked to be).

    A named tuple, as ``Domain``: one is made on every call, and a frozen dataclass's
    ``__init__`` (an ``object.__setattr__`` per field) costs three times a tuple's."""

    answer: Any = None
    error: Error | None = None
    keep: bool = False
    died: bool = False
    reason: str = ""
    recycle: str = ""


class Worker:
    """One worker as the pool uses it: its process (the mechanism), its conversation, and
    the cgroup that bounds its tasks (None where the pool has none: ``tasklimit``)."""

    __slots__ = (
        "connection",
        "cpu_mark",
        "outgoing",
        "pid",
        "process",
        "sent_at",
        "sent_id",
        "tasks",
    )

    def __init__(
        self,
        process: WorkerProcess,
        connection: WorkerConnection,
        tasks: TaskCgroup | None = None,
    ) -> None:
        self.process = process
        self.connection = connection
        self.tasks = tasks
        self.pid = process.pid
        # For accounting (``calls.settle``): its CPU clock when its last call settled (at
        # its hello before any), so a call's CPU is one clock read at settle minus this;
        # and when, and for which request id, its last request was written.
        self.cpu_mark = 0.0
        self.sent_at = 0.0
        self.sent_id = 0
        # The bytes of the request being sent: its frame, after a library set's if the
        # worker did not hold that set (``WorkerConnection.send_request``).
        self.outgoing = b""

    def __repr__(self) -> str:
        return f"<Worker pid={self.pid} {self.connection.state.value}>"

    def send_request(self, request: EvalRequest, frame: bytes, library: Library | None) -> int:
        """Register ``request`` with the conversation and write what the channel takes of
        its bytes (``outgoing``: ``frame``, after ``library``'s if this worker lacks it) now;
        the bytes written (the rest of ``outgoing`` is the caller's to write)."""
        self.outgoing = self.connection.send_request(request, encoded=frame, library=library)
        self.sent_at, self.sent_id = time.monotonic(), request.id
        return self.process.send(self.outgoing) or 0

    def why_it_died(self) -> tuple[MemoryLimitExceeded | WorkerCrashed | EvaluationTimeout, str]:
        """After it has exited (reaped) during a call: the call's error, and the reason the
        pool logs. A worker whose cgroup refused a task at its limit died of that (the Go
        runtime aborts with "pthread_create failed", which would otherwise read as memory)."""
        how = self.process.how_it_ended()
        error = self.process.death_error()  # drains what it printed
        if self.tasks is not None and self.tasks.limit_reached():
            limit = self.tasks.limit
            crashed = WorkerCrashed(
                f"worker {self.pid} reached its task limit ({limit} threads and processes, "
                f"its cgroup's pids.max) and {how} during the evaluation; it is replaced",
                returncode=self.process.returncode,
                stderr_tail=escape_controls(self.process.stderr.text()),
            )
            return crashed, f"reached its task limit of {limit} (pids.max) and {how} during a call"
        if isinstance(error, MemoryLimitExceeded):
            return error, f"ran out of memory and {how}"
        return error, f"{how} during a call"

    def close(self, grace: float = 0.0) -> None:
        """Stop, reap and close the process, then remove its cgroup (a cgroup can be removed
        only once its tasks are gone). Idempotent."""
        self.process.close(grace)
        if self.tasks is not None:
            self.tasks.remove()


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

    A named tuple, as ``Domain`` and ``Outcome`` are: one is made on every call,
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
        _check_style(style)
    digest = "" if library is None else _library_digest(config, library)
    if tenant is None:
        domain = NO_TENANT
    elif isinstance(tenant, str):
        domain = _domains.get(tenant) or _domain_of(tenant)
    else:
        raise InvalidType(f"tenant must be a str or None, not {type(tenant).__name__}")
    ext_vars, tla_vars, ext_codes, tla_codes = variables
    # Each kind split (``split_variables``) only if the call gives it: most give one kind.
    ext_strings, ext_code = (
        ({}, {})
        if ext_vars is None and ext_codes is None
        else split_variables("ext", ext_vars, ext_codes)
    )
    tla_strings, tla_code = (
        ({}, {})
        if tla_vars is None and tla_codes is None
        else split_variables("tla", tla_vars, tla_codes)
    )
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


def _domain_of(tenant: str) -> Domain:
    """A new tenant name's ``Domain``, kept (``_domains``)."""
    if len(_domains) >= DOMAINS_KEPT:
        _domains.clear()
    domain = _domains[tenant] = Domain(tenant)
    return domain


def _check_style(style: FormatStyle) -> None:
    """A ``fmt`` call's formatter options, checked."""
    if not isinstance(style, FormatStyle):
        raise InvalidType(f"style must be a FormatStyle, not {type(style).__name__}")
    if problem := style.problem():
        raise InvalidArgument(f"style: {problem}")


def _timeout(timeout: float) -> float:
    """A call's own timeout, checked."""
    if not isinstance(timeout, int | float) or isinstance(timeout, bool):
        raise InvalidType(f"timeout must be a number of seconds, not {type(timeout).__name__}")
    if not math.isfinite(timeout) or timeout <= 0:
        raise InvalidArgument(f"timeout must be a positive number of seconds, not {timeout}")
    return float(timeout)


# -- with a worker: write, read -----------------------------------------------------------


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
    event = worker.connection.next_event()
    if type(event) is Answer and not event.retire:  # most calls: ``_outcome``'s first case
        return Outcome(event, None, True)  # answer, no error, kept (positional: quicker)
    return _outcome(worker, event)


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
