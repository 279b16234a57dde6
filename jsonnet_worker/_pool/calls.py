"""The steps of one call that the blocking and asyncio paths share (``facade.WorkerPool``).

Goals: the two call paths differ only in how they wait (a lock and ``poll``, or a future
and the event loop's readers), as httpx's ``Client`` and ``AsyncClient`` do; everything
else (checking and encoding a call, starting its exchange, reading what the worker sent,
turning an answer, a failure, a death or the deadline into one ``Outcome``, and the outcome
into a result or a typed error) is written once: here what needs the pool's state, in
``exchange`` what one call on one worker needs without a pool (``eval``'s one-shot worker
uses those steps too, and imports none of the pool's state machine or supervisor).

Plan: in ``exchange`` (the pool's paths call them there): a call's variables travel as one
``Variables`` value; ``prepare`` checks and encodes a call into a ``Call`` before any worker
is involved; ``write_rest`` writes what is left of the frame; ``read_answer`` feeds the
worker's connection (``poll_channels``: one poll of its channels, for the blocking path and
the CLI's one-shot worker); ``death``/``timed_out`` are the other ways a call ends. Here:
``ready_for_call`` vets a worker just checked out; ``start`` writes the frame; ``settle``
records the outcome through the pool's state and returns the answer or raises; ``abandon``
is the end of a call its caller left. Functions, not a class: each takes what it reads, so
the per-call path pays no extra object. A caller's ask for its ``std.trace`` lines travels
as ``Call.traces``; ``settle`` cuts them from the call's stderr capture (``traces``) and gives
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

import time
from collections.abc import Callable, Iterable

from .._config import PoolConfig
from .._errors import Error, Overloaded, PoolClosed
from . import tracing
from .accounting import CANCELLED
from .connection import Answer
from .exchange import Call, Outcome, Worker, write_rest
from .processes import process_cpu_seconds
from .state import Effect, PoolState, Ticket
from .traces import deliver, lines_of

Perform = Callable[[Iterable[Effect]], None]


def queue_timed_out(config: PoolConfig) -> Overloaded:
    return Overloaded(f"no worker became free within {config.queue_timeout} s")


# -- with a worker: vet it, start the exchange ------------------------------------------


def admit(state: PoolState[Worker], perform: Perform, ticket: Ticket) -> bool:
    """Admit the call (the state raises a refusal), with an idle worker of its domain taken
    in the same transition if there is one, then vetted (``ready_for_call``; another taken
    for one discarded). False: none was there; the caller checks out (waits in turn)."""
    took = state.admit(ticket, True, ticket.call.ready_at)
    while took and not ready_for_call(state, perform, ticket):
        took = state.take(ticket)
    return took


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
    rest = memoryview(worker.outgoing)[sent:]
    return write_rest(worker, rest) if rest else None  # most frames went out whole


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
    sent_at, now = worker.sent_at, time.monotonic()  # the pool's state's clock too
    budget_cpu = cpu if outcome.keep and state.config.cpu_budget is not None else None
    effects = state.settle(worker, outcome, budget_cpu, now)
    if effects:  # most calls' check-in has none (a hand-over, a recycle have)
        perform(effects)
    error = outcome.error
    if error is not None and state.view().terminated:
        error = PoolClosed("the pool was terminated during the call")
    kind = None if error is None else error.kind
    # ``_record``, without its call.
    tenant, wait, run = call.domain.tenant, sent_at - call.ready_at, now - sent_at
    state.accounting.record(tenant, kind, used, wait, run)
    tracing.publish(tenant, worker.pid, wait, run, used, kind)
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
    cpu = process_cpu_seconds(worker.pid)  # ``process.cpu_seconds()``, a call less
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
