"""Regression guard for performance: fails only on gross regressions, measured as a ratio
against in-process evaluation in the same run (never absolute times: machines are noisy).
The real figures come from ``python -m benchmarks.run``."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from bench_latency import measure

GROSS_REGRESSION = 3.0  # the pool's sequential p50 against in-process _gojsonnet


def test_pool_is_not_grossly_slower_than_in_process() -> None:
    figures = measure(calls=1000, workload=None, rounds=5)
    print(
        f"\nsequential p50: in-process {figures['in_process_p50_us']:.0f} us, "
        f"pool {figures['pool_p50_us']:.0f} us, ratio {figures['p50_ratio']:.2f}"
    )
    assert figures["p50_ratio"] < GROSS_REGRESSION, figures
