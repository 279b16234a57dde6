"""The service under load: ``wrk`` against the service and an unsafe in-process app, and a
hostile mix for correctness; recorded in RESULTS.md.

    python -m benchmarks.bench_service [--seconds 5] [--rounds 3] [--connections 16]
                                       [--total 5000] [--no-write]

Throughput: ``wrk`` (C, one thread; installed with apt-get when missing) with 16 keep-alive
connections on 127.0.0.1 against, in turn, the real service (``jsonnet-worker serve`` with
the tests' config: 2 workers, go engine, host Landlock layer on) and a plain Starlette app
that evaluates the same GitHub mapper in-process (``benchmarks/unsafe_app.py``, on the event
loop and in Starlette's thread pool), all under uvicorn, interleaved in rounds of a bounded
duration so that the noise of a shared machine hits each alike. The ratio is against the
faster unsafe variant of the same round.

Correctness: the bounded httpx load of ``tests/test_service_load.py`` (one request in 25
hostile: endless loops cut at 0.2 s, errors, refused imports, oversized output, bad and
oversized bodies) must come back with every answer right. httpx in Python needs several times
the server's CPU, so its throughput is not the service's and is not reported as such.

Writes its own section of ``benchmarks/RESULTS.md`` and leaves the rest of the file as is.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import httpx
from prometheus_client.parser import text_string_to_metric_families

from servicekit import (
    GITHUB_CLAIMS,
    GITHUB_EXPECT,
    LoadResult,
    free_port,
    run_load,
    running_service,
)

RESULTS = Path(__file__).with_name("RESULTS.md")
ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "tests" / "data" / "service" / "config.yaml"
HEADING = "## Service load test (`jsonnet-worker serve`)"
MAPPER_PATH = "/v1/mappers/github"
WRK_BODY = json.dumps({"claims": GITHUB_CLAIMS})
START_TIMEOUT = 60.0


# -- wrk ------------------------------------------------------------------------------------


def ensure_wrk() -> str:
    """The wrk binary; installed from the distribution's package when missing."""
    found = shutil.which("wrk")
    if found:
        return found
    apt = shutil.which("apt-get")
    if apt is None:
        raise SystemExit("wrk is missing and there is no apt-get to install it: install wrk")
    prefix = [] if os.geteuid() == 0 else ["sudo", "-n"]
    print("installing wrk with apt-get ...", flush=True)
    subprocess.run([*prefix, apt, "install", "-y", "-q", "wrk"], check=True)
    found = shutil.which("wrk")
    if not found:
        raise SystemExit("apt-get install wrk did not provide a wrk binary")
    return found


@dataclass
class WrkRun:
    target: str
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    bad_responses: int  # non-2xx answers and socket errors: must be 0


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _latency_ms(output: str, percent: str) -> float:
    match = re.search(rf"^\s+{percent}%\s+([\d.]+)(us|ms|s)\s*$", output, re.MULTILINE)
    return float(match.group(1)) * _UNITS[match.group(2)] if match else float("nan")


def run_wrk(
    wrk: str, target: str, url: str, seconds: float, connections: int, script: Path | None
) -> WrkRun:
    command = [wrk, "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", url]
    if script is not None:
        command[1:1] = ["-s", str(script)]
    done = subprocess.run(command, capture_output=True, text=True, check=True, timeout=seconds + 30)
    output = done.stdout
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if rate is None:
        raise RuntimeError(f"unexpected wrk output:\n{output}\n{done.stderr}")
    bad = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", output))
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if errors:
        bad += sum(int(n) for n in errors.groups())
    return WrkRun(
        target, float(rate.group(1)), _latency_ms(output, "50"), _latency_ms(output, "99"), bad
    )


def post_script(directory: Path) -> Path:
    script = directory / "post.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = {json.dumps(WRK_BODY)}\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
    )
    return script


@contextmanager
def unsafe_app(log_dir: Path, threadpool: bool) -> Iterator[str]:
    """``benchmarks/unsafe_app.py`` under uvicorn on a free port of 127.0.0.1; its base URL."""
    port = free_port()
    environment = {**os.environ, "UNSAFE_THREADPOOL": "1" if threadpool else "0"}
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "benchmarks.unsafe_app:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--no-access-log",
    ]
    log_path = log_dir / f"unsafe-{port}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, cwd=ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the unsafe app exited:\n{log_path.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("the unsafe app did not start") from None
                time.sleep(0.05)
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def check_answers(urls: dict[str, str]) -> None:
    """Every target gives the mapper's right answer before it is measured."""
    for target, base_url in urls.items():
        answer = httpx.post(f"{base_url}{MAPPER_PATH}", content=WRK_BODY, timeout=10)
        if answer.status_code != 200 or answer.json() != GITHUB_EXPECT:
            raise RuntimeError(f"{target}: wrong answer {answer.status_code} {answer.text[:200]}")


# -- the httpx hostile mix (correctness) ------------------------------------------------------


@dataclass
class MixRow:
    mix: str
    result: LoadResult
    server_mean: float  # seconds per evaluation request inside the service (from /metrics)


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


def hostile_mix(base_url: str, total: int) -> MixRow:
    seconds, count = evaluation_time(base_url)
    load = run_load(base_url, total, 32, 25, time_limit=600)
    seconds_after, count_after = evaluation_time(base_url)
    server_mean = (seconds_after - seconds) / max(1.0, count_after - count)
    return MixRow("1 in 25 hostile, 32 at a time", load, server_mean)


# -- the report -------------------------------------------------------------------------------

SERVICE = "jsonnet-worker serve (2 workers)"
UNSAFE_LOOP = "unsafe Starlette app, on the event loop"
UNSAFE_POOL = "unsafe Starlette app, in the thread pool"
HEALTHZ = "jsonnet-worker serve: GET /healthz (no evaluation)"


def section(runs: list[list[WrkRun]], mix: MixRow, seconds: float, connections: int) -> str:
    by_target: dict[str, list[WrkRun]] = {}
    for round_ in runs:
        for run in round_:
            by_target.setdefault(run.target, []).append(run)
    ratios = []
    for round_ in runs:
        rates = {run.target: run.requests_per_second for run in round_}
        ratios.append(rates[SERVICE] / max(rates[UNSAFE_LOOP], rates[UNSAFE_POOL]))
    rows = []
    for target, target_runs in by_target.items():
        target_rates = [run.requests_per_second for run in target_runs]
        rows.append(
            f"| {target} | {statistics.median(target_rates):,.0f} | "
            f"{min(target_rates):,.0f}-{max(target_rates):,.0f} | "
            f"{statistics.median(run.p50_ms for run in target_runs):.1f} ms | "
            f"{statistics.median(run.p99_ms for run in target_runs):.1f} ms | "
            f"{sum(run.bad_responses for run in target_runs)} |"
        )
    result = mix.result
    return "\n".join(
        [
            HEADING,
            "",
            "`python -m benchmarks.bench_service`. Machine: "
            f"{platform.machine()}, {len(os.sched_getaffinity(0))} CPUs shared by wrk, the "
            "servers and the service's workers (and by whatever else runs on the machine: "
            "compare the ratios of one round, not runs).",
            "",
            "### Throughput under wrk",
            "",
            f"wrk, 1 thread, {connections} keep-alive connections, {seconds:g} s per target and "
            f"round, {len(runs)} rounds interleaved, POST {MAPPER_PATH} with GitHub claims, on "
            "127.0.0.1. The service runs the tests' config (2 workers, go engine, host Landlock "
            "layer on); the unsafe app (`benchmarks/unsafe_app.py`) evaluates the same mapper "
            "in-process with `_gojsonnet`; both under uvicorn (uvloop, httptools).",
            "",
            "| target | req/s (median) | range | p50 | p99 | bad answers |",
            "| --- | --- | --- | --- | --- | --- |",
            *rows,
            "",
            f"Service / faster unsafe variant, per round: "
            f"{', '.join(f'{ratio:.2f}x' for ratio in ratios)} "
            f"(median {statistics.median(ratios):.2f}x).",
            "",
            "### Correctness under a hostile mix (httpx)",
            "",
            f"{result.sent:,} requests, 32 at a time, one in 25 hostile (endless loops cut at "
            "0.2 s, errors, refused imports, 1 MB outputs refused, bad and oversized bodies): "
            f"{len(result.failures)} wrong answers; {len(result.benign_latencies):,} benign "
            f"requests right; mean time inside the service {mix.server_mean * 1000:.1f} ms per "
            "request (from /metrics). The client is pure Python on the same 2 CPUs and needs "
            "several times the server's CPU, so its rate is the client's, not the service's.",
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
    parser.add_argument("--seconds", type=float, default=5.0, help="per target and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--total", type=int, default=5000, help="requests of the hostile mix")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    wrk = ensure_wrk()
    runs: list[list[WrkRun]] = []
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch)
        script = post_script(directory)
        with (
            running_service(CONFIG, directory) as service,
            unsafe_app(directory, threadpool=False) as unsafe_loop,
            unsafe_app(directory, threadpool=True) as unsafe_pool,
        ):
            urls = {SERVICE: service.base_url, UNSAFE_LOOP: unsafe_loop, UNSAFE_POOL: unsafe_pool}
            check_answers(urls)
            for target, base_url in urls.items():  # warm up: caches, pools, JITs of no kind
                run_wrk(wrk, target, base_url + MAPPER_PATH, 1, args.connections, script)
            for _ in range(args.rounds):
                round_ = [
                    run_wrk(
                        wrk, target, base_url + MAPPER_PATH, args.seconds, args.connections, script
                    )
                    for target, base_url in urls.items()
                ]
                round_.append(
                    run_wrk(
                        wrk,
                        HEALTHZ,
                        service.base_url + "/healthz",
                        args.seconds,
                        args.connections,
                        None,
                    )
                )
                runs.append(round_)
                print(
                    "  ".join(f"{run.target}: {run.requests_per_second:,.0f}/s" for run in round_),
                    flush=True,
                )
            check_answers(urls)
            mix = hostile_mix(service.base_url, args.total)
    text = section(runs, mix, args.seconds, args.connections)
    print(text)
    bad = sum(run.bad_responses for round_ in runs for run in round_)
    for failure in mix.result.failures[:10]:
        print("FAILED:", failure)
    if not args.no_write:
        write_section(text)
    return 1 if mix.result.failures or bad else 0


if __name__ == "__main__":
    sys.exit(main())
