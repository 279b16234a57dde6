"""What the layers beyond Landlock (seccomp, privilege drop, task/fd limits) cost, in one run.

    python benchmarks/bench_layers.py [--starts N] [--calls N]

Two worker configurations, measured interleaved so drift on a noisy machine hits both alike:
``landlock`` is the worker with its Landlock layer only (the test harness leaves seccomp and
the new limits out, and no privilege drop); ``full`` is the product's worker (started through
the same harness for the start-up figures, so both pay the same imports). Reported: time
from spawn to hello, and the pool's sequential per-call latency on the reference light
workload (the OIDC mapper of bench_latency.py), with full/landlock ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from bench_latency import find_workload, percentile, time_calls

from jsonnet_worker import WorkerPool
from jsonnet_worker._launch import launch_and_greet
from jsonnet_worker._privileges import resolve_identity
from jsonnet_worker._process import WorkerSettings, worker_command
from jsonnet_worker._protocol import DEFAULT_MAX_FRAME

HARNESS = Path(__file__).resolve().parent.parent / "tests" / "harness" / "worker_harness.py"


def harness_command(settings: WorkerSettings, without: str = "") -> list[str]:
    """Both configurations start through the test harness, so they pay the same imports."""
    real = worker_command(settings)
    options = ["--without", without] if without else []
    return [sys.executable, "-I", str(HARNESS), "full", *options, *real[6:]]


def time_to_hello(settings: WorkerSettings, command: list[str] | None) -> tuple[float, float]:
    """Seconds from spawn to hello, and the worker's own start-up time in seconds."""
    started = time.perf_counter()
    worker, hello = launch_and_greet(settings, command)
    elapsed = time.perf_counter() - started
    worker.close()
    return elapsed, hello.startup_ms / 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--starts", type=int, default=40)
    parser.add_argument("--calls", type=int, default=5000)
    args = parser.parse_args()
    full_settings = WorkerSettings("go", 1 << 30, DEFAULT_MAX_FRAME, resolve_identity("nobody"))
    plain_settings = WorkerSettings("go", 1 << 30, DEFAULT_MAX_FRAME)
    plain_command = harness_command(plain_settings, "seccomp,limits")
    full_command = harness_command(full_settings)
    starts: dict[str, list[tuple[float, float]]] = {"landlock": [], "full": []}
    for _ in range(args.starts):
        starts["landlock"].append(time_to_hello(plain_settings, plain_command))
        starts["full"].append(time_to_hello(full_settings, full_command))
    for name, samples in starts.items():
        print(
            f"start {name:9}: to hello p50 {statistics.median(s[0] for s in samples) * 1e3:.1f} ms,"
            f" inside the worker p50 {statistics.median(s[1] for s in samples) * 1e3:.1f} ms"
        )
    for index, label in ((0, "to hello"), (1, "inside the worker")):
        ratio = statistics.median(s[index] for s in starts["full"]) / statistics.median(
            s[index] for s in starts["landlock"]
        )
        print(f"start ratio full/landlock ({label}, p50): {ratio:.2f}")

    snippet, claims = find_workload(None)
    codes = {"claims": claims}
    with (
        WorkerPool(1, worker_user=None, _worker_command=plain_command) as plain,
        WorkerPool(1) as full,
    ):
        assert plain.sandbox is not None and full.sandbox is not None
        assert plain.sandbox.seccomp.state.value == "missing" and not full.sandbox.missing
        calls = {
            "landlock": lambda: plain.evaluate_json(snippet, ext_codes=codes),
            "full": lambda: full.evaluate_json(snippet, ext_codes=codes),
        }
        for call in calls.values():
            time_calls(call, 300)
        latency: dict[str, list[float]] = {"landlock": [], "full": []}
        rounds = 10
        for _ in range(rounds):
            for name, call in calls.items():
                latency[name] += time_calls(call, args.calls // rounds)
    for name, timings in latency.items():
        print(
            f"call  {name:9}: p50 {percentile(timings, 0.5) * 1e6:.0f} us, "
            f"p99 {percentile(timings, 0.99) * 1e6:.0f} us"
        )
    for fraction, label in ((0.5, "p50"), (0.99, "p99")):
        ratio = percentile(latency["full"], fraction) / percentile(latency["landlock"], fraction)
        print(f"call ratio full/landlock ({label}): {ratio:.3f}")


if __name__ == "__main__":
    main()
