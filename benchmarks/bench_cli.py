"""The command line's own speed: ``jsonnet-worker eval`` of a small file, from the shell's
fork to its exit, against go-jsonnet's ``jsonnet`` binary (or C++ jsonnet's, when the go one
cannot be had) and a fresh ``python -I -c`` that calls the binding directly, in one run.

    python -m benchmarks.bench_cli [--quick] [--runs N] [--baseline TREE]

Every contender is a new process evaluating the same small file (``{a: 1}``, issue 23's),
timed from spawn to exit and interleaved in rounds, so that the load of a shared machine
hits them alike: compare the ratios, not the milliseconds. ``eval`` is reported as its
median and p90 (wall clock), its median CPU (user + system, the process's and its reaped
children's: an ``eval``'s worker's too) and as a ratio to the ``python -I -c`` call of the
binding (the floor of any Python process that evaluates). Also timed, to say where a
command's time goes: the modules an ``eval`` imports (``python -c``), those it imports
before it spawns its worker (the console script's module, ``_cli.early``), one worker's
start to its hello (measured in this process) and the old path, a ``WorkerPool`` of one
worker (what ``eval`` ran before its one-shot worker). ``--baseline TREE`` adds ``eval`` run
from another checkout of this package (e.g. a ``git worktree`` of the commit before a
change), through ``PYTHONPATH``, so that a before and an after are timed in the same run.

The package's ``.pyc`` files are compiled first, as installing a wheel does: an editable
checkout run with ``PYTHONDONTWRITEBYTECODE`` set would otherwise compile every module on
every command. A binary is looked for on PATH (``jsonnet``; ``$GOPATH/bin`` and
``~/go/bin`` too, where ``go install github.com/google/go-jsonnet/cmd/jsonnet`` puts it) and
named by its ``--version``. ``python -m benchmarks.run`` includes this table.
"""

from __future__ import annotations

import argparse
import compileall
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.bench_latency import percentile
from jsonnet_worker import PoolConfig
from jsonnet_worker._pool.launch import launch_and_greet
from jsonnet_worker._pool.processes import settings_for

SMALL_FILE = "{a: 1}\n"
EXPECTED = '{\n   "a": 1\n}\n'
EVAL = "jsonnet-worker eval"
BINDING_NAME = "python -I -c _gojsonnet.evaluate_file"
BINDING = "import sys, _gojsonnet; sys.stdout.write(_gojsonnet.evaluate_file(sys.argv[1]))"
OLD_PATH = (
    "import sys; from jsonnet_worker import WorkerPool\n"
    "with WorkerPool(1, spares=0) as pool: "
    "sys.stdout.write(pool.evaluate_json(open(sys.argv[1]).read(), filename=sys.argv[1]))"
)
TARGET_SECONDS = 0.060  # issue 23: eval of a small file in at most 60 ms
# What an eval imports in the command's own process (its worker imports the worker side),
# and the part of it before the worker is spawned (the console script's module).
EVAL_IMPORTS = (
    "import jsonnet_worker._cli.main, jsonnet_worker._cli.commands, "
    "jsonnet_worker._cli.oneshot, jsonnet_worker._pool.exchange, jsonnet_worker._pool.launch"
)
SPAWN_IMPORTS = "import jsonnet_worker._cli.main"
PACKAGE_DIR = Path(__file__).resolve().parent.parent / "jsonnet_worker"


def cli_command() -> list[str]:
    """The ``jsonnet-worker`` console script of this interpreter's environment, as a user
    runs it (else ``python -m jsonnet_worker``)."""
    script = Path(sys.executable).with_name("jsonnet-worker")
    return [str(script)] if script.exists() else [sys.executable, "-m", "jsonnet_worker"]


def find_binaries() -> dict[str, list[str]]:
    """jsonnet binaries here, by a name that says which engine and version they are."""
    found: dict[str, list[str]] = {}
    gopath = os.environ.get("GOPATH", str(Path.home() / "go"))
    candidates = [shutil.which("jsonnet"), str(Path(gopath) / "bin" / "jsonnet")]
    for path in dict.fromkeys(c for c in candidates if c and os.access(c, os.X_OK)):
        version = subprocess.run(
            [path, "--version"], capture_output=True, text=True, check=False
        ).stdout.strip()
        engine = "go-jsonnet" if "go" in version.lower() else "C++ jsonnet"
        found[f"{engine} binary ({version.splitlines()[0] if version else path})"] = [path]
    return found


def contenders(
    source: str, baseline: Path | None = None
) -> dict[str, tuple[list[str], dict[str, str]]]:
    """Name -> (command line, environment), each printing the small file's JSON."""
    here = dict(os.environ)
    commands = {
        EVAL: [*cli_command(), "eval", source],
        BINDING_NAME: [sys.executable, "-I", "-c", BINDING, source],
    }
    commands |= {name: [*command, source] for name, command in find_binaries().items()}
    commands["python -c WorkerPool(1) (the old eval path)"] = [
        sys.executable,
        "-c",
        OLD_PATH,
        source,
    ]
    commands["an eval's imports only (python -c)"] = [sys.executable, "-c", EVAL_IMPORTS]
    commands["its imports before its worker's spawn (python -c)"] = [
        sys.executable,
        "-c",
        SPAWN_IMPORTS,
    ]
    found = {name: (command, here) for name, command in commands.items()}
    if baseline is not None:
        python_path = os.pathsep.join([str(baseline), *filter(None, [here.get("PYTHONPATH")])])
        found[f"{EVAL} (baseline: {baseline})"] = (
            [*cli_command(), "eval", source],
            here | {"PYTHONPATH": python_path},
        )
    return found


def run_once(command: list[str], environment: dict[str, str]) -> tuple[float, float]:
    """Seconds from spawn to exit, and the CPU seconds (user + system) the process and every
    child it reaped used (an ``eval``'s worker among them)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=environment)
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0 or done.stdout not in (EXPECTED, ""):
        raise RuntimeError(f"{command[:3]} failed ({done.returncode}): {done.stderr[-500:]}")
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return elapsed, cpu


def worker_starts(count: int) -> list[float]:
    """Seconds from a worker's spawn to its hello, in this process (a pool's worker)."""
    settings = settings_for(PoolConfig())
    timings = []
    for _ in range(count):
        started = time.perf_counter()
        worker, _ = launch_and_greet(settings)
        timings.append(time.perf_counter() - started)
        worker.close()
    return timings


def compile_package(*trees: Path) -> None:
    """Each tree's package compiled to ``.pyc`` files, as a wheel's install does."""
    for tree in trees:
        compileall.compile_dir(str(tree), quiet=1)


def measure(
    runs: int, rounds: int = 5, baseline: Path | None = None
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Each contender's wall-clock seconds, and its CPU seconds (a worker's start in this
    process has none of its own: it is not a child's)."""
    compile_package(PACKAGE_DIR, *([baseline / "jsonnet_worker"] if baseline else []))
    with tempfile.TemporaryDirectory() as directory:
        source = str(Path(directory) / "small.jsonnet")
        Path(source).write_text(SMALL_FILE)
        commands = contenders(source, baseline)
        for command, environment in commands.values():  # warm the page cache
            run_once(command, environment)
        timings: dict[str, list[float]] = {name: [] for name in commands}
        cpu: dict[str, list[float]] = {name: [] for name in commands}
        timings["a worker's start to its hello (in-process)"] = []
        per_round = max(1, -(-runs // rounds))  # at least ``runs`` samples each
        for _ in range(rounds):
            for name, (command, environment) in commands.items():
                for _ in range(per_round):
                    elapsed, used = run_once(command, environment)
                    timings[name].append(elapsed)
                    cpu[name].append(used)
            timings["a worker's start to its hello (in-process)"] += worker_starts(per_round)
    return timings, cpu


def table(
    timings: dict[str, list[float]], cpu: dict[str, list[float]]
) -> tuple[list[str], list[list[str]]]:
    floor = statistics.median(timings[BINDING_NAME])
    header = ["process", "p50 ms", "p90 ms", "p50 vs python -I -c binding", "CPU p50 ms"]
    rows = [
        [
            name,
            f"{statistics.median(samples) * 1e3:.1f}",
            f"{percentile(samples, 0.9) * 1e3:.1f}",
            f"{statistics.median(samples) / floor:.2f}x",
            f"{statistics.median(cpu[name]) * 1e3:.1f}" if cpu.get(name) else "-",
        ]
        for name, samples in timings.items()
    ]
    return header, rows


def notes(timings: dict[str, list[float]], cpu: dict[str, list[float]]) -> list[str]:
    ours = statistics.median(timings[EVAL])
    floor = statistics.median(timings[BINDING_NAME])
    lines = [
        f"{EVAL} of a small file ({len(timings[EVAL])} runs): p50 {ours * 1e3:.0f} ms, p90 "
        f"{percentile(timings[EVAL], 0.9) * 1e3:.0f} ms, {ours / floor:.2f}x the "
        f"{BINDING_NAME} ({floor * 1e3:.0f} ms); target {TARGET_SECONDS * 1e3:.0f} ms: "
        f"{'met' if ours <= TARGET_SECONDS else 'not met'}"
    ]
    for name in timings:
        if name.startswith(f"{EVAL} (baseline"):
            before = statistics.median(timings[name])
            cpu_ours, cpu_before = statistics.median(cpu[EVAL]), statistics.median(cpu[name])
            lines.append(
                f"against the {name[len(EVAL) + 2 : -1]}: {ours / before:.2f}x wall "
                f"({ours * 1e3:.0f} against {before * 1e3:.0f} ms), {cpu_ours / cpu_before:.2f}x "
                f"CPU ({cpu_ours * 1e3:.0f} against {cpu_before * 1e3:.0f} ms)"
            )
    binaries = [name for name in timings if "binary" in name]
    for name in binaries:
        lines.append(f"against the {name}: {ours / statistics.median(timings[name]):.1f}x")
    if not any("go-jsonnet" in name for name in binaries):
        lines.append("go-jsonnet's own binary was not found here (see bench_cli's docstring)")
    return lines


def run(report: Any, quick: bool) -> None:
    """For ``benchmarks.run``: the table and its notes into ``report``."""
    timings, cpu = measure(10 if quick else 40)
    header, rows = table(timings, cpu)
    report.table("The command line: eval of a small file, one process each", header, rows)
    report.notes.extend(notes(timings, cpu))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs: a smoke run")
    parser.add_argument("--runs", type=int, default=40, help="runs of each contender")
    parser.add_argument(
        "--baseline", type=Path, help="a checkout of this package to time eval from as well"
    )
    args = parser.parse_args()
    timings, cpu = measure(10 if args.quick else args.runs, baseline=args.baseline)
    header, rows = table(timings, cpu)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    print("\n".join(notes(timings, cpu)))


if __name__ == "__main__":
    main()
