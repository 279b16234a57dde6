"""WorkerPool: the public pool, and its blocking and asyncio call paths as mirrors.

Goals: per call, no hop through another thread (the caller talks to its worker directly and
its deadline is the ``poll`` timeout; asyncio uses the event loop's readers); exactly one
outcome (a result or a typed error, never a hang, never another call's data); a pool that
heals itself; and nothing a worker sends believed unchecked.

Plan: both paths run the same steps with the same names, over one ``_state.Outcome``
(httpx's ``Client``/``AsyncClient`` discipline): ``_prepare`` (check and encode),
``admit``, ``_check_out``/``_acheck_out`` (a ``Ticket``: an idle worker of the caller's
trust domain, or wait in FIFO), ``_exchange``/``_aexchange`` (write the frame, read the
answer through the worker's ``WorkerConnection`` until the deadline), ``_settle`` (record,
check in or discard). Any ``BaseException`` anywhere between check-out and settle (an
interrupt, a cancellation) abandons the ticket: out of the queue, and a worker it holds
discarded. Every state change is a ``_state.PoolState`` transition; the supervisor's
``perform`` carries out the actions it returns. The call flow is drawn in docs/DESIGN.md.

Fork: a pool belongs to the process that created it. In a forked child every call on it
raises ``ForkedPool`` and ``close``/``terminate`` do nothing (the workers, their channels
and the supervisor are the parent's); the module-level default pool starts afresh.

Weak spots: a timed-out or cancelled call costs the pool that worker (it is killed: its
engine cannot be interrupted), and a replacement takes one interpreter start (~60 ms; a
spare hides it).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import dataclasses
import errno
import itertools
import logging
import math
import os
import select
import sys
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from .._config import (
    DEFAULT_MAX_OUTPUT,
    DEFAULT_MAX_STACK,
    DEFAULT_MEMORY_LIMIT,
    DEFAULT_QUEUE_LIMIT,
    DEFAULT_QUEUE_TIMEOUT,
    DEFAULT_TIMEOUT,
    PoolConfig,
)
from .._errors import (
    Error,
    EvaluationTimeout,
    ForkedPool,
    InputTooLarge,
    InvalidArgument,
    InvalidType,
    JsonnetError,
    MemoryLimitExceeded,
    OutputTooLarge,
    Overloaded,
    PoolClosed,
    ProtocolError,
    UnsupportedPlatform,
    WorkerStartError,
)
from .._report import PoolStats, SandboxStatus
from .._wire.protocol import RETIRE_AT_MEMORY_SHARE, Action, ErrorKind, EvalRequest, encode_request
from .connection import (
    NEED_DATA,
    Answer,
    ConnectionBroken,
    ConnectionClosed,
    ConnectionEvent,
    Failure,
)
from .processes import WorkerProcess, settings_for
from .state import NO_TENANT, Domain, Outcome, Phase, PoolState, Ticket
from .supervisor import Supervisor, Worker
from .variables import split_variables

logger = logging.getLogger("jsonnet_worker")

__all__ = [
    "DEFAULT_MAX_OUTPUT",
    "DEFAULT_MAX_STACK",
    "DEFAULT_MEMORY_LIMIT",
    "DEFAULT_QUEUE_LIMIT",
    "DEFAULT_QUEUE_TIMEOUT",
    "DEFAULT_TIMEOUT",
    "WorkerPool",
    "check_platform",
    "default_size",
]

DEATH_GRACE = (
    1.0  # how long a worker whose channel ended may take to exit (bounded by the deadline)
)
HANDOVER_GRACE = 1.0  # how long a hand-over already under way may take to wake its caller


def _cpus() -> int:
    """The CPUs this process may use (``os.sched_getaffinity`` where it exists)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_size() -> int:
    """The CPUs this process may use, at least 2."""
    return max(2, _cpus())


def check_platform() -> None:
    """Raise UnsupportedPlatform where workers cannot be sandboxed and supervised."""
    if sys.platform != "linux":
        raise UnsupportedPlatform(
            f"the worker sandbox needs Linux (Landlock, seccomp, pidfd); this is {sys.platform}"
        )
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is None:
        raise UnsupportedPlatform("this Python has no os.pidfd_open (the pool needs pidfds)")
    try:
        os.close(pidfd_open(os.getpid()))
    except OSError as exc:
        if exc.errno in (errno.ENOSYS, errno.EPERM):
            raise UnsupportedPlatform(
                f"the kernel refuses pidfd_open ({os.strerror(exc.errno)}): the pool needs "
                "pidfds (Linux 5.3 or later, not blocked by a seccomp profile) to watch and "
                "signal its workers without a pid-reuse race"
            ) from None
        raise


@dataclass(frozen=True)
class _Call:
    """One encoded call: the request and its frame, its timeout, the seconds encoding took
    (they count against the timeout), and its trust domain."""

    request: EvalRequest
    frame: bytes
    timeout: float
    spent: float
    domain: Domain

    def time_left(self) -> float:
        return self.timeout - self.spent


class ThreadTicket(Ticket):
    """A blocking caller's ticket; its wake-up lock is made only if it has to wait."""

    __slots__ = ("_signal",)

    def arm(self) -> None:
        self._signal = threading.Lock()
        self._signal.acquire()

    def wake(self) -> bool:
        self._signal.release()
        return True

    def wait(self, timeout: float) -> bool:
        return self._signal.acquire(timeout=max(timeout, 0.0))


class AsyncTicket(Ticket):
    """An asyncio task's ticket: woken through its event loop, from any thread."""

    __slots__ = ("future", "loop")

    def arm(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.future: asyncio.Future[None] = loop.create_future()

    def _set(self) -> None:
        if not self.future.done():
            self.future.set_result(None)

    def wake(self) -> bool:
        if _running_loop() is self.loop:  # the giver runs on this loop: no self-pipe write
            self._set()
            return True
        try:
            self.loop.call_soon_threadsafe(self._set)
        except RuntimeError:  # its event loop is closed: nobody will take the worker
            return False
        return True


# What a worker's error kind means, and whether the worker may serve again.
_FAILURES: dict[ErrorKind, tuple[type[Error], bool]] = {
    ErrorKind.JSONNET: (JsonnetError, True),
    ErrorKind.OUTPUT_TOO_LARGE: (OutputTooLarge, True),
    ErrorKind.MEMORY: (MemoryLimitExceeded, False),
    ErrorKind.PROTOCOL: (ProtocolError, False),
    ErrorKind.INTERNAL: (ProtocolError, False),
}
# The end of a worker's response channel: each path waits for its exit in its own way.
_CLOSED = Outcome(reason="closed")


def _retire_reason(retire: bool) -> str:
    if not retire:
        return ""
    return f"it used over {RETIRE_AT_MEMORY_SHARE:.0%} of the memory headroom it started with"


class WorkerPool:
    """A pool of sandboxed worker processes that evaluate Jsonnet.

    ``WorkerPool(size, **options)`` or ``WorkerPool(config=PoolConfig(...))`` (options given
    too override the config's); see ``PoolConfig`` for every option. Safe to share between
    threads and asyncio tasks. Use it as a context manager, or call ``close()``; at
    interpreter exit a pool still open is terminated. A pool belongs to the process that
    created it: after ``fork()`` create a new one in the child (README: prefork servers).
    """

    def __init__(
        self,
        size: int | None = None,
        *,
        config: PoolConfig | None = None,
        _worker_command: list[str] | None = None,
        _fork_workers: bool = True,
        _template_command: list[str] | None = None,
        **options: Any,
    ) -> None:
        check_platform()
        if options.get("queue_limit", 0) is None:
            del options["queue_limit"]  # the signature before PoolConfig took None: the default
        if size is not None:
            options["size"] = size
        base = config or PoolConfig()
        try:
            config = base.replace(**options) if options else base
        except TypeError as exc:
            raise InvalidType(f"WorkerPool: {exc}") from None
        if config.size is None:
            config = config.replace(size=default_size())
        self.config = config
        self._pid = os.getpid()
        self._ids = itertools.count(1)
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()
        self._idle_done = threading.Condition(threading.Lock())
        self._state: PoolState[Worker] = PoolState(config, threading.Lock())
        # _fork_workers=False: every worker a re-exec start (the path a host without what
        # the template needs takes; tests and benchmarks force it to compare).
        self._supervisor = Supervisor(
            self._state,
            settings_for(config),
            command=_worker_command,
            fork_workers=_fork_workers,
            template_command=_template_command,
        )
        self._perform = self._supervisor.perform
        self._supervisor.start()
        _live_pools.add(self)
        self._supervisor.initial_done.wait()
        failure, reason = self._state.failure, self._state.start_failure
        if failure is not None or not self._state.has_started():
            self.terminate()
            if failure is not None:
                raise failure
            raise WorkerStartError(f"no worker could start: {reason}", cause=reason)

    # -- options (stored once, in ``config``) ----------------------------------------------

    @property
    def size(self) -> int:
        return self._state.size

    @property
    def spares(self) -> int:
        return self.config.spares

    @property
    def engine(self) -> str:
        return self.config.engine

    @property
    def timeout(self) -> float:
        return self.config.timeout

    @property
    def max_stack(self) -> int:
        return self.config.max_stack

    @property
    def max_output(self) -> int:
        return self.config.max_output

    @property
    def queue_limit(self) -> int:
        return self.config.queue_limit

    @property
    def queue_timeout(self) -> float:
        return self.config.queue_timeout

    # -- public API ----------------------------------------------------------------------

    @property
    def sandbox(self) -> SandboxStatus | None:
        """The sandbox status the workers reported (None before any hello), with the pool's
        ``template`` layer (forked workers, or re-exec workers and why)."""
        sandbox = self._state.sandbox
        if sandbox is None:
            return None
        return dataclasses.replace(sandbox, template=self._supervisor.template_status())

    @property
    def closed(self) -> bool:
        """True once ``close()`` or ``terminate()`` began (or no worker can ever start)."""
        return self._state.phase is not Phase.OPEN

    def stats(self) -> PoolStats:
        self._check_fork()
        source = self._supervisor.template_stats()
        return dataclasses.replace(
            self._state.stats(),
            template_pid=source.template_pid,
            forks=source.forks,
            fork_fallbacks=source.fallbacks,
            template_starts=source.template_starts,
        )

    def replace_template(self) -> None:
        """Start a new worker template now; the workers the old one forked serve on. A pool
        that re-executes its workers (no template on this host) does nothing."""
        self._check_fork()
        self._supervisor.replace_template()

    @property
    def supervisor_thread_id(self) -> int | None:
        """The native id of the thread that starts this pool's workers (``restrict_host``
        binds it too, and counts it as a thread it may leave running)."""
        return self._supervisor.thread.native_id

    def run_on_supervisor(self, function: Callable[[], object], timeout: float = 10.0) -> object:
        """Run ``function`` on the thread that starts this pool's workers and return its
        result (its exception is raised here). ``restrict_host`` applies the host's Landlock
        layer there: before Landlock ABI 8 a layer binds only the calling thread and what it
        starts later."""
        return self._supervisor.run_on_thread(function, timeout)

    def evaluate(
        self,
        snippet: str,
        ext_vars: Mapping[str, Any] | None = None,
        *,
        tla_vars: Mapping[str, Any] | None = None,
        ext_codes: Mapping[str, str] | None = None,
        tla_codes: Mapping[str, str] | None = None,
        filename: str = "snippet.jsonnet",
        timeout: float | None = None,
        tenant: str | None = None,
    ) -> Any:
        """Evaluate ``snippet`` in a worker and return the decoded JSON value. A worker that
        served one ``tenant`` never serves another (None: the calls without a tenant)."""
        call = self._prepare(
            Action.EVAL,
            snippet,
            ext_vars,
            tla_vars,
            ext_codes,
            tla_codes,
            filename,
            timeout,
            tenant,
        )
        return self._call(call).value

    def evaluate_json(
        self,
        snippet: str,
        ext_vars: Mapping[str, Any] | None = None,
        *,
        tla_vars: Mapping[str, Any] | None = None,
        ext_codes: Mapping[str, str] | None = None,
        tla_codes: Mapping[str, str] | None = None,
        filename: str = "snippet.jsonnet",
        timeout: float | None = None,
        tenant: str | None = None,
    ) -> str:
        """Like ``evaluate``, but return the manifested JSON text."""
        call = self._prepare(
            Action.EVAL,
            snippet,
            ext_vars,
            tla_vars,
            ext_codes,
            tla_codes,
            filename,
            timeout,
            tenant,
        )
        return self._call(call).json_text

    def check(
        self,
        snippet: str,
        *,
        filename: str = "snippet.jsonnet",
        timeout: float | None = None,
        tenant: str | None = None,
    ) -> None:
        """Parse and statically check ``snippet`` without evaluating it; raises JsonnetError
        with the engine's message (``file:line:col``) if it is not valid Jsonnet."""
        call = self._prepare(
            Action.CHECK, snippet, None, None, None, None, filename, timeout, tenant
        )
        self._call(call)

    def format(
        self,
        snippet: str,
        *,
        filename: str = "snippet.jsonnet",
        timeout: float | None = None,
        tenant: str | None = None,
    ) -> str:
        """``snippet`` formatted by go-jsonnet's formatter (``jsonnet fmt``)."""
        call = self._prepare(Action.FMT, snippet, None, None, None, None, filename, timeout, tenant)
        formatted: str = self._call(call).value
        return formatted

    async def aevaluate(
        self,
        snippet: str,
        ext_vars: Mapping[str, Any] | None = None,
        *,
        tla_vars: Mapping[str, Any] | None = None,
        ext_codes: Mapping[str, str] | None = None,
        tla_codes: Mapping[str, str] | None = None,
        filename: str = "snippet.jsonnet",
        timeout: float | None = None,
        tenant: str | None = None,
    ) -> Any:
        """``evaluate`` for asyncio: the event loop is never blocked, no thread per call."""
        call = self._prepare(
            Action.EVAL,
            snippet,
            ext_vars,
            tla_vars,
            ext_codes,
            tla_codes,
            filename,
            timeout,
            tenant,
        )
        return (await self._acall(call)).value

    async def aevaluate_json(
        self,
        snippet: str,
        ext_vars: Mapping[str, Any] | None = None,
        *,
        tla_vars: Mapping[str, Any] | None = None,
        ext_codes: Mapping[str, str] | None = None,
        tla_codes: Mapping[str, str] | None = None,
        filename: str = "snippet.jsonnet",
        timeout: float | None = None,
        tenant: str | None = None,
    ) -> str:
        """``evaluate_json`` for asyncio."""
        call = self._prepare(
            Action.EVAL,
            snippet,
            ext_vars,
            tla_vars,
            ext_codes,
            tla_codes,
            filename,
            timeout,
            tenant,
        )
        return (await self._acall(call)).json_text

    async def acheck(
        self,
        snippet: str,
        *,
        filename: str = "snippet.jsonnet",
        timeout: float | None = None,
        tenant: str | None = None,
    ) -> None:
        """``check`` for asyncio."""
        call = self._prepare(
            Action.CHECK, snippet, None, None, None, None, filename, timeout, tenant
        )
        await self._acall(call)

    async def aformat(
        self,
        snippet: str,
        *,
        filename: str = "snippet.jsonnet",
        timeout: float | None = None,
        tenant: str | None = None,
    ) -> str:
        """``format`` for asyncio."""
        call = self._prepare(Action.FMT, snippet, None, None, None, None, filename, timeout, tenant)
        formatted: str = (await self._acall(call)).value
        return formatted

    def submit(
        self,
        snippet: str,
        ext_vars: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> concurrent.futures.Future[Any]:
        """``evaluate`` in a background thread; returns a ``concurrent.futures.Future``."""
        self._check_fork()
        with self._executor_lock:
            if self.closed:
                raise PoolClosed("the pool is closed")
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    max_workers=self.size * 2, thread_name_prefix="jsonnet-worker-submit"
                )
            return self._executor.submit(self.evaluate, snippet, ext_vars, **kwargs)

    def close(self, timeout: float | None = None) -> None:
        """Refuse new calls, let calls in flight (and queued) finish, then stop and reap every
        worker. With ``timeout``, calls still running after it are cut off as by
        ``terminate()``. In a forked child: nothing (the workers are the parent's)."""
        if self._forked():
            return
        self._state.begin_close()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._idle_done:
            while self._state.in_flight:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._idle_done.wait(left)
        if self._state.in_flight:
            self.terminate()
            return
        self._shutdown(grace=DEATH_GRACE)

    def terminate(self) -> None:
        """Kill every worker now; calls in flight and queued raise PoolClosed. In a forked
        child: nothing (the workers are the parent's)."""
        if self._forked():
            return
        self._perform(self._state.begin_terminate())
        self._shutdown(grace=0.0)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the blocking path ----------------------------------------------------------------

    def _call(self, call: _Call) -> Answer:
        self._check_fork()
        ticket = ThreadTicket(call, call.domain)
        try:
            self._state.admit(ticket)
            try:
                self._check_out(ticket)
                outcome = self._exchange(ticket)
            except BaseException:
                self._perform(self._state.abandon(ticket))
                raise
            return self._settle(ticket, outcome)
        except Error as exc:
            self._state.count_error(exc)
            raise
        finally:
            self._leave(ticket)

    def _check_out(self, ticket: ThreadTicket) -> None:
        """A worker for this call: one at once, else wait in FIFO (the worker then comes with
        the request already written by whoever handed it over)."""
        state = self._state
        while state.take(ticket):
            if self._ready_for_call(ticket):
                return
        ticket.arm()
        self._perform(state.take_or_wait(ticket))
        if ticket.queued:
            self._wait(ticket)
        if ticket.error is not None:
            raise ticket.error

    def _wait(self, ticket: ThreadTicket) -> None:
        if ticket.wait(self.config.queue_timeout):
            return
        if self._state.give_up(ticket):
            raise ticket.error or self._queue_timed_out()
        if not ticket.wait(HANDOVER_GRACE):  # handed over just now: the wake-up follows
            raise Overloaded("the worker handed to this call did not arrive")

    def _exchange(self, ticket: Ticket) -> Outcome:
        """Write the frame (after what a caller handing the worker over already wrote),
        then read the answer until the deadline."""
        worker, call = ticket.worker, ticket.call
        deadline = time.monotonic() + call.time_left()
        pending = self._start(ticket)
        # The caller blocks in poll rather than spin for the answer: on 2 CPUs a spin took
        # the core go-jsonnet's collector needed (docs/DESIGN.md, "A short spin in
        # the worker, none in the caller").
        outcome = self._poll_for_answer(worker, pending, deadline)
        if outcome is None:
            return self._timed_out(call)
        return self._died(worker, call, deadline) if outcome is _CLOSED else outcome

    def _poll_for_answer(
        self, worker: Worker, pending: memoryview | None, deadline: float
    ) -> Outcome | None:
        """Poll the worker's channels (writing the rest of the frame) until an outcome or
        the deadline (None)."""
        process = worker.process
        poller = process.poller
        if pending is not None:
            poller.register(process.stdin, select.POLLOUT)
        try:
            while (left := deadline - time.monotonic()) > 0:
                for fd, _ in poller.poll(left * 1000.0 + 1):
                    if fd == process.stdout:
                        outcome = self._read_answer(worker)
                        if outcome is not None:
                            return outcome
                    elif fd == process.stderr_fd:
                        if not process.drain_stderr():
                            poller.unregister(process.stderr_fd)
                    elif pending is not None:
                        pending = self._write_rest(worker, pending)
                        if pending is None:
                            poller.unregister(process.stdin)
            return None
        finally:
            if pending is not None:
                poller.unregister(process.stdin)

    def _died(self, worker: Worker, call: _Call, deadline: float) -> Outcome:
        """The response channel ended: wait for the exit, within the deadline."""
        grace = min(DEATH_GRACE, max(0.0, deadline - time.monotonic()))
        worker.process.wait(grace)
        return self._death(worker, call, cut=grace < DEATH_GRACE)

    # -- the asyncio path (the same steps, the same names) -------------------------------

    async def _acall(self, call: _Call) -> Answer:
        self._check_fork()
        ticket = AsyncTicket(call, call.domain)
        try:
            self._state.admit(ticket)
            try:
                await self._acheck_out(ticket)
                outcome = await self._aexchange(ticket)
            except BaseException:
                self._perform(self._state.abandon(ticket))
                raise
            return self._settle(ticket, outcome)
        except Error as exc:
            self._state.count_error(exc)
            raise
        finally:
            self._leave(ticket)

    async def _acheck_out(self, ticket: AsyncTicket) -> None:
        state = self._state
        while state.take(ticket):
            if self._ready_for_call(ticket):
                return
        ticket.arm(asyncio.get_running_loop())
        self._perform(state.take_or_wait(ticket))
        if ticket.queued:
            await self._await(ticket)
        if ticket.error is not None:
            raise ticket.error

    async def _await(self, ticket: AsyncTicket) -> None:
        # asyncio.timeout, not wait_for: wait_for (3.11) swallows a cancellation that
        # arrives once the awaited future is done, and the call would go on.
        try:
            async with asyncio.timeout(self.config.queue_timeout):
                await asyncio.shield(ticket.future)
            return
        except TimeoutError:
            if self._state.give_up(ticket):
                raise ticket.error or self._queue_timed_out() from None
        try:  # handed over just now: the wake-up follows
            async with asyncio.timeout(HANDOVER_GRACE):
                await asyncio.shield(ticket.future)
        except TimeoutError:
            raise Overloaded("the worker handed to this call did not arrive") from None

    async def _aexchange(self, ticket: Ticket) -> Outcome:
        """``_exchange`` on the event loop's readers and a timer (with what is left of the
        timeout after encoding)."""
        loop = asyncio.get_running_loop()
        worker, call = ticket.worker, ticket.call
        process = worker.process
        deadline = time.monotonic() + call.time_left()
        pending: list[memoryview | None] = [self._start(ticket)]
        done: asyncio.Future[Outcome] = loop.create_future()
        timers: list[asyncio.TimerHandle] = []
        watched = _Watched(readers=[process.stdout, process.stderr_fd])

        def settle(outcome: Outcome) -> None:
            if not done.done():
                done.set_result(outcome)

        def on_exit(cut: bool = False) -> None:
            settle(self._death(worker, call, cut))

        def on_stdout() -> None:
            outcome = self._read_answer(worker)
            if outcome is _CLOSED:
                # Wait for its exit on its pidfd, in the loop, within the deadline.
                loop.remove_reader(process.stdout)
                loop.add_reader(process.pidfd, on_exit)
                watched.readers.append(process.pidfd)
                grace = min(DEATH_GRACE, max(0.0, deadline - time.monotonic()))
                timers.append(loop.call_later(grace, on_exit, grace < DEATH_GRACE))
            elif outcome is not None:
                settle(outcome)

        def on_stderr() -> None:
            if not process.drain_stderr():
                loop.remove_reader(process.stderr_fd)

        def on_stdin() -> None:
            pending[0] = self._write_rest(worker, pending[0] or memoryview(b""))
            if pending[0] is None:
                loop.remove_writer(process.stdin)

        loop.add_reader(process.stdout, on_stdout)
        loop.add_reader(process.stderr_fd, on_stderr)
        if pending[0] is not None:
            loop.add_writer(process.stdin, on_stdin)
            watched.writer = True
        timers.append(
            loop.call_later(max(call.time_left(), 0.0), lambda: settle(self._timed_out(call)))
        )
        try:
            return await done
        finally:
            _unwatch(loop, process, timers, watched)

    # -- shared by both paths ------------------------------------------------------------

    def _prepare(
        self,
        action: Action,
        snippet: str,
        ext_vars: Mapping[str, Any] | None,
        tla_vars: Mapping[str, Any] | None,
        ext_codes: Mapping[str, str] | None,
        tla_codes: Mapping[str, str] | None,
        filename: str,
        timeout: float | None,
        tenant: str | None,
    ) -> _Call:
        """Check and encode a call before any worker is involved; the time encoding takes
        (tens of milliseconds for a 10 MB snippet) counts against its timeout."""
        seconds = self._timeout(timeout)
        started = time.monotonic()
        if not isinstance(snippet, str):
            raise InvalidType(f"snippet must be str, not {type(snippet).__name__}")
        if not isinstance(filename, str):
            raise InvalidType(f"filename must be str, not {type(filename).__name__}")
        domain = _domain(tenant)
        ext_strings, ext_code = split_variables("ext", ext_vars, ext_codes)
        tla_strings, tla_code = split_variables("tla", tla_vars, tla_codes)
        config = self.config
        request = EvalRequest(
            id=next(self._ids),
            snippet=snippet,
            filename=filename,
            ext_vars=ext_strings,
            ext_codes=ext_code,
            tla_vars=tla_strings,
            tla_codes=tla_code,
            max_stack=config.max_stack,
            max_output=config.max_output,
            max_trace=config.max_trace,
            action=action,
        )
        try:
            frame = encode_request(request)
        except UnicodeEncodeError as exc:
            raise InvalidArgument(
                f"the snippet, its file name or a variable is not valid Unicode ({exc.reason} "
                f"at position {exc.start}: a lone surrogate?)"
            ) from None
        if len(frame) - 4 > config.max_request:
            raise InputTooLarge(
                f"the request is {len(frame)} bytes, over max_request={config.max_request}"
            )
        return _Call(request, frame, seconds, time.monotonic() - started, domain)

    def _timeout(self, timeout: float | None) -> float:
        if timeout is None:
            return self.config.timeout
        if not isinstance(timeout, int | float) or isinstance(timeout, bool):
            raise InvalidType(f"timeout must be a number of seconds, not {type(timeout).__name__}")
        if not math.isfinite(timeout) or timeout <= 0:
            raise InvalidArgument(f"timeout must be a positive number of seconds, not {timeout}")
        return float(timeout)

    def _ready_for_call(self, ticket: Ticket) -> bool:
        """A worker just taken from the idle list: what it printed since its last call is
        dropped (stderr never crosses calls); one that wrote to its response channel while
        idle, or whose channel ended, is discarded (False: take another)."""
        worker: Worker = ticket.worker
        process = worker.process
        stdout, stderr = process.ready()
        if stderr:
            process.drain_stderr(keep=False)
        if not stdout:
            return True
        data = process.read_stdout()
        if data is None:
            return True
        worker.connection.receive_data(data)
        if data:
            self._perform(self._state.reject(ticket, "wrote to its channel while idle"))
        else:  # it died while idle (its pidfd may not have been seen yet)
            self._perform(self._state.reject(ticket, "died while idle", died=True))
        return False

    def _start(self, ticket: Ticket) -> memoryview | None:
        """Register the request with the conversation (unless the hand-over did) and write
        what the channel takes of its frame now; the rest, if any. What the worker prints
        from now on is this call's (stderr was drained before it came to us)."""
        worker, call = ticket.worker, ticket.call
        sent = ticket.written if ticket.handed else worker.send_request(call.request, call.frame)
        worker.process.stderr.mark()
        return self._write_rest(worker, memoryview(call.frame)[sent:])

    def _read_answer(self, worker: Worker) -> Outcome | None:
        """Feed what the response channel holds to the conversation: an outcome, or None."""
        data = worker.process.read_stdout()
        if data is None:
            return None
        worker.connection.receive_data(data)
        return self._outcome(worker, worker.connection.next_event())

    def _outcome(self, worker: Worker, event: ConnectionEvent) -> Outcome | None:
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
            return Outcome(
                error=error_type(message), keep=keep, recycle=_retire_reason(event.retire)
            )
        if isinstance(event, ConnectionClosed):
            return _CLOSED
        reason = event.reason if isinstance(event, ConnectionBroken) else type(event).__name__
        return Outcome(
            error=ProtocolError(f"worker {worker.pid} broke the protocol ({reason}); replaced"),
            reason=f"broke the protocol: {reason}",
        )

    def _death(self, worker: Worker, call: _Call, cut: bool) -> Outcome:
        """After the end of its response channel: why it died; or, still running, that the
        deadline came first (``cut``: the wait for its exit was cut short by the deadline),
        or that it closed its channel in mid-call and went on, which is a lie."""
        process = worker.process
        if process.wait(0.0) is None:
            process.kill()
            if cut:
                return self._timed_out(call)
            return Outcome(
                error=ProtocolError(
                    f"worker {worker.pid} closed its response channel during the call; replaced"
                ),
                reason="closed its response channel during the call",
            )
        error = process.death_error()
        how = process.how_it_ended()
        if isinstance(error, MemoryLimitExceeded):
            return Outcome(error=error, died=True, reason=f"ran out of memory and {how}")
        return Outcome(error=error, died=True, reason=f"{how} during a call")

    def _timed_out(self, call: _Call) -> Outcome:
        return Outcome(
            error=EvaluationTimeout(
                f"the evaluation ran past its {call.timeout} s deadline; its worker was killed"
            ),
            reason=f"ran past its {call.timeout} s deadline; killed",
        )

    def _settle(self, ticket: Ticket, outcome: Outcome) -> Answer:
        """Record how the call ended; check the worker in or discard it; the answer, or
        the call's typed error."""
        worker: Worker = ticket.worker
        cpu = None
        if outcome.keep:
            outcome = self._after_call(worker, outcome)
            if self.config.cpu_budget is not None:
                cpu = worker.process.cpu_seconds()
        self._perform(self._state.settle(worker, outcome, cpu))
        if outcome.error is not None:
            if self._state.terminated:
                raise PoolClosed("the pool was terminated during the call") from None
            raise outcome.error
        answer: Answer = outcome.answer
        return answer

    @staticmethod
    def _after_call(worker: Worker, outcome: Outcome) -> Outcome:
        """Before the worker serves again: its stderr drained and dropped; bytes after its
        answer, or a closed stderr, mean it is not to be trusted."""
        process = worker.process
        stdout, stderr = process.ready()
        if stderr:
            process.drain_stderr(keep=False)
        if stdout:
            return replace(outcome, keep=False, reason="wrote to its channel after its answer")
        if not process.stderr_open:
            return replace(outcome, keep=False, reason="closed its stderr")
        return outcome

    @staticmethod
    def _write_rest(worker: Worker, data: memoryview) -> memoryview | None:
        """Write what the channel takes now; the rest, or None when all is written (or the
        worker is gone, which the caller learns from its response channel)."""
        if not data:
            return None
        written = worker.process.send(data)
        if written is None:
            return None
        rest = data[written:]
        return rest if rest else None

    def _queue_timed_out(self) -> Overloaded:
        return Overloaded(f"no worker became free within {self.config.queue_timeout} s")

    def _leave(self, ticket: Ticket) -> None:
        if self._state.leave(ticket):
            with self._idle_done:
                self._idle_done.notify_all()

    # -- fork and shutdown ---------------------------------------------------------------

    def _forked(self) -> bool:
        return os.getpid() != self._pid

    def _check_fork(self) -> None:
        if os.getpid() != self._pid:
            logger.warning(
                "fork detected: a WorkerPool of process %d was used in process %d",
                self._pid,
                os.getpid(),
                extra={"parent_pid": self._pid},
            )
            raise ForkedPool(
                f"this WorkerPool was created in process {self._pid} and cannot be used in "
                f"its forked child {os.getpid()} (its workers belong to the parent): create "
                "pools after the fork (gunicorn: in post_fork; Celery: on worker_process_init), "
                "or use the module-level jsonnet_worker.evaluate, which starts afresh"
            )

    def _shutdown(self, grace: float) -> None:
        with self._executor_lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
        self._supervisor.stop(grace)
        _live_pools.discard(self)


@dataclass
class _Watched:
    """What ``_aexchange`` registered on its event loop (removing what was never added
    costs a selector lookup each)."""

    readers: list[int]
    writer: bool = False


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:  # a thread without a running loop (the supervisor, a sync caller)
        return None


def _unwatch(
    loop: asyncio.AbstractEventLoop,
    process: WorkerProcess,
    timers: list[asyncio.TimerHandle],
    watched: _Watched,
) -> None:
    """What ``_aexchange`` set up on the event loop, taken down."""
    for timer in timers:
        timer.cancel()
    for fd in watched.readers:
        loop.remove_reader(fd)
    if watched.writer:
        loop.remove_writer(process.stdin)


def _domain(tenant: str | None) -> Domain:
    if tenant is None:
        return NO_TENANT
    if not isinstance(tenant, str):
        raise InvalidType(f"tenant must be a str or None, not {type(tenant).__name__}")
    return Domain(tenant)


_live_pools: weakref.WeakSet[WorkerPool] = weakref.WeakSet()


def _forget_parent_pools() -> None:
    """In a forked child: the parent's pools are not ours to terminate at exit."""
    _live_pools.clear()


if hasattr(os, "register_at_fork"):  # POSIX; elsewhere no pool can start anyway
    os.register_at_fork(after_in_child=_forget_parent_pools)


@atexit.register
def _terminate_live_pools() -> None:
    for pool in list(_live_pools):  # a forked child's copies were forgotten at the fork
        try:
            pool.terminate()
        except Exception:
            pass
