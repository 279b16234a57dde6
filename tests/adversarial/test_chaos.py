"""Chaos under load: 16 threads and 64 asyncio tasks call the pool while a chaos thread
SIGKILLs random workers and some calls time out on purpose.

Every call has exactly one outcome, each answer is checked against its own request, no
zombie or fd is left, and the pool is back to full size within 100 ms of the last kill (on
a machine loaded enough to stretch that, within half the time its spare's restart took in the
same moment: the spare took over, nothing waited for an interpreter start).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import seams
from conftest import child_pids, open_fds
from jsonnet_worker import EvaluationTimeout, WorkerCrashed, WorkerPool

from .conftest import Tier
from .ledger import LEDGER
from .support import wait_full

THREADS = 16
TASKS = 64
SPIN = (
    # CPU only (seconds of work, a flat heap): a memory bomb could end in
    # MemoryLimitExceeded before the deadline.
    "local depth(i) = if i == 0 then 0 else 1 + depth(i - 1); "
    "std.foldl(function(a, b) a + depth(400), std.range(1, 1000000), 0)"
)
SLOW_ON_PURPOSE = 0.05  # the timeout of the calls that must time out
RECOVERY_BOUND = 0.1  # the issue's requirement: full size within 100 ms of the last kill


@dataclass
class Outcomes:
    lock: threading.Lock = field(default_factory=threading.Lock)
    issued: int = 0
    by_call: dict[int, str] = field(default_factory=dict)
    wrong: list[str] = field(default_factory=list)

    def record(self, call: int, outcome: str) -> None:
        with self.lock:
            if call in self.by_call:
                self.wrong.append(f"call {call} had two outcomes")
            self.by_call[call] = outcome


def classify(call: int, on_purpose: bool, value: object, error: BaseException | None) -> str:
    """The one outcome of a call, or a description of what was wrong with it."""
    if error is None:
        if on_purpose:
            return "wrong: a spinning call returned"
        expected = {"call": call, "square": call * call}
        return "ok" if value == expected else f"wrong: {value!r} for call {call}"
    if isinstance(error, WorkerCrashed) and error.signal == signal.SIGKILL:
        return "killed"
    if on_purpose and isinstance(error, EvaluationTimeout):
        return "timeout"
    return f"wrong: {type(error).__name__}: {error}"


def snippet_for(on_purpose: bool) -> str:
    return (
        SPIN if on_purpose else "{call: std.extVar('c'), square: std.extVar('c') * std.extVar('c')}"
    )


@dataclass
class Load:
    """The callers (threads and asyncio tasks) and the chaos thread of one run, on one pool."""

    pool: WorkerPool
    outcomes: Outcomes = field(default_factory=Outcomes)
    calls: itertools.count[int] = field(default_factory=itertools.count)
    kills: list[float] = field(default_factory=list)
    recoveries: list[float] = field(default_factory=list)
    rng: random.Random = field(default_factory=lambda: random.Random(4))
    stop_load: threading.Event = field(default_factory=threading.Event)
    stop_chaos: threading.Event = field(default_factory=threading.Event)

    def issue(self) -> tuple[int, bool, dict[str, Any]]:
        """A new call: its number, whether it must time out, and evaluate's arguments."""
        call = next(self.calls)
        on_purpose = call % 25 == 0
        with self.outcomes.lock:
            self.outcomes.issued += 1
        arguments = {
            "snippet": snippet_for(on_purpose),
            "ext_vars": {"c": call},
            "timeout": SLOW_ON_PURPOSE if on_purpose else None,
        }
        return call, on_purpose, arguments

    def thread_loop(self) -> None:
        while not self.stop_load.is_set():
            call, on_purpose, arguments = self.issue()
            try:
                value = self.pool.evaluate(**arguments)
            except Exception as exc:
                self.outcomes.record(call, classify(call, on_purpose, None, exc))
            else:
                self.outcomes.record(call, classify(call, on_purpose, value, None))

    async def task_loop(self) -> None:
        while not self.stop_load.is_set():
            call, on_purpose, arguments = self.issue()
            try:
                value = await self.pool.aevaluate(**arguments)
            except Exception as exc:
                self.outcomes.record(call, classify(call, on_purpose, None, exc))
            else:
                self.outcomes.record(call, classify(call, on_purpose, value, None))

    def asyncio_load(self) -> None:
        async def main() -> None:
            await asyncio.gather(*(self.task_loop() for _ in range(TASKS)))

        asyncio.run(main())

    def chaos(self) -> None:
        while not self.stop_chaos.is_set():
            time.sleep(self.rng.uniform(0.1, 0.3))
            pids = self.pool.stats().worker_pids
            if not pids or self.stop_chaos.is_set():
                continue
            victim = self.rng.choice(pids)
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                continue
            killed_at = time.monotonic()
            self.kills.append(killed_at)
            # A spare being restarted is not capacity.
            wait_full(self.pool, capacity_only=True, without=victim)
            self.recoveries.append(time.monotonic() - killed_at)

    def kill_last(self) -> tuple[float, float]:
        """Kill a busy worker of the whole pool, still under load; return the seconds until
        the pool served at full capacity again (the spare took over) and until its spare
        was started again too (an interpreter start, on this machine, at this moment)."""
        wait_full(self.pool)
        victim = seams.worker_pids(self.pool, "busy")[0]
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        self.kills.append(killed_at)
        recovery = wait_full(self.pool, capacity_only=True, without=victim)
        wait_full(self.pool)
        return recovery, time.monotonic() - killed_at

    def outcome_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for outcome in self.outcomes.by_call.values():
            key = "wrong" if outcome.startswith("wrong") else outcome
            counts[key] = counts.get(key, 0) + 1
        return counts


def test_chaos_under_load(tier: Tier) -> None:
    fds, children = open_fds(), child_pids()
    with WorkerPool(2, engine="go", timeout=5.0, queue_timeout=60) as pool:
        wait_full(pool)
        load = Load(pool)
        callers = [threading.Thread(target=load.thread_loop) for _ in range(THREADS)]
        callers.append(threading.Thread(target=load.asyncio_load))
        chaos_thread = threading.Thread(target=load.chaos)
        for thread in [*callers, chaos_thread]:
            thread.start()
        time.sleep(tier.seconds)
        # The last kill, still under load, once the chaos thread has stopped and the pool
        # (its spare too) is whole again: the issue's bound is on this one.
        load.stop_chaos.set()
        chaos_thread.join(60)
        last_recovery, cold_start = load.kill_last()
        load.stop_load.set()
        for thread in callers:
            thread.join(60)
            assert not thread.is_alive()
        wait_full(pool)
        stats = pool.stats()
        # the pool's children: its live workers and the template they are forked from
        alive = set(stats.worker_pids) | ({stats.template_pid} - {None})
        assert child_pids() - children == alive  # every dead worker reaped: no zombie
        assert pool.evaluate("{ok: true}") == {"ok": True}
    leaked_fds = open_fds() - fds
    zombies = child_pids() - children

    outcomes, kills = load.outcomes, load.kills
    counts = load.outcome_counts()
    lost = outcomes.issued - len(outcomes.by_call)
    LEDGER.count(
        "chaos",
        "go",
        calls=outcomes.issued,
        kills=len(kills),
        lost=lost,
        zombies=len(zombies),
        leaked_fds=len(leaked_fds),
        **counts,
    )
    for seconds in load.recoveries:
        LEDGER.measure("chaos", "go", "recovery after a kill ms", seconds * 1000)
    print(
        f"\nchaos ({tier.name}): {outcomes.issued} calls in {tier.seconds} s, "
        f"{len(kills)} kills, outcomes {counts}"
    )
    wrong = [o for o in outcomes.by_call.values() if o.startswith("wrong")] + outcomes.wrong
    assert not wrong, wrong[:10]
    assert lost == 0
    assert not zombies and not leaked_fds
    assert kills, "the chaos thread killed nothing"
    assert counts.get("ok", 0) > 10 * len(kills)
    assert counts.get("timeout", 0) > 0
    assert counts.get("killed", 0) <= len(kills)
    # Kills in a row faster than a spare restarts (0.1-0.3 s apart on two busy cores) each
    # wait for an interpreter start: recorded above, not bounded. After the last kill the
    # spare takes over at once: within the issue's 100 ms, or, where a loaded machine
    # stretches everything, well within the interpreter start its replacement took in the
    # same moment (a recovery that waited for a start would take about as long as one).
    LEDGER.measure("chaos", "go", "recovery after the last kill ms", last_recovery * 1000)
    LEDGER.measure("chaos", "go", "spare restart after the last kill ms", cold_start * 1000)
    assert last_recovery < max(RECOVERY_BOUND, cold_start / 2), (
        f"{last_recovery * 1000:.1f} ms; the spare's restart took {cold_start * 1000:.1f} ms"
    )
