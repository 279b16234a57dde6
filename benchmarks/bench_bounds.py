"""What bounds the light mapper's sequential call: the costs the pool cannot remove, measured.

    python -m benchmarks.bench_bounds [--calls N]

Issue 13's sequential target (p50 <= 0.90x in-process) needs the sandboxed call to cost less
than the unsafe one. This measures, in one run, the parts of a call that no change to the
pool can remove, so that RESULTS.md says what the miss is made of:
  * go-jsonnet's own cost per evaluation, paid by the binding and by the workers' C API path
    alike: an evaluation of ``1`` (a VM's start: its standard library object), and the same
    with the light workload's ``claims`` as ext code (an ext code is parsed at every
    evaluation: the C API path caches the snippet's AST, not a variable's);
  * what a wake-up costs on this machine: a one-byte echo between two processes over a
    unix socket pair (two wake-ups per round trip), across CPUs and with both pinned to one
    CPU, and the CPU time of one 50 µs sleep (one block and wake-up);
  * where the pool's sequential call spends CPU: the caller's thread and the worker's
    process per call, against the in-process call's CPU, on the light mapper.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import _gojsonnet

from benchmarks import workloads
from benchmarks.bench_latency import time_calls
from jsonnet_worker import WorkerPool
from jsonnet_worker._pool.processes import process_cpu_seconds
from jsonnet_worker._worker import capi
from tests import seams

HEADER = ["figure", "µs", "what it is"]
ECHO_CHILD = (
    "import os, sys\n"
    "fd = int(sys.argv[1])\n"
    "while True:\n"
    "    data = os.read(fd, 1)\n"
    "    if not data:\n"
    "        break\n"
    "    os.write(fd, data)\n"
)


def p50(call: Callable[[], object], count: int) -> float:
    time_calls(call, max(10, count // 10))  # warm-up
    return statistics.median(time_calls(call, count))


def echo_round_trip(count: int, one_cpu: bool) -> float:
    """p50 of a one-byte round trip to a child process over a unix socket pair."""
    ours, theirs = socket.socketpair()
    child = subprocess.Popen(
        [sys.executable, "-c", ECHO_CHILD, str(theirs.fileno())], pass_fds=[theirs.fileno()]
    )
    theirs.close()
    affinity = os.sched_getaffinity(0)
    try:
        if one_cpu:
            cpu = min(affinity)
            os.sched_setaffinity(child.pid, {cpu})
            os.sched_setaffinity(0, {cpu})
        fd = ours.fileno()

        def round_trip() -> None:
            os.write(fd, b"x")
            os.read(fd, 1)

        return p50(round_trip, count)
    finally:
        os.sched_setaffinity(0, affinity)
        ours.close()
        child.wait(10)


def sleep_cpu(count: int) -> float:
    began = time.process_time()
    for _ in range(count):
        time.sleep(0.00005)
    return (time.process_time() - began) / count


def pool_cpu(workload: workloads.Workload, count: int) -> tuple[float, float, float, float]:
    """Sequential calls on a pool of one: (wall p50, caller thread CPU, worker CPU) per call,
    and the in-process call's CPU per call."""
    with WorkerPool(1) as pool:

        def call() -> object:
            return pool.evaluate_json(
                workload.snippet, ext_codes=workload.ext_codes, tla_codes=workload.tla_codes
            )

        wall = p50(call, count)
        worker = seams.worker_pids(pool, "idle")[0]
        cpu_before, worker_before = time.thread_time(), process_cpu_seconds(worker)
        for _ in range(count):
            call()
        caller = (time.thread_time() - cpu_before) / count
        worker_after = process_cpu_seconds(worker)
        assert worker_before is not None and worker_after is not None
        worker_cpu = (worker_after - worker_before) / count

    def in_process() -> object:
        return workload.evaluate_in_process(_gojsonnet)

    p50(in_process, count // 10)
    began = time.process_time()
    for _ in range(count):
        in_process()
    return wall, caller, worker_cpu, (time.process_time() - began) / count


def measure(count: int) -> tuple[list[list[str]], str, float]:
    """The rows of the table, a sentence (the floor a sequential call cannot go under), and
    the CPU seconds a pool call costs the machine (caller and worker)."""
    light = workloads.light()
    claims = light.ext_codes
    engine = capi.CapiEngine(capi.bind(_gojsonnet.__file__))

    one = p50(lambda: _gojsonnet.evaluate_snippet("one.jsonnet", "1"), count)
    one_claims = p50(
        lambda: _gojsonnet.evaluate_snippet("one.jsonnet", "1", ext_codes=claims), count
    )
    binding = p50(lambda: light.evaluate_in_process(_gojsonnet), count)
    api = p50(lambda: light.evaluate_capi(engine), count)
    across = echo_round_trip(count, one_cpu=False)
    one_cpu = echo_round_trip(count, one_cpu=True)
    sleep = sleep_cpu(count)
    wall, caller, worker, in_process = pool_cpu(light, count)

    def row(figure: str, seconds: float, meaning: str) -> list[str]:
        return [figure, f"{seconds * 1e6:.1f}", meaning]

    floor = api + caller + one_cpu
    summary = (
        f"floor of a sequential pool call with no wake-up at all (the C API evaluation, the "
        f"caller's CPU and an echo on one CPU): {floor * 1e6:.0f} µs = {floor / binding:.2f}x "
        f"the in-process call's {binding * 1e6:.0f} µs; go-jsonnet's fixed cost per "
        f"evaluation ({one_claims * 1e6:.0f} µs with the claims) is in both"
    )
    rows = [
        row("go-jsonnet: evaluate `1`", one, "per evaluation, both paths: the VM's start"),
        row(
            "go-jsonnet: evaluate `1` with the claims ext code",
            one_claims,
            "per evaluation, both paths: the ext code is parsed every time",
        ),
        row("light mapper, binding, in-process", binding, "the unsafe call's evaluation"),
        row(
            "light mapper, C API path (cached AST), in-process",
            api,
            "the workers' evaluation, without IPC",
        ),
        row("echo between two processes, across CPUs", across, "two wake-ups"),
        row("echo between two processes on one CPU", one_cpu, "two context switches"),
        row("CPU time of one 50 µs sleep", sleep, "what one block and wake-up costs in CPU"),
        row("pool of 1, light mapper, sequential: wall p50", wall, "the sandboxed call"),
        row("  caller thread CPU per call", caller, "encode, hand-over, poll, check the answer"),
        row("  worker process CPU per call", worker, "read, evaluate, answer, wait (spin)"),
        row("in-process light mapper: CPU per call", in_process, "the unsafe call, all threads"),
    ]
    return rows, summary, caller + worker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000)
    args = parser.parse_args()
    rows, summary, _ = measure(args.calls)
    widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER))]
    for row in [HEADER, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    print(summary)


if __name__ == "__main__":
    main()
