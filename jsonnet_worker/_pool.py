"""WorkerPool: the public pool, its blocking and asyncio call paths.

How a call flows::

    caller thread / asyncio task                      supervisor thread (one per pool)
    ----------------------------                      --------------------------------
    encode request (msgpack frame)                    spawn workers (re-exec, -I)
    take an idle worker ---------- PoolCore ---------- accept hello -> idle list
      (or wait in FIFO; Overloaded past the limits)   poll pidfds: reap, replace
    write frame -> worker stdin                        back off on start-up failures
    poll(stdout, stderr) until the deadline            close() / terminate(): reap all
      result / error frame -> give the worker back
      timeout -> SIGKILL, retire  --------------------> reap, start a replacement
      EOF (crash) -> classify, retire ----------------> reap, start a replacement

Goals: per call, no hop through another thread (the caller talks to its worker directly and
its deadline is the ``poll`` timeout; asyncio uses the event loop's readers), exactly one
outcome (a result or a typed error, never a hang and never an empty success), and a pool that
heals itself.

Weak spots: a timed-out or cancelled call costs the pool that worker (it is killed: its
engine cannot be interrupted), and a replacement takes one interpreter start (~60 ms).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import itertools
import json
import os
import select
import threading
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from . import _engines
from ._config import DEFAULT_CPU_BUDGET, PoolConfig
from ._core import AsyncWaiter, PoolCore, ThreadWaiter, Waiter
from ._errors import (
    Error,
    EvaluationTimeout,
    InputTooLarge,
    JsonnetError,
    MemoryLimitExceeded,
    OutputTooLarge,
    Overloaded,
    PoolClosed,
    ProtocolError,
    WorkerStartError,
)
from ._privileges import DEFAULT_WORKER_USER, WorkerIdentities
from ._process import WorkerProcess, WorkerSettings
from ._protocol import (
    DEFAULT_MAX_FRAME,
    ErrorKind,
    EvalRequest,
    Event,
    FrameTooLarge,
    Message,
    encode,
)
from ._status import PoolStats, SandboxStatus
from ._supervisor import Supervisor
from ._values import split_variables

DEFAULT_TIMEOUT = 1.0
DEFAULT_MEMORY_LIMIT = 1024 * 1024 * 1024
DEFAULT_MAX_OUTPUT = 1024 * 1024
DEFAULT_MAX_STACK = 500
DEFAULT_SPAWN_TIMEOUT = 10.0
DEFAULT_QUEUE_TIMEOUT = 5.0
DEFAULT_QUEUE_LIMIT = 1000
DEATH_GRACE = 1.0
SPIN_MAX = 0.002


def default_size() -> int:
    """The CPUs this process may use, at least 2."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(2, cpus)


class _Failure(Exception):
    """A call's typed error, and whether its worker must be replaced."""

    def __init__(self, error: Error, retire: bool) -> None:
        super().__init__(error)
        self.error = error
        self.retire = retire


@dataclass(frozen=True)
class _Call:
    """One encoded call: its id and frame, its timeout, and the seconds encoding took."""

    request_id: int
    frame: bytes
    timeout: float
    spent: float

    def time_left(self) -> float:
        return self.timeout - self.spent


_ERRORS_BY_KIND: dict[str, tuple[type[Error], bool]] = {
    ErrorKind.JSONNET.value: (JsonnetError, False),
    ErrorKind.OUTPUT_TOO_LARGE.value: (OutputTooLarge, False),
    ErrorKind.MEMORY.value: (MemoryLimitExceeded, True),
    ErrorKind.PROTOCOL.value: (ProtocolError, True),
}


def interpret(event: Event, request_id: int) -> str:
    """The JSON text a response carries, or a _Failure: shared by both call paths."""
    if isinstance(event, Message):
        payload = event.payload
        if payload.get("id") == request_id:
            kind = payload.get("t")
            if kind == "result" and isinstance(payload.get("json"), str):
                json_text: str = payload["json"]
                return json_text
            if kind == "error":
                error_type, retire = _ERRORS_BY_KIND.get(
                    str(payload.get("kind")), (ProtocolError, True)
                )
                message = str(payload.get("message", ""))
                if error_type is ProtocolError:
                    message = f"the worker reported {payload.get('kind')}: {message}"
                raise _Failure(error_type(message), retire)
        raise _Failure(
            ProtocolError(
                f"unexpected message from the worker (t={payload.get('t')!r}, "
                f"id={payload.get('id')!r}, expected id {request_id})"
            ),
            True,
        )
    if isinstance(event, FrameTooLarge):
        raise _Failure(ProtocolError(f"worker sent a frame of {event.size} bytes"), True)
    raise _Failure(ProtocolError(f"worker sent a malformed frame: {event.reason}"), True)


class WorkerPool:
    """A pool of sandboxed worker processes that evaluate Jsonnet.

    Safe to share between threads and asyncio tasks. Use it as a context manager, or call
    ``close()``; at interpreter exit a pool still open is terminated.
    """

    def __init__(
        self,
        size: int | None = None,
        *,
        engine: str = "go",
        timeout: float = DEFAULT_TIMEOUT,
        memory_limit: int = DEFAULT_MEMORY_LIMIT,
        max_output: int = DEFAULT_MAX_OUTPUT,
        max_stack: int = DEFAULT_MAX_STACK,
        queue_limit: int | None = None,
        queue_timeout: float = DEFAULT_QUEUE_TIMEOUT,
        spawn_timeout: float = DEFAULT_SPAWN_TIMEOUT,
        max_request: int = DEFAULT_MAX_FRAME,
        spares: int = 1,
        require_sandbox: bool = False,
        worker_user: str | range | None = DEFAULT_WORKER_USER,
        cpu_budget: float | None = DEFAULT_CPU_BUDGET,
        config: PoolConfig | None = None,
        _worker_command: list[str] | None = None,
    ) -> None:
        if config is not None:  # OPS shim for WorkerPool(config=...); POOL's rewrite replaces it
            size, engine, timeout = config.size, config.engine, config.timeout
            memory_limit, max_output, max_stack = (
                config.memory_limit,
                config.max_output,
                config.max_stack,
            )
            queue_limit, queue_timeout = config.queue_limit, config.queue_timeout
            spawn_timeout, max_request, spares = (
                config.spawn_timeout,
                config.max_request,
                config.spares,
            )
            require_sandbox = config.require_sandbox
            worker_user, cpu_budget = config.worker_user, config.cpu_budget
        engine_kind = _engines.EngineKind(engine)
        self.size = default_size() if size is None else size
        if self.size < 1:
            raise ValueError("size must be at least 1")
        for name, value in (
            ("timeout", timeout),
            ("memory_limit", memory_limit),
            ("max_output", max_output),
            ("max_stack", max_stack),
            ("queue_timeout", queue_timeout),
            ("spawn_timeout", spawn_timeout),
            ("max_request", max_request),
        ):
            if value <= 0:
                raise ValueError(f"{name} must be positive")
        self.engine = engine_kind.value
        self.timeout = timeout
        self.max_output = max_output
        self.max_stack = max_stack
        self.queue_timeout = queue_timeout
        self.max_request = max_request
        self.queue_limit = DEFAULT_QUEUE_LIMIT if queue_limit is None else queue_limit
        self._ids = itertools.count(1)
        self._cpus = len(os.sched_getaffinity(0))
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()
        self._idle_done = threading.Condition(threading.Lock())
        settings = WorkerSettings(
            engine_kind.value,
            memory_limit,
            max_request,
            WorkerIdentities(worker_user),
            cpu_budget=cpu_budget,
        )
        self._supervisor: Supervisor
        if spares < 0:
            raise ValueError("spares must be 0 or more")
        self.spares = spares
        self._core = PoolCore(self.size, spares, self.queue_limit, lambda: self._supervisor.wake())
        self._supervisor = Supervisor(
            self._core,
            settings,
            spawn_timeout=spawn_timeout,
            require_sandbox=require_sandbox,
            command=_worker_command,
        )
        self._supervisor.start()
        _live_pools.add(self)
        self._supervisor.initial_done.wait()
        with self._core.lock:
            fatal = self._core.fatal
            started = any(w.hello is not None for w in self._core.workers)
            reason = self._core.start_failure
        if fatal is not None or not started:
            self.terminate()
            if fatal is not None:
                raise fatal
            raise WorkerStartError(f"no worker could start: {reason}", cause=reason)

    # -- public API ----------------------------------------------------------------------

    @property
    def sandbox(self) -> SandboxStatus | None:
        """The sandbox status the workers reported (None before any hello)."""
        return self._core.sandbox

    def stats(self) -> PoolStats:
        return self._core.stats()

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
        tenant: str | None = None,  # OPS shim: accepted, not acted on (POOL's rewrite)
    ) -> Any:
        """Evaluate ``snippet`` in a worker and return the decoded JSON value."""
        return json.loads(
            self.evaluate_json(
                snippet,
                ext_vars,
                tla_vars=tla_vars,
                ext_codes=ext_codes,
                tla_codes=tla_codes,
                filename=filename,
                timeout=timeout,
            )
        )

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
        tenant: str | None = None,  # OPS shim: accepted, not acted on (POOL's rewrite)
    ) -> str:
        """Like ``evaluate``, but return the manifested JSON text."""
        call = self._prepare(snippet, ext_vars, tla_vars, ext_codes, tla_codes, filename, timeout)
        self._enter()
        try:
            worker, sent = self._take_worker(call.frame)
            return self._finish(worker, lambda: self._exchange(worker, call, sent))
        except Error as exc:
            self._core.count_error(exc)
            raise
        finally:
            self._leave()

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
        tenant: str | None = None,  # OPS shim: accepted, not acted on (POOL's rewrite)
    ) -> Any:
        """``evaluate`` for asyncio: the event loop is never blocked, no thread per call."""
        return json.loads(
            await self.aevaluate_json(
                snippet,
                ext_vars,
                tla_vars=tla_vars,
                ext_codes=ext_codes,
                tla_codes=tla_codes,
                filename=filename,
                timeout=timeout,
            )
        )

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
        tenant: str | None = None,  # OPS shim: accepted, not acted on (POOL's rewrite)
    ) -> str:
        call = self._prepare(snippet, ext_vars, tla_vars, ext_codes, tla_codes, filename, timeout)
        self._enter()
        try:
            worker, sent = await self._atake_worker(call.frame)
            try:
                event = await self._aexchange(worker, call.frame, sent, call.time_left())
            except BaseException:
                worker.kill()  # cancelled mid-call: its answer would reach nobody
                self._core.retire(worker)
                raise
            return self._finish(
                worker, lambda: self._settle(worker, event, call.request_id, call.timeout)
            )
        except Error as exc:
            self._core.count_error(exc)
            raise
        finally:
            self._leave()

    def submit(
        self,
        snippet: str,
        ext_vars: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> concurrent.futures.Future[Any]:
        """``evaluate`` in a background thread; returns a ``concurrent.futures.Future``."""
        with self._executor_lock:
            if self._core.closed:
                raise PoolClosed("the pool is closed")
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    max_workers=self.size * 2, thread_name_prefix="jsonnet-worker-submit"
                )
            return self._executor.submit(self.evaluate, snippet, ext_vars, **kwargs)

    def close(self, timeout: float | None = None) -> None:
        """Refuse new calls, let calls in flight (and queued) finish, then stop and reap every
        worker. With ``timeout``, calls still running after it are cut off as by
        ``terminate()``."""
        with self._core.lock:
            self._core.closed = True
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._idle_done:
            while self._core.in_flight:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._idle_done.wait(left)
        if self._core.in_flight:
            self.terminate()
            return
        self._shutdown(grace=DEATH_GRACE)

    def terminate(self) -> None:
        """Kill every worker now; calls in flight and queued raise PoolClosed."""
        with self._core.lock:
            self._core.closed = True
            self._core.terminated = True
            self._core.fail_waiters(PoolClosed("the pool was terminated"))
            workers = list(self._core.workers)
        for worker in workers:
            worker.kill()
        self._shutdown(grace=0.0)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------

    def _shutdown(self, grace: float) -> None:
        with self._executor_lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
        self._supervisor.stop(grace)
        _live_pools.discard(self)

    def _timeout(self, timeout: float | None) -> float:
        if timeout is None:
            return self.timeout
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        return timeout

    def _prepare(
        self,
        snippet: str,
        ext_vars: Mapping[str, Any] | None,
        tla_vars: Mapping[str, Any] | None,
        ext_codes: Mapping[str, str] | None,
        tla_codes: Mapping[str, str] | None,
        filename: str,
        timeout: float | None,
    ) -> _Call:
        """Check and encode a call before any worker is involved; the time encoding takes
        (tens of milliseconds for a 10 MB snippet) counts against its timeout."""
        seconds = self._timeout(timeout)
        started = time.monotonic()
        if not isinstance(snippet, str):
            raise TypeError(f"snippet must be str, not {type(snippet).__name__}")
        if not isinstance(filename, str):
            raise TypeError(f"filename must be str, not {type(filename).__name__}")
        ext_strings, ext_code = split_variables("ext", ext_vars, ext_codes)
        tla_strings, tla_code = split_variables("tla", tla_vars, tla_codes)
        request = EvalRequest(
            id=next(self._ids),
            snippet=snippet,
            filename=filename,
            ext_vars=ext_strings,
            ext_codes=ext_code,
            tla_vars=tla_strings,
            tla_codes=tla_code,
            max_stack=self.max_stack,
            max_output=self.max_output,
        )
        try:
            frame = encode(request.to_message())
        except UnicodeEncodeError as exc:
            raise ValueError(
                f"the snippet, its file name or a variable is not valid Unicode ({exc.reason} "
                f"at position {exc.start}: a lone surrogate?)"
            ) from None
        if len(frame) - 4 > self.max_request:
            raise InputTooLarge(
                f"the request is {len(frame)} bytes, over max_request={self.max_request}"
            )
        return _Call(request.id, frame, seconds, time.monotonic() - started)

    def _enter(self) -> None:
        with self._core.lock:
            if self._core.closed:
                raise PoolClosed("the pool is closed")
            self._core.in_flight += 1

    def _leave(self) -> None:
        with self._core.lock:
            self._core.in_flight -= 1
            last = self._core.in_flight == 0 and self._core.closed
        if last:
            with self._idle_done:
                self._idle_done.notify_all()

    def _take_worker(self, frame: bytes) -> tuple[WorkerProcess, int]:
        """A worker for this call, and how much of ``frame`` was already written to it
        (by the caller that handed it over)."""
        worker = self._core.take_idle()
        if worker is not None:
            return worker, 0
        waiter = ThreadWaiter(frame)
        worker = self._core.take_or_wait(waiter)
        if worker is not None:
            return worker, 0
        if not waiter.wait(self.queue_timeout):
            if self._core.abandon(waiter) is None:
                raise waiter.error or self._queue_timed_out()
            waiter.wait(None)  # handed over just now: the wake-up follows the write
        return self._waited(waiter)

    async def _atake_worker(self, frame: bytes) -> tuple[WorkerProcess, int]:
        worker = self._core.take_idle()
        if worker is not None:
            return worker, 0
        waiter = AsyncWaiter(asyncio.get_running_loop(), frame)
        worker = self._core.take_or_wait(waiter)
        if worker is not None:
            return worker, 0
        try:
            try:
                await asyncio.wait_for(asyncio.shield(waiter.future), self.queue_timeout)
            except TimeoutError:
                if self._core.abandon(waiter) is None:
                    raise waiter.error or self._queue_timed_out() from None
                await waiter.future  # handed over just now: the wake-up follows the write
        except asyncio.CancelledError:
            worker = self._core.abandon(waiter)
            if worker is not None:
                worker.kill()  # our request may already be in its channel
                self._core.retire(worker)
            raise
        return self._waited(waiter)

    def _queue_timed_out(self) -> Overloaded:
        return Overloaded(f"no worker became free within {self.queue_timeout} s")

    @staticmethod
    def _waited(waiter: Waiter) -> tuple[WorkerProcess, int]:
        """What a woken waiter got: its worker and how much of its frame went out, or its
        error (the pool was terminated, or no worker can start)."""
        if waiter.error is not None:
            raise waiter.error
        assert waiter.worker is not None
        return waiter.worker, waiter.written

    def _finish(self, worker: WorkerProcess, run: Any) -> str:
        """Run a call on ``worker``; give the worker back or retire it, count the outcome."""
        core = self._core
        try:
            result: str = run()
        except _Failure as failure:
            if failure.retire:
                worker.kill()
                core.retire(worker)
            else:
                core.give_back(worker)
            if core.terminated:
                raise PoolClosed("the pool was terminated during the call") from None
            raise failure.error from None
        except BaseException:
            worker.kill()
            core.retire(worker)
            raise
        if worker.reader.pending or not worker.stderr_open:
            # Bytes beyond the answer, or a closed stderr: the worker is not to be trusted.
            worker.kill()
            core.retire(worker)
        else:
            core.give_back(worker)
        with core.lock:
            core.evaluations += 1
        return result

    def _timed_out(self, timeout: float) -> _Failure:
        with self._core.lock:
            self._core.timeouts += 1
        return _Failure(
            EvaluationTimeout(
                f"the evaluation ran past its {timeout} s deadline; its worker was killed"
            ),
            True,
        )

    def _died(self, worker: WorkerProcess, grace: float = DEATH_GRACE) -> _Failure:
        """The worker's channel ended: wait up to ``grace`` for it to exit, say why it died."""
        error = worker.death_error(grace)
        with self._core.lock:
            self._core.crashes += 1
        return _Failure(error, True)

    def _exchange(self, worker: WorkerProcess, call: _Call, sent: int) -> str:
        """The blocking fast path: write the frame (after the ``sent`` bytes a caller handing
        the worker over already wrote), poll until the answer or the deadline."""
        request_id, frame, timeout = call.request_id, call.frame, call.timeout
        deadline = time.monotonic() + call.time_left()
        worker.stderr.mark()
        poller = worker.poller
        pending = self._write_some(worker, memoryview(frame)[sent:])
        if pending:
            poller.register(worker.stdin, select.POLLOUT)
        elif self._may_spin():
            answer = self._spin_for_answer(worker, min(deadline, time.monotonic() + SPIN_MAX))
            if answer is False:
                raise self._died(worker)
            if answer is not None:
                return interpret(answer, request_id)
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self._timed_out(timeout)
                for fd, _ in poller.poll(left * 1000.0 + 1):
                    if fd == worker.stdout:
                        if not worker.read_stdout():
                            raise self._died(worker)
                        event = worker.reader.next_event()
                        if event is not None:
                            return interpret(event, request_id)
                    elif fd == worker.stderr_fd:
                        if not worker.drain_stderr():
                            poller.unregister(worker.stderr_fd)
                    elif pending is not None:
                        pending = self._write_some(worker, pending)
                        if not pending:
                            poller.unregister(worker.stdin)
        finally:
            if pending:
                poller.unregister(worker.stdin)

    def _may_spin(self) -> bool:
        """Spin for the answer only when this is the pool's only call and a second CPU
        exists: then the spinner takes no core from a worker and no GIL time from another
        caller (a spinning thread delays every other thread's wake-up)."""
        return self._cpus > 1 and self._core.in_flight == 1

    @staticmethod
    def _spin_for_answer(worker: WorkerProcess, until: float) -> Event | Literal[False] | None:
        """Read without blocking until an answer arrives or ``until``: waking a caller
        blocked in poll costs an inter-processor interrupt (about 30 us on the virtual
        machines measured), a large share of a 200 us evaluation. False at EOF."""
        while True:
            if not worker.read_stdout():
                return False
            event = worker.reader.next_event()
            if event is not None:
                return event
            if time.monotonic() >= until:
                return None
            # Let whatever else is runnable on this CPU (the worker's collector, another
            # caller) run: spinning must not starve it.
            os.sched_yield()

    @staticmethod
    def _write_some(worker: WorkerProcess, data: memoryview) -> memoryview | None:
        """Write what the channel takes now; the rest, or None when all is written (or the
        worker is gone, which the caller learns from stdout)."""
        if not data:
            return None
        written = worker.send(data)
        if written is None:
            return None
        rest = data[written:]
        return rest if rest else None

    async def _aexchange(
        self, worker: WorkerProcess, frame: bytes, sent: int, timeout: float
    ) -> Event | str:
        """The asyncio path: the same exchange on the event loop's readers and a timer (with
        what is left of the timeout after encoding). Returns the response event, or
        "timeout" / "eof"."""
        loop = asyncio.get_running_loop()
        outcome: asyncio.Future[Event | str] = loop.create_future()
        worker.stderr.mark()
        pending: list[memoryview | None] = [self._write_some(worker, memoryview(frame)[sent:])]

        def settle(value: Event | str) -> None:
            if not outcome.done():
                outcome.set_result(value)

        def on_stdout() -> None:
            if not worker.read_stdout():
                # The worker is dying: wait here (not in _died, which would block the loop)
                # until its pidfd says it has exited, for at most DEATH_GRACE.
                loop.remove_reader(worker.stdout)
                loop.add_reader(worker.pidfd, settle, "eof")
                loop.call_later(DEATH_GRACE, settle, "eof")
                return
            event = worker.reader.next_event()
            if event is not None:
                settle(event)

        def on_stderr() -> None:
            if not worker.drain_stderr():
                loop.remove_reader(worker.stderr_fd)

        def on_stdin() -> None:
            chunk = pending[0]
            pending[0] = None if chunk is None else self._write_some(worker, chunk)
            if pending[0] is None:
                loop.remove_writer(worker.stdin)

        loop.add_reader(worker.stdout, on_stdout)
        loop.add_reader(worker.stderr_fd, on_stderr)
        if pending[0] is not None:
            loop.add_writer(worker.stdin, on_stdin)
        timer = loop.call_later(max(timeout, 0.0), settle, "timeout")
        try:
            return await outcome
        finally:
            timer.cancel()
            loop.remove_reader(worker.stdout)
            loop.remove_reader(worker.stderr_fd)
            loop.remove_reader(worker.pidfd)
            loop.remove_writer(worker.stdin)

    def _settle(
        self, worker: WorkerProcess, event: Event | str, request_id: int, timeout: float
    ) -> str:
        if event == "timeout":
            raise self._timed_out(timeout)
        if event == "eof":
            raise self._died(worker, grace=0.0)  # _aexchange already waited on its pidfd
        assert not isinstance(event, str)
        return interpret(event, request_id)


_live_pools: weakref.WeakSet[WorkerPool] = weakref.WeakSet()


@atexit.register
def _terminate_live_pools() -> None:
    for pool in list(_live_pools):
        try:
            pool.terminate()
        except Exception:
            pass
