"""Forked workers against cold re-exec starts, measured interleaved in one run.

    python benchmarks/bench_fork.py [--rounds N] [--calls N] [--alive N]

Per round, one cold start (``WorkerProcess``: an interpreter re-exec to its hello) and one
fork (``ForkServerProcess.fork_worker``: a fork of the template to its hello), each followed by
its first call on the reference light workload (the OIDC mapper, as bench_latency.py) and
closed; interleaved, so drift on a noisy machine hits both alike. Reported, as p50 / p95:
  * to hello, and to the first answer (start + hello + first call): what a call pays when it
    needs a fresh worker and no spare is ready;
  * the first call on a never-used, already greeted worker: what a call pays when the pool
    keeps a never-used spare (a new tenant per call, sequential);
  * their ratios against the cold start measured in the same run (issue 14's target: a call
    on a never-used worker p50 <= 0.10x a cold start);
  * through the real pool (``WorkerPool``, forked workers against ``seams.re_exec()``,
    alternated): a new tenant per call, sequential (20 ms apart), 1 worker + 2 spares, as
    p50 / p95 and as a ratio to the cold start (target <= 0.10x); the worst call (begun
    during a burst of 6 SIGKILLs 20 ms apart or the 300 ms after it) under sequential load
    on a pool of 2 + 1 spare, as a range over ``--bursts`` bursts (target <= 0.30x);
  * steady-state per-call latency on one worker of each kind (a forked worker must not be
    slower once warm);
  * memory per worker with ``--alive`` of each kind alive at once, after one call each:
    RSS, PSS (shared pages split among their sharers: copy-on-write shows here) and USS
    (private pages), from /proc/PID/smaps_rollup.
"""

from __future__ import annotations

import argparse
import os
import random
import select
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: tests.seams

from bench_latency import find_workload, percentile

from jsonnet_worker import Error, WorkerPool
from jsonnet_worker._pool.connection import NEED_DATA, Answer, ConnectionEvent, WorkerConnection
from jsonnet_worker._pool.forking import ForkServerProcess
from jsonnet_worker._pool.identities import DEFAULT_WORKER_USER, WorkerIdentities
from jsonnet_worker._pool.launch import await_hello
from jsonnet_worker._pool.processes import WorkerProcess, WorkerSettings
from jsonnet_worker._wire.framing import DEFAULT_MAX_FRAME
from jsonnet_worker._wire.messages import EvalRequest
from tests import seams

_CONNECTIONS: dict[int, WorkerConnection] = {}  # each greeted worker's conversation, by pid


def greet(worker: WorkerProcess) -> None:
    """Read the worker's hello through the pool's own conversation, kept for its calls."""
    connection = WorkerConnection(1 << 20)
    await_hello(worker, connection, timeout=20.0)
    _CONNECTIONS[worker.pid] = connection


def next_event(worker: WorkerProcess, timeout: float = 20.0) -> ConnectionEvent:
    connection = _CONNECTIONS[worker.pid]
    deadline = time.monotonic() + timeout
    while (event := connection.next_event()) is NEED_DATA:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no frame from the worker")
        ready = select.select([worker.stdout, worker.stderr_fd], [], [], left)[0]
        if worker.stderr_fd in ready:
            worker.drain_stderr()
        if worker.stdout in ready and (data := worker.read_stdout()) is not None:
            connection.receive_data(data)
    return event


class Caller:
    """Sends the workload to one worker and checks each answer."""

    def __init__(self, snippet: str, claims: str) -> None:
        self.snippet, self.claims = snippet, claims
        self.next_id = 0

    def call(self, worker: WorkerProcess) -> None:
        self.next_id += 1
        request = EvalRequest(
            self.next_id, self.snippet, "mapper.jsonnet", ext_codes={"claims": self.claims}
        )
        view = memoryview(_CONNECTIONS[worker.pid].send_request(request))
        while view:
            written = worker.send(view)
            assert written is not None
            view = view[written:]
        answer = next_event(worker)
        assert isinstance(answer, Answer) and answer.request_id == self.next_id, (
            answer,
            worker.stderr.text()[:300],
        )


def one_start(start: Callable[[], WorkerProcess], caller: Caller) -> tuple[float, float, float]:
    """(to hello, to first answer, first call alone) in seconds; the worker is closed."""
    began = time.perf_counter()
    worker = start()
    try:
        greet(worker)
        greeted = time.perf_counter()
        caller.call(worker)
        answered = time.perf_counter()
    finally:
        _CONNECTIONS.pop(worker.pid, None)
        worker.close()
    return greeted - began, answered - began, answered - greeted


def memory(pid: int) -> dict[str, int]:
    """kB, from /proc/PID/smaps_rollup."""
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                fields[parts[0].rstrip(":")] = int(parts[1])
    return {
        "rss": fields["Rss"],
        "pss": fields["Pss"],
        "uss": fields["Private_Clean"] + fields["Private_Dirty"],
    }


def alive_memory(start: Callable[[], WorkerProcess], caller: Caller, count: int) -> dict[str, int]:
    """Median memory of ``count`` workers alive at once, each after one call."""
    workers = [start() for _ in range(count)]
    try:
        for worker in workers:
            greet(worker)
            caller.call(worker)
        samples = [memory(worker.pid) for worker in workers]
    finally:
        for worker in workers:
            _CONNECTIONS.pop(worker.pid, None)
            worker.close()
    return {key: int(statistics.median(sample[key] for sample in samples)) for key in samples[0]}


def steady(start: Callable[[], WorkerProcess], caller: Caller, calls: int) -> list[float]:
    worker = start()
    try:
        greet(worker)
        for _ in range(50):  # warm-up
            caller.call(worker)
        samples = []
        for _ in range(calls):
            began = time.perf_counter()
            caller.call(worker)
            samples.append(time.perf_counter() - began)
        return samples
    finally:
        _CONNECTIONS.pop(worker.pid, None)
        worker.close()


def pool_new_tenant(pool: WorkerPool, caller: Caller, calls: int) -> list[float]:
    """Seconds per sequential call through the real pool, each of a new tenant (so each on a
    never-used worker: a spare, or one started for it)."""
    for _ in range(3):  # warm-up
        pool.evaluate(caller.snippet, ext_codes={"claims": caller.claims})
    samples = []
    for call in range(calls):
        time.sleep(0.02)  # a sequential client: the supervisor refills the spares meanwhile
        began = time.perf_counter()
        pool.evaluate(caller.snippet, ext_codes={"claims": caller.claims}, tenant=f"t{call}")
        samples.append(time.perf_counter() - began)
    return samples


def pool_kill_burst(pool: WorkerPool, caller: Caller, kills: int = 6) -> tuple[float, int]:
    """Sequential calls from one thread while ``kills`` workers are SIGKILLed 20 ms apart:
    the slowest call begun during the burst or the 300 ms after it, and how many failed."""
    calls: list[tuple[float, float, bool]] = []  # began, seconds, failed
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            began = time.perf_counter()
            try:
                pool.evaluate(caller.snippet, ext_codes={"claims": caller.claims})
                failed = False
            except Error:
                failed = True
            calls.append((began, time.perf_counter() - began, failed))

    thread = threading.Thread(target=load)
    thread.start()
    time.sleep(0.3)
    burst_began = time.perf_counter()
    for _ in range(kills):
        pids = pool.stats().worker_pids
        if pids:
            try:
                os.kill(random.choice(pids), signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.02)
    burst_ended = time.perf_counter()
    time.sleep(0.5)
    stop.set()
    thread.join()
    during = [row for row in calls if burst_began <= row[0] <= burst_ended + 0.3]
    return max(row[1] for row in during), sum(row[2] for row in during)


def through_the_pool(caller: Caller, calls: int, bursts: int, cold_start: float) -> None:
    """The pool's own paths, forked (the default) against re-exec (``seams.re_exec()``),
    alternated in two blocks each so drift hits both."""
    tenants: dict[str, list[float]] = {"forked": [], "re-exec": []}
    worst: dict[str, list[float]] = {"forked": [], "re-exec": []}
    failed: dict[str, int] = {"forked": 0, "re-exec": 0}
    for _ in range(2):
        for kind in ("forked", "re-exec"):
            origin = seams.forked() if kind == "forked" else seams.re_exec()
            with seams.pool_of(origin, 1, spares=2) as pool:
                tenants[kind] += pool_new_tenant(pool, caller, calls // 2)
            with seams.pool_of(origin, 2, spares=1) as pool:
                for _ in range(max(1, bursts // 2)):
                    slowest, errors = pool_kill_burst(pool, caller)
                    worst[kind].append(slowest)
                    failed[kind] += errors
    for kind in ("forked", "re-exec"):
        print(line(f"pool: new tenant per call, {kind}", tenants[kind]))
        print(
            f"ratio pool new-tenant call / cold start (p50), {kind}: "
            f"{statistics.median(tenants[kind]) / cold_start:.3f}"
            + ("  (target <= 0.10)" if kind == "forked" else "")
        )
    for kind in ("forked", "re-exec"):
        ratios = sorted(value / cold_start for value in worst[kind])
        print(
            f"pool: worst call in a burst of 6 kills 20 ms apart, {kind}: "
            f"{min(worst[kind]) * 1e3:.1f}-{max(worst[kind]) * 1e3:.1f} ms, "
            f"ratio to cold start {ratios[0]:.3f}-{ratios[-1]:.3f} (median "
            f"{statistics.median(ratios):.3f})"
            + ("  (target <= 0.30)" if kind == "forked" else "")
            + f"; {failed[kind]} calls failed (on a killed worker)"
        )


def line(name: str, samples: list[float]) -> str:
    return (
        f"{name:34} p50 {statistics.median(samples) * 1e3:7.2f} ms"
        f"   p95 {percentile(samples, 0.95) * 1e3:7.2f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--alive", type=int, default=4)
    parser.add_argument("--tenant-calls", type=int, default=100)
    parser.add_argument("--bursts", type=int, default=6)
    args = parser.parse_args()
    settings = WorkerSettings(
        "go", 1 << 30, DEFAULT_MAX_FRAME, WorkerIdentities(DEFAULT_WORKER_USER)
    )
    caller = Caller(*find_workload(None))
    template_started = time.perf_counter()
    template = ForkServerProcess(settings)
    template_start = time.perf_counter() - template_started
    try:

        def cold() -> WorkerProcess:
            return WorkerProcess(settings)

        def forked() -> WorkerProcess:
            return template.fork_worker()

        results: dict[str, list[tuple[float, float, float]]] = {"cold": [], "forked": []}
        for _ in range(args.rounds):
            results["cold"].append(one_start(cold, caller))
            results["forked"].append(one_start(forked, caller))
        print(f"template start to hello: {template_start * 1e3:.1f} ms (once per pool and engine)")
        print(f"rounds: {args.rounds}, interleaved; workload: the OIDC mapper")
        columns = ("to hello", "to first answer", "first call alone")
        for kind, rows in results.items():
            for index, label in enumerate(columns):
                print(line(f"{kind:6} {label}", [row[index] for row in rows]))
        cold_start = statistics.median(row[0] for row in results["cold"])
        cold_answer = statistics.median(row[1] for row in results["cold"])
        forked_hello = statistics.median(row[0] for row in results["forked"])
        forked_answer = statistics.median(row[1] for row in results["forked"])
        forked_first = statistics.median(row[2] for row in results["forked"])
        print(f"ratio forked/cold, to hello (p50):            {forked_hello / cold_start:.3f}")
        print(f"ratio forked/cold, to first answer (p50):     {forked_answer / cold_answer:.3f}")
        print(
            "ratio never-used call / cold start (p50):     "
            f"{forked_first / cold_start:.3f}  (a greeted spare; target <= 0.10)"
        )
        print(
            "ratio fork+hello+call / cold start (p50):     "
            f"{forked_answer / cold_start:.3f}  (no spare ready)"
        )
        through_the_pool(caller, args.tenant_calls, args.bursts, cold_start)
        steady_cold = steady(cold, caller, args.calls)
        steady_forked = steady(forked, caller, args.calls)
        print(line("steady per call, re-exec worker", steady_cold))
        print(line("steady per call, forked worker", steady_forked))
        print(
            "ratio steady forked/re-exec (p50):           "
            f"{statistics.median(steady_forked) / statistics.median(steady_cold):.3f}"
        )
        for kind, start in (("re-exec", cold), ("forked", forked)):
            figures = alive_memory(start, caller, args.alive)
            print(
                f"memory per {kind:7} worker ({args.alive} alive, after one call): "
                f"RSS {figures['rss'] / 1024:.1f} MiB, PSS {figures['pss'] / 1024:.1f} MiB, "
                f"USS {figures['uss'] / 1024:.1f} MiB"
            )
        template_memory = memory(template.pid)
        print(
            f"memory of the template: RSS {template_memory['rss'] / 1024:.1f} MiB, "
            f"PSS {template_memory['pss'] / 1024:.1f} MiB"
        )
    finally:
        template.close()


if __name__ == "__main__":
    main()
