"""What the layers beyond Landlock (seccomp, privilege drop, task/fd limits) cost, in one run.

    python benchmarks/bench_layers.py [--starts N] [--calls N] [--only-issue-12]

Two worker configurations, measured interleaved so drift on a noisy machine hits both alike:
``landlock`` is the worker with its Landlock layer only (the test harness leaves seccomp and
the new limits out, and no privilege drop); ``full`` is the product's worker (started through
the same harness for the start-up figures, so both pay the same imports). Reported: time
from spawn to hello, and the pool's sequential per-call latency on the reference light
workload (the OIDC mapper of bench_latency.py), with full/landlock ratios.

``measure_issue_12`` then compares the full worker with the same worker as it was before
issue 12 (the harness's ``--without issue-12``: the old deny-list and no argument checks
but clone's, no new limits, no IPC namespace), interleaved the same way: what the new
filter rules, the new limits (RLIMIT_MEMLOCK/RTPRIO/NICE/MSGQUEUE/STACK/CPU) and the IPC
namespace add to start-up and per call, as ratios.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: tests.seams

from bench_latency import find_workload, percentile, time_calls

from jsonnet_worker import WorkerPool
from jsonnet_worker._pool.identities import WorkerIdentities
from jsonnet_worker._pool.launch import launch_and_greet
from jsonnet_worker._pool.processes import WorkerSettings, worker_command
from jsonnet_worker._wire.framing import DEFAULT_MAX_FRAME
from tests import seams

HARNESS = Path(__file__).resolve().parent.parent / "tests" / "harness" / "worker_harness.py"


def harness_command(settings: WorkerSettings, without: str = "") -> list[str]:
    """Both configurations start through the test harness, so they pay the same imports."""
    real = worker_command(settings, settings.identities.acquire())
    options = ["--without", without] if without else []
    return [sys.executable, "-I", str(HARNESS), "full", *options, *real[6:]]


def time_to_hello(settings: WorkerSettings, command: list[str] | None) -> tuple[float, float]:
    """Seconds from spawn to hello, and the worker's own start-up time in seconds."""
    started = time.perf_counter()
    worker, hello = launch_and_greet(settings, command)
    elapsed = time.perf_counter() - started
    worker.close()
    return elapsed, hello.startup_ms / 1000


def measure_issue_12(starts: int, calls: int) -> None:
    """Start-up and per-call ratios of the full worker against the pre-issue-12 one."""
    settings = WorkerSettings(
        "go", 1 << 30, DEFAULT_MAX_FRAME, WorkerIdentities("nobody"), cpu_budget=300.0
    )
    commands = {
        "before": harness_command(settings, "issue-12"),
        "issue 12": harness_command(settings),
    }
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
    for _ in range(starts):
        for name, command in commands.items():
            samples[name].append(time_to_hello(settings, command))
    for index, label in ((0, "to hello"), (1, "inside the worker")):
        old, new = (statistics.median(s[index] for s in samples[name]) for name in commands)
        print(
            f"issue 12 start ({label}, p50): before {old * 1e3:.1f} ms, "
            f"now {new * 1e3:.1f} ms, ratio {new / old:.3f}"
        )
    snippet, claims = find_workload(None)
    codes = {"claims": claims}
    with (
        seams.pool_of(seams.re_exec(commands["before"]), 1, spares=0) as before,
        seams.pool_of(seams.re_exec(commands["issue 12"]), 1, spares=0, cpu_budget=300.0) as now,
    ):
        assert before.sandbox is not None and now.sandbox is not None
        assert "checked" in now.sandbox.seccomp.detail and "RLIMIT_CPU" in now.sandbox.limits.detail
        assert "RLIMIT_MEMLOCK" not in before.sandbox.limits.detail
        pools = {
            "before": lambda: before.evaluate_json(snippet, ext_codes=codes),
            "issue 12": lambda: now.evaluate_json(snippet, ext_codes=codes),
        }
        for call in pools.values():
            time_calls(call, 300)
        latency: dict[str, list[float]] = {name: [] for name in pools}
        rounds = 10
        for _ in range(rounds):
            for name, call in pools.items():
                latency[name] += time_calls(call, calls // rounds)
    for fraction, label in ((0.5, "p50"), (0.99, "p99")):
        old, new = (percentile(latency[name], fraction) for name in ("before", "issue 12"))
        print(
            f"issue 12 call ({label}): before {old * 1e6:.0f} us, now {new * 1e6:.0f} us, "
            f"ratio {new / old:.3f}"
        )


# A child that installs one filter (none, the pre-issue-12 one, the current one) and times a
# cheap syscall: what the filter costs each syscall the worker makes.
_FILTER_COST = """
import ctypes, os, sys, time
sys.path[:0] = [{root!r}, {harness!r}]
from jsonnet_worker._sandbox import seccomp as _seccomp
import worker_harness
mode = sys.argv[1]
ctypes.CDLL(None).prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
if mode == "before":
    _seccomp.DENIED = worker_harness._BEFORE_ISSUE_12_DENIED
    _seccomp.ARGUMENT_RULES = {{
        k: v for k, v in _seccomp.ARGUMENT_RULES.items() if k in ("clone", "clone3")
    }}
if mode != "none":
    assert _seccomp.install().applied
getppid, best = os.getppid, float("inf")
for _ in range(5):
    started = time.perf_counter_ns()
    for _ in range(100_000):
        getppid()
    best = min(best, (time.perf_counter_ns() - started) / 100_000)
print(best)
"""


def measure_filter_per_syscall(rounds: int = 5) -> None:
    """ns per getppid() under no filter, the pre-issue-12 filter and the current one (it
    falls through every comparison: the most a filter costs an allowed call)."""
    code = _FILTER_COST.format(root=str(HARNESS.parent.parent.parent), harness=str(HARNESS.parent))
    best: dict[str, float] = {}
    for _ in range(rounds):
        for mode in ("none", "before", "issue 12"):
            done = subprocess.run(
                [sys.executable, "-c", code, mode], capture_output=True, text=True, check=True
            )
            best[mode] = min(best.get(mode, float("inf")), float(done.stdout))
    none, before, now = best["none"], best["before"], best["issue 12"]
    print(
        f"filter per syscall (getppid, best of {rounds}): none {none:.0f} ns, "
        f"before {before:.0f} ns, now {now:.0f} ns; the filter adds "
        f"{before - none:.0f} ns before, {now - none:.0f} ns now"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--starts", type=int, default=40)
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--only-issue-12", action="store_true")
    args = parser.parse_args()
    if args.only_issue_12:
        measure_filter_per_syscall()
        measure_issue_12(args.starts, args.calls)
        return
    full_settings = WorkerSettings("go", 1 << 30, DEFAULT_MAX_FRAME, WorkerIdentities("nobody"))
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
        seams.pool_of(seams.re_exec(plain_command), 1, worker_user=None) as plain,
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
    measure_filter_per_syscall()
    measure_issue_12(args.starts, args.calls)


if __name__ == "__main__":
    main()
