"""Sequential latency of the pool against in-process ``_gojsonnet``, measured in one run.

    python benchmarks/bench_latency.py [--calls N] [--workload DIR]

The workload is the Kratos-style OIDC mapper with its claims as ext code ``claims``: by
default ``../shared/bench`` beside the project (the reference light workload), else the
bundled ``fixtures/oidc-google.jsonnet``. Both paths are timed call by call, interleaved
in rounds so that drift on a noisy machine hits both alike; the ratios are what matter.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import _gojsonnet

from jsonnet_worker import WorkerPool

ROOT = Path(__file__).resolve().parent.parent
# ../shared/bench beside the checkout, or two levels up for a git worktree under wt/.
SHARED_BENCH = next(
    (
        candidate / "shared" / "bench"
        for candidate in (ROOT.parent, ROOT.parent.parent)
        if (candidate / "shared" / "bench" / "oidc-mapper.jsonnet").exists()
    ),
    ROOT.parent / "shared" / "bench",
)


def find_workload(directory: str | None) -> tuple[str, str]:
    shared = Path(directory) if directory else SHARED_BENCH
    if (shared / "oidc-mapper.jsonnet").exists():
        return (shared / "oidc-mapper.jsonnet").read_text(), (shared / "claims.json").read_text()
    return (
        (ROOT / "fixtures" / "oidc-google.jsonnet").read_text(),
        (ROOT / "fixtures" / "claims-google.json").read_text(),
    )


def time_calls(call: Callable[[], object], count: int) -> list[float]:
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return samples


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def measure(calls: int, workload: str | None, rounds: int = 5) -> dict[str, float]:
    snippet, claims = find_workload(workload)
    codes = {"claims": claims}
    with WorkerPool(2) as pool:

        def in_process() -> object:
            return _gojsonnet.evaluate_snippet("mapper.jsonnet", snippet, ext_codes=codes)

        def pooled() -> object:
            return pool.evaluate_json(snippet, ext_codes=codes, filename="mapper.jsonnet")

        assert in_process() == pooled()
        time_calls(in_process, 200)
        time_calls(pooled, 200)
        floor: list[float] = []
        ours: list[float] = []
        for _ in range(rounds):
            floor += time_calls(in_process, calls // rounds)
            ours += time_calls(pooled, calls // rounds)
    return {
        "in_process_p50_us": percentile(floor, 0.5) * 1e6,
        "in_process_p99_us": percentile(floor, 0.99) * 1e6,
        "in_process_mean_us": statistics.fmean(floor) * 1e6,
        "pool_p50_us": percentile(ours, 0.5) * 1e6,
        "pool_p99_us": percentile(ours, 0.99) * 1e6,
        "pool_mean_us": statistics.fmean(ours) * 1e6,
        "p50_ratio": percentile(ours, 0.5) / percentile(floor, 0.5),
        "p99_ratio": percentile(ours, 0.99) / percentile(floor, 0.99),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--workload", help="a directory with oidc-mapper.jsonnet and claims.json")
    args = parser.parse_args()
    figures = measure(args.calls, args.workload)
    print(f"{'':28}{'p50 us':>10}{'p99 us':>10}{'mean us':>10}")
    for label, key in (("in-process _gojsonnet", "in_process"), ("WorkerPool (go, 2)", "pool")):
        print(
            f"{label:28}{figures[key + '_p50_us']:10.1f}{figures[key + '_p99_us']:10.1f}"
            f"{figures[key + '_mean_us']:10.1f}"
        )
    print(f"ratio p50 {figures['p50_ratio']:.3f}   ratio p99 {figures['p99_ratio']:.3f}")


if __name__ == "__main__":
    main()
