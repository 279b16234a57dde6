"""The bounded load test: 5,000 requests at concurrency 32 against the real service, with
hostile snippets mixed in; every benign request must succeed with the right answer. No timing
is asserted (``benchmarks/bench_service.py`` records p50/p99)."""

from __future__ import annotations

from pathlib import Path

from conftest import DATA
from servicekit import run_load, running_service

TOTAL = 5000
CONCURRENCY = 32
HOSTILE_EVERY = 25  # 200 hostile requests: loops, errors, imports, huge output, bad bodies


def test_load_with_hostile_snippets_mixed_in(tmp_path: Path) -> None:
    with running_service(DATA / "service" / "config.yaml", tmp_path) as running:
        result = run_load(running.base_url, TOTAL, CONCURRENCY, HOSTILE_EVERY, time_limit=300)
        health = running.health()
    assert result.failures == []
    assert result.hostile == TOTAL // HOSTILE_EVERY
    assert len(result.benign_latencies) == TOTAL - result.hostile
    pool = health["pool"]
    assert pool["timeouts"] >= result.hostile // 8  # the looping snippets were cut off
    assert pool["alive"] >= 1 and health["status"] == "ok"
