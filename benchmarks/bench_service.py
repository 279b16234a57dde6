"""The service under load: ``wrk`` against the service and an unsafe in-process app, and a
hostile mix for correctness; recorded in RESULTS.md.

    python -m benchmarks.bench_service [--seconds 5] [--rounds 3] [--connections 16]
                                       [--total 5000] [--no-write]

Throughput: ``wrk`` (C, one thread; installed with apt-get when missing) with 16 keep-alive
connections on 127.0.0.1 against, in turn, the real service (``jsonnet-worker serve`` with
the tests' config: 2 workers, go engine, host Landlock layer on) and a plain Starlette app
that evaluates the same GitHub mapper in-process (``benchmarks/unsafe_app.py``, on the event
loop and in Starlette's thread pool), all under uvicorn with the same logging (no access
log), interleaved in rounds of a bounded duration so that the noise of a shared machine hits
each alike. The ratio is against the faster unsafe variant of the same round.

What bounds the ratio: during every wrk run the CPU time of the server process (all its
threads), of its descendants (the service's workers) and of wrk itself is read, per request.
``GET /livez`` (no evaluation, no pool) gives the HTTP stack's own cost, the same stack the
unsafe app runs on. The report says how much CPU per request the target leaves the service's
own process once the workers and wrk are paid, against what /livez alone takes there, and
the cap the service's process puts on its rate: its CPU is its event loop's (the supervisor
thread idles under load), and the loop is one thread.

Tenants in time, through the service: a victim tenant's GitHub mapper every 10 ms (one
keep-alive connection, at most 300 calls and 10 s), alone and while wrk floods the same
service as another tenant: 16 connections of looping snippets on ``/v1/evaluate`` (each runs
to the pool's timeout), 16 connections of the light mapper as fast as they are answered,
and the same from two tenants in turn; each on a fresh service.
The victim's p50 and p99, as ratios to its own alone in the same run (issue 21's aims: 1.5x
and 3x), and its answers, which must all be 200.

Correctness: the bounded httpx load of ``tests/test_service_load.py`` (one request in 25
hostile: endless loops cut at 0.2 s, errors, refused imports, oversized output, bad and
oversized bodies) must come back with every answer right. httpx in Python needs several times
the server's CPU, so its throughput is not the service's and is not reported as such.

Writes its own section of ``benchmarks/RESULTS.md`` and leaves the rest of the file as is.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import resource
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

from benchmarks.bench_latency import percentile
from benchmarks.bench_tenants import LOOP, TARGET_P50, TARGET_P99
from benchmarks.closed_loop import paced
from jsonnet_worker._pool.processes import process_cpu_seconds
from servicekit import (
    GITHUB_CLAIMS,
    GITHUB_EXPECT,
    LoadResult,
    descendants,
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
TARGET_RATIO = 1.5  # issue 13: the service against the unsafe in-process app
SERVICE = "jsonnet-worker serve (2 workers)"
UNSAFE_LOOP = "unsafe Starlette app, on the event loop"
UNSAFE_POOL = "unsafe Starlette app, in the thread pool"
LIVEZ = "jsonnet-worker serve: GET /livez (no evaluation, no pool)"
# Tenants in time through the service (issue 21): the victim's calls and period, the floods.
VICTIM_CALLS, VICTIM_PERIOD, VICTIM_WINDOW = 300, 0.01, 10.0
FLOOD_WARMUP = 1.0  # the flood runs this long before the victim's first call
FLOOD_CONNECTIONS = 16


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


@dataclass(frozen=True)
class Server:
    """A server under test: where to send requests, and the process whose CPU is counted."""

    name: str
    base_url: str
    pid: int


@dataclass(frozen=True)
class CpuPerRequest:
    """Microseconds of CPU per request over one wrk run."""

    server: float  # the server process, all its threads (the event loop, the supervisor)
    workers: float  # its descendants: the service's workers (0 for the unsafe app)
    wrk: float


@dataclass
class WrkRun:
    target: str
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    bad_responses: int  # non-2xx answers and socket errors: must be 0
    cpu: CpuPerRequest


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _latency_ms(output: str, percent: str) -> float:
    match = re.search(rf"^\s+{percent}%\s+([\d.]+)(us|ms|s)\s*$", output, re.MULTILINE)
    return float(match.group(1)) * _UNITS[match.group(2)] if match else float("nan")


def _cpu_seconds(pids: list[int]) -> dict[int, float]:
    return {pid: seconds for pid in pids if (seconds := process_cpu_seconds(pid)) is not None}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_wrk(
    wrk: str,
    server: Server,
    path: str,
    seconds: float,
    connections: int,
    script: Path | None,
    target: str | None = None,
) -> WrkRun:
    """One wrk run against ``server``; its rate and latency, and the CPU per request of the
    server, of its descendants (workers that end during the run are not counted: rare, and
    then the figure is low) and of wrk (the only child this process waits for meanwhile)."""
    command = [wrk, "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency"]
    if script is not None:
        command += ["-s", str(script)]
    command.append(server.base_url + path)
    server_before = process_cpu_seconds(server.pid) or 0.0
    workers_before = _cpu_seconds(descendants(server.pid))
    wrk_before = _children_cpu()
    done = subprocess.run(command, capture_output=True, text=True, check=True, timeout=seconds + 30)
    wrk_cpu = _children_cpu() - wrk_before
    server_cpu = (process_cpu_seconds(server.pid) or 0.0) - server_before
    workers_after = _cpu_seconds(descendants(server.pid))
    workers_cpu = sum(cpu - workers_before.get(pid, 0.0) for pid, cpu in workers_after.items())
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
    requests = re.search(r"(\d+) requests in", output)
    count = max(1, int(requests.group(1))) if requests else 1
    cpu = CpuPerRequest(server_cpu / count * 1e6, workers_cpu / count * 1e6, wrk_cpu / count * 1e6)
    return WrkRun(
        target or server.name,
        float(rate.group(1)),
        _latency_ms(output, "50"),
        _latency_ms(output, "99"),
        bad,
        cpu,
    )


@contextmanager
def unsafe_app(log_dir: Path, threadpool: bool) -> Iterator[Server]:
    """``benchmarks/unsafe_app.py`` under uvicorn on a free port of 127.0.0.1."""
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
        yield Server(UNSAFE_POOL if threadpool else UNSAFE_LOOP, base_url, process.pid)
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def check_answers(servers: list[Server]) -> None:
    """Every target gives the mapper's right answer before it is measured."""
    for server in servers:
        answer = httpx.post(
            f"{server.base_url}{MAPPER_PATH}",
            content=WRK_BODY,
            headers={"Content-Type": "application/json"},  # as wrk's script sends it
            timeout=10,
        )
        if answer.status_code != 200 or answer.json() != GITHUB_EXPECT:
            raise RuntimeError(
                f"{server.name}: wrong answer {answer.status_code} {answer.text[:200]}"
            )


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


def median_rate(runs: list[WrkRun]) -> float:
    return statistics.median(run.requests_per_second for run in runs)


def median_cpu(runs: list[WrkRun]) -> CpuPerRequest:
    """Each part's median over ``runs`` (one target's)."""
    return CpuPerRequest(
        statistics.median(run.cpu.server for run in runs),
        statistics.median(run.cpu.workers for run in runs),
        statistics.median(run.cpu.wrk for run in runs),
    )


def ceiling(by_target: dict[str, list[WrkRun]], target_ratio: float) -> str:
    """The sentence on what bounds the service's rate, from the medians of the CPU figures."""
    cpus = len(os.sched_getaffinity(0))
    unsafe = max(median_rate(by_target[UNSAFE_LOOP]), median_rate(by_target[UNSAFE_POOL]))
    goal = target_ratio * unsafe
    budget = cpus * 1e6 / goal
    cpu = median_cpu(by_target[SERVICE])
    http = median_cpu(by_target[LIVEZ]).server
    loop_cap = 1e6 / cpu.server  # the service's event loop is one thread
    return (
        f"What bounds it: at {target_ratio:g}x the unsafe app ({goal:,.0f} req/s) the {cpus} "
        f"CPUs give {budget:.0f} µs of CPU per request to everything on them. The workers' "
        f"evaluation takes {cpu.workers:.0f} µs of it and wrk {cpu.wrk:.0f} µs, which leaves "
        f"{budget - cpu.workers - cpu.wrk:.0f} µs for the service's own process, where /livez "
        f"alone (the HTTP stack: no body, no pool) takes {http:.0f} µs. The service's process "
        f"took {cpu.server:.0f} µs per evaluation request ({cpu.server - http:.0f} µs over "
        "/livez: the JSON "
        "API, the pool's asyncio call, the hand-over to a worker), and its event loop is one "
        f"thread: that alone caps it at {loop_cap:,.0f} req/s = {loop_cap / unsafe:.2f}x the "
        "unsafe app."
    )


def lua_post(directory: Path, name: str, body: object) -> Path:
    """A wrk script that POSTs ``body`` as JSON."""
    script = directory / name
    script.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = {json.dumps(json.dumps(body))}\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
    )
    return script


@dataclass
class VictimRow:
    flood: str
    latencies: list[float]  # seconds, sorted
    statuses: dict[int, int]
    flood_summary: str  # what wrk said of the flood ("-" alone)

    def percentile(self, fraction: float) -> float:
        return percentile(self.latencies, fraction)


def victim_calls(base_url: str) -> tuple[list[float], dict[int, int]]:
    """Tenant "victim": the GitHub mapper every ``VICTIM_PERIOD`` (the next call 10 ms after
    the last one started), at most ``VICTIM_CALLS`` calls and ``VICTIM_WINDOW`` seconds, on
    one keep-alive connection: each call's seconds (sorted) and the statuses answered."""
    host, port = base_url.removeprefix("http://").rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    body = json.dumps({"claims": GITHUB_CLAIMS, "tenant": "victim"})
    headers = {"Content-Type": "application/json"}

    def call() -> int:
        connection.request("POST", MAPPER_PATH, body, headers)
        response = connection.getresponse()
        response.read()
        return response.status

    try:
        answered = paced(call, VICTIM_CALLS, VICTIM_PERIOD, VICTIM_WINDOW)
    finally:
        connection.close()
    statuses: dict[int, int] = {}
    for _, status in answered:
        statuses[status] = statuses.get(status, 0) + 1
    latencies = [seconds for seconds, _ in answered]
    return sorted(latencies), statuses


def lua_alternating(directory: Path, name: str, bodies: list[object]) -> Path:
    """A wrk script that POSTs each of ``bodies`` as JSON in turn, request by request."""
    script = directory / name
    literals = ", ".join(json.dumps(json.dumps(body)) for body in bodies)
    script.write_text(
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f"local bodies = {{{literals}}}\n"
        "local turn = 0\n"
        "request = function()\n"
        "  turn = turn % #bodies + 1\n"
        "  return wrk.format(nil, nil, nil, bodies[turn])\n"
        "end\n"
    )
    return script


def tenants_in_time(wrk: str, directory: Path) -> list[VictimRow]:
    """The victim alone, then beside each flood of another tenant (or two), each on a
    fresh service (the tests' config: 2 workers): a flood's calls that its clients left
    behind (the looping ones wait in the queue and run to the pool's timeout) must not
    reach into the next one's figures."""
    looping = lua_post(directory, "looping.lua", {"snippet": LOOP, "tenant": "noisy"})
    light = lua_post(directory, "light.lua", {"claims": GITHUB_CLAIMS, "tenant": "noisy"})
    two_tenants = lua_alternating(
        directory,
        "two-tenants.lua",
        [{"claims": GITHUB_CLAIMS, "tenant": name} for name in ("noisy", "noisier")],
    )
    floods: list[tuple[str, str, Path | None]] = [
        ("nothing (alone)", "", None),
        (f"{FLOOD_CONNECTIONS} connections of looping snippets", "/v1/evaluate", looping),
        (f"{FLOOD_CONNECTIONS} connections of light mappers", MAPPER_PATH, light),
        (
            f"{FLOOD_CONNECTIONS} connections of light mappers, two tenants in turn",
            MAPPER_PATH,
            two_tenants,
        ),
    ]
    rows = []
    for name, path, script in floods:
        with running_service(CONFIG, directory, "--no-access-log") as service:
            victim_calls(service.base_url)  # warm up: the victim's worker and connection
            if script is None:
                rows.append(VictimRow(name, *victim_calls(service.base_url), "-"))
                continue
            rows.append(flooded_row(wrk, service.base_url, name, path, script))
    return rows


def flooded_row(wrk: str, base_url: str, name: str, path: str, script: Path) -> VictimRow:
    """The victim's calls while wrk runs ``script`` against ``path`` (bounded in time)."""
    seconds = FLOOD_WARMUP + VICTIM_WINDOW + 2
    command = [wrk, "-t1", f"-c{FLOOD_CONNECTIONS}", f"-d{seconds:g}s", "-s", str(script)]
    with subprocess.Popen([*command, base_url + path], stdout=subprocess.PIPE, text=True) as flood:
        try:
            time.sleep(FLOOD_WARMUP)
            latencies, statuses = victim_calls(base_url)
            output, _ = flood.communicate(timeout=seconds + 30)
        finally:
            if flood.poll() is None:
                flood.kill()
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    refused = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    summary = (
        f"{float(rate.group(1)) if rate else float('nan'):,.1f} req/s, "
        f"{int(refused.group(1)) if refused else 0} non-2xx"
    )
    return VictimRow(name, latencies, statuses, summary)


def tenants_section(rows: list[VictimRow]) -> list[str]:
    """The tenants-in-time table and its line of targets."""
    alone = rows[0]
    p50_alone, p99_alone = alone.percentile(0.5), alone.percentile(0.99)
    lines = [
        "### Tenants in time, through the service",
        "",
        f'Tenant "victim": POST {MAPPER_PATH} every {VICTIM_PERIOD * 1000:g} ms on one '
        f"keep-alive connection, at most {VICTIM_CALLS} calls and {VICTIM_WINDOW:g} s; tenant "
        f'"noisy": wrk, 1 thread, started {FLOOD_WARMUP:g} s before. Ratios to the victim '
        "alone in this run; the aims are issue 21's (p50 at most "
        f"{TARGET_P50:g}x, p99 at most {TARGET_P99:g}x, every answer 200).",
        "",
        "| noisy tenant does | victim calls | p50 | p99 | p50 / alone | p99 / alone | answers "
        "| noisy tenant (wrk) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    missed = []
    for row in rows:
        p50, p99 = row.percentile(0.5), row.percentile(0.99)
        statuses = ", ".join(f"{code} x{n}" for code, n in sorted(row.statuses.items()))
        lines.append(
            f"| {row.flood} | {len(row.latencies)} | {p50 * 1000:.1f} ms | {p99 * 1000:.1f} ms "
            f"| {p50 / p50_alone:.2f} | {p99 / p99_alone:.2f} | {statuses} | "
            f"{row.flood_summary} |"
        )
        if row is not alone and (
            p50 / p50_alone > TARGET_P50
            or p99 / p99_alone > TARGET_P99
            or set(row.statuses) != {200}
        ):
            missed.append(row.flood)
    lines += [
        "",
        "Aims " + (f"missed beside: {', '.join(missed)}." if missed else "met beside every flood."),
        "",
    ]
    return lines


def section(
    runs: list[list[WrkRun]],
    mix: MixRow,
    seconds: float,
    connections: int,
    tenants: list[VictimRow],
) -> str:
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
        cpu = median_cpu(target_runs)
        rows.append(
            f"| {target} | {median_rate(target_runs):,.0f} | "
            f"{min(target_rates):,.0f}-{max(target_rates):,.0f} | "
            f"{statistics.median(run.p50_ms for run in target_runs):.1f} ms | "
            f"{statistics.median(run.p99_ms for run in target_runs):.1f} ms | "
            f"{cpu.server:.0f} / {cpu.workers:.0f} / {cpu.wrk:.0f} µs | "
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
            "in-process with `_gojsonnet`; both under uvicorn (uvloop, httptools), without an "
            "access log. CPU per request: the server process (all its threads) / its "
            "descendants (the service's workers) / wrk.",
            "",
            "| target | req/s (median) | range | p50 | p99 | CPU per request | bad answers |",
            "| --- | --- | --- | --- | --- | --- | --- |",
            *rows,
            "",
            f"Service / faster unsafe variant, per round: "
            f"{', '.join(f'{ratio:.2f}x' for ratio in ratios)} "
            f"(median {statistics.median(ratios):.2f}x).",
            "",
            ceiling(by_target, TARGET_RATIO),
            "",
            *tenants_section(tenants),
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
        script = lua_post(directory, "post.lua", {"claims": GITHUB_CLAIMS})
        with (
            running_service(CONFIG, directory, "--no-access-log") as service_process,
            unsafe_app(directory, threadpool=False) as unsafe_loop,
            unsafe_app(directory, threadpool=True) as unsafe_pool,
        ):
            service = Server(SERVICE, service_process.base_url, service_process.process.pid)
            servers = [service, unsafe_loop, unsafe_pool]
            check_answers(servers)

            def measure(server: Server, seconds: float) -> list[WrkRun]:
                runs = [run_wrk(wrk, server, MAPPER_PATH, seconds, args.connections, script)]
                if server is service:  # its HTTP stack alone, in the same round
                    runs.append(
                        run_wrk(wrk, server, "/livez", seconds, args.connections, None, LIVEZ)
                    )
                return runs

            for server in servers:  # warm up: caches, pools, JITs of no kind
                measure(server, 1)
            for _ in range(args.rounds):
                round_ = [run for server in servers for run in measure(server, args.seconds)]
                runs.append(round_)
                print(
                    "  ".join(f"{run.target}: {run.requests_per_second:,.0f}/s" for run in round_),
                    flush=True,
                )
            check_answers(servers)
            mix = hostile_mix(service.base_url, args.total)
        tenants = tenants_in_time(wrk, directory)
    text = section(runs, mix, args.seconds, args.connections, tenants)
    print(text)
    bad = sum(run.bad_responses for round_ in runs for run in round_)
    for failure in mix.result.failures[:10]:
        print("FAILED:", failure)
    if not args.no_write:
        write_section(text)
    victim_errors = sum(n for row in tenants for code, n in row.statuses.items() if code != 200)
    return 1 if mix.result.failures or bad or victim_errors else 0


if __name__ == "__main__":
    sys.exit(main())
