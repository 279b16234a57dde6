"""Tenants in time (issue 21): fair queuing across trust domains, shares, per-domain queue
limits, burst workers and the CPU budget against a call's own timeout, in the pool's state
machine with fake workers and a fake clock (no process, no sleep).

A call's cost is what ``settle`` is told: the worker's CPU then, less at check-out (the
fake clock's time held when no CPU is given, as for a call killed at its deadline).
"""

from __future__ import annotations

from typing import Any

import pytest
from test_state import ANSWER, FakeTicket, FakeWorker, Pool, kills

from jsonnet_worker import InvalidArgument, Overloaded, TenantOverloaded
from jsonnet_worker._config import PoolConfig
from jsonnet_worker._pool import fairness
from jsonnet_worker._pool import state as state_module
from jsonnet_worker._pool.exchange import NO_TENANT, Domain, Outcome
from jsonnet_worker._pool.fairness import FairQueue
from jsonnet_worker._pool.state import (
    HandOver,
    Wake,
    WakeSupervisor,
    WorkerStatus,
)

FLOOD, VICTIM = Domain("flood"), Domain("victim")
TIMED_OUT = Outcome(error=None, keep=False, reason="ran past its deadline; killed")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Fair:
    """A pool of fake workers on a fake clock, and helpers that play calls through it."""

    def __init__(self, size: int = 2, spares: int = 0, **options: Any) -> None:
        self.clock = Clock()
        self.pool = Pool(size=size, spares=spares, clock=self.clock, **options)
        self.state = self.pool.state

    def call(self, domain: Domain) -> FakeTicket:
        """A call arrives: it takes a worker or waits (its ticket says which)."""
        ticket = FakeTicket(domain)
        if not self.state.take(ticket):
            self.state.take_or_wait(ticket)
        return ticket

    def end(self, worker: FakeWorker, seconds: float, *, killed: bool = False) -> list[Any]:
        """``seconds`` pass and the call on ``worker`` ends (killed: at its deadline, its
        worker discarded); the replacements the pool asks for start and say hello."""
        self.clock.now += seconds
        outcome = TIMED_OUT if killed else ANSWER
        effects = self.state.settle(worker, outcome)
        return effects + self.refill()

    def refill(self) -> list[Any]:
        effects: list[Any] = []
        for _ in range(self.state.spawn_due(self.clock.now)):
            effects += self.pool.greet(self.pool.start())
        return effects


def handed(effects: list[Any]) -> list[tuple[Domain, FakeWorker]]:
    return [(e.ticket.domain, e.worker) for e in effects if isinstance(e, HandOver)]


# -- the FairQueue alone -----------------------------------------------------------------------


def test_the_least_recent_usage_goes_first_and_ties_go_round_the_ring() -> None:
    queue: FairQueue[Domain, FakeTicket] = FairQueue()
    a, b, c = Domain("a"), Domain("b"), Domain("c")
    for domain in (a, a, b, c):
        queue.push(FakeTicket(domain), 0.0)
    assert queue.next_domain({}, 10, 0.0) == a  # all at zero: the first in the ring
    queue.pop(a)  # a goes to the back of the ring
    assert queue.next_domain({}, 10, 0.0) == b
    queue.charge(b, 0.5, 0.0)
    queue.charge(c, 0.1, 0.0)
    queue.charge(a, 0.2, 0.0)
    assert queue.next_domain({}, 10, 0.0) == c
    assert queue.next_domain({c: 1}, 1, 0.0) == a  # c holds its share: a is next
    assert queue.next_domain({a: 1, b: 1, c: 1}, 1, 0.0) == c  # all at their share


def test_a_ticket_leaves_from_anywhere_and_the_rest_keep_their_order() -> None:
    """``remove`` from the front, the middle and the back of a domain's FIFO, and of a
    ticket that is not there (refused, already handed over): False, nothing changed."""
    queue: FairQueue[Domain, FakeTicket] = FairQueue()
    tickets = [FakeTicket(FLOOD) for _ in range(5)]
    for ticket in tickets:
        assert queue.push(ticket, 0.0)
    assert queue.remove(tickets[2]) and queue.remove(tickets[0]) and queue.remove(tickets[4])
    assert not queue.remove(tickets[2]) and not queue.remove(FakeTicket(FLOOD))
    assert not queue.remove(FakeTicket(VICTIM))  # a domain with no waiters
    assert list(queue) == [tickets[1], tickets[3]] and len(queue) == 2
    assert queue.peek(FLOOD) is tickets[1] and queue.pop_newest(FLOOD) is tickets[3]
    assert queue.pop(FLOOD) is tickets[1] and not queue and queue.domains() == 0


def test_usage_decays_with_its_half_life() -> None:
    queue: FairQueue[Domain, FakeTicket] = FairQueue()
    queue.charge(FLOOD, 8.0, 0.0)
    assert queue.usage(FLOOD, 0.0) == 8.0
    assert queue.usage(FLOOD, fairness.USAGE_HALF_LIFE) == pytest.approx(4.0)
    assert queue.usage(FLOOD, 3 * fairness.USAGE_HALF_LIFE) == pytest.approx(1.0)


def test_a_new_domain_enters_at_the_least_waiting_usage_not_at_zero() -> None:
    """Fresh tenant names cannot cut in front of a light tenant that is remembered."""
    queue: FairQueue[Domain, FakeTicket] = FairQueue()
    queue.charge(VICTIM, 0.01, 0.0)
    queue.charge(FLOOD, 5.0, 0.0)
    queue.push(FakeTicket(FLOOD), 0.0)
    queue.push(FakeTicket(VICTIM), 0.0)
    for n in range(50):
        queue.push(FakeTicket(Domain(f"sybil-{n}")), 0.0)
    assert queue.usage(Domain("sybil-0"), 0.0) == pytest.approx(0.01)
    assert queue.next_domain({}, 10, 0.0) == VICTIM


def test_memory_stays_bounded_with_attacker_chosen_tenant_names() -> None:
    queue: FairQueue[Domain, FakeTicket] = FairQueue()
    now = 0.0
    for n in range(3 * fairness.MAX_REMEMBERED):
        queue.charge(Domain(f"t{n}"), 0.01 + n * 1e-6, now)
        now += 0.001
    queue.usage(NO_TENANT, now + fairness.DECAY_STEP)  # a decay pass
    assert queue.remembered() <= fairness.MAX_REMEMBERED
    assert queue.usage(Domain(f"t{3 * fairness.MAX_REMEMBERED - 1}"), now) > 0  # the heaviest
    # Without waiters, negligible usage is forgotten altogether.
    queue.usage(NO_TENANT, now + 20 * fairness.USAGE_HALF_LIFE)
    assert queue.remembered() == 0


# -- turns in the pool -------------------------------------------------------------------------


def test_a_single_caller_behind_a_flood_gets_the_next_worker() -> None:
    fair = Fair(size=2)
    running = [fair.call(FLOOD).worker for _ in range(2)]
    flood = [fair.call(FLOOD) for _ in range(100)]
    assert all(t.queued for t in flood)
    victim = fair.call(VICTIM)
    assert victim.queued
    # The flood's call ends at its deadline: the fresh worker is the victim's, not the flood's.
    effects = fair.end(running[0], 1.0, killed=True)
    assert handed(effects) == [(VICTIM, victim.worker)]
    assert fair.state.stats().queue_depth == 100


def test_no_domain_keeps_its_workers_while_another_waits() -> None:
    """A flood of 1 s calls and a victim of 1 ms calls, each with a steady queue, on 2
    workers: the victim is served in turn all along (its calls are cheap turns), and the
    flood still gets its share."""
    fair = Fair(size=2)
    cost = {FLOOD: 1.0, VICTIM: 0.001}
    ends: dict[FakeWorker, float] = {}
    served = {FLOOD: 0, VICTIM: 0}
    for ticket in [fair.call(FLOOD) for _ in range(2)]:
        ends[ticket.worker] = cost[FLOOD]
    for _ in range(300):
        fair.call(FLOOD)
        fair.call(VICTIM)
    for _ in range(300):
        worker = min(ends, key=ends.__getitem__)  # the call that ends first
        effects = fair.end(worker, ends.pop(worker) - fair.clock.now)
        for domain, given in handed(effects):
            served[domain] += 1
            ends[given] = fair.clock.now + cost[domain]
        # While the victim waits, the flood never holds both workers.
        assert fair.state.holding[FLOOD] <= 1
    assert served[VICTIM] > 10 * served[FLOOD] > 0


def test_a_light_domains_worker_stays_warm_while_the_flood_holds_its_share() -> None:
    """The victim calls now and then beside a flood with a steady queue: the flood holds its
    share (size - 1) of the workers, and the victim's worker, given back while only the flood
    waits, stays idle for the victim instead of going to the flood: the victim's next call
    takes it at once (no queue, no new worker), and the flood's callers do not take it."""
    fair = Fair(size=2)
    flood_running = fair.call(FLOOD)
    victim = fair.call(VICTIM)
    assert flood_running.worker is not None and victim.worker is not None
    waiting = [fair.call(FLOOD) for _ in range(10)]
    assert all(t.queued for t in waiting)
    for _ in range(5):
        effects = fair.end(victim.worker, 0.001)
        assert handed(effects) == [] and kills(effects) == []  # kept for the victim
        newcomer = fair.call(FLOOD)  # the flood's new caller does not take it either
        assert newcomer.queued
        victim = fair.call(VICTIM)
        assert not victim.queued and victim.worker is not None  # warm, at once
    assert fair.state.holding[FLOOD] == 1 and fair.state.recycles == 0


def test_a_worker_kept_warm_goes_to_the_flood_once_its_domain_stays_away() -> None:
    """The reservation lapses: a flood alone gets every worker back within RESERVE_WINDOW
    and the supervisor's next idle check."""
    fair = Fair(size=2)
    flood_running = fair.call(FLOOD)
    victim = fair.call(VICTIM)
    waiting = [fair.call(FLOOD) for _ in range(3)]
    fair.end(victim.worker, 0.001)
    assert fair.state.idle_check([]) == []  # within the window: still the victim's
    fair.clock.now += state_module.RESERVE_WINDOW + 0.01
    effects = fair.state.idle_check([])
    assert len(kills(effects)) == 1 and fair.state.recycles == 1
    handed_now = handed(effects + fair.refill())
    assert handed_now == [(FLOOD, waiting[0].worker)]
    assert fair.state.holding[FLOOD] == 2  # alone: every worker
    assert flood_running.worker is not None
    # A flood's new caller may also claim a lapsed worker itself.
    fair2 = Fair(size=2)
    fair2.call(FLOOD)
    victim2 = fair2.call(VICTIM)
    fair2.call(FLOOD)
    fair2.end(victim2.worker, 0.001)
    fair2.clock.now += state_module.RESERVE_WINDOW + 0.01
    late = fair2.call(FLOOD)
    assert fair2.state.recycles == 1 and (late.queued or late.worker is not None)


def test_a_warm_worker_is_not_recycled_for_a_domain_whose_replacement_is_starting() -> None:
    """The flood's call hits its deadline while the victim's call runs: the flood is short
    of its share, but its replacement is being forked (milliseconds); the victim's worker,
    given back now, stays warm for the victim, and the replacement serves the flood."""
    fair = Fair(size=2)
    flood_running = fair.call(FLOOD)
    victim = fair.call(VICTIM)
    waiting = fair.call(FLOOD)
    assert waiting.queued
    fair.state.settle(flood_running.worker, TIMED_OUT)  # killed at its deadline
    assert fair.state.spawn_due(fair.clock.now) == 1
    replacement = fair.pool.start()  # starting: not greeted yet
    effects = fair.state.settle(victim.worker, ANSWER)
    assert kills(effects) == [] and handed(effects) == []  # the victim's stays warm
    assert handed(fair.pool.greet(replacement)) == [(FLOOD, replacement)]
    again = fair.call(VICTIM)
    assert not again.queued and again.worker is victim.worker


def test_a_domain_short_of_its_share_gets_a_given_back_worker_at_once() -> None:
    """The reservation never holds a worker from a domain owed one: with a share of 2 of 3
    workers, a flood holding 1 gets the victim's worker given back (recycled for it)."""
    fair = Fair(size=3)
    fair.call(FLOOD)
    victim = fair.call(VICTIM)
    other = fair.call(Domain("other"))
    assert other.worker is not None
    queued = fair.call(FLOOD)
    assert queued.queued  # no idle worker: the victim's and other's are busy
    effects = fair.end(victim.worker, 0.001)
    assert len(kills(effects)) == 1  # recycled for the flood, which is owed a second
    assert handed(effects) == [(FLOOD, queued.worker)]


def test_turns_are_weighted_by_recent_cpu() -> None:
    heavy, light = Domain("heavy"), Domain("light")
    fair = Fair(size=1)
    first = fair.call(heavy)
    fair.end(first.worker, 2.0)  # heavy has used 2 s of CPU recently
    holder = fair.call(light)
    waiting = [fair.call(heavy), fair.call(light)]
    assert all(t.queued for t in waiting)
    effects = fair.end(holder.worker, 0.01)
    assert handed(effects) == [(light, holder.worker)]  # light again before heavy


def test_a_domain_alone_uses_every_worker_and_holds_its_share_while_others_wait() -> None:
    fair = Fair(size=3)
    a, b = Domain("a"), Domain("b")
    held = [fair.call(a) for _ in range(3)]
    assert all(t.worker is not None for t in held)  # alone: every worker
    queued_a = [fair.call(a) for _ in range(3)]
    queued_b = [fair.call(b) for _ in range(3)]
    assert all(t.queued for t in queued_a + queued_b)
    # b is charged more than a, but a holds its share (size - 1 = 2) while b waits.
    fair.state.queue.charge(b, 10.0, fair.clock.now)
    effects = fair.end(held[0].worker, 0.001)
    assert [d for d, _ in handed(effects)] == [b]  # a holds 2 = its share: b's turn
    effects = fair.end(held[1].worker, 0.001)
    assert [d for d, _ in handed(effects)] == [a]  # a holds 1, and used less than b


def test_tenant_share_is_configurable() -> None:
    assert PoolConfig(size=4).tenant_workers(4) == 3
    assert PoolConfig(size=4, tenant_share=0.5).tenant_workers(4) == 2
    assert PoolConfig(size=1).tenant_workers(1) == 1
    assert PoolConfig(size=4, tenant_share=0.1).tenant_workers(4) == 1
    with pytest.raises(InvalidArgument, match="tenant_share"):
        PoolConfig(tenant_share=1.5)
    with pytest.raises(InvalidArgument, match="max_workers"):
        PoolConfig(size=4, max_workers=3)


def test_the_queue_limit_is_per_domain_and_names_it() -> None:
    fair = Fair(size=1, queue_limit=2)
    for _ in range(3):
        fair.call(FLOOD)
    with pytest.raises(TenantOverloaded, match=r"tenant 'flood'.*queue_limit=2") as caught:
        fair.call(FLOOD)
    assert caught.value.tenant == "flood" and caught.value.http_status == 429
    assert isinstance(caught.value, Overloaded)  # ``except Overloaded`` still catches it
    assert fair.call(VICTIM).queued  # another tenant is not affected


def test_a_refused_call_leaves_without_looking_through_the_full_queue(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A refused call is abandoned like any other, but it never waited: its abandon does
    not look for it in its domain's full queue (once a scan of it: a 2,000-call async burst
    spent ~16 ms of its thread there), and the waiters stay."""
    fair = Fair(size=1, queue_limit=2)
    fair.call(FLOOD)
    waiting = [fair.call(FLOOD) for _ in range(2)]
    refused = FakeTicket(FLOOD)
    with pytest.raises(TenantOverloaded):
        fair.state.take_or_wait(refused)
    queue = fair.state.queue
    original_remove = queue.remove

    def remove(ticket: FakeTicket) -> bool:
        assert ticket is not refused, "the refused ticket was looked for in the queue"
        return original_remove(ticket)

    monkeypatch.setattr(queue, "remove", remove)
    assert not refused.queued and fair.state.abandon(refused) == []
    assert list(queue) == waiting
    assert fair.state.abandon(waiting[0]) == [] and list(queue) == waiting[1:]


def test_a_full_total_pushes_out_the_longest_queue_not_the_newcomer() -> None:
    fair = Fair(size=1, queue_limit=10, queue_limit_total=4)
    fair.call(FLOOD)
    flood = [fair.call(FLOOD) for _ in range(4)]
    victim = FakeTicket(VICTIM)
    effects = fair.state.take_or_wait(victim)
    assert victim.queued and effects == [Wake(flood[-1])]
    assert isinstance(flood[-1].error, TenantOverloaded) and flood[-1].error.tenant == "flood"
    with pytest.raises(TenantOverloaded, match="queue_limit_total=4"):
        fair.call(FLOOD)  # the flood has its part of the total: it is refused itself
    assert fair.state.stats().queue_depth == 4


def test_many_tenant_names_cannot_grow_the_queue_past_its_total() -> None:
    fair = Fair(size=1, queue_limit=5, queue_limit_total=20)
    fair.call(FLOOD)
    refused = 0
    for n in range(200):
        try:
            fair.call(Domain(f"sybil-{n}"))
        except TenantOverloaded:
            refused += 1
    assert fair.state.stats().queue_depth == 20 and refused == 180


def test_a_queue_timeout_or_an_interrupt_leaves_its_domain_queue() -> None:
    fair = Fair(size=1)
    fair.call(FLOOD)
    first, second, victim = fair.call(FLOOD), fair.call(FLOOD), fair.call(VICTIM)
    assert fair.state.give_up(second)
    assert fair.state.abandon(victim) == []
    assert fair.state.stats().queue_depth == 1
    assert list(fair.state.queue) == [first]
    assert fair.state.queue.domains() == 1  # the victim's empty queue is gone from the ring


def test_a_call_killed_at_its_deadline_is_charged_the_time_it_held_its_worker() -> None:
    fair = Fair(size=1)
    ticket = fair.call(FLOOD)
    fair.end(ticket.worker, 1.0, killed=True)
    assert fair.state.queue.usage(FLOOD, fair.clock.now) == pytest.approx(1.0)
    ticket = fair.call(VICTIM)
    fair.state.settle(ticket.worker, ANSWER, cpu=0.25)  # CPU at check-out unknown: time held
    ticket = fair.call(VICTIM)
    fair.state.settle(ticket.worker, ANSWER, cpu=0.75)  # 0.75 - 0.25 CPU seconds
    assert fair.state.queue.usage(VICTIM, fair.clock.now) == pytest.approx(0.5)


# -- burst capacity --------------------------------------------------------------------------


def test_every_worker_demoted_and_another_domain_waiting_brings_a_burst_worker() -> None:
    fair = Fair(size=2)
    held = [fair.call(FLOOD) for _ in range(2)]
    assert fair.state.demoted(held[0].worker) == []  # one worker is still interactive
    victim = fair.call(VICTIM)
    assert fair.state.demoted(held[1].worker) == [WakeSupervisor()]
    assert fair.state.spawn_due(fair.clock.now) == 1
    burst = fair.pool.start()
    assert fair.pool.greet(burst) == [HandOver(victim, burst)]
    assert fair.state.stats().burst == 1
    # The victim's burst worker comes back with nobody waiting: retired.
    effects = fair.end(burst, 0.001)
    assert kills(effects) == [burst] and fair.state.stats().burst == 0
    # A demoted worker is recycled after its call (SCHED_IDLE cannot be undone).
    effects = fair.end(held[0].worker, 0.5)
    assert kills(effects) == [held[0].worker]


def test_the_flood_waiting_behind_its_own_demoted_calls_gets_no_burst() -> None:
    fair = Fair(size=2)
    held = [fair.call(FLOOD) for _ in range(2)]
    fair.call(FLOOD)
    for ticket in held:
        fair.state.demoted(ticket.worker)
    assert fair.state.spawn_due(fair.clock.now) == 0


def test_the_spare_serves_a_burst_at_once() -> None:
    fair = Fair(size=2, spares=1)
    (spare,) = fair.pool.workers(WorkerStatus.SPARE)
    held = [fair.call(FLOOD) for _ in range(2)]
    victim = fair.call(VICTIM)
    fair.state.demoted(held[0].worker)
    effects = fair.state.demoted(held[1].worker)
    assert HandOver(victim, spare) in effects and WakeSupervisor() in effects
    assert fair.state.spawn_due(fair.clock.now) == 1  # a new spare


def test_burst_workers_never_exceed_max_workers() -> None:
    fair = Fair(size=2, max_workers=3)
    for ticket in [fair.call(FLOOD) for _ in range(2)]:
        fair.state.demoted(ticket.worker)
    for n in range(5):
        fair.call(Domain(f"t{n}"))
        for effect in fair.refill():
            if isinstance(effect, HandOver):
                fair.state.demoted(effect.worker)
    alive = fair.state.stats().alive
    assert alive == 3 and fair.state.spawn_due(fair.clock.now) == 0


# -- a call's own timeout against the CPU budget ------------------------------------------


def test_a_used_worker_is_recycled_at_check_out_when_the_calls_timeout_does_not_fit() -> None:
    fair = Fair(size=1, spares=1, timeout=0.1, cpu_budget=4.0)
    (spare,) = fair.pool.workers(WorkerStatus.SPARE)
    ticket = fair.call(NO_TENANT)
    worker = ticket.worker
    fair.state.settle(worker, ANSWER, cpu=3.0)  # fits a call of the pool's 0.1 s: kept
    assert fair.state.status_of(worker) is WorkerStatus.IDLE
    long = FakeTicket(NO_TENANT)
    long.timeout = 1.5  # 3.0 + 2 x 1.5 > 4.0: it would end in SIGXCPU
    assert not fair.state.take(long)
    effects = fair.state.take_or_wait(long)
    assert kills(effects) == [worker] and long.worker is spare
    short = FakeTicket(NO_TENANT)
    short.timeout = 0.1
    fair.state.settle(spare, ANSWER, cpu=3.0)
    assert fair.state.take(short) and short.worker is spare  # a short call still fits


def test_no_burst_while_the_pool_is_only_short_of_a_replacement() -> None:
    """A worker discarded while calls wait (nothing demoted) brings its replacement only."""
    fair = Fair(size=1)
    held = fair.call(FLOOD)
    fair.call(VICTIM)
    fair.state.abandon(held)
    assert fair.state.spawn_due(fair.clock.now) == 1
    fair.pool.start()
    assert fair.state.spawn_due(fair.clock.now) == 0
