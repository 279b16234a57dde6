"""Forks after a default pool exists, for real.

A real prefork server: ``gunicorn --preload`` with 3 workers and the README's hooks
(``post_fork``, ``worker_exit``), the app evaluating at import in the master. Every request
gets its own answer, served by the worker processes' own pools; a pool created before the
fork raises ForkedPool there; the master's idle default pool is gone once it has forked
(only its explicit pool's processes remain its children), and no process outlives the
server. 127.0.0.1 only.

A process that forks (tests/forking_parent.py): an idle default pool is terminated just
before the fork (the child inherits none of its fds, its processes are reaped); it is kept
while another thread runs, while a call is in flight (that call ends well), or when it was
given with ``set_default_pool``. Each child starts its own pool. ``compat``'s pools (one per
``max_stack``/``max_trace``) are treated as the default pool is.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from forking_parent import alive, children
from servicekit import descendants

TESTS = Path(__file__).parent
REQUESTS = 300


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(url: str) -> dict[str, object]:
    with urllib.request.urlopen(url, timeout=30) as answer:
        body: dict[str, object] = json.loads(answer.read())
        return body


def test_gunicorn_preload_with_three_workers(tmp_path: Path) -> None:
    pytest.importorskip("gunicorn")
    port = free_port()
    explicit_pids = tmp_path / "explicit-pool-pids.json"
    server = subprocess.Popen(
        [
            sys.executable, "-m", "gunicorn", "--preload", "--workers", "3",
            "--bind", f"127.0.0.1:{port}", "--chdir", str(TESTS), "--timeout", "60",
            "-c", str(TESTS / "prefork_gunicorn_conf.py"), "prefork_app:app",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={
            **os.environ, "PYTHONPATH": str(TESTS.parent), "PREFORK_MASTER_PIDS": str(explicit_pids)
        },
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    below: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                get(f"{base}/?n=0")
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.1)

        def one(n: int) -> int:
            body = get(f"{base}/?n={n}")
            assert body["value"] == {"id": f"u{n}", "n": 2 * n}, (n, body)
            return int(str(body["pid"]))

        with concurrent.futures.ThreadPoolExecutor(8) as executor:
            served_by = set(executor.map(one, range(REQUESTS)))
        assert server.pid not in served_by and len(served_by) >= 2
        assert get(f"{base}/explicit") == {"error": "forked_pool"}
        # The README's post_fork gave each worker a pool of cpus // workers (at least 1).
        assert get(f"{base}/pool")["size"] == max(1, (os.cpu_count() or 1) // 3)
        # The master's children: its 3 workers (forks of it, its own command line) and its
        # explicit pool's processes; its default pool was terminated before the first fork.
        with open(f"/proc/{server.pid}/cmdline", "rb") as master:
            command = master.read()
        not_workers = set()
        for kid in children(server.pid):
            with open(f"/proc/{kid}/cmdline", "rb") as kid_command:
                if kid_command.read() != command:
                    not_workers.add(kid)
        assert not_workers == set(json.loads(explicit_pids.read_text()))
        below = descendants(server.pid)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            _, stderr = server.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            _, stderr = server.communicate()
    assert server.returncode == 0, stderr.decode()[-3000:]
    assert b"Traceback" not in stderr, stderr.decode()[-3000:]
    for _ in range(100):  # at most ~10 s for the last orphans to be reaped
        if not any(alive(pid) for pid in below):
            break
        time.sleep(0.1)
    assert not [pid for pid in below if alive(pid)], "processes outlived the server"


def run_forking_parent(scenario: str) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, str(TESTS / "forking_parent.py"), scenario],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(TESTS.parent)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report: dict[str, Any] = json.loads(result.stdout.splitlines()[-1])
    child = report["child"]
    assert "error" not in child, child
    # The child's own pool: new processes, and a call answered.
    assert child["value"] == 4 and not set(child["pool_pids"]) & set(report["pool_pids"])
    assert report["value_after"] == 6
    return report


def test_an_idle_default_pool_is_terminated_before_a_fork() -> None:
    report = run_forking_parent("idle")
    child = report["child"]
    assert child["fds"] == child["baseline_fds"]  # none of the pool's channels or pidfds
    assert report["alive_after_fork"] == []  # killed and reaped in the parent, before the fork
    assert not report["same_pool"]  # the parent's next call started a new one
    assert not set(report["children"]) & set(report["pool_pids"])


def test_the_default_pool_is_kept_at_a_fork_beside_another_thread() -> None:
    report = run_forking_parent("thread")
    assert report["alive_after_fork"] == report["pool_pids"] and report["same_pool"]


def test_a_call_in_flight_at_a_fork_keeps_the_default_pool_and_ends_well() -> None:
    report = run_forking_parent("in_flight")
    assert report["busy_at_fork"] == 1
    assert report["call"] == sum(range(1, 400001))
    assert report["alive_after_fork"] == report["pool_pids"] and report["same_pool"]


def test_a_default_pool_given_with_set_default_pool_is_kept_at_a_fork() -> None:
    report = run_forking_parent("given")
    assert report["alive_after_fork"] == report["pool_pids"] and report["same_pool"]


def test_compat_pools_are_terminated_before_a_fork_and_start_afresh_in_the_child() -> None:
    report = run_forking_parent("compat")
    child = report["child"]
    assert child["compat"] == "5\n"  # not the parent's pool (ForkedPool, a RuntimeError)
    assert child["fds"] == child["baseline_fds"]
    assert report["alive_after_fork"] == []
