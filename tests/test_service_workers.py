"""``serve --workers N``: real server processes on one socket of 127.0.0.1, each with its own
pool and host sandbox, and one /metrics that counts what every process served."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import time
from pathlib import Path

import httpx
import pytest

from jsonnet_worker.service import ConfigError, load_config
from servicekit import (
    READY_TIMEOUT,
    ServiceProcess,
    pid_alive,
    pinned_clients,
    running_service,
    samples,
    server_pids_and_dir,
    wait_for_log,
    write_config,
)


def test_two_server_processes_share_a_socket_metrics_and_a_clean_stop(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    with running_service(config, tmp_path, "--workers", "2") as service:
        log = wait_for_log(service, "all 2 server processes are ready")
        server_pids, metrics_dir = server_pids_and_dir(log)
        assert len(server_pids) == 2 and service.process.pid not in server_pids
        info = os.stat(metrics_dir)
        assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.geteuid()
        sent: dict[int, int] = {}
        pool_workers: set[int] = set()
        with pinned_clients(service.base_url, server_pids) as clients:
            scrapes = exercise(clients, sent, pool_workers, metrics_dir)
        scrapes.append(httpx.get(f"{service.base_url}/metrics").text)
        check_scrapes(scrapes)
        assert sent == {pid: count for pid, count in zip(sorted(server_pids), (3, 5), strict=True)}
        assert len(pool_workers) == 2
        parent = service.process.pid
        service.stop()
        log = service.log()
    for pid in {parent, *server_pids, *pool_workers}:
        assert not pid_alive(pid), (pid, log)
    assert not metrics_dir.exists(), log
    assert log.count("pool closed, workers reaped") == 2, log
    assert "Traceback" not in log, log


def exercise(
    clients: dict[int, httpx.Client],
    sent: dict[int, int],
    pool_workers: set[int],
    metrics_dir: Path,
) -> list[str]:
    """3 evaluations on one process's connection, 5 on the other's; the scrape of each."""
    for count, (pid, client) in zip((3, 5), sorted(clients.items()), strict=True):
        for index in range(count):
            answer = client.post("/v1/evaluate", json={"snippet": f"{index} + 1"})
            assert answer.json() == index + 1
        health = client.get("/healthz").json()
        assert health["server"]["pid"] == pid  # the same connection, the same process
        assert health["pool"]["evaluations"] >= count, health  # (+ a start-up check)
        host = health["sandbox"]["host"]
        assert host["applied"] is True, host
        assert host["allowed"]["rw_dirs"] == 1  # the metrics directory, nothing else
        # Each process, once restricted, was refused the directory above its grant.
        assert host["outside_private_dirs"] == [{"path": str(metrics_dir.parent), "refused": True}]
        pool_workers |= set(health["pool"]["worker_pids"])
        sent[pid] = count
    return [client.get("/metrics").text for client in clients.values()]


def check_scrapes(scrapes: list[str]) -> None:
    """Whichever process answers /metrics, it counts what both served (3 + 5)."""
    for text in scrapes:
        figures = samples(text)
        ok = (("endpoint", "evaluate"), ("outcome", "ok"))
        assert figures[("jsonnet_worker_evaluations_total", ok)] == 8, text
        status = (("endpoint", "evaluate"), ("status", "200"))
        assert figures[("jsonnet_worker_http_requests_total", status)] == 8
        count_key = ("jsonnet_worker_request_duration_seconds_count", ok[:1])
        assert figures[count_key] == 8
        assert figures[("jsonnet_worker_pool_size", ())] == 2  # livesum: 1 + 1
        states = ("idle", "busy", "starting")
        assert sum(figures[("jsonnet_worker_workers", (("state", st),))] for st in states) == 2
        assert figures[("jsonnet_worker_sandbox_enforced", ())] == 1  # livemin
        assert figures[("jsonnet_worker_crashes_total", ())] == 0


def test_a_server_process_that_cannot_start_stops_the_start(tmp_path: Path) -> None:
    """Each server process's start-up check refuses a mapper that does not parse: the
    parent exits 3, as one process does, and leaves neither a process nor its
    directory behind."""
    config = write_config(tmp_path)
    (tmp_path / "mapper.jsonnet").write_text("{\n  a: ,\n}\n")
    with pytest.raises(AssertionError, match=r"exited \(3\)") as failed:
        with running_service(config, tmp_path, "--workers", "2"):
            pass
    log = str(failed.value)
    server_pids, metrics_dir = server_pids_and_dir(log)
    assert "before it was ready: stopping" in log
    assert "mapper 'm'" in log and "does not check" in log
    assert not metrics_dir.exists()
    assert not any(pid_alive(pid) for pid in server_pids)


def test_a_bad_config_stops_the_parent_before_any_server_process(tmp_path: Path) -> None:
    """The config is as strict with --workers N: the parent refuses it (exit 2) before it
    binds or starts anything."""
    config = write_config(tmp_path, {"serve": {"auth": {"bearer_token_fil": "token"}}})
    with pytest.raises(AssertionError, match=r"exited \(2\)") as failed:
        with running_service(config, tmp_path, "--workers", "2"):
            pass
    log = str(failed.value)
    assert "serve.auth.bearer_token_fil: unknown key" in log
    assert "server processes on one socket" not in log


def test_workers_is_a_config_key_and_an_environment_override(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"serve": {"workers": 3}})
    assert load_config(config, environ={}).workers == 3
    assert load_config(config, environ={"JSONNET_WORKER_SERVE_WORKERS": "2"}).workers == 2
    assert load_config(write_config(tmp_path), environ={}).workers == 1
    for bad in ("0", "two", "1.5"):
        with pytest.raises(ConfigError, match=r"serve\.workers"):
            load_config(config, environ={"JSONNET_WORKER_SERVE_WORKERS": bad})


def wait_until_gone(pids: set[int], timeout: float = READY_TIMEOUT) -> set[int]:
    """The pids still alive once all are gone or ``timeout`` has passed (a bound, not a
    timing assertion)."""
    deadline = time.monotonic() + timeout
    while (alive := {pid for pid in pids if pid_alive(pid)}) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive


def every_pid(service: ServiceProcess, server_pids: set[int]) -> set[int]:
    """The server processes and their pool workers (each /healthz over a pinned connection)."""
    found = set(server_pids)
    with pinned_clients(service.base_url, server_pids) as clients:
        for client in clients.values():
            found |= set(client.get("/healthz").json()["pool"]["worker_pids"])
    return found


def test_a_server_process_that_dies_stops_the_service(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    with running_service(config, tmp_path, "--workers", "2") as service:
        log = wait_for_log(service, "all 2 server processes are ready")
        server_pids, metrics_dir = server_pids_and_dir(log)
        everything = every_pid(service, server_pids)
        victim = min(server_pids)
        os.kill(victim, signal.SIGKILL)
        assert service.process.wait(READY_TIMEOUT) == 1
        log = service.log()
    assert f"(pid {victim}) exited (-9) while serving: stopping the service" in log, log
    assert wait_until_gone(everything) == set(), log
    assert not metrics_dir.exists()


def test_server_processes_stop_when_the_parent_is_killed(tmp_path: Path) -> None:
    """SIGKILL leaves the parent no time to stop anyone: its lifeline pipe ends, and
    each server process stops (and reaps its pool) by itself."""
    config = write_config(tmp_path)
    with running_service(config, tmp_path, "--workers", "2") as service:
        log = wait_for_log(service, "all 2 server processes are ready")
        server_pids, metrics_dir = server_pids_and_dir(log)
        try:
            everything = every_pid(service, server_pids)
            service.process.kill()
            service.process.wait()
            left = wait_until_gone(everything)
            log = service.log()
        finally:
            shutil.rmtree(metrics_dir)  # what only a SIGKILLed parent leaves behind
    assert left == set(), (left, log)
    assert log.count("the parent process is gone: stopping") == 2, log
