"""The service under load: the bounded load test's p50/p99, recorded in RESULTS.md.

    python -m benchmarks.bench_service [--total 5000] [--concurrency 32] [--no-write]

Starts the real service (``jsonnet-worker serve`` with the tests' config: 2 workers, the
host sandbox on) on 127.0.0.1, sends the same load as ``tests/test_service_load.py`` (one
request in 25 hostile: endless loops cut at 0.2 s, errors, refused imports, oversized output,
bad and oversized bodies) and reports the latency of the benign requests as the client saw it
(HTTP included), with the client on the same 2 CPUs as the server and its workers. Writes
its own section of ``benchmarks/RESULTS.md`` and leaves the rest of the file as it is.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import httpx
from prometheus_client.parser import text_string_to_metric_families

from servicekit import LoadResult, run_load, running_service

RESULTS = Path(__file__).with_name("RESULTS.md")
CONFIG = Path(__file__).resolve().parent.parent / "tests" / "data" / "service" / "config.yaml"
HEADING = "## Service load test (`jsonnet-worker serve`)"


@dataclass
class Row:
    mix: str
    result: LoadResult
    server_mean: float  # seconds per evaluation request inside the service (from /metrics)
    server_cpu: float
    client_cpu: float


def evaluation_time(base_url: str) -> tuple[float, float]:
    """The service's own latency histogram: (sum of seconds, count) over all endpoints."""
    total = count = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{base_url}/metrics").text):
        for sample in family.samples:
            if sample.name.endswith("request_duration_seconds_sum"):
                total += sample.value
            elif sample.name.endswith("request_duration_seconds_count"):
                count += sample.value
    return total, count


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def section(rows: list[Row], total: int, concurrency: int) -> str:
    lines = [
        f"| {row.mix} | {len(row.result.benign_latencies):,} | {len(row.result.failures)} | "
        f"{row.result.hostile} | {row.result.percentile(0.50) * 1000:.1f} ms | "
        f"{row.result.percentile(0.99) * 1000:.1f} ms | "
        f"{row.result.sent / row.result.elapsed:,.0f} req/s | {row.server_mean * 1000:.1f} ms | "
        f"{row.client_cpu / row.server_cpu:.1f} |"
        for row in rows
    ]
    return "\n".join(
        [
            HEADING,
            "",
            f"`python -m benchmarks.bench_service`: {total:,} HTTP requests at concurrency "
            f"{concurrency} (httpx, keep-alive) against the real service on 127.0.0.1 (the "
            "tests' config: 2 workers, go engine, host Landlock layer on); the benign requests "
            "cycle over a mapper, a template and an ad-hoc snippet. Latency is the client's "
            "(HTTP included) for benign requests. Machine: "
            f"{platform.machine()}, {len(os.sched_getaffinity(0))} CPUs shared by the client, "
            "the server and its workers. All rows come from one run.",
            "",
            "| mix | benign requests | failed | hostile | p50 | p99 | throughput | "
            "mean inside the service | client CPU / server CPU |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            *lines,
            "",
            "The hostile requests (endless loops cut at 0.2 s, errors, refused imports, 1 MB "
            "outputs refused, bad and oversized bodies) each cost a worker up to 0.2 s and a "
            'respawn, which is what moves p99. "Mean inside the service" is the service\'s '
            "own latency histogram (pool queue, worker, answer), from /metrics: the rest of "
            "the client's latency is HTTP and the client itself. The load generator (httpx "
            "async, pure Python) needs several times the server's CPU on the same 2 CPUs, so "
            "at concurrency 32 it, not the service, bounds the throughput; the p50/p99 here "
            "are an upper bound for a client on another machine.",
            "",
        ]
    )


def write_section(text: str) -> None:
    """Replace this benchmark's section in RESULTS.md (up to the next ``## ``), or append it."""
    current = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    start = current.find(HEADING)
    if start < 0:
        RESULTS.write_text(current.rstrip("\n") + "\n\n" + text)
        return
    end = current.find("\n## ", start + len(HEADING))
    rest = "" if end < 0 else current[end + 1 :]
    RESULTS.write_text(current[:start] + text + ("\n" + rest if rest else ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--total", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    mixes = [
        (f"1 in 25 hostile, {args.concurrency} at a time", args.concurrency, 25),
        (f"benign only, {args.concurrency} at a time", args.concurrency, 0),
        ("benign only, one at a time", 1, 0),
    ]
    rows = []
    with tempfile.TemporaryDirectory() as logs:
        with running_service(CONFIG, Path(logs)) as service:
            for mix, concurrency, hostile_every in mixes:
                seconds, count = evaluation_time(service.base_url)
                server_cpu, client_cpu = cpu_seconds(service.process.pid), time.process_time()
                load = run_load(
                    service.base_url, args.total, concurrency, hostile_every, time_limit=600
                )
                server_cpu = cpu_seconds(service.process.pid) - server_cpu
                client_cpu = time.process_time() - client_cpu
                seconds_after, count_after = evaluation_time(service.base_url)
                server_mean = (seconds_after - seconds) / max(1.0, count_after - count)
                rows.append(Row(mix, load, server_mean, server_cpu, client_cpu))
    text = section(rows, args.total, args.concurrency)
    print(text)
    failures = [failure for row in rows for failure in row.result.failures]
    for failure in failures[:10]:
        print("FAILED:", failure)
    if not args.no_write:
        write_section(text)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
