"""The pool's state and every transition of it, in one place (h11's rule for its ``_state.py``).

Goals: one owner of the pool's state; every change to it is a named method here, so no other
module assigns a state field (a ticket's fields included) or holds the lock, which is
private; readers get an immutable ``PoolView`` or ``Roster`` taken under it; no I/O under
the lock, and none here at all: a transition returns the ``Effect``s (kill, close, hand
over, wake, log) for its caller to perform once the lock is released. That makes the whole
pool's policy testable with fake workers (tests/test_state.py) and keeps the hand-over gain
(the giver writes the waiting caller's frame, outside the lock). The one wait here is
``wait_for_calls`` (``close()``), on a condition of that same lock. See docs/DESIGN.md,
"Call flow", for where each transition is called from.

Plan: ``PoolState`` holds the lifecycle ``Phase`` (one enum for what were four flags), one
``Member`` record per worker process (its ``WorkerStatus``, trust domain, calls served, CPU
seen at rest and at check-out, whether it was demoted), the idle list, the waiting
``Ticket``s in a ``fairness.FairQueue`` (one FIFO per domain, served in turn), how many
workers each domain holds, the start-up back-off and the counters. Workers are opaque here:
anything with a ``pid``. Time comes from the ``clock`` given (a fake one in tests).

The hot path (every call is admitted, takes, settles and leaves; most calls that wait are
handed a worker at check-in): how many workers serve, start, or were demoted is counted at
each status change (``_move``), never scanned; a call is admitted and takes an idle worker
in one transition (``admit(ticket, take=True)``); a transition reads the clock at most
once, and not at all where its caller passes the reading it has just made (``now``: the
call paths do); the budget and call-limit checks are comparisons against limits kept at
construction, their reasons worded only for a worker that goes; a worker that goes idle to
busy and back, or busy to busy by a hand-over, changes no count. Measured with fake
workers (admit, take, settle, leave): 5.7 -> 4.4 µs a call uncontended, 6.4 -> 4.9 µs for
calls that wait and are handed over (before issue 21: 2.9 and 3.4). Measured again in
one later run (best of 7; a call uncontended, and three calls of which one waits and is
handed over): 4.9 and 5.0 µs a call before the one-transition admission and the clock
passed in, 3.6 and 4.0 µs after, 3.4 and 3.6 µs for the code before issue 21.

Trust domains: a worker that has served one tenant never serves another; calls without a
tenant form a domain of their own. A check-out takes, in this order: an idle worker of the
caller's domain, an idle worker that never served anyone, a spare in place of an idle worker
of another domain (which is recycled), or, without a spare, it recycles that worker and waits
for the fresh replacement.

Tenants in time (issue 21, docs/ISOLATION.md "Tenants in time"): every place that hands out
a worker while calls wait (a check-in, a spare promoted, a fresh worker greeted) asks the
``FairQueue`` whose turn it is: the waiting domain with the least worker CPU used recently,
among those holding fewer than their share (``tenant_workers``) while another waits. A
worker given back goes to its own domain's next caller only if that domain's turn it is;
otherwise it is recycled and the fresh worker (or the spare, at once) goes to the domain in
turn, unless that domain already holds its share: then the worker stays warm (idle) for its
own domain for ``RESERVE_WINDOW``, so that a light tenant calling again beside a flood takes
it at once; a lapsed reservation goes to the domain in turn (its next caller, or the
supervisor's idle check). The CPU a call used (the worker's CPU at settle minus at
check-out; the time it was held when that is unknown, as for a call killed at its deadline)
is charged to its domain.
Queue limits are per domain (``TenantOverloaded``), the total bounded too: when it is full,
the domain with the most waiters loses its newest call. Burst capacity: when every worker
is held by a demoted call (``demoted``, SCHED_IDLE after its interactive budget) and a
domain without such a call waits, the spare is handed out at once and the supervisor starts
extra workers up to ``burst_limit``; a demoted worker is recycled after its call (its
priority cannot be raised back), and a worker beyond ``size`` is retired when it comes back
with nobody waiting. A used worker whose CPU budget left cannot fit a call's own timeout
(``CPU_HEADROOM_TIMEOUTS`` of it) is recycled at check-out rather than killed by SIGXCPU
mid-call.

Weak spots: the idle-CPU and idle-bytes checks are samples (the supervisor's, every
``IDLE_CHECK_INTERVAL``, and every check-out's and check-in's), so a worker that burns CPU
between two samples is retired at the next one, not at once. A domain's share is enforced
when workers are handed out, never by taking one back: a flood that holds every worker
before anyone else arrives keeps them until its calls end or are demoted. Turns cost a
recycle (a fork) each time the domain changes, the price of never sharing a worker.
"""

from __future__ import annotations

import collections
import enum
import logging
import math
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

from .._config import PoolConfig
from .._errors import (
    Error,
    EvaluationTimeout,
    PoolClosed,
    SandboxUnavailable,
    TenantOverloaded,
    WorkerCrashed,
    WorkerStartError,
)
from .._report import SandboxStatus
from .._stats import PoolStats
from .accounting import Accounting
from .backoff import backoff_delay

# A call's outcome, its trust domain and the CPU headroom rule: written with the steps of one
# exchange (``exchange``: eval's one worker uses them without a pool).
from .exchange import CPU_HEADROOM_TIMEOUTS, Domain, Outcome
from .fairness import FairQueue

# CPU seconds an idle worker or spare may use between two samples (a Go runtime's idle
# housekeeping uses well under a millisecond a second; a worker still evaluating after its
# answer uses most of a CPU).
IDLE_CPU_ALLOWANCE = 0.05
# A worker given back while only a domain that already holds its share waits stays idle for
# its own domain this long (a warm worker for that domain's next call, which is how a light
# tenant's calls keep their in-process latency beside a flood); then the flood may have it.
RESERVE_WINDOW = 1.0


class _Worker(Hashable, Protocol):
    @property
    def pid(self) -> int: ...


W = TypeVar("W", bound=_Worker)


class Phase(enum.Enum):
    """The pool's lifecycle, in order."""

    OPEN = "open"
    CLOSING = "closing"  # close(): no new calls; calls in flight and queued finish
    FAILED = "failed"  # no worker can ever start (``failure`` says why)
    TERMINATED = "terminated"  # terminate(): workers killed; queued and running calls fail
    STOPPED = "stopped"  # the supervisor has ended: callers close the workers they hold


class WorkerStatus(enum.Enum):
    """A worker's place in the pool (policy; ``processes.WorkerProcess`` is the mechanism)."""

    STARTING = "starting"
    SPARE = "spare"  # greeted, held back to replace the next worker that goes
    IDLE = "idle"
    BUSY = "busy"
    DYING = "dying"  # died while a caller holds it; the caller discards it


@dataclass(eq=False)
class Member(Generic[W]):
    worker: W
    status: WorkerStatus
    started_at: float
    domain: Domain | None = None  # None: has served nobody yet
    calls: int = 0
    epoch: int = 0  # changes at every check-out and check-in: samples of another epoch are stale
    # Its CPU at its last check-in (or as sampled while idle); while it is checked out only
    # its check-in changes it, so it is also the CPU it had at check-out (the call's cost,
    # charged to its domain, is its CPU at check-in less this).
    cpu_at_rest: float | None = None
    checked_out_at: float | None = None  # None: not held by a caller
    demoted: bool = False  # its call was moved to SCHED_IDLE: recycled after it
    idle_since: float = 0.0  # when it last went idle (``RESERVE_WINDOW``)


class Ticket:
    """One call's claim on a worker: what it waits for, what it was handed.

    ``call`` is the caller's encoded request: whoever hands the ticket a worker writes it
    to the worker *before* waking the caller (``HandOver``), so the worker starts at once.
    ``written`` says how much of it went out; ``handed`` that the writer also registered the
    request with the worker's connection. A ``queued`` ticket's caller must wait for its
    wake-up even if ``worker`` is already set: the hand-over may still be writing.
    Every field but ``call`` is set by ``PoolState`` transitions only; subclasses say how a
    caller is woken."""

    __slots__ = (
        "admitted",
        "call",
        "domain",
        "error",
        "handed",
        "queued",
        "timeout",
        "worker",
        "written",
    )

    def __init__(self, call: Any, domain: Domain, timeout: float | None = None) -> None:
        self.call = call
        self.domain = domain
        self.timeout = timeout  # the call's own (None: the pool's): its worker must fit it
        self.worker: Any = None
        self.error: Error | None = None
        self.written = 0
        self.handed = False
        self.queued = False
        self.admitted = False

    def wake(self) -> bool:
        """Tell the caller its worker (or error) is there; False if nobody can be told."""
        raise NotImplementedError


# -- effects: what a transition asks its caller to do, after the lock --------------------------


@dataclass(frozen=True)
class Kill:
    worker: Any


@dataclass(frozen=True)
class Close:
    """Kill, reap and close: the supervisor has stopped, so nobody else will."""

    worker: Any


@dataclass(frozen=True)
class WakeSupervisor:
    pass


class HandOver(NamedTuple):
    """Write ``ticket``'s request to ``worker``, then wake the ticket's caller. A named
    tuple, as ``Outcome``: one is made for every call that waited (the other effects are
    rare). No other effect is a tuple, so none compares equal to it."""

    ticket: Ticket
    worker: Any


@dataclass(frozen=True)
class Wake:
    """Wake a ticket's caller: its ``error`` is set."""

    ticket: Ticket


@dataclass(frozen=True)
class Log:
    level: int
    message: str
    args: tuple[Any, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)


Effect = Kill | Close | WakeSupervisor | HandOver | Wake | Log


@dataclass(frozen=True)
class IdleSample:
    """What the supervisor saw of an idle worker or spare outside the lock."""

    worker: Any
    epoch: int
    cpu: float | None  # None: could not be read (it has exited: its pidfd says so next)
    wrote: bool  # bytes (or end of stream) on its response channel


@dataclass(frozen=True)
class PoolView:
    """The pool's lifecycle as one reader sees it, at one instant (``PoolState.view``)."""

    phase: Phase
    failure: Error | None  # set once no worker can ever start
    start_failure: str  # the last start-up failure, while unresolved
    sandbox: SandboxStatus | None  # from the first hello (None before any)
    in_flight: int

    @property
    def started(self) -> bool:
        """A worker said hello and nothing failed the pool."""
        return self.sandbox is not None and self.failure is None

    @property
    def terminated(self) -> bool:
        """terminate() began, or the supervisor has ended: calls in flight are cut off."""
        return self.phase in _ENDED


@dataclass(frozen=True)
class Roster(Generic[W]):
    """Every member as the supervisor's poll sees it, at one instant (``PoolState.roster``):
    (worker, status, epoch, start time) each, and when the start-up back-off ends."""

    members: tuple[tuple[W, WorkerStatus, int, float], ...]
    next_spawn_at: float


class PoolState(Generic[W]):
    """Every field of the pool's state, and every transition. See the module docstring."""

    def __init__(self, config: PoolConfig, clock: Callable[[], float] = time.monotonic) -> None:
        assert config.size is not None
        self.config = config
        self._clock = clock
        self._size = config.size
        self._share = config.tenant_workers(config.size)
        self._max_workers = config.burst_limit(config.size)
        self._queue_limit_total = config.total_queue_limit()
        # The CPU a used worker may have at rest and still fit a call of the pool's own
        # timeout, as ``_unfit`` and ``_recycle_reason`` word it (inf: no budget): so the
        # hot path asks one comparison, and words a reason only for a worker that goes.
        budget = config.cpu_budget
        self._budget = math.inf if budget is None else budget
        self._timeout = config.timeout
        self._headroom = CPU_HEADROOM_TIMEOUTS * config.timeout
        self._max_calls = config.max_calls_per_worker or math.inf
        # Private: a transition takes it, performs nothing under it, and returns its effects.
        self._lock = threading.Lock()
        # close() waits on it for the last call in flight to leave (``leave`` notifies).
        self._calls_done = threading.Condition(self._lock)
        # What each tenant's calls cost: its own lock, never taken under this one.
        self.accounting = Accounting()
        self.phase = Phase.OPEN
        self.failure: Error | None = None
        self.members: dict[W, Member[W]] = {}
        # How many members serve (idle or busy) and how many are starting, kept by ``_move``
        # (and ``started``, ``_retire``, ``supervisor_stopped``): the hot path asks without a
        # scan of the members. Two ints, not a dict by status: an enum's hash is Python code.
        self._serving = 0
        self._starting_count = 0
        # How many members were demoted (busy or dying: each is retired after its call), so
        # that ``_burst_due``, asked at every enqueue, scans nothing while fewer than ``size``
        # are (a burst needs every active worker held by a demoted call).
        self._demoted = 0
        self.idle: list[Member[W]] = []
        self.queue: FairQueue[Domain, Ticket] = FairQueue(clock())
        self.holding: collections.Counter[Domain] = collections.Counter()  # busy workers by domain
        self.retired: list[W] = []  # killed, for the supervisor to reap and close
        self.held: set[W] = set()  # busy when the supervisor stopped: their callers close them
        self.in_flight = 0
        self.sandbox: SandboxStatus | None = None
        self.start_failure = ""  # the last start-up failure, while unresolved
        self.failures_in_a_row = 0
        self.next_spawn_at = 0.0
        self.spawned = 0
        self.initial_resolved = 0
        self.evaluations = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.timeouts = 0
        self.crashes = 0
        self.respawns = 0
        self.start_failures = 0
        self.recycles = 0

    @property
    def size(self) -> int:
        return self._size

    # -- admission ---------------------------------------------------------------------------

    def admit(self, ticket: Ticket, take: bool = False, now: float | None = None) -> bool:
        """A call enters (raises if the pool takes no new calls). The ticket records it, so
        that ``leave`` is right whatever interrupts the caller in between. With ``take``, a
        worker for it as ``take`` finds one, under the same lock (True: the ticket holds
        one): the call paths' first step, one transition."""
        with self._lock:
            if self.phase is Phase.FAILED and self.failure is not None:
                raise self.failure
            if self.phase is not Phase.OPEN:
                raise PoolClosed("the pool is closed")
            self.in_flight += 1
            ticket.admitted = True
            return take and self._take(ticket, now)

    def leave(self, ticket: Ticket) -> None:
        """A call has left (if it was admitted); the last one of a closing pool wakes
        ``wait_for_calls``."""
        with self._lock:
            if ticket.admitted:
                ticket.admitted = False
                self.in_flight -= 1
            if self.in_flight == 0 and self.phase is not Phase.OPEN:
                self._calls_done.notify_all()

    def wait_for_calls(self, timeout: float | None) -> bool:
        """Block until no call is in flight, at most ``timeout`` seconds (None: no limit);
        True if none is. For ``close()``, after ``begin_close``: no call enters any more."""
        with self._lock:
            return self._calls_done.wait_for(lambda: self.in_flight == 0, timeout)

    def count_error(self, error: Error) -> None:
        with self._lock:
            self.errors[error.kind] += 1

    # -- check out ---------------------------------------------------------------------------

    def take(self, ticket: Ticket, now: float | None = None) -> bool:
        """The hot path: an idle worker of the ticket's domain (or a fresh one) at once, if
        the domain may hold one more and the worker's CPU budget fits the call. ``now``:
        the state's clock as the caller read it just before (None: read here)."""
        with self._lock:
            return self._take(ticket, now)

    def _take(self, ticket: Ticket, now: float | None) -> bool:
        """Under the lock: ``take``."""
        idle = self.idle
        if not idle:  # every worker busy (callers outnumber them): nothing to take
            return False
        domain = ticket.domain
        if self.queue.length and not self._may_hold_more(domain):
            return False
        member: Member[W] | None
        if idle[-1].domain == domain:  # ``_idle_for``'s first pick, without the scan
            member = idle.pop()
        else:
            member = self._idle_for(domain)
            if member is None:
                return False
        cpu, timeout = member.cpu_at_rest, ticket.timeout
        # ``_unfit`` finds a reason only where a call of the pool's own timeout would not
        # fit, or for a longer timeout: its comparisons first, without its call.
        if (
            cpu is not None
            and (
                cpu + self._headroom >= self._budget
                or (timeout is not None and timeout > self._timeout)
            )
            and self._unfit(member, ticket)
        ):
            idle.append(member)  # ``take_or_wait`` recycles it
            return False
        self._check_out(member, ticket, self._clock() if now is None else now)
        return True

    def take_or_wait(self, ticket: Ticket, now: float | None = None) -> list[Effect]:
        """A worker at once (the ticket holds it), or the ticket queued (``ticket.queued``:
        its caller waits for the wake-up). Raises when the pool cannot serve it (failed, no
        worker can start, its domain's queue is full). ``now``: as ``take``'s."""
        effects: list[Effect] = []
        with self._lock:
            if now is None:
                now = self._clock()
            domain = ticket.domain
            # Both ways to take need an idle worker (``_idle_for``, ``_claimable``).
            may_take = bool(self.idle) and (not self.queue.length or self._may_hold_more(domain))
            while may_take and (member := self._idle_for(domain)) is not None:
                unfit = self._unfit(member, ticket)
                if not unfit:
                    self._check_out(member, ticket, now)
                    return effects
                self.idle.append(member)  # ``_recycle`` takes it off the idle list
                self._recycle(member, unfit, effects)  # a spare may take its place: loop
            if self.failure is not None or self.start_failure or self.phase in _ENDED:
                self._raise_if_hopeless()
            victim = self._claimable(domain) if may_take else None
            if victim is not None:
                # Only workers of other domains are idle: recycle the longest idle one that
                # is not kept for its own domain.
                self._recycle(victim, f"the next caller is of {domain.describe()}", effects)
                member = self._idle_for(domain)  # the spare promoted in its place
                if member is not None:
                    self._check_out(member, ticket, now)
                    return effects
            self._enqueue(ticket, now, effects)
            ticket.queued = True
            if self._demoted >= self._size:  # else no burst can be due (``_burst_due``)
                self._burst_if_due(effects)
        return effects

    def _enqueue(self, ticket: Ticket, now: float, effects: list[Effect]) -> None:
        """Under the lock: ``ticket`` waits in its domain's queue, if the domain's limit and
        the total allow; a full total pushes out the newest call of the domain with the
        most waiting, unless that is the caller's own (a flood refuses only the flooder)."""
        domain = ticket.domain
        limit = self.config.queue_limit
        if self.queue.length >= self._queue_limit_total:
            waiting = self.queue.waiting(domain)
            if waiting >= limit:
                raise _domain_full(domain, limit)
            longest = self.queue.longest()
            if longest == domain or self.queue.waiting(longest) <= waiting + 1:
                raise _queue_full(
                    domain,
                    f"{len(self.queue)} calls of {self.queue.domains()} tenants are waiting "
                    f"(queue_limit_total={self._queue_limit_total}) and it has its part",
                )
            pushed = self.queue.pop_newest(longest)
            pushed.error = _queue_full(
                longest,
                f"its newest waiting call was pushed out of the full queue "
                f"(queue_limit_total={self._queue_limit_total}) for another tenant's",
            )
            effects.append(Wake(pushed))
        if not self.queue.push(ticket, now, limit):
            raise _domain_full(domain, limit)

    def give_up(self, ticket: Ticket) -> bool:
        """The caller stops waiting (its queue timeout): True if it was still queued; False
        if a worker was handed to it meanwhile (its request is being written: it should
        wait for the wake-up, which follows the write)."""
        with self._lock:
            if ticket.worker is not None:
                return False
            self.queue.remove(ticket)
            return True

    def abandon(self, ticket: Ticket) -> list[Effect]:
        """The caller is gone (an exception, a cancellation) at any point of its call: out of
        the queue, and the worker it holds (its request may be in the worker's channel, and
        nobody will read the answer) discarded."""
        with self._lock:
            if ticket.worker is None:
                # Only a ticket that was queued can be there: a refused one (its domain's
                # queue full, in a flood a thousand a second) need not be looked for.
                if ticket.queued:
                    self.queue.remove(ticket)
                return []
        return self.discard(ticket.worker, "its caller gave up during the call", logging.INFO)

    def reject(self, ticket: Ticket, reason: str, *, died: bool = False) -> list[Effect]:
        """The worker ``ticket`` was just given is unfit to serve (it wrote while idle, or
        died): discarded, and the ticket holds nothing again (its caller takes another)."""
        worker = ticket.worker
        with self._lock:
            ticket.worker = None
            if died:
                self.crashes += 1
        return self.discard(worker, reason)

    def handed_over(self, ticket: Ticket, written: int) -> None:
        """The giver of a ``HandOver`` registered the request with the worker's connection
        and wrote ``written`` bytes of its frame; it wakes the caller next. No lock: between
        the check-out and the wake-up only the giver touches these fields, and the wake-up
        (a lock released, a future set) publishes them to the caller."""
        ticket.written = written
        ticket.handed = True

    def hand_over_failed(self, ticket: Ticket, error: Error) -> list[Effect]:
        """The giver could not write the request (a conversation out of turn: a bug, but
        never a lost caller): the worker is discarded and the caller woken with ``error``."""
        effects = self.abandon(ticket)
        ticket.error = error  # before the wake-up, which publishes it (see ``handed_over``)
        effects.append(Wake(ticket))
        return effects

    def _idle_for(self, domain: Domain) -> Member[W] | None:
        idle = self.idle
        for index in range(len(idle) - 1, -1, -1):  # last in, first out: the warmest
            if idle[index].domain == domain:
                return idle.pop(index)
        for index in range(len(idle) - 1, -1, -1):
            if idle[index].domain is None:
                return idle.pop(index)
        return None

    def _spare(self) -> Member[W] | None:
        if self.phase not in (Phase.OPEN, Phase.CLOSING):
            return None
        return next((m for m in self.members.values() if m.status is WorkerStatus.SPARE), None)

    def _may_hold_more(self, domain: Domain) -> bool:
        """Under the lock: ``domain`` holds fewer workers than its share, or nobody else waits."""
        return self.holding.get(domain, 0) < self._share or not self.queue.others_wait(domain)

    def _unfit(self, member: Member[W], ticket: Ticket) -> str:
        """Under the lock: why a used worker cannot take ``ticket``'s call: its CPU budget
        left would not fit the call's own timeout ("" if it fits). A worker that served no
        call is never unfit: ``exchange.prepare`` refuses a timeout no fresh worker fits."""
        budget = self.config.cpu_budget
        cpu = member.cpu_at_rest
        if budget is None or cpu is None or member.calls == 0:
            return ""
        timeout = self.config.timeout if ticket.timeout is None else ticket.timeout
        if cpu + CPU_HEADROOM_TIMEOUTS * timeout < budget:
            return ""
        return (
            f"it used {cpu:.1f} of its cpu_budget={budget} CPU seconds: too few left "
            f"for a call of timeout={timeout:g}"
        )

    def _check_out(self, member: Member[W], ticket: Ticket, now: float) -> None:
        """Under the lock: ``member`` (already off the idle list) serves ``ticket`` from
        ``now``."""
        if member.status in _SERVING:  # idle, or busy handed over: it serves still (no count)
            member.status = WorkerStatus.BUSY
        else:
            self._move(member, WorkerStatus.BUSY)
        domain = member.domain = ticket.domain
        member.calls += 1
        member.epoch += 1
        member.checked_out_at = now
        holding = self.holding
        holding[domain] = holding.get(domain, 0) + 1  # ``get``: a Counter's ``+=`` is Python
        ticket.worker = member.worker

    def _move(self, member: Member[W], status: WorkerStatus) -> None:
        """Under the lock: ``member`` has ``status`` now (``_serving`` and
        ``_starting_count`` follow)."""
        old = member.status
        member.status = status
        self._serving += (status in _SERVING) - (old in _SERVING)
        if old is WorkerStatus.STARTING:
            self._starting_count -= 1

    def _release(self, member: Member[W], cpu: float | None, now: float | None = None) -> None:
        """Under the lock: a caller no longer holds ``member`` (checked in or retired): the
        CPU its call used is charged to its domain: the worker's CPU now less at check-out,
        or, unknown (killed at its deadline, or no budget read), the time it was held.
        ``now``: the clock, if the caller has read it already."""
        domain = member.domain
        if member.checked_out_at is None or domain is None:
            return
        if now is None:
            now = self._clock()
        before = member.cpu_at_rest  # as at check-out: nothing changes it while busy
        used = now - member.checked_out_at if cpu is None or before is None else cpu - before
        self.queue.charge(domain, used, now)
        member.checked_out_at = None
        holding = self.holding
        held = holding[domain] - 1
        if held > 0:
            holding[domain] = held
        else:
            holding.pop(domain)  # bounded: only domains holding workers stay

    def _raise_if_hopeless(self) -> None:
        if self.failure is not None:
            raise self.failure
        if self.phase in _ENDED:
            raise PoolClosed("the pool was terminated")
        if self.start_failure and not self._active():
            raise WorkerStartError(
                f"no worker is running: workers fail to start ({self.start_failure})",
                cause=self.start_failure,
            )

    # -- check in, discard, record -----------------------------------------------------------

    def settle(
        self, worker: W, outcome: Outcome, cpu: float | None = None, now: float | None = None
    ) -> list[Effect]:
        """Record how a call ended, then check its worker in (``outcome.keep``) or discard
        it, under one lock. ``cpu`` is the worker's CPU time now, read outside the lock;
        ``now`` the state's ``clock`` if the caller has read it (None: read here)."""
        effects: list[Effect] = []
        with self._lock:
            if outcome.error is None and outcome.answer is not None:
                self.evaluations += 1  # an answer: ``_record``'s first case, without its call
                ours = False
            else:
                # terminate() killed every worker: a call's worker that ended then ended by
                # our hand, which is no death to count or to warn of (its caller gets
                # PoolClosed).
                ours = outcome.died and self.phase in _ENDED
                if not ours:
                    self._record(outcome)
            member = self.members.get(worker)
            if outcome.reason:
                domain = member.domain if member is not None else None
                level = logging.DEBUG if ours else logging.WARNING
                effects.append(_log(level, outcome.reason, worker.pid, domain))
            if member is None:
                effects += self._orphan(worker)
                return effects
            if now is None:
                now = self._clock()
            self._release(member, cpu, now)
            if outcome.keep:
                self._check_in(member, cpu, effects, outcome.recycle, now)
            else:
                self._retire(member, effects)
        return effects

    def _record(self, outcome: Outcome) -> None:
        error = outcome.error
        if error is None and outcome.answer is not None:
            self.evaluations += 1
        elif isinstance(error, EvaluationTimeout):
            self.timeouts += 1
        if outcome.died or isinstance(error, WorkerCrashed):
            self.crashes += 1

    def _check_in(
        self,
        member: Member[W],
        cpu: float | None,
        effects: list[Effect],
        recycle: str,
        now: float,
    ) -> None:
        """Under the lock: a caller is done with ``member`` (released): straight to the next
        waiter of its domain if it is that domain's turn (with that waiter's request written
        first, outside the lock), else to the idle list; or recycled (its call budget or CPU
        budget is spent, it asked to be, it was demoted, or another domain's turn it is), or
        retired (a burst worker nobody waits for)."""
        if member.status is WorkerStatus.DYING or self.phase in _ENDED:
            self._retire(member, effects)
            return
        # ``_recycle_reason``'s checks as comparisons; its words only for a worker that goes.
        if (
            recycle
            or member.demoted
            or member.calls >= self._max_calls
            or (cpu is not None and cpu + self._headroom >= self._budget)
        ):
            self._recycle(member, recycle or self._recycle_reason(member, cpu), effects)
            return
        member.epoch += 1
        member.cpu_at_rest = cpu
        queue = self.queue
        if queue.length:
            domain = queue.next_domain(self.holding, self._share, now)
            if domain is not None and domain != member.domain and not self._owed(domain):
                domain = None  # it has its share: this worker stays warm for its own domain
            if domain is not None:
                ticket = queue.peek(domain)
                if domain != member.domain:
                    reason = f"the next caller in turn is of {domain.describe()}"
                elif ticket.timeout is not None and ticket.timeout > self._timeout:
                    reason = self._unfit(member, ticket)
                else:  # it has room for a call of the pool's own timeout (checked above)
                    reason = ""
                if reason:
                    self._recycle(member, reason, effects)  # a fresh one goes to ``domain``
                    return
                queue.pop(domain)
                self._check_out(member, ticket, now)
                effects.append(HandOver(ticket, member.worker))
                return
        if self._serving > self._size:
            effects.append(
                _log(logging.DEBUG, "burst worker retired: nobody waits", member.worker.pid, None)
            )
            self._retire(member, effects)
            return
        # ``_rest``, without its call: busy (a caller held it) to idle, no count changes.
        member.status = WorkerStatus.IDLE
        member.idle_since = now
        self.idle.append(member)

    def _rest(self, member: Member[W], now: float) -> None:
        """Under the lock: ``member`` goes idle ``now`` (``idle_since``: its warm
        reservation)."""
        if member.status is WorkerStatus.BUSY:  # busy to idle: it serves still (no count)
            member.status = WorkerStatus.IDLE
        else:
            self._move(member, WorkerStatus.IDLE)
        member.idle_since = now
        self.idle.append(member)

    def _starting(self) -> int:
        """Under the lock: how many workers are starting (not yet greeted)."""
        return self._starting_count

    def _owed(self, domain: Domain) -> bool:
        """Under the lock: ``domain`` holds fewer workers than its share and no worker being
        started will serve it, so a worker of another domain given back goes to it
        (recycled) rather than staying warm. A worker that is starting (a replacement for
        one of its own that ended, a fork: milliseconds) while the pool is short of
        ``size`` is handed to the domain in turn when it says hello, so a warm worker is not
        recycled for a wait that short."""
        if self.holding.get(domain, 0) >= self._share:
            return False
        if self._active() >= self.size:
            return True  # a starting worker would only be a spare: nothing else comes
        return self._starting() == 0

    def _claimable(self, domain: Domain) -> Member[W] | None:
        """Under the lock: the longest idle worker (of another domain) that a caller of
        ``domain`` may have recycled: any, if ``domain`` is owed a worker; else one idle for
        ``RESERVE_WINDOW`` already (its own domain has not come back for it)."""
        if not self.idle:
            return None
        if self._owed(domain):
            return self.idle[0]
        lapsed = self._clock() - RESERVE_WINDOW
        return next((m for m in self.idle if m.idle_since <= lapsed), None)

    def _next_domain(self, now: float | None = None) -> Domain | None:
        """Under the lock: whose turn the next worker handed out is (None: nobody waits)."""
        if now is None:
            now = self._clock()
        return self.queue.next_domain(self.holding, self._share, now)

    def _recycle_reason(self, member: Member[W], cpu: float | None) -> str:
        if member.demoted:
            return "its call was demoted (SCHED_IDLE cannot be undone)"
        limit = self.config.max_calls_per_worker
        if limit is not None and member.calls >= limit:
            return f"it served max_calls_per_worker={limit} calls"
        budget = self.config.cpu_budget
        if (
            budget is not None
            and cpu is not None
            and cpu + CPU_HEADROOM_TIMEOUTS * self.config.timeout >= budget
        ):
            return f"it used {cpu:.1f} of its cpu_budget={budget} CPU seconds"
        return ""

    def _recycle(self, member: Member[W], reason: str, effects: list[Effect]) -> None:
        """Under the lock: retire a healthy worker so that a fresh one replaces it."""
        self.recycles += 1
        effects.append(_log(logging.INFO, f"recycled: {reason}", member.worker.pid, member.domain))
        self._retire(member, effects)

    def discard(self, worker: W, reason: str, level: int = logging.WARNING) -> list[Effect]:
        """Kill and retire ``worker`` in one (idempotent); a spare takes its place."""
        effects: list[Effect] = []
        with self._lock:
            member = self.members.get(worker)
            if member is None:
                return self._orphan(worker)
            if reason:
                effects.append(_log(level, reason, worker.pid, member.domain))
            self._retire(member, effects)
        return effects

    def _orphan(self, worker: W) -> list[Effect]:
        """Under the lock: a worker no longer a member. Held at the supervisor's stop: its
        caller closes it; otherwise it was retired already."""
        if worker in self.held:
            self.held.discard(worker)
            return [Close(worker)]
        return []

    def _retire(self, member: Member[W], effects: list[Effect]) -> None:
        """Under the lock: out of service, killed; the supervisor reaps it and starts another."""
        was_active = member.status in _SERVING
        self._release(member, None)  # a no-op for a worker settled already
        if member.status is WorkerStatus.IDLE:
            self.idle.remove(member)
        del self.members[member.worker]
        if was_active:
            self._serving -= 1
        elif member.status is WorkerStatus.STARTING:
            self._starting_count -= 1
        if member.demoted:
            self._demoted -= 1
        self.retired.append(member.worker)
        effects.append(Kill(member.worker))
        effects.append(WakeSupervisor())
        if was_active:
            self._promote_spare(effects)

    def _promote_spare(self, effects: list[Effect]) -> None:
        """Capacity comes back now, not after a start (a fork of the template, a few
        milliseconds; a re-executed interpreter, about 60 ms); not after terminate(), and
        not beyond ``size`` unless a burst is due."""
        if self._active() >= self.size and not self._burst_due():
            return
        spare = self._spare()
        if spare is not None:
            self._hand_out(spare, effects)

    def _hand_out(self, member: Member[W], effects: list[Effect]) -> None:
        """Under the lock: a fresh worker to the first caller of the domain in turn, else
        to the idle list."""
        now = self._clock()
        domain = self._next_domain(now)
        if domain is not None:
            ticket = self.queue.pop(domain)
            self._check_out(member, ticket, now)
            effects.append(HandOver(ticket, member.worker))
            return
        self._rest(member, now)

    def _fail_waiters(self, error: Error, effects: list[Effect]) -> None:
        for ticket in self.queue.drain():
            ticket.error = error
            effects.append(Wake(ticket))

    # -- burst capacity ------------------------------------------------------------------------

    def demoted(self, worker: W) -> list[Effect]:
        """``worker``'s call ran past its interactive budget and was moved to SCHED_IDLE: it
        is recycled after that call. If now every worker is held by a demoted call while a
        domain without one waits, the spare serves it at once and a burst worker is due
        (``WakeSupervisor``: ``spawn_due`` counts it)."""
        effects: list[Effect] = []
        with self._lock:
            member = self.members.get(worker)
            if member is None or member.status is not WorkerStatus.BUSY or member.demoted:
                return effects
            member.demoted = True
            self._demoted += 1
            self._burst_if_due(effects)
        return effects

    def _burst_if_due(self, effects: list[Effect]) -> None:
        """Under the lock: if a burst is due, the spare is handed out and the supervisor
        woken to start what ``spawn_due`` now counts."""
        if self._burst_due():
            self._promote_spare(effects)
            effects.append(WakeSupervisor())

    def _burst_due(self) -> bool:
        """Under the lock: a worker beyond ``size`` is wanted now: calls wait, no worker is
        starting, at least ``size`` workers are active and every one is held by a demoted
        call, a waiting domain holds none of them, and the pool is under ``max_workers``."""
        if self._demoted < self._size or not self.queue.length:
            return False  # not every one of ``size`` active workers can be held by a demoted call
        if self.phase not in (Phase.OPEN, Phase.CLOSING):
            return False
        active = 0
        demoted: set[Domain | None] = set()
        for member in self.members.values():
            if member.status is WorkerStatus.STARTING:
                return False
            if member.status is WorkerStatus.IDLE:
                return False
            if member.status is WorkerStatus.BUSY:
                if not member.demoted:
                    return False
                active += 1
                demoted.add(member.domain)
        if not self.size <= active < self._max_workers:
            return False  # under ``size``: a plain replacement is due, not a burst
        # Some waiting domain is not one of the demoted calls' (not the flood's own queue).
        return self.queue.domains() > sum(self.queue.waiting(d) > 0 for d in demoted if d)

    # -- the supervisor's transitions ---------------------------------------------------------

    def spawn_due(self, now: float) -> int:
        """How many workers to start now (none while backing off or once closed)."""
        with self._lock:
            if self.phase not in (Phase.OPEN, Phase.CLOSING) or now < self.next_spawn_at:
                return 0
            # Spares start after the first wave: on a small machine they would slow it down.
            spares = self.config.spares if self._initial_done() else 0
            # Burst workers alive stay counted; one more while a burst is due.
            active = max(self.size, self._active()) + int(self._burst_due())
            return max(0, min(active, self._max_workers) + spares - len(self.members))

    def started(self, worker: W, now: float) -> None:
        with self._lock:
            self.members[worker] = Member(worker, WorkerStatus.STARTING, now)
            self._starting_count += 1
            if self.spawned >= self.size + self.config.spares:
                self.respawns += 1  # beyond the first workers and spares: a replacement
            self.spawned += 1

    def greeted(self, worker: W, sandbox: SandboxStatus) -> list[Effect]:
        """A worker said a valid hello: serve with it, hold it back as a spare, or refuse it
        (the sandbox is required and missing: then no worker ever will be accepted)."""
        effects: list[Effect] = []
        with self._lock:
            member = self.members.get(worker)
            if member is None or member.status is not WorkerStatus.STARTING:
                return effects
            self.initial_resolved += 1
            if self.config.require_sandbox and not sandbox.enforced:
                self.sandbox = sandbox
                self._fail(
                    SandboxUnavailable(
                        "require_sandbox=True, but the workers have no Landlock sandbox: "
                        f"{sandbox.reason}",
                        reason=sandbox.reason,
                    ),
                    effects,
                )
                self._retire(member, effects)
                return effects
            self.sandbox = self.sandbox or sandbox
            self.failures_in_a_row = 0
            self.start_failure = ""
            self._move(member, WorkerStatus.SPARE)  # not starting: ``_burst_due`` counts it
            if self._active() < self.size or self._burst_due():
                self._hand_out(member, effects)
        return effects

    def start_failed(self, worker: W | None, reason: str, now: float) -> list[Effect]:
        """A worker could not start (or said so): back off, retire it, and fail the waiting
        callers while no worker is running."""
        effects: list[Effect] = []
        with self._lock:
            self.failures_in_a_row += 1
            delay = backoff_delay(self.failures_in_a_row)
            self.next_spawn_at = now + delay
            self.start_failures += 1
            self.start_failure = reason
            self.initial_resolved += 1
            pid = 0
            if worker is not None:
                member = self.members.get(worker)
                if member is not None:
                    pid = worker.pid
                    self._retire(member, effects)
            if self.failures_in_a_row == 1 or self.failures_in_a_row % 10 == 0:
                effects.append(
                    Log(
                        logging.WARNING,
                        "worker start-up failed: %s (attempt %d; next in %.1f s)",
                        (reason, self.failures_in_a_row, delay),
                        {"worker_pid": pid, "backoff_seconds": delay},
                    )
                )
            if not self._active():
                message = f"worker start-up failed: {reason}"
                self._fail_waiters(WorkerStartError(message, cause=reason), effects)
        return effects

    def exited(self, worker: W, how: str) -> list[Effect]:
        """A worker's pidfd says it has exited (``how``: "killed by SIGKILL", ...). Idle, a
        spare, or killed from outside while starting: retired now. Busy: its caller sees
        the end of its channel and discards it; a spare takes its place now. After
        ``terminate()`` (which killed every worker) an exit is the pool's own doing: logged
        at DEBUG, not counted as a crash, and nothing replaces it."""
        effects: list[Effect] = []
        with self._lock:
            member = self.members.get(worker)
            if member is None:
                return effects
            if member.status is WorkerStatus.BUSY:
                self._move(member, WorkerStatus.DYING)
                self._promote_spare(effects)
                return effects
            if member.status is WorkerStatus.DYING:
                return effects
            if member.status is WorkerStatus.STARTING:
                self.initial_resolved += 1
            if self.phase in _ENDED:
                message = f"{member.status.value} worker ended ({how}): the pool was terminated"
                effects.append(_log(logging.DEBUG, message, worker.pid, member.domain))
            else:
                self.crashes += 1
                message = f"{member.status.value} worker died ({how}); replacing it"
                effects.append(_log(logging.WARNING, message, worker.pid, member.domain))
            self._retire(member, effects)
        return effects

    def idle_check(self, samples: list[IdleSample]) -> list[Effect]:
        """The supervisor's sample of idle workers and spares: one that wrote while idle, or
        whose CPU time grew since it came to rest, is discarded."""
        effects: list[Effect] = []
        with self._lock:
            for sample in samples:
                member = self.members.get(sample.worker)
                if member is None or member.epoch != sample.epoch:
                    continue
                if member.status not in (WorkerStatus.IDLE, WorkerStatus.SPARE):
                    continue
                if sample.wrote:
                    reason = f"{member.status.value} worker wrote to its channel while idle"
                elif sample.cpu is None:
                    continue
                elif member.cpu_at_rest is None:
                    member.cpu_at_rest = sample.cpu
                    continue
                elif sample.cpu - member.cpu_at_rest > IDLE_CPU_ALLOWANCE:
                    used = sample.cpu - member.cpu_at_rest
                    reason = f"{member.status.value} worker used {used:.3f} CPU seconds while idle"
                else:
                    member.cpu_at_rest = sample.cpu
                    continue
                effects.append(_log(logging.WARNING, reason, member.worker.pid, member.domain))
                self._retire(member, effects)
            self._end_lapsed_reservations(effects)
        return effects

    def _end_lapsed_reservations(self, effects: list[Effect]) -> None:
        """Under the lock: a worker kept warm for its domain (``RESERVE_WINDOW``) that its
        domain has not come back for goes to the domain in turn while calls wait: recycled,
        so that a fresh worker (the spare at once) serves that domain; no more of them than
        there are waiting calls no starting worker will serve."""
        for _ in range(len(self.queue) - self._starting()):
            domain = self._next_domain()
            if domain is None:
                return
            member = self._claimable(domain)
            if member is None:
                return
            reason = f"kept idle for {RESERVE_WINDOW:g} s while {domain.describe()} waits"
            self._recycle(member, reason, effects)

    def fail(self, error: Error) -> list[Effect]:
        """No worker can ever be started (the supervisor failed): every caller gets ``error``."""
        effects: list[Effect] = []
        with self._lock:
            self._fail(error, effects)
        return effects

    def _fail(self, error: Error, effects: list[Effect]) -> None:
        self.failure = error
        if self.phase in (Phase.OPEN, Phase.CLOSING):
            self.phase = Phase.FAILED
        self._fail_waiters(error, effects)

    def take_retired(self) -> list[W]:
        with self._lock:
            retired, self.retired = self.retired, []
            return retired

    def roster(self) -> Roster[W]:
        """Every member's worker, status, epoch and start time, for the supervisor's poll."""
        with self._lock:
            members = tuple(
                (m.worker, m.status, m.epoch, m.started_at) for m in self.members.values()
            )
            return Roster(members, self.next_spawn_at)

    def status_of(self, worker: W) -> WorkerStatus | None:
        with self._lock:
            member = self.members.get(worker)
            return None if member is None else member.status

    def initial_done(self) -> bool:
        """The constructor waits until every worker of the first wave said hello, or as many
        start-up attempts as the pool's size ended, or the pool failed."""
        with self._lock:
            return self._initial_done()

    def _initial_done(self) -> bool:
        return (
            self._active() >= self.size
            or self.initial_resolved >= self.size
            or self.failure is not None
        )

    # -- lifecycle ---------------------------------------------------------------------------

    def begin_close(self) -> None:
        with self._lock:
            if self.phase is Phase.OPEN:
                self.phase = Phase.CLOSING

    def begin_terminate(self) -> list[Effect]:
        """Every caller waiting gets PoolClosed; every worker, busy ones too, is killed (a
        busy worker's caller sees the end of its channel)."""
        effects: list[Effect] = []
        with self._lock:
            if self.phase is not Phase.STOPPED:
                self.phase = Phase.TERMINATED
            self._fail_waiters(PoolClosed("the pool was terminated"), effects)
            effects.extend(Kill(worker) for worker in self.members)
        return effects

    def supervisor_stopped(self) -> tuple[list[W], list[W]]:
        """The supervisor ends: the workers it closes now, and those it only kills (held by
        a caller, who closes them: no fd is closed under a caller's feet)."""
        with self._lock:
            self.phase = Phase.STOPPED
            held = [m.worker for m in self.members.values() if m.status in _HELD]
            free = [m.worker for m in self.members.values() if m.status not in _HELD]
            free += self.retired
            self.held.update(held)
            self.holding.clear()
            self.members.clear()
            self._serving = self._starting_count = self._demoted = 0
            self.idle.clear()
            self.retired = []
            return free, held

    # -- reading -----------------------------------------------------------------------------

    def _active(self) -> int:
        """Under the lock: how many workers serve (idle or busy), spares not counted."""
        return self._serving

    def view(self) -> PoolView:
        with self._lock:
            return PoolView(
                self.phase, self.failure, self.start_failure, self.sandbox, self.in_flight
            )

    def stats(self) -> PoolStats:
        with self._lock:
            states = collections.Counter(m.status for m in self.members.values())
            active = self._serving  # the kept counts (a scan gives the rest)
            return PoolStats(
                size=self.size,
                alive=active,
                busy=states[WorkerStatus.BUSY],
                idle=states[WorkerStatus.IDLE],
                starting=self._starting_count,
                spares=states[WorkerStatus.SPARE],
                evaluations=self.evaluations,
                errors=dict(self.errors),
                timeouts=self.timeouts,
                crashes=self.crashes,
                respawns=self.respawns,
                start_failures=self.start_failures,
                queue_depth=len(self.queue),
                worker_pids=tuple(sorted(m.worker.pid for m in self.members.values())),
                recycles=self.recycles,
                burst=max(0, active - self.size),
            )


_HELD = (WorkerStatus.BUSY, WorkerStatus.DYING)
_ENDED = (Phase.TERMINATED, Phase.STOPPED)  # calls in flight are cut off
_SERVING = (WorkerStatus.IDLE, WorkerStatus.BUSY)  # ``_active`` counts these


def _queue_full(domain: Domain, why: str) -> TenantOverloaded:
    return TenantOverloaded(
        f"{domain.describe()} has as many calls waiting as it may: {why}", tenant=domain.tenant
    )


def _domain_full(domain: Domain, limit: int) -> TenantOverloaded:
    return _queue_full(domain, f"{limit} of its calls are waiting (queue_limit={limit})")


def _log(level: int, message: str, pid: int, domain: Domain | None) -> Log:
    tenant = domain.tenant if domain is not None else None
    where = "" if tenant is None else " (tenant %r)"
    args: tuple[Any, ...] = (pid,) if tenant is None else (pid, tenant)
    return Log(
        level,
        "worker %d: " + message.replace("%", "%%") + where,
        args,
        {"worker_pid": pid, "tenant": tenant},
    )
