"""The pool's state machine alone, with fake workers: every transition and the races between
callers, the supervisor and the pool's lifecycle, with no process started.

Each test plays one story by calling transitions in the order the real threads would, then
checks the state and the actions the transitions asked for (kill, hand over, wake, log).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import FrozenInstanceError, dataclass
from typing import Any

import pytest

from jsonnet_worker import Overloaded, PoolClosed, SandboxUnavailable, WorkerStartError
from jsonnet_worker._config import PoolConfig
from jsonnet_worker._errors import EvaluationTimeout, JsonnetError, ProtocolError, WorkerCrashed
from jsonnet_worker._pool.exchange import CPU_HEADROOM_TIMEOUTS, NO_TENANT, Domain, Outcome
from jsonnet_worker._pool.state import (
    IDLE_CPU_ALLOWANCE,
    Close,
    HandOver,
    IdleSample,
    Kill,
    Log,
    Phase,
    PoolState,
    Ticket,
    Wake,
    WakeSupervisor,
    WorkerStatus,
)
from jsonnet_worker._report import SandboxStatus
from jsonnet_worker._sandbox.landlock import LandlockStatus, SupportState

SANDBOXED = SandboxStatus(LandlockStatus(enforced=True, state=SupportState.AVAILABLE, abi=7))
UNSANDBOXED = SandboxStatus(
    LandlockStatus(enforced=False, state=SupportState.NOT_BUILT_IN, reason="not built in")
)
ANSWER = Outcome(answer="an answer", keep=True)


@dataclass(eq=False)
class FakeWorker:
    pid: int


class FakeTicket(Ticket):
    __slots__ = ("reachable", "woken")

    def __init__(self, domain: Domain = NO_TENANT, reachable: bool = True) -> None:
        super().__init__(call=None, domain=domain)
        self.woken = 0
        self.reachable = reachable

    def wake(self) -> bool:
        self.woken += 1
        return self.reachable


class Pool:
    """A PoolState and its fake workers, started and greeted as the supervisor would."""

    def __init__(
        self,
        size: int = 2,
        spares: int = 1,
        clock: Callable[[], float] = lambda: 0.0,
        **options: Any,
    ) -> None:
        self.state: PoolState[FakeWorker] = PoolState(
            PoolConfig(size=size, spares=spares, **options), clock
        )
        self.next_pid = 100
        for _ in range(size):
            self.greet(self.start())
        for _ in range(self.state.spawn_due(0.0)):
            self.greet(self.start())

    def start(self) -> FakeWorker:
        self.next_pid += 1
        worker = FakeWorker(self.next_pid)
        self.state.started(worker, 0.0)
        return worker

    def greet(self, worker: FakeWorker) -> list[Any]:
        return self.state.greeted(worker, SANDBOXED)

    def status(self, worker: FakeWorker) -> WorkerStatus | None:
        return self.state.status_of(worker)

    def workers(self, status: WorkerStatus) -> list[FakeWorker]:
        return [w for w, s, *_ in self.state.roster().members if s is status]

    def take(self, domain: Domain = NO_TENANT) -> FakeTicket:
        ticket = FakeTicket(domain)
        assert self.state.take(ticket), "no idle worker"
        return ticket


def kinds(actions: list[Any]) -> list[str]:
    return [type(action).__name__ for action in actions]


def kills(actions: list[Any]) -> list[Any]:
    return [a.worker for a in actions if isinstance(a, Kill)]


def test_start_up_fills_the_pool_then_starts_the_spare() -> None:
    state: PoolState[FakeWorker] = PoolState(PoolConfig(size=2, spares=1))
    assert state.spawn_due(0.0) == 2  # spares wait for the first wave
    first, second = FakeWorker(1), FakeWorker(2)
    state.started(first, 0.0)
    state.started(second, 0.0)
    assert state.spawn_due(0.0) == 0 and not state.initial_done()
    state.greeted(first, SANDBOXED)
    state.greeted(second, SANDBOXED)
    assert state.initial_done() and state.spawn_due(0.0) == 1
    spare = FakeWorker(3)
    state.started(spare, 0.0)
    state.greeted(spare, SANDBOXED)
    assert state.status_of(spare) is WorkerStatus.SPARE
    stats = state.stats()
    assert (stats.alive, stats.idle, stats.spares, stats.respawns) == (2, 2, 1, 0)
    assert state.sandbox == SANDBOXED


def test_check_out_and_in_is_last_in_first_out() -> None:
    pool = Pool()
    ticket = pool.take()
    worker = ticket.worker
    assert pool.status(worker) is WorkerStatus.BUSY
    assert pool.state.settle(worker, ANSWER) == []
    assert pool.status(worker) is WorkerStatus.IDLE
    assert pool.take().worker is worker  # the warmest worker again
    assert pool.state.stats().evaluations == 1


def test_a_returned_worker_goes_straight_to_the_first_waiter() -> None:
    pool = Pool(size=1, spares=0)
    holder = pool.take()
    waiter, later = FakeTicket(), FakeTicket()
    assert pool.state.take_or_wait(waiter) == []
    assert pool.state.take_or_wait(later) == []
    actions = pool.state.settle(holder.worker, ANSWER)
    assert actions == [HandOver(waiter, holder.worker)]
    assert waiter.worker is holder.worker and later.worker is None
    # Its caller waits for the wake-up even though the worker is set: the giver may still
    # be writing the request.
    assert waiter.queued and not waiter.handed
    assert pool.state.stats().queue_depth == 1


def test_queue_limit_and_a_queue_timeout() -> None:
    pool = Pool(size=1, spares=0, queue_limit=1)
    pool.take()
    waiter = FakeTicket()
    pool.state.take_or_wait(waiter)
    with pytest.raises(Overloaded, match="queue_limit=1"):
        pool.state.take_or_wait(FakeTicket())
    assert pool.state.give_up(waiter)  # still queued: it leaves the queue
    assert pool.state.stats().queue_depth == 0


def test_abandon_during_hand_over_discards_the_worker() -> None:
    """The giver has handed the worker over (and may be writing the request) when the waiter
    gives up: the waiter cannot just leave, its request may be in the worker's channel."""
    pool = Pool(size=1, spares=0)
    holder = pool.take()
    waiter = FakeTicket()
    pool.state.take_or_wait(waiter)
    handed = pool.state.settle(holder.worker, ANSWER)
    assert handed == [HandOver(waiter, holder.worker)]
    assert not pool.state.give_up(waiter)  # a queue timeout now waits for the wake-up
    actions = pool.state.abandon(waiter)  # an interrupt or a cancellation discards it
    assert kills(actions) == [holder.worker]
    assert pool.status(holder.worker) is None
    assert pool.state.take_retired() == [holder.worker]
    assert pool.state.spawn_due(0.0) == 1  # and a replacement is due


def test_abandon_while_queued_leaves_the_queue_only() -> None:
    pool = Pool(size=1, spares=0)
    pool.take()
    waiter = FakeTicket()
    pool.state.take_or_wait(waiter)
    assert pool.state.abandon(waiter) == []
    assert pool.state.stats().queue_depth == 0 and pool.state.stats().busy == 1


def test_an_unreachable_waiter_is_abandoned_by_whoever_performs_the_hand_over() -> None:
    pool = Pool(size=1, spares=0)
    holder = pool.take()
    waiter = FakeTicket(reachable=False)
    pool.state.take_or_wait(waiter)
    assert pool.state.settle(holder.worker, ANSWER) == [HandOver(waiter, holder.worker)]
    assert not waiter.wake()
    assert kills(pool.state.abandon(waiter)) == [holder.worker]


def test_death_while_busy_marks_it_dying_and_a_spare_takes_its_place() -> None:
    pool = Pool(size=2, spares=1)
    (spare,) = pool.workers(WorkerStatus.SPARE)
    holder = pool.take()
    waiter_holder = pool.take()
    waiter = FakeTicket()
    pool.state.take_or_wait(waiter)
    actions = pool.state.exited(holder.worker, "killed by SIGKILL")
    assert pool.status(holder.worker) is WorkerStatus.DYING
    assert actions == [HandOver(waiter, spare)]  # capacity back before the caller notices
    assert waiter_holder.worker is not spare
    # The caller notices the end of its channel and discards its worker.
    died = Outcome(error=WorkerCrashed("killed"), died=True, reason="killed by SIGKILL")
    actions = pool.state.settle(holder.worker, died)
    assert kills(actions) == [holder.worker]
    assert [a.level for a in actions if isinstance(a, Log)] == [logging.WARNING]
    assert pool.state.stats().crashes == 1


def test_an_answer_then_death_is_never_handed_out_again() -> None:
    pool = Pool(size=1, spares=0)
    holder = pool.take()
    pool.state.exited(holder.worker, "exited with status 0")
    assert kills(pool.state.settle(holder.worker, ANSWER)) == [holder.worker]
    assert pool.state.stats().idle == 0


def test_death_of_a_spare_or_an_idle_worker_retires_it_now() -> None:
    pool = Pool(size=2, spares=1)
    (spare,) = pool.workers(WorkerStatus.SPARE)
    actions = pool.state.exited(spare, "killed by SIGKILL")
    assert kinds(actions) == ["Log", "Kill", "WakeSupervisor"]
    assert pool.status(spare) is None and pool.state.stats().spares == 0
    idle = pool.workers(WorkerStatus.IDLE)[0]
    pool.state.exited(idle, "killed by SIGSEGV")
    assert pool.status(idle) is None
    assert pool.state.stats().crashes == 2
    assert pool.state.spawn_due(0.0) == 2


def test_death_while_starting_counts_as_a_crash_not_a_start_failure() -> None:
    pool = Pool(size=1, spares=0)
    starting = pool.start()
    pool.state.exited(starting, "killed by SIGKILL")
    stats = pool.state.stats()
    assert stats.crashes == 1 and stats.start_failures == 0 and stats.starting == 0


def test_close_during_hand_over() -> None:
    """close() lets queued calls finish: a hand-over under way completes, and the worker is
    checked in afterwards as usual; no new call is admitted."""
    pool = Pool(size=1, spares=0)
    call = FakeTicket()
    pool.state.admit(call)
    holder = pool.take()
    waiter = FakeTicket()
    pool.state.take_or_wait(waiter)
    assert pool.state.settle(holder.worker, ANSWER) == [HandOver(waiter, holder.worker)]
    pool.state.begin_close()
    assert pool.state.phase is Phase.CLOSING
    with pytest.raises(PoolClosed):
        pool.state.admit(FakeTicket())
    assert pool.state.settle(waiter.worker, ANSWER) == []
    assert pool.status(holder.worker) is WorkerStatus.IDLE
    assert not pool.state.wait_for_calls(0)  # close() still waits for it
    pool.state.leave(call)  # the last call out of a closing pool
    assert pool.state.wait_for_calls(0) and not call.admitted


def test_terminate_during_hand_over() -> None:
    pool = Pool(size=1, spares=0)
    holder = pool.take()
    waiter = FakeTicket()
    pool.state.take_or_wait(waiter)
    pool.state.settle(holder.worker, ANSWER)
    actions = pool.state.begin_terminate()
    assert kills(actions) == [holder.worker]  # the handed-over call sees its worker die
    assert pool.state.view().terminated
    assert kills(pool.state.settle(holder.worker, Outcome(error=WorkerCrashed("x"), died=True)))


def test_terminate_with_callers_queued_fails_them_all() -> None:
    pool = Pool(size=1, spares=1)
    holder = pool.take()
    waiters = [FakeTicket() for _ in range(3)]
    for waiter in waiters:
        pool.state.take_or_wait(waiter)
    actions = pool.state.begin_terminate()
    assert [a.ticket for a in actions if isinstance(a, Wake)] == waiters
    assert all(isinstance(w.error, PoolClosed) for w in waiters)
    assert len(kills(actions)) == 2  # the busy worker and the spare
    with pytest.raises(PoolClosed):
        pool.state.take_or_wait(FakeTicket())
    # The spare is not promoted after terminate().
    assert not [a for a in pool.state.settle(holder.worker, ANSWER) if isinstance(a, HandOver)]
    assert pool.state.spawn_due(0.0) == 0


def test_supervisor_stopped_leaves_held_workers_to_their_callers() -> None:
    pool = Pool(size=2, spares=0)
    holder = pool.take()
    (idle,) = pool.workers(WorkerStatus.IDLE)
    pool.state.begin_terminate()
    free, held = pool.state.supervisor_stopped()
    assert free == [idle] and held == [holder.worker]
    assert pool.state.phase is Phase.STOPPED
    assert pool.state.settle(holder.worker, ANSWER) == [Close(holder.worker)]
    assert pool.state.discard(holder.worker, "again") == []  # closed once


def test_start_failures_back_off_and_fail_waiters_while_nothing_runs() -> None:
    state: PoolState[FakeWorker] = PoolState(PoolConfig(size=1, spares=0))
    waiter = FakeTicket()
    worker = FakeWorker(1)
    state.started(worker, 0.0)
    state.queue.push(waiter, 0.0)  # a call that queued while the first worker started
    actions = state.start_failed(worker, "engine not installed", now=10.0)
    assert isinstance(waiter.error, WorkerStartError)
    assert kinds(actions) == ["Kill", "WakeSupervisor", "Log", "Wake"]
    log = next(a for a in actions if isinstance(a, Log))
    assert log.level == logging.WARNING and "next in 0.1 s" in log.message % log.args
    assert state.spawn_due(10.05) == 0 and state.spawn_due(10.1) == 1
    state.start_failed(None, "cannot fork", now=20.0)
    assert state.next_spawn_at == pytest.approx(20.2)  # doubled
    with pytest.raises(WorkerStartError, match="cannot fork"):
        state.take_or_wait(FakeTicket())
    again = FakeWorker(2)
    state.started(again, 21.0)
    state.greeted(again, SANDBOXED)
    assert state.failures_in_a_row == 0 and state.start_failure == ""


def test_a_missing_sandbox_when_required_fails_the_pool() -> None:
    state: PoolState[FakeWorker] = PoolState(PoolConfig(size=1))
    worker = FakeWorker(1)
    state.started(worker, 0.0)
    actions = state.greeted(worker, UNSANDBOXED)
    assert kills(actions) == [worker]
    assert state.phase is Phase.FAILED and isinstance(state.failure, SandboxUnavailable)
    assert state.spawn_due(0.0) == 0
    with pytest.raises(SandboxUnavailable):
        state.admit(FakeTicket())


def test_an_unsandboxed_worker_is_accepted_when_not_required() -> None:
    state: PoolState[FakeWorker] = PoolState(PoolConfig(size=1, require_sandbox=False))
    worker = FakeWorker(1)
    state.started(worker, 0.0)
    state.greeted(worker, UNSANDBOXED)
    assert state.status_of(worker) is WorkerStatus.IDLE


# -- trust domains ---------------------------------------------------------------------------


def test_a_worker_serves_one_domain_only() -> None:
    alice, bob = Domain("alice"), Domain("bob")
    pool = Pool(size=2, spares=0)
    first = pool.take(alice)
    pool.state.settle(first.worker, ANSWER)
    # Bob gets the other, never-used worker, not Alice's warm one.
    second = pool.take(bob)
    assert second.worker is not first.worker
    pool.state.settle(second.worker, ANSWER)
    assert pool.take(alice).worker is first.worker
    assert pool.take(bob).worker is second.worker
    # Calls without a tenant are a domain of their own.
    assert not pool.state.take(FakeTicket(NO_TENANT))


def test_no_idle_worker_of_the_domain_takes_the_spare_and_recycles_another() -> None:
    alice, bob = Domain("alice"), Domain("bob")
    pool = Pool(size=1, spares=1)
    (spare,) = pool.workers(WorkerStatus.SPARE)
    used = pool.take(alice)
    pool.state.settle(used.worker, ANSWER)
    ticket = FakeTicket(bob)
    assert not pool.state.take(ticket)  # the hot path does not recycle
    actions = pool.state.take_or_wait(ticket)
    assert ticket.worker is spare and not ticket.queued
    assert kills(actions) == [used.worker]
    assert pool.state.stats().recycles == 1


def test_without_a_spare_the_other_domain_worker_is_recycled_and_the_caller_waits() -> None:
    pool = Pool(size=1, spares=0)
    used = pool.take(Domain("alice"))
    pool.state.settle(used.worker, ANSWER)
    ticket = FakeTicket(Domain("bob"))
    actions = pool.state.take_or_wait(ticket)
    assert kills(actions) == [used.worker] and ticket.worker is None
    fresh = pool.start()
    assert pool.greet(fresh) == [HandOver(ticket, fresh)]  # the replacement is bob's


def test_a_worker_returned_while_only_other_domains_wait_is_recycled() -> None:
    pool = Pool(size=1, spares=0)
    alice = pool.take(Domain("alice"))
    bob = FakeTicket(Domain("bob"))
    pool.state.take_or_wait(bob)
    actions = pool.state.settle(alice.worker, ANSWER)
    assert kills(actions) == [alice.worker] and bob.worker is None
    logs = [a.message % a.args for a in actions if isinstance(a, Log)]
    assert logs and "recycled" in logs[0] and "'alice'" in logs[0]
    # A second waiter of alice's does not jump the queue: bob gets the fresh worker.
    fresh = pool.start()
    assert pool.greet(fresh) == [HandOver(bob, fresh)]


def test_a_worker_given_back_goes_to_the_domain_in_turn_not_to_its_own() -> None:
    """Issue 21: a domain with a steady queue used to keep its workers; now bob, waiting
    first and having used no CPU, gets the fresh worker, and alice the one after."""
    pool = Pool(size=1, spares=0)
    alice = pool.take(Domain("alice"))
    bob, alice_again = FakeTicket(Domain("bob")), FakeTicket(Domain("alice"))
    pool.state.take_or_wait(bob)
    pool.state.take_or_wait(alice_again)
    assert kills(pool.state.settle(alice.worker, ANSWER)) == [alice.worker]
    fresh = pool.start()
    assert pool.greet(fresh) == [HandOver(bob, fresh)]
    second = pool.start()
    pool.state.settle(fresh, ANSWER)
    assert pool.greet(second) == [HandOver(alice_again, second)]


def test_max_calls_per_worker_recycles() -> None:
    pool = Pool(size=1, spares=0, max_calls_per_worker=2)
    first = pool.take()
    pool.state.settle(first.worker, ANSWER)
    second = pool.take()
    assert second.worker is first.worker
    assert kills(pool.state.settle(second.worker, ANSWER)) == [first.worker]
    assert pool.state.stats().recycles == 1


def test_a_worker_that_asks_to_be_retired_is_recycled_after_its_answer() -> None:
    pool = Pool(size=1, spares=1)
    (spare,) = pool.workers(WorkerStatus.SPARE)
    asked = "its peak memory passed 50% of its memory_limit"
    ticket = pool.take()
    actions = pool.state.settle(ticket.worker, ANSWER._replace(recycle=asked))
    assert kills(actions) == [ticket.worker]
    (log,) = [a for a in actions if isinstance(a, Log)]
    assert log.message % log.args == f"worker {ticket.worker.pid}: recycled: {asked}"
    assert pool.status(spare) is WorkerStatus.IDLE  # the spare takes its place at once
    ticket = pool.take()
    failed = Outcome(error=JsonnetError("x"), keep=True, recycle=asked)  # a kept error too
    assert kills(pool.state.settle(ticket.worker, failed)) == [spare]
    stats = pool.state.stats()
    assert (stats.recycles, stats.evaluations, stats.crashes) == (2, 1, 0)


def test_a_worker_near_its_cpu_budget_is_recycled_before_it_runs_out() -> None:
    pool = Pool(size=1, spares=0, cpu_budget=10.0, timeout=1.0)
    ticket = pool.take()
    safe = 10.0 - CPU_HEADROOM_TIMEOUTS * 1.0 - 0.5
    assert pool.state.settle(ticket.worker, ANSWER, cpu=safe) == []
    ticket = pool.take()
    actions = pool.state.settle(ticket.worker, ANSWER, cpu=safe + 1.0)
    assert kills(actions) == [ticket.worker]
    assert "cpu_budget" in next(a.message for a in actions if isinstance(a, Log))


def test_idle_bytes_or_idle_cpu_retire_idle_workers_and_spares() -> None:
    pool = Pool(size=2, spares=1)
    (spare,) = pool.workers(WorkerStatus.SPARE)
    first, second = pool.workers(WorkerStatus.IDLE)
    epochs = {w: e for w, _, e, _ in pool.state.roster().members}
    baseline = [IdleSample(w, epochs[w], 1.0, False) for w in (spare, first, second)]
    assert pool.state.idle_check(baseline) == []  # the first sample sets the baseline
    later = [
        IdleSample(spare, epochs[spare], 1.0, True),  # wrote while idle
        IdleSample(first, epochs[first], 1.0 + IDLE_CPU_ALLOWANCE * 2, False),  # burns CPU
        IdleSample(second, epochs[second], 1.0 + IDLE_CPU_ALLOWANCE / 10, False),  # quiet
    ]
    actions = pool.state.idle_check(later)
    assert set(kills(actions)) == {spare, first}
    assert pool.status(second) is WorkerStatus.IDLE


def test_a_stale_idle_sample_is_ignored() -> None:
    """The supervisor sampled a worker while idle; a caller checked it out (and maybe in
    again) before the sample was judged: what it saw belongs to a call, not to idleness."""
    pool = Pool(size=1, spares=0)
    (worker,) = pool.workers(WorkerStatus.IDLE)
    (epoch,) = [e for _, _, e, _ in pool.state.roster().members]
    ticket = pool.take()
    pool.state.settle(ticket.worker, ANSWER, cpu=1.0)
    assert pool.state.idle_check([IdleSample(worker, epoch, 99.0, True)]) == []
    assert pool.status(worker) is WorkerStatus.IDLE


def test_settle_records_outcomes() -> None:
    pool = Pool(size=2, spares=0)
    ticket = pool.take()
    pool.state.settle(ticket.worker, Outcome(error=JsonnetError("x"), keep=True))
    assert pool.status(ticket.worker) is WorkerStatus.IDLE  # a snippet's error keeps the worker
    ticket = pool.take()
    actions = pool.state.settle(
        ticket.worker, Outcome(error=EvaluationTimeout("t"), reason="ran past its deadline")
    )
    assert kinds(actions) == ["Log", "Kill", "WakeSupervisor"]
    stats = pool.state.stats()
    assert (stats.timeouts, stats.evaluations, stats.crashes) == (1, 0, 0)


def test_logs_name_the_worker_and_tenant_and_survive_percent_signs() -> None:
    pool = Pool(size=1, spares=0)
    ticket = pool.take(Domain("acme"))
    actions = pool.state.settle(ticket.worker, Outcome(error=WorkerCrashed("x"), reason="100% odd"))
    (log,) = [a for a in actions if isinstance(a, Log)]
    assert log.message % log.args == f"worker {ticket.worker.pid}: 100% odd (tenant 'acme')"
    assert log.extra == {"worker_pid": ticket.worker.pid, "tenant": "acme"}


def test_the_supervisor_failing_fails_every_waiter() -> None:
    pool = Pool(size=1, spares=0)
    pool.take()
    waiter = FakeTicket()
    pool.state.take_or_wait(waiter)
    error = WorkerStartError("the pool's supervisor failed")
    actions = pool.state.fail(error)
    assert actions == [Wake(waiter)] and waiter.error is error
    with pytest.raises(WorkerStartError):
        pool.state.admit(FakeTicket())


def test_wake_supervisor_accompanies_every_retirement() -> None:
    pool = Pool(size=1, spares=0)
    ticket = pool.take()
    actions = pool.state.discard(ticket.worker, "broke the protocol")
    assert WakeSupervisor() in actions and kills(actions) == [ticket.worker]


def test_a_worker_unfit_at_check_out_is_rejected_and_the_ticket_freed() -> None:
    pool = Pool(size=2, spares=0)
    ticket = pool.take()
    dead = ticket.worker
    actions = pool.state.reject(ticket, "died while idle", died=True)
    assert ticket.worker is None and kills(actions) == [dead]
    assert pool.state.stats().crashes == 1
    assert pool.state.take(ticket) and ticket.worker is not dead


def test_leave_counts_only_an_admitted_call() -> None:
    """A call refused at admission (or interrupted before it) leaves nothing behind: close()
    would otherwise wait for a call that is not there."""
    pool = Pool(size=1, spares=0)
    refused = FakeTicket()
    pool.state.begin_close()
    with pytest.raises(PoolClosed):
        pool.state.admit(refused)
    pool.state.leave(refused)
    assert pool.state.wait_for_calls(0) and pool.state.view().in_flight == 0


def test_close_waits_through_the_state_until_the_last_call_leaves() -> None:
    """``wait_for_calls`` (close()) returns once the last call in flight leaves, woken by
    ``leave``; with a zero timeout it only says whether calls are still in flight."""
    pool = Pool(size=1, spares=0)
    call = FakeTicket()
    pool.state.admit(call)
    pool.state.begin_close()
    assert not pool.state.wait_for_calls(0)
    result: list[bool] = []
    closer = threading.Thread(target=lambda: result.append(pool.state.wait_for_calls(None)))
    closer.start()
    pool.state.leave(call)
    closer.join()
    assert result == [True]


def test_a_hand_over_is_recorded_by_transitions() -> None:
    """The giver's write is a transition: the caller then skips registering the request."""
    pool = Pool(size=1, spares=0)
    holder = pool.take()
    waiter = FakeTicket()
    pool.state.take_or_wait(waiter)
    assert pool.state.settle(holder.worker, ANSWER) == [HandOver(waiter, holder.worker)]
    pool.state.handed_over(waiter, 7)
    assert (waiter.worker, waiter.written, waiter.handed) == (holder.worker, 7, True)


def test_a_failed_hand_over_discards_the_worker_and_wakes_the_caller_with_the_error() -> None:
    pool = Pool(size=1, spares=1)
    holder = pool.take()
    waiter = FakeTicket()
    pool.state.take_or_wait(waiter)
    (hand_over,) = pool.state.settle(holder.worker, ANSWER)
    assert hand_over == HandOver(waiter, holder.worker)
    error = ProtocolError("out of turn")
    effects = pool.state.hand_over_failed(waiter, error)
    assert kills(effects) == [holder.worker] and effects[-1] == Wake(waiter)
    assert waiter.error is error and not waiter.handed
    assert pool.status(holder.worker) is None  # retired: never handed out again
    assert pool.state.stats().idle == 1  # the spare took its place


def test_readers_get_a_snapshot_taken_at_one_instant() -> None:
    """``view`` and ``roster`` are immutable copies: a later transition does not change a
    view already taken."""
    pool = Pool(size=1, spares=0)
    call = FakeTicket()
    pool.state.admit(call)
    before = pool.state.view()
    pool.state.begin_close()
    assert (before.phase, before.in_flight, before.started) == (Phase.OPEN, 1, True)
    assert pool.state.view().phase is Phase.CLOSING and not pool.state.view().terminated
    with pytest.raises(FrozenInstanceError):
        before.phase = Phase.STOPPED  # type: ignore[misc]
    roster = pool.state.roster()
    pool.state.start_failed(None, "no fds", now=30.0)
    assert roster.next_spawn_at == 0.0 and pool.state.roster().next_spawn_at > 30.0
    assert [status for _, status, *_ in roster.members] == [WorkerStatus.IDLE]


def assert_counts_match_the_members(state: PoolState[FakeWorker]) -> None:
    """The counts the hot path keeps instead of scanning the members (``stats()`` reports
    them as ``alive`` and ``starting``) agree with a scan of the roster."""
    statuses = [status for _, status, *_ in state.roster().members]
    stats = state.stats()
    assert stats.alive == statuses.count(WorkerStatus.IDLE) + statuses.count(WorkerStatus.BUSY)
    assert stats.starting == statuses.count(WorkerStatus.STARTING)


def test_the_kept_counts_follow_every_transition() -> None:
    """Every transition that changes a worker's status (start, hello, check-out, check-in,
    hand-over, death while busy, demotion, recycling, an idle worker's death, a failed
    start, the supervisor's stop) keeps the counts of serving and starting workers exact."""
    pool = Pool(size=2, spares=1, interactive_budget=0.05)
    state = pool.state

    def check() -> None:
        assert_counts_match_the_members(state)

    check()
    starting = pool.start()
    check()
    first, second = pool.take(), pool.take()
    waiter = FakeTicket()
    state.take_or_wait(waiter)
    check()
    state.demoted(first.worker)
    check()
    state.settle(first.worker, ANSWER, 1.0)  # demoted: recycled; the spare goes to the waiter
    check()
    state.exited(second.worker, "killed by SIGKILL")  # busy: dying
    check()
    state.settle(second.worker, Outcome(error=WorkerCrashed("killed"), died=True))
    check()
    pool.greet(starting)
    check()
    state.settle(waiter.worker, ANSWER, 1.0)
    check()
    (idle, *_) = pool.workers(WorkerStatus.IDLE)
    state.exited(idle, "killed by SIGKILL")
    check()
    for worker in [w for w, s, *_ in state.roster().members if s is WorkerStatus.STARTING]:
        state.start_failed(worker, "no fork", 0.0)
    check()
    held = pool.take()
    state.supervisor_stopped()
    check()
    assert held.worker is not None
