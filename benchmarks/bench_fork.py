"""Forked workers against cold re-exec starts, measured interleaved in one run.

    python benchmarks/bench_fork.py [--rounds N] [--calls N] [--alive N]

Per round, one cold start (``WorkerProcess``: an interpreter re-exec to its hello) and one
fork (``TemplateProcess.fork_worker``: a fork of the template to its hello), each followed by
its first call on the reference light workload (the OIDC mapper, as bench_latency.py) and
closed; interleaved, so drift on a noisy machine hits both alike. Reported, as p50 / p95:
  * to hello, and to the first answer (start + hello + first call): what a call pays when it
    needs a fresh worker and no spare is ready;
  * the first call on a never-used, already greeted worker: what a call pays when the pool
    keeps a never-used spare (a new tenant per call, sequential);
  * their ratios against the cold start measured in the same run (issue 14's target: a call
    on a never-used worker p50 <= 0.10x a cold start);
  * a new tenant per call, sequential, as a pool would serve it: a helper thread (the
    supervisor's stand-in) keeps ``--spares`` greeted forked workers ready and retires each
    used one; each call takes a spare, is answered, and gives it to the helper. Reported as
    p50 / p95 of the caller's wait plus call, and as a ratio to the cold start;
  * steady-state per-call latency on one worker of each kind (a forked worker must not be
    slower once warm);
  * memory per worker with ``--alive`` of each kind alive at once, after one call each:
    RSS, PSS (shared pages split among their sharers: copy-on-write shows here) and USS
    (private pages), from /proc/PID/smaps_rollup.
"""

from __future__ import annotations

import argparse
import queue
import select
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_latency import find_workload, percentile

from jsonnet_worker._forking import TemplateProcess
from jsonnet_worker._privileges import DEFAULT_WORKER_USER, WorkerIdentities
from jsonnet_worker._process import WorkerProcess, WorkerSettings
from jsonnet_worker._protocol import DEFAULT_MAX_FRAME, FrameReader, Message, encode

_READERS: dict[int, FrameReader] = {}  # each worker's frames, by pid


def next_message(worker: WorkerProcess, timeout: float = 20.0) -> Message:
    deadline = time.monotonic() + timeout
    reader = _READERS.setdefault(worker.pid, FrameReader(worker.settings.max_frame))
    while True:
        event = reader.next_event()
        if event is not None:
            assert isinstance(event, Message), event
            return event
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no frame from the worker")
        ready = select.select([worker.stdout, worker.stderr_fd], [], [], left)[0]
        if worker.stderr_fd in ready:
            worker.drain_stderr()
        if worker.stdout in ready:
            data = worker.read_stdout()
            if data == b"":
                _READERS.pop(worker.pid, None)
                raise RuntimeError(f"worker exited: {worker.stderr.text()[:300]}")
            if data:
                reader.feed(data)


class Caller:
    """Sends the workload to one worker and checks each answer."""

    def __init__(self, snippet: str, claims: str) -> None:
        self.snippet, self.claims = snippet, claims
        self.next_id = 0

    def call(self, worker: WorkerProcess) -> None:
        self.next_id += 1
        frame = encode(
            {
                "t": "eval",
                "id": self.next_id,
                "snippet": self.snippet,
                "filename": "mapper.jsonnet",
                "ext_vars": {},
                "ext_codes": {"claims": self.claims},
                "tla_vars": {},
                "tla_codes": {},
                "max_stack": 500,
                "max_output": 1 << 20,
            }
        )
        view = memoryview(frame)
        while view:
            written = worker.send(view)
            assert written is not None
            view = view[written:]
        answer = next_message(worker).payload
        assert answer["t"] == "result" and answer["id"] == self.next_id, answer


def one_start(start: Callable[[], WorkerProcess], caller: Caller) -> tuple[float, float, float]:
    """(to hello, to first answer, first call alone) in seconds; the worker is closed."""
    began = time.perf_counter()
    worker = start()
    try:
        hello = next_message(worker).payload
        assert hello["t"] == "hello", hello
        greeted = time.perf_counter()
        caller.call(worker)
        answered = time.perf_counter()
    finally:
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
            next_message(worker)
            caller.call(worker)
        samples = [memory(worker.pid) for worker in workers]
    finally:
        for worker in workers:
            worker.close()
    return {key: int(statistics.median(sample[key] for sample in samples)) for key in samples[0]}


def steady(start: Callable[[], WorkerProcess], caller: Caller, calls: int) -> list[float]:
    worker = start()
    try:
        next_message(worker)
        for _ in range(50):  # warm-up
            caller.call(worker)
        samples = []
        for _ in range(calls):
            began = time.perf_counter()
            caller.call(worker)
            samples.append(time.perf_counter() - began)
        return samples
    finally:
        worker.close()


def new_tenant_per_call(
    start: Callable[[], WorkerProcess], caller: Caller, calls: int, spares: int
) -> list[float]:
    """Seconds per sequential call, each on a never-used worker kept ready by a helper."""
    ready: queue.Queue[WorkerProcess] = queue.Queue(maxsize=spares)
    used: queue.Queue[WorkerProcess | None] = queue.Queue()
    stop = threading.Event()

    def keep_spares() -> None:
        while not stop.is_set():
            try:
                retired = used.get_nowait()
            except queue.Empty:
                retired = None
            if retired is not None:
                retired.close()
                continue
            if ready.full():
                retired = used.get()  # sleep until a call gives a worker back
                if retired is not None:
                    retired.close()
                continue
            worker = start()
            next_message(worker)  # the hello: a spare is greeted before it is handed out
            ready.put(worker)

    helper = threading.Thread(target=keep_spares)
    helper.start()
    samples = []
    try:
        for _ in range(spares):  # the pool starts full
            while not ready.full():
                time.sleep(0.01)
        for _ in range(calls):
            began = time.perf_counter()
            worker = ready.get()
            caller.call(worker)
            samples.append(time.perf_counter() - began)
            used.put(worker)
    finally:
        stop.set()
        used.put(None)
        helper.join()
        while not ready.empty():
            ready.get().close()
        while not used.empty():
            retired = used.get()
            if retired is not None:
                retired.close()
    return samples


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
    parser.add_argument("--spares", type=int, default=2)
    args = parser.parse_args()
    settings = WorkerSettings(
        "go", 1 << 30, DEFAULT_MAX_FRAME, WorkerIdentities(DEFAULT_WORKER_USER)
    )
    caller = Caller(*find_workload(None))
    template_started = time.perf_counter()
    template = TemplateProcess(settings)
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
        tenants = new_tenant_per_call(forked, caller, args.tenant_calls, args.spares)
        print(line(f"new tenant per call ({args.spares} spares)", tenants))
        print(
            "ratio new-tenant call / cold start (p50):     "
            f"{statistics.median(tenants) / cold_start:.3f}  (target <= 0.10)"
        )
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
