"""Run every benchmark side by side in one run and write benchmarks/RESULTS.md.

    python -m benchmarks.run [--quick] [--no-write]

Ratios are against in-process ``_gojsonnet`` (the floor: fastest, and unsafe) measured in the
same run; on these noisy machines only ratios from one run compare. ``--quick`` runs fewer
calls (for a smoke check), and ``--no-write`` only prints.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import resource
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import _gojsonnet

from benchmarks import (
    bench_bounds,
    bench_cli,
    bench_libraries,
    bench_tenants,
    closed_loop,
    workloads,
)
from benchmarks.bench_latency import percentile as pct
from benchmarks.bench_latency import time_calls as samples
from benchmarks.contenders import Contender, InProcess, PebblePool, Pool, ProcessPool
from benchmarks.workloads import Workload
from jsonnet_worker import EvaluationTimeout, WorkerPool
from jsonnet_worker._worker import capi
from tests import seams

RESULTS = Path(__file__).with_name("RESULTS.md")
SERVICE_HEADING = "## Service load test"
HEAVY_LOOP = (
    # CPU only (seconds of work, a flat heap): a memory bomb could end in
    # MemoryLimitExceeded before the deadline.
    "local depth(i) = if i == 0 then 0 else 1 + depth(i - 1); "
    "std.foldl(function(a, b) a + depth(400), std.range(1, 1000000), 0)"
)


@dataclass
class Report:
    sections: list[tuple[str, list[str], list[list[str]]]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def table(self, title: str, header: list[str], rows: list[list[str]]) -> None:
        self.sections.append((title, header, rows))
        print(f"\n## {title}")
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        for row in [header, *rows]:
            print(
                "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True))
            )

    def markdown(self) -> str:
        out = []
        for title, header, rows in self.sections:
            out += [f"## {title}", "", "| " + " | ".join(header) + " |"]
            out.append("|" + "---|" * len(header))
            out += ["| " + " | ".join(row) + " |" for row in rows]
            out.append("")
        return "\n".join(out)


def us(seconds: float) -> str:
    return f"{seconds * 1e6:.0f}"


def interleaved(
    contenders: list[Contender], workload: Workload, count: int, rounds: int = 5
) -> dict[str, list[float]]:
    """Per-call timings, contenders interleaved in rounds so drift hits all alike."""
    for contender in contenders:
        samples(lambda c=contender: c.call(workload), max(5, count // 20))  # type: ignore[misc]
    timings: dict[str, list[float]] = {c.name: [] for c in contenders}
    for _ in range(rounds):
        for contender in contenders:
            timings[contender.name] += samples(
                lambda c=contender: c.call(workload),  # type: ignore[misc]
                max(1, count // rounds),
            )
    return timings


def throughput(call: Callable[[], object], callers: int, seconds: float) -> float:
    """Calls per second with ``callers`` threads calling in a closed loop."""
    return closed_loop.bounded_rate(call, callers, seconds)


def rss_kib(pid: int, field_name: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


def machine() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"{len(os.sched_getaffinity(0))} CPUs ({model}), Linux {platform.release()}, "
        f"Python {platform.python_version()}, go-jsonnet {_gojsonnet.version}, "
        f"{time.strftime('%Y-%m-%d')}"
    )


def sequential_latency(report: Report, quick: bool) -> dict[str, float]:
    go_floor = InProcess("go")
    contenders: list[Contender] = [go_floor, Pool("go"), ProcessPool(), PebblePool()]
    figures: dict[str, float] = {}
    try:
        for workload in (workloads.light(), workloads.courier(), workloads.heavy()):
            count = 300 if quick else (3000 if "light" in workload.name else 1000)
            timings = interleaved(contenders, workload, count)
            floor = timings[go_floor.name]
            rows = []
            for name, times in timings.items():
                rows.append(
                    [
                        name,
                        us(pct(times, 0.5)),
                        us(pct(times, 0.99)),
                        f"{pct(times, 0.5) / pct(floor, 0.5):.2f}",
                        f"{pct(times, 0.99) / pct(floor, 0.99):.2f}",
                    ]
                )
                figures[f"{workload.name}|{name}|p50"] = pct(times, 0.5) / pct(floor, 0.5)
                figures[f"{workload.name}|{name}|p99"] = pct(times, 0.99) / pct(floor, 0.99)
            report.table(
                f"Sequential latency: {workload.name}",
                ["contender", "p50 µs", "p99 µs", "p50 ratio", "p99 ratio"],
                rows,
            )
    finally:
        for contender in contenders:
            contender.close()
    slow: list[Contender] = [InProcess("cpp"), Pool("cpp")]
    try:
        timings = interleaved(slow, workloads.light(), 20 if quick else 60, rounds=2)
        base = timings[slow[0].name]
        report.table(
            "Sequential latency, C++ engine (a new VM per call): light OIDC mapper",
            ["contender", "p50 µs", "p99 µs", "p50 ratio vs in-process _jsonnet"],
            [
                [
                    name,
                    us(pct(t, 0.5)),
                    us(pct(t, 0.99)),
                    f"{pct(t, 0.5) / pct(base, 0.5):.2f}",
                ]
                for name, t in timings.items()
            ],
        )
    finally:
        for contender in slow:
            contender.close()
    return figures


def throughputs(report: Report, quick: bool) -> dict[str, float]:
    """Closed-loop rates, every contender alive at once and measured in turn in rounds (so
    drift on a noisy machine hits all alike); each figure is the median of its rounds."""
    seconds, rounds = (1.0, 1) if quick else (2.0, 3)
    figures: dict[str, float] = {}
    for workload in (workloads.light(), workloads.heavy()):
        floor = InProcess("go")
        peers: list[Contender] = [ProcessPool(2), PebblePool(2)]
        pools = {size: Pool("go", size) for size in (1, 2, 4)}
        runs: list[tuple[str, Contender, int]] = [("single", floor, 1)]
        runs += [(f"peer{index}", peer, 4) for index, peer in enumerate(peers)]
        runs += [
            (f"pool{size}|callers{callers}", pool, callers)
            for size, pool in pools.items()
            for callers in (1, 2, 4)
        ]
        measured: dict[str, list[float]] = {key: [] for key, _, _ in runs}
        try:
            for _ in range(rounds):
                for key, contender, callers in runs:
                    call = partial(contender.call, workload)
                    measured[key].append(throughput(call, callers, seconds))
        finally:
            for contender in [*peers, *pools.values()]:
                contender.close()
        rate = {key: statistics.median(values) for key, values in measured.items()}
        single = rate["single"]
        rows = [[floor.name, "1", "-", f"{single:.0f}", "1.00"]]
        for index, peer in enumerate(peers):
            peer_rate = rate[f"peer{index}"]
            rows.append([peer.name, "4", "2", f"{peer_rate:.0f}", f"{peer_rate / single:.2f}"])
        for size, pool in pools.items():
            for callers in (1, 2, 4):
                pool_rate = rate[f"pool{size}|callers{callers}"]
                rows.append(
                    [
                        pool.name,
                        str(callers),
                        str(size),
                        f"{pool_rate:.0f}",
                        f"{pool_rate / single:.2f}",
                    ]
                )
                figures[f"{workload.name}|pool{size}|callers{callers}"] = pool_rate
        executor_rate = rate["peer0"]  # ProcessPoolExecutor: the targets' peer
        figures[f"{workload.name}|single"] = single
        figures[f"{workload.name}|executor"] = executor_rate
        best2 = max(figures[f"{workload.name}|pool2|callers{c}"] for c in (1, 2, 4))
        report.notes.append(
            f"{workload.name}: pool of 2 at best {best2:.0f}/s = {best2 / single:.2f}x "
            f"in-process single-thread, {best2 / executor_rate:.2f}x ProcessPoolExecutor "
            f"(2 workers, 4 callers); medians of {rounds} interleaved rounds of {seconds:g} s"
        )
        report.table(
            f"Throughput: {workload.name}",
            ["contender", "callers", "workers", "calls/s", "vs in-process 1 thread"],
            rows,
        )
    return figures


def scaling(report: Report, quick: bool) -> None:
    floor = InProcess("go")
    pool = Pool("go")
    rows = []
    try:
        cases = [workloads.sized_input(size) for size in (1_000, 10_000, 100_000, 1_000_000)]
        cases += [workloads.sized_output(size) for size in (1_000, 10_000, 100_000, 900_000)]
        for workload in cases:
            count = 40 if quick else 200
            timings = interleaved([floor, pool], workload, count, rounds=2)
            a, b = timings[floor.name], timings[pool.name]
            rows.append(
                [
                    workload.name,
                    us(pct(a, 0.5)),
                    us(pct(b, 0.5)),
                    f"{pct(b, 0.5) / pct(a, 0.5):.2f}",
                ]
            )
    finally:
        pool.close()
    report.table(
        "Cost by input and output size (p50)",
        ["workload", "in-process µs", "pool µs", "ratio"],
        rows,
    )


def engine_path(report: Report, quick: bool) -> None:
    """The evaluation itself, in this process (no sandbox, no IPC): the binding, which
    builds a VM and parses the snippet on every call, against the C API path the workers
    use (``_worker.capi``: a VM per cached snippet, parsed once), with a fresh ``claims`` text each
    call so no value can be reused."""
    engine = capi.CapiEngine(capi.bind(_gojsonnet.__file__))
    rows = []
    for workload in (workloads.light(), workloads.courier(), workloads.heavy()):
        count = 100 if quick else 600
        variants = [
            {**workload.ext_codes, key: value + " " * (i % 7)}
            for i in range(count)
            for key, value in list(workload.ext_codes.items())[:1]
        ] or [workload.ext_codes] * count

        def binding(codes: dict[str, str], w: Workload = workload) -> str:
            result: str = _gojsonnet.evaluate_snippet(
                w.filename, w.snippet, ext_codes=codes, tla_codes=w.tla_codes
            )
            return result

        def cached(codes: dict[str, str], w: Workload = workload) -> str:
            return w.evaluate_capi(engine, codes)

        started = time.perf_counter()
        first = cached(variants[0])
        first_call = time.perf_counter() - started
        started = time.perf_counter()
        second = cached(variants[0])
        second_call = time.perf_counter() - started
        assert first == second == binding(variants[0])
        timings: dict[str, list[float]] = {"binding": [], "capi": []}
        for round_ in range(5):
            for name, call in (("binding", binding), ("capi", cached)):
                chunk = variants[round_::5]
                for codes in chunk:
                    began = time.perf_counter()
                    call(codes)
                    timings[name].append(time.perf_counter() - began)
        b50, c50 = pct(timings["binding"], 0.5), pct(timings["capi"], 0.5)
        rows.append(
            [
                workload.name,
                us(b50),
                us(first_call),
                us(second_call),
                us(c50),
                f"{c50 / b50:.2f}",
            ]
        )
    stats = engine.stats
    report.table(
        "Engine path: the evaluation alone, in this process",
        [
            "workload",
            "binding p50 µs",
            "C API 1st call µs (direct)",
            "2nd call µs (parse into the cache)",
            "cached p50 µs",
            "cached / binding",
        ],
        rows,
    )
    report.notes.append(
        f"C API path cache over that run: {stats.hits} hits, {stats.misses} misses, "
        f"{stats.evictions} evictions, {stats.direct_reruns} direct re-runs"
    )


def lifecycle(report: Report, quick: bool) -> None:
    repeats = 3 if quick else 7
    cold = []
    for _ in range(repeats):
        started = time.perf_counter()
        pool = WorkerPool(2)
        cold.append(time.perf_counter() - started)
        pool.close()
    with WorkerPool(2, timeout=0.2) as pool:
        late = []
        for _ in range(repeats):
            started = time.perf_counter()
            try:
                pool.evaluate(HEAVY_LOOP)
            except EvaluationTimeout:
                late.append(time.perf_counter() - started - 0.2)
            wait_full(pool)
        refill = []
        for _ in range(repeats):
            wait_quiet(pool)
            victim = active_worker(pool)
            started = time.perf_counter()
            os.kill(victim, signal.SIGKILL)
            wait_full(pool, exclude=victim)
            refill.append(time.perf_counter() - started)
        pid = pool.stats().worker_pids[0]
        idle = rss_kib(pid, "VmRSS")
        heavy = workloads.heavy()
        for _ in range(200):
            pool.evaluate_json(heavy.snippet, ext_codes=heavy.ext_codes)
        peak = max(rss_kib(p, "VmHWM") for p in pool.stats().worker_pids)
        light = workloads.light()
        before = resource.getrusage(resource.RUSAGE_SELF)
        calls = 500 if quick else 3000
        for _ in range(calls):
            pool.evaluate_json(light.snippet, ext_codes=light.ext_codes)
        after = resource.getrusage(resource.RUSAGE_SELF)
        parent_cpu = (after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) / calls
    floor = InProcess("go")
    before = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(calls):
        floor.call(light)
    after = resource.getrusage(resource.RUSAGE_SELF)
    inproc_cpu = (after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) / calls
    report.table(
        "Pool life cycle",
        ["figure", "median", "max", "target"],
        [
            [
                "pool of 2 ready (cold start)",
                f"{statistics.median(cold) * 1e3:.0f} ms",
                f"{max(cold) * 1e3:.0f} ms",
                "≤ 150 ms",
            ],
            [
                "deadline → EvaluationTimeout",
                f"{statistics.median(late) * 1e3:.1f} ms",
                f"{max(late) * 1e3:.1f} ms",
                "≤ 20 ms",
            ],
            [
                "kill → full capacity",
                f"{statistics.median(refill) * 1e3:.0f} ms",
                f"{max(refill) * 1e3:.0f} ms",
                "≤ 50 ms",
            ],
            ["idle worker RSS", f"{idle / 1024:.1f} MB", "", "≤ 25 MB"],
            ["peak worker RSS (heavy mapper)", f"{peak / 1024:.1f} MB", "", ""],
            [
                "parent CPU per call (light)",
                f"{parent_cpu * 1e6:.0f} µs",
                f"in-process: {inproc_cpu * 1e6:.0f} µs",
                "",
            ],
        ],
    )


def wait_full(pool: WorkerPool, exclude: int | None = None, timeout: float = 10.0) -> None:
    """Until ``pool.size`` workers serve calls again, none of them ``exclude`` (a spare
    being restarted in the background is not capacity)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = pool.stats()
        if stats.alive == pool.size and exclude not in stats.worker_pids:
            return
        time.sleep(0.0005)
    raise RuntimeError("the pool did not get back to full size")


def wait_quiet(pool: WorkerPool, timeout: float = 10.0) -> None:
    """Until the pool's spares are started too."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = pool.stats()
        if stats.alive == pool.size and stats.spares == pool.spares and not stats.starting:
            return
        time.sleep(0.001)
    raise RuntimeError("the pool did not settle")


def active_worker(pool: WorkerPool) -> int:
    """The pid of an idle worker serving calls (not the spare)."""
    return seams.worker_pids(pool, "idle")[0]


def layer_costs(quick: bool) -> str:
    """benchmarks/bench_layers.py's output: what seccomp, the privilege drop and the limits
    add to a worker's start and to a call."""
    script = Path(__file__).with_name("bench_layers.py")
    arguments = ["--starts", "5", "--calls", "300"] if quick else []
    done = subprocess.run(
        [sys.executable, str(script), *arguments], capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def service_ratio(quick: bool, write: bool) -> tuple[float, str]:
    """benchmarks/bench_service.py in a subprocess (it writes its own section of RESULTS.md):
    the service's req/s over the unsafe in-process app's under wrk, median of its rounds; and
    the per-round ratios, with the cap its event loop puts on the rate."""
    arguments = ["--seconds", "2", "--rounds", "2", "--total", "500"] if quick else []
    if not write:
        arguments.append("--no-write")
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_service", *arguments],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    found = re.search(r"per round: (.*) \(median ([\d.]+)x\)", done.stdout)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"bench_service failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    capped = re.search(r"caps it at ([\d,]+ req/s = [\d.]+x) the unsafe app", done.stdout)
    bound = f"; its event loop alone caps it at {capped.group(1)}" if capped else ""
    return float(found.group(2)), found.group(1) + bound


def targets(
    report: Report, latency: dict[str, float], rates: dict[str, float], service: float
) -> None:
    """Issue 13's targets, each against what this run measured."""
    light, heavy = workloads.light().name, workloads.heavy().name
    pool = "jsonnet_worker pool (go, 2)"
    best_light = max(rates[f"{light}|pool2|callers{c}"] for c in (1, 2, 4))
    best_heavy = max(rates[f"{heavy}|pool2|callers{c}"] for c in (1, 2, 4))
    rows = [
        ("light mapper sequential p50 vs in-process", latency[f"{light}|{pool}|p50"], 0.90, "≤"),
        ("light mapper sequential p99 vs in-process", latency[f"{light}|{pool}|p99"], 1.20, "≤"),
        (
            "light mapper, pool of 2, vs in-process 1 thread",
            best_light / rates[f"{light}|single"],
            1.6,
            "≥",
        ),
        (
            "light mapper, pool of 2, vs ProcessPoolExecutor",
            best_light / rates[f"{light}|executor"],
            3.0,
            "≥",
        ),
        (
            "heavy mapper, pool of 2, vs in-process 1 thread",
            best_heavy / rates[f"{heavy}|single"],
            1.8,
            "≥",
        ),
        ("service vs unsafe in-process Starlette app (wrk, 16 connections)", service, 1.5, "≥"),
    ]
    report.table(
        "Targets (issue 13)",
        ["figure", "measured", "target", "met"],
        [
            [
                name,
                f"{value:.2f}x",
                f"{sign} {goal:.2f}x",
                "yes" if (value <= goal if sign == "≤" else value >= goal) else "no",
            ]
            for name, value, goal, sign in rows
        ],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls: a smoke run")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="a checkout of this package (the code before issue 21): one tenant's throughput "
        "is compared with it in this run (bench_tenants --baseline)",
    )
    args = parser.parse_args()
    report = Report()
    print(machine())
    latency = sequential_latency(report, args.quick)
    rates = throughputs(report, args.quick)
    engine_path(report, args.quick)
    bounds, floor, call_cpu = bench_bounds.measure(300 if args.quick else 3000)
    report.table("What bounds the light mapper's sequential call", bench_bounds.HEADER, bounds)
    report.notes.append(floor)
    scaling(report, args.quick)
    lifecycle(report, args.quick)
    bench_tenants.run(report, args.quick, args.baseline)  # issue 21: a victim tenant beside floods
    bench_cli.run(report, args.quick)  # issue 23: the command line's eval, one process each
    bench_libraries.run(report, args.quick)  # issue 24: imports from memory, warm and first
    service, per_round = service_ratio(args.quick, not args.no_write)
    report.notes.append(f"service / unsafe in-process app under wrk, per round: {per_round}")
    targets(report, latency, rates, service)
    cpus = len(os.sched_getaffinity(0))
    ceiling = cpus / call_cpu
    report.notes.append(
        f"CPU per pool call on the light mapper (caller thread and worker process): "
        f"{call_cpu * 1e6:.0f} µs, so {cpus} CPUs give at most {ceiling:.0f} calls/s = "
        f"{ceiling / rates[f'{workloads.light().name}|single']:.2f}x in-process single-thread "
        f"and {ceiling / rates[f'{workloads.light().name}|executor']:.2f}x ProcessPoolExecutor's "
        f"rate in this run"
    )
    report.sections.insert(0, report.sections.pop())  # the targets first
    print("\n" + "\n".join(report.notes))
    layers = layer_costs(args.quick)
    print("\n" + layers)
    if not args.no_write:
        service_section = ""
        if RESULTS.exists():  # benchmarks/bench_service.py keeps its own section
            current = RESULTS.read_text()
            start = current.find(SERVICE_HEADING)
            if start != -1:
                end = current.find("\n## ", start + len(SERVICE_HEADING))
                service_section = current[start:] if end == -1 else current[start:end]
        RESULTS.write_text(
            "# Benchmark results\n\n"
            "Regenerate with `python -m benchmarks.run` (about eleven minutes; it runs "
            "`python -m benchmarks.bench_service` too, which writes the service section "
            "below). Ratios are against in-process `_gojsonnet` measured in the same run, "
            "contenders interleaved in rounds. On these 2-CPU VMs absolute figures move a "
            "lot from run to run (more so on a machine shared with other work), ratios "
            "less.\n\n"
            f"Machine: {machine()}.\n\n"
            + "\n".join(f"- {n}" for n in report.notes)
            + "\n\n"
            + report.markdown()
            + "\n## Cost of the isolation layers (seccomp, privilege drop, limits)\n\n"
            + "`benchmarks/bench_layers.py`, one run:\n\n```\n"
            + layers
            + "\n```\n"
            + ("\n" + service_section.rstrip("\n") + "\n" if service_section else "")
        )
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
