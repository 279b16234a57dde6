"""Fair queuing of waiting calls across trust domains (issue 21): whose turn the next worker is.

Goals: a domain with a steady queue (a flood of calls, looping snippets) cannot keep every
worker while another domain waits, and a single caller behind any flood waits a bounded
number of hand-outs. Turns are weighted by the worker CPU each domain used recently, so a
tenant that burns seconds per call yields to one that needs a millisecond. Sans-I/O: time
is passed in; ``PoolState`` calls this under its lock, so nothing here locks.

Plan: one FIFO per domain with waiters, in a ring (a dict in insertion order: a domain that
is served goes to its back). Each domain's recent worker CPU is an exponentially decayed sum
(``USAGE_HALF_LIFE``), decayed in steps of ``DECAY_STEP`` for every domain at once, so that
two usages compare exactly and time never reorders them. The next domain is the one with
the least usage among those allowed more workers (the caller says which: its share), ties
to the one first in the ring (the longest without a turn). Start-time fair queuing's rule
for a new flow: a domain with no usage on record enters at the least usage of the domains
waiting, not at zero, so fresh tenant names (or a forgotten one) cannot cut in front of a
light tenant that is remembered. The usage is charged after the call (its CPU is known only
then): until then the domain's place at the back of the ring is what keeps it from taking
every worker, with the per-domain share its caller applies.

Memory stays bounded with attacker-chosen tenant names: a domain is remembered while it has
waiters or a usage above ``NEGLIGIBLE_CPU``, and at most ``MAX_REMEMBERED`` domains without
waiters are kept (the heaviest); the number of waiters is bounded by the caller's limits.
Forgetting a heavy domain costs little: it comes back at the least waiting usage.

The hot path (one tenant's calls, a queue whenever callers outnumber workers): a domain
waiting alone has the turn without a look at the usages, and the decay pass is entered only
once its step has passed, so a call costs ``push``, ``pop`` and ``charge`` and little else.

Weak spots: choosing a domain scans the domains with waiters (bounded by the total queue
limit; only when a worker is handed out while two or more wait); the decay pass scans every
remembered domain, once per ``DECAY_STEP`` at most. Fairness is per domain name: a caller
who may pick any number of tenant names gets as many turns (the application authenticates
tenants). CPU is charged when the call ends, so a domain's first long calls are paid for
after they ran.
"""

from __future__ import annotations

import collections
import heapq
import math
from collections.abc import Hashable, Iterator, Mapping
from typing import Any, Generic, Protocol, TypeVar

# Seconds after which a domain's recorded CPU counts half: "recently" is the last ~10-20 s.
USAGE_HALF_LIFE = 5.0
# Usages decay in steps this long (all at once: comparisons stay exact between steps).
DECAY_STEP = 0.5
# CPU seconds below which a domain without waiters is forgotten (a light call is ~0.3 ms).
NEGLIGIBLE_CPU = 1e-3
# Domains without waiters remembered at most (the heaviest kept): ~100 bytes each.
MAX_REMEMBERED = 4096

D = TypeVar("D", bound=Hashable)
_ABSENT = object()  # ``remove``'s default: a ticket's value is None


class _Queued(Protocol):
    @property
    def domain(self) -> Any: ...


T = TypeVar("T", bound=_Queued)


class FairQueue(Generic[D, T]):
    """Waiting tickets by domain, and each domain's recent worker CPU. See the module doc."""

    def __init__(self, now: float = 0.0) -> None:
        # The ring: only domains with waiters, each a FIFO of its tickets. An OrderedDict,
        # not a deque: a ticket leaves from anywhere (a queue timeout, a cancellation) in
        # O(1); deque.remove scans the FIFO for a ticket no longer in it (a refused call, a
        # timed-out one), and a flood made that quadratic.
        self._queues: dict[D, collections.OrderedDict[T, None]] = {}
        self._usage: dict[D, float] = {}  # decayed CPU seconds, as of ``_decayed_at``
        self._decayed_at = now
        # How many tickets wait: ``len()``, and a plain attribute for ``PoolState``'s hot
        # path, which asks on every check-out and check-in (a ``__len__`` is a Python call).
        self.length = 0

    def __len__(self) -> int:
        return self.length

    def __bool__(self) -> bool:
        return self.length > 0

    def __iter__(self) -> Iterator[T]:
        """Every waiting ticket, domain by domain in ring order."""
        for queue in self._queues.values():
            yield from queue

    def waiting(self, domain: D) -> int:
        queue = self._queues.get(domain)
        return 0 if queue is None else len(queue)

    def domains(self) -> int:
        """How many domains have waiters."""
        return len(self._queues)

    def others_wait(self, domain: D) -> bool:
        """A domain other than ``domain`` has waiters."""
        return len(self._queues) > (domain in self._queues)

    def usage(self, domain: D, now: float) -> float:
        """``domain``'s recent worker CPU (decayed), 0 if none is on record."""
        self._decay(now)
        return self._usage.get(domain, 0.0)

    def remembered(self) -> int:
        """How many domains this queue keeps anything of (for the memory bound)."""
        return len(self._usage.keys() | self._queues.keys())

    # -- waiting -------------------------------------------------------------------------------

    def push(self, ticket: T, now: float, limit: float = math.inf) -> bool:
        """``ticket`` waits at the back of its domain's FIFO, unless ``limit`` tickets of
        its domain wait already (False)."""
        domain = ticket.domain
        queue = self._queues.get(domain)
        if queue is None:
            if limit < 1:
                return False
            if now - self._decayed_at >= DECAY_STEP:
                self._decay(now)
            if domain not in self._usage and self._queues:
                # A new flow starts at the current virtual time, not at zero.
                self._usage[domain] = min(self._usage.get(d, 0.0) for d in self._queues)
            queue = self._queues[domain] = collections.OrderedDict()
        elif len(queue) >= limit:
            return False
        queue[ticket] = None
        self.length += 1
        return True

    def remove(self, ticket: T) -> bool:
        """``ticket`` leaves the queue wherever it is (a timeout, an interrupt); False if it
        was not queued."""
        queue = self._queues.get(ticket.domain)
        if queue is None:
            return False
        if queue.pop(ticket, _ABSENT) is _ABSENT:
            return False
        self.length -= 1
        if not queue:
            del self._queues[ticket.domain]
        return True

    def peek(self, domain: D) -> T:
        return next(iter(self._queues[domain]))

    def pop(self, domain: D) -> T:
        """The first ticket of ``domain``, which then goes to the back of the ring."""
        queue = self._queues.pop(domain)
        ticket = queue.popitem(last=False)[0]
        self.length -= 1
        if queue:
            self._queues[domain] = queue  # re-inserted: the back of the ring
        return ticket

    def pop_newest(self, domain: D) -> T:
        """The last ticket of ``domain`` (pushed out of a full queue)."""
        queue = self._queues[domain]
        ticket = queue.popitem()[0]
        self.length -= 1
        if not queue:
            del self._queues[domain]
        return ticket

    def longest(self) -> D:
        """The domain with the most waiters (some domain must have waiters)."""
        return max(self._queues, key=lambda d: len(self._queues[d]))

    def drain(self) -> list[T]:
        """Every waiting ticket, out of the queue (the pool fails or terminates)."""
        tickets = list(self)
        self._queues.clear()
        self.length = 0
        return tickets

    # -- turns ---------------------------------------------------------------------------------

    def next_domain(self, held: Mapping[D, int], share: int, now: float) -> D | None:
        """Whose turn it is: the domain with waiters and the least recent usage, ties to
        the first in the ring, among those holding fewer than ``share`` workers (``held``)
        or waiting alone; if every waiting domain holds its share, among all of them
        (work-conserving). None if nobody waits."""
        queues = self._queues
        if len(queues) < 2:  # nobody, or one domain alone: its turn, whatever it holds
            for domain in queues:
                return domain
            return None
        if now - self._decayed_at >= DECAY_STEP:
            self._decay(now)
        usage = self._usage
        best: D | None = None
        best_usage = 0.0
        fallback: D | None = None
        fallback_usage = 0.0
        for domain in queues:
            used = usage.get(domain, 0.0)
            if fallback is None or used < fallback_usage:
                fallback, fallback_usage = domain, used
            if held.get(domain, 0) >= share:
                continue
            if best is None or used < best_usage:
                best, best_usage = domain, used
        return best if best is not None else fallback

    def charge(self, domain: D, cpu: float, now: float) -> None:
        """``domain`` used ``cpu`` seconds of a worker (a call just ended). Every call ends
        here: the decay pass is called only once its step has passed."""
        if cpu <= 0.0:
            return
        if now - self._decayed_at >= DECAY_STEP:
            self._decay(now)
        usage = self._usage
        usage[domain] = usage.get(domain, 0.0) + cpu

    def _decay(self, now: float) -> None:
        """Every usage decays by the time since the last step, once a step has passed; the
        negligible ones of domains without waiters are forgotten, and the lightest beyond
        ``MAX_REMEMBERED``."""
        elapsed = now - self._decayed_at
        if elapsed < DECAY_STEP:
            return
        self._decayed_at = now
        factor = 0.5 ** (elapsed / USAGE_HALF_LIFE)
        queues = self._queues
        kept = {
            domain: used * factor
            for domain, used in self._usage.items()
            if domain in queues or used * factor >= NEGLIGIBLE_CPU
        }
        idle = [domain for domain in kept if domain not in queues]
        if len(idle) > MAX_REMEMBERED:
            for domain in heapq.nsmallest(len(idle) - MAX_REMEMBERED, idle, key=kept.__getitem__):
                del kept[domain]
        self._usage = kept
