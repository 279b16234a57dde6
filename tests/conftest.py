from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from jsonnet_worker import WorkerPool
from jsonnet_worker._pool.processes import WorkerSettings, worker_command
from jsonnet_worker._sandbox.privileges import WorkerIdentity
from jsonnet_worker._wire.framing import DEFAULT_MAX_FRAME

TESTS = Path(__file__).parent
DATA = TESTS / "data"
HARNESS = TESTS / "harness" / "worker_harness.py"
ENGINES = ["go", "cpp"]


def harness_command(
    mode: str,
    engine: str = "go",
    memory_limit: int = 1 << 30,
    *,
    without: tuple[str, ...] = (),
    identity: WorkerIdentity | None = None,
    seccomp_errno: int | None = None,
    cpu_budget: float | None = None,
    parent_uid: int | None = None,
) -> list[str]:
    """The pool's worker command, with the test harness in MODE in place of the bootstrap,
    leaving out the layers named in ``without`` and dropping to ``identity`` if given;
    ``parent_uid``: the harness first becomes that uid, as if a non-root parent ran it."""
    settings = WorkerSettings(engine, memory_limit, DEFAULT_MAX_FRAME, cpu_budget=cpu_budget)
    real = worker_command(settings, identity)
    assert real[3] == "-c" and real[5] == "_worker"
    options = ["--without", ",".join(without)] if without else []
    if seccomp_errno is not None:
        options += ["--seccomp-errno", str(seccomp_errno)]
    if parent_uid is not None:
        options += ["--parent-uid", str(parent_uid)]
    return [sys.executable, "-I", str(HARNESS), mode, *options, *real[6:]]


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def full(pool: WorkerPool) -> bool:
    stats = pool.stats()
    return stats.alive == pool.size and stats.starting == 0 and stats.spares == pool.spares


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("adversarial", "the adversarial suite's long tier")
    group.addoption(
        "--soak-examples",
        type=int,
        default=400,
        help="hypothesis examples per fuzz test in the soak tier (default 400)",
    )
    group.addoption(
        "--soak-seconds",
        type=float,
        default=30.0,
        help="seconds of chaos under load in the soak tier (default 30)",
    )
    group.addoption(
        "--reliability-json",
        default=None,
        help="write what the adversarial suite tried and measured to this JSON file",
    )


def run_command(
    *args: str, cwd: Path, stdin: str = "", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m jsonnet_worker ARGS`` in ``cwd``, as a user runs the command."""
    return subprocess.run(
        [sys.executable, "-m", "jsonnet_worker", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env=env,
    )


def write_tree(top: Path, files: dict[str, str | bytes]) -> None:
    """Write ``files`` (relative name -> text or bytes) under ``top``, making directories."""
    for name, content in files.items():
        path = top / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)


def load_cases() -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = json.loads((DATA / "cases.json").read_text())
    return cases


def read_case_source(case: dict[str, Any]) -> str:
    return (DATA / case["file"]).read_text()


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def proc_stat(pid: int | str) -> list[str]:
    """The fields of ``/proc/<pid>/stat`` after the command's name: its state first
    (field 3), then its parent (4), ... its flags (9). FileNotFoundError once it is gone."""
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()


def child_pids() -> set[int]:
    """Processes whose parent is this process (zombies included)."""
    me = os.getpid()
    children = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = proc_stat(entry)
        except OSError:
            continue
        if int(fields[1]) == me:
            children.add(int(entry))
    return children


@pytest.fixture(scope="module", params=ENGINES)
def pool(request: pytest.FixtureRequest) -> Iterator[WorkerPool]:
    timeout = 5.0 if request.param == "cpp" else 2.0
    with WorkerPool(2, engine=request.param, timeout=timeout) as shared:
        yield shared


@pytest.fixture(scope="module")
def go_pool() -> Iterator[WorkerPool]:
    with WorkerPool(2, engine="go") as shared:
        yield shared
