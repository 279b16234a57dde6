"""WorkerPool: the public pool, and its blocking and asyncio call paths as mirrors.

Goals: per call, no hop through another thread (the caller talks to its worker directly and
its deadline is the ``poll`` timeout; asyncio uses the event loop's readers); exactly one
outcome (a result or a typed error, never a hang, never another call's data); a pool that
heals itself; and nothing a worker sends believed unchecked.

Plan: both paths run the same steps with the same names, over one ``exchange.Outcome``
(httpx's ``Client``/``AsyncClient`` discipline), and differ only in how they wait; the
steps they share are written once, in ``calls`` and ``exchange``: ``exchange.prepare``
(check and encode),
``calls.admit`` (a ``Ticket``, admitted with an idle worker of the caller's trust domain
if there is one, in one transition), else ``_check_out``/``_acheck_out`` (wait in FIFO),
``_exchange``/``_aexchange`` (write the frame, read the
answer through the worker's ``WorkerConnection`` until the deadline), ``calls.settle``
(record, check in or discard). Any ``BaseException`` anywhere between check-out and settle
(an interrupt, a cancellation) abandons the ticket: out of the queue, and a worker it holds
discarded. Every state change is a ``state.PoolState`` transition, and every read of the
state a snapshot (``view``, ``stats``); the supervisor's ``perform`` carries out the effects
a transition returns. The call flow is drawn in docs/DESIGN.md.

Fork: a pool belongs to the process that created it. In a forked child every call on it
raises ``ForkedPool`` and ``close``/``terminate`` do nothing (the workers, their channels
and the supervisor are the parent's); the module-level default pool starts afresh.

Weak spots: a timed-out or cancelled call costs the pool that worker (it is killed: its
engine cannot be interrupted); its replacement is a fork of the pool's template (a few
milliseconds), or an interpreter start (about 60 ms) where the pool has no template; a
spare hides either.
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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, NoReturn, TypedDict, Unpack

from .. import _output as output_modes
from .._config import PoolConfig
from .._errors import (
    Error,
    ForkedPool,
    InvalidArgument,
    InvalidType,
    Overloaded,
    PoolClosed,
    UnsupportedPlatform,
    WorkerStartError,
)
from .._library import Library
from .._options import PoolOptions
from .._report import SandboxStatus
from .._stats import PoolStats
from .._wire.messages import FormatStyle, Operation
from .._wire.values import replace as replace_value  # a value class's (SandboxStatus)
from . import calls, exchange
from .connection import Answer
from .deadlines import CallClock, Due
from .exchange import CLOSED, NO_VARIABLES, Call, Outcome, Variables, Worker
from .origin import FORKED, WorkerOrigin
from .processes import WorkerProcess, settings_for
from .scheduling import Demoter
from .state import Phase, PoolState, Ticket
from .supervisor import Supervisor

logger = logging.getLogger("jsonnet_worker")

__all__ = ["EvaluateKeywords", "WorkerPool", "check_platform", "default_size"]

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
        return self._signal.acquire(timeout=timeout if timeout > 0.0 else 0.0)


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


class EvaluateKeywords(TypedDict, total=False):
    """``evaluate``'s keywords after its first mapping of variables, typed: the output
    modes (``evaluate_string`` ...) and the module-level ones take them as they are."""

    tla_vars: Mapping[str, Any] | None
    ext_codes: Mapping[str, str] | None
    tla_codes: Mapping[str, str] | None
    filename: str
    timeout: float | None
    tenant: str | None
    on_trace: Callable[[str], None] | None
    max_stack: int | None
    max_output: int | None
    library: Library | None


class WorkerPool:
    """A pool of sandboxed worker processes that evaluate Jsonnet.

    ``WorkerPool(size, **options)`` or ``WorkerPool(config=PoolConfig(...))`` (options given
    too override the config's); see ``PoolConfig`` for every option. The options are typed
    (``PoolOptions``): a type checker reports a misspelled or mistyped one, and at run time
    it raises ``InvalidType``/``InvalidArgument``. Safe to share between
    threads and asyncio tasks. Use it as a context manager, or call ``close()``; at
    interpreter exit a pool still open is terminated. A pool belongs to the process that
    created it: after ``fork()`` create a new one in the child (README: prefork servers).
    """

    def __init__(
        self,
        size: int | None = None,
        *,
        config: PoolConfig | None = None,
        _origin: WorkerOrigin = FORKED,
        **options: Unpack[PoolOptions],
    ) -> None:
        check_platform()
        changes: dict[str, Any] = dict(options)
        if changes.get("queue_limit", 0) is None:
            del changes["queue_limit"]  # the signature before PoolConfig took None: the default
        if size is not None:
            changes["size"] = size
        base = config or PoolConfig()
        try:
            config = base.replace(**changes) if changes else base
        except TypeError as exc:
            raise InvalidType(f"WorkerPool: {exc}") from None
        if config.size is None:
            config = config.replace(size=default_size())
        self.config = config
        self._pid = os.getpid()
        self._ids = itertools.count(1)
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()
        self._state: PoolState[Worker] = PoolState(config)
        # A call's demotion and deadline (``CallClock``) run from when its request went out
        # (``Worker.sent_at``: by its caller, or by the giver of a hand-over, which woke it
        # after), with what is left of its timeout (``Call.time_left``: less the seconds
        # encoding it took) on the pool's ``timeout_clock``; its worker is demoted at the
        # interactive budget, CPU seconds into the call (inf: never).
        budget = config.interactive_budget
        self._interactive_budget = math.inf if budget is None else budget
        self._timeout_clock = config.timeout_clock
        self._demoter = Demoter()
        # _origin: where workers come from (forks of a template by default); tests and
        # benchmarks pass another through tests/seams.py.
        self._supervisor = Supervisor(self._state, settings_for(config), _origin)
        self._perform = self._supervisor.perform
        self._supervisor.start()
        _live_pools.add(self)
        self._supervisor.initial_done.wait()
        view = self._state.view()
        if view.failure is not None or not view.started:
            self.terminate()
            if view.failure is not None:
                raise view.failure
            reason = view.start_failure
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
        sandbox = self._state.view().sandbox
        if sandbox is None:
            return None
        return replace_value(sandbox, template=self._supervisor.fork_server_status())

    @property
    def closed(self) -> bool:
        """True once ``close()`` or ``terminate()`` began (or no worker can ever start)."""
        return self._state.view().phase is not Phase.OPEN

    def stats(self) -> PoolStats:
        self._check_fork()
        source = self._supervisor.fork_server_stats()
        return dataclasses.replace(
            self._state.stats(),
            template_pid=source.fork_server_pid,
            forks=source.forks,
            fork_fallbacks=source.fallbacks,
            template_starts=source.fork_server_starts,
            tenants=self._state.accounting.snapshot(),
        )

    def replace_template(self) -> None:
        """Start a new worker template now; the workers the old one forked serve on. A pool
        that re-executes its workers (no template on this host) does nothing."""
        self._check_fork()
        self._supervisor.replace_fork_server()

    @property
    def supervisor_thread_id(self) -> int | None:
        """The native id of the thread that starts this pool's workers (``restrict_host``
        binds it too, and counts it as a thread it may leave running)."""
        return self._supervisor.thread.native_id

    @property
    def task_cgroups(self) -> str | None:
        """The directory of this pool's task cgroups (one per worker, ``tasklimit``), None
        without them (``restrict_host`` lets the supervisor thread make and remove them)."""
        return self._supervisor.tasks.directory

    @property
    def idle_cgroup(self) -> str | None:
        """The idle cpu cgroup this pool's demoted workers go into (``idlegroup``: found, and
        made if need be, at the first ask or demotion), None where there is none (the pool
        says why at INFO). ``restrict_host`` lets the pool move workers into it."""
        return self._demoter.idle_group().directory or None

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
        on_trace: Callable[[str], None] | None = None,
        max_stack: int | None = None,
        max_output: int | None = None,
        library: Library | None = None,
    ) -> Any:
        """Evaluate ``snippet`` in a worker and return the decoded JSON value. A worker that
        served one ``tenant`` never serves another (None: the calls without a tenant).

        ``max_stack`` and ``max_output`` (on every evaluation call, like ``timeout``) are
        this call's own (None: the pool's), checked as the pool's options are; a
        ``max_output`` may go over the pool's up to ``MAX_CALL_OUTPUT`` (64 MiB less 4 KiB:
        the answer must fit the wire format's frame), else ``InvalidArgument``.

        ``on_trace`` (also on ``evaluate_json``, ``aevaluate*``, ``submit`` and the
        module-level ``evaluate``) is called with each line the call's ``std.trace`` printed
        (``TRACE: <file>:<line> <message>``, as go-jsonnet prints it), in order, in the
        calling thread (or task), once the worker has answered and before the call returns
        or raises its error; at most ``max_trace_lines`` lines and ``max_trace_bytes``
        bytes, control characters escaped, then a marker line when some were cut. Nothing
        else sees them: the pool never logs them. ``check`` takes none: it never runs the
        snippet."""
        call = self._prepare_eval(
            snippet,
            Variables(ext_vars, tla_vars, ext_codes, tla_codes),
            filename,
            timeout,
            tenant,
            on_trace,
            max_stack,
            max_output,
            library,
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
        on_trace: Callable[[str], None] | None = None,
        max_stack: int | None = None,
        max_output: int | None = None,
        library: Library | None = None,
    ) -> str:
        """Like ``evaluate``, but return the manifested JSON text."""
        call = self._prepare_eval(
            snippet,
            Variables(ext_vars, tla_vars, ext_codes, tla_codes),
            filename,
            timeout,
            tenant,
            on_trace,
            max_stack,
            max_output,
            library,
        )
        return self._call(call).json_text

    def evaluate_string(
        self,
        snippet: str,
        ext_vars: Mapping[str, Any] | None = None,
        **keywords: Unpack[EvaluateKeywords],
    ) -> str:
        """``jsonnet -S``: the result must be a string (else ``JsonnetError``, worded as
        go-jsonnet words it); that string with a newline, as the command prints it. The
        keywords are ``evaluate``'s."""
        return output_modes.string(self.evaluate_json(snippet, ext_vars, **keywords))

    def evaluate_multi(
        self,
        snippet: str,
        ext_vars: Mapping[str, Any] | None = None,
        *,
        string: bool = False,
        **keywords: Unpack[EvaluateKeywords],
    ) -> dict[str, str]:
        """``jsonnet -m DIR`` (with ``string``: ``-m DIR -S``): the result must be an object;
        each field as the file go-jsonnet would write, file name to text, in the object's
        order. Nothing is written: a name that would land outside ``DIR`` (absolute, ``..``
        leaving it, empty, a directory, a NUL byte) raises ``InvalidArgument``."""
        text = self.evaluate_json(snippet, ext_vars, **keywords)
        return output_modes.multi(text, string=string)

    def evaluate_stream(
        self,
        snippet: str,
        ext_vars: Mapping[str, Any] | None = None,
        **keywords: Unpack[EvaluateKeywords],
    ) -> str:
        """``jsonnet -y``: the result must be an array; its elements as a YAML stream of
        JSON documents (``---`` before each, ``...`` after the last), as the command
        prints it."""
        return output_modes.stream(self.evaluate_json(snippet, ext_vars, **keywords))

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
        call = self._prepare(Operation.CHECK, snippet, filename, timeout, tenant)
        self._call(call)

    def format(
        self,
        snippet: str,
        *,
        filename: str = "snippet.jsonnet",
        timeout: float | None = None,
        tenant: str | None = None,
        style: FormatStyle | None = None,
    ) -> str:
        """``snippet`` formatted by go-jsonnet's formatter (``jsonnetfmt``), with ``style``'s
        options (None: jsonnetfmt's defaults)."""
        call = self._prepare(Operation.FMT, snippet, filename, timeout, tenant, style=style)
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
        on_trace: Callable[[str], None] | None = None,
        max_stack: int | None = None,
        max_output: int | None = None,
        library: Library | None = None,
    ) -> Any:
        """``evaluate`` for asyncio: the event loop is never blocked, no thread per call."""
        call = self._prepare_eval(
            snippet,
            Variables(ext_vars, tla_vars, ext_codes, tla_codes),
            filename,
            timeout,
            tenant,
            on_trace,
            max_stack,
            max_output,
            library,
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
        on_trace: Callable[[str], None] | None = None,
        max_stack: int | None = None,
        max_output: int | None = None,
        library: Library | None = None,
    ) -> str:
        """``evaluate_json`` for asyncio."""
        call = self._prepare_eval(
            snippet,
            Variables(ext_vars, tla_vars, ext_codes, tla_codes),
            filename,
            timeout,
            tenant,
            on_trace,
            max_stack,
            max_output,
            library,
        )
        return (await self._acall(call)).json_text

    async def aevaluate_string(
        self,
        snippet: str,
        ext_vars: Mapping[str, Any] | None = None,
        **keywords: Unpack[EvaluateKeywords],
    ) -> str:
        """``evaluate_string`` for asyncio."""
        return output_modes.string(await self.aevaluate_json(snippet, ext_vars, **keywords))

    async def aevaluate_multi(
        self,
        snippet: str,
        ext_vars: Mapping[str, Any] | None = None,
        *,
        string: bool = False,
        **keywords: Unpack[EvaluateKeywords],
    ) -> dict[str, str]:
        """``evaluate_multi`` for asyncio."""
        text = await self.aevaluate_json(snippet, ext_vars, **keywords)
        return output_modes.multi(text, string=string)

    async def aevaluate_stream(
        self,
        snippet: str,
        ext_vars: Mapping[str, Any] | None = None,
        **keywords: Unpack[EvaluateKeywords],
    ) -> str:
        """``evaluate_stream`` for asyncio."""
        return output_modes.stream(await self.aevaluate_json(snippet, ext_vars, **keywords))

    async def acheck(
        self,
        snippet: str,
        *,
        filename: str = "snippet.jsonnet",
        timeout: float | None = None,
        tenant: str | None = None,
    ) -> None:
        """``check`` for asyncio."""
        call = self._prepare(Operation.CHECK, snippet, filename, timeout, tenant)
        await self._acall(call)

    async def aformat(
        self,
        snippet: str,
        *,
        filename: str = "snippet.jsonnet",
        timeout: float | None = None,
        tenant: str | None = None,
        style: FormatStyle | None = None,
    ) -> str:
        """``format`` for asyncio."""
        call = self._prepare(Operation.FMT, snippet, filename, timeout, tenant, style=style)
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

    def map(
        self,
        snippet: str,
        inputs: Iterable[Mapping[str, Any]],
        *,
        inputs_as: Literal["ext_vars", "tla_vars"] = "ext_vars",
        filename: str = "snippet.jsonnet",
        timeout: float | None = None,
        tenant: str | None = None,
        max_stack: int | None = None,
        max_output: int | None = None,
        library: Library | None = None,
        concurrency: int | None = None,
        return_exceptions: bool = False,
    ) -> list[Any]:
        """Evaluate ``snippet`` once per input and return the decoded values in input
        order. Each input is a mapping of the call's external variables (``inputs_as=
        "tla_vars"``: of its top-level arguments), given as ``evaluate`` takes them; the
        other keywords hold for every item.

        At most ``concurrency`` calls are in flight at once (default and ceiling: the
        pool's ``size``, so that a large batch never fills its tenant's queue); each item
        is one call through the same check-out and hand-over as ``evaluate``.

        Errors: the first error raises (as ``asyncio.gather``): no further item starts,
        the calls already running end as they would, then it is raised. With
        ``return_exceptions=True`` an item's error is its result, in its place.

        It blocks the calling thread: it runs ``amap`` on an event loop of its own, so that
        an interrupt (KeyboardInterrupt in the main thread) cancels the calls in flight at
        once as a cancellation does (their workers are replaced), where a thread blocked in
        ``poll`` could not be stopped; none is left running when it raises. From a
        coroutine, await ``amap`` (``InvalidArgument`` here)."""
        self._check_fork()
        if _running_loop() is not None:
            raise InvalidArgument(
                "WorkerPool.map blocks its thread: in a coroutine, await WorkerPool.amap"
            )
        batch = self.amap(
            snippet,
            inputs,
            inputs_as=inputs_as,
            filename=filename,
            timeout=timeout,
            tenant=tenant,
            max_stack=max_stack,
            max_output=max_output,
            library=library,
            concurrency=concurrency,
            return_exceptions=return_exceptions,
        )
        # A loop of its own, not set as the thread's: the caller's event loop policy and
        # its thread's loop, if it set one, are left as they were.
        with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:
            return runner.run(batch)

    async def amap(
        self,
        snippet: str,
        inputs: Iterable[Mapping[str, Any]],
        *,
        inputs_as: Literal["ext_vars", "tla_vars"] = "ext_vars",
        filename: str = "snippet.jsonnet",
        timeout: float | None = None,
        tenant: str | None = None,
        max_stack: int | None = None,
        max_output: int | None = None,
        library: Library | None = None,
        concurrency: int | None = None,
        return_exceptions: bool = False,
    ) -> list[Any]:
        """``map`` for asyncio. Cancelled, it cancels the calls in flight (each abandons
        its worker, which is replaced) and returns once none is left running."""
        self._check_fork()
        items = list(inputs)
        width = self._batch_width(concurrency, len(items))
        to_tla = _inputs_to_tla(inputs_as)
        results: list[Any] = [None] * len(items)
        failures: list[Exception] = []
        pending = iter(enumerate(items))

        async def serve() -> None:
            # Each of ``width`` servers takes the next item until none is left (or one
            # failed): one event loop, so no two take the same.
            for index, item in pending:
                if failures:
                    return
                variables = Variables(tla_vars=item) if to_tla else Variables(ext_vars=item)
                try:
                    call = self._prepare_eval(
                        snippet,
                        variables,
                        filename,
                        timeout,
                        tenant,
                        None,
                        max_stack,
                        max_output,
                        library,
                    )
                    results[index] = (await self._acall(call)).value
                except Exception as exc:  # as asyncio.gather: any error, in place or raised
                    if not return_exceptions:
                        failures.append(exc)
                        return
                    results[index] = exc

        # A TaskGroup: cancelled, it cancels every server and waits for each to end.
        async with asyncio.TaskGroup() as group:
            for _ in range(width):
                group.create_task(serve())
        if failures:
            raise failures[0]
        return results

    def _batch_width(self, concurrency: int | None, items: int) -> int:
        """How many of a batch's calls may be in flight at once: ``concurrency`` (default:
        the pool's size), at most the pool's size and the number of items."""
        if concurrency is None:
            return min(self.size, items)
        if not isinstance(concurrency, int) or isinstance(concurrency, bool):
            raise InvalidType(f"concurrency must be an int, not {type(concurrency).__name__}")
        if concurrency < 1:
            raise InvalidArgument(f"concurrency must be at least 1, not {concurrency}")
        return min(concurrency, self.size, items)

    def close(self, timeout: float | None = None) -> None:
        """Refuse new calls, let calls in flight (and queued) finish, then stop and reap every
        worker. With ``timeout``, calls still running after it are cut off as by
        ``terminate()``. In a forked child: nothing (the workers are the parent's)."""
        if self._forked():
            return
        self._state.begin_close()
        if not self._state.wait_for_calls(timeout):
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

    def _call(self, call: Call) -> Answer:
        if os.getpid() != self._pid:
            self._refuse_forked()
        ticket = ThreadTicket(call, call.domain, call.timeout)
        state = self._state
        try:
            try:
                if not calls.admit(state, self._perform, ticket):
                    self._check_out(ticket)
                outcome = self._exchange(ticket)
            except BaseException as exc:
                if ticket.admitted:  # else refused at admission: nothing to abandon
                    calls.abandon(state, self._perform, ticket, exc)
                raise
            return calls.settle(state, self._perform, ticket, outcome)
        except Error as exc:
            state.count_error(exc)
            raise
        finally:
            state.leave(ticket)

    def _check_out(self, ticket: ThreadTicket) -> None:
        """A worker for a call none could be taken for at once: one now after all, else
        wait in FIFO (the worker then comes with the request already written by whoever
        handed it over)."""
        ticket.arm()
        effects = self._state.take_or_wait(ticket, ticket.call.ready_at)
        if effects:
            self._perform(effects)
        if ticket.queued and not ticket.wait(self.config.queue_timeout):
            self._waited_out(ticket)
        if ticket.error is not None:
            raise ticket.error

    def _waited_out(self, ticket: ThreadTicket) -> None:
        """The call waited ``queue_timeout`` in the queue: it gives up (``Overloaded``),
        unless a worker was handed to it just now (its wake-up follows the write)."""
        if self._state.give_up(ticket):
            raise ticket.error or calls.queue_timed_out(self.config)
        if not ticket.wait(HANDOVER_GRACE):  # handed over just now: the wake-up follows
            raise Overloaded("the worker handed to this call did not arrive")

    def _exchange(self, ticket: Ticket) -> Outcome:
        """Write the frame (after what a caller handing the worker over already wrote),
        then poll the worker's channels (writing the rest of the frame) until an outcome or
        the deadline; each poll's timeout is the call's next look (``_look``: its demotion,
        its deadline on the CPU clock), after the look due then, if any."""
        worker, call = ticket.worker, ticket.call
        pending = calls.start(ticket)
        clock = self._clock_for(worker, call)
        # The caller blocks in poll rather than spin for the answer: on 2 CPUs a spin took
        # the core go-jsonnet's collector needed (docs/DESIGN.md, "A short spin in
        # the worker, none in the caller"). Its first look is at the clock's start where
        # this caller wrote the request just now; a hand-over's was written before the
        # wake-up, which may have taken a while.
        now = time.monotonic() if ticket.handed else clock.started
        process = worker.process
        poller = process.poller
        if pending is not None:
            poller.register(process.stdin, select.POLLOUT)
        try:
            while True:
                if now >= clock.next_at and self._look(worker, clock, now) is Due.EXPIRED:
                    return exchange.timed_out(call, clock.expired_clock, clock.clock)
                wait_ms = (clock.next_at - now) * 1000.0 + 1
                outcome, pending = exchange.poll_channels(worker, pending, wait_ms)
                if outcome is not None:
                    break
                now = time.monotonic()
        finally:
            if pending is not None:
                poller.unregister(process.stdin)
        return self._died(worker, call, clock.wall_deadline) if outcome is CLOSED else outcome

    def _died(self, worker: Worker, call: Call, deadline: float) -> Outcome:
        """The response channel ended: wait for the exit, within the deadline."""
        grace = min(DEATH_GRACE, max(0.0, deadline - time.monotonic()))
        worker.process.wait(grace)
        return exchange.death(worker, call, cut=grace < DEATH_GRACE)

    # -- the asyncio path (the same steps, the same names) -------------------------------

    async def _acall(self, call: Call) -> Answer:
        if os.getpid() != self._pid:
            self._refuse_forked()
        ticket = AsyncTicket(call, call.domain, call.timeout)
        state = self._state
        try:
            try:
                if not calls.admit(state, self._perform, ticket):
                    await self._acheck_out(ticket)
                outcome = await self._aexchange(ticket)
            except BaseException as exc:
                if ticket.admitted:
                    calls.abandon(state, self._perform, ticket, exc)
                raise
            return calls.settle(state, self._perform, ticket, outcome)
        except Error as exc:
            state.count_error(exc)
            raise
        finally:
            state.leave(ticket)

    async def _acheck_out(self, ticket: AsyncTicket) -> None:
        ticket.arm(asyncio.get_running_loop())
        effects = self._state.take_or_wait(ticket, ticket.call.ready_at)
        if effects:
            self._perform(effects)
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
                raise ticket.error or calls.queue_timed_out(self.config) from None
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
        pending: list[memoryview | None] = [calls.start(ticket)]
        clock = self._clock_for(worker, call)
        deadline = clock.wall_deadline
        done: asyncio.Future[Outcome] = loop.create_future()
        timers: list[asyncio.TimerHandle] = []
        watched = _Watched(readers=[process.stdout, process.stderr_fd])

        def settle(outcome: Outcome) -> None:
            if not done.done():
                done.set_result(outcome)

        def on_exit(cut: bool = False) -> None:
            settle(exchange.death(worker, call, cut))

        def on_stdout() -> None:
            outcome = exchange.read_answer(worker)
            if outcome is CLOSED:
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
            pending[0] = exchange.write_rest(worker, pending[0] or memoryview(b""))
            if pending[0] is None:
                loop.remove_writer(process.stdin)

        loop.add_reader(process.stdout, on_stdout)
        loop.add_reader(process.stderr_fd, on_stderr)
        if pending[0] is not None:
            loop.add_writer(process.stdin, on_stdin)
            watched.writer = True
        self._arm(loop, timers, worker, clock, settle, call)
        try:
            return await done
        finally:
            _unwatch(loop, process, timers, watched)

    def _arm(
        self,
        loop: asyncio.AbstractEventLoop,
        timers: list[asyncio.TimerHandle],
        worker: Worker,
        clock: CallClock,
        settle: Callable[[Outcome], None],
        call: Call,
    ) -> None:
        """``_aexchange``'s one timer, as ``_exchange``'s poll has one timeout: at the
        call's next look (``_look``), then armed again, until its deadline settles it as
        timed out. Cancelled with ``timers``."""
        delay = max(clock.next_at - time.monotonic(), 0.0)
        args = (loop, timers, worker, clock, settle, call)
        timers.append(loop.call_later(delay, self._look_and_arm, *args))

    def _look_and_arm(
        self,
        loop: asyncio.AbstractEventLoop,
        timers: list[asyncio.TimerHandle],
        worker: Worker,
        clock: CallClock,
        settle: Callable[[Outcome], None],
        call: Call,
    ) -> None:
        if self._look(worker, clock, time.monotonic()) is Due.EXPIRED:
            settle(exchange.timed_out(call, clock.expired_clock, clock.clock))
        else:
            self._arm(loop, timers, worker, clock, settle, call)

    # -- shared by both paths (the steps themselves are in ``calls``) ---------------------

    def _clock_for(self, worker: Worker, call: Call) -> CallClock:
        """The call's demotion and deadline, from when its request went out
        (``Worker.sent_at``), with what is left of its timeout after encoding."""
        return CallClock(
            worker.sent_at, call.time_left(), self._interactive_budget, self._timeout_clock
        )

    def _look(self, worker: Worker, clock: CallClock, now: float) -> Due:
        """A look at a running call (``deadlines``): one read of its worker's CPU clock
        (``cpu_mark`` is that clock at its previous call's end, or at its hello; None where
        it cannot be read); if its demotion is due, every thread of the worker goes to
        SCHED_IDLE (nice 19 where refused), outside the state's lock like every effect, and
        the state is told, so that the worker is recycled after the call: nothing
        unprivileged can move it back. A worker nothing could be applied to stays as it is
        (the ``Demoter`` logs why). On an asyncio path this runs on the event loop: a /proc
        listing and a syscall per thread, tens of microseconds."""
        cpu = worker.process.cpu_seconds()
        due = clock.look(now, None if cpu is None else cpu - worker.cpu_mark)
        if due is Due.DEMOTE and self._demoter.demote(worker.pid).applied:
            self._perform(self._state.demoted(worker))
        return due

    def _prepare(
        self,
        operation: Operation,
        snippet: str,
        filename: str,
        timeout: float | None,
        tenant: str | None,
        style: FormatStyle | None = None,
    ) -> Call:
        """``exchange.prepare`` for a call that runs no snippet (``check``, ``format``)."""
        return exchange.prepare(
            self.config,
            next(self._ids),
            operation,
            snippet,
            filename,
            timeout,
            tenant,
            variables=NO_VARIABLES,
            style=style,
        )

    def _prepare_eval(
        self,
        snippet: str,
        variables: Variables,
        filename: str,
        timeout: float | None,
        tenant: str | None,
        on_trace: Callable[[str], None] | None,
        max_stack: int | None,
        max_output: int | None,
        library: Library | None,
    ) -> Call:
        """``exchange.prepare`` for an evaluation (every output mode, ``map``'s items)."""
        return exchange.prepare(
            self.config,
            next(self._ids),
            Operation.EVAL,
            snippet,
            filename,
            timeout,
            tenant,
            variables=variables,
            on_trace=on_trace,
            max_stack=max_stack,
            max_output=max_output,
            library=library,
        )

    # -- fork and shutdown ---------------------------------------------------------------

    def _forked(self) -> bool:
        return os.getpid() != self._pid

    def _check_fork(self) -> None:
        if os.getpid() != self._pid:
            self._refuse_forked()

    def _refuse_forked(self) -> NoReturn:
        """The pool was used in a forked child (the call paths compare the pid themselves:
        a call less on every call)."""
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


def _inputs_to_tla(inputs_as: str) -> bool:
    """Whether a batch's inputs are top-level arguments (else external variables)."""
    if inputs_as not in ("ext_vars", "tla_vars"):
        raise InvalidArgument(f"inputs_as must be 'ext_vars' or 'tla_vars', not {inputs_as!r}")
    return inputs_as == "tla_vars"


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
